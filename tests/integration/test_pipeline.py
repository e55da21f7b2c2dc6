"""The whole flow on a small dataset with the real Prefect, MLflow, DVC and Great Expectations.

Nothing is mocked: a temporary git repository holds the data under DVC with a local
remote, the flow pulls it, validates it with Great Expectations, trains a tiny
Stable Diffusion for a few steps, evaluates, and registers in a SQLite MLflow registry,
all under Prefect's test harness (a real temporary Prefect API and database).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fairdiffusion.config import load_config
from fairdiffusion.data.demo import DemoDatasetSpec, generate_demo_dataset
from fairdiffusion.errors import DataVersionError, ValidationFailed
from fairdiffusion.registry import schema
from fairdiffusion.registry.promotion import read_lineage

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _dvc(args: list[str], cwd: Path) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


def _commit(repo: Path, message: str) -> str:
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)
    return _run(["git", "rev-parse", "HEAD"], repo).strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A git repo whose data is tracked by DVC and pushed to a local remote, then removed."""
    root = tmp_path_factory.mktemp("project")
    repo, remote = root / "repo", root / "remote"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    generate_demo_dataset(repo / "data", DemoDatasetSpec(train=36, val=8, test=24, image_size=32, seed=25))
    _dvc(["init", "-q"], repo)
    _dvc(["config", "core.analytics", "false"], repo)
    _dvc(["remote", "add", "-d", "local", str(remote)], repo)
    _dvc(["add", "-q", "data"], repo)
    _dvc(["push", "-q"], repo)
    commit = _commit(repo, "data v1")
    # A fresh clone has neither the data nor the cache: the flow must pull them.
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    policy_path = root / "policy.yaml"
    policy_path.write_text(
        yaml.safe_dump(
            {
                "name": "permissive-test",
                "absolute": {"min_slice_size": 3, "max_es_fid": 1.0e6, "max_group_fid_gap": 1.0e6},
                "non_regression": {"fid_overall": 0.5, "es_fid": 0.5},
                # Plumbing tests on a random tiny model: the base-model rule is tested on the demo.
                "reference": {"beat_base_model": False},
                # A random tiny model is prompt-blind: the fidelity rule is tested on the demo.
                "fidelity": {"min_group_fidelity": None, "min_margin_retained": None},
            }
        )
    )
    config = {
        "data": {
            "path": str(repo / "data"),
            "dvc_file": str(repo / "data.dvc"),
        },
        # Seed 25: >= 3 per group, and both glaucoma classes in each, in training and in test.
        "validation": {"min_group_count": 3, "image_shape": [32, 32]},
        "model": {"pretrained": "tiny", "tiny_dir": str(root / "tiny")},
        "training": {
            "output_dir": str(root / "train"),
            "max_steps": 4,
            "batch_size": 4,
            "fbp": {"time_window": 2},
            "log_every": 2,
        },
        "evaluation": {
            "output_dir": str(root / "eval"),
            "extractor": {"name": "randcnn", "dim": 8},
            "num_inference_steps": 2,
            "batch_size": 24,
            "bootstrap_resamples": 50,
            "matched_draws": 3,
            "min_slice_size": 3,
            "clinical": {"epochs": 2, "resolution": 16},
            "fidelity": {"epochs": 2, "resolution": 16},
        },
        "gate": {"policy": str(policy_path)},
        "tracking": {
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "artifact_root": str(root / "artifacts"),
            "model_name": "fd-test",
        },
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return {"root": root, "repo": repo, "config": config_path, "commit": Path(commit)}


def _versions(config_path: Path) -> list[str]:
    from mlflow import MlflowClient

    tracking = load_config(config_path).tracking
    client = MlflowClient(tracking.resolved_tracking_uri())
    return sorted(v.version for v in client.search_model_versions(f"name='{tracking.model_name}'"))


def test_flow_pulls_validates_trains_evaluates_and_promotes(prefect_harness, project):
    from flows.pipeline import fairdiffusion_pipeline

    outcome = fairdiffusion_pipeline(config_path=str(project["config"]))

    assert outcome.version == "1"
    assert outcome.promoted, outcome.reasons
    assert (project["repo"] / "data" / "data_summary.csv").is_file(), "dvc pull restored the data"
    recorded_md5 = yaml.safe_load((project["repo"] / "data.dvc").read_text())["outs"][0]["md5"]
    lineage = read_lineage(load_config(project["config"]).tracking, alias="champion")
    assert lineage["version"] == "1"
    assert set(lineage["aliases"]) == {"candidate", "champion"}
    assert lineage["data"]["dvc_md5"] == recorded_md5
    assert lineage["data"]["data_dvc_commit"] == str(project["commit"])
    assert lineage["validation"] == {"success": True, "failed_expectations": []}
    assert lineage["training"]["method"] == "fair"
    assert lineage["training"]["config"]["training"]["max_steps"] == 4
    assert lineage["gate"]["passed"] is True and lineage["gate"]["compared_with_version"] is None
    assert np.isfinite(lineage["metrics"]["overall"]["fid_randcnn8/overall"])
    assert "fid_randcnn8/race/Asian" in lineage["metrics"]["per_subgroup"]
    assert lineage["code"]["git_commit"], "the code version is recorded"
    weights = list((project["root"] / "train" / "pipeline" / "unet").glob("*.safetensors"))
    assert weights, "the UNet is saved as safetensors"
    _assert_mlflow_conventions(project, lineage, recorded_md5)


def _assert_mlflow_conventions(project: dict[str, Path], lineage, recorded_md5: str) -> None:
    """MLflow's own lineage fields, the verdict tag, and the model card, in the folder and on the run."""
    from mlflow import MlflowClient

    client = MlflowClient(load_config(project["config"]).tracking.resolved_tracking_uri())
    run = client.get_run(lineage.run_id)
    assert run.data.tags[schema.MLFLOW_GIT_COMMIT] == lineage.code.git_commit
    assert run.data.tags[schema.GATE_VERDICT] == schema.VERDICT_PROMOTED
    inputs = {i.dataset.digest: i for i in run.inputs.dataset_inputs}
    assert recorded_md5 in inputs, "the training data is a dataset input digested by its DVC md5"
    assert json.loads(inputs[recorded_md5].dataset.source)["dvc_file"] == str(project["repo"] / "data.dvc")
    cards = list((project["root"] / "train").rglob(schema.MODEL_CARD_FILE))
    assert len(cards) == 1, "one model card, in the saved pipeline folder"
    card = cards[0].read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and recorded_md5 in card
    logged = Path(client.download_artifacts(lineage.run_id, schema.MODEL_CARD_ARTIFACT, str(project["root"])))
    assert logged.read_text() == card


def test_second_run_is_compared_with_the_champion(prefect_harness, project):
    from flows.pipeline import fairdiffusion_pipeline

    # Same data and config as the champion: only a forced run trains (else it skips).
    # As the deployment runs it: training and evaluation in folders of this flow run's own.
    state = fairdiffusion_pipeline(
        config_path=str(project["config"]), force=True, per_run_outputs=True, return_state=True
    )
    result = state.result(raise_on_failure=False)
    outcome = getattr(result, "outcome", result)  # a Rejected run's GateRejected error carries the outcome
    assert state.name == {"champion": "Completed", "rejected": "Rejected"}[outcome.status], state
    run_dir = project["root"] / "train" / str(state.state_details.flow_run_id)
    assert (run_dir / "pipeline" / "model_index.json").is_file(), "the candidate trained in its own folder"
    assert outcome.report_path == str(project["root"] / "eval" / run_dir.name / "evaluation.md")
    from prefect.artifacts import Artifact

    artifact = Artifact.get("gate-fd-test")
    assert artifact is not None and "| rule |" in str(artifact.data) and outcome.run_id in str(artifact.data)
    assert outcome.version == "2"
    assert outcome.compared_with_version == "1"
    lineage = read_lineage(load_config(project["config"]).tracking, version="2")
    assert lineage["gate"]["compared_with_version"] == "1"
    if outcome.promoted:
        assert "champion" in lineage["aliases"]
        assert "previous-champion" in read_lineage(load_config(project["config"]).tracking, version="1")["aliases"]


def test_audit_cli_prints_the_champion_lineage(project):
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [str(BIN / "fairdiffusion"), "audit", "--model", "fd-test", "--alias", "champion", "--json"]
        + ["--config", str(project["config"])],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lineage = json.loads(done.stdout)
    recorded_md5 = yaml.safe_load((project["repo"] / "data.dvc").read_text())["outs"][0]["md5"]
    assert lineage["data"]["dvc_md5"] == recorded_md5
    for key in ("model", "version", "aliases", "run_id", "data", "code", "validation", "training", "metrics"):
        assert key in lineage
    assert {"passed", "reasons", "policy", "compared_with_version"} <= set(lineage["gate"])


def test_modified_data_is_refused_and_nothing_is_registered(prefect_harness, project):
    from flows.pipeline import fairdiffusion_pipeline

    before = _versions(project["config"])
    target = project["repo"] / "data" / "data_summary.csv"
    original = target.read_bytes()
    target.write_bytes(original + b"\n")
    try:
        with pytest.raises(DataVersionError, match="differs from its recorded version"):
            fairdiffusion_pipeline(config_path=str(project["config"]))
    finally:
        target.write_bytes(original)
    assert _versions(project["config"]) == before
    assert target.read_bytes() == original


def test_invalid_data_version_stops_before_training(prefect_harness, project):
    """A committed data version with an unknown race code fails validation: no version is created."""
    from flows.pipeline import fairdiffusion_pipeline

    repo = project["repo"]
    bad = sorted((repo / "data" / "test").glob("data_*.npz"))[0]
    arrays = dict(np.load(bad))
    arrays["race"] = np.asarray(9)
    np.savez(bad, **arrays)
    _dvc(["add", "-q", "data"], repo)
    _dvc(["push", "-q"], repo)
    _commit(repo, "data v2 (bad race code)")
    before = _versions(project["config"])
    train_dir = project["root"] / "train"
    stamp = (train_dir / "pipeline" / "model_index.json").stat().st_mtime

    with pytest.raises(ValidationFailed) as error:
        fairdiffusion_pipeline(config_path=str(project["config"]))

    assert bad.stem in str(error.value) and "race" in str(error.value)
    assert _versions(project["config"]) == before
    assert (train_dir / "pipeline" / "model_index.json").stat().st_mtime == stamp, "nothing was trained"
    from mlflow import MlflowClient

    tracking = load_config(project["config"]).tracking
    client = MlflowClient(tracking.resolved_tracking_uri())
    experiment = client.get_experiment_by_name(tracking.experiment)
    last = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert last.info.status == "FAILED"
    assert last.data.tags["fd.validation.success"] == "false"
    assert bad.stem in last.data.tags["fd.validation.failed_expectations"]


def test_report_cli_renders_a_registered_versions_evaluation(project, tmp_path):
    """The flow logged the whole evaluation; `fairdiffusion report` renders it again from MLflow alone."""
    from mlflow import MlflowClient

    tracking = load_config(project["config"]).tracking
    run_id = read_lineage(tracking, version="1")["run_id"]
    client = MlflowClient(tracking.resolved_tracking_uri())
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {
        "evaluation/evaluation.json",
        "evaluation/report.md",
        "evaluation/report.html",
        "evaluation/charts",
        "evaluation/grids",
    } <= logged
    metrics = client.get_run(run_id).data.metrics
    for key in ("ci_low/fid_randcnn8/overall", "es_kid_randcnn8/race", "auc_small/glaucoma/overall", "matched_n/race"):
        assert key in metrics, key

    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(BIN / "fairdiffusion"), "report", "--model", "fd-test", "--config", str(project["config"])]
    done = subprocess.run(
        [*command, "--version", "1", "--out", str(tmp_path / "v1")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "v1" / "report.html").read_text()
    assert "data:image/png;base64," in page and "Clinical semantics" in page and "randcnn8" in page
    assert (tmp_path / "v1" / "evaluation.md").is_file() and list((tmp_path / "v1" / "grids").glob("*.png"))
    missing = subprocess.run([*command, "--version", "99"], capture_output=True, text=True, env=env, check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
