"""What each stage records about a run, so that MLflow alone tells its whole story.

These are the stage-level bookkeeping functions the Prefect tasks call; they decide
*what* is recorded. *How* it is written to MLflow lives in :mod:`fairdiffusion.registry.promotion`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from fairdiffusion import tracking as runs
from fairdiffusion.config import PipelineConfig, config_to_dict
from fairdiffusion.data.versioning import DataVersion, resolve_code_version
from fairdiffusion.evaluation.results import EvaluationReport
from fairdiffusion.registry import promotion as registry
from fairdiffusion.registry import schema
from fairdiffusion.registry.audit import CodeLineage, DataLineage
from fairdiffusion.registry.gate import GateDecision, decide_promotion
from fairdiffusion.registry.model_card import ModelCardFacts, render_model_card
from fairdiffusion.registry.policy import GatePolicy, PolicyError, load_policy
from fairdiffusion.registry.skip import ChampionBaseline, SkipDecision, config_fingerprint
from fairdiffusion.training.results import TrainingResult
from fairdiffusion.validation.result import ValidationResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionOutcome:
    """What stage 5 did: the version registered, the verdict, and where to look."""

    model_name: str
    version: str
    promoted: bool
    passed: bool
    status: str
    reasons: list[str]
    compared_with_version: str | None
    run_id: str
    report_path: str

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return asdict(self)


def _flatten(prefix: str, value: object, out: dict[str, object]) -> dict[str, object]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value
    return out


def code_root() -> Path:
    """The checkout the running code comes from (for its git commit)."""
    return Path(__file__).resolve().parents[2]


def data_code_tags(data_version: DataVersion, base_version: DataVersion | None = None) -> dict[str, object]:
    """The data, base-model and code version tags, set on the run and copied onto the model version."""
    code = resolve_code_version(code_root())
    tags: dict[str, object] = {
        schema.DATA_MD5: data_version.dvc_md5,
        schema.DATA_DVC_COMMIT: data_version.data_dvc_commit or "",
        schema.DATA_PATH: data_version.path,
        schema.DATA_DVC_FILE: data_version.dvc_file,
        schema.CODE_GIT_COMMIT: code.git_commit or "",
        schema.CODE_DIRTY: code.dirty,
    }
    if base_version is not None:
        tags |= {
            schema.BASE_MD5: base_version.dvc_md5,
            schema.BASE_DVC_COMMIT: base_version.data_dvc_commit or "",
            schema.BASE_PATH: base_version.path,
            schema.BASE_DVC_FILE: base_version.dvc_file,
        }
    return tags


def mlflow_source_tags(git_commit: str | None) -> dict[str, str]:
    """MLflow's own Source fields: the flow's file and, in a git checkout, the commit it ran at."""
    tags = {schema.MLFLOW_SOURCE_NAME: schema.PIPELINE_SOURCE_NAME, schema.MLFLOW_SOURCE_TYPE: "JOB"}
    if git_commit:
        tags[schema.MLFLOW_GIT_COMMIT] = git_commit
    return tags


def dataset_inputs(data_version: DataVersion, base_version: DataVersion | None = None) -> list[runs.DatasetInput]:
    """The run's MLflow dataset inputs: the training data and the base model, each digested by its DVC md5."""
    inputs = [_dataset_input(data_version, schema.DATASET_CONTEXT_TRAINING)]
    if base_version is not None:
        inputs.append(_dataset_input(base_version, schema.DATASET_CONTEXT_BASE_MODEL))
    return inputs


def _dataset_input(version: DataVersion, context: str) -> runs.DatasetInput:
    folder = Path(version.dvc_file).parent / version.path
    return runs.DatasetInput(
        name=folder.name or Path(version.dvc_file).stem,
        digest=version.dvc_md5,
        source={"uri": str(folder), "dvc_file": version.dvc_file, "dvc_commit": version.data_dvc_commit or ""},
        context=context,
    )


