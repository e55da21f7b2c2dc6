"""Statistics of the fairness benchmark: one run's measures, and paired differences from baseline.

A *run* is one arm trained with one seed; its generated images are paired row by row with
the real test images (same subjects, same prompts, same generation seeds in every arm), so
two arms can be compared on the very same resampled subjects. Used by
``benchmarks/bench_fairness.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fairdiffusion.evaluation.image_metrics import FeatureStatistics
from fairdiffusion.evaluation.slices import OVERALL, SliceSettings, analyse_slices


@dataclass(frozen=True)
class RunMeasures:
    """What one run reaches on the real test set (domain-extractor features)."""

    overall_fid: float
    overall_kid: float
    #: attribute -> group -> FID with every group subsampled to the attribute's smallest group.
    matched_fid: dict[str, dict[str, float]]
    #: attribute -> group -> KID of the whole group (KID is unbiased in the sample size).
    group_kid: dict[str, dict[str, float]]
    #: attribute -> {"es", "disparity", "relative_disparity", "max_gap", "worst_group"} of matched FIDs.
    equity: dict[str, dict[str, float | str]]
    #: attribute -> {"low", "high"} bootstrap interval (images) of the matched largest gap.
    gap_interval: dict[str, list[float]]
    matched_n: dict[str, int]


def measure_run(
    statistics: FeatureStatistics,
    slices: Mapping[str, np.ndarray],
    attributes: Mapping[str, Sequence[str]],
    settings: SliceSettings,
) -> RunMeasures:
    """FID/KID overall, per group at matched size, equity (ES-FID, D, D/M, gap) with intervals."""
    analysis = analyse_slices(statistics, ["fid", "kid"], {"fid": False, "kid": False}, slices, attributes, settings)
    matched = analysis.matched
    return RunMeasures(
        overall_fid=analysis.slices[OVERALL]["fid"],
        overall_kid=analysis.slices[OVERALL]["kid"],
        matched_fid={a: {g: m.values["fid"][g] for g in attributes[a]} for a, m in matched.items()},
        group_kid={a: {g: analysis.slices[f"{a}/{g}"]["kid"] for g in gs} for a, gs in attributes.items()},
        equity={a: dict(m.equity["fid"]) for a, m in matched.items()},
        gap_interval={a: m.equity_intervals["fid"].get("max_gap", [np.nan, np.nan]) for a, m in matched.items()},
        matched_n={a: m.size for a, m in matched.items()},
    )


@dataclass(frozen=True)
class PairedDifference:
    """An arm minus baseline on the same seed and subjects: point, and image-bootstrap replicates."""

    point: float
    replicates: np.ndarray


def paired_overall_fid(
    arm: FeatureStatistics, baseline: FeatureStatistics, resamples: int, seed: int
) -> PairedDifference:
    """Overall FID of the arm minus that of baseline; replicates resample the same subjects for both."""
    n = len(arm.real)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, size=(resamples, n))
    everyone = np.arange(n)[None]
    point = float(arm(everyone)["fid"][0] - baseline(everyone)["fid"][0])
    return PairedDifference(point, arm(rows)["fid"] - baseline(rows)["fid"])


def paired_matched_gap(
    arm: FeatureStatistics,
    baseline: FeatureStatistics,
    groups: Mapping[str, np.ndarray],
    draws: int,
    resamples: int,
    seed: int,
) -> PairedDifference:
    """Largest matched-size FID gap between groups, arm minus baseline.

    The point averages each group's FID over ``draws`` subsamples (without replacement)
    to the smallest group's size, the same subsamples for both arms; replicates are an
    m-out-of-n bootstrap (with replacement, to that size), again shared by both arms.
    """
    usable = {g: rows for g, rows in groups.items() if len(rows) >= 2}
    size = min(len(rows) for rows in usable.values())
    rng = np.random.default_rng(seed)
    picks = {g: np.stack([rng.choice(r, size, replace=False) for _ in range(draws)]) for g, r in usable.items()}
    boots = {g: rng.choice(r, size=(resamples, size), replace=True) for g, r in usable.items()}
    point = _gap({g: arm(p)["fid"].mean(keepdims=True) for g, p in picks.items()}) - _gap(
        {g: baseline(p)["fid"].mean(keepdims=True) for g, p in picks.items()}
    )
    replicates = _gap({g: arm(b)["fid"] for g, b in boots.items()}) - _gap(
        {g: baseline(b)["fid"] for g, b in boots.items()}
    )
    return PairedDifference(float(point[0]), replicates)


def _gap(values: Mapping[str, np.ndarray]) -> np.ndarray:
    stacked = np.stack(list(values.values()))
    return stacked.max(axis=0) - stacked.min(axis=0)


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> list[float]:
    """The central ``level`` percentile interval of finite replicates (NaN when none)."""
    finite = replicates[np.isfinite(replicates)]
    if len(finite) == 0:
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]


def over_seeds(differences: Sequence[PairedDifference], resamples: int, seed: int, level: float = 0.95) -> dict:
    """Mean paired difference over seeds, with an image-level and a seed-level interval.

    * ``images``: the mean over seeds of each seed's image-bootstrap replicate (seeds held
      fixed): the uncertainty of the test set alone.
    * ``seeds``: a bootstrap of the seeds' point differences (training noise); with few
      seeds it is coarse, and with one seed it is undefined (NaN).
    """
    points = np.array([d.point for d in differences])
    images = np.mean(np.stack([d.replicates for d in differences]), axis=0)
    rng = np.random.default_rng(seed)
    if len(points) > 1:
        seed_means = points[rng.integers(0, len(points), size=(resamples, len(points)))].mean(axis=1)
        by_seed = percentile_interval(seed_means, level)
    else:
        by_seed = [float("nan"), float("nan")]
    return {
        "mean": float(points.mean()),
        "per_seed": [float(p) for p in points],
        "images_ci": percentile_interval(images, level),
        "seeds_ci": by_seed,
    }
