"""The bookkeeping of a self-consuming retraining experiment (``fairdiffusion generations``).

Every generation is an MLflow run in its own experiment (never the registry: no
generation becomes champion), tagged with its generation, regime, the run it descends
from and the synthetic-share ceiling the experiment lifted, if it lifted one, so the
chain can be audited from any run. Each generation's per-group metrics come from the
same evaluation as the pipeline's, and the gate's MADness guard judges it against
generation 0 (Mayer et al. 2024); the verdict is recorded, not enforced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from fairdiffusion import tracking as runs
from fairdiffusion.config import EvaluationConfig, PipelineConfig, config_to_dict
from fairdiffusion.data.generations import SyntheticBatch
from fairdiffusion.evaluation.cache import fingerprint_files, model_fingerprint
from fairdiffusion.evaluation.generation import generate_images
from fairdiffusion.evaluation.metric_keys import fidelity_key, metric_key_stems
from fairdiffusion.registry import schema
from fairdiffusion.registry.gate import GateDecision, decide_promotion
from fairdiffusion.registry.policy import PolicyError, load_policy

DECISION_ARTIFACT = "generation/gate_decision.json"
#: The per-group metrics the experiment prints and compares.
SUMMARY_METRICS = ("fid", "recall", "diversity")


def generation_config(config: PipelineConfig, generation: int, data_dir: Path | None) -> PipelineConfig:
    """One generation's config: its own data folder, outputs and experiment; the ceilings it may lift.

    Args:
        config: The experiment's config.
        generation: 0 trains on ``config.data``; later ones on ``data_dir``.
        data_dir: The generation's FairGenMed folder (``None`` for generation 0).
    """
    out = Path(config.generations.output_dir) / f"generation-{generation}"
    validation: dict[str, object] = {}
    share = config.generations.max_synthetic_share
    if share is not None:  # lifted only by the explicit key, recorded on the run
        validation = {"max_synthetic_fraction": share, "max_synthetic_fraction_per_group": share}
    # A generation's folder holds exactly the rows it trains on: no pull, no per-split cap.
    data = {"path": data_dir, "pull": False, "max_subjects_per_split": None} if data_dir is not None else {}
    # One cache for the whole experiment: the base model's test images are generated once.
    cache = config.evaluation.cache_dir or Path(config.generations.output_dir) / "cache"
    experiment = config.generations.experiment or f"{config.tracking.experiment}-generations"
    return config.model_copy(
        update={
            "data": config.data.model_copy(update=data),
            "validation": config.validation.model_copy(update=validation),
            "training": config.training.model_copy(update={"output_dir": out / "train"}),
            "evaluation": config.evaluation.model_copy(update={"output_dir": out / "eval", "cache_dir": cache}),
            "tracking": config.tracking.model_copy(update={"experiment": experiment}),
        }
    )


def open_generation_run(
    config: PipelineConfig,
    generation: int,
    regime: str,
    data_md5: str,
    parent_run_id: str | None = None,
    parent_model_dir: str | None = None,
) -> str:
    """Start a generation's run with its chain tags, its data fingerprint and its resolved config.

    The parent is the generation whose images this one trains on: its run, and its saved
    pipeline (folder and sha256 of its weights; generations are never registered).
    """
    data_dir = Path(config.data.path)
    share = config.generations.max_synthetic_share
    tags = {
        schema.GENERATION: str(generation),
        schema.GENERATION_REGIME: regime,
        schema.GENERATION_PARENT_RUN: parent_run_id or "",
        schema.GENERATION_PARENT_MODEL: _describe_model(parent_model_dir),
        schema.GENERATION_MAX_SYNTHETIC_SHARE: "none" if share is None else f"{share:g}",
        schema.GENERATION_DATA_SHA256: data_md5 if generation == 0 else _fingerprint(data_dir),
        schema.DATA_MD5: data_md5,
    }
    run_id = runs.start_run(config.tracking, run_name=f"generation-{generation}-{regime}", tags=tags)
    runs.log_json(config.tracking, run_id, config_to_dict(config), "config/resolved.json")
    return run_id


def _describe_model(model_dir: str | None) -> str:
    return f"{model_dir} (sha256 {model_fingerprint(model_dir)})" if model_dir else ""


def _fingerprint(data_dir: Path) -> str:
    """sha256 of a generation's folder: every npz and the summary (labels and provenance)."""
    return fingerprint_files([*sorted(data_dir.rglob("data_*.npz")), data_dir / "data_summary.csv"])


