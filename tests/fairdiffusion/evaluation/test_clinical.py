"""Tests for the clinical-semantics classifier and its AUCs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from fairdiffusion.config import ClinicalConfig
from fairdiffusion.errors import ConfigError
from fairdiffusion.evaluation.clinical import (
    auc_batch,
    encode_labels,
    evaluate_clinical_semantics,
    label_classes,
    predict_probabilities,
    train_classifier,
)
from fairdiffusion.evaluation.slices import SliceSettings

ATTRS = {"race": ["Asian", "Black", "White"], "gender": ["Female", "Male"]}


def test_auc_matches_scikit_learn_binary_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=50)
    score = np.round(rng.random(50) + 0.3 * y, 1)  # rounding makes ties
    probabilities = np.stack([1 - score, score], axis=1)
    assert auc_batch(y[None], probabilities[None])[0] == pytest.approx(roc_auc_score(y, score), rel=1e-12)


def test_auc_matches_scikit_learn_one_vs_rest_macro() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=80)
    logits = rng.normal(size=(80, 4)) + np.eye(4)[y]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = roc_auc_score(y, probabilities, multi_class="ovr", average="macro")
    assert auc_batch(y[None], probabilities[None])[0] == pytest.approx(expected, rel=1e-12)


def test_auc_skips_absent_classes_ignored_rows_and_single_class_slices() -> None:
    y = np.array([0, 0, 1, 1, -100, 2])
    scores = np.eye(3)[[0, 0, 1, 1, 1, 0]].astype(float)
    valid = y != -100
    expected = roc_auc_score(y[valid], scores[valid], multi_class="ovr", average="macro")
    assert auc_batch(y[None], scores[None])[0] == pytest.approx(expected, rel=1e-12)
    # Without class 2, only classes 0 and 1 count.
    assert auc_batch(y[None, :4], scores[None, :4])[0] == pytest.approx(1.0)
    single = auc_batch(np.zeros((1, 5), dtype=np.int64), np.full((1, 5, 2), 0.5))
    assert math.isnan(single[0])


def labelled_images(samples: pd.DataFrame, seed: int, size: int = 16) -> np.ndarray:
    """Images whose look encodes the labels: brightness for glaucoma, a bright band per md class."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(len(samples), size, size, 3)).astype(np.float64)
    glaucoma = (samples["glaucoma"] == "glaucoma").to_numpy()
    images += glaucoma[:, None, None, None] * 90
    rows = samples["md_severity"].map({"normal": 0, "mild": 1, "moderate": 2, "severe": 3}).to_numpy()
    for i, band in enumerate(rows):
        images[i, band * 4 : band * 4 + 4, :, :] += 120
    return images.clip(0, 255).astype(np.uint8)


def make_samples(n: int = 64, seed: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "race": rng.choice(["Asian", "Black", "White"], size=n, p=[0.25, 0.25, 0.5]),
            "gender": rng.choice(["Female", "Male"], size=n),
            "glaucoma": rng.choice(["non-glaucoma", "glaucoma"], size=n),
            "md_severity": rng.choice(["normal", "mild", "moderate", "severe"], size=n),
        }
    )


def test_a_classifier_trained_on_generated_images_reads_real_ones() -> None:
    """Generated and real images that carry the prompted labels give a high AUC everywhere."""
    samples = make_samples()
    generated, real = labelled_images(samples, seed=3), labelled_images(samples, seed=4)
    config = ClinicalConfig(labels=["glaucoma", "md_severity"], resolution=16, epochs=12, batch_size=16)
    result = evaluate_clinical_semantics(
        generated, samples, real, samples, ATTRS, config, SliceSettings(resamples=40, min_slice_size=20, seed=0)
    )
    assert result is not None
    assert result.classes["md_severity"] == ["normal", "mild", "moderate", "severe"]
    analysis = result.analysis
    assert analysis.metric_names == ["glaucoma", "md_severity"]
    assert set(analysis.slices) == {"overall", "race/Asian", "race/Black", "race/White", "gender/Female", "gender/Male"}
    assert analysis.slices["overall"]["glaucoma"] > 0.9
    assert analysis.slices["overall"]["md_severity"] > 0.8
    assert analysis.higher_is_better == {"glaucoma": True, "md_severity": True}
    es = analysis.equity["glaucoma"]["race"]
    assert es["es"] == pytest.approx(analysis.slices["overall"]["glaucoma"] / (1 + es["disparity"]))
    low, high = analysis.intervals["overall"]["glaucoma"]
    assert low <= analysis.slices["overall"]["glaucoma"] <= high
    assert result.train_images == result.test_images == len(samples)


def test_labels_that_are_noise_give_chance_auc() -> None:
    samples = make_samples(n=80, seed=5)
    rng = np.random.default_rng(6)
    noise = rng.integers(0, 255, size=(80, 16, 16, 3), dtype=np.uint8)
    config = ClinicalConfig(labels=["glaucoma"], resolution=16, epochs=3)
    classes = label_classes(samples, config.labels)
    targets = encode_labels(samples, classes)
    model, loss = train_classifier(noise, targets, classes, config)
    assert math.isfinite(loss)
    probabilities = predict_probabilities(model, rng.integers(0, 255, size=(80, 16, 16, 3), dtype=np.uint8), 16)
    assert probabilities["glaucoma"].shape == (80, 2)
    assert 0.25 < auc_batch(targets["glaucoma"][None], probabilities["glaucoma"][None])[0] < 0.75


