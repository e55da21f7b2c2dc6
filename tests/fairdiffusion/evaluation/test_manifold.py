"""k-NN precision and recall, the diversity ratio, and their flat per-slice keys."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fairdiffusion.evaluation.manifold import (
    _compute_knn_radii,
    compute_manifold_slices,
    diversity_ratio,
    precision_recall,
)
from fairdiffusion.evaluation.metric_keys import flatten_manifold


def _cloud(n: int = 200, dim: int = 8, seed: int = 0, centre: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(centre, 1.0, size=(n, dim))


def test_identical_sets_have_full_precision_and_recall_and_unit_diversity() -> None:
    real = _cloud()
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert diversity_ratio(real, real.copy()) == pytest.approx(1.0)


def test_disjoint_far_clusters_have_zero_precision_and_recall() -> None:
    assert precision_recall(_cloud(), _cloud(seed=1, centre=100.0)) == (0.0, 0.0)


def test_collapsed_generated_set_keeps_precision_and_loses_recall_and_diversity() -> None:
    real = _cloud(dim=4)
    collapsed = 0.1 * _cloud(dim=4, seed=2)  # the same centre, a tenth of the spread
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9  # every generated point lies where real ones are dense
    assert recall < 0.2
    assert diversity_ratio(real, collapsed) < 0.1


def test_two_samples_from_one_distribution_score_high() -> None:
    precision, recall = precision_recall(_cloud(seed=3), _cloud(seed=4))
    assert precision > 0.7 and recall > 0.7
    assert diversity_ratio(_cloud(seed=3), _cloud(seed=4)) == pytest.approx(1.0, abs=0.2)


def test_diversity_ratio_is_the_variance_ratio() -> None:
    real = _cloud(n=2000, seed=5)
    assert diversity_ratio(real, 0.5 * real) == pytest.approx(0.25)


def test_knn_radius_is_the_kth_neighbour_excluding_the_point() -> None:
    points = np.array([[0.0], [1.0], [3.0], [6.0]])
    np.testing.assert_allclose(_compute_knn_radii(points, 1), [1.0, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(_compute_knn_radii(points, 3), [6.0, 5.0, 3.0, 6.0])


def test_too_few_points_give_nan_and_bad_k_raises() -> None:
    assert all(math.isnan(v) for v in precision_recall(_cloud(n=3), _cloud(n=3)))
    assert math.isnan(diversity_ratio(_cloud(n=1), _cloud(n=5)))
    assert math.isnan(diversity_ratio(np.zeros((5, 2)), _cloud(n=5, dim=2)))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(_cloud(), _cloud(), k=0)


def test_slices_and_flat_keys() -> None:
    real = _cloud(n=40)
    generated = real.copy()
    generated[30:] = 0.0  # the last ten rows (the small group) collapse to one point
    slices = {"overall": np.arange(40), "race/Asian": np.arange(30, 40), "race/White": np.arange(30)}
    table = compute_manifold_slices(real, generated, slices)
    assert table["race/White"] == {"precision": 1.0, "recall": 1.0, "diversity": 1.0, "num_samples": 30.0}
    assert table["race/Asian"]["diversity"] == 0.0
    assert table["race/Asian"]["recall"] < 0.5
    flat = flatten_manifold(table, "fundus-enc64")
    assert flat["recall_fundus-enc64/race/Asian"] == table["race/Asian"]["recall"]
    assert set(flat) == {f"{m}_fundus-enc64/{s}" for m in ("precision", "recall", "diversity") for s in slices}
