"""Exactly-once promotion and tracking against a real `mlflow server` killed in the middle of them.

Each fault test performs one real sub-step of ``gate_and_register`` (log the model,
register the version, move ``champion``, create the audit run), then SIGKILLs the
server's whole process group: a real fault, the next MLflow call finds the port closed
and, with ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, fails at once instead of backing off.
The only monkeypatch wraps that sub-step so that the kill is scheduled right after it
returns: it decides *when* the fault happens, never what the code under test sees (no
call is faked or skipped). The server is then
restarted on the same store and port and the step retried, as the Prefect tasks'
``retries=2`` would: exactly one version and one logged model for the run, one decision
record, aliases the decision log explains, and no RUNNING run left behind.

The module shares one server (restarted in place); the tests run in order, each
candidate becoming the next champion.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fairdiffusion import cli
from fairdiffusion import tracking as runs
from fairdiffusion.config import PipelineConfig, load_config
from fairdiffusion.data.versioning import DataVersion
from fairdiffusion.registry import lineage, schema
from fairdiffusion.registry import promotion as registry
from fairdiffusion.registry.status import replay_aliases, unexplained_aliases

sys.path.insert(0, str(Path(__file__).parent))
from candidates import make_metrics, open_candidate  # noqa: E402

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MODEL = "fd-exactly-once"


class MlflowServer:
    """A real `mlflow server` (SQLite store, proxied artifacts) that can be killed and restarted in place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = f"sqlite:///{root / 'store.db'}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [str(BIN / "mlflow"), "server", "--backend-store-uri", self.store]
        command += ["--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        # No job runner: a third process importing MLflow would double every restart on 2 cores.
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with (self.root / "server.log").open("a") as log:
            # A session of its own, so that one killpg takes the server and every worker it spawned.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=5)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{self.log()[-3000:]}") from None
                time.sleep(0.25)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, sig)
        self.process.wait(timeout=30)

    def log(self) -> str:
        return (self.root / "server.log").read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-killed"))
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        # A dead server fails the next call at once (connection refused): no retries with
        # backoff. The timeout only bounds a live server's answer on a loaded machine.
        env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        server.start()
        yield server
        server.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def config_path(server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exactly-once")
    policy = root / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "name": "exactly-once",
                "absolute": {"min_slice_size": 5, "max_es_fid": 100.0, "max_group_fid_gap": 5.0},
                "non_regression": {"fid_overall": 0.10, "es_fid": 0.10},
                "reference": {"beat_base_model": False},
            }
        )
    )
    # The promotion lock is taken in the server's own store (tracking.lock_uri).
    tracking = {"tracking_uri": server.url, "lock_uri": server.store, "model_name": MODEL, "experiment": "once"}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({"gate": {"policy": str(policy)}, "tracking": tracking}))
    return path


@pytest.fixture(scope="module")
def config(config_path: Path) -> PipelineConfig:
    return load_config(config_path)


#: What each fault test measured, printed for the reliability figures (pytest -s).
FIGURES: list[str] = []


def _kill_after(monkeypatch: pytest.MonkeyPatch, server: MlflowServer, owner: Any, name: str) -> None:
    """Schedule the fault: the real ``owner.name`` runs, then the server is killed before anything else."""
    real: Callable[..., Any] = getattr(owner, name)

    def real_then_kill(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        server.kill()
        return result

    monkeypatch.setattr(owner, name, real_then_kill)


def _fail_then_retry(
    monkeypatch: pytest.MonkeyPatch, server: MlflowServer, owner: Any, name: str, step: Callable[[], Any]
) -> Any:
    with monkeypatch.context() as patch:
        _kill_after(patch, server, owner, name)
        with pytest.raises(MlflowException, match="failed with exception"):
            step()
    assert server.process is not None and server.process.poll() is not None, "the fault was injected"
    server.start()
    return step()


def _running_runs(client: MlflowClient) -> list[str]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(experiments, "attributes.status = 'RUNNING'")]


def _assert_exactly_once(config: PipelineConfig, run_id: str) -> dict[str, object]:
    """One version, logged model and gate decision for the run; aliases the log explains; no open run."""
    tracking = config.tracking
    client = MlflowClient(tracking.resolved_tracking_uri())
    versions = client.search_model_versions(f"name = '{MODEL}' and run_id = '{run_id}'")
    experiment = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    assert (len(versions), len(models)) == (1, 1)
    version = str(versions[0].version)
    gate = [r for r in registry.decision_history(tracking, version) if r.decision in schema.GATE_DECISIONS]
    assert len(gate) == 1
    assert client.get_run(gate[0].audit_run_id).info.status == "FINISHED"
    assert runs.artifact_json(client, gate[0].audit_run_id, schema.DECISION_ARTIFACT)["version"] == version
    aliases, history = registry.model_aliases(tracking), registry.decision_history(tracking)
    assert unexplained_aliases(aliases, history) == [] and replay_aliases(history).gaps == []
    assert aliases[schema.CHAMPION] == gate[0].champion_after == version
    assert aliases.get(schema.PREVIOUS_CHAMPION) == gate[0].champion_before
    assert versions[0].tags[schema.LATEST_DECISION_AUDIT_RUN] == gate[0].audit_run_id
    assert _running_runs(client) == []
    return {
        "versions": len(versions),
        "logged models": len(models),
        "decisions": len(gate),
        "aliases": f"champion v{aliases[schema.CHAMPION]}, previous v{aliases.get(schema.PREVIOUS_CHAMPION)}",
        "orphan runs": 0,
    }


