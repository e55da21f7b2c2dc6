"""Slice metrics: FID, KID and IS per subgroup, equity scaling, intervals, matched sizes.

Shapes follow Made-With-ML's slice metrics: ``{slice: {metric: value, "num_samples": n}}``.
Every value comes from features computed once per image (:class:`FeatureStatistics`):
a slice is a set of row indices into them, so adding a slice, a bootstrap resample
or a matched-size draw costs no feature extraction.

Slices: ``overall``; ``<attr>/<group>`` for each group of each protected attribute;
and, with intersections on, ``<attr>/<group>/<attr>/<group>[/...]`` for every
combination of two or more attributes, in the configured attribute order
(``race/Black/gender/Female/ethnicity/Hispanic``).

Flat metric keys (MLflow, the gate). ``<x>`` is the feature extractor (``randcnn32``,
``inception_v3``), ``<m>`` an image metric (``fid``, ``kid``, ``is_1split``: the
Inception Score in one split, only where the extractor has a classifier head), ``<c>``
the clinical classifier (``small``, ``efficientnet``, ``vit``) and ``<label>`` a
prompted clinical label (``glaucoma``...):

- ``<m>_<x>/<slice>``: the metric on one slice; ``num_samples/<slice>``: its image count;
  ``small_slice/<slice>``: 1.0 when the slice is below ``evaluation.min_slice_size``.
- ``es_<m>_<x>/<attr>``, ``<m>_disparity_<x>/<attr>`` (D), ``<m>_rel_disparity_<x>/<attr>``
  (D / M) and ``<m>_gap_<x>/<attr>`` (largest difference between two groups).
- Matched sample size (every group, and the overall set, subsampled to the attribute's
  smallest group, averaged over seeded draws): ``matched_n/<attr>``,
  ``<m>_matched_<x>/<attr>/<group>``, ``<m>_matched_overall_<x>/<attr>``,
  ``es_<m>_matched_<x>/<attr>``, ``<m>_disparity_matched_<x>/<attr>``,
  ``<m>_rel_disparity_matched_<x>/<attr>``, ``<m>_gap_matched_<x>/<attr>``.
- Clinical semantics: ``auc_<c>/<label>/<slice>``, ``es_auc_<c>/<label>/<attr>``,
  ``auc_disparity_<c>/<label>/<attr>``, ``auc_rel_disparity_<c>/<label>/<attr>``,
  ``auc_gap_<c>/<label>/<attr>``.
- Intervals: for every key ``K`` above that has a bootstrap interval, ``ci_low/K`` and
  ``ci_high/K`` (the level and method are in the evaluation protocol, ``confidence_level``
  and ``ci_method``).

Every image-metric key carries the extractor's name, so a random-feature FID can never
be read as an Inception FID.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from fairdiffusion.evaluation.bca import bca_intervals
from fairdiffusion.evaluation.image_metrics import FeatureStatistics
from fairdiffusion.evaluation.progress import progress_bar

OVERALL = "overall"

Statistic = Callable[[np.ndarray], dict[str, np.ndarray]]
"""Maps row indices ``(B, n)`` (B resamples of one slice) to ``{metric: values (B,)}``."""


# --- Metrics of many slices from one set of features ---------------------------------------


def define_slices(
    groups: pd.DataFrame, attributes: Mapping[str, Sequence[str]], intersections: bool = False
) -> dict[str, np.ndarray]:
    """Row indices of every slice: overall, each group, and optionally every intersection.

    Args:
        groups: The test subjects' protected attributes, one row per subject.
        attributes: Attribute -> groups to report (an absent group gets an empty slice).
        intersections: Also every combination of groups of two or more attributes.

    Returns:
        ``{"overall": rows, "race/Asian": rows, ..., "race/Black/gender/Female": rows}``.
    """
    n = len(groups)
    masks = {
        (attribute, group): groups[attribute].to_numpy() == group
        for attribute, names in attributes.items()
        for group in names
    }
    slices = {OVERALL: np.arange(n)}
    for attribute, names in attributes.items():
        for group in names:
            slices[f"{attribute}/{group}"] = np.flatnonzero(masks[(attribute, group)])
    if intersections:
        names_of = list(attributes.items())
        for order in range(2, len(names_of) + 1):
            for combination in itertools.combinations(names_of, order):
                for chosen in itertools.product(*[[(a, g) for g in gs] for a, gs in combination]):
                    mask = np.logical_and.reduce([masks[pair] for pair in chosen])
                    slices["/".join(f"{a}/{g}" for a, g in chosen)] = np.flatnonzero(mask)
    return slices


def compute_slice_metrics(
    real: np.ndarray,
    generated: np.ndarray,
    groups: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    intersections: bool = False,
    generated_logits: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """FID and KID (and IS with logits) overall, for each group and, optionally, each intersection.

    Args:
        real: Features of the real test images, one row per test subject.
        generated: Features of the images generated from those subjects' prompts,
            row-aligned with ``real``.
        groups: The test subjects' protected attributes, row-aligned with both.
        attributes: Attribute -> groups to report (absent groups get NaN and 0 samples).
        intersections: Also report every intersection of groups of two or more attributes.
        generated_logits: Classifier-head logits of the generated images, for IS.

    Returns:
        ``{"overall": {...}, "race/Asian": {"fid": ..., "kid": ..., "num_samples": n}, ...}``.
    """
    statistics = FeatureStatistics(real, generated, generated_logits)
    slices = define_slices(groups, attributes, intersections)
    return _point_estimates(statistics, statistics.metric_names, slices)


def _point_estimates(
    statistic: Statistic, metric_names: Sequence[str], slices: Mapping[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for name, rows in slices.items():
        values = statistic(rows[None, :])
        entry = {metric: float(values[metric][0]) for metric in metric_names}
        entry["num_samples"] = float(len(rows))
        table[name] = entry
    return table


# --- Equity scaling -----------------------------------------------------------------------


def equity_scaled(overall: float, group_values: Mapping[str, float], higher_is_better: bool) -> dict[str, float | str]:
    """Equity scaling of one metric over one attribute's groups.

    Disparity D = sum over groups of |M - M_g| (FairDiffusion's equity-scaled metrics,
    Sec. 4.2). Higher-is-better metrics give ES-M = M / (1 + D); lower-is-better ones
    (FID) ES-M = M * (1 + D). Groups whose value is NaN are skipped.
    """
    values = {g: v for g, v in group_values.items() if np.isfinite(v)}
    if not values or not np.isfinite(overall):
        nan = float("nan")
        return {
            "es": nan,
            "disparity": nan,
            "relative_disparity": nan,
            "max_gap": nan,
            "worst_group": "",
        }
    disparity = float(sum(abs(overall - v) for v in values.values()))
    es = overall / (1 + disparity) if higher_is_better else overall * (1 + disparity)
    worst = (min if higher_is_better else max)(values, key=values.__getitem__)
    return {
        "es": float(es),
        "disparity": disparity,
        "relative_disparity": disparity / overall if overall else float("nan"),
        "max_gap": float(max(values.values()) - min(values.values())),
        "worst_group": worst,
    }


def _equity_arrays(
    overall: np.ndarray, group_values: Sequence[np.ndarray], higher_is_better: bool
) -> dict[str, np.ndarray]:
    """:func:`equity_scaled`'s numbers for B resamples at once (NaN groups skipped)."""
    stacked = np.stack(group_values)  # (G, B)
    finite = np.isfinite(stacked)
    disparity = np.where(finite, np.abs(overall[None] - stacked), 0.0).sum(axis=0)
    usable = finite.any(axis=0) & np.isfinite(overall)
    es = overall / (1 + disparity) if higher_is_better else overall * (1 + disparity)
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(finite, stacked, -np.inf).max(axis=0) - np.where(finite, stacked, np.inf).min(axis=0)
        relative = np.where(overall != 0, disparity / overall, np.nan)
    nan = np.nan
    return {
        "es": np.where(usable, es, nan),
        "disparity": np.where(usable, disparity, nan),
        "relative_disparity": np.where(usable, relative, nan),
        "max_gap": np.where(usable, gap, nan),
    }


