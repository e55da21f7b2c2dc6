"""Tests for FID, KID, IS, slices, equity scaling, intervals and matched sample sizes."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import linalg

from fairdiffusion.evaluation.image_metrics import (
    IMAGE_METRICS,
    INCEPTION_SCORE,
    FeatureStatistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid_from_features,
)
from fairdiffusion.evaluation.metric_keys import (
    fid_metric_names,
    flatten_analysis,
    flatten_metrics,
    flatten_slice_sizes,
)
from fairdiffusion.evaluation.slices import (
    SliceAnalysis,
    SliceSettings,
    analyse_slices,
    compute_slice_metrics,
    define_slices,
    equity_scaled,
    matched_ci_method,
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


# --- Reference checks of the fast paths -----------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "m", "dim"), [(10, 10, 32), (12, 30, 40), (80, 50, 16), (300, 300, 8), (40, 60, 300), (330, 320, 300)]
)
def test_fid_matches_scipy_reference_in_every_regime(n: int, m: int, dim: int) -> None:
    """Slices smaller and larger than the feature dimension, equal and unequal sizes, and
    features wide enough (d > 256) to take the torch path."""
    x, y = features(n, n=n, dim=dim), features(n + 1, n=m, dim=dim, shift=0.4, scale=1.3)
    assert fid_from_features(x, y) == pytest.approx(reference_fid(x, y), rel=1e-6)


def test_fid_matches_torchmetrics_on_the_same_features() -> None:
    torchmetrics_fid = pytest.importorskip("torchmetrics.image.fid")
    import torch

    class Identity(torch.nn.Module):
        """Hands torchmetrics the cached features as if it had extracted them."""

        num_features = 12

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    metric = torchmetrics_fid.FrechetInceptionDistance(feature=Identity())
    for seed, n in [(21, 40), (22, 7)]:  # the 7-image slice has a singular covariance
        x, y = features(seed, n=n, dim=12), features(seed + 50, n=n, dim=12, shift=0.3)
        metric.reset()
        metric.update(torch.from_numpy(x), real=True)
        metric.update(torch.from_numpy(y), real=False)
        assert fid_from_features(x, y) == pytest.approx(float(metric.compute()), rel=1e-6)


def kid_from_scratch(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 written as the double sums of Bińkowski et al. (2018), eq. 4."""
    n, d = len(x), x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float((a @ b / d + 1) ** 3)

    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    return xx + yy - 2 * xy


def test_kid_matches_the_definition_and_torchmetrics() -> None:
    x, y = features(31, n=15, dim=5), features(32, n=15, dim=5, shift=0.5)
    assert kid_from_features(x, y) == pytest.approx(kid_from_scratch(x, y), rel=1e-9)
    kid = pytest.importorskip("torchmetrics.image.kid")
    import torch

    reference = float(kid.poly_mmd(torch.from_numpy(x), torch.from_numpy(y)))
    assert kid_from_features(x, y) == pytest.approx(reference, rel=1e-9)


def test_kid_is_unbiased_where_fid_grows_as_the_sample_shrinks() -> None:
    """Same distribution on both sides: KID averages to ~0 at any size, FID does not."""
    small_kid, small_fid, large_fid = [], [], []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
        small_kid.append(kid_from_features(x, y))
        small_fid.append(fid_from_features(x, y))
        large_fid.append(fid_from_features(rng.normal(size=(200, 4)), rng.normal(size=(200, 4))))
    assert abs(np.mean(small_kid)) < 0.5 * np.std(small_kid)
    assert np.mean(small_fid) > 5 * np.mean(large_fid)