def test_training_is_seeded() -> None:
    samples = make_samples(n=24)
    images = labelled_images(samples, seed=7)
    config = ClinicalConfig(labels=["glaucoma"], resolution=16, epochs=2)
    classes = label_classes(samples, config.labels)
    targets = encode_labels(samples, classes)
    first = predict_probabilities(train_classifier(images, targets, classes, config)[0], images, 16)
    second = predict_probabilities(train_classifier(images, targets, classes, config)[0], images, 16)
    np.testing.assert_array_equal(first["glaucoma"], second["glaucoma"])


def test_unknown_label_column_and_missing_values() -> None:
    samples = make_samples(n=6)
    with pytest.raises(ConfigError, match="evaluation.clinical.labels: 'vision'"):
        label_classes(samples, ["vision"])
    samples.loc[0, "glaucoma"] = None
    codes = encode_labels(samples, label_classes(samples, ["glaucoma"]))["glaucoma"]
    assert codes[0] == -100 and set(codes[1:]) <= {0, 1}


def test_pretrained_backbones_need_weights() -> None:
    with pytest.raises(ValueError, match="needs weights"):
        ClinicalConfig(classifier="vit")
    ClinicalConfig(classifier="vit", enabled=False)  # nothing to load when disabled


@pytest.mark.parametrize("kind", ["vit", "efficientnet"])
def test_transformers_backbones_load_from_a_local_folder_and_train(kind: str, tmp_path: Path) -> None:
    """The production loading path (``from_pretrained`` on local weights), on tiny random configs."""
    from transformers import EfficientNetConfig, EfficientNetModel, ViTConfig, ViTModel

    folder = tmp_path / kind
    if kind == "vit":
        config = ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
        )
        ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    else:
        config = EfficientNetConfig(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128)
        EfficientNetModel(config).save_pretrained(folder)
    samples = make_samples(n=12)
    images = labelled_images(samples, seed=8)
    clinical = ClinicalConfig(labels=["glaucoma"], classifier=kind, weights=str(folder), resolution=32, epochs=1)
    classes = label_classes(samples, clinical.labels)
    model, loss = train_classifier(images, encode_labels(samples, classes), classes, clinical)
    assert math.isfinite(loss)
    assert predict_probabilities(model, images, 32)["glaucoma"].shape == (12, 2)


def test_missing_pretrained_weights_name_the_key(tmp_path: Path) -> None:
    samples = make_samples(n=6)
    config = ClinicalConfig(labels=["glaucoma"], classifier="vit", weights=str(tmp_path / "absent"), epochs=1)
    classes = label_classes(samples, config.labels)
    with pytest.raises(ConfigError, match="evaluation.clinical.weights"):
        train_classifier(labelled_images(samples, 1), encode_labels(samples, classes), classes, config)


def test_default_labels_are_the_fairgenmed_ones_the_table_has() -> None:
    samples = make_samples(n=24)
    images = labelled_images(samples, seed=9)
    settings = SliceSettings(resamples=0)
    result = evaluate_clinical_semantics(images, samples, images, samples, ATTRS, ClinicalConfig(epochs=1), settings)
    assert result is not None and list(result.classes) == ["glaucoma", "md_severity"]
    other_format = samples.drop(columns=["glaucoma", "md_severity"]).assign(diagnosis="x")
    assert (
        evaluate_clinical_semantics(images, other_format, images, other_format, ATTRS, ClinicalConfig(), settings)
        is None
    )


def test_the_classifier_trains_on_training_prompts_and_is_tested_on_other_subjects() -> None:
    """The paper's protocol: train rows and test rows are different subjects; AUC is on the test rows."""
    train, test = make_samples(n=60, seed=5), make_samples(n=30, seed=6)
    config = ClinicalConfig(labels=["glaucoma"], resolution=16, epochs=8, batch_size=16)
    result = evaluate_clinical_semantics(
        labelled_images(train, seed=1),
        train,
        labelled_images(test, seed=2),
        test,
        ATTRS,
        config,
        SliceSettings(resamples=0),
    )
    assert result is not None
    assert (result.train_images, result.test_images) == (60, 30)
    assert result.analysis.slices["overall"]["num_samples"] == 30
    assert result.analysis.slices["overall"]["glaucoma"] > 0.8


def test_the_real_trained_ceiling_is_measured_beside_a_prompt_blind_model() -> None:
    """Generated images that ignore their prompts score chance; the same classifier on real images does not."""
    train, test = make_samples(n=80, seed=5), make_samples(n=60, seed=6)
    rng = np.random.default_rng(9)
    blind = rng.integers(0, 255, size=(80, 16, 16, 3), dtype=np.uint8)
    config = ClinicalConfig(labels=["glaucoma"], resolution=16, epochs=10, batch_size=16)
    settings = SliceSettings(resamples=20, min_slice_size=5, seed=0)
    real_train, real_test = labelled_images(train, seed=3), labelled_images(test, seed=4)
    result = evaluate_clinical_semantics(blind, train, real_test, test, ATTRS, config, settings, real_train=real_train)
    assert result is not None and result.real_trained_auc is not None
    assert result.real_trained_auc["glaucoma"] > 0.9
    assert result.analysis.slices["overall"]["glaucoma"] < 0.75
    assert type(result).from_dict(result.to_dict()).real_trained_auc == result.real_trained_auc
    without = evaluate_clinical_semantics(blind, train, real_test, test, ATTRS, config, settings)
    assert without is not None and without.real_trained_auc is None
