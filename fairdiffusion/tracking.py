"""MLflow run logging: the plumbing that training and the registry both write through.

Everything is written through an explicit ``MlflowClient`` built from the tracking URI in
force (``MLFLOW_TRACKING_URI`` or the config), so nothing here touches MLflow's global state
and the same code talks to a SQLite file or a tracking server.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairdiffusion.config import TrackingConfig

_TAG_LIMIT = 5000  # MLflow's limit on a tag value's length


def mlflow_client(tracking: TrackingConfig) -> Any:
    """A client for the tracking URI in force (registry on the same URI); a SQLite file's folder is created."""
    from mlflow import MlflowClient

    uri = tracking.resolved_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def json_tag(value: object) -> str:
    """A value as a JSON tag, truncated (and marked so) at MLflow's tag length limit."""
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _TAG_LIMIT else text[: _TAG_LIMIT - 20] + "...(truncated)"


def start_run(tracking: TrackingConfig, run_name: str, tags: dict[str, str]) -> str:
    """Create (if needed) the experiment and start a run in it; returns the run id."""
    client = mlflow_client(tracking)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        experiment_id = create_experiment(client, tracking, tracking.experiment)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return str(run.info.run_id)


def find_open_run(tracking: TrackingConfig, tag: str, value: str) -> str | None:
    """The oldest RUNNING run of the experiment whose ``tag`` is ``value``, or ``None``."""
    client = mlflow_client(tracking)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None or "'" in value:
        return None
    query = f"tags.`{tag}` = '{value}' and attributes.status = 'RUNNING'"
    found = client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1)
    return str(found[0].info.run_id) if found else None


