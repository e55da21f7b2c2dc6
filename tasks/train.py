"""Stage 3: fine-tune the candidate (FairDiffusion or baseline)."""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task

from fairdiffusion.config import PipelineConfig
from fairdiffusion.models.base import check_bundle_resolution
from fairdiffusion.models.loading import resolve_pretrained
from fairdiffusion.registry import lineage
from fairdiffusion.training.launch import run_training
from fairdiffusion.training.results import TrainingResult


@task(name="train_candidate", timeout_seconds=24 * 3600)
def train_candidate(samples: pd.DataFrame, config: PipelineConfig, run_id: str) -> TrainingResult:
    """Train on the training splits, logging losses and the FBP trajectory to MLflow.

    One process trains here; more are started with ``accelerate launch`` (or
    ``torchrun``) as a subprocess whose output is streamed to this task's log.
    """
    source = resolve_pretrained(config.model.pretrained, config.model.tiny_dir, config.model.allow_download)
    check_bundle_resolution(source, config.training.resolution)
    train_rows = samples[samples["split"].isin(config.data.train_splits)]
    result = run_training(train_rows, source, config, run_id, on_output=get_run_logger().info)
    lineage.record_training(config, run_id, result)
    return result
