"""The self-consuming retraining experiment's own steps; the rest are the pipeline's tasks."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from prefect import task

from fairdiffusion.config import PipelineConfig
from fairdiffusion.data.generations import SyntheticBatch, kept_real_rows, write_generation_dataset
from fairdiffusion.evaluation.generation_curves import plot_generation_curves
from fairdiffusion.registry import generations
from fairdiffusion.registry.gate import GateDecision


@task(name="open_generation_run", retries=2, retry_delay_seconds=2)
def open_generation_run(
    config: PipelineConfig,
    generation: int,
    regime: str,
    data_md5: str,
    parent_run_id: str | None = None,
    parent_model_dir: str | None = None,
) -> str:
    """Start the generation's MLflow run, tagged with its parent generation's run and model."""
    return generations.open_generation_run(config, generation, regime, data_md5, parent_run_id, parent_model_dir)


@task(name="generate_training_images")
def generate_training_images(
    config: PipelineConfig, samples: pd.DataFrame, model_dir: str, generation: int, parent_run_id: str
) -> SyntheticBatch:
    """Generation g-1's images for the real training prompts, with its run as their provenance."""
    rows = samples[samples["split"].isin(config.data.train_splits)]
    seed = config.evaluation.seed + 100_003 * generation  # never the evaluation's seeds
    made_by = generations.generated_by(parent_run_id, generation - 1)
    return generations.generate_training_images(
        model_dir, rows, config.training.resolution, config.evaluation, seed, made_by
    )


@task(name="write_generation_data")
def write_generation_data(
    config: PipelineConfig, generation: int, regime: str, samples: pd.DataFrame, batches: Sequence[SyntheticBatch]
) -> Path:
    """The generation's FairGenMed folder: the real test split, the real rows the regime keeps, the batches."""
    data = config.data
    train = samples[samples["split"].isin(data.train_splits)]
    kept = kept_real_rows(regime, train, config.generations.fresh_fraction, generation, config.training.seed)
    real = pd.concat([samples[samples["split"] == data.test_split], kept])
    destination = Path(config.generations.output_dir) / f"generation-{generation}" / "data"
    shutil.rmtree(destination, ignore_errors=True)  # this experiment's own output: written anew each run
    return write_generation_dataset(destination, Path(data.path), real, batches, [*data.train_splits, data.test_split])


@task(name="judge_generation")
def judge_generation(
    config: PipelineConfig,
    run_id: str,
    metrics: Mapping[str, float],
    generation0: Mapping[str, float] | None,
    extractor: str,
    synthetic_share: float,
) -> GateDecision:
    """The gate (MADness guard included) against generation 0, recorded on the run; nothing is registered."""
    return generations.judge_generation(config, run_id, metrics, generation0, extractor, synthetic_share)


@task(name="plot_generations")
def plot_generations(config: PipelineConfig, summaries: Sequence[generations.GenerationSummary]) -> list[Path]:
    """Each group's FID, recall and diversity over the generations, as PNGs in ``generations.output_dir``."""
    return plot_generation_curves(summaries, generations.SUMMARY_METRICS, Path(config.generations.output_dir))
