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

import getpass
import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fairdiffusion.config import TrackingConfig
from fairdiffusion.errors import RegistryError
from fairdiffusion.tracking import artifact_json as _artifact_json
from fairdiffusion.tracking import create_experiment
from fairdiffusion.tracking import json_tag as _json_tag
from fairdiffusion.tracking import mlflow_client as _client

CHAMPION, CANDIDATE, PREVIOUS_CHAMPION = "champion", "candidate", "previous-champion"
LOCK_SUFFIX = ".promotion-lock"


@dataclass(frozen=True)
class ChampionInfo:
    """The serving version and the metrics of the run that produced it."""

    version: str
    run_id: str
    metrics: dict[str, float]
    data_md5: str | None


@dataclass(frozen=True)
class DecisionRecord:
    """One decision on one model version: written once, as its own audit run, never changed."""

    model: str
    version: str
    #: ``pass``, ``fail``, ``approval``, ``override`` or ``rollback``.
    decision: str
    reasons: list[str]
    actor: str
    at: str
    data_md5: str | None
    policy_hash: str | None
    champion_before: str | None
    champion_after: str | None
    audit_run_id: str = ""

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return asdict(self)


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


def log_model(tracking: TrackingConfig, run_id: str, model_dir: str | Path) -> tuple[str, str | None]:
    """Log the trained pipeline on the run as an MLflow pyfunc; return (model uri, model id).

    The pyfunc wraps the diffusers folder unchanged (safetensors weights), with a
    signature and explicit requirements, so nothing is inferred by importing the model.
    """
    import mlflow

    from fairdiffusion.registry.serving import PIPELINE_ARTIFACT, FairDiffusionPyfunc, model_signature

    requirements = [f"{p}=={metadata.version(p)}" for p in _SERVING_PACKAGES if _installed(p)]
    # The fluent API is the only way to log a pyfunc. It keeps the tracking URI in a
    # global and (MLflow 3) in $MLFLOW_TRACKING_URI; restore both exactly afterwards.
    previous, env_before = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking.resolved_tracking_uri())
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=FairDiffusionPyfunc(),
                artifacts={PIPELINE_ARTIFACT: str(model_dir)},
                signature=model_signature(),
                pip_requirements=requirements,
            )
    finally:
        mlflow.set_tracking_uri(previous)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before
    model_id = getattr(info, "model_id", None)
    if model_id is None:
        return str(info.model_uri), None
    # A `models:/m-...` source is resolved through MLflow's global tracking URI by a
    # local (SQLite) store; the logged model's own artifact location is unambiguous.
    return str(_client(tracking).get_logged_model(model_id).artifact_location), model_id


_SERVING_PACKAGES = ("fairdiffusion", "torch", "diffusers", "transformers", "safetensors", "accelerate")


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True


@contextmanager
def promotion_lock(
    tracking: TrackingConfig, holder: str, timeout_s: float = 300, stale_after_s: float = 1800
) -> Iterator[None]:
    """Serialise promotions of one model across processes and machines.

    MLflow has no compare-and-set on aliases, but creating a registered model is
    atomic (its name is unique in the store), so a registered model named
    ``<model>.promotion-lock`` is the mutex. A lock older than ``stale_after_s`` (its
    holder died) is broken.

    Raises:
        RegistryError: if the lock stays held for ``timeout_s``.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking)
    name = f"{tracking.model_name}{LOCK_SUFFIX}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(name, description=json.dumps({"holder": holder, "since": time.time()}))
            break
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            since = float(json.loads(client.get_registered_model(name).description or "{}").get("since", 0))
            if time.time() - since > stale_after_s:
                client.delete_registered_model(name)
                continue
        except (MlflowException, ValueError):
            continue  # released (or replaced) between our two calls: try again
        if time.monotonic() > deadline:
            raise RegistryError(f"another promotion of '{tracking.model_name}' holds {name}; try again later")
        time.sleep(0.25)
    try:
        yield
    finally:
        # Already gone only if another process broke it as stale.
        with suppress(MlflowException):
            client.delete_registered_model(name)


def current_actor(explicit: str | None = None) -> str:
    """Who is acting: ``--approver``/``--actor``, else $FAIRDIFFUSION_ACTOR, else the OS user."""
    return explicit or os.environ.get("FAIRDIFFUSION_ACTOR") or getpass.getuser()


def register_version(
    tracking: TrackingConfig,
    run_id: str,
    model_uri: str,
    model_id: str | None,
    tags: Mapping[str, object],
    description: str,
) -> str:
    """Create a model version (with its tags already on it) and point ``candidate`` at it."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking)
    try:
        client.get_registered_model(tracking.model_name)
    except MlflowException:
        client.create_registered_model(
            tracking.model_name,
            description="FairDiffusion text-to-image model; champion moves only through the fairness gate, "
            "an approval or a recorded override.",
        )
    text_tags = {k: v if isinstance(v, str) else _json_tag(v) for k, v in tags.items()}
    version = client.create_model_version(
        tracking.model_name,
        source=model_uri,
        run_id=run_id,
        tags=text_tags,
        description=description[:5000],
        model_id=model_id,
    )
    number = str(version.version)
    client.set_registered_model_alias(tracking.model_name, CANDIDATE, number)
    client.set_tag(run_id, "fd.registry.version", number)
    return number


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def move_champion(tracking: TrackingConfig, version: str) -> str | None:
    """Point ``champion`` at a version, the old champion becoming ``previous-champion``.

    Call it only inside :func:`promotion_lock`. Returns the old champion.
    """
    client = _client(tracking)
    before = _alias_version(client, tracking.model_name, CHAMPION)
    if before is not None and before != version:
        client.set_registered_model_alias(tracking.model_name, PREVIOUS_CHAMPION, before)
    client.set_registered_model_alias(tracking.model_name, CHAMPION, version)
    return before