def open_pipeline_run(
    config: PipelineConfig,
    data_version: DataVersion,
    base_version: DataVersion | None = None,
    flow_run_id: str | None = None,
) -> str:
    """Start the run, with the data/code version and the resolved config (and its sha256) on it.

    With ``flow_run_id`` (the orchestrator's run id, as text) a retry reuses the open run an
    earlier attempt of the same flow run started (tag ``fd.flow_run_id``) instead of
    leaving it orphaned; what follows rewrites the same values. Runs of this experiment
    left RUNNING by a process that has since died are ended first (:func:`end_orphaned_runs`).
    """
    tags = {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in data_code_tags(data_version, base_version).items()
    }
    tags |= mlflow_source_tags(tags[schema.CODE_GIT_COMMIT])
    tags[schema.CONFIG_SHA256] = config_fingerprint(config)
    tags[schema.RUN_OWNER] = runs.process_owner()
    end_orphaned_runs(config)
    if flow_run_id:
        tags[schema.FLOW_RUN_ID] = flow_run_id
    run_id = runs.find_open_run(config.tracking, schema.FLOW_RUN_ID, flow_run_id) if flow_run_id else None
    if run_id is None:
        name = f"{config.training.method}-{data_version.dvc_md5[:8]}"
        run_id = runs.start_run(config.tracking, run_name=name, tags=tags)
    resolved = config_to_dict(config)
    # MLflow refuses '=' and '&' in param names; config keys such as race=Asian use them.
    params = {re.sub(r"[^\w\-. :/]", ":", key): value for key, value in _flatten("", resolved, {}).items()}
    runs.log_params(config.tracking, run_id, params)
    runs.log_json(config.tracking, run_id, resolved, schema.CONFIG_ARTIFACT)
    runs.log_json(config.tracking, run_id, data_version.to_dict(), schema.DATA_VERSION_ARTIFACT)
    runs.log_dataset_inputs(
        config.tracking, run_id, dataset_inputs(data_version, base_version), schema.MLFLOW_DATASET_CONTEXT
    )
    return run_id


def end_orphaned_runs(config: PipelineConfig) -> list[str]:
    """End as KILLED the pipeline runs left RUNNING by a process that died (SIGKILL, OOM killer) on this host.

    Such a process never reached ``close_tracking_run``; its run would stay RUNNING for
    ever. A run opened on another host is left alone: its process cannot be checked here.
    """
    ended = runs.end_orphaned_runs(config.tracking, schema.RUN_OWNER, schema.RUN_END_REASON)
    for run_id in ended:
        logger.warning("MLflow run %s was left RUNNING by a process that no longer exists: ended as KILLED", run_id)
    return ended


def read_champion_baseline(config: PipelineConfig) -> ChampionBaseline | None:
    """The data md5, config sha256 and group counts the current champion's run recorded."""
    champion = registry.find_champion(config.tracking)
    if champion is None:
        return None
    tags = runs.run_tags(config.tracking, champion.run_id)
    validation = runs.run_artifact_json(config.tracking, champion.run_id, schema.VALIDATION_ARTIFACT) or {}
    return ChampionBaseline(
        version=champion.version,
        run_id=champion.run_id,
        data_md5=champion.data_md5,
        config_sha256=tags.get(schema.CONFIG_SHA256),
        group_counts=validation.get("group_counts"),
    )


def record_skip_decision(config: PipelineConfig, run_id: str, decision: SkipDecision) -> PromotionOutcome | None:
    """Record on the run whether it trains and why; a skipped run is closed here.

    Returns:
        The outcome of a skipped run (status ``skipped``, nothing registered), else ``None``.
    """
    tags: dict[str, object] = {schema.SKIPPED: str(decision.skip).lower(), schema.SKIP_REASON: decision.reason}
    if decision.skip:
        data_md5 = runs.run_tags(config.tracking, run_id).get(schema.DATA_MD5, "")
        tags["mlflow.runName"] = f"skipped-{data_md5[:8]}"
    runs.set_run_tags(config.tracking, run_id, tags)
    if not decision.skip:
        return None
    outcome = PromotionOutcome(
        model_name=config.tracking.model_name,
        version=decision.champion_version or "",
        promoted=False,
        passed=False,
        status=schema.STATUS_SKIPPED,
        reasons=[decision.reason],
        compared_with_version=decision.champion_version,
        run_id=run_id,
        report_path="",
    )
    record_verdict(config, run_id, outcome)
    runs.end_run(config.tracking, run_id, "FINISHED")
    return outcome


