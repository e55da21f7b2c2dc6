"""Efron's BCa bootstrap intervals of statistics of row sets, through ``scipy.stats.bootstrap``.

The observations handed to scipy are *row indices* of the cached, paired features: one
index is one test subject (its real image and the image generated from its prompt), so
scipy resamples subjects with replacement and its jackknife leaves one subject out, which
is what a slice's FID, KID or AUC is a statistic of. A statistic of several samples (an
attribute's groups) is resampled stratified: scipy resamples each sample on its own and
jackknifes each in turn with the others fixed (``paired=False``).

The jackknife costs one evaluation of the statistic per subject on top of the resamples:
the slice-level cost is measured in the README (Intervals).

BCa corrects a bootstrap distribution that is off-centre by z0 = Phi^-1(share of resamples
below the estimate). A resample that repeats subjects inflates FID and KID so much that at
any realistic feature dimension *every* resample lies above the estimate (none of 100 to
400 resamples at d = 8 to 64, n = 20 to 2000): z0 is infinite and scipy returns NaN.
Where only a few resamples lie below, z0 is finite but extreme and BCa returns a narrow interval made of
the lowest resamples, which looks precise and is not. :func:`bca_intervals` therefore
reports no interval when the estimate lies outside the bootstrap distribution's own
central ``level`` range; for FID and KID use ``bias_shifted_percentile``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

RowStatistic = Callable[[Sequence[np.ndarray]], np.ndarray]
"""Maps one ``(B, n_j)`` index batch per sample to values ``(k, B)`` (k quantities at once)."""

# Bounds scipy's index batches (bootstrap and jackknife) to about 32 MB of int64.
_BATCH_INDICES = 4_000_000


def bca_intervals(
    samples: Sequence[np.ndarray],
    statistic: RowStatistic,
    resamples: int,
    level: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """BCa intervals of k quantities of row-index samples: ``(k, 2)``, NaN where undefined.

    Args:
        samples: Row indices, one array per stratum (each of two or more rows).
        statistic: The k quantities of one index batch per stratum (see :data:`RowStatistic`).
        resamples: Bootstrap resamples.
        level: Confidence level.
        rng: Draws the resamples.

    Returns:
        Low and high bound of each quantity. Both are NaN when any resample or
        leave-one-out sample gives no value (scipy propagates NaN), when the bootstrap
        distribution is degenerate, or when fewer than ``(1 - level) / 2`` of the resamples
        lie on one side of the estimate (see the module docstring).
    """
    largest = max(len(sample) for sample in samples)
    batch = max(1, min(resamples, _BATCH_INDICES // largest))
    with warnings.catch_warnings():
        # Undefined intervals come back as NaN, which the report shows as missing.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.bootstrap(
            tuple(np.asarray(sample, dtype=np.int64) for sample in samples),
            _vectorized(statistic),
            n_resamples=resamples,
            batch=batch,
            vectorized=True,
            paired=False,
            confidence_level=level,
            method="BCa",
            rng=rng,
        )
    low, high = np.asarray(result.confidence_interval.low), np.asarray(result.confidence_interval.high)
    bounds = np.stack([np.atleast_1d(low), np.atleast_1d(high)], axis=-1).astype(np.float64)
    estimate = np.asarray(statistic([np.asarray(sample)[None] for sample in samples]), dtype=np.float64)
    centred = _estimate_inside(np.asarray(result.bootstrap_distribution).reshape(len(bounds), -1), estimate, level)
    return np.where(np.isfinite(bounds) & centred[:, None], bounds, np.nan)


def _estimate_inside(distribution: np.ndarray, estimate: np.ndarray, level: float) -> np.ndarray:
    """Whether each estimate ``(k, 1)`` lies within its bootstrap distribution's central ``level`` range."""
    below = (distribution < estimate).mean(axis=-1) + 0.5 * (distribution == estimate).mean(axis=-1)
    tail = (1 - level) / 2
    return (below >= tail) & (below <= 1 - tail)


def _vectorized(statistic: RowStatistic) -> Callable[..., np.ndarray]:
    """scipy's calling convention: samples with any leading shape, observations on ``axis=-1``."""

    def call(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
        lead = np.broadcast_shapes(*(a.shape[:-1] for a in arrays))
        flat = [np.broadcast_to(a, (*lead, a.shape[-1])).reshape(-1, a.shape[-1]) for a in arrays]
        values = np.asarray(statistic(flat), dtype=np.float64)
        return values.reshape(values.shape[0], *lead)

    return call