# --- Intervals and matched sample sizes ---------------------------------------------------


@dataclass(frozen=True)
class SliceSettings:
    """How slices are resampled: bootstrap, matched sizes, and the small-slice flag.

    Attributes:
        resamples: Bootstrap resamples per slice (0: no intervals).
        confidence_level: Level of the percentile intervals.
        matched_draws: Seeded subsamples per attribute for matched-size values (0: none).
        min_slice_size: Slices with fewer images are flagged in the report.
        seed: Seed of every resample and draw.
        ci_method: ``bias_shifted_percentile``, ``percentile`` (see :func:`_interval`) or
            ``bca`` (Efron's BCa through ``scipy.stats.bootstrap``; matched-size values then
            use :func:`matched_ci_method`).
    """

    resamples: int = 1000
    confidence_level: float = 0.95
    matched_draws: int = 20
    min_slice_size: int = 10
    seed: int = 0
    ci_method: str = "bias_shifted_percentile"


@dataclass(frozen=True)
class MatchedEquity:
    """One attribute's values at matched sample size: every group and the overall set at ``size``."""

    size: int
    draws: int
    values: dict[str, dict[str, float]]  # metric -> {group or "overall": mean over draws}
    intervals: dict[str, dict[str, list[float]]]  # metric -> {group or "overall": [low, high]}
    equity: dict[str, dict[str, float | str]]  # metric -> equity_scaled(...) of the means
    equity_intervals: dict[str, dict[str, list[float]]]  # metric -> {stat: [low, high]}


