"""Stage 5: the fairness gate, registration, and promotion only on a pass."""

from __future__ import annotations

from contextlib import suppress

from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from fairdiffusion.config import PipelineConfig
from fairdiffusion.evaluation.results import EvaluationReport
from fairdiffusion.registry import lineage
from fairdiffusion.registry.lineage import PromotionOutcome
from fairdiffusion.training.results import TrainingResult

#: Prefect global concurrency limit held around every promotion started by a flow
#: (one slot). The library's own database-level lock (fairdiffusion.registry.locking)
#: still serialises the flow against direct CLI use (approve, rollback).
PROMOTION_LIMIT = "fairdiffusion-promotion"


def ensure_promotion_limit() -> None:
    """Create the one-slot limit if the Prefect server does not have it yet."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(PROMOTION_LIMIT)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another flow created it in between
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=PROMOTION_LIMIT, limit=1))


@task(name="promote_if_fair", retries=2, retry_delay_seconds=5)
def promote_if_fair(
    training: TrainingResult, report: EvaluationReport, config: PipelineConfig, run_id: str
) -> PromotionOutcome:
    """Judge the candidate, register it, and move ``champion`` only if the gate passed."""
    ensure_promotion_limit()
    with concurrency(PROMOTION_LIMIT, occupy=1, strict=True):
        return lineage.gate_and_register(config, run_id, training, report)
