"""Two generations of self-consuming retraining with the real Prefect, MLflow, DVC and GE.

A temporary git repository holds a small dataset under DVC; generation 0 fine-tunes a tiny Stable Diffusion on it
for two steps, generation 1 on the real data plus the images generation 0 made for the
training prompts (``augment``). Each generation is an MLflow run that names its parent;
the synthetic rows carry their provenance; both are evaluated on the same real test set.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fairdiffusion.config import load_config
from fairdiffusion.data.demo import DemoDatasetSpec, generate_demo_dataset
from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.registry import generations as chain
from fairdiffusion.registry import schema

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"


def _project(root: Path) -> dict[str, object]:
    """A git repo whose data DVC tracks and has pushed to a local remote; the config's document."""
    repo = root / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    # Seed 25: >= 3 per group, and both glaucoma classes in each, in training and in test.
    generate_demo_dataset(repo / "data", DemoDatasetSpec(train=36, val=8, test=24, image_size=32, seed=25))
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    (repo / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    # The data stays in the workspace and the cache (no remote, no pull): the flow still reads
    # its version from data.dvc and refuses it unless `dvc status` is clean.
    _run([sys.executable, "-m", "dvc", "add", "-q", "data"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data v1"], repo)
    return {
        "data": {"path": str(repo / "data"), "dvc_file": str(repo / "data.dvc"), "pull": False},
        "validation": {"min_group_count": 3, "image_shape": [32, 32]},
        "model": {"pretrained": "tiny", "tiny_dir": str(root / "tiny")},
        "training": {"max_steps": 2, "batch_size": 4, "method": "baseline", "log_every": 1, "checkpoint_every": None},
        "evaluation": {
            "extractor": {"name": "randcnn", "dim": 8},
            "num_inference_steps": 1,
            "batch_size": 48,
            "bootstrap_resamples": 0,
            "matched_draws": 0,
            "min_slice_size": 3,
            "intersections": False,
            "grid_images_per_group": 1,
            "clinical": {"enabled": False},
        },
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_root": str(root / "artifacts")},
        "generations": {"output_dir": str(root / "generations"), "max_synthetic_share": 0.5},
    }


def test_two_generations_chain_runs_provenance_and_per_group_metrics(prefect_harness, tmp_path: Path) -> None:
    from flows.generations import fairdiffusion_generations

    document = _project(tmp_path)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(document))
    summaries = fairdiffusion_generations(config_path=str(config_path), generations=2, regime="augment")

    first, second = summaries
    assert (first.generation, first.parent_run_id, first.synthetic_share) == (0, None, 0.0)
    assert second.parent_run_id == first.run_id and second.synthetic_share == pytest.approx(0.5)
    assert set(second.groups["race/Asian"]) == {"fid", "recall", "diversity", "fidelity"}
    assert first.madness_passed  # generation 0 trained on real data only: the guard does not apply
    for metric in ("fid", "recall", "diversity"):  # each group's curves over the generations
        assert (tmp_path / "generations" / f"generations_{metric}.png").stat().st_size > 0

    data = load_fairgenmed(tmp_path / "generations" / "generation-1" / "data", ["train", "val", "test"])
    synthetic = data[data["source"] == "synthetic"]
    assert len(synthetic) == 44 and set(synthetic["split"]) == {"train"}
    assert set(synthetic["generated_by"]) == {chain.generated_by(first.run_id, 0)}
    real_test = load_fairgenmed(tmp_path / "repo" / "data", ["test"])
    test = data[data["split"] == "test"]
    assert test["subject"].tolist() == real_test["subject"].tolist(), "the same real test set every generation"

    config = load_config(config_path)
    client = _client(config.tracking.resolved_tracking_uri())
    runs = {run_id: client.get_run(run_id) for run_id in (first.run_id, second.run_id)}
    tags = runs[second.run_id].data.tags
    assert tags[schema.GENERATION_PARENT_RUN] == first.run_id and tags[schema.GENERATION] == "1"
    assert tags[schema.GENERATION_MAX_SYNTHETIC_SHARE] == "0.5" and tags[schema.GENERATION_REGIME] == "augment"
    assert "generation-0" in tags[schema.GENERATION_PARENT_MODEL] and "(sha256 " in tags[schema.GENERATION_PARENT_MODEL]
    assert json.loads(tags["fd.validation.synthetic"])["train_fraction"] == pytest.approx(0.5)
    metrics = runs[second.run_id].data.metrics
    assert any(key.startswith("diversity_randcnn8/race/") for key in metrics)
    assert all(run.info.status == "FINISHED" for run in runs.values())


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)