def verdict_of(outcome: PromotionOutcome) -> str:
    """The run's ``fd.gate.verdict``: promoted, awaiting-approval, rejected or skipped."""
    if outcome.status == schema.STATUS_SKIPPED:
        return schema.VERDICT_SKIPPED
    if outcome.promoted:
        return schema.VERDICT_PROMOTED
    return schema.VERDICT_AWAITING_APPROVAL if outcome.passed else schema.VERDICT_REJECTED


def record_verdict(config: PipelineConfig, run_id: str, outcome: PromotionOutcome) -> None:
    """The verdict tag on the run, written once: a retry finds it and writes nothing.

    The outcome is taken from the gate's decision record (one per version), so a retry
    derives the same verdict.
    """
    runs.set_run_tag_once(config.tracking, run_id, schema.GATE_VERDICT, verdict_of(outcome))


def record_validation(config: PipelineConfig, run_id: str, result: ValidationResult) -> None:
    """Validation outcome: tags for the lineage, the full result and the Data Docs as artifacts."""
    synthetic = result.synthetic
    largest_shift = max((s.shift for s in result.share_shifts), default=0.0)
    runs.set_run_tags(
        config.tracking,
        run_id,
        {
            schema.VALIDATION_SUCCESS: str(result.success).lower(),
            schema.VALIDATION_FAILED_EXPECTATIONS: result.failed_expectations,
            schema.VALIDATION_FORMAT: result.format,
            schema.VALIDATION_EXCLUDED: result.excluded,
            # Which model versions' images are trained on: the self-consuming loop, visible.
            schema.VALIDATION_SYNTHETIC: {
                "train_fraction": synthetic.get("train_fraction", 0.0),
                "by_model": synthetic.get("by_model", {}),
            },
            schema.VALIDATION_REFERENCE: result.reference or "",
            schema.VALIDATION_ACKNOWLEDGED_SHIFTS: {
                s.slice: s.acknowledged for s in result.share_shifts if s.acknowledged
            },
        },
    )
    runs.log_json(config.tracking, run_id, result.to_dict(), schema.VALIDATION_ARTIFACT)
    if result.data_docs and Path(result.data_docs).is_dir():
        runs.log_artifacts(config.tracking, run_id, result.data_docs, schema.DATA_DOCS_DIR)
    runs.log_metrics(
        config.tracking,
        run_id,
        {
            "validation/failed_expectations": len(result.failed),
            "validation/subjects": result.n_subjects,
            "validation/excluded": result.n_excluded,
            "validation/synthetic_fraction": float(synthetic.get("train_fraction", 0.0)),
            "validation/largest_share_shift": largest_shift,
        },
    )


def record_training(config: PipelineConfig, run_id: str, result: TrainingResult) -> None:
    """Training summary and the FBP trajectory file."""
    runs.set_run_tags(config.tracking, run_id, {schema.TRAINING_METHOD: result.method})
    runs.log_json(config.tracking, run_id, result.to_dict(), schema.TRAINING_ARTIFACT)
    trajectory = Path(config.training.output_dir) / "fbp_trajectory.json"
    if trajectory.is_file():  # only the trajectory: the folder also holds checkpoints
        runs.log_artifact(config.tracking, run_id, trajectory, schema.TRAINING_DIR)
    runs.log_metrics(config.tracking, run_id, {"train/seconds": result.seconds}, step=result.steps)


