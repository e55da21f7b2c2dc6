"""The end of stage 5: the run's outcome in Prefect's log and artifacts, with its MLflow link."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from fairdiffusion.config import PipelineConfig
from fairdiffusion.registry import gate_summary, schema
from fairdiffusion.registry.lineage import PromotionOutcome


@task(name="publish_outcome", retries=2, retry_delay_seconds=2)
def publish_outcome(config: PipelineConfig, outcome: PromotionOutcome) -> None:
    """Log the decision and where it is in MLflow; publish the gate table as an artifact keyed by the model."""
    logger = get_run_logger()
    link = gate_summary.read_mlflow_link(config.tracking, outcome)
    skipped = outcome.status == schema.STATUS_SKIPPED
    decision = None if skipped else gate_summary.read_gate_decision(config.tracking, outcome.run_id)
    logger.info(gate_summary.outcome_line(outcome))
    logger.info(link.describe())
    if link.version_url:
        logger.info("MLflow model version: %s", link.version_url)
    create_markdown_artifact(
        markdown=gate_summary.render_gate_markdown(outcome, decision, link),
        key=gate_summary.gate_artifact_key(outcome.model_name),
        description=f"Fairness gate of {outcome.model_name}: {outcome.status} (MLflow run {outcome.run_id})",
    )
