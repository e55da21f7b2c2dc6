"""MLflow tracking, registry and lineage: the one module that records how a model came to be.

Everything is written through an explicit ``MlflowClient`` built from the tracking
URI in force (``MLFLOW_TRACKING_URI`` or the config), so nothing here touches MLflow's
global state and the same code talks to a SQLite file or a tracking server.

Lineage facts live in three places an auditor can read from MLflow alone: tags on the
run (``fd.data.*``, ``fd.code.*``, ``fd.validation.*``, ``fd.training.*``), the run's
artifacts (``lineage/*.json``, the resolved config, the evaluation report) and tags on
the model version (``fd.gate.*`` and a copy of the data/code version).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairdiffusion.config import TrackingConfig
from fairdiffusion.errors import RegistryError

CHAMPION, CANDIDATE, PREVIOUS_CHAMPION = "champion", "candidate", "previous-champion"
_TAG_LIMIT = 5000  # MLflow's limit on a tag value's length


@dataclass(frozen=True)
class ChampionInfo:
    """The serving version and the metrics of the run that produced it."""

    version: str
    run_id: str
    metrics: dict[str, float]
    data_md5: str | None


@dataclass(frozen=True)
class RegisteredCandidate:
    """A model version created for a candidate, and where its alias ended up."""

    model_name: str
    version: str
    promoted: bool
    previous_champion: str | None


def _client(tracking: TrackingConfig) -> Any:
    from mlflow import MlflowClient

    uri = tracking.resolved_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _json_tag(value: object) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _TAG_LIMIT else text[: _TAG_LIMIT - 20] + "...(truncated)"


def start_run(tracking: TrackingConfig, run_name: str, tags: dict[str, str]) -> str:
    """Create (if needed) the experiment and start a run in it; returns the run id."""
    client = _client(tracking)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        uri = tracking.resolved_tracking_uri()
        location = None
        if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
            root = Path(tracking.artifact_root).resolve()
            root.mkdir(parents=True, exist_ok=True)
            location = root.as_uri()
        experiment_id = client.create_experiment(tracking.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return str(run.info.run_id)


def end_run(tracking: TrackingConfig, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run finished (or ``FAILED``)."""
    _client(tracking).set_terminated(run_id, status=status)


def log_metrics(tracking: TrackingConfig, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log many metrics in one call."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    batch = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
    client = _client(tracking)
    for start in range(0, len(batch), 900):  # MLflow accepts at most 1000 per batch
        client.log_batch(run_id, metrics=batch[start : start + 900])


def log_params(tracking: TrackingConfig, run_id: str, params: dict[str, object]) -> None:
    """Log parameters (values turned into strings)."""
    from mlflow.entities import Param

    client = _client(tracking)
    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 90):
        client.log_batch(run_id, params=items[start : start + 90])


def set_run_tags(tracking: TrackingConfig, run_id: str, tags: dict[str, object]) -> None:
    """Set tags on a run; non-string values are stored as JSON."""
    from mlflow.entities import RunTag

    client = _client(tracking)
    items = [RunTag(k, v if isinstance(v, str) else _json_tag(v)) for k, v in tags.items()]
    client.log_batch(run_id, tags=items)


def run_tags(tracking: TrackingConfig, run_id: str) -> dict[str, str]:
    """The tags currently on a run."""
    return dict(_client(tracking).get_run(run_id).data.tags)


def log_json(tracking: TrackingConfig, run_id: str, payload: object, artifact_file: str) -> None:
    """Store a JSON document as a run artifact."""
    _client(tracking).log_dict(run_id, payload, artifact_file)


def log_text(tracking: TrackingConfig, run_id: str, text: str, artifact_file: str) -> None:
    """Store a text document as a run artifact."""
    _client(tracking).log_text(run_id, text, artifact_file)


