"""MLflow run logging: the plumbing that training and the registry both write through.

Everything is written through an explicit ``MlflowClient`` built from the tracking URI in
force (``MLFLOW_TRACKING_URI`` or the config), so nothing here touches MLflow's global state
and the same code talks to a SQLite file or a tracking server.
"""

from __future__ import annotations

import json
import tempfile
import time
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
