"""Build gate candidates for the registry tests, and register one from the command line.

A candidate is a real MLflow run carrying data/code tags, a real tiny diffusers pipeline
(logged as the pyfunc model) and the flat metrics an evaluation produces. Run as a
script it registers one candidate, which the concurrency test starts in two processes
at once:  python candidates.py CONFIG PIPELINE_DIR OVERALL_FID DATA_MD5
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from fairdiffusion import tracking
from fairdiffusion.config import FAIRGENMED_ATTRIBUTES, PipelineConfig, load_config
from fairdiffusion.evaluation.fidelity import compute_attribute_fidelity, flatten_fidelity
from fairdiffusion.evaluation.metric_keys import flatten_metrics
from fairdiffusion.evaluation.results import EvaluationReport, FidelityResult
from fairdiffusion.evaluation.slices import SliceSettings, equity_scaled
from fairdiffusion.registry import lineage, schema
from fairdiffusion.training.results import TrainingResult

EXTRACTOR = "randcnn8"
GOOD_GROUPS = {
    "race": {"Asian": 11.0, "Black": 12.0, "White": 9.0},
    "gender": {"Female": 10.0, "Male": 11.0},
    "ethnicity": {"Non-Hispanic": 10.0, "Hispanic": 12.0},
}


def make_metrics(overall: float = 10.0, groups: dict | None = None, size: float = 10.0) -> dict[str, float]:
    """Flat metrics exactly as the evaluation builds them (race ES-FID 50 at overall 10)."""
    groups = groups or GOOD_GROUPS
    slices = {"overall": {"fid": overall, "num_samples": size * 3}}
    for attribute, values in groups.items():
        for group, fid in values.items():
            slices[f"{attribute}/{group}"] = {"fid": fid, "num_samples": size}
    equity = {a: equity_scaled(overall, v, higher_is_better=False) for a, v in groups.items()}
    return flatten_metrics(slices, equity, EXTRACTOR) | faithful_fidelity(groups)


def faithful_fidelity(attributes: dict, per_group: int = 10) -> dict[str, float]:
    """Prompt-fidelity metrics, built as the evaluation builds them, of a model that draws every group as prompted."""
    settings = SliceSettings(resamples=20, seed=0)
    metrics: dict[str, float] = {}
    for attribute, groups in attributes.items():
        targets = np.repeat(np.arange(len(groups)), per_group)
        item = compute_attribute_fidelity(attribute, "protected", groups, targets, (targets, targets), settings, 0.1)
        metrics |= flatten_fidelity(FidelityResult("small", {attribute: item}, 0, len(targets), False, 0.0))
    return metrics


def register_candidate(
    config: PipelineConfig,
    pipeline_dir: Path,
    metrics: dict[str, float],
    data_md5: str = "md5-v1",
    evaluated_md5: str | None = "same",
) -> lineage.PromotionOutcome:
    """Open a run like the pipeline does, then run stage 5 (gate, register, promote)."""
    run_id, training, report = open_candidate(config, pipeline_dir, metrics, data_md5, evaluated_md5)
    outcome = lineage.gate_and_register(config, run_id, training, report)
    tracking.end_run(config.tracking, run_id)
    return outcome


def open_candidate(
    config: PipelineConfig,
    pipeline_dir: Path,
    metrics: dict[str, float],
    data_md5: str = "md5-v1",
    evaluated_md5: str | None = "same",
) -> tuple[str, TrainingResult, EvaluationReport]:
    """A candidate's run (data/code tags, metrics) and what stage 5 is given: (run id, training, report)."""
    tags = {
        schema.DATA_MD5: data_md5,
        schema.DATA_DVC_COMMIT: "0" * 40,
        schema.DATA_PATH: "data",
        schema.CODE_GIT_COMMIT: "1" * 40,
        schema.CODE_DIRTY: "false",
    }
    run_id = tracking.start_run(config.tracking, "candidate", tags)
    tracking.log_metrics(config.tracking, run_id, metrics)
    report = EvaluationReport(
        extractor=EXTRACTOR,
        slices={},
        equity={},
        metrics=metrics,
        image_dir="",
        num_images=0,
        protocol={"data_md5": data_md5 if evaluated_md5 == "same" else evaluated_md5},
    )
    training = TrainingResult(
        model_dir=str(pipeline_dir),
        method="fair",
        steps=1,
        final_loss=0.1,
        seconds=0.0,
        sigma_names=list(FAIRGENMED_ATTRIBUTES),
        final_sigma=None,
        windows=[],
    )
    return run_id, training, report


if __name__ == "__main__":
    config_path, pipeline, overall, md5 = sys.argv[1:5]
    result = register_candidate(load_config(config_path), Path(pipeline), make_metrics(float(overall)), md5)
    print(f"{result.version} {result.status}")
