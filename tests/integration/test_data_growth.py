"""Growing the data, diffing versions and skipping unchanged runs, with the real Prefect, MLflow, DVC and GE.

One temporary git repository with the data under DVC (local remote) lives through the
module, as a user's project would:
1. the first run trains, and its validation (with Data Docs) is in MLflow;
2. a rerun with the same data and config records that it skipped, and trains nothing;
3. subjects are added (real ones, and synthetic ones with their model version), ``dvc add``,
   commit; ``fairdiffusion data diff`` summarises the change;
4. the grown data's shift in group shares stops the run at validation ...
5. ... until the config acknowledges it; then the whole pipeline runs, and the lineage
   records the acknowledgement and the synthetic rows' provenance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fairdiffusion.config import load_config
from fairdiffusion.data.demo import DemoDatasetSpec, demo_subjects, generate_demo_dataset
from fairdiffusion.data.fairgenmed import add_subjects
from fairdiffusion.errors import ValidationFailed
from fairdiffusion.registry.skip import config_fingerprint

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SYNTHETIC_MODEL = "fd-growth-test v1 (run 0123abcd)"


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
    """A git repo with the data under DVC (pushed to a local remote) and a fast pipeline config."""
    root = tmp_path_factory.mktemp("growth")
    repo = root / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    # Seed 25: every group has >= 3 subjects and both glaucoma classes, in training and in test.
    generate_demo_dataset(repo / "data", DemoDatasetSpec(train=36, val=8, test=24, image_size=32, seed=25))
    _dvc(["init", "-q"], repo)
    _dvc(["config", "core.analytics", "false"], repo)
    _dvc(["remote", "add", "-d", "local", str(root / "remote")], repo)
    _dvc(["add", "-q", "data"], repo)
    _dvc(["push", "-q"], repo)
    _commit(repo, "data v1")
    policy = root / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "name": "permissive-test",
                "absolute": {"min_slice_size": 3, "max_es_fid": 1.0e6, "max_group_fid_gap": 1.0e6},
                "non_regression": {"fid_overall": 1.0e6, "es_fid": 1.0e6, "use_intervals": False},
                # Plumbing tests on a random tiny model: the base-model rule is tested on the demo.
                "reference": {"beat_base_model": False},
                # A random tiny model is prompt-blind: the fidelity rule is tested on the demo.
                "fidelity": {"min_group_fidelity": None, "min_margin_retained": None},
            }
        )
    )
    config = {
        "data": {"path": str(repo / "data"), "dvc_file": str(repo / "data.dvc")},
        "validation": {"min_group_count": 3, "image_shape": [32, 32]},
        "model": {"pretrained": "tiny", "tiny_dir": str(root / "tiny")},
        "training": {"output_dir": str(root / "train"), "max_steps": 2, "batch_size": 4, "fbp": {"time_window": 2}},
        "evaluation": {
            "output_dir": str(root / "eval"),
            "extractor": {"name": "randcnn", "dim": 8},
            "num_inference_steps": 1,
            "batch_size": 32,
            "intersections": False,
            "bootstrap_resamples": 0,
            "matched_draws": 0,
            "clinical": {"enabled": False},
            "fidelity": {"enabled": False},
        },
        "gate": {"policy": str(policy)},
        "tracking": {
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "artifact_root": str(root / "artifacts"),
            "model_name": "fd-growth",
        },
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return {"root": root, "repo": repo, "config": root / "config.yaml"}


def _client(config_path: Path):
    from mlflow import MlflowClient

    return MlflowClient(load_config(config_path).tracking.resolved_tracking_uri())


def _last_run(config_path: Path):
    client = _client(config_path)
    experiment = client.get_experiment_by_name(load_config(config_path).tracking.experiment)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]


def _versions(config_path: Path) -> list[str]:
    name = load_config(config_path).tracking.model_name
    return sorted(str(v.version) for v in _client(config_path).search_model_versions(f"name='{name}'"))


def test_first_run_trains_and_logs_validation_with_data_docs(prefect_harness, project):
    from flows.pipeline import fairdiffusion_pipeline

    outcome = fairdiffusion_pipeline(config_path=str(project["config"]))

    assert (outcome.version, outcome.status) == ("1", "champion"), outcome.reasons
    run = _last_run(project["config"])
    tags = run.data.tags
    assert tags["fd.skipped"] == "false" and tags["fd.skip.reason"] == "no champion yet: training"
    assert tags["fd.config.sha256"] == config_fingerprint(load_config(project["config"]))
    assert tags["fd.validation.success"] == "true" and tags["fd.validation.format"] == "fairgenmed"
    assert json.loads(tags["fd.validation.synthetic"]) == {"train_fraction": 0.0, "by_model": {}}
    client = _client(project["config"])
    docs = {f.path for f in client.list_artifacts(run.info.run_id, "validation/data_docs")}
    assert "validation/data_docs/index.html" in docs
    index = Path(client.download_artifacts(run.info.run_id, "validation/data_docs/index.html", str(project["root"])))
    assert "fairdiffusion.group_counts" in index.read_text()
    assert run.data.metrics["validation/synthetic_fraction"] == 0.0


def test_unchanged_rerun_records_the_skip_and_trains_nothing(prefect_harness, project):
    from flows.pipeline import fairdiffusion_pipeline

    weights = project["root"] / "train" / "pipeline" / "model_index.json"
    stamp = weights.stat().st_mtime

    state = fairdiffusion_pipeline(config_path=str(project["config"]), return_state=True)

    assert state.is_completed() and state.name == "Skipped", state
    outcome = state.result()
    assert outcome.status == "skipped" and not outcome.promoted
    assert outcome.version == "1" and outcome.compared_with_version == "1"
    assert "champion v1 was trained on: nothing new to train on" in outcome.reasons[0]
    assert _versions(project["config"]) == ["1"], "nothing registered"
    assert weights.stat().st_mtime == stamp, "nothing trained"
    run = _last_run(project["config"])
    assert run.info.run_id == outcome.run_id and run.info.status == "FINISHED"
    assert run.data.tags["fd.skipped"] == "true"
    assert run.data.tags["fd.skip.reason"] == outcome.reasons[0]
    assert run.data.tags["mlflow.runName"].startswith("skipped-")
    assert "fd.validation.success" not in run.data.tags


def test_grown_data_is_versioned_and_diffed(project):
    repo = project["repo"]
    real = add_subjects(repo / "data", "train", demo_subjects(14, seed=7, image_size=32, race="Asian"))
    synthetic = add_subjects(
        repo / "data", "train", demo_subjects(4, seed=8, image_size=32), "synthetic", SYNTHETIC_MODEL
    )
    _dvc(["add", "-q", "data"], repo)
    _dvc(["push", "-q"], repo)
    _commit(repo, "data v2: 14 Asian subjects from a new site, 4 synthetic")

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [str(BIN / "fairdiffusion"), "data", "diff", "HEAD~1", "HEAD", "--config", str(project["config"])]
    done = subprocess.run(args, cwd=repo, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "data diff HEAD~1 -> HEAD" in text and "subjects 68 -> 86" in text
    assert "added    18: data_00069, data_00070" in text and "removed  0: none" in text
    assert "changed  0: none" in text and "synthetic rows in train: 0 -> 4" in text
    asian = next(line for line in text.splitlines() if "train" in line and "race=Asian" in line)
    assert asian.split()[2:5] == [
        "5",
        str(5 + 14 + _count(repo, synthetic, "Asian")),
        f"+{14 + _count(repo, synthetic, 'Asian')}",
    ]

    done = subprocess.run([*args, "--json"], cwd=repo, capture_output=True, text=True, env=env, check=False)
    diff = json.loads(done.stdout)
    assert diff["added"] == sorted(real + synthetic) and diff["removed"] == []
    assert diff["group_counts"]["test"]["race=Asian"] == [3, 3], "the test split did not change"
    assert diff["before"]["dvc_md5"] != diff["after"]["dvc_md5"]


def _count(repo: Path, subjects: list[str], race: str) -> int:
    from fairdiffusion.data.fairgenmed import load_fairgenmed

    table = load_fairgenmed(repo / "data", ["train"]).set_index("subject")
    return int((table.loc[subjects, "race"] == race).sum())


def test_unacknowledged_share_shift_stops_the_grown_run_at_validation(prefect_harness, project):
    from flows.pipeline import fairdiffusion_pipeline

    with pytest.raises(ValidationFailed) as error:
        fairdiffusion_pipeline(config_path=str(project["config"]))

    message = str(error.value)
    assert "group_shares.shift: no group's share moves by more than 5 percentage points since champion v1" in message
    assert "train race=Asian 11.4% -> " in message
    run = _last_run(project["config"])
    assert run.info.status == "FAILED" and run.data.tags["fd.skipped"] == "false"
    assert run.data.tags["fd.skip.reason"].startswith("data changed since champion v1")
    assert _versions(project["config"]) == ["1"]
    moved = [s for s in error.value.result.share_shifts if s.shift > 0.05]
    project["moved"] = [s.slice.split(" ", 1)[1] for s in moved]  # type: ignore[assignment]


def test_acknowledged_growth_runs_the_whole_pipeline_with_provenance(prefect_harness, project):
    from flows.pipeline import fairdiffusion_pipeline

    document = yaml.safe_load(project["config"].read_text())
    reason = "2025-06: site B (Osaka) joined; 14 Asian subjects"
    document["validation"]["acknowledged_shifts"] = dict.fromkeys(project["moved"], reason)
    acknowledged = project["root"] / "acknowledged.yaml"
    acknowledged.write_text(yaml.safe_dump(document))

    state = fairdiffusion_pipeline(config_path=str(acknowledged), return_state=True)
    result = state.result(raise_on_failure=False)
    outcome = getattr(result, "outcome", result)  # a Rejected run's GateRejected error carries the outcome

    assert outcome.version == "2" and outcome.status in {"champion", "rejected"}, outcome.reasons
    run = _last_run(acknowledged)
    tags = run.data.tags
    assert tags["fd.skipped"] == "false" and tags["fd.validation.success"] == "true"
    assert json.loads(tags["fd.validation.synthetic"]) == {
        "train_fraction": round(4 / 62, 4),
        "by_model": {SYNTHETIC_MODEL: 4},
    }
    assert json.loads(tags["fd.validation.acknowledged_shifts"])["train race=Asian"] == reason
    assert tags["fd.validation.reference"].startswith("champion v1 (data md5 ")
    recorded = yaml.safe_load((project["repo"] / "data.dvc").read_text())["outs"][0]["md5"]
    assert tags["fd.data.dvc_md5"] == recorded
