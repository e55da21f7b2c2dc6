"""MLflow run bookkeeping around the stages (I/O, so retried)."""

from __future__ import annotations

from prefect import task
from prefect.runtime import flow_run

from fairdiffusion import tracking
from fairdiffusion.config import PipelineConfig
from fairdiffusion.data.versioning import DataVersion
from fairdiffusion.registry import lineage


@task(name="open_tracking_run", retries=2, retry_delay_seconds=2)
def open_tracking_run(
    config: PipelineConfig, data_version: DataVersion, base_version: DataVersion | None = None
) -> str:
    """Start the MLflow run that every later stage logs to, with its lineage so far.

    Keyed by the flow run's id, so a retry reuses the run a failed attempt started.
    """
    return lineage.open_pipeline_run(config, data_version, base_version, flow_run_id=flow_run.get_id())


@task(name="close_tracking_run", retries=2, retry_delay_seconds=2)
def close_tracking_run(config: PipelineConfig, run_id: str, status: str) -> None:
    """Mark the run finished or failed."""
    tracking.end_run(config.tracking, run_id, status)