@dataclass(frozen=True)
class SliceAnalysis:
    """Point estimates, intervals, equity and matched-size values of some metrics on every slice."""

    metric_names: list[str]
    higher_is_better: dict[str, bool]
    slices: dict[str, dict[str, float]]  # {slice: {metric: value, "num_samples": n}}
    intervals: dict[str, dict[str, list[float]]]  # {slice: {metric: [low, high]}}
    equity: dict[str, dict[str, dict[str, float | str]]]  # {metric: {attribute: stats}}
    equity_intervals: dict[str, dict[str, dict[str, list[float]]]]  # {metric: {attribute: {stat: [lo, hi]}}}
    matched: dict[str, MatchedEquity] = field(default_factory=dict)  # {attribute: ...}
    small_slices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SliceAnalysis:
        """Inverse of :meth:`to_dict`."""
        raw = dict(data)
        matched = {a: MatchedEquity(**m) for a, m in dict(raw.pop("matched", {})).items()}  # type: ignore[call-overload]
        return cls(**raw, matched=matched)  # type: ignore[arg-type]

    def worst_groups(self, metric: str) -> dict[str, str]:
        """Attribute -> its worst-off group on ``metric`` (empty when undefined)."""
        return {a: str(stats["worst_group"]) for a, stats in self.equity.get(metric, {}).items()}


def matched_ci_method(method: str) -> str:
    """The interval method of matched-size values under ``method``.

    BCa needs a jackknife of the sample the estimate comes from, and matched-size values
    come from an m-out-of-n bootstrap that ``scipy.stats.bootstrap`` does not offer, so
    under ``bca`` they keep ``bias_shifted_percentile``.
    """
    return "bias_shifted_percentile" if method == "bca" else method


def bootstrap_interval(replicates: np.ndarray, level: float, point: float, method: str) -> list[float]:
    """A bootstrap interval from replicates of a statistic whose estimate is ``point``.

    ``percentile``: the replicates' percentiles. ``bias_shifted_percentile``: the same
    percentiles shifted by the bootstrap's estimate of bias, mean(replicates) - point
    (the bias estimate of Efron and Tibshirani 1993, Sec. 10.2; this is *not* their BC or
    BCa interval, which is ``bca``). FID and D = sum |M - M_g| are biased upwards in a
    resample (duplicated subjects shrink the effective sample, and absolute values only
    add), so plain percentile intervals of small slices can lie wholly above the
    estimate; the shift keeps the bootstrap's spread around the estimate. A bound below
    zero is clipped to zero when the estimate and every replicate are non-negative.
    """
    finite = replicates[np.isfinite(replicates)]
    # An interval from a minority of the resamples would hide how often the metric failed.
    if len(finite) < 2 or len(finite) < 0.5 * len(replicates) or not math.isfinite(point):
        return [float("nan"), float("nan")]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    if method == "bias_shifted_percentile":
        shift = float(finite.mean()) - point
        low, high = low - shift, high - shift
        if point >= 0 and finite.min() >= 0:
            low = max(low, 0.0)
    return [float(low), float(high)]


def _resample(rng: np.random.Generator, rows: np.ndarray, count: int, size: int | None = None) -> np.ndarray:
    size = len(rows) if size is None else size
    if len(rows) == 0:
        return np.zeros((count, 0), dtype=np.int64)
    return rows[rng.integers(0, len(rows), size=(count, size))]


