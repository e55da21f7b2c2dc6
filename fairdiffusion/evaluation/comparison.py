"""The candidate beside a baseline run on the same data: per-group deltas of two flat metric dicts.

Pure: it reads only flat metric keys (:mod:`fairdiffusion.evaluation.metric_keys`), so the
baseline's metrics can come from anywhere; the pipeline finds them in MLflow
(:func:`fairdiffusion.registry.baseline.find_baseline_run`) and the report renders the
result (:mod:`fairdiffusion.evaluation.report`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fairdiffusion.evaluation.image_metrics import IMAGE_METRICS
from fairdiffusion.evaluation.metric_keys import interval_keys, metric_key_stems
from fairdiffusion.evaluation.slices import OVERALL


@dataclass(frozen=True)
class BaselineRun:
    """The flat metrics of a ``method: baseline`` run evaluated on the same data version.

    Attributes:
        run_id: Its MLflow run.
        source: How it was found, for the report (``champion v3``, ``latest baseline run ...``).
        metrics: Its flat metric keys, as logged.
    """

    run_id: str
    source: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class MetricDelta:
    """One metric of one slice: the baseline's value, the candidate's, and the difference."""

    key: str
    baseline: float
    candidate: float
    #: candidate - baseline.
    delta: float
    higher_is_better: bool
    baseline_interval: list[float] = field(default_factory=list)
    candidate_interval: list[float] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``better``, ``worse`` or ``same`` for the candidate (``–`` when a value is missing)."""
        if not math.isfinite(self.delta):
            return "–"
        if self.delta == 0:
            return "same"
        return "better" if (self.delta > 0) == self.higher_is_better else "worse"


@dataclass(frozen=True)
class BaselineComparison:
    """The candidate's deltas from a baseline run, one per metric key both runs logged."""

    run_id: str
    source: str
    deltas: list[MetricDelta]

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaselineComparison:
        """Inverse of :meth:`to_dict`."""
        deltas = [MetricDelta(**d) for d in data["deltas"]]
        return cls(run_id=str(data["run_id"]), source=str(data["source"]), deltas=deltas)


def comparison_keys(
    attributes: Mapping[str, Sequence[str]], extractor: str, metrics: Mapping[str, bool] = IMAGE_METRICS
) -> dict[str, bool]:
    """Flat keys compared with a baseline, and whether higher is better for each.

    Per image metric: overall and each group at full size, each group and the overall set
    at matched size, and each attribute's ES and largest gap at both sizes.
    """
    keys: dict[str, bool] = {}
    for metric, higher in metrics.items():
        stems = metric_key_stems(metric, extractor)
        keys[f"{stems['value']}/{OVERALL}"] = higher
        for attribute, groups in attributes.items():
            keys |= {f"{stems['value']}/{attribute}/{g}": higher for g in groups}
            keys |= {f"{stems['matched']}/{attribute}/{g}": higher for g in groups}
            keys[f"{stems['matched_overall']}/{attribute}"] = higher
            keys[f"{stems['es']}/{attribute}"] = higher
            keys[f"{stems['es_matched']}/{attribute}"] = higher
            keys[f"{stems['max_gap']}/{attribute}"] = False  # a gap between groups: smaller is better
            keys[f"{stems['max_gap_matched']}/{attribute}"] = False
    return keys


def compare_with_baseline(
    candidate: Mapping[str, float],
    baseline: BaselineRun,
    attributes: Mapping[str, Sequence[str]],
    extractor: str,
) -> BaselineComparison:
    """The candidate's delta from the baseline on every :func:`comparison_keys` key both logged.

    Args:
        candidate: The candidate's flat metrics.
        baseline: The baseline run and its flat metrics.
        attributes: Protected attribute -> groups.
        extractor: The feature extractor's name (keys of another extractor never match).

    Returns:
        One :class:`MetricDelta` per key, in :func:`comparison_keys` order.
    """
    deltas = []
    for key, higher in comparison_keys(attributes, extractor).items():
        if key not in candidate or key not in baseline.metrics:
            continue
        ours, theirs = float(candidate[key]), float(baseline.metrics[key])
        deltas.append(
            MetricDelta(
                key=key,
                baseline=theirs,
                candidate=ours,
                delta=ours - theirs,
                higher_is_better=higher,
                baseline_interval=_interval_of(baseline.metrics, key),
                candidate_interval=_interval_of(candidate, key),
            )
        )
    return BaselineComparison(run_id=baseline.run_id, source=baseline.source, deltas=deltas)


def _interval_of(metrics: Mapping[str, float], key: str) -> list[float]:
    low, high = (metrics.get(k) for k in interval_keys(key))
    return [] if low is None or high is None else [float(low), float(high)]
