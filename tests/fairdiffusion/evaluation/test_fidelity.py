"""Tests for prompt fidelity: a real-image classifier, per-group rates, visibility, the cache and the keys."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fairdiffusion.config import FidelityConfig
from fairdiffusion.evaluation.fidelity import (
    compute_attribute_fidelity,
    compute_group_fidelity,
    fidelity_classes,
    flatten_fidelity,
    measure_fidelity,
    not_computable_fidelity,
)
from fairdiffusion.evaluation.results import FidelityResult
from fairdiffusion.evaluation.slices import SliceSettings

SETTINGS = SliceSettings(resamples=200, seed=0)
ATTRIBUTES = {"race": ["Asian", "Black", "White"], "gender": ["Female", "Male"]}


def test_group_fidelity_is_the_generated_rate_over_the_real_rate_with_an_interval_around_it() -> None:
    real = np.array([True] * 18 + [False] * 2)  # 90% of the real images recognised
    generated = np.array([True] * 9 + [False] * 11)  # 45% of the generated ones
    result = compute_group_fidelity(real, generated, "Asian", SETTINGS, seed=1)
    assert result.num_samples == 20
    assert result.real_rate == pytest.approx(0.9) and result.generated_rate == pytest.approx(0.45)
    assert result.fidelity == pytest.approx(0.5)
    low, high = result.fidelity_interval
    assert low < 0.5 < high and high - low < 0.8


def test_a_group_never_recognised_in_real_images_has_no_fidelity() -> None:
    result = compute_group_fidelity(np.zeros(10, bool), np.zeros(10, bool), "Hispanic", SETTINGS, seed=0)
    assert math.isnan(result.fidelity)


def test_a_faithful_model_keeps_every_group_and_the_whole_margin() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, size=300)
    real = np.where(rng.random(300) < 0.95, targets, (targets + 1) % 3)
    item = compute_attribute_fidelity("race", "protected", ATTRIBUTES["race"], targets, (real, real), SETTINGS, 0.1)
    assert item.visible and item.reason == ""
    assert item.margin_retained == pytest.approx(1.0)
    assert [g.fidelity for g in item.groups] == pytest.approx([1.0, 1.0, 1.0])


def test_a_prompt_blind_model_scores_near_zero_for_all_but_one_group() -> None:
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 3, size=300)
    blind = np.full(300, 2)  # one average look, always read as White
    item = compute_attribute_fidelity("race", "protected", ATTRIBUTES["race"], targets, (targets, blind), SETTINGS, 0.1)
    fidelity = {g.group: g.fidelity for g in item.groups}
    assert fidelity["Asian"] == 0 and fidelity["Black"] == 0 and fidelity["White"] == pytest.approx(1.0)
    assert item.worst_group is not None and item.worst_group.group == "Asian"
    assert item.margin_retained < 0.1  # no better than always answering the majority class


def test_an_attribute_the_real_images_do_not_show_is_not_visible() -> None:
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 2, size=200)
    guesses = rng.integers(0, 2, size=200)  # the classifier cannot tell: chance
    item = compute_attribute_fidelity(
        "gender", "protected", ["Female", "Male"], targets, (guesses, guesses), SETTINGS, 0.1
    )
    assert not item.visible and "not visible in the real images" in item.reason


def test_fewer_than_two_training_classes_is_not_computable_with_the_reason() -> None:
    rows = pd.DataFrame({"race": ["White"] * 5, "gender": ["Female", "Male"] * 2 + ["Male"]})
    classes, kinds, not_computable = fidelity_classes(rows, ATTRIBUTES, None)
    assert classes["race"] == ["White"] and kinds["race"] == "protected"
    assert "fewer than two classes of race" in not_computable["race"] and "gender" not in not_computable


def _blobs(groups: list[str], size: int = 16, seed: int = 0) -> np.ndarray:
    """Images whose brightness names the race group (dark, middle, bright), with noise."""
    level = {"Asian": 40, "Black": 120, "White": 200}
    rng = np.random.default_rng(seed)
    images = np.stack([np.full((size, size, 3), level[g], np.float64) for g in groups])
    return np.clip(images + rng.normal(0, 10, images.shape), 0, 255).astype(np.uint8)


def _rows(count: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "race": rng.choice(ATTRIBUTES["race"], size=count),
            "gender": rng.choice(ATTRIBUTES["gender"], size=count),  # not in the images
            "glaucoma": ["glaucoma"] * count,  # one class only
        }
    )


def test_measure_fidelity_on_images_that_show_race_and_a_prompt_blind_model(tmp_path: Path) -> None:
    train, test = _rows(120, 0), _rows(90, 1)
    config = FidelityConfig(resolution=16, epochs=8, labels=["race", "gender", "glaucoma"])
    real_test = _blobs(list(test["race"]), seed=2)
    blind = _blobs(["Black"] * len(test), seed=3)
    cache = (tmp_path, "data-v1")
    args = (ATTRIBUTES, config, SETTINGS, cache)
    result = measure_fidelity((_blobs(list(train["race"])), train), real_test, blind, test, *args)
    race, gender, glaucoma = (result.attributes[a] for a in ("race", "gender", "glaucoma"))
    assert race.visible and race.real_accuracy > 0.9 and not gender.visible
    assert not glaucoma.computable and "fewer than two classes" in glaucoma.reason
    fidelity = {g.group: g.fidelity for g in race.groups}
    assert fidelity["Asian"] == 0 and fidelity["White"] == 0 and fidelity["Black"] > 0.9
    assert not result.cached_classifier
    faithful = measure_fidelity((_blobs(list(train["race"])), train), real_test, real_test, test, *args)
    assert faithful.cached_classifier  # fitted once per data version
    assert min(g.fidelity for g in faithful.attributes["race"].groups) == pytest.approx(1.0)
    assert FidelityResult.from_dict(faithful.to_dict()) == faithful


def test_flat_keys_name_attribute_and_group_with_intervals_and_not_computable_has_only_its_flag() -> None:
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 3, size=100)
    race = compute_attribute_fidelity(
        "race", "protected", ATTRIBUTES["race"], targets, (targets, targets), SETTINGS, 0.1
    )
    rows = pd.DataFrame({"glaucoma": ["glaucoma"] * 3})
    _, _, why = fidelity_classes(rows, {}, ["glaucoma"])
    glaucoma = not_computable_fidelity("glaucoma", "clinical", [], why["glaucoma"])
    result = FidelityResult("small", {"race": race, "glaucoma": glaucoma}, 1, 100, False, 0.0)
    flat = flatten_fidelity(result)
    assert flat["fidelity/race/Asian"] == pytest.approx(1.0)
    assert "ci_low/fidelity/race/Asian" in flat and "ci_high/fidelity_real_rate/race/White" in flat
    assert flat["fidelity_visible/race"] == 1.0 and flat["fidelity_worst/race"] == pytest.approx(1.0)
    assert flat["fidelity_computable/glaucoma"] == 0.0
    assert not any(k.endswith("/glaucoma") and not k.startswith("fidelity_computable") for k in flat)


def test_the_classifier_is_the_same_whatever_order_the_config_lists_the_attributes_in(tmp_path: Path) -> None:
    train, test = _rows(120, 0), _rows(60, 1)
    real_test = _blobs(list(test["race"]), seed=2)
    results = []
    for labels in (["race", "gender"], ["gender", "race"]):
        config = FidelityConfig(resolution=16, epochs=4, labels=labels)
        real_train = (_blobs(list(train["race"])), train)
        results.append(
            measure_fidelity(real_train, real_test, real_test, test, ATTRIBUTES, config, SETTINGS, (tmp_path, "v1"))
        )
    assert not results[0].cached_classifier and results[1].cached_classifier  # one fit, found again
    assert results[0].attributes["race"] == results[1].attributes["race"]