def analyse_slices(
    statistic: Statistic,
    metric_names: Sequence[str],
    higher_is_better: Mapping[str, bool],
    slices: Mapping[str, np.ndarray],
    attributes: Mapping[str, Sequence[str]],
    settings: SliceSettings,
    matched: bool = True,
) -> SliceAnalysis:
    """Every slice's metrics with bootstrap intervals, equity, and matched sizes.

    Intervals resample subjects (a real image with the image generated from its prompt)
    with replacement. Each slice is resampled on its own; an attribute's ES, D, D/M and
    largest gap are resampled stratified by group, with the overall value computed on
    the union of the groups' resamples, so every number in one replicate comes from the
    same resampled subjects. The percentile methods are written here, one set of
    resamples feeding every metric and derived value; ``bca`` hands the same resampling
    (subjects, stratified by group) to ``scipy.stats.bootstrap``, which adds a jackknife.
    Matched-size intervals need an m-out-of-n resample scipy does not offer
    (:func:`matched_ci_method`).

    Duplicated subjects inflate FID in a resample, so for small slices a percentile
    interval can sit above the point estimate; the report says so.

    Args:
        statistic: Metrics of batches of row sets (e.g. a :class:`FeatureStatistics`).
        metric_names: Metrics ``statistic`` returns.
        higher_is_better: Metric -> direction, for equity scaling and worst groups.
        slices: Slice name -> row indices (from :func:`define_slices`).
        attributes: Attribute -> groups; their slices are ``<attr>/<group>``.
        settings: Resamples, level, draws, small-slice threshold and seed.
        matched: Compute matched-sample-size values (sample-size-biased metrics such as FID).

    Returns:
        The analysis.
    """
    rng = np.random.default_rng(settings.seed)
    table = _point_estimates(statistic, metric_names, slices)
    small = [name for name, rows in slices.items() if len(rows) < settings.min_slice_size]
    # One generator feeds every resample in a fixed order: slices, then attributes, then matched sizes.
    resampled, replicates, intervals = _slice_intervals(statistic, metric_names, slices, table, settings, rng)
    equity: dict[str, dict[str, dict[str, float | str]]] = {m: {} for m in metric_names}
    equity_intervals: dict[str, dict[str, dict[str, list[float]]]] = {m: {} for m in metric_names}
    for attribute, names in attributes.items():
        keys = [f"{attribute}/{g}" for g in names]
        for metric in metric_names:
            equity[metric][attribute] = equity_scaled(
                table[OVERALL][metric],
                {g: table[k][metric] for g, k in zip(names, keys, strict=True)},
                higher_is_better[metric],
            )
        if settings.resamples > 0:
            points = {metric: equity[metric][attribute] for metric in metric_names}
            bounds = _attribute_intervals(
                statistic, metric_names, higher_is_better, slices, keys, (resampled, replicates), points, settings, rng
            )
            for metric in metric_names:
                equity_intervals[metric][attribute] = bounds[metric]

    matched_values: dict[str, MatchedEquity] = {}
    if matched and settings.matched_draws > 0:
        for attribute, names in attributes.items():
            matched_values[attribute] = _matched(
                statistic, metric_names, higher_is_better, slices, attribute, names, settings, rng
            )
    return SliceAnalysis(
        metric_names=list(metric_names),
        higher_is_better={m: bool(higher_is_better[m]) for m in metric_names},
        slices=table,
        intervals=intervals,
        equity=equity,
        equity_intervals=equity_intervals,
        matched=matched_values,
        small_slices=small,
    )


def _slice_intervals(
    statistic: Statistic,
    metric_names: Sequence[str],
    slices: Mapping[str, np.ndarray],
    table: Mapping[str, Mapping[str, float]],
    settings: SliceSettings,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], dict[str, dict[str, list[float]]]]:
    """Each slice resampled on its own: the resamples, their metrics, and every metric's interval."""
    resampled: dict[str, np.ndarray] = {}
    replicates: dict[str, dict[str, np.ndarray]] = {}
    intervals: dict[str, dict[str, list[float]]] = {}
    if settings.resamples <= 0:
        return resampled, replicates, intervals
    if settings.ci_method == "bca":
        return resampled, replicates, _bca_slice_intervals(statistic, metric_names, slices, settings, rng)
    level, method = settings.confidence_level, settings.ci_method
    with progress_bar(len(slices), "bootstrap", "slice") as bar:
        for name, rows in slices.items():
            resampled[name] = _resample(rng, rows, settings.resamples)
            replicates[name] = statistic(resampled[name])
            intervals[name] = {
                m: bootstrap_interval(replicates[name][m], level, table[name][m], method) for m in metric_names
            }
            bar.update()
    return resampled, replicates, intervals


