"""Stage 4: generate for the held-out prompts and measure quality per subgroup."""

from __future__ import annotations

import pandas as pd
from prefect import task

from fairdiffusion import lineage
from fairdiffusion.config import PipelineConfig
from fairdiffusion.evaluation import EvaluationReport, evaluate_model
from fairdiffusion.training import TrainingResult


@task(name="evaluate_candidate", timeout_seconds=12 * 3600)
def evaluate_candidate(
    training: TrainingResult, samples: pd.DataFrame, config: PipelineConfig, run_id: str
) -> EvaluationReport:
    """FID and equity-scaled FID overall and per group, logged to MLflow."""
    test_rows = samples[samples["split"] == config.data.test_split]
    report = evaluate_model(
        training.model_dir,
        test_rows,
        config.data.attributes,
        config.training.resolution,
        config.evaluation,
    )
    lineage.record_evaluation(config, run_id, report)
    return report