def record_decision(tracking: TrackingConfig, record: DecisionRecord) -> DecisionRecord:
    """Write a decision as its own audit run (immutable), then mirror it on the version's tags."""
    client = _client(tracking)
    experiment = client.get_experiment_by_name(tracking.audit_experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else create_experiment(client, tracking, tracking.audit_experiment)
    )
    tags = {
        "fd.audit.model": record.model,
        "fd.audit.version": record.version,
        "fd.audit.decision": record.decision,
        "fd.audit.actor": record.actor,
        "fd.audit.at": record.at,
        "fd.audit.reasons": _json_tag(record.reasons),
        "fd.audit.data_md5": record.data_md5 or "",
        "fd.audit.policy_hash": record.policy_hash or "",
        "fd.audit.champion_before": record.champion_before or "",
        "fd.audit.champion_after": record.champion_after or "",
    }
    run = client.create_run(experiment_id, run_name=f"{record.model} v{record.version} {record.decision}", tags=tags)
    written = DecisionRecord(**(record.to_dict() | {"audit_run_id": run.info.run_id}))  # type: ignore[arg-type]
    client.log_dict(run.info.run_id, written.to_dict(), "decision.json")
    client.set_terminated(run.info.run_id, "FINISHED")
    for key, value in {
        "fd.decision.latest": record.decision,
        "fd.decision.latest_at": record.at,
        "fd.decision.latest_actor": record.actor,
        "fd.decision.latest_reasons": _json_tag(record.reasons),
        "fd.decision.latest_audit_run": run.info.run_id,
    }.items():
        client.set_model_version_tag(record.model, record.version, key, value)
    return written


def decision_history(tracking: TrackingConfig, version: str | None = None) -> list[DecisionRecord]:
    """Every decision on the registered model (or one version), oldest first."""
    client = _client(tracking)
    experiment = client.get_experiment_by_name(tracking.audit_experiment)
    if experiment is None:
        return []
    query = f"tags.`fd.audit.model` = '{tracking.model_name}'"
    if version is not None:
        query += f" and tags.`fd.audit.version` = '{version}'"
    runs = []
    token = None
    while True:
        page = client.search_runs(
            [experiment.experiment_id], query, order_by=["attributes.start_time ASC"], max_results=500, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    records = []
    for run in runs:
        t = run.data.tags
        records.append(
            DecisionRecord(
                model=t.get("fd.audit.model", ""),
                version=t.get("fd.audit.version", ""),
                decision=t.get("fd.audit.decision", ""),
                reasons=json.loads(t.get("fd.audit.reasons") or "[]"),
                actor=t.get("fd.audit.actor", ""),
                at=t.get("fd.audit.at", ""),
                data_md5=t.get("fd.audit.data_md5") or None,
                policy_hash=t.get("fd.audit.policy_hash") or None,
                champion_before=t.get("fd.audit.champion_before") or None,
                champion_after=t.get("fd.audit.champion_after") or None,
                audit_run_id=run.info.run_id,
            )
        )
    return sorted(records, key=lambda r: (r.at, r.audit_run_id))


def now_iso() -> str:
    """UTC time with milliseconds, sortable as text."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _version_tags(client: Any, name: str, version: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_model_version(name, version).tags)
    except MlflowException:
        raise RegistryError(f"registered model '{name}' has no version {version}") from None


def approve_version(tracking: TrackingConfig, version: str, reason: str, actor: str) -> DecisionRecord:
    """Promote a version that passed the gate and waits for approval; record who and why.

    Raises:
        RegistryError: if the reason is empty or the version did not pass the gate.
    """
    if not reason.strip():
        raise RegistryError("approve: --reason is required and must not be empty")
    client = _client(tracking)
    tags = _version_tags(client, tracking.model_name, version)
    if tags.get("fd.gate.passed") != "true":
        raise RegistryError(
            f"approve: version {version} did not pass the fairness gate "
            f"({tags.get('fd.gate.reasons', 'no decision recorded')}); only `promote --force --reason` can override"
        )
    return _promote(tracking, version, "approval", [reason], actor, tags)


def force_promote(tracking: TrackingConfig, version: str, reason: str, actor: str) -> DecisionRecord:
    """Override the gate for one version; the reason is mandatory and the override is recorded.

    Raises:
        RegistryError: if the reason is empty or the version does not exist.
    """
    if not reason.strip():
        raise RegistryError("promote --force: --reason is required and must not be empty")
    tags = _version_tags(_client(tracking), tracking.model_name, version)
    gate = "passed" if tags.get("fd.gate.passed") == "true" else "FAILED"
    return _promote(tracking, version, "override", [reason, f"gate {gate} for this version"], actor, tags)


def _promote(
    tracking: TrackingConfig, version: str, decision: str, reasons: list[str], actor: str, tags: Mapping[str, str]
) -> DecisionRecord:
    with promotion_lock(tracking, holder=f"{decision} v{version} by {actor}"):
        before = move_champion(tracking, version)
        return _record_human_decision(tracking, version, decision, reasons, actor, tags, before)


def _record_human_decision(
    tracking: TrackingConfig,
    version: str,
    decision: str,
    reasons: list[str],
    actor: str,
    tags: Mapping[str, str],
    champion_before: str | None,
) -> DecisionRecord:
    """Record an approval, override or rollback that left ``version`` as champion."""
    return record_decision(
        tracking,
        DecisionRecord(
            model=tracking.model_name,
            version=version,
            decision=decision,
            reasons=reasons,
            actor=actor,
            at=now_iso(),
            data_md5=tags.get("fd.data.dvc_md5"),
            policy_hash=tags.get("fd.gate.policy_hash"),
            champion_before=champion_before,
            champion_after=version,
        ),
    )


def rollback_champion(tracking: TrackingConfig, reason: str, actor: str) -> DecisionRecord:
    """Move ``champion`` back to ``previous-champion`` and record it like any promotion.

    Raises:
        RegistryError: if there is no previous champion to return to.
    """
    if not reason.strip():
        raise RegistryError("rollback: --reason is required and must not be empty")
    client = _client(tracking)
    name = tracking.model_name
    with promotion_lock(tracking, holder=f"rollback by {actor}"):
        target = _alias_version(client, name, PREVIOUS_CHAMPION)
        current = _alias_version(client, name, CHAMPION)
        if target is None:
            raise RegistryError(f"rollback: '{name}' has no previous-champion to roll back to")
        client.set_registered_model_alias(name, CHAMPION, target)
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
        tags = _version_tags(client, name, target)
        return _record_human_decision(tracking, target, "rollback", [reason], actor, tags, current)


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
            "policy_file": vtags.get("fd.gate.policy_file"),
            "policy_hash": vtags.get("fd.gate.policy_hash") or None,
            "compared_with_version": vtags.get("fd.gate.compared_with_version") or None,
            "checks": (_artifact_json(client, mv.run_id, "lineage/gate_decision.json") or {}).get("checks", []),
        },
        "status": vtags.get("fd.status"),
        "decisions": [r.to_dict() for r in decision_history(tracking, version=str(mv.version))],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(mv.creation_timestamp) / 1000)),
    }
