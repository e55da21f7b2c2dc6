"""Stage 3: fine-tune the candidate (FairDiffusion or baseline)."""

from __future__ import annotations

import pandas as pd
from prefect import task

from fairdiffusion import lineage, registry
from fairdiffusion.config import PipelineConfig
from fairdiffusion.models import resolve_pretrained
from fairdiffusion.training import TrainingResult, train_unet


@task(name="train_candidate", timeout_seconds=24 * 3600)
def train_candidate(samples: pd.DataFrame, config: PipelineConfig, run_id: str) -> TrainingResult:
    """Train on the training splits, logging losses and the FBP trajectory to MLflow."""
    source = resolve_pretrained(config.model.pretrained, config.model.tiny_dir, config.model.allow_download)
    train_rows = samples[samples["split"].isin(config.data.train_splits)]
    result = train_unet(
        train_rows,
        config.data.attributes,
        source,
        config.training,
        log_metrics=lambda metrics, step: registry.log_metrics(config.tracking, run_id, metrics, step),
    )
    lineage.record_training(config, run_id, result)
    return result