def record_evaluation(config: PipelineConfig, run_id: str, report: EvaluationReport) -> None:
    """Every slice metric with its interval, the report (JSON, Markdown, HTML, charts, grids).

    ``evaluation/evaluation.json`` and ``evaluation/grids/`` are what
    ``fairdiffusion report --version N`` renders a registered version's report from.
    """
    runs.log_metrics(config.tracking, run_id, report.metrics)
    runs.log_json(config.tracking, run_id, report.to_dict(), schema.EVALUATION_ARTIFACT)
    written = Path(config.evaluation.output_dir)
    markdown, page = written / "evaluation.md", written / "report.html"
    if markdown.is_file():
        text = markdown.read_text()
    else:
        # Imported here: the report module loads matplotlib, which tasks that only read lineage never need.
        from fairdiffusion.evaluation.report import render_markdown

        text = render_markdown(report)
    runs.log_text(config.tracking, run_id, text, schema.EVALUATION_MARKDOWN_ARTIFACT)
    if page.is_file():
        runs.log_text(config.tracking, run_id, page.read_text(), schema.EVALUATION_HTML_ARTIFACT)
    for folder in ("charts", "grids"):
        if (written / folder).is_dir():
            runs.log_artifacts(config.tracking, run_id, written / folder, f"{schema.EVALUATION_DIR}/{folder}")


def gate_and_register(
    config: PipelineConfig,
    run_id: str,
    training: TrainingResult,
    report: EvaluationReport,
    actor: str | None = None,
) -> PromotionOutcome:
    """Judge the candidate, register it with its verdict, and promote it only on a pass.

    The model is logged first (slow, no lock). Reading the champion, deciding,
    registering and moving aliases then happen under the registry's promotion lock, so
    a concurrent promotion can neither slip a new champion in between the comparison
    and the alias move nor leave ``champion`` on a version that failed.

    Safe to retry after a fault at any step (the Prefect task does): the logged model, the
    decision, the version, the aliases and the decision record are each keyed by this run
    and found and completed, never repeated (see :func:`registry.register_gated_candidate`).
    """
    tracking = config.tracking
    gate_policy = _load_gate_policy(config, run_id)
    run_tags = runs.run_tags(tracking, run_id)
    model_uri, model_id = registry.log_model_once(tracking, run_id, training.model_dir)
    candidate = registry.GatedCandidate(
        run_id=run_id,
        model_uri=model_uri,
        model_id=model_id,
        run_tags=run_tags,
        training_method=training.method,
        policy_file=str(config.gate.policy),
        actor=registry.current_actor(actor),
    )
    with registry.promotion_lock(tracking, holder=f"pipeline run {run_id}"):
        decision = _decide_once(config, run_id, report, run_tags, gate_policy)
        registered = registry.register_gated_candidate(tracking, candidate, decision, config.gate.require_approval)
    outcome = PromotionOutcome(
        model_name=tracking.model_name,
        version=registered.version,
        promoted=registered.promoted,
        passed=decision.passed,
        status=registered.status,
        reasons=decision.reasons,
        compared_with_version=decision.compared_with_version,
        run_id=run_id,
        report_path=str(Path(config.evaluation.output_dir) / "evaluation.md"),
    )
    # After the decision record: a retry rewrites the same card and finds the verdict written.
    facts = model_card_facts(config, outcome, run_tags)
    publish_model_card(config, candidate, training, render_model_card(facts, decision, report, training))
    record_verdict(config, run_id, outcome)
    return outcome


def model_card_facts(config: PipelineConfig, outcome: PromotionOutcome, run_tags: dict[str, str]) -> ModelCardFacts:
    """What the model card says about a registered version, from its outcome and its run's lineage tags."""
    return ModelCardFacts(
        model_name=outcome.model_name,
        version=outcome.version,
        run_id=outcome.run_id,
        verdict=verdict_of(outcome),
        base_model=config.model.pretrained,
        data=DataLineage(
            dvc_md5=run_tags.get(schema.DATA_MD5),
            data_dvc_commit=run_tags.get(schema.DATA_DVC_COMMIT) or None,
            path=run_tags.get(schema.DATA_PATH),
        ),
        base_model_version=DataLineage(
            dvc_md5=run_tags.get(schema.BASE_MD5),
            data_dvc_commit=run_tags.get(schema.BASE_DVC_COMMIT) or None,
            path=run_tags.get(schema.BASE_PATH),
        ),
        code=CodeLineage(
            git_commit=run_tags.get(schema.CODE_GIT_COMMIT) or None,
            dirty=json.loads(run_tags[schema.CODE_DIRTY]) if run_tags.get(schema.CODE_DIRTY) else None,
        ),
        synthetic_share=_synthetic_share(run_tags),
        policy_file=str(config.gate.policy),
    )


