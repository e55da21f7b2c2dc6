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
``inception_v3``), ``<m>`` an image metric (``fid``, ``kid``, ``is``; ``is`` only where
the extractor has a classifier head), ``<c>`` the clinical classifier (``small``,
``efficientnet``, ``vit``) and ``<label>`` a prompted clinical label (``glaucoma``...):

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
  ``ci_high/K`` (the level is in the evaluation protocol, ``confidence_level``).

Every image-metric key carries the extractor's name, so a random-feature FID can never
be read as an Inception FID.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import linalg

OVERALL = "overall"
#: Image metrics and whether higher is better.
IMAGE_METRICS: dict[str, bool] = {"fid": False, "kid": False, "is": True}

Statistic = Callable[[np.ndarray], dict[str, np.ndarray]]
"""Maps row indices ``(B, n)`` (B resamples of one slice) to ``{metric: values (B,)}``."""

# Keep one batch of per-resample matrices under ~160 MB of float64.
_BATCH_ELEMENTS = 20_000_000
# Kernel matrices are cached for up to this many images (3 x N^2 float64: 400 MB at 4096).
_MAX_CACHED_KERNEL = 4096


# --- Fréchet distance -------------------------------------------------------------------


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between two Gaussians: |mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).

    The reference form on summary statistics (as in the reference FID code): when the
    product is near-singular, a small multiple of the identity is added before sqrtm.
    Slices use :func:`fid_from_features`, which is exact and much faster on features.
    """
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Small slices give singular covariances; the offset below handles them.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _frechet_batch(real: np.ndarray, generated: np.ndarray, device: str = "cpu") -> np.ndarray:
    """FID of B pairs of feature sets at once: ``(B, n, d)`` and ``(B, m, d)`` -> ``(B,)``.

    Hand-written, not torchmetrics' or scipy's, because a slice evaluation needs
    thousands of FIDs (slices x bootstrap resamples x matched draws) on cached features
    and a d x d ``sqrtm`` each (seconds at d = 2048) would dominate. The trace term is
    computed exactly without it: with centred features X (n x d) and Y (m x d),
    Tr((S_x S_y)^1/2) is the sum of the singular values of X Y^T / sqrt((n-1)(m-1)) (the
    non-zero eigenvalues of S_x S_y are those of (X Y^T)(X Y^T)^T), an n x m problem when
    slices are smaller than the feature dimension; otherwise the same singular values
    come from R_x R_y^T (QR, X = Q_x R_x), at most d x d. Tested against the scipy
    ``sqrtm`` reference and torchmetrics.
    """
    n, m, dim = real.shape[1], generated.shape[1], real.shape[2]
    mu_r, mu_g = real.mean(axis=1), generated.mean(axis=1)
    xr, xg = real - mu_r[:, None, :], generated - mu_g[:, None, :]
    mean_term = np.sum((mu_r - mu_g) ** 2, axis=-1)
    trace_r = np.einsum("bij,bij->b", xr, xr) / (n - 1)
    trace_g = np.einsum("bij,bij->b", xg, xg) / (m - 1)
    # numpy's batched QR and SVD are fast on small matrices and very slow on large ones
    # (0.5 s for one 100 x 2048 QR); torch's are the other way round, and can use a GPU.
    if dim > _TORCH_FROM_DIM or device != "cpu":
        singular = _singular_values_torch(xr, xg, device)
    else:
        cross = np.matmul(xr, xg.transpose(0, 2, 1)) if min(n, m) <= dim else _qr_cross_numpy(xr, xg)
        singular = np.linalg.svd(cross, compute_uv=False)
    root_trace = singular.sum(axis=-1) / math.sqrt((n - 1) * (m - 1))
    return mean_term + trace_r + trace_g - 2 * root_trace


_TORCH_FROM_DIM = 256


def _qr_cross_numpy(xr: np.ndarray, xg: np.ndarray) -> np.ndarray:
    r_r = np.asarray(np.linalg.qr(xr, mode="r"))
    r_g = np.asarray(np.linalg.qr(xg, mode="r"))
    return np.matmul(r_r, r_g.transpose(0, 2, 1))


def _singular_values_torch(xr: np.ndarray, xg: np.ndarray, device: str) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(xr)).to(device)
    y = torch.from_numpy(np.ascontiguousarray(xg)).to(device)
    if min(x.shape[1], y.shape[1]) <= x.shape[2]:
        return torch.linalg.svdvals(x @ y.transpose(1, 2)).cpu().numpy()
    # torch's batched QR is slow on the CPU; the symmetric square root of X^T X is another
    # factor F with X = Q F (Q orthonormal), and the singular values of F_x F_y are the
    # square roots of the eigenvalues of F_x (Y^T Y) F_x.
    w, v = torch.linalg.eigh(x.transpose(1, 2) @ x)
    root = (v * w.clamp(min=0).sqrt()[:, None, :]) @ v.transpose(1, 2)
    inner = root @ (y.transpose(1, 2) @ y) @ root
    return torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().cpu().numpy()


def fid_from_features(real: np.ndarray, generated: np.ndarray) -> float:
    """FID between two feature sets (rows are images). Needs two or more of each."""
    if len(real) < 2 or len(generated) < 2:
        return float("nan")
    return float(_frechet_batch(real[None].astype(np.float64), generated[None].astype(np.float64))[0])


# --- KID and IS -------------------------------------------------------------------------


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> np.ndarray:
    """KID's kernel k(x, y) = (x.y / d + coef)^degree (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def kid_from_features(real: np.ndarray, generated: np.ndarray) -> float:
    """Unbiased KID (squared MMD, cubic polynomial kernel) between equal-sized feature sets.

    The unbiased estimator has no sample-size bias, so small minority groups are not
    penalised for their size the way FID penalises them. Computed on the whole slice
    (no random subsets), so it is deterministic. Hand-written rather than torchmetrics'
    ``KernelInceptionDistance`` (which draws random subsets of images it extracts
    itself) so the kernel matrices are computed once and indexed per slice and per
    resample; the estimator is torchmetrics' ``poly_mmd``, and is tested against it.
    """
    if len(real) != len(generated):
        raise ValueError("KID here compares paired sets of equal size")
    if len(real) < 2:
        return float("nan")
    k_rr = polynomial_kernel(real, real)
    k_gg = polynomial_kernel(generated, generated)
    k_rg = polynomial_kernel(real, generated)
    return float(_mmd_from_kernels(k_rr[None], k_gg[None], k_rg[None])[0])