#: (sub-step, the function that performs it): each is killed right after it returns.
SUB_STEPS = [
    ("log_model", registry, "log_model"),
    ("register_version", registry, "register_version"),
    ("move_champion", registry, "settle_champion"),
    ("audit run created", registry, "_create_audit_run"),
]


@pytest.mark.parametrize(("sub_step", "owner", "name"), SUB_STEPS, ids=[s[0] for s in SUB_STEPS])
def test_a_retry_after_the_server_died_completes_the_promotion_once(
    server, config, tiny_pipeline_dir, monkeypatch, sub_step, owner, name
):
    run_id, training, report = open_candidate(config, tiny_pipeline_dir, make_metrics(10.0))
    champion_before = registry.find_champion(config.tracking)
    outcome = _fail_then_retry(
        monkeypatch, server, owner, name, lambda: lineage.gate_and_register(config, run_id, training, report)
    )
    runs.end_run(config.tracking, run_id)  # as close_tracking_run does
    assert outcome.promoted and outcome.status == schema.STATUS_CHAMPION
    assert outcome.compared_with_version == (champion_before.version if champion_before else None)
    counts = _assert_exactly_once(config, run_id)
    FIGURES.append(f"after {sub_step} (SIGKILL of the server's process group): {counts}")
    print(FIGURES[-1])


def test_a_retried_open_tracking_run_reuses_its_run(server, config):
    """A retry calls open_pipeline_run again with the same flow run id and finds the run.

    Whatever failed after the run was created (a reply lost, a later call refused), the
    retry is this second call; no kill is needed to show it, and a restart costs seconds.
    """
    data = DataVersion(dvc_md5="md5-v1", data_dvc_commit=None, path="data", dvc_file="data.dvc")
    first = lineage.open_pipeline_run(config, data, flow_run_id="flow-1")
    again = lineage.open_pipeline_run(config, data, flow_run_id="flow-1")
    other = lineage.open_pipeline_run(config, data, flow_run_id="flow-2")
    assert again == first != other
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    keyed = client.search_runs([experiment], f"tags.`{schema.FLOW_RUN_ID}` = 'flow-1'")
    assert [r.info.run_id for r in keyed] == [first]
    assert sorted(_running_runs(client)) == sorted([first, other])
    for run_id in (first, other):
        runs.end_run(config.tracking, run_id)
    # Once closed, the run is never reopened: a new attempt of the flow run opens its own.
    reopened = lineage.open_pipeline_run(config, data, flow_run_id="flow-1")
    assert reopened != first
    runs.end_run(config.tracking, reopened)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The console entry point in this process (no interpreter start-up), as a user runs it."""
    with pytest.raises(SystemExit) as done:
        cli.main(list(args))
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


def test_a_replaced_champion_reads_as_replaced(config, config_path, capsys):
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    code, out, err = _cli(capsys, "audit", "--version", "1", "--json", "-c", str(config_path))
    assert code == 0, err
    audit = json.loads(out)
    assert audit["status"] == schema.STATUS_REPLACED and audit["aliases"] == []
    assert audit["alias_problems"] == [] and "warning" not in err
    first = client.get_model_version(MODEL, "1")
    assert "champion" not in first.description.lower()
    assert first.tags[schema.STATUS] == schema.STATUS_REPLACED  # the mirror tag followed the alias
    champion = registry.read_lineage(config.tracking, alias=schema.CHAMPION)
    assert champion.status == schema.STATUS_CHAMPION


def test_a_hand_moved_alias_is_reported_and_refused_until_recorded(config, config_path, capsys):
    tracking, path = config.tracking, str(config_path)
    before = registry.model_aliases(tracking)
    MlflowClient(tracking.resolved_tracking_uri()).set_registered_model_alias(MODEL, schema.CHAMPION, "1")

    code, out, err = _cli(capsys, "audit", "--alias", schema.CHAMPION, "--json", "-c", path)
    assert code == 0 and "warning: the registry disagrees with its decision log" in err
    assert json.loads(out)["status"] == schema.STATUS_CHAMPION
    assert any(f"alias 'champion' points at v1 but the decision log leaves it at v{before['champion']}" in p
               for p in json.loads(out)["alias_problems"])  # fmt: skip
    for command in (["rollback"], ["approve", "--version", before[schema.CHAMPION]]):
        code, _, err = _cli(capsys, *command, "--reason", "r", "-c", path)
        assert code == 1 and "refused, the registry disagrees with its decision log" in err, err
        assert "promote --version N --force" in err and "Traceback" not in err
    assert registry.model_aliases(tracking) == before | {schema.CHAMPION: "1"}, "nothing was moved or recorded"

    # Recording the hand move repairs the state; the move itself stays visible in the audit.
    code, _, err = _cli(capsys, "promote", "--version", "1", "--force", "--reason", "hand move recorded", "-c", path)
    assert code == 0, err
    assert registry.alias_problems(tracking) == [
        f"before the override of v1 at {registry.decision_history(tracking)[-1].at}, champion moved from "
        f"v{before[schema.CHAMPION]} to v1 with no decision recorded"
    ]
    code, _, err = _cli(capsys, "rollback", "--reason", "back", "-c", path)
    assert code == 0, err
    assert registry.model_aliases(tracking)[schema.CHAMPION] == before[schema.PREVIOUS_CHAMPION]
