"""Finding the baseline run a candidate is compared with, in a real MLflow SQLite store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fairdiffusion import tracking as runs
from fairdiffusion.config import TrackingConfig
from fairdiffusion.registry import schema
from fairdiffusion.registry.baseline import find_baseline_run

EVALUATED = {"num_samples/overall": 200.0, "fid_fundus-enc64/race/Asian": 30.0}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrackingConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")


def add_run(store: TrackingConfig, method: str, md5: str, metrics: dict[str, float] | None = None) -> str:
    time.sleep(0.01)  # distinct start times: the newest run wins
    run_id = runs.start_run(store, f"{method}-{md5}", {schema.DATA_MD5: md5, schema.TRAINING_METHOD: method})
    if metrics:
        runs.log_metrics(store, run_id, metrics)
    return run_id


def make_champion(store: TrackingConfig, run_id: str, tmp_path: Path) -> str:
    client = runs.mlflow_client(store)
    client.create_registered_model(store.model_name)
    version = client.create_model_version(store.model_name, (tmp_path / "model").as_uri(), run_id=run_id)
    client.set_registered_model_alias(store.model_name, schema.CHAMPION, version.version)
    return str(version.version)


def test_no_store_and_no_baseline_give_none(store: TrackingConfig) -> None:
    assert find_baseline_run(store, "md5-a") is None
    add_run(store, "fair", "md5-a", EVALUATED)
    add_run(store, "baseline", "md5-b", EVALUATED)  # another data version
    add_run(store, "baseline", "md5-a")  # never evaluated (failed or still training)
    assert find_baseline_run(store, "md5-a") is None


def test_the_newest_evaluated_baseline_sibling_on_the_same_data_but_never_the_candidate(store: TrackingConfig) -> None:
    add_run(store, "baseline", "md5-a", EVALUATED | {"fid_fundus-enc64/race/Asian": 40.0})
    newer = add_run(store, "baseline", "md5-a", EVALUATED)
    add_run(store, "fair", "md5-a", EVALUATED)
    found = find_baseline_run(store, "md5-a")
    assert found is not None and found.run_id == newer
    assert found.metrics["fid_fundus-enc64/race/Asian"] == 30.0
    assert found.source == "latest baseline run of experiment 'fairdiffusion'"
    older = find_baseline_run(store, "md5-a", exclude_run_id=newer)
    assert older is not None and older.metrics["fid_fundus-enc64/race/Asian"] == 40.0


def test_a_baseline_champion_on_the_same_data_comes_first(store: TrackingConfig, tmp_path: Path) -> None:
    champion_run = add_run(store, "baseline", "md5-a", EVALUATED | {"fid_fundus-enc64/race/Asian": 50.0})
    version = make_champion(store, champion_run, tmp_path)
    add_run(store, "baseline", "md5-a", EVALUATED)  # newer, but not serving
    found = find_baseline_run(store, "md5-a")
    assert found is not None and (found.run_id, found.source) == (champion_run, f"champion v{version}")
    assert found.metrics["fid_fundus-enc64/race/Asian"] == 50.0


def test_a_fair_champion_or_one_on_other_data_is_skipped_for_a_sibling(store: TrackingConfig, tmp_path: Path) -> None:
    make_champion(store, add_run(store, "fair", "md5-a", EVALUATED), tmp_path)
    sibling = add_run(store, "baseline", "md5-a", EVALUATED)
    found = find_baseline_run(store, "md5-a")
    assert found is not None and found.run_id == sibling
    assert find_baseline_run(store, "md5-b") is None