def log_artifacts(tracking: TrackingConfig, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    """Upload a folder's files as run artifacts."""
    _client(tracking).log_artifacts(run_id, str(local_dir), artifact_path)


def find_champion(tracking: TrackingConfig) -> ChampionInfo | None:
    """The version the ``champion`` alias points at, with its run's metrics, or ``None``."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking)
    try:
        version = client.get_model_version_by_alias(tracking.model_name, CHAMPION)
    except MlflowException:
        return None
    run = client.get_run(version.run_id)
    return ChampionInfo(
        version=str(version.version),
        run_id=str(version.run_id),
        metrics=dict(run.data.metrics),
        data_md5=run.data.tags.get("fd.data.dvc_md5"),
    )


def register_candidate(
    tracking: TrackingConfig,
    run_id: str,
    model_dir: str | Path,
    decision: dict[str, Any],
    lineage_tags: Mapping[str, object],
    champion: ChampionInfo | None,
) -> RegisteredCandidate:
    """Register a candidate, record its gate decision, and promote it only if it passed.

    The version is created with its decision tags already on it, so no version ever
    exists without a recorded decision. ``candidate`` always moves to it;
    ``champion`` moves only when ``decision["passed"]`` is true, and the old champion
    becomes ``previous-champion``.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking)
    client.log_artifacts(run_id, str(model_dir), "model")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    try:
        client.get_registered_model(tracking.model_name)
    except MlflowException:
        client.create_registered_model(
            tracking.model_name,
            description="FairDiffusion text-to-image model; champion is moved only by the fairness gate.",
        )
    passed = bool(decision["passed"])
    tags = {k: v if isinstance(v, str) else _json_tag(v) for k, v in lineage_tags.items()}
    tags |= {
        "fd.gate.passed": str(passed).lower(),
        "fd.gate.reasons": _json_tag(decision["reasons"]),
        "fd.gate.policy": _json_tag(decision["policy"]),
        "fd.gate.compared_with_version": str(decision.get("compared_with_version") or ""),
        "fd.gate.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    verdict = "PASSED the fairness gate" if passed else "FAILED the fairness gate"
    reasons = decision["reasons"]
    description = f"{verdict}" + (": " + "; ".join(reasons) if reasons else ".")
    description += f"\nData md5 {lineage_tags.get('fd.data.dvc_md5')}, code {lineage_tags.get('fd.code.git_commit')}."
    version = client.create_model_version(
        tracking.model_name, source=source, run_id=run_id, tags=tags, description=description[:5000]
    )
    number = str(version.version)
    client.set_registered_model_alias(tracking.model_name, CANDIDATE, number)
    previous = None
    if passed:
        if champion is not None:
            previous = champion.version
            client.set_registered_model_alias(tracking.model_name, PREVIOUS_CHAMPION, previous)
        client.set_registered_model_alias(tracking.model_name, CHAMPION, number)
    client.set_tag(run_id, "fd.registry.version", number)
    return RegisteredCandidate(tracking.model_name, number, passed, previous)


def _artifact_json(client: Any, run_id: str, path: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # noqa: BLE001 - a missing artifact reads as absent
            return None
        return json.loads(Path(local).read_text())


def read_lineage(tracking: TrackingConfig, version: str | None = None, alias: str | None = None) -> dict[str, Any]:
    """Reconstruct a model version's lineage from MLflow alone.

    Raises:
        RegistryError: if the model, version or alias does not exist.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking)
    name = tracking.model_name
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, str(version))
        registered = client.get_registered_model(name)
    except MlflowException:
        target = f"alias '{alias}'" if alias else f"version {version}"
        raise RegistryError(
            f"registered model '{name}' has no {target} at {tracking.resolved_tracking_uri()}"
        ) from None
    run = client.get_run(mv.run_id)
    tags, vtags = run.data.tags, mv.tags

    def loads(text: str | None, default: Any) -> Any:
        try:
            return json.loads(text) if text else default
        except json.JSONDecodeError:
            return text

    aliases = sorted(a for a, v in (registered.aliases or {}).items() if str(v) == str(mv.version))
    metrics = dict(run.data.metrics)
    return {
        "model": name,
        "version": str(mv.version),
        "aliases": aliases,
        "run_id": mv.run_id,
        "data": {
            "dvc_md5": tags.get("fd.data.dvc_md5"),
            "data_dvc_commit": tags.get("fd.data.data_dvc_commit"),
            "path": tags.get("fd.data.path"),
        },
        "code": {
            "git_commit": tags.get("fd.code.git_commit"),
            "dirty": loads(tags.get("fd.code.dirty"), None),
        },
        "validation": {
            "success": loads(tags.get("fd.validation.success"), None),
            "failed_expectations": loads(tags.get("fd.validation.failed_expectations"), []),
        },
        "training": {
            "method": run.data.params.get("training.method"),
            "config": _artifact_json(client, mv.run_id, "lineage/config.json"),
        },
        "metrics": {
            "overall": {k: v for k, v in metrics.items() if k.endswith("/overall")},
            "per_subgroup": {
                k: v
                for k, v in metrics.items()
                if (k.startswith("fid_") or k.startswith("num_samples/")) and not k.endswith("/overall")
            },
            "equity": {k: v for k, v in metrics.items() if k.startswith("es_fid_")},
        },
        "gate": {
            "passed": loads(vtags.get("fd.gate.passed"), None),
            "reasons": loads(vtags.get("fd.gate.reasons"), []),
            "policy": loads(vtags.get("fd.gate.policy"), {}),
            "compared_with_version": vtags.get("fd.gate.compared_with_version") or None,
        },
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(mv.creation_timestamp) / 1000)),
    }
