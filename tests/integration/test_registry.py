"""The gate, registry and audit trail against a real `mlflow server` on localhost.

Nothing is mocked: a real tracking server (SQLite store, proxied artifacts) runs for
the module; candidates are real runs with a real tiny diffusers pipeline logged as a
pyfunc; the CLI is the installed console script; the REST API is read as an outside
client would.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fairdiffusion.config import load_config
from fairdiffusion.registry import promotion as registry
from fairdiffusion.registry import schema

sys.path.insert(0, str(Path(__file__).parent))
from candidates import GOOD_GROUPS, make_metrics, register_candidate  # noqa: E402

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MODEL = "fd-registry-test"
BAD_GROUPS = GOOD_GROUPS | {"race": {"Asian": 30.0, "Black": 12.0, "White": 9.0}}  # gap 21, ES-FID 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="module")
def server(server_root: Path):
    root = server_root
    port = _free_port()
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'store.db'}"]
        + ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so teardown stops the server and every worker it spawned
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}"
                ) from None
            time.sleep(1)
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()


def _write_config(path: Path, url: str, policy: Path, lock_uri: str, require_approval: bool = False) -> Path:
    tracking = {"tracking_uri": url, "lock_uri": lock_uri, "model_name": MODEL, "experiment": "registry-test"}
    path.write_text(
        yaml.safe_dump(
            {
                "gate": {"policy": str(policy), "require_approval": require_approval},
                "tracking": tracking,
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def setup(server: str, server_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("registry")
    # The promotion lock is taken in the server's own store (tracking.lock_uri).
    store = f"sqlite:///{server_root / 'store.db'}"
    policy = root / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "name": "registry-test",
                "absolute": {"min_slice_size": 5, "max_es_fid": 100.0, "max_group_fid_gap": 5.0},
                "non_regression": {"fid_overall": 0.10, "es_fid": 0.10},
                # Plumbing tests on a random tiny model: the base-model rule is tested on the demo.
                "reference": {"beat_base_model": False},
            }
        )
    )
    broken = root / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    return {
        "root": root,
        "config": _write_config(root / "config.yaml", server, policy, store),
        "approval": _write_config(root / "approval.yaml", server, policy, store, require_approval=True),
        "broken": _write_config(root / "broken-config.yaml", server, broken, store),
    }


@pytest.fixture(autouse=True)
def _no_global_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _cli(*args: str, actor: str = "ci-bot") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"FAIRDIFFUSION_ACTOR": actor}
    return subprocess.run([str(BIN / "fairdiffusion"), *args], capture_output=True, text=True, env=env, check=False)


def _champion(setup: dict) -> str | None:
    info = registry.find_champion(load_config(setup["config"]).tracking)
    return info.version if info else None


def test_first_model_is_judged_by_absolute_rules_and_becomes_champion(setup, tiny_pipeline_dir, server):
    outcome = register_candidate(load_config(setup["config"]), tiny_pipeline_dir, make_metrics(10.0))
    assert (outcome.version, outcome.status, outcome.compared_with_version) == ("1", schema.STATUS_CHAMPION, None)
    # Read back over the REST API, as an outside client (or the MLflow UI) would.
    version = _get(f"{server}/api/2.0/mlflow/model-versions/get?name={MODEL}&version=1")["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags[schema.GATE_PASSED] == "true" and tags[schema.STATUS] == schema.STATUS_CHAMPION
    assert tags[schema.DATA_MD5] == "md5-v1" and len(tags[schema.GATE_POLICY_HASH]) == 64
    assert tags[schema.LATEST_DECISION] == schema.DECISION_PASS
    assert "PASSED the fairness gate" in version["description"]
    alias = _get(f"{server}/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias={schema.CHAMPION}")
    assert alias["model_version"]["version"] == "1"


def test_failing_candidate_lists_every_violation_and_champion_stays(setup, tiny_pipeline_dir):
    outcome = register_candidate(load_config(setup["config"]), tiny_pipeline_dir, make_metrics(10.0, BAD_GROUPS))
    assert outcome.status == schema.STATUS_REJECTED and not outcome.promoted
    assert outcome.compared_with_version == "1"
    joined = " | ".join(outcome.reasons)
    assert "ES-FID on race" in joined and "largest FID gap between race groups" in joined
    assert "es_fid_randcnn8/race 240 vs champion v1" in joined  # non-regression is reported too
    assert _champion(setup) == "1"
    lineage = registry.read_lineage(load_config(setup["config"]).tracking, version=outcome.version)
    assert lineage.aliases == [schema.CANDIDATE] and lineage.gate.passed is False
    assert [d.decision for d in lineage.decisions] == [schema.DECISION_FAIL]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("nan", "is not finite (nan)"),
        ("other-data", "evaluation used data version md5-OTHER"),
        ("broken-policy", "gate policy cannot be used"),
    ],
)
def test_gate_fails_closed(setup, tiny_pipeline_dir, case, expected):
    metrics = make_metrics(10.0)
    config = load_config(setup["broken" if case == "broken-policy" else "config"])
    evaluated = "md5-OTHER" if case == "other-data" else "same"
    if case == "nan":
        metrics["fid_randcnn8/race/Asian"] = math.nan
    outcome = register_candidate(config, tiny_pipeline_dir, metrics, evaluated_md5=evaluated)
    assert outcome.status == schema.STATUS_REJECTED
    assert any(expected in reason for reason in outcome.reasons), outcome.reasons
    assert _champion(setup) == "1"


def test_approval_waits_then_promotes_and_records_the_approver(setup, tiny_pipeline_dir):
    outcome = register_candidate(load_config(setup["approval"]), tiny_pipeline_dir, make_metrics(10.0))
    assert outcome.status == schema.STATUS_AWAITING_APPROVAL and not outcome.promoted
    assert _champion(setup) == "1"
    done = _cli(
        "approve",
        "--version",
        outcome.version,
        "--reason",
        "reviewed subgroup grids",
        "-c",
        str(setup["config"]),
        actor="alice",
    )
    assert done.returncode == 0, done.stderr
    assert _champion(setup) == outcome.version
    record = registry.decision_history(load_config(setup["config"]).tracking, version=outcome.version)[-1]
    assert (record.decision, record.actor, record.reasons) == (
        schema.DECISION_APPROVAL,
        "alice",
        ["reviewed subgroup grids"],
    )
    assert (record.champion_before, record.champion_after) == ("1", outcome.version)

    refused = _cli("approve", "--version", "2", "--reason", "looks fine", "-c", str(setup["config"]))
    assert refused.returncode == 1
    assert "did not pass the fairness gate" in refused.stderr and "Traceback" not in refused.stderr
    assert _champion(setup) == outcome.version


def test_override_needs_force_and_reason_and_is_recorded_then_rollback(setup):
    config = str(setup["config"])
    before = _champion(setup)
    no_force = _cli("promote", "--version", "2", "--reason", "urgent", "-c", config)
    assert no_force.returncode == 1 and "--force" in no_force.stderr
    empty = _cli("promote", "--version", "2", "--force", "--reason", " ", "-c", config)
    assert empty.returncode == 1 and "--reason is required" in empty.stderr
    assert _champion(setup) == before

    forced = _cli("promote", "--version", "2", "--force", "--reason", "clinical sign-off", "-c", config, actor="bob")
    assert forced.returncode == 0, forced.stderr
    assert _champion(setup) == "2"
    record = registry.decision_history(load_config(config).tracking, version="2")[-1]
    assert record.decision == schema.DECISION_OVERRIDE and record.actor == "bob"
    assert record.reasons == ["clinical sign-off", "gate FAILED for this version"]

    back = _cli("rollback", "--reason", "override withdrawn", "-c", config, actor="carol")
    assert back.returncode == 0, back.stderr
    assert _champion(setup) == before
    last = registry.decision_history(load_config(config).tracking)[-1]
    assert (last.decision, last.version, last.champion_before, last.actor) == (
        schema.DECISION_ROLLBACK,
        before,
        "2",
        "carol",
    )
    again = _cli("rollback", "--reason", "again", "-c", config)
    assert again.returncode == 1 and f"no {schema.PREVIOUS_CHAMPION}" in again.stderr


def test_concurrent_promotions_keep_champion_passing_and_every_record(setup, tiny_pipeline_dir):
    tracking = load_config(setup["config"]).tracking
    records_before = len(registry.decision_history(tracking))
    script = Path(__file__).parent / "candidates.py"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    runs = [("9.9", "md5-v1"), ("10.0", "md5-v1"), ("9.95", "md5-v1")]
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(setup["config"]), str(tiny_pipeline_dir), overall, md5],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for overall, md5 in runs
    ]
    results = [p.communicate(timeout=600) for p in processes]
    assert all(p.returncode == 0 for p in processes), [r[1][-2000:] for r in results]

    history = registry.decision_history(tracking)
    new = history[records_before:]
    assert len(new) == len(runs), "no decision record was lost"
    # Serialised by the promotion lock: each decision saw the champion the previous one left.
    for earlier, later in zip(new, new[1:], strict=False):
        assert later.champion_before == earlier.champion_after
    champion = registry.read_lineage(tracking, alias=schema.CHAMPION)
    assert champion.gate.passed is True
    assert [m["name"] for m in _registered_models(setup)] == [MODEL], "the lock leaves no registry record"


def _registered_models(setup: dict) -> list[dict]:
    from mlflow import MlflowClient

    client = MlflowClient(load_config(setup["config"]).tracking.resolved_tracking_uri())
    return [{"name": m.name} for m in client.search_registered_models()]


def test_audit_history_and_page_show_every_decision(setup):
    config = str(setup["config"])
    history = _cli("audit", "--history", "--json", "-c", config)
    assert history.returncode == 0, history.stderr
    records = json.loads(history.stdout)
    every_kind = {
        schema.DECISION_PASS,
        schema.DECISION_FAIL,
        schema.DECISION_APPROVAL,
        schema.DECISION_OVERRIDE,
        schema.DECISION_ROLLBACK,
    }
    assert every_kind <= {r["decision"] for r in records}
    assert [r["at"] for r in records] == sorted(r["at"] for r in records)
    assert all(len(r["policy_hash"]) == 64 for r in records if r["decision"] == schema.DECISION_PASS)

    page = setup["root"] / "audit.html"
    done = _cli("audit", "--version", "2", "--report", str(page), "-c", config)
    assert done.returncode == 0, done.stderr
    html = page.read_text()
    for needle in ("Audit of fd-registry-test version 2", "OVERRIDE", "rollback", "clinical sign-off", "md5-v1"):
        assert needle in html
    assert "<script" not in html and "<link" not in html  # self-contained


def test_champion_loads_as_pyfunc_and_generates(setup):
    import mlflow

    mlflow.set_tracking_uri(load_config(setup["config"]).tracking.resolved_tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@{schema.CHAMPION}")
        images = model.predict(
            pd.DataFrame({"prompt": ["SLO fundus image of a Black patient", "x"]}), params={"num_inference_steps": 2}
        )
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # set_tracking_uri exports it (MLflow 3)
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8
    assert images.shape[0] == 2 and images.shape[-1] == 3
    assert model.metadata.signature.inputs.input_names() == ["prompt"]