def generated_by(run_id: str, generation: int) -> str:
    """The provenance a generation's images carry: the model's generation and run."""
    return f"fairdiffusion generation {generation} (run {run_id})"


def generate_training_images(
    model_dir: str, rows: pd.DataFrame, resolution: int, config: EvaluationConfig, seed: int, made_by: str
) -> SyntheticBatch:
    """One image per training prompt from a generation's model, seeded apart from the evaluation's."""
    made = generate_images(model_dir, rows["prompt"].tolist(), resolution, config.model_copy(update={"seed": seed}))
    return SyntheticBatch(rows.reset_index(drop=True), made.images, made_by)


@dataclass(frozen=True)
class GenerationSummary:
    """One generation: its run, its lineage and its per-group FID, recall and diversity."""

    generation: int
    run_id: str
    parent_run_id: str | None
    regime: str
    synthetic_share: float
    groups: dict[str, dict[str, float]]
    madness_passed: bool
    madness_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form (``--json``)."""
        return asdict(self)


def group_metrics(
    metrics: Mapping[str, float], attributes: Mapping[str, Sequence[str]], extractor: str
) -> dict[str, dict[str, float]]:
    """``{"race/Asian": {"fid": ..., "recall": ..., "diversity": ..., "fidelity": ...}, ...}`` (and ``overall``).

    ``fidelity`` is the group's prompt fidelity (nan when not measured, and for ``overall``).
    """
    slices = ["overall", *(f"{a}/{g}" for a, groups in attributes.items() for g in groups)]
    table = {
        name: {
            m: float(metrics.get(f"{metric_key_stems(m, extractor)['value']}/{name}", math.nan))
            for m in SUMMARY_METRICS
        }
        for name in slices
    }
    for name in slices[1:]:
        attribute, group = name.split("/", 1)
        table[name]["fidelity"] = float(metrics.get(fidelity_key("fidelity", attribute, group), math.nan))
    return table


def judge_generation(
    config: PipelineConfig,
    run_id: str,
    metrics: Mapping[str, float],
    generation0: Mapping[str, float] | None,
    extractor: str,
    synthetic_share: float,
) -> GateDecision:
    """The gate's decision against generation 0 (MADness guard included), recorded on the run, not enforced."""
    try:
        policy, digest, error = *load_policy(config.gate.policy), None
    except PolicyError as failure:
        policy, digest, error = None, None, str(failure)
    decision = decide_promotion(
        metrics,
        None,
        config.data.attributes,
        extractor,
        policy,
        policy_hash=digest,
        policy_error=error,
        synthetic_share=synthetic_share,
        generation0=generation0,
    )
    runs.log_json(config.tracking, run_id, decision.to_dict(), DECISION_ARTIFACT)
    passed = all(c.passed for c in decision.checks if c.rule.startswith("madness"))
    runs.set_run_tags(config.tracking, run_id, {schema.GENERATION_MADNESS_PASSED: str(passed).lower()})
    return decision


def summarise_generation(
    config: PipelineConfig,
    generation: int,
    run_id: str,
    parent_run_id: str | None,
    regime: str,
    synthetic_share: float,
    metrics: Mapping[str, float],
    decision: GateDecision,
    extractor: str,
) -> GenerationSummary:
    """The line of the experiment's table for one generation."""
    madness = [c.detail for c in decision.checks if c.rule.startswith("madness") and not c.passed]
    groups = group_metrics(metrics, config.data.attributes, extractor)
    return GenerationSummary(generation, run_id, parent_run_id, regime, synthetic_share, groups, not madness, madness)


def format_generations(summaries: Sequence[GenerationSummary]) -> str:
    """Per generation and per group: FID, recall, diversity and prompt fidelity, then the MADness verdict."""
    lines = []
    for summary in summaries:
        verdict = "; ".join(summary.madness_reasons) or (
            "MADness guard passed" if summary.synthetic_share else "real data only"
        )
        lines.append(
            f"generation {summary.generation} ({summary.regime}, synthetic {summary.synthetic_share:.0%}, "
            f"run {summary.run_id}, parent {summary.parent_run_id or '-'}): {verdict}"
        )
        lines.append(f"  {'slice':<28} {'FID':>9} {'recall':>7} {'diversity':>9} {'fidelity':>8}")
        for name, values in summary.groups.items():
            fidelity = values.get("fidelity", math.nan)
            figures = f"{values['fid']:>9.3f} {values['recall']:>7.3f} {values['diversity']:>9.3f} {fidelity:>8.2f}"
            lines.append(f"  {name:<28} {figures}")
    return "\n".join(lines)