def test_inception_score_matches_torchmetrics_and_the_closed_form() -> None:
    rng = np.random.default_rng(41)
    logits = rng.normal(size=(30, 10)) * 3
    # Confident, evenly spread predictions over k classes score k.
    confident = np.full((20, 5), -50.0)
    confident[np.arange(20), np.arange(20) % 5] = 50.0
    assert inception_score(confident) == pytest.approx(5.0, rel=1e-6)
    inception = pytest.importorskip("torchmetrics.image.inception")
    import torch

    class Logits(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.warns(UserWarning):
        metric = inception.InceptionScore(feature=Logits(), splits=1)
    metric.update(torch.from_numpy(logits))
    assert inception_score(logits) == pytest.approx(float(metric.compute()[0]), rel=1e-6)
    # torchmetrics' default, ten splits of 3 images here, scores far lower: the split size
    # changes the number, which is why every key names the one split (is_1split_...).
    with pytest.warns(UserWarning):
        ten = inception.InceptionScore(feature=Logits())
    ten.update(torch.from_numpy(logits))
    assert float(ten.compute()[0]) < 0.7 * inception_score(logits)
    assert INCEPTION_SCORE == "is_1split"


# --- Slices, intersections and the batched statistics -----------------------------------------------

ALL_ATTRS = {
    "race": ["Asian", "Black", "White"],
    "gender": ["Female", "Male"],
    "ethnicity": ["Non-Hispanic", "Hispanic"],
}


def make_population(n: int = 90, seed: int = 12) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    groups = pd.DataFrame(
        {
            "race": rng.choice(["Asian", "Black", "White"], size=n, p=[0.15, 0.25, 0.6]),
            "gender": rng.choice(["Female", "Male"], size=n),
            "ethnicity": rng.choice(["Non-Hispanic", "Hispanic"], size=n, p=[0.85, 0.15]),
        }
    )
    real = rng.normal(size=(n, 5))
    generated = rng.normal(size=(n, 5)) + (groups["race"] == "Black").to_numpy()[:, None] * 1.5
    return real, generated, groups


def test_intersections_are_every_combination_and_partition_the_rows() -> None:
    _, _, groups = make_population()
    slices = define_slices(groups, ALL_ATTRS, intersections=True)
    pairs = 3 * 2 + 3 * 2 + 2 * 2
    assert len(slices) == 1 + 7 + pairs + 12
    assert "race/Black/gender/Female/ethnicity/Hispanic" in slices
    assert "gender/Male/ethnicity/Hispanic" in slices
    triples = [k for k in slices if k.count("/") == 5]
    assert sorted(np.concatenate([slices[k] for k in triples]).tolist()) == list(range(len(groups)))
    mask = (groups["race"] == "Black") & (groups["gender"] == "Female")
    assert slices["race/Black/gender/Female"].tolist() == np.flatnonzero(mask).tolist()


def test_every_slice_fid_and_kid_equal_those_computed_from_scratch_on_that_slice() -> None:
    """Including intersections: values served from the one feature cache are the per-slice ones."""
    real, generated, groups = make_population()
    table = compute_slice_metrics(real, generated, groups, ALL_ATTRS, intersections=True)
    slices = define_slices(groups, ALL_ATTRS, intersections=True)
    checked = 0
    for name, rows in slices.items():
        assert table[name]["num_samples"] == len(rows)
        if len(rows) >= 2:
            assert table[name]["fid"] == pytest.approx(reference_fid(real[rows], generated[rows]), rel=1e-6)
            assert table[name]["kid"] == pytest.approx(kid_from_features(real[rows], generated[rows]), rel=1e-9)
            checked += 1
        else:
            assert math.isnan(table[name]["fid"]) and math.isnan(table[name]["kid"])
    assert checked > 20


def test_feature_statistics_batches_equal_one_at_a_time() -> None:
    real, generated, _ = make_population()
    logits = np.random.default_rng(3).normal(size=(len(real), 7))
    statistics = FeatureStatistics(real, generated, logits)
    index = np.random.default_rng(4).integers(0, len(real), size=(6, 25))
    batch = statistics(index)
    assert statistics.metric_names == ["fid", "kid", "is_1split"] == list(IMAGE_METRICS)
    for b, rows in enumerate(index):
        assert batch["fid"][b] == pytest.approx(fid_from_features(real[rows], generated[rows]), rel=1e-9)
        assert batch["kid"][b] == pytest.approx(kid_from_features(real[rows], generated[rows]), rel=1e-9)
        assert batch[INCEPTION_SCORE][b] == pytest.approx(inception_score(logits[rows]), rel=1e-9)


def test_feature_statistics_rejects_unpaired_features() -> None:
    with pytest.raises(ValueError, match="paired"):
        FeatureStatistics(np.zeros((4, 3)), np.zeros((5, 3)))


# --- Intervals, equity and matched sample sizes ------------------------------------------------------


def analyse(settings: SliceSettings, seed: int = 12) -> SliceAnalysis:
    real, generated, groups = make_population(seed=seed)
    statistics = FeatureStatistics(real, generated)
    slices = define_slices(groups, ALL_ATTRS, intersections=True)
    return analyse_slices(statistics, statistics.metric_names, IMAGE_METRICS, slices, ALL_ATTRS, settings)


def test_analysis_is_seeded_and_intervals_surround_the_estimates() -> None:
    settings = SliceSettings(resamples=150, matched_draws=5, min_slice_size=10, seed=3)
    first, again = analyse(settings), analyse(settings)
    assert json.dumps(first.to_dict()) == json.dumps(again.to_dict())  # NaN-safe equality
    other = analyse(SliceSettings(resamples=150, matched_draws=5, min_slice_size=10, seed=4))
    assert other.intervals["overall"]["fid"] != first.intervals["overall"]["fid"]
    assert json.dumps(other.slices) == json.dumps(first.slices)  # estimates do not depend on the seed
    for name in ("overall", "race/White", "gender/Female", "ethnicity/Non-Hispanic"):
        for metric in ("fid", "kid"):
            low, high = first.intervals[name][metric]
            assert low <= first.slices[name][metric] <= high, (name, metric)
    fid_race = first.equity_intervals["fid"]["race"]
    assert set(fid_race) == {"es", "disparity", "relative_disparity", "max_gap"}
    assert fid_race["max_gap"][0] <= first.equity["fid"]["race"]["max_gap"] <= fid_race["max_gap"][1]
    assert first.equity["fid"]["race"]["worst_group"] == "Black"
    assert first.worst_groups("fid")["race"] == "Black"


def test_small_slices_are_flagged_and_tiny_ones_have_no_interval() -> None:
    analysis = analyse(SliceSettings(resamples=50, matched_draws=0, min_slice_size=10))
    sizes = {name: v["num_samples"] for name, v in analysis.slices.items()}
    assert analysis.small_slices == [name for name, n in sizes.items() if n < 10]
    assert "overall" not in analysis.small_slices
    tiny = [name for name, n in sizes.items() if n < 2]
    assert tiny, "the population has intersections with fewer than two subjects"
    for name in tiny:
        assert all(math.isnan(v) for v in analysis.intervals[name]["fid"])
    assert analysis.matched == {}


def test_no_resamples_means_no_intervals() -> None:
    analysis = analyse(SliceSettings(resamples=0, matched_draws=3))
    assert analysis.intervals == {} and analysis.equity_intervals["fid"] == {}
    assert analysis.matched["race"].intervals["fid"] == {}
    assert math.isfinite(analysis.equity["fid"]["race"]["es"])


def test_matched_sample_size_removes_the_size_bias_of_fid() -> None:
    """Two groups from the same distributions, 12 and 108 subjects: at full size the small
    group's FID is far worse only because it is small; at matched size the gap shrinks."""
    rng = np.random.default_rng(5)
    n = 120
    groups = pd.DataFrame({"site": ["small"] * 12 + ["large"] * 108})
    real, generated = rng.normal(size=(n, 6)), rng.normal(size=(n, 6)) + 0.2
    statistics = FeatureStatistics(real, generated)
    attrs = {"site": ["small", "large"]}
    slices = define_slices(groups, attrs)
    analysis = analyse_slices(
        statistics, ["fid"], IMAGE_METRICS, slices, attrs, SliceSettings(resamples=60, matched_draws=30, seed=1)
    )
    matched = analysis.matched["site"]
    assert matched.size == 12
    # All 12 of the smallest group are drawn every time: its matched value is its full-size value.
    assert matched.values["fid"]["small"] == pytest.approx(analysis.slices["site/small"]["fid"], rel=1e-9)
    full_gap = analysis.equity["fid"]["site"]["max_gap"]
    assert float(matched.equity["fid"]["max_gap"]) < 0.35 * float(full_gap)
    assert matched.values["fid"]["overall"] > analysis.slices["overall"]["fid"]  # FID grows as n shrinks
    low, high = matched.intervals["fid"]["large"]
    assert low <= matched.values["fid"]["large"] <= high


def test_bias_shifted_percentile_interval_shifts_percentiles_by_the_bootstrap_bias() -> None:
    from fairdiffusion.evaluation.slices import bootstrap_interval

    replicates = np.linspace(11.0, 13.0, 101)  # centred on 12, the estimate is 10
    assert bootstrap_interval(replicates, 0.9, 10.0, "percentile") == pytest.approx([11.1, 12.9])
    assert bootstrap_interval(replicates, 0.9, 10.0, "bias_shifted_percentile") == pytest.approx([9.1, 10.9])
    # clipped: a non-negative quantity
    assert bootstrap_interval(replicates, 0.9, 0.2, "bias_shifted_percentile")[0] == 0.0
    mostly_nan = np.array([1.0, 2.0] + [np.nan] * 8)
    assert all(math.isnan(v) for v in bootstrap_interval(mostly_nan, 0.9, 1.5, "percentile"))


def test_bca_of_a_slice_is_scipys_bca_over_its_subjects() -> None:
    """The overall slice's BCa interval is scipy's, with FID as a plain function of resampled subjects."""
    from scipy import stats

    real, generated, _ = make_population()
    analysis = analyse(SliceSettings(resamples=120, matched_draws=0, seed=7, ci_method="bca"))
    direct = stats.bootstrap(
        (np.arange(len(real)),),
        lambda rows: fid_from_features(real[rows], generated[rows]),
        n_resamples=120,
        vectorized=False,
        method="BCa",
        rng=np.random.default_rng(7),  # the overall slice is the first one resampled
    )
    interval = direct.confidence_interval
    assert analysis.intervals["overall"]["fid"] == pytest.approx([interval.low, interval.high], rel=1e-9)


def test_bca_intervals_of_row_sets_equal_scipy_on_the_values_for_one_and_two_samples() -> None:
    from scipy import stats

    from fairdiffusion.evaluation.bca import bca_intervals

    rng = np.random.default_rng(0)
    x, y = rng.exponential(size=40), rng.normal(size=25) + 1

    def both(batches: list[np.ndarray]) -> np.ndarray:
        (rows,) = batches
        return np.stack([x[rows].mean(axis=-1), x[rows].std(axis=-1)])

    bounds = bca_intervals([np.arange(40)], both, 500, 0.9, np.random.default_rng(1))
    for row, function in zip(bounds, (np.mean, np.std), strict=True):
        expected = stats.bootstrap((x,), function, n_resamples=500, confidence_level=0.9, rng=np.random.default_rng(1))
        assert row == pytest.approx(list(expected.confidence_interval), rel=1e-12)

    def difference(batches: list[np.ndarray]) -> np.ndarray:
        return (x[batches[0]].mean(axis=-1) - y[batches[1]].mean(axis=-1))[None]

    bounds = bca_intervals([np.arange(40), np.arange(25)], difference, 500, 0.9, np.random.default_rng(1))
    expected = stats.bootstrap(
        (x, y), lambda a, b: a.mean() - b.mean(), n_resamples=500, confidence_level=0.9, rng=np.random.default_rng(1)
    )
    assert bounds[0] == pytest.approx(list(expected.confidence_interval), rel=1e-12)


def test_bca_covers_every_interval_and_keeps_shifted_percentiles_for_matched_sizes() -> None:
    bca = analyse(SliceSettings(resamples=80, matched_draws=3, min_slice_size=10, seed=3, ci_method="bca"))
    assert json.dumps(bca.to_dict()) == json.dumps(
        analyse(SliceSettings(resamples=80, matched_draws=3, min_slice_size=10, seed=3, ci_method="bca")).to_dict()
    )
    for name in ("overall", "gender/Female", "race/Black"):
        for metric in ("fid", "kid"):
            low, high = bca.intervals[name][metric]
            assert low < bca.slices[name][metric] < high, (name, metric)
    gap = bca.equity_intervals["fid"]["race"]["max_gap"]
    assert all(math.isfinite(v) for v in gap) and gap[0] < bca.equity["fid"]["race"]["max_gap"] < gap[1]
    tiny = [name for name, v in bca.slices.items() if v["num_samples"] < 2]
    assert tiny and all(math.isnan(v) for name in tiny for v in bca.intervals[name]["fid"])
    # scipy has no m-out-of-n bootstrap: matched sizes keep the bias-shifted percentiles.
    assert matched_ci_method("bca") == "bias_shifted_percentile" and matched_ci_method("percentile") == "percentile"
    assert all(math.isfinite(v) for v in bca.matched["race"].intervals["fid"]["overall"])


def test_bca_gives_no_interval_where_every_resample_inflates_fid_beyond_the_estimate() -> None:
    """At d = 32, duplicated subjects put every resample's FID above the estimate: z0 = -inf."""
    rng = np.random.default_rng(2)
    real, generated = rng.normal(size=(80, 32)), rng.normal(size=(80, 32)) + 0.1
    statistics = FeatureStatistics(real, generated)
    attrs = {"site": ["a", "b"]}
    slices = define_slices(pd.DataFrame({"site": ["a", "b"] * 40}), attrs)
    settings = SliceSettings(resamples=60, matched_draws=0, seed=1, ci_method="bca")
    bca = analyse_slices(statistics, ["fid", "kid"], IMAGE_METRICS, slices, attrs, settings)
    assert all(math.isnan(v) for interval in bca.intervals["overall"].values() for v in interval)
    shifted = analyse_slices(
        statistics, ["fid"], IMAGE_METRICS, slices, attrs, SliceSettings(resamples=60, matched_draws=0, seed=1)
    )
    low, high = shifted.intervals["overall"]["fid"]
    assert low <= shifted.slices["overall"]["fid"] <= high


def test_flat_keys_follow_the_conventions() -> None:
    analysis = analyse(SliceSettings(resamples=30, matched_draws=3))
    flat = flatten_analysis(analysis, {"fid": ("fid", "randcnn8"), "kid": ("kid", "randcnn8")})
    flat |= flatten_slice_sizes(analysis)
    for key in (
        "fid_randcnn8/overall",
        "kid_randcnn8/race/Black/gender/Female",
        "es_fid_randcnn8/race",
        "fid_disparity_randcnn8/race",
        "fid_rel_disparity_randcnn8/gender",
        "fid_gap_randcnn8/ethnicity",
        "es_kid_randcnn8/race",
        "fid_matched_randcnn8/race/Asian",
        "fid_matched_overall_randcnn8/race",
        "es_fid_matched_randcnn8/race",
        "fid_gap_matched_randcnn8/race",
        "fid_disparity_matched_randcnn8/race",
        "num_samples/race/Black/gender/Female",
        "small_slice/race/Asian/gender/Female/ethnicity/Hispanic",
        "matched_n/race",
    ):
        assert key in flat, key
    values = [k for k in flat if not k.startswith(("ci_", "num_samples/", "small_slice/", "matched_n/"))]
    for key in values:
        assert f"ci_low/{key}" in flat and f"ci_high/{key}" in flat, key
        assert "randcnn8" in key
    assert flat["matched_n/race"] == analysis.matched["race"].size
    assert flat["es_fid_randcnn8/race"] == analysis.equity["fid"]["race"]["es"]
    gate = flatten_metrics(analysis.slices, analysis.equity["fid"], "randcnn8")
    assert all(flat[k] == v or (math.isnan(v) and math.isnan(flat[k])) for k, v in gate.items())


def test_analysis_round_trips_through_json() -> None:
    analysis = analyse(SliceSettings(resamples=20, matched_draws=2))
    again = SliceAnalysis.from_dict(json.loads(json.dumps(analysis.to_dict())))
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(analysis.to_dict(), sort_keys=True)
