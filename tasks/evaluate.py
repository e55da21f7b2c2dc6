"""Stage 4: generate for the held-out prompts and measure quality, equity and clinical semantics."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact

from fairdiffusion.config import PipelineConfig
from fairdiffusion.evaluation.evaluate import evaluate_model
from fairdiffusion.evaluation.report import render_markdown
from fairdiffusion.evaluation.results import EvaluationReport
from fairdiffusion.models.loading import reference_model
from fairdiffusion.registry import lineage
from fairdiffusion.registry.baseline import find_baseline_run
from fairdiffusion.training.results import TrainingResult


@task(name="evaluate_candidate", timeout_seconds=12 * 3600)
def evaluate_candidate(
    training: TrainingResult, samples: pd.DataFrame, config: PipelineConfig, run_id: str, data_md5: str
) -> EvaluationReport:
    """Every slice's FID/KID/IS with intervals, equity, and AUCs; logged to MLflow and published in Prefect.

    When the champion or an earlier run of the experiment is an evaluated ``method: baseline``
    run on the same data version, the report shows the candidate's per-group deltas from it.
    """
    baseline = find_baseline_run(config.tracking, data_md5, exclude_run_id=run_id)
    test_rows = samples[samples["split"] == config.data.test_split]
    train_rows = samples[samples["split"].isin(config.data.train_splits)]
    report = evaluate_model(
        training.model_dir,
        test_rows,
        config.data.attributes,
        config.training.resolution,
        config.evaluation,
        data_version=data_md5,
        train_samples=train_rows,
        reference_dir=reference_model(config.model),
        baseline=baseline,
    )
    # The gate fails closed unless the evaluation names the data version it judged.
    report = replace(report, protocol=report.protocol | {"data_md5": data_md5})
    lineage.record_evaluation(config, run_id, report)
    create_markdown_artifact(
        markdown=render_markdown(report),
        key="evaluation-report",
        description=f"Subgroup evaluation of MLflow run {run_id}; charts, grids and report.html under its "
        "evaluation/ artifacts",
    )
    return report
