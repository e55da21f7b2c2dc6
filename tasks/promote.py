"""Stage 5: the fairness gate, registration, and promotion only on a pass."""

from __future__ import annotations

from prefect import task

from fairdiffusion.config import PipelineConfig
from fairdiffusion.evaluation.results import EvaluationReport
from fairdiffusion.registry import lineage
from fairdiffusion.registry.lineage import PromotionOutcome
from fairdiffusion.training.results import TrainingResult


@task(name="promote_if_fair", retries=2, retry_delay_seconds=5)
def promote_if_fair(
    training: TrainingResult, report: EvaluationReport, config: PipelineConfig, run_id: str
) -> PromotionOutcome:
    """Judge the candidate, register it, and move ``champion`` only if the gate passed."""
    return lineage.gate_and_register(config, run_id, training, report)
