"""Tests for FID, slice metrics and equity scaling."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import linalg

from fairdiffusion.metrics import (
    compute_slice_metrics,
    equity_scaled,
    fid_from_features,
    fid_metric_names,
    flatten_metrics,
    frechet_distance,
)

ATTRS = {"race": ["Asian", "Black", "White"], "gender": ["Female", "Male"]}


def reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    """From scratch: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))


def features(seed: int, n: int = 60, dim: int = 6, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * 0.3 + np.eye(dim)
    return (rng.normal(size=(n, dim)) @ mixing) * scale + shift


@pytest.mark.parametrize(("seed", "shift", "scale"), [(0, 0.0, 1.0), (1, 0.7, 1.0), (2, -1.5, 2.5), (3, 3.0, 0.2)])
def test_frechet_distance_matches_scipy_reference(seed: int, shift: float, scale: float) -> None:
    x, y = features(seed), features(seed + 100, shift=shift, scale=scale)
    expected = reference_fid(x, y)
    got = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert got == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(x, y) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_gaussians_is_zero() -> None:
    x = features(5)
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form_for_isotropic_gaussians() -> None:
    dim = 4
    mu1, mu2 = np.zeros(dim), np.full(dim, 2.0)
    s1, s2 = np.eye(dim) * 1.0, np.eye(dim) * 4.0
    # |mu1-mu2|^2 = 16; Tr(S1 + S2 - 2 sqrt(S1 S2)) = 4 * (1 + 4 - 2 * 2) = 4.
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(20.0, rel=1e-9)


def test_frechet_distance_is_finite_for_singular_covariances() -> None:
    x, y = features(7, n=3, dim=8), features(8, n=3, dim=8, shift=1.0)  # rank-2 covariances
    value = fid_from_features(x, y)
    assert math.isfinite(value) and value > 0


def test_fid_needs_two_samples_on_each_side() -> None:
    assert math.isnan(fid_from_features(features(0, n=1), features(1)))
    assert math.isnan(fid_from_features(features(0), features(1, n=0)))


def make_slices() -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(11)
    n = 40
    groups = pd.DataFrame(
        {
            "race": rng.choice(["Asian", "Black", "White"], size=n, p=[0.2, 0.3, 0.5]),
            "gender": rng.choice(["Female", "Male"], size=n),
        }
    )
    real = rng.normal(size=(n, 4))
    generated = rng.normal(size=(n, 4)) + (groups["race"] == "Black").to_numpy()[:, None] * 2.0
    return real, generated, groups


def test_slice_fid_uses_only_that_slices_rows() -> None:
    real, generated, groups = make_slices()
    slices = compute_slice_metrics(real, generated, groups, ATTRS)
    assert set(slices) == {"overall", "race/Asian", "race/Black", "race/White", "gender/Female", "gender/Male"}
    assert slices["overall"]["fid"] == pytest.approx(fid_from_features(real, generated), rel=1e-12)
    assert slices["overall"]["num_samples"] == 40.0
    for attribute, names in ATTRS.items():
        for group in names:
            mask = (groups[attribute] == group).to_numpy()
            entry = slices[f"{attribute}/{group}"]
            assert entry["num_samples"] == float(mask.sum())
            assert entry["fid"] == pytest.approx(reference_fid(real[mask], generated[mask]), rel=1e-6)
    # The shifted group is visibly the worst one.
    assert slices["race/Black"]["fid"] > max(slices["race/Asian"]["fid"], slices["race/White"]["fid"])


def test_absent_group_gives_nan_and_zero_samples() -> None:
    real, generated, groups = make_slices()
    slices = compute_slice_metrics(real, generated, groups, {"race": ["Asian", "Black", "White", "Other"]})
    assert slices["race/Other"]["num_samples"] == 0.0
    assert math.isnan(slices["race/Other"]["fid"])


def test_equity_scaled_lower_is_better() -> None:
    out = equity_scaled(10.0, {"a": 8.0, "b": 13.0, "c": 10.0}, higher_is_better=False)
    # D = |10-8| + |10-13| + 0 = 5; ES = 10 * (1 + 5) = 60.
    assert out["disparity"] == pytest.approx(5.0)
    assert out["es"] == pytest.approx(60.0)
    assert out["relative_disparity"] == pytest.approx(0.5)
    assert out["max_gap"] == pytest.approx(5.0)
    assert out["worst_group"] == "b"


def test_equity_scaled_higher_is_better() -> None:
    out = equity_scaled(0.8, {"a": 0.9, "b": 0.6}, higher_is_better=True)
    # D = 0.1 + 0.2 = 0.3; ES = 0.8 / 1.3.
    assert out["disparity"] == pytest.approx(0.3)
    assert out["es"] == pytest.approx(0.8 / 1.3)
    assert out["max_gap"] == pytest.approx(0.3)
    assert out["worst_group"] == "b"


def test_equity_scaled_without_disparity_equals_metric() -> None:
    out = equity_scaled(4.0, {"a": 4.0, "b": 4.0}, higher_is_better=False)
    assert out["es"] == 4.0 and out["disparity"] == 0.0 and out["max_gap"] == 0.0


def test_equity_scaled_skips_nan_groups() -> None:
    out = equity_scaled(10.0, {"a": 12.0, "b": float("nan"), "c": 9.0}, higher_is_better=False)
    assert out["disparity"] == pytest.approx(3.0)
    assert out["es"] == pytest.approx(40.0)
    assert out["max_gap"] == pytest.approx(3.0)
    assert out["worst_group"] == "a"


@pytest.mark.parametrize(
    ("overall", "groups"),
    [(float("nan"), {"a": 1.0}), (5.0, {}), (5.0, {"a": float("nan"), "b": float("inf")})],
)
def test_equity_scaled_all_nan(overall: float, groups: dict[str, float]) -> None:
    out = equity_scaled(overall, groups, higher_is_better=False)
    assert all(math.isnan(out[k]) for k in ("es", "disparity", "relative_disparity", "max_gap"))
    assert out["worst_group"] == ""


def test_equity_scaled_zero_overall_gives_nan_relative_disparity() -> None:
    out = equity_scaled(0.0, {"a": 0.0, "b": 1.0}, higher_is_better=False)
    assert out["es"] == 0.0 and out["disparity"] == 1.0
    assert math.isnan(out["relative_disparity"])


def test_flatten_metrics_names_carry_the_extractor() -> None:
    real, generated, groups = make_slices()
    slices = compute_slice_metrics(real, generated, groups, ATTRS)
    equity = {
        attribute: equity_scaled(slices["overall"]["fid"], {g: slices[f"{attribute}/{g}"]["fid"] for g in names}, False)
        for attribute, names in ATTRS.items()
    }
    flat = flatten_metrics(slices, equity, "randcnn32")
    assert flat["fid_randcnn32/overall"] == slices["overall"]["fid"]
    assert flat["fid_randcnn32/race/Black"] == slices["race/Black"]["fid"]
    assert flat["num_samples/gender/Male"] == slices["gender/Male"]["num_samples"]
    assert flat["es_fid_randcnn32/race"] == equity["race"]["es"]
    assert flat["fid_gap_randcnn32/gender"] == equity["gender"]["max_gap"]
    assert flat["fid_disparity_randcnn32/race"] == equity["race"]["disparity"]
    assert len(flat) == 2 * len(slices) + 3 * len(equity)
    fid_keys = [k for k in flat if not k.startswith("num_samples/")]
    assert fid_keys and all("randcnn32" in key for key in fid_keys)
    assert all(isinstance(v, float) for v in flat.values())


def test_fid_metric_names() -> None:
    assert fid_metric_names("inception_v3") == {
        "fid": "fid_inception_v3",
        "es_fid": "es_fid_inception_v3",
        "gap": "fid_gap_inception_v3",
        "disparity": "fid_disparity_inception_v3",
        "n": "num_samples",
    }
