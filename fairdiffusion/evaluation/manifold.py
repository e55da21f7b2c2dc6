"""Precision, recall and a diversity ratio in feature space, as pure functions of features.

Precision and recall follow Kynkäänniemi et al. 2019 ("Improved Precision and Recall
Metric for Assessing Generative Models", NeurIPS, Sec. 2): each feature set's manifold is
the union of balls around its points whose radius is the distance to the point's k-th
nearest neighbour in the same set (k = 3 by default, the paper's choice). Precision is
the share of generated points inside the real manifold (fidelity); recall the share of
real points inside the generated manifold (coverage). A model that collapses onto a few
modes keeps its precision and loses its recall, which is what repeated retraining on a
model's own output does first (Alemohammad et al. 2023; Mayer et al. 2024).

The diversity ratio is ``trace(cov(generated)) / trace(cov(real))``: 1 when the generated
features spread as much as the real ones, towards 0 as they collapse. Its closed form for
a refitted Gaussian is ``((n - 1) / n) ** t`` after t self-consuming generations.

As in :mod:`fairdiffusion.evaluation.image_metrics`, the ``_compute_*`` functions take
features and return numbers; :func:`compute_manifold_slices` is the wrapper that applies
them to the row sets of slices (torchmetrics keeps slicing apart from the metric too).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: The neighbourhood size of Kynkäänniemi et al. 2019 (their Sec. 3 settles on k = 3).
DEFAULT_K = 3
#: Metric names of this module, and whether higher is better (all three are).
MANIFOLD_METRICS: dict[str, bool] = {"precision": True, "recall": True, "diversity": True}


def _pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(len(x), len(y))``, in float64, never negative."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    squared = (x * x).sum(axis=1)[:, None] + (y * y).sum(axis=1)[None, :] - 2.0 * x @ y.T
    return np.sqrt(np.clip(squared, 0.0, None))


def _compute_knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Each point's distance to its k-th nearest neighbour in the same set (itself excluded)."""
    distances = _pairwise_distances(features, features)
    # Column 0 of the sorted row is the point itself (distance 0), so the k-th neighbour is column k.
    return np.sort(distances, axis=1)[:, k]


def _compute_coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Share of ``queries`` within the radius of at least one ``manifold`` point."""
    inside = _pairwise_distances(queries, manifold) <= radii[None, :]
    return float(inside.any(axis=1).mean())


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = DEFAULT_K) -> tuple[float, float]:
    """k-NN precision and recall of generated features against real ones (Kynkäänniemi et al. 2019).

    Args:
        real: Real features, one row per image.
        generated: Generated features, one row per image.
        k: Neighbourhood size of each manifold's balls.

    Returns:
        ``(precision, recall)``; both NaN when either set has k or fewer points (no k-th neighbour).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(real) <= k or len(generated) <= k:
        return float("nan"), float("nan")
    precision = _compute_coverage(real, _compute_knn_radii(real, k), generated)
    recall = _compute_coverage(generated, _compute_knn_radii(generated, k), real)
    return precision, recall


def _compute_total_variance(features: np.ndarray) -> float:
    centred = features.astype(np.float64) - features.mean(axis=0, dtype=np.float64)
    return float((centred * centred).sum() / (len(features) - 1))


def diversity_ratio(real: np.ndarray, generated: np.ndarray) -> float:
    """``trace(cov(generated)) / trace(cov(real))``; NaN with fewer than two of either or constant real features."""
    if len(real) < 2 or len(generated) < 2:
        return float("nan")
    real_variance = _compute_total_variance(real)
    if real_variance == 0:
        return float("nan")
    return _compute_total_variance(generated) / real_variance


def compute_manifold_slices(
    real: np.ndarray, generated: np.ndarray, slices: Mapping[str, np.ndarray], k: int = DEFAULT_K
) -> dict[str, dict[str, float]]:
    """Precision, recall and diversity ratio of every slice, from row-aligned feature sets.

    Args:
        real: Real test features, one row per test subject.
        generated: Features of the images generated from those subjects' prompts, row-aligned.
        slices: Slice name -> row indices (:func:`fairdiffusion.evaluation.slices.define_slices`).
        k: Neighbourhood size of the manifolds.

    Returns:
        ``{slice: {"precision": p, "recall": r, "diversity": d, "num_samples": n}}``.
    """
    table: dict[str, dict[str, float]] = {}
    for name, rows in slices.items():
        precision, recall = precision_recall(real[rows], generated[rows], k)
        table[name] = {
            "precision": precision,
            "recall": recall,
            "diversity": diversity_ratio(real[rows], generated[rows]),
            "num_samples": float(len(rows)),
        }
    return table