def _bca_slice_intervals(
    statistic: Statistic,
    metric_names: Sequence[str],
    slices: Mapping[str, np.ndarray],
    settings: SliceSettings,
    rng: np.random.Generator,
) -> dict[str, dict[str, list[float]]]:
    """Each slice's BCa intervals: its subjects resampled, and left out one at a time, by scipy."""
    nan = [float("nan"), float("nan")]

    def quantities(batches: Sequence[np.ndarray]) -> np.ndarray:
        values = statistic(batches[0])
        return np.stack([values[m] for m in metric_names])

    intervals: dict[str, dict[str, list[float]]] = {}
    with progress_bar(len(slices), "bootstrap (BCa)", "slice") as bar:
        for name, rows in slices.items():
            bar.update()
            if len(rows) < 2:
                intervals[name] = {m: list(nan) for m in metric_names}
                continue
            bounds = bca_intervals([rows], quantities, settings.resamples, settings.confidence_level, rng)
            intervals[name] = {m: [float(b[0]), float(b[1])] for m, b in zip(metric_names, bounds, strict=True)}
    return intervals


def _attribute_intervals(
    statistic: Statistic,
    metric_names: Sequence[str],
    higher_is_better: Mapping[str, bool],
    slices: Mapping[str, np.ndarray],
    keys: Sequence[str],
    slice_resamples: tuple[Mapping[str, np.ndarray], Mapping[str, Mapping[str, np.ndarray]]],
    points: Mapping[str, Mapping[str, float | str]],
    settings: SliceSettings,
    rng: np.random.Generator,
) -> dict[str, dict[str, list[float]]]:
    """One attribute's ES, D, D/M and gap intervals: metric -> {stat: [low, high]}.

    ``slice_resamples`` (the slices' resamples and their metrics) are reused by the
    percentile methods; ``points`` are the estimates, metric -> equity stats.
    """
    if settings.ci_method == "bca":
        return _bca_equity_intervals(statistic, metric_names, higher_is_better, slices, keys, settings, rng)
    resampled, replicates = slice_resamples
    stratified = _stratified_replicates(
        statistic, metric_names, higher_is_better, slices, keys, resampled, replicates, settings, rng
    )
    level, method = settings.confidence_level, settings.ci_method
    return {
        metric: {s: bootstrap_interval(v, level, float(points[metric][s]), method) for s, v in stats.items()}
        for metric, stats in stratified.items()
    }


_EQUITY_STATS = ("es", "disparity", "relative_disparity", "max_gap")


def _bca_equity_intervals(
    statistic: Statistic,
    metric_names: Sequence[str],
    higher_is_better: Mapping[str, bool],
    slices: Mapping[str, np.ndarray],
    keys: Sequence[str],
    settings: SliceSettings,
    rng: np.random.Generator,
) -> dict[str, dict[str, list[float]]]:
    """BCa intervals of one attribute's equity stats, resampled stratified by group.

    The strata are the groups and the subjects in none of them; scipy resamples (and
    jackknifes) each stratum of two or more subjects, the others stay as they are.
    """
    listed = np.concatenate([slices[k] for k in keys])
    strata = [slices[k] for k in keys] + [np.setdiff1d(slices[OVERALL], listed)]
    varied = [i for i, rows in enumerate(strata) if len(rows) >= 2]

    def quantities(batches: Sequence[np.ndarray]) -> np.ndarray:
        count = len(batches[0])
        full = [np.broadcast_to(rows, (count, len(rows))) for rows in strata]
        for i, batch in zip(varied, batches, strict=True):
            full[i] = batch
        groups = [statistic(full[i]) for i in range(len(keys))]
        overall = statistic(np.concatenate(full, axis=1))
        stacked = []
        for metric in metric_names:
            stats = _equity_arrays(overall[metric], [g[metric] for g in groups], higher_is_better[metric])
            stacked += [stats[s] for s in _EQUITY_STATS]
        return np.stack(stacked)

    if varied:
        samples = [strata[i] for i in varied]
        bounds = bca_intervals(samples, quantities, settings.resamples, settings.confidence_level, rng)
    else:
        bounds = np.full((len(metric_names) * len(_EQUITY_STATS), 2), np.nan)
    pairs = iter(bounds)
    return {m: {s: [float(v) for v in next(pairs)] for s in _EQUITY_STATS} for m in metric_names}