def _mmd_from_kernels(k_rr: np.ndarray, k_gg: np.ndarray, k_rg: np.ndarray) -> np.ndarray:
    """Unbiased squared MMD from batched kernel blocks ``(B, n, n)`` (same estimator as
    torchmetrics' ``maximum_mean_discrepancy``)."""
    n = k_rr.shape[1]
    diag_rr = np.trace(k_rr, axis1=1, axis2=2)
    diag_gg = np.trace(k_gg, axis1=1, axis2=2)
    within = (k_rr.sum(axis=(1, 2)) - diag_rr + k_gg.sum(axis=(1, 2)) - diag_gg) / (n * (n - 1))
    return within - 2 * k_rg.sum(axis=(1, 2)) / (n * n)


def inception_score(logits: np.ndarray) -> float:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of one set of images, in one split.

    One split (not the usual ten): minority slices are too small to split. Computed
    from cached logits (torchmetrics' ``InceptionScore`` re-runs the network on images),
    so every slice and resample costs no extraction; tested against torchmetrics.
    """
    if len(logits) < 2:
        return float("nan")
    log_p = _log_softmax(logits)
    return float(_inception_score_batch(log_p[None])[0])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _inception_score_batch(log_p: np.ndarray) -> np.ndarray:
    p = np.exp(log_p)
    log_marginal = np.log(p.mean(axis=1, keepdims=True))
    kl = np.sum(p * (log_p - log_marginal), axis=-1).mean(axis=1)
    return np.exp(kl)


# --- Metrics of many slices from one set of features ---------------------------------------


class FeatureStatistics:
    """FID, KID (and IS) of any set of rows of cached, paired features.

    Row i of ``real`` is the real test image of subject i and row i of ``generated`` the
    image generated from that subject's prompt; a slice, a bootstrap resample or a
    matched-size draw is a set of row indices, evaluated in batches.

    Args:
        real: Real-image features (N x d).
        generated: Generated-image features (N x d), row-aligned with ``real``.
        generated_logits: Classifier logits of the generated images (N x classes), for
            IS; ``None`` when the extractor has no classifier head.
        device: Torch device for the large linear algebra of high-dimensional features.
    """

    def __init__(
        self,
        real: np.ndarray,
        generated: np.ndarray,
        generated_logits: np.ndarray | None = None,
        device: str = "cpu",
    ) -> None:
        if real.shape != generated.shape:
            raise ValueError(f"real {real.shape} and generated {generated.shape} features must be paired")
        self.real = np.asarray(real, dtype=np.float64)
        self.generated = np.asarray(generated, dtype=np.float64)
        self.log_probs = None if generated_logits is None else _log_softmax(np.asarray(generated_logits, np.float64))
        self.metric_names = ["fid", "kid"] + ([] if self.log_probs is None else ["is"])
        self.device = device
        self._kernels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if len(self.real) <= _MAX_CACHED_KERNEL:
            self._kernels = (
                polynomial_kernel(self.real, self.real),
                polynomial_kernel(self.generated, self.generated),
                polynomial_kernel(self.real, self.generated),
            )

    def __call__(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics of B row sets of equal size: ``index`` is ``(B, n)``; returns ``{metric: (B,)}``."""
        index = np.asarray(index, dtype=np.int64)
        count, n = index.shape
        nan = np.full(count, np.nan)
        if n < 2:
            return {name: nan.copy() for name in self.metric_names}
        dim = self.real.shape[1]
        per_item = max(n * dim, n * n) * 3
        step = max(1, _BATCH_ELEMENTS // per_item)
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.metric_names}
        for start in range(0, count, step):
            rows = index[start : start + step]
            out["fid"].append(_frechet_batch(self.real[rows], self.generated[rows], self.device))
            out["kid"].append(self._kid(rows))
            if self.log_probs is not None:
                out["is"].append(_inception_score_batch(self.log_probs[rows]))
        return {name: np.concatenate(values) for name, values in out.items()}

    def _kid(self, rows: np.ndarray) -> np.ndarray:
        if self._kernels is not None:
            k_rr, k_gg, k_rg = self._kernels
            pick = (rows[:, :, None], rows[:, None, :])
            return _mmd_from_kernels(k_rr[pick], k_gg[pick], k_rg[pick])
        real, generated = self.real[rows], self.generated[rows]
        dim = real.shape[2]

        def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return (np.matmul(a, b.transpose(0, 2, 1)) / dim + 1.0) ** 3

        return _mmd_from_kernels(kernel(real, real), kernel(generated, generated), kernel(real, generated))


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
        ci_method: ``bias_corrected`` or ``percentile`` (see :func:`_interval`).
    """

    resamples: int = 1000
    confidence_level: float = 0.95
    matched_draws: int = 20
    min_slice_size: int = 10
    seed: int = 0
    ci_method: str = "bias_corrected"


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


def _interval(replicates: np.ndarray, level: float, point: float, method: str) -> list[float]:
    """A bootstrap interval from replicates of a statistic whose estimate is ``point``.

    ``percentile``: the replicates' percentiles. ``bias_corrected``: the same percentiles
    shifted by the bootstrap's estimate of bias, mean(replicates) - point (Efron and
    Tibshirani 1993, Sec. 10.2). FID and D = sum |M - M_g| are biased upwards in a
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
    if method == "bias_corrected":
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
    """Every slice's metrics with percentile bootstrap intervals, equity, and matched sizes.

    Intervals resample subjects (a real image with the image generated from its prompt)
    with replacement. Each slice is resampled on its own; an attribute's ES, D, D/M and
    largest gap are resampled stratified by group, with the overall value computed on
    the union of the groups' resamples, so every number in one replicate comes from the
    same resampled subjects. Written here rather than with ``scipy.stats.bootstrap``
    because that stratified replicate must feed many metrics and derived values at once,
    and the matched-size intervals need an m-out-of-n resample scipy does not offer.

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
    level, resamples, method = settings.confidence_level, settings.resamples, settings.ci_method
    table = _point_estimates(statistic, metric_names, slices)
    small = [name for name, rows in slices.items() if len(rows) < settings.min_slice_size]

    intervals: dict[str, dict[str, list[float]]] = {}
    resampled: dict[str, np.ndarray] = {}
    replicates: dict[str, dict[str, np.ndarray]] = {}
    if resamples > 0:
        for name, rows in slices.items():
            resampled[name] = _resample(rng, rows, resamples)
            replicates[name] = statistic(resampled[name])
            intervals[name] = {m: _interval(replicates[name][m], level, table[name][m], method) for m in metric_names}

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
        if resamples > 0:
            # A stratified replicate's overall value is measured on the union of that
            # replicate's group resamples (plus subjects in no listed group, resampled too).
            listed = np.concatenate([slices[k] for k in keys])
            rest = np.setdiff1d(slices[OVERALL], listed)
            union = np.concatenate([resampled[k] for k in keys] + [_resample(rng, rest, resamples)], axis=1)
            overall = statistic(union)
            for metric in metric_names:
                stats = _equity_arrays(overall[metric], [replicates[k][metric] for k in keys], higher_is_better[metric])
                point = equity[metric][attribute]
                equity_intervals[metric][attribute] = {
                    s: _interval(v, level, float(point[s]), method) for s, v in stats.items()
                }

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
    draws, level, method = settings.matched_draws, settings.confidence_level, settings.ci_method
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
            intervals[metric] = {key: _interval(boot[key][metric], level, values[metric][key], method) for key in keys}
            stats = _equity_arrays(boot[OVERALL][metric], [boot[g][metric] for g in usable], higher_is_better[metric])
            equity_intervals[metric] = {
                s: _interval(v, level, float(equity[metric][s]), method) for s, v in stats.items()
            }
    return MatchedEquity(size, draws, values, intervals, equity, equity_intervals)


# --- Flat metric keys -------------------------------------------------------------------------


def fid_metric_names(extractor: str) -> dict[str, str]:
    """The metric-name stems used in MLflow for one extractor (the gate's keys)."""
    return {
        "fid": f"fid_{extractor}",
        "es_fid": f"es_fid_{extractor}",
        "gap": f"fid_gap_{extractor}",
        "disparity": f"fid_disparity_{extractor}",
        "n": "num_samples",
    }


def metric_key_stems(metric: str, tag: str) -> dict[str, str]:
    """Key stems of one metric: ``metric_key_stems("fid", "randcnn32")["es"] == "es_fid_randcnn32"``.

    ``tag`` is the extractor's name for image metrics and ``<classifier>/<label>`` for AUC.
    """
    return {
        "value": f"{metric}_{tag}",
        "es": f"es_{metric}_{tag}",
        "disparity": f"{metric}_disparity_{tag}",
        "relative_disparity": f"{metric}_rel_disparity_{tag}",
        "max_gap": f"{metric}_gap_{tag}",
        "matched": f"{metric}_matched_{tag}",
        "matched_overall": f"{metric}_matched_overall_{tag}",
        "es_matched": f"es_{metric}_matched_{tag}",
        "disparity_matched": f"{metric}_disparity_matched_{tag}",
        "relative_disparity_matched": f"{metric}_rel_disparity_matched_{tag}",
        "max_gap_matched": f"{metric}_gap_matched_{tag}",
    }


_EQUITY_STATS = ("es", "disparity", "relative_disparity", "max_gap")


def flatten_analysis(analysis: SliceAnalysis, tags: Mapping[str, tuple[str, str]]) -> dict[str, float]:
    """MLflow-ready metrics of an analysis, with ``ci_low/K`` and ``ci_high/K`` beside each K.

    Args:
        analysis: The analysis to flatten.
        tags: Analysis metric -> (key metric name, tag): ``{"fid": ("fid", "randcnn32")}``
            for image metrics, ``{"glaucoma": ("auc", "small/glaucoma")}`` for AUC.
    """
    flat: dict[str, float] = {}

    def put(key: str, value: float | str, interval: Sequence[float] | None = None) -> None:
        flat[key] = float(value)
        if interval is not None:
            flat[f"ci_low/{key}"], flat[f"ci_high/{key}"] = float(interval[0]), float(interval[1])

    for metric in analysis.metric_names:
        name, tag = tags[metric]
        stems = metric_key_stems(name, tag)
        for slice_name, values in analysis.slices.items():
            put(f"{stems['value']}/{slice_name}", values[metric], analysis.intervals.get(slice_name, {}).get(metric))
        for attribute, stats in analysis.equity[metric].items():
            bounds = analysis.equity_intervals.get(metric, {}).get(attribute, {})
            for stat in _EQUITY_STATS:
                put(f"{stems[stat]}/{attribute}", stats[stat], bounds.get(stat))
        for attribute, matched in analysis.matched.items():
            bounds_of = matched.intervals.get(metric, {})
            for group, value in matched.values[metric].items():
                key = (
                    f"{stems['matched_overall']}/{attribute}"
                    if group == OVERALL
                    else f"{stems['matched']}/{attribute}/{group}"
                )
                put(key, value, bounds_of.get(group))
            stats, bounds = matched.equity[metric], matched.equity_intervals.get(metric, {})
            for stat in _EQUITY_STATS:
                put(f"{stems[stat + '_matched']}/{attribute}", stats[stat], bounds.get(stat))
    return flat


def flatten_slice_sizes(analysis: SliceAnalysis) -> dict[str, float]:
    """``num_samples/<slice>``, ``small_slice/<slice>`` and ``matched_n/<attr>``."""
    flat = {f"num_samples/{name}": float(values["num_samples"]) for name, values in analysis.slices.items()}
    flat |= {f"small_slice/{name}": float(name in analysis.small_slices) for name in analysis.slices}
    flat |= {f"matched_n/{attribute}": float(m.size) for attribute, m in analysis.matched.items()}
    return flat


def flatten_metrics(
    slices: Mapping[str, Mapping[str, float]],
    equity: Mapping[str, Mapping[str, float | str]],
    extractor: str,
) -> dict[str, float]:
    """The FID keys the gate reads: ``fid_<x>/overall``, ``fid_<x>/race/Asian``, ``es_fid_<x>/race``..."""
    names = fid_metric_names(extractor)
    flat: dict[str, float] = {}
    for slice_name, values in slices.items():
        flat[f"{names['fid']}/{slice_name}"] = float(values["fid"])
        flat[f"{names['n']}/{slice_name}"] = float(values["num_samples"])
    for attribute, scaled in equity.items():
        flat[f"{names['es_fid']}/{attribute}"] = float(scaled["es"])
        flat[f"{names['gap']}/{attribute}"] = float(scaled["max_gap"])
        flat[f"{names['disparity']}/{attribute}"] = float(scaled["disparity"])
    return flat