def create_experiment(client: Any, tracking: TrackingConfig, name: str) -> str:
    """Create an experiment; with a local store, its artifacts go under ``artifact_root``."""
    from mlflow.exceptions import MlflowException

    uri = tracking.resolved_tracking_uri()
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        root = Path(tracking.artifact_root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException:  # created meanwhile by a concurrent run
        return str(client.get_experiment_by_name(name).experiment_id)


def end_run(tracking: TrackingConfig, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run finished (or ``FAILED``)."""
    mlflow_client(tracking).set_terminated(run_id, status=status)


def process_owner() -> str:
    """This process as ``machine:pid:start``, recorded on a run so that a later run can tell it was orphaned.

    ``machine`` is the host name and, on Linux, the PID namespace (containers on one host
    share a name but not their pids); ``start`` is when the process started (Linux, else
    empty), so that a pid reused by a newer process is not taken for the owner.
    """
    return f"{_machine()}:{os.getpid()}:{_process_stat(os.getpid())[1]}"


def owner_has_ended(owner: str) -> bool:
    """Whether the process an owner from :func:`process_owner` names has certainly ended.

    Only a process of this machine can be checked; one of another machine, or a malformed
    owner, counts as not ended, so a run is never closed under a process that may still
    be writing to it. Ended: no process has the pid, or a zombie or a newer process has it.
    """
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != _machine() or not parts[1].isdigit():
        return False
    pid, started = int(parts[1]), parts[2]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process has the pid: its start time tells whether it is the owner
    state, now = _process_stat(pid)
    return state == "Z" or bool(started and now and now != started)


def _machine() -> str:
    try:
        return f"{socket.gethostname()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:  # no /proc (macOS, Windows): the host name alone
        return socket.gethostname()


def _process_stat(pid: int) -> tuple[str, str]:
    """A process's state letter and start time (clock ticks since boot), from ``/proc``; empty where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return "", ""
    return fields[0], fields[19]  # fields 3 and 22 of proc(5), counted after the command name


def end_orphaned_runs(tracking: TrackingConfig, owner_tag: str, reason_tag: str) -> list[str]:
    """End as ``KILLED`` the experiment's RUNNING runs whose owning process (tag ``owner_tag``) has ended.

    A process killed outright (SIGKILL, the OOM killer) cannot close its run, which would
    otherwise stay RUNNING for ever. Each run ended gets ``reason_tag`` saying why.

    Returns:
        The ids of the runs ended.
    """
    client = mlflow_client(tracking)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return []
    running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    orphans = [run for run in running if owner_has_ended(run.data.tags.get(owner_tag, ""))]
    for run in orphans:
        reason = (
            f"its process {run.data.tags[owner_tag]} ended without closing it (killed); "
            f"closed by the run of process {process_owner()}"
        )
        client.set_tag(run.info.run_id, reason_tag, reason)
        client.set_terminated(run.info.run_id, status="KILLED")
    return [str(run.info.run_id) for run in orphans]


def log_metrics(tracking: TrackingConfig, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log many metrics in one call."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    batch = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
    client = mlflow_client(tracking)
    for start in range(0, len(batch), 900):  # MLflow accepts at most 1000 per batch
        client.log_batch(run_id, metrics=batch[start : start + 900])


def log_params(tracking: TrackingConfig, run_id: str, params: dict[str, object]) -> None:
    """Log parameters (values turned into strings)."""
    from mlflow.entities import Param

    client = mlflow_client(tracking)
    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 90):
        client.log_batch(run_id, params=items[start : start + 90])


def set_run_tags(tracking: TrackingConfig, run_id: str, tags: dict[str, object]) -> None:
    """Set tags on a run; non-string values are stored as JSON."""
    from mlflow.entities import RunTag

    client = mlflow_client(tracking)
    items = [RunTag(k, v if isinstance(v, str) else json_tag(v)) for k, v in tags.items()]
    client.log_batch(run_id, tags=items)


@dataclass(frozen=True)
class DatasetInput:
    """A dataset a run consumed, as MLflow's Datasets panel shows it: no data, only its identity.

    Attributes:
        name: The dataset's name (the data folder's name).
        digest: Its version's fingerprint (the DVC md5); at most 36 characters (MLflow's column).
        source: Where it lives, as MLflow's ``local`` source records it (``uri``), plus any keys
            that locate the version (the ``.dvc`` file, its git commit).
        context: What the run used it for (``mlflow.data.context``: training, base model).
    """

    name: str
    digest: str
    source: Mapping[str, object]
    context: str


def log_dataset_inputs(tracking: TrackingConfig, run_id: str, inputs: Sequence[DatasetInput], context_tag: str) -> None:
    """Record datasets as the run's inputs (``mlflow.log_input`` through the explicit client).

    Idempotent: MLflow keeps one dataset per (name, digest) in the experiment and one input
    edge per (dataset, run), so a retried call adds nothing.
    """
    from mlflow.entities import Dataset, InputTag
    from mlflow.entities import DatasetInput as MlflowDatasetInput

    entities = [
        MlflowDatasetInput(
            Dataset(
                name=item.name,
                digest=item.digest,
                # MLflow's `local` source type, so `mlflow.data.get_source` can read it back.
                source_type="local",
                source=json.dumps(dict(item.source), sort_keys=True, default=str),
            ),
            tags=[InputTag(context_tag, item.context)],
        )
        for item in inputs
    ]
    if entities:
        mlflow_client(tracking).log_inputs(run_id, datasets=entities)


def set_run_tag_once(tracking: TrackingConfig, run_id: str, key: str, value: str) -> bool:
    """Set a tag unless the run already has it with this value (a retry writes nothing); True if written."""
    client = mlflow_client(tracking)
    if client.get_run(run_id).data.tags.get(key) == value:
        return False
    client.set_tag(run_id, key, value)
    return True


def run_tags(tracking: TrackingConfig, run_id: str) -> dict[str, str]:
    """The tags currently on a run."""
    return dict(mlflow_client(tracking).get_run(run_id).data.tags)


def log_json(tracking: TrackingConfig, run_id: str, payload: object, artifact_file: str) -> None:
    """Store a JSON document as a run artifact."""
    mlflow_client(tracking).log_dict(run_id, payload, artifact_file)


def log_text(tracking: TrackingConfig, run_id: str, text: str, artifact_file: str) -> None:
    """Store a text document as a run artifact."""
    mlflow_client(tracking).log_text(run_id, text, artifact_file)


def log_artifacts(tracking: TrackingConfig, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    """Upload a folder's files as run artifacts."""
    mlflow_client(tracking).log_artifacts(run_id, str(local_dir), artifact_path)


def log_artifact(tracking: TrackingConfig, run_id: str, local_file: str | Path, artifact_path: str) -> None:
    """Upload one file as a run artifact."""
    mlflow_client(tracking).log_artifact(run_id, str(local_file), artifact_path)


def artifact_json(client: Any, run_id: str, path: str) -> Any:
    """A run's JSON artifact read through ``client``, or ``None`` when absent."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # noqa: BLE001 - a missing artifact reads as absent
            return None
        return json.loads(Path(local).read_text())


def run_artifact_json(tracking: TrackingConfig, run_id: str, path: str) -> Any:
    """A run's JSON artifact, or ``None`` when absent."""
    return artifact_json(mlflow_client(tracking), run_id, path)


def run_metrics(tracking: TrackingConfig, run_id: str) -> dict[str, float]:
    """A run's latest metric values."""
    return dict(mlflow_client(tracking).get_run(run_id).data.metrics)
