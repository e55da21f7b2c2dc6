"""The references that put a FID on a scale: the real-vs-real floor and the base model."""

from __future__ import annotations

import numpy as np
import pytest

from fairdiffusion.evaluation.evaluate import _png_name
from fairdiffusion.evaluation.metric_keys import reference_keys
from fairdiffusion.evaluation.reference import floor_metrics, reference_metrics


def test_the_floor_is_real_against_real_and_a_real_copy_scores_one() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(80, 4))
    keys = reference_keys("x")
    same = floor_metrics(real, real.copy(), "x", seed=1)
    assert same[keys["over_floor"]] == pytest.approx(1.0)
    assert same[keys["floor"]] > 0  # two halves of a sample differ by sampling alone
    shifted = floor_metrics(real, real + 3.0, "x", seed=1)
    assert shifted[keys["over_floor"]] > 10
    assert shifted[keys["floor"]] == pytest.approx(same[keys["floor"]])


def test_the_base_reference_is_its_fid_on_the_same_real_images() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(60, 3))
    close, far = real + rng.normal(0, 0.1, real.shape), real + 2.0
    key = reference_keys("x")["base"]
    assert reference_metrics(real, close, "x", 0)[key] < reference_metrics(real, far, "x", 0)[key]


@pytest.mark.parametrize(
    ("subject", "nested"),
    [("00012", False), ("ISIC_0024306", False), ("patient00011/study1/view1_frontal", True), ("..", True)],
)
def test_cached_images_are_plain_file_names_whatever_the_layout(subject: str, nested: bool) -> None:
    name = _png_name(subject)
    assert "/" not in name and name.endswith(".png") and name not in {"..png", "...png"}
    assert (name == f"{subject}.png") is not nested
    assert _png_name(subject) == name  # stable: the cache finds it again


def test_pixel_check_scores_real_like_images_far_below_noise() -> None:
    from fairdiffusion.data.demo import _sample_labels, render_fundus
    from fairdiffusion.evaluation.reference import noise_ratio

    rng = np.random.default_rng(0)
    fundus = np.stack([render_fundus(_sample_labels(rng), 32, rng) for _ in range(120)])
    real, other = fundus[:60, ..., None].repeat(3, -1), fundus[60:, ..., None].repeat(3, -1)
    assert noise_ratio(real, other) < 0.05
    assert noise_ratio(real, np.full_like(other, 128)) > 0.1
