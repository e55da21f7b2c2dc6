"""Data arrival starts a retraining run: `fairdiffusion data publish` -> event -> deployment trigger -> worker.

Everything is real and in its own process, as in production: a `prefect server`, a
process worker on the `fairdiffusion` pool, `prefect deploy --all` of this repository's
`prefect.yaml` (unchanged) from a user's project, and the CLI publishing new data there.

The project is a git repository with a copy of `prefect.yaml`, `flows/` and `tasks/`, the
synthetic FairGenMed data under DVC (local remote) and, as its `configs/production.yaml`,
a config that runs every stage in seconds (tiny random pipeline, one training step, one
inference step, no clinical classifier, a permissive policy) but keeps production's
`gate.require_approval: true`. So the triggered run trains on the published version,
passes the gate, and ends `AwaitingApproval` (a Completed-type state) having emitted
`fairdiffusion.model.awaiting-approval`; it never reaches `Skipped`, because the data
changed. The worker runs in another folder: the pull step must move it to the checkout
its `FAIRDIFFUSION_CHECKOUT` names. The MLflow URI reaches the run through the deployment's
`job_variables`, from the Prefect variable set before deploying.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from fairdiffusion.data.demo import demo_subjects
from fairdiffusion.data.fairgenmed import add_subjects
from fairdiffusion.registry import schema
from flows.events import (
    APPROVER,
    DATA_MD5,
    DATA_PUBLISHED,
    MODEL_APPROVED,
    MODEL_AWAITING_APPROVAL,
    MODEL_VERSION,
)
from flows.states import AWAITING_APPROVAL

sys.path.insert(0, str(Path(__file__).parent))
from user_project import commit, dvc, fast_config, run  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL = "data-trigger"
DEPLOYMENT = "fairdiffusion-pipeline/weekly-retraining"
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Data Steward",
    "GIT_AUTHOR_EMAIL": "steward@example.com",
    "GIT_COMMITTER_NAME": "Data Steward",
    "GIT_COMMITTER_EMAIL": "steward@example.com",
}
FINAL_TYPES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _user_project(root: Path, data: Path, tiny_pipeline: Path, tracking_uri: str) -> Path:
    """The checkout the worker runs: this repo's prefect.yaml, flows/ and tasks/, data v1 under DVC, the fast config."""
    project = root / "project"
    project.mkdir()
    shutil.copy(REPO / "prefect.yaml", project)
    for package in ("flows", "tasks"):
        shutil.copytree(REPO / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(data, project / "data")
    (project / "configs").mkdir()
    (project / "outputs").mkdir()  # the policy, training, evaluation and MLflow artifacts (git ignores it)
    document = fast_config(project / "outputs", project / "data", {}, tiny_pipeline, tracking_uri, MODEL)
    document["data"] |= {"path": "data", "dvc_file": "data.dvc"}  # relative to the checkout, as in production
    document["evaluation"]["clinical"] = {"enabled": False}
    document["gate"]["require_approval"] = True  # as configs/production.yaml
    (project / "configs" / "production.yaml").write_text(yaml.safe_dump(document))
    (project / ".gitignore").write_text("outputs/\n__pycache__/\n.prefect/\n")
    run(["git", "init", "-q"], project)
    dvc(["init", "-q"], project)
    dvc(["config", "core.analytics", "false"], project)
    dvc(["remote", "add", "-d", "local", str(root / "dvc-remote")], project)
    dvc(["add", "-q", "data"], project)
    dvc(["push", "-q"], project)
    commit(project, "data v1")
    return project


def _start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # its own session: ended, with what it started, by group
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _api(api: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{api}{path}",
        data=data,
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_for_health(api: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"{api}/health", timeout=5)
            return
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)


def _events(api: str, name: str, timeout: float = 60) -> list[dict[str, Any]]:
    """The events of that name, once the server has stored any (it writes them in batches, seconds apart)."""
    deadline = time.monotonic() + timeout
    while True:
        events = _api(api, "/events/filter", {"filter": {"event": {"name": [name]}}})["events"]
        if events or time.monotonic() > deadline:
            return list(events)
        time.sleep(0.5)


def _triggered_runs(api: str, deployment_id: str) -> list[dict[str, Any]]:
    """Flow runs of the deployment that an automation created (the cron schedule's runs are left out)."""
    runs = _api(api, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
    return [r for r in runs if (r.get("created_by") or {}).get("type") == "AUTOMATION"]


def _wait_for_final_run(
    api: str, deployment_id: str, worker: subprocess.Popen[bytes], logs: Path, timeout: float = 900
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        runs = _triggered_runs(api, deployment_id)
        if runs and runs[0]["state"]["type"] in FINAL_TYPES:
            assert len(runs) == 1, runs
            return runs[0]
        alive = worker.poll() is None
        if not alive or time.monotonic() > deadline:
            detail = "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in sorted(logs.glob("*.log")))
            pytest.fail(f"no final triggered run ({runs and runs[0]['state']}; worker alive: {alive}):\n{detail}")
        time.sleep(1)


def test_publishing_data_starts_the_deployment_which_trains_on_it(
    tmp_path: Path, valid_dataset: Path, tiny_pipeline_dir: Path, mlflow_store: str
) -> None:
    """Publish -> one run created by the trigger, with the published md5 -> ``AwaitingApproval`` on that version.

    Asserted exactly: the triggered run is ``COMPLETED``-type and named ``AwaitingApproval``
    (production's ``require_approval``), its ``data_md5`` parameter is the published md5,
    the registered version's data md5 is that md5, and the server holds one
    ``fairdiffusion.data.published`` and one ``fairdiffusion.model.awaiting-approval`` event
    (related to the flow run); then ``fairdiffusion approve`` sends one
    ``fairdiffusion.model.approved`` naming the version and the approver. Phase timings are
    printed (``-s``).
    """
    clock = {"start": time.monotonic()}
    logs = tmp_path / "logs"
    logs.mkdir()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FAIRDIFFUSION_"))}
    base |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    client = base | {"PREFECT_API_URL": api, "COLUMNS": "250"}
    # The server boots while the project is made.
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], base,
                    tmp_path, logs / "server.log")  # fmt: skip
    worker = None
    try:
        project = _user_project(tmp_path, valid_dataset, tiny_pipeline_dir, mlflow_store)
        _wait_for_health(api, server, logs / "server.log")
        clock["server up"] = time.monotonic()
        # What `prefect work-pool create fairdiffusion --type process` and `prefect variable set` send.
        _api(api, "/work_pools/", {"name": "fairdiffusion", "type": "process"})
        _api(api, "/variables/", {"name": "fairdiffusion_mlflow_tracking_uri", "value": mlflow_store})
        # The worker runs elsewhere; the pull step moves each run to the checkout its environment names.
        worker_env = client | {"FAIRDIFFUSION_CHECKOUT": str(project), "PREFECT_WORKER_QUERY_SECONDS": "1"}
        worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", "fairdiffusion", "--type", "process"],
                        worker_env, tmp_path, logs / "worker.log")  # fmt: skip
        _prefect(client, project, "--no-prompt", "deploy", "--all")  # FAIRDIFFUSION_CHECKOUT unset here
        clock["deployed"] = time.monotonic()
        deployment = _api(api, f"/deployments/name/{DEPLOYMENT}")
        assert deployment["job_variables"] == {"env": {"MLFLOW_TRACKING_URI": mlflow_store}}
        automations = _api(api, f"/automations/related-to/prefect.deployment.{deployment['id']}")
        assert [(a["trigger"]["expect"], a["trigger"]["match"]) for a in automations] == [
            ([DATA_PUBLISHED], {"prefect.resource.id": "fairdiffusion.data.data"})
        ]

        # New subjects arrive; the data steward publishes them.
        add_subjects(project / "data", "train", demo_subjects(4, seed=7, image_size=32))
        published = subprocess.run(
            [str(BIN / "fairdiffusion"), "data", "publish", "-c", "configs/production.yaml", "--json"],
            cwd=project, env=client | GIT_IDENTITY, capture_output=True, text=True, check=False,
        )  # fmt: skip
        clock["published"] = time.monotonic()
        assert published.returncode == 0, published.stdout + published.stderr
        publication = json.loads(published.stdout)
        assert publication["published"] and publication["pushed"] and publication["event"]["sent"]
        assert publication["commit"] == run(["git", "rev-parse", "HEAD"], project).strip()
        md5 = publication["dvc_md5"]

        flow_run = _wait_for_final_run(api, deployment["id"], worker, logs)
        clock["run final"] = time.monotonic()
        assert flow_run["created_by"]["id"] == automations[0]["id"]  # the deployment's trigger, not its schedule
        assert flow_run["parameters"]["data_md5"] == md5  # templated from the event's resource
        assert (flow_run["state"]["type"], flow_run["state"]["name"]) == ("COMPLETED", AWAITING_APPROVAL), flow_run

        # The run trained on the published version and registered it, waiting for a person.
        (version,) = MlflowClient(mlflow_store).search_model_versions(f"name = '{MODEL}'")
        assert version.tags[schema.DATA_MD5] == md5
        (awaiting,) = _events(api, MODEL_AWAITING_APPROVAL)
        assert awaiting["resource"][MODEL_VERSION] == str(version.version)
        assert f"prefect.flow-run.{flow_run['id']}" in {r["prefect.resource.id"] for r in awaiting["related"]}
        assert [e["resource"][DATA_MD5] for e in _events(api, DATA_PUBLISHED)] == [md5]

        # A person approves it; the command tells the server too.
        approved = subprocess.run(
            [str(BIN / "fairdiffusion"), "approve", "--version", str(version.version), "--reason", "grids reviewed",
             "--approver", "dana", "-c", "configs/production.yaml", "--json"],
            cwd=project, env=client, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert approved.returncode == 0, approved.stdout + approved.stderr
        assert json.loads(approved.stdout)["event"]["sent"]
        (approval,) = _events(api, MODEL_APPROVED)
        assert (approval["resource"][MODEL_VERSION], approval["resource"][APPROVER]) == (str(version.version), "dana")
        assert approval["payload"]["decision"] == schema.DECISION_APPROVAL
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
        marks = list(clock.items())
        print("".join(f"\n{name:>12}: +{t - marks[i][1]:5.1f} s" for i, (name, t) in enumerate(marks[1:])))


def _prefect(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout
