"""The model registry: versions, aliases, and every decision with its audit run.

Everything is written through an explicit ``MlflowClient`` built from the tracking
URI in force (``MLFLOW_TRACKING_URI`` or the config), so nothing here touches MLflow's
global state and the same code talks to a SQLite file or a tracking server.

Lineage facts live in three places an auditor can read from MLflow alone: tags on the
run (``fd.data.*``, ``fd.code.*``, ``fd.validation.*``, ``fd.training.*``), the run's
artifacts (``lineage/*.json``, the resolved config, the evaluation report) and tags on
the model version (``fd.gate.*`` and a copy of the data/code version). Their names are
in :mod:`fairdiffusion.registry.schema`; this module is the one that writes a decision
(version tags, aliases, the audit run) and reads it back (:func:`read_lineage`).

The pipeline's writes are retried (Prefect task retries), so each is keyed and a retry
completes what a failed attempt began instead of repeating it: the logged model by a run
tag, the version by run id, the aliases from the decision, the decision record by version
and kind (:func:`register_gated_candidate`). A version's status is not stored: it is
derived from the aliases and the decision log when read (:mod:`fairdiffusion.registry.status`).
"""

from __future__ import annotations

import getpass
import json
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fairdiffusion.config import TrackingConfig
from fairdiffusion.errors import RegistryError
from fairdiffusion.registry import schema
from fairdiffusion.registry.audit import (
    CodeLineage,
    DataLineage,
    GateLineage,
    Lineage,
    MetricsLineage,
    TrainingLineage,
    ValidationLineage,
)
from fairdiffusion.registry.locking import promotion_lock
from fairdiffusion.registry.status import derive_status, replay_aliases, status_after, unexplained_aliases
from fairdiffusion.tracking import artifact_json as _artifact_json
from fairdiffusion.tracking import create_experiment
from fairdiffusion.tracking import json_tag as _json_tag
from fairdiffusion.tracking import mlflow_client as _client

if TYPE_CHECKING:
    from fairdiffusion.registry.gate import GateDecision


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
        version = client.get_model_version_by_alias(tracking.model_name, schema.CHAMPION)
    except MlflowException:
        return None
    run = client.get_run(version.run_id)
    return ChampionInfo(
        version=str(version.version),
        run_id=str(version.run_id),
        metrics=dict(run.data.metrics),
        data_md5=run.data.tags.get(schema.DATA_MD5),
    )


def log_model(tracking: TrackingConfig, run_id: str, model_dir: str | Path) -> tuple[str, str | None]:
    """Log the trained pipeline on the run as an MLflow pyfunc; return (model uri, model id).

    The pyfunc wraps the diffusers folder unchanged (safetensors weights), with a
    signature and explicit requirements, so nothing is inferred by importing the model.
    It is logged as code (:mod:`fairdiffusion.registry.pyfunc_model`), not cloudpickled;
    versions logged before that still load, their class being where it was.
    """
    import mlflow

    from fairdiffusion.registry.serving import MODEL_CODE_FILE, PIPELINE_ARTIFACT, model_signature

    requirements = [f"{p}=={metadata.version(p)}" for p in _SERVING_PACKAGES if _installed(p)]
    # The fluent API is the only way to log a pyfunc. It keeps the tracking URI in a
    # global and (MLflow 3) in $MLFLOW_TRACKING_URI; restore both exactly afterwards.
    previous, env_before = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking.resolved_tracking_uri())
    try:
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # No input example on purpose: MLflow would load the pipeline and generate
            # images from it while logging. The signature is explicit, so its warning that
            # an example helps infer one does not apply.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = mlflow.pyfunc.log_model(
                name=schema.MODEL_ARTIFACT,
                # A file path: models-from-code, so loading the model runs that file, never unpickles.
                python_model=str(MODEL_CODE_FILE),
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


def log_model_once(tracking: TrackingConfig, run_id: str, model_dir: str | Path) -> tuple[str, str | None]:
    """:func:`log_model`, once per run: a retry reuses the model an earlier attempt logged.

    The run's ``fd.model.uri`` tag, set right after logging, names it; a fault between the
    two is covered by looking the run's finished (``READY``) logged model up.
    """
    client = _client(tracking)
    tags = client.get_run(run_id).data.tags
    if schema.MODEL_URI in tags:
        return tags[schema.MODEL_URI], tags.get(schema.MODEL_ID) or None
    found = _logged_model_of(client, run_id)
    model_uri, model_id = found if found is not None else log_model(tracking, run_id, model_dir)
    client.set_tag(run_id, schema.MODEL_ID, model_id or "")
    client.set_tag(run_id, schema.MODEL_URI, model_uri)
    return model_uri, model_id


def log_model_card(tracking: TrackingConfig, model_id: str, card: str) -> None:
    """Put the model card in the logged pyfunc's pipeline folder, beside the weights it describes.

    The model was logged before the gate decided, so the card is added to it afterwards;
    writing it again replaces the same file.
    """
    from fairdiffusion.registry.serving import PIPELINE_ARTIFACT

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / schema.MODEL_CARD_FILE
        path.write_text(card)
        # A pyfunc keeps each of its `artifacts={name: folder}` under `artifacts/<name>/`.
        _client(tracking).log_model_artifact(model_id, str(path), artifact_path=f"artifacts/{PIPELINE_ARTIFACT}")


def _logged_model_of(client: Any, run_id: str) -> tuple[str, str] | None:
    """(artifact location, id) of the run's oldest READY pyfunc model, or ``None``."""
    experiment_id = client.get_run(run_id).info.experiment_id
    query = f"source_run_id = '{run_id}' AND name = '{schema.MODEL_ARTIFACT}'"
    # Filtered here: the SQL store does not match `status = 'READY'` (it stores the enum's number).
    found = [m for m in client.search_logged_models([experiment_id], filter_string=query) if str(m.status) == "READY"]
    if not found:
        return None
    model = min(found, key=lambda m: m.creation_timestamp)
    return str(model.artifact_location), str(model.model_id)


_SERVING_PACKAGES = ("fairdiffusion", "torch", "diffusers", "transformers", "safetensors", "accelerate")


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True


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
    """Create the run's model version (its tags already on it) and point ``candidate`` at it.

    One version per run: a retry finds the version an earlier attempt created (by run id)
    and brings its tags and description up to date instead of creating another.
    """
    client = _client(tracking)
    _ensure_registered_model(client, tracking.model_name)
    text_tags = {k: v if isinstance(v, str) else _json_tag(v) for k, v in tags.items()}
    existing = run_version(tracking, run_id)
    if existing is None:
        created = client.create_model_version(
            tracking.model_name,
            source=model_uri,
            run_id=run_id,
            tags=text_tags,
            description=description[:5000],
            model_id=model_id,
        )
        number = str(created.version)
    else:
        number = existing
        _update_version(client, tracking.model_name, number, text_tags, description[:5000])
    _advance_candidate(client, tracking.model_name, number)
    client.set_tag(run_id, schema.REGISTRY_VERSION, number)
    return number


def run_version(tracking: TrackingConfig, run_id: str) -> str | None:
    """The (oldest) version of the registered model created from ``run_id``, or ``None``."""
    query = f"name = {search_literal(tracking.model_name, 'model name')} and run_id = '{run_id}'"
    found = _client(tracking).search_model_versions(query)
    return min((str(v.version) for v in found), key=int, default=None)


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            description="FairDiffusion text-to-image model; champion moves only through the fairness gate, "
            "an approval or a recorded override.",
        )


def _update_version(client: Any, name: str, version: str, tags: Mapping[str, str], description: str) -> None:
    """Rewrite the gate's tags of a version registered by a failed attempt when the decision changed."""
    current = client.get_model_version(name, version)
    # The status tag is the decision record's mirror (written after it), not the gate's.
    changed = {
        k: v for k, v in tags.items() if current.tags.get(k) != v and k not in (schema.GATE_DECIDED_AT, schema.STATUS)
    }
    if not changed and current.description == description:
        return
    for key, value in (changed | {schema.GATE_DECIDED_AT: tags[schema.GATE_DECIDED_AT]}).items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=description)


def _advance_candidate(client: Any, name: str, version: str) -> None:
    """``candidate`` marks the newest registration: never moved back to an older version."""
    current = _alias_version(client, name, schema.CANDIDATE)
    if current is None or int(current) < int(version):
        client.set_registered_model_alias(name, schema.CANDIDATE, version)


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
    before = _alias_version(client, tracking.model_name, schema.CHAMPION)
    if before is not None and before != version:
        client.set_registered_model_alias(tracking.model_name, schema.PREVIOUS_CHAMPION, before)
    client.set_registered_model_alias(tracking.model_name, schema.CHAMPION, version)
    return before


def settle_champion(tracking: TrackingConfig, version: str, champion_before: str | None) -> None:
    """Make ``version`` champion after ``champion_before`` (taken from the gate's decision).

    Idempotent, unlike :func:`move_champion`: it never reads ``champion``, which a failed
    attempt may already have moved to ``version``. Call it only inside :func:`promotion_lock`.
    """
    client = _client(tracking)
    if champion_before is not None and champion_before != version:
        client.set_registered_model_alias(tracking.model_name, schema.PREVIOUS_CHAMPION, champion_before)
    client.set_registered_model_alias(tracking.model_name, schema.CHAMPION, version)


def _audit_tags(record: DecisionRecord) -> dict[str, str]:
    return {
        schema.AUDIT_MODEL: record.model,
        schema.AUDIT_VERSION: record.version,
        schema.AUDIT_DECISION: record.decision,
        schema.AUDIT_ACTOR: record.actor,
        schema.AUDIT_AT: record.at,
        schema.AUDIT_REASONS: _json_tag(record.reasons),
        schema.AUDIT_DATA_MD5: record.data_md5 or "",
        schema.AUDIT_POLICY_HASH: record.policy_hash or "",
        schema.AUDIT_CHAMPION_BEFORE: record.champion_before or "",
        schema.AUDIT_CHAMPION_AFTER: record.champion_after or "",
    }


def _record_from_audit_tags(tags: Mapping[str, str], audit_run_id: str) -> DecisionRecord:
    return DecisionRecord(
        model=tags.get(schema.AUDIT_MODEL, ""),
        version=tags.get(schema.AUDIT_VERSION, ""),
        decision=tags.get(schema.AUDIT_DECISION, ""),
        reasons=json.loads(tags.get(schema.AUDIT_REASONS) or "[]"),
        actor=tags.get(schema.AUDIT_ACTOR, ""),
        at=tags.get(schema.AUDIT_AT, ""),
        data_md5=tags.get(schema.AUDIT_DATA_MD5) or None,
        policy_hash=tags.get(schema.AUDIT_POLICY_HASH) or None,
        champion_before=tags.get(schema.AUDIT_CHAMPION_BEFORE) or None,
        champion_after=tags.get(schema.AUDIT_CHAMPION_AFTER) or None,
        audit_run_id=audit_run_id,
    )


def record_decision(tracking: TrackingConfig, record: DecisionRecord) -> DecisionRecord:
    """Write a decision as its own audit run (immutable), then mirror it on the version's tags."""
    client = _client(tracking)
    run = _create_audit_run(client, tracking, record)
    written = _finish_audit_run(client, str(run.info.run_id), record)
    _mirror_decision(client, written)
    return written


def _create_audit_run(client: Any, tracking: TrackingConfig, record: DecisionRecord) -> Any:
    """The audit run, its tags (the whole record) set atomically with it."""
    experiment = client.get_experiment_by_name(tracking.audit_experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else create_experiment(client, tracking, tracking.audit_experiment)
    )
    name = f"{record.model} v{record.version} {record.decision}"
    return client.create_run(experiment_id, run_name=name, tags=_audit_tags(record))


def _finish_audit_run(client: Any, audit_run_id: str, record: DecisionRecord) -> DecisionRecord:
    written = DecisionRecord(**(record.to_dict() | {"audit_run_id": audit_run_id}))  # type: ignore[arg-type]
    client.log_dict(audit_run_id, written.to_dict(), schema.DECISION_ARTIFACT)
    client.set_terminated(audit_run_id, "FINISHED")
    return written


def _mirror_decision(client: Any, record: DecisionRecord) -> None:
    """The latest decision on the version's tags, and the status it leaves (a convenience for the MLflow UI)."""
    for key, value in {
        schema.LATEST_DECISION: record.decision,
        schema.LATEST_DECISION_AT: record.at,
        schema.LATEST_DECISION_ACTOR: record.actor,
        schema.LATEST_DECISION_REASONS: _json_tag(record.reasons),
        schema.LATEST_DECISION_AUDIT_RUN: record.audit_run_id,
        schema.STATUS: status_after(record),
    }.items():
        client.set_model_version_tag(record.model, record.version, key, value)
    if record.champion_before and record.champion_before != record.champion_after:
        client.set_model_version_tag(record.model, record.champion_before, schema.STATUS, schema.STATUS_REPLACED)


def search_literal(value: str, what: str) -> str:
    """``value`` quoted as a string of an MLflow search filter.

    MLflow's filter grammar strips a string's quotes without unescaping what is inside, so
    a value is quoted with whichever quote it does not contain; a trailing backslash would
    escape the closing quote.

    Raises:
        RegistryError: if ``value`` contains both quote characters or ends with a backslash.
    """
    quote = next((q for q in ("'", '"') if q not in value), None)
    if quote is None or value.endswith("\\"):
        raise RegistryError(
            f"{what} {value!r}: MLflow cannot search for a value with both ' and \" or a trailing backslash"
        )
    return f"{quote}{value}{quote}"


def decision_history(tracking: TrackingConfig, version: str | None = None) -> list[DecisionRecord]:
    """Every decision on the registered model (or one version), oldest first."""
    runs = _audit_runs(tracking, version)
    records = [_record_from_audit_tags(run.data.tags, run.info.run_id) for run in runs]
    return sorted(records, key=lambda r: (r.at, r.audit_run_id))


def _audit_runs(tracking: TrackingConfig, version: str | None) -> list[Any]:
    """The audit runs of the registered model (or of one version)."""
    # Built before MLflow is touched, so a value that cannot be searched for writes nothing.
    query = f"tags.`{schema.AUDIT_MODEL}` = {search_literal(tracking.model_name, 'model name')}"
    if version is not None:
        query += f" and tags.`{schema.AUDIT_VERSION}` = {search_literal(version, 'version')}"
    client = _client(tracking)
    experiment = client.get_experiment_by_name(tracking.audit_experiment)
    if experiment is None:
        return []
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment.experiment_id], query, order_by=["attributes.start_time ASC"], max_results=500, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


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
    if tags.get(schema.GATE_PASSED) != "true":
        raise RegistryError(
            f"approve: version {version} did not pass the fairness gate "
            f"({tags.get(schema.GATE_REASONS, 'no decision recorded')}); only `promote --force --reason` can override"
        )
    return _promote(tracking, version, schema.DECISION_APPROVAL, [reason], actor, tags, refuse_unexplained=True)


def force_promote(tracking: TrackingConfig, version: str, reason: str, actor: str) -> DecisionRecord:
    """Override the gate for one version; the reason is mandatory and the override is recorded.

    Raises:
        RegistryError: if the reason is empty or the version does not exist.
    """
    if not reason.strip():
        raise RegistryError("promote --force: --reason is required and must not be empty")
    tags = _version_tags(_client(tracking), tracking.model_name, version)
    gate = "passed" if tags.get(schema.GATE_PASSED) == "true" else "FAILED"
    return _promote(tracking, version, schema.DECISION_OVERRIDE, [reason, f"gate {gate} for this version"], actor, tags)


def _promote(
    tracking: TrackingConfig,
    version: str,
    decision: str,
    reasons: list[str],
    actor: str,
    tags: Mapping[str, str],
    refuse_unexplained: bool = False,
) -> DecisionRecord:
    with promotion_lock(tracking, holder=f"{decision} v{version} by {actor}"):
        if refuse_unexplained:
            _refuse_unexplained_aliases(tracking, decision)
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
            data_md5=tags.get(schema.DATA_MD5),
            policy_hash=tags.get(schema.GATE_POLICY_HASH),
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
        _refuse_unexplained_aliases(tracking, schema.DECISION_ROLLBACK)
        target = _alias_version(client, name, schema.PREVIOUS_CHAMPION)
        current = _alias_version(client, name, schema.CHAMPION)
        if target is None:
            raise RegistryError(f"rollback: '{name}' has no {schema.PREVIOUS_CHAMPION} to roll back to")
        client.set_registered_model_alias(name, schema.CHAMPION, target)
        client.delete_registered_model_alias(name, schema.PREVIOUS_CHAMPION)
        tags = _version_tags(client, name, target)
        return _record_human_decision(tracking, target, schema.DECISION_ROLLBACK, [reason], actor, tags, current)


def model_aliases(tracking: TrackingConfig) -> dict[str, str]:
    """The registered model's aliases now (alias -> version); none if it is not registered yet."""
    from mlflow.exceptions import MlflowException

    try:
        registered = _client(tracking).get_registered_model(tracking.model_name)
    except MlflowException:
        return {}
    return {alias: str(version) for alias, version in (registered.aliases or {}).items()}


def alias_problems(tracking: TrackingConfig) -> list[str]:
    """Every alias the decision log does not explain, then every past champion move it does not record."""
    history = decision_history(tracking)
    return unexplained_aliases(model_aliases(tracking), history) + replay_aliases(history).gaps


_REPAIR = (
    "See `fairdiffusion audit --history`. If a pipeline run's promotion stopped half-way, retry it (the retry "
    "completes it). If an alias was moved by hand and should stay, record that with `fairdiffusion promote "
    "--version N --force --reason TEXT`; otherwise move it back to where the decision log leaves it "
    "(MLflow UI, or MlflowClient.set_registered_model_alias)."
)


def _refuse_unexplained_aliases(tracking: TrackingConfig, action: str) -> None:
    """Acting on aliases nobody recorded would write a false history: refuse, saying how to repair."""
    problems = unexplained_aliases(model_aliases(tracking), decision_history(tracking))
    if problems:
        listed = "".join(f"\n  - {p}" for p in problems)
        raise RegistryError(f"{action}: refused, the registry disagrees with its decision log:{listed}\n{_REPAIR}")


@dataclass(frozen=True)
class GatedCandidate:
    """A candidate's run and logged model, as the gate's verdict is registered with them."""

    run_id: str
    model_uri: str
    model_id: str | None
    #: The run's tags; its ``fd.data.*`` and ``fd.code.*`` are copied onto the version.
    run_tags: Mapping[str, str]
    training_method: str
    policy_file: str
    #: Who started the pipeline (recorded as ``pipeline (<actor>)``).
    actor: str


@dataclass(frozen=True)
class Registration:
    """The version a candidate was registered as, its status, and whether it became champion."""

    version: str
    status: str
    promoted: bool


def register_gated_candidate(
    tracking: TrackingConfig,
    candidate: GatedCandidate,
    decision: GateDecision,
    require_approval: bool,
) -> Registration:
    """Register a candidate with the gate's verdict, make it champion only on a pass, record the decision.

    Call it only inside :func:`promotion_lock`, with ``decision`` taken against the champion
    read under the same lock. A passing candidate waits for ``approve`` instead when
    ``require_approval`` is on. A retry completes what a failed attempt began: the version
    is found by run id, the aliases are set from the decision's champion (``champion`` is
    never re-read), and once the decision record exists the aliases, settled before it,
    are left alone and only the record is completed.
    """
    promote = decision.passed and not require_approval
    tags = _gate_version_tags(candidate, decision, _candidate_status(decision.passed, promote))
    description = _gate_description(candidate, decision)
    version = register_version(tracking, candidate.run_id, candidate.model_uri, candidate.model_id, tags, description)
    begun = _gate_audit_run(tracking, version)
    if begun is not None:
        written = _complete_audit_run(tracking, begun)
    else:
        if promote:
            settle_champion(tracking, version, decision.compared_with_version)
        written = record_decision(tracking, _gate_record(tracking, candidate, decision, version, promote))
    return Registration(version=version, status=status_after(written), promoted=written.champion_after == version)


def _gate_record(
    tracking: TrackingConfig, candidate: GatedCandidate, decision: GateDecision, version: str, promote: bool
) -> DecisionRecord:
    before = decision.compared_with_version
    return DecisionRecord(
        model=tracking.model_name,
        version=version,
        decision=schema.DECISION_PASS if decision.passed else schema.DECISION_FAIL,
        reasons=decision.reasons or [f"every rule of policy '{decision.policy.get('name', '?')}' passed"],
        actor=f"pipeline ({candidate.actor})",
        at=now_iso(),
        data_md5=candidate.run_tags.get(schema.DATA_MD5),
        policy_hash=decision.policy_hash,
        champion_before=before,
        champion_after=version if promote else before,
    )


def gate_record(tracking: TrackingConfig, version: str) -> DecisionRecord | None:
    """The gate's decision (pass or fail) recorded on a version, or ``None``: at most one exists."""
    run = _gate_audit_run(tracking, version)
    return None if run is None else _record_from_audit_tags(run.data.tags, run.info.run_id)


def _gate_audit_run(tracking: TrackingConfig, version: str) -> Any:
    """The audit run of the gate's decision on a version (keyed by version and kind), or ``None``."""
    runs = _audit_runs(tracking, version)
    gate = [r for r in runs if r.data.tags.get(schema.AUDIT_DECISION) in schema.GATE_DECISIONS]
    return min(gate, key=lambda r: r.info.start_time) if gate else None


def _complete_audit_run(tracking: TrackingConfig, run: Any) -> DecisionRecord:
    """Finish what a failed attempt began: the audit run's ``decision.json`` and end, the mirror tags."""
    client = _client(tracking)
    written = _record_from_audit_tags(run.data.tags, run.info.run_id)
    if run.info.status == "RUNNING":
        _finish_audit_run(client, run.info.run_id, written)
    _mirror_decision(client, written)
    return written


def _candidate_status(passed: bool, promote: bool) -> str:
    if promote:
        return schema.STATUS_CHAMPION
    return schema.STATUS_AWAITING_APPROVAL if passed else schema.STATUS_REJECTED


def _gate_version_tags(candidate: GatedCandidate, decision: GateDecision, status: str) -> dict[str, object]:
    lineage_prefixes = (schema.DATA_TAG_PREFIX, schema.BASE_TAG_PREFIX, schema.CODE_TAG_PREFIX)
    tags: dict[str, object] = {k: v for k, v in candidate.run_tags.items() if k.startswith(lineage_prefixes)}
    return tags | {
        schema.TRAINING_METHOD: candidate.training_method,
        schema.GATE_PASSED: str(decision.passed).lower(),
        schema.GATE_REASONS: decision.reasons,
        schema.GATE_POLICY: decision.policy,
        schema.GATE_POLICY_FILE: candidate.policy_file,
        schema.GATE_POLICY_HASH: decision.policy_hash or "",
        schema.GATE_COMPARED_WITH_VERSION: decision.compared_with_version or "",
        schema.GATE_DECIDED_AT: now_iso(),
        schema.STATUS: status,
    }


def _gate_description(candidate: GatedCandidate, decision: GateDecision) -> str:
    # No status here: a description written once would still say champion after a newer one
    # replaces it. The status is derived from the aliases and the decision log (`audit`).
    verdict = "PASSED the fairness gate" if decision.passed else "FAILED the fairness gate"
    description = verdict + (": " + "; ".join(decision.reasons) if decision.reasons else ".")
    tags = candidate.run_tags
    description += f" Data md5 {tags.get(schema.DATA_MD5)}, code {tags.get(schema.CODE_GIT_COMMIT)}"
    return description + f", policy {candidate.policy_file} (sha256 {decision.policy_hash})."


def read_lineage(tracking: TrackingConfig, version: str | None = None, alias: str | None = None) -> Lineage:
    """Reconstruct a model version's lineage from MLflow alone.

    Raises:
        RegistryError: if the model, version or alias does not exist.
    """
    client = _client(tracking)
    mv, registered = _find_version(client, tracking, version, alias)
    run = client.get_run(mv.run_id)
    tags, vtags = run.data.tags, mv.tags
    gate_record = _artifact_json(client, mv.run_id, schema.GATE_DECISION_ARTIFACT) or {}
    number, history = str(mv.version), decision_history(tracking)
    aliases = {alias: str(v) for alias, v in (registered.aliases or {}).items()}
    return Lineage(
        model=tracking.model_name,
        version=number,
        aliases=sorted(a for a, v in aliases.items() if v == number),
        run_id=mv.run_id,
        data=DataLineage(
            dvc_md5=tags.get(schema.DATA_MD5),
            data_dvc_commit=tags.get(schema.DATA_DVC_COMMIT),
            path=tags.get(schema.DATA_PATH),
        ),
        base_model=DataLineage(
            dvc_md5=tags.get(schema.BASE_MD5),
            data_dvc_commit=tags.get(schema.BASE_DVC_COMMIT),
            path=tags.get(schema.BASE_PATH),
        ),
        code=CodeLineage(git_commit=tags.get(schema.CODE_GIT_COMMIT), dirty=_loads(tags.get(schema.CODE_DIRTY), None)),
        validation=ValidationLineage(
            success=_loads(tags.get(schema.VALIDATION_SUCCESS), None),
            failed_expectations=_loads(tags.get(schema.VALIDATION_FAILED_EXPECTATIONS), []),
        ),
        training=TrainingLineage(
            method=run.data.params.get(schema.TRAINING_METHOD_PARAM),
            config=_artifact_json(client, mv.run_id, schema.CONFIG_ARTIFACT),
        ),
        metrics=MetricsLineage.from_metrics(run.data.metrics),
        gate=_gate_lineage(vtags, gate_record.get("checks", [])),
        # Derived now, never read from the fd.status tag: that tag cannot see a hand-moved alias.
        status=derive_status(number, aliases, history),
        decisions=[r for r in history if r.version == number],
        alias_problems=unexplained_aliases(aliases, history) + replay_aliases(history).gaps,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(mv.creation_timestamp) / 1000)),
    )


def _find_version(client: Any, tracking: TrackingConfig, version: str | None, alias: str | None) -> tuple[Any, Any]:
    """The model version (by alias or number) and its registered model."""
    from mlflow.exceptions import MlflowException

    name = tracking.model_name
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, str(version))
        return mv, client.get_registered_model(name)
    except MlflowException:
        target = f"alias '{alias}'" if alias else f"version {version}"
        raise RegistryError(
            f"registered model '{name}' has no {target} at {tracking.resolved_tracking_uri()}"
        ) from None


def _loads(text: str | None, default: Any) -> Any:
    """A JSON tag's value; a tag that is not JSON reads as its text."""
    try:
        return json.loads(text) if text else default
    except json.JSONDecodeError:
        return text


def _gate_lineage(vtags: Mapping[str, str], checks: list[dict[str, Any]]) -> GateLineage:
    return GateLineage(
        passed=_loads(vtags.get(schema.GATE_PASSED), None),
        reasons=_loads(vtags.get(schema.GATE_REASONS), []),
        policy=_loads(vtags.get(schema.GATE_POLICY), {}),
        policy_file=vtags.get(schema.GATE_POLICY_FILE),
        policy_hash=vtags.get(schema.GATE_POLICY_HASH) or None,
        compared_with_version=vtags.get(schema.GATE_COMPARED_WITH_VERSION) or None,
        checks=checks,
    )