def _stratified_replicates(
    statistic: Statistic,
    metric_names: Sequence[str],
    higher_is_better: Mapping[str, bool],
    slices: Mapping[str, np.ndarray],
    keys: Sequence[str],
    resampled: Mapping[str, np.ndarray],
    replicates: Mapping[str, Mapping[str, np.ndarray]],
    settings: SliceSettings,
    rng: np.random.Generator,
) -> dict[str, dict[str, np.ndarray]]:
    """Replicates of one attribute's ES, D, D/M and gap: metric -> {stat: values}.

    A stratified replicate's overall value is measured on the union of that replicate's
    group resamples (plus subjects in no listed group, resampled too).
    """
    listed = np.concatenate([slices[k] for k in keys])
    rest = np.setdiff1d(slices[OVERALL], listed)
    union = np.concatenate([resampled[k] for k in keys] + [_resample(rng, rest, settings.resamples)], axis=1)
    overall = statistic(union)
    return {
        metric: _equity_arrays(overall[metric], [replicates[k][metric] for k in keys], higher_is_better[metric])
        for metric in metric_names
    }


def _matched(
    statistic: Statistic,
    metric_names: Sequence[str],
    higher_is_better: Mapping[str, bool],
    slices: Mapping[str, np.ndarray],
    attribute: str,
    names: Sequence[str],
    settings: SliceSettings,
    rng: np.random.Generator,
) -> MatchedEquity:
    """Values of one attribute's groups, and of the overall set, at the smallest group's size.

    FID (and IS) of a sample depends on its size, so groups of unequal size are compared
    at a common size: each group and the overall set is subsampled without replacement
    to the smallest group's size, ``matched_draws`` times; values are averaged over the
    draws, and D, ES and the gap are computed from the averages. Intervals come from an
    m-out-of-n bootstrap (each group and the overall set resampled with replacement to
    that size).
    """
    members = {g: slices[f"{attribute}/{g}"] for g in names}
    usable = {g: rows for g, rows in members.items() if len(rows) >= 2}
    size = min((len(rows) for rows in usable.values()), default=0)
    nan = float("nan")
    keys = [*usable, OVERALL]
    pools = {**usable, OVERALL: slices[OVERALL]}
    values: dict[str, dict[str, float]] = {m: {g: nan for g in [*names, OVERALL]} for m in metric_names}
    intervals: dict[str, dict[str, list[float]]] = {m: {} for m in metric_names}
    equity: dict[str, dict[str, float | str]] = {}
    equity_intervals: dict[str, dict[str, list[float]]] = {m: {} for m in metric_names}
    if size < 2:
        for metric in metric_names:
            equity[metric] = equity_scaled(nan, {}, higher_is_better[metric])
        return MatchedEquity(size, settings.matched_draws, values, intervals, equity, equity_intervals)
    draws, level, method = settings.matched_draws, settings.confidence_level, matched_ci_method(settings.ci_method)
    per_draw: dict[str, dict[str, np.ndarray]] = {}
    for key in keys:
        rows = pools[key]
        picks = np.stack([rng.choice(rows, size=size, replace=False) for _ in range(draws)])
        per_draw[key] = statistic(picks)
    for metric in metric_names:
        for key in keys:
            values[metric][key] = (
                float(np.nanmean(per_draw[key][metric])) if np.isfinite(per_draw[key][metric]).any() else nan
            )
        equity[metric] = equity_scaled(
            values[metric][OVERALL], {g: values[metric][g] for g in names}, higher_is_better[metric]
        )
    if settings.resamples > 0:
        boot = {key: statistic(_resample(rng, pools[key], settings.resamples, size)) for key in keys}
        for metric in metric_names:
            intervals[metric] = {
                key: bootstrap_interval(boot[key][metric], level, values[metric][key], method) for key in keys
            }
            stats = _equity_arrays(boot[OVERALL][metric], [boot[g][metric] for g in usable], higher_is_better[metric])
            equity_intervals[metric] = {
                s: bootstrap_interval(v, level, float(equity[metric][s]), method) for s, v in stats.items()
            }
    return MatchedEquity(size, draws, values, intervals, equity, equity_intervals)
