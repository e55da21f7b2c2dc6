"""What each stage records about a run, so that MLflow alone tells its whole story.

These are the stage-level bookkeeping functions the Prefect tasks call; they decide
*what* is recorded. *How* it is written to MLflow lives in :mod:`fairdiffusion.registry`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fairdiffusion import registry
from fairdiffusion.config import PipelineConfig, config_to_dict
from fairdiffusion.evaluation import EvaluationReport
from fairdiffusion.gate import GateDecision, decide_promotion
from fairdiffusion.training import TrainingResult
from fairdiffusion.validation import ValidationResult
from fairdiffusion.versioning import DataVersion, resolve_code_version


@dataclass(frozen=True)
class PromotionOutcome:
    """What stage 5 did: the version registered, the verdict, and where to look."""

    model_name: str
    version: str
    promoted: bool
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
    return Path(__file__).resolve().parent.parent


def data_code_tags(data_version: DataVersion) -> dict[str, object]:
    """The data and code version tags, set on the run and copied onto the model version."""
    code = resolve_code_version(code_root())
    return {
        "fd.data.dvc_md5": data_version.dvc_md5,
        "fd.data.data_dvc_commit": data_version.data_dvc_commit or "",
        "fd.data.path": data_version.path,
        "fd.data.dvc_file": data_version.dvc_file,
        "fd.code.git_commit": code.git_commit or "",
        "fd.code.dirty": code.dirty,
    }


def open_pipeline_run(config: PipelineConfig, data_version: DataVersion) -> str:
    """Start the run, with the data/code version and the resolved config on it."""
    tags = {k: v if isinstance(v, str) else json.dumps(v) for k, v in data_code_tags(data_version).items()}
    run_id = registry.start_run(
        config.tracking, run_name=f"{config.training.method}-{data_version.dvc_md5[:8]}", tags=tags
    )
    resolved = config_to_dict(config)
    registry.log_params(config.tracking, run_id, _flatten("", resolved, {}))
    registry.log_json(config.tracking, run_id, resolved, "lineage/config.json")
    registry.log_json(config.tracking, run_id, data_version.to_dict(), "lineage/data_version.json")
    return run_id


def record_validation(config: PipelineConfig, run_id: str, result: ValidationResult) -> None:
    """Validation outcome: tags for the lineage, the full result as an artifact."""
    registry.set_run_tags(
        config.tracking,
        run_id,
        {
            "fd.validation.success": str(result.success).lower(),
            "fd.validation.failed_expectations": result.failed_expectations,
        },
    )
    registry.log_json(config.tracking, run_id, result.to_dict(), "lineage/validation.json")
    registry.log_metrics(
        config.tracking,
        run_id,
        {
            "validation/failed_expectations": len(result.failed),
            "validation/subjects": result.n_subjects,
        },
    )


def record_training(config: PipelineConfig, run_id: str, result: TrainingResult) -> None:
    """Training summary and the FBP trajectory file."""
    registry.set_run_tags(config.tracking, run_id, {"fd.training.method": result.method})
    registry.log_json(config.tracking, run_id, result.to_dict(), "lineage/training.json")
    trajectory = Path(config.training.output_dir) / "fbp_trajectory.json"
    if trajectory.is_file():
        registry.log_artifacts(config.tracking, run_id, trajectory.parent, "training")
    registry.log_metrics(config.tracking, run_id, {"train/seconds": result.seconds}, step=result.steps)


def record_evaluation(config: PipelineConfig, run_id: str, report: EvaluationReport) -> None:
    """Every slice metric, the report and the generation protocol."""
    registry.log_metrics(config.tracking, run_id, report.metrics)
    registry.log_json(config.tracking, run_id, report.to_dict(), "evaluation/evaluation.json")
    registry.log_text(config.tracking, run_id, report.to_markdown(), "evaluation/report.md")


def gate_and_register(
    config: PipelineConfig, run_id: str, training: TrainingResult, report: EvaluationReport
) -> PromotionOutcome:
    """Decide, register the version with its decision, and move aliases accordingly."""
    champion = registry.find_champion(config.tracking)
    decision: GateDecision = decide_promotion(
        report.metrics,
        champion.metrics if champion else None,
        config.data.attributes,
        report.extractor,
        config.gate,
        champion.version if champion else None,
    )
    registry.log_json(config.tracking, run_id, decision.to_dict(), "lineage/gate_decision.json")
    run_tags = registry.run_tags(config.tracking, run_id)
    lineage_tags = {k: v for k, v in run_tags.items() if k.startswith(("fd.data.", "fd.code."))}
    lineage_tags["fd.training.method"] = training.method
    registered = registry.register_candidate(
        config.tracking, run_id, training.model_dir, decision.to_dict(), lineage_tags, champion
    )
    report_path = str(Path(config.evaluation.output_dir) / "evaluation.md")
    return PromotionOutcome(
        model_name=registered.model_name,
        version=registered.version,
        promoted=registered.promoted,
        reasons=decision.reasons,
        compared_with_version=decision.compared_with_version,
        run_id=run_id,
        report_path=report_path,
    )
