"""A user's project for the whole-flow tests of other dataset layouts and of a killed run.

A git repository whose dataset folders DVC tracks, pushed to a local DVC remote, then
removed with the DVC cache (as in a fresh clone, so the flow must pull them), and a fast
pipeline config around it: tiny random pipeline, one step, one inference step, minimal
bootstrap, a permissive gate policy. The datasets are subsets, in the same public layout,
of the session's HAM10000 and CheXpert fixtures (``tests/conftest.py``): one image per
split x group x diagnosis cell, so every group has both classes in training and in test
with a few dozen images. Imported by ``test_layouts`` and ``test_kill_rerun`` (like
``candidates.py``); nothing here is mocked.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fairdiffusion.config import parse_config
from fairdiffusion.data.formats import load_dataset

#: A gate that judges plumbing, not quality: a random tiny model must be able to pass it.
PERMISSIVE_POLICY = {
    "name": "permissive-test",
    "absolute": {"min_slice_size": 2, "max_es_fid": 1.0e6, "max_group_fid_gap": 1.0e6},
    "non_regression": {"fid_overall": 0.5, "es_fid": 0.5},
    "reference": {"beat_base_model": False},
    # A random tiny model is prompt-blind: the fidelity rule is tested on the demo.
    "fidelity": {"min_group_fidelity": None, "min_margin_retained": None},
}


def run(args: list[str], cwd: Path) -> str:
    """Run a command; fail the test with its output unless it exits 0."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc(args: list[str], cwd: Path) -> str:
    """Run a DVC command with this interpreter's DVC."""
    return run([sys.executable, "-m", "dvc", *args], cwd)


def commit(repo: Path, message: str) -> str:
    """Commit everything; returns the commit's sha."""
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)
    return run(["git", "rev-parse", "HEAD"], repo).strip()


#: The label tables of each format, and the column that names an image in them.
LABEL_TABLES = {
    "ham10000": {"HAM10000_metadata.csv": "image_id"},
    "chexpert": {"train.csv": "Path", "valid.csv": "Path"},
}
#: The validation minimum the subsets meet (their smallest group has 2 images in test).
MIN_GROUP_COUNT = 2


def write_subset(dataset: Path, out: Path, data_format: str) -> Path:
    """Copy of ``dataset`` (HAM10000 or CheXpert layout) keeping the first image of each split x group x diagnosis.

    The label tables keep their columns and the kept rows as they are; images of other
    rows are not copied; every other file (the CheXpert demographics) is copied whole.
    """
    data = parse_config({"data": {"format": data_format, "path": str(dataset)}}).data
    samples = load_dataset(data).samples.sort_values("subject")
    kept = samples.groupby(["split", *data.attributes, "diagnosis"]).head(1)
    images, subjects = {Path(p).resolve() for p in kept["image_path"]}, set(kept["subject"])

    def skipped(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n.endswith(".jpg") and (Path(folder) / n).resolve() not in images]

    shutil.copytree(dataset, out, ignore=skipped)
    for name, column in LABEL_TABLES[data_format].items():
        if (out / name).is_file():
            table = pd.read_csv(out / name, dtype=str, keep_default_na=False)
            table[table[column].map(lambda value: _image_key(value) in subjects)].to_csv(out / name, index=False)
    return out


def _image_key(value: str) -> str:
    """A label table's image column as the adapters' subject: HAM10000's image_id, CheXpert's path below the split."""
    parts = Path(value).parts
    return Path(*parts[1:]).with_suffix("").as_posix() if len(parts) > 1 else value


def make_dvc_project(root: Path, datasets: list[Path]) -> list[Path]:
    """Copy ``datasets`` into a new git repo under ``root``, ``dvc add`` and push them, then delete them and the cache.

    Returns:
        Each dataset's folder in the repo (absent until pulled; its ``.dvc`` file beside it).
    """
    repo = root / "repo"
    repo.mkdir(parents=True)
    run(["git", "init", "-q"], repo)
    copies = [Path(shutil.copytree(dataset, repo / dataset.name)) for dataset in datasets]
    dvc(["init", "-q"], repo)
    remote = f"[core]\n    analytics = false\n    remote = local\n['remote \"local\"']\n    url = {root / 'remote'}\n"
    with (repo / ".dvc" / "config").open("a") as config:  # what `dvc config` and `dvc remote add -d` write
        config.write(remote)
    dvc(["add", "-q", *(copy.name for copy in copies)], repo)
    dvc(["push", "-q"], repo)
    commit(repo, "data v1")
    for copy in copies:
        shutil.rmtree(copy)
    shutil.rmtree(repo / ".dvc" / "cache")
    return copies


def fast_config(
    root: Path, data: Path, data_section: dict[str, Any], tiny_pipeline: Path, tracking_uri: str, name: str
) -> dict[str, Any]:
    """A config document that runs every stage in seconds; outputs under ``root``, MLflow names from ``name``."""
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump(PERMISSIVE_POLICY))
    return {
        "data": {"path": str(data), "dvc_file": str(data.with_name(data.name + ".dvc")), **data_section},
        "validation": {"min_group_count": MIN_GROUP_COUNT},
        "model": {"pretrained": str(tiny_pipeline)},
        "training": {
            "output_dir": str(root / "train"),
            "max_steps": 1,
            "batch_size": 4,
            "fbp": {"time_window": 2},
            "log_every": 1,
            "checkpoint_every": None,
        },
        "evaluation": {
            "output_dir": str(root / "eval"),
            "extractor": {"name": "randcnn", "dim": 8},
            "num_inference_steps": 1,
            "batch_size": 64,
            "bootstrap_resamples": 10,
            "matched_draws": 1,
            "min_slice_size": MIN_GROUP_COUNT,
            "intersections": False,
            "clinical": {"epochs": 1, "resolution": 16, "labels": ["diagnosis"]},
            "fidelity": {"epochs": 1, "resolution": 16},
        },
        "gate": {"policy": str(policy)},
        "tracking": {
            "tracking_uri": tracking_uri,
            "artifact_root": str(root / "artifacts"),
            "experiment": name,
            "audit_experiment": f"{name}-audit",
            "model_name": name,
        },
    }


def write_config(path: Path, document: dict[str, Any]) -> Path:
    """Write a config document as YAML; returns its path."""
    path.write_text(yaml.safe_dump(document))
    return path