def publish_model_card(
    config: PipelineConfig, candidate: registry.GatedCandidate, training: TrainingResult, card: str
) -> None:
    """The card as ``README.md`` in the saved pipeline folder, on the run, and in the logged model's pipeline.

    Each write replaces the same file, so a retry leaves one card.
    """
    folder = Path(training.model_dir)
    if folder.is_dir():
        (folder / schema.MODEL_CARD_FILE).write_text(card)
    else:
        logger.warning("Pipeline folder %s is gone: the model card is only logged to MLflow", folder)
    runs.log_text(config.tracking, candidate.run_id, card, schema.MODEL_CARD_ARTIFACT)
    if candidate.model_id:
        registry.log_model_card(config.tracking, candidate.model_id, card)


def _decide_once(
    config: PipelineConfig,
    run_id: str,
    report: EvaluationReport,
    run_tags: dict[str, str],
    gate_policy: tuple[GatePolicy | None, str | None, str | None],
) -> GateDecision:
    """The decision a failed attempt stored on the run, else a new one against the champion (stored first)."""
    champion = registry.find_champion(config.tracking)
    stored = _stored_decision(config, run_id, champion)
    if stored is not None:
        return stored
    policy, policy_hash, policy_error = gate_policy
    decision = decide_promotion(
        report.metrics,
        champion.metrics if champion else None,
        config.data.attributes,
        report.extractor,
        policy,
        policy_hash=policy_hash,
        policy_error=policy_error,
        champion_version=champion.version if champion else None,
        candidate_data_md5=run_tags.get(schema.DATA_MD5),
        evaluated_data_md5=_evaluated_data_md5(report),
        synthetic_share=_synthetic_share(run_tags),
    )
    runs.log_json(config.tracking, run_id, decision.to_dict(), schema.GATE_DECISION_ARTIFACT)
    return decision


def _synthetic_share(run_tags: dict[str, str]) -> float:
    """The training data's synthetic share, as validation recorded it (the MADness guard's trigger)."""
    recorded = json.loads(run_tags.get(schema.VALIDATION_SYNTHETIC) or "{}")
    return float(recorded.get("train_fraction", 0.0))


def _stored_decision(
    config: PipelineConfig, run_id: str, champion: registry.ChampionInfo | None
) -> GateDecision | None:
    """The stored decision, if it still holds: the champion it was compared with still serves.

    It also holds when this run's version is the champion (the failed attempt moved the
    alias) or its decision is already recorded (a later promotion may have moved it since).
    """
    stored = runs.run_artifact_json(config.tracking, run_id, schema.GATE_DECISION_ARTIFACT)
    if stored is None:
        return None
    decision = GateDecision.from_dict(stored)
    current = champion.version if champion else None
    if decision.compared_with_version == current:
        return decision
    version = registry.run_version(config.tracking, run_id)
    if version is not None and (current == version or registry.gate_record(config.tracking, version) is not None):
        return decision
    return None


def _load_gate_policy(config: PipelineConfig, run_id: str) -> tuple[GatePolicy | None, str | None, str | None]:
    """(policy, its sha256, why it cannot be used); a readable policy is stored on the run."""
    try:
        policy, policy_hash = load_policy(config.gate.policy)
    except PolicyError as error:
        return None, None, str(error)  # the gate rejects the candidate, naming this error
    runs.log_text(config.tracking, run_id, Path(config.gate.policy).read_text(), schema.GATE_POLICY_ARTIFACT)
    return policy, policy_hash, None


def _evaluated_data_md5(report: EvaluationReport) -> str | None:
    evaluated = report.protocol.get("data_md5")
    return str(evaluated) if evaluated is not None else None
