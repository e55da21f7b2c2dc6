"""Prompt fidelity per group: does the model draw the patient its prompt describes?

Beyond the paper. A classifier is trained on the *real* training images to recognise
every prompted attribute (each protected attribute, each clinical label) and applied to
the real test images and to the images generated from the same test prompts. For a
group g of an attribute:

- the real rate is the share of g's real test images classified as g;
- the generated rate is the share of images *prompted* as g that are classified as g;
- the fidelity is generated rate / real rate (1: the model shows g as recognisably as
  the real images do; 0: nothing of g survives generation).

This is the reverse direction of the paper's clinical AUC (Sec. 4.3), which trains on
generated images and tests on real ones: that asks whether generated images *teach* the
labels; this asks whether each generated image *shows* what its prompt asked for, per group.
A prompt-blind model, which draws one average patient whatever the prompt says, scores
near 0 for every group but the one nearest that average.

An attribute the real images do not show (the demo's gender changes nothing in the look)
cannot be asked of a model: where the classifier's balanced accuracy on the real test
images is not above chance, the attribute is reported as not visible and left out of the
gate's rules. An attribute with fewer than two classes in the training rows is not
computable; the report says why and the gate fails closed on it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fairdiffusion.config import FidelityConfig
from fairdiffusion.data.catalog import CLINICAL_LABELS
from fairdiffusion.evaluation.clinical import (
    LabelClassifier,
    build_classifier,
    encode_labels,
    ordered_classes,
    predict_probabilities,
    train_classifier,
)
from fairdiffusion.evaluation.metric_keys import fidelity_key, interval_keys
from fairdiffusion.evaluation.results import AttributeFidelity, FidelityResult, GroupFidelity
from fairdiffusion.evaluation.slices import SliceSettings, bootstrap_interval

#: A prompted attribute's role: protected (race, gender, ...) or a clinical label.
PROTECTED, CLINICAL = "protected", "clinical"


def fidelity_classes(
    train_rows: pd.DataFrame, attributes: Mapping[str, Sequence[str]], labels: Sequence[str] | None
) -> tuple[dict[str, list[str]], dict[str, str], dict[str, str]]:
    """Classes of each measured attribute, each one's kind, and why any is not computable.

    Protected attributes keep the configured group order; clinical labels their observed
    classes. ``labels`` ``None``: every protected attribute and every clinical label
    present in the training rows.
    """
    names = list(labels) if labels is not None else [*attributes, *[c for c in CLINICAL_LABELS if c in train_rows]]
    classes, kinds, not_computable = {}, {}, {}
    for name in names:
        kinds[name] = PROTECTED if name in attributes else CLINICAL
        known = attributes[name] if name in attributes else CLINICAL_LABELS.get(name, ())
        classes[name] = ordered_classes(train_rows[name], known) if name in train_rows else []
        if len(classes[name]) < 2:
            not_computable[name] = (
                f"fewer than two classes of {name} in the real training images "
                f"({', '.join(classes[name]) or 'none'}): no classifier can learn to tell them apart"
            )
    return classes, kinds, not_computable


def _classifier_key(config: FidelityConfig, data_version: str, classes: Mapping[str, Sequence[str]], n: int) -> str:
    # Which attributes are measured is in ``classes``; the order a config lists them in is not a setting.
    settings = config.model_dump(mode="json", exclude={"visible_margin", "enabled", "labels"})
    key = {"data": data_version, "classes": classes, "images": n, "settings": settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def fit_real_classifier(
    images: np.ndarray,
    rows: pd.DataFrame,
    classes: Mapping[str, Sequence[str]],
    config: FidelityConfig,
    cache: tuple[Path, str] | None = None,
    device: str = "cpu",
) -> tuple[LabelClassifier, bool]:
    """The classifier of every measured attribute, trained on real training images; cached.

    Args:
        images: The real training images (uint8 N x H x W x 3), row-aligned with ``rows``.
        rows: The training rows (the attributes' true values).
        classes: Attribute -> classes, in score-column order.
        config: Backbone and training settings.
        cache: (folder, data version): the fitted weights are kept there per data version
            and settings, and loaded (``weights_only``) instead of fitted again.
        device: Torch device.

    Returns:
        The classifier (eval mode) and whether it came from the cache.
    """
    # One order of the heads, whatever order the config lists the attributes in: the
    # initialisation, and so the fit, is then the same for the same data and settings.
    classes = dict(sorted(classes.items()))
    path = None
    if cache is not None:
        folder, data_version = cache
        path = folder / f"fidelity_classifier_{_classifier_key(config, data_version, classes, len(images))}.pt"
        if path.is_file():
            model = build_classifier(config, classes)
            model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
            return model.to(device).eval(), True
    model, _ = train_classifier(images, encode_labels(rows, classes), classes, config, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        torch.save(model.state_dict(), temporary)
        temporary.replace(path)  # atomic: a killed evaluation leaves no half-written weights
    return model, False


def _rates(hits: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Mean of ``hits`` over each resample's rows: ``index`` ``(B, n)`` -> ``(B,)``."""
    return hits[index].mean(axis=1) if index.shape[1] else np.full(len(index), np.nan)


def _ratio(generated: np.ndarray | float, real: np.ndarray | float) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.asarray(real) > 0, np.asarray(generated) / np.asarray(real), np.nan)


def compute_group_fidelity(
    real_hits: np.ndarray, generated_hits: np.ndarray, group: str, settings: SliceSettings, seed: int
) -> GroupFidelity:
    """Rates and fidelity of one group's test rows; the interval resamples subjects (paired).

    Args:
        real_hits: Per test subject of the group, whether its real image was classified as the group.
        generated_hits: Per subject, whether the image generated from its prompt was.
        group: The group's name.
        settings: Resamples, confidence level and interval method.
        seed: Seeds the resampling.
    """
    real_rate, generated_rate = float(real_hits.mean()), float(generated_hits.mean())
    point = float(_ratio(generated_rate, real_rate))
    n, resamples = len(real_hits), settings.resamples
    if resamples == 0 or n < 2:
        nan = [float("nan")] * 2
        return GroupFidelity(group, n, real_rate, generated_rate, point, nan, nan, nan)
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    real_b, generated_b = _rates(real_hits.astype(float), index), _rates(generated_hits.astype(float), index)
    level, method = settings.confidence_level, settings.ci_method
    method = "bias_shifted_percentile" if method == "bca" else method  # a ratio of two means: no jackknife here
    return GroupFidelity(
        group,
        n,
        real_rate,
        generated_rate,
        point,
        bootstrap_interval(real_b, level, real_rate, method),
        bootstrap_interval(generated_b, level, generated_rate, method),
        bootstrap_interval(_ratio(generated_b, real_b), level, point, method),
    )


def _balanced_accuracy(targets: np.ndarray, predictions: np.ndarray, classes: int, index: np.ndarray) -> np.ndarray:
    """Mean per-class recall of each resample ``index`` ``(B, n)``; classes absent from a resample are skipped."""
    t, p = targets[index], predictions[index]
    recalls = []
    for c in range(classes):
        present = (t == c).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(present > 0, ((t == c) & (p == c)).sum(axis=1) / present, np.nan))
    return np.nanmean(np.stack(recalls), axis=0)


def compute_attribute_fidelity(
    name: str,
    kind: str,
    classes: Sequence[str],
    targets: np.ndarray,
    predictions: tuple[np.ndarray, np.ndarray],
    settings: SliceSettings,
    visible_margin: float,
) -> AttributeFidelity:
    """Visibility in the real images, accuracies, margin kept, and every group's fidelity.

    Args:
        name: The attribute.
        kind: :data:`PROTECTED` or :data:`CLINICAL`.
        classes: Its classes, in score-column order.
        targets: Class index of each test subject (its prompt's and its real image's value; -100 unknown).
        predictions: Predicted class index of (the real test images, the generated images).
        settings: Resampling settings.
        visible_margin: How far above chance the balanced accuracy's interval must start.
    """
    known = targets >= 0
    targets, real, generated = targets[known], predictions[0][known], predictions[1][known]
    everyone = np.arange(len(targets))[None, :]
    balanced = float(_balanced_accuracy(targets, real, len(classes), everyone)[0])
    rng = np.random.default_rng(settings.seed)
    index = rng.integers(0, len(targets), size=(max(settings.resamples, 1), len(targets)))
    interval = bootstrap_interval(
        _balanced_accuracy(targets, real, len(classes), index), settings.confidence_level, balanced, "percentile"
    )
    chance = 1.0 / len(classes)
    low = interval[0] if np.isfinite(interval[0]) else balanced
    visible = bool(low > chance + visible_margin)
    reason = (
        ""
        if visible
        else f"not visible in the real images: balanced accuracy {balanced:.2f} (interval low {low:.2f}) "
        f"is not above chance {chance:.2f} + margin {visible_margin:.2f}"
    )
    real_accuracy, generated_accuracy = float((real == targets).mean()), float((generated == targets).mean())
    majority = float(np.bincount(targets, minlength=len(classes)).max() / len(targets))
    margin = real_accuracy - majority
    retained = (generated_accuracy - majority) / margin if margin > 0 else float("nan")
    groups = [
        compute_group_fidelity(
            real[targets == c] == c, generated[targets == c] == c, group, settings, settings.seed + c
        )
        for c, group in enumerate(classes)
        if (targets == c).any()
    ]
    return AttributeFidelity(
        name, kind, list(classes), True, visible, reason, chance, balanced, interval,
        real_accuracy, generated_accuracy, majority, retained, groups,
    )  # fmt: skip


def not_computable_fidelity(name: str, kind: str, classes: Sequence[str], reason: str) -> AttributeFidelity:
    """An attribute whose fidelity cannot be computed, and why (every figure NaN)."""
    nan = float("nan")
    return AttributeFidelity(
        name, kind, list(classes), False, False, reason, nan, nan, [nan, nan], nan, nan, nan, nan, []
    )


def measure_fidelity(
    real_train: tuple[np.ndarray, pd.DataFrame],
    real_test: np.ndarray,
    generated: np.ndarray,
    test_rows: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    config: FidelityConfig,
    settings: SliceSettings,
    cache: tuple[Path, str] | None = None,
    device: str = "cpu",
) -> FidelityResult:
    """Prompt fidelity of every prompted attribute, per group, with intervals.

    Args:
        real_train: The real training images (uint8 N x H x W x 3) and their rows.
        real_test: The real test images, row-aligned with ``test_rows``.
        generated: The images generated from ``test_rows``' prompts, row-aligned.
        test_rows: The test rows (each attribute's true and prompted value).
        attributes: Protected attribute -> groups.
        config: Which attributes, and the classifier.
        settings: Resampling settings shared with the other metrics.
        cache: (folder, data version) keeping the fitted classifier.
        device: Torch device.
    """
    started = time.perf_counter()
    train_images, train_rows = real_train
    train_rows, test_rows = train_rows.reset_index(drop=True), test_rows.reset_index(drop=True)
    classes, kinds, not_computable = fidelity_classes(train_rows, attributes, config.labels)
    fitted = {name: names for name, names in classes.items() if name not in not_computable}
    results = {
        name: not_computable_fidelity(name, kinds[name], classes[name], why) for name, why in not_computable.items()
    }
    cached = False
    if fitted:
        model, cached = fit_real_classifier(train_images, train_rows, fitted, config, cache, device)
        real_p = predict_probabilities(model, real_test, config.resolution, device)
        generated_p = predict_probabilities(model, generated, config.resolution, device)
        targets = encode_labels(test_rows, fitted)
        for name, names in fitted.items():
            predictions = (real_p[name].argmax(axis=1), generated_p[name].argmax(axis=1))
            results[name] = compute_attribute_fidelity(
                name, kinds[name], names, targets[name], predictions, settings, config.visible_margin
            )
    ordered = {name: results[name] for name in classes}
    seconds = time.perf_counter() - started
    return FidelityResult(config.classifier, ordered, len(train_images), len(real_test), cached, seconds)


def flatten_fidelity(result: FidelityResult) -> dict[str, float]:
    """Every attribute's and group's fidelity figures, with ``ci_low/K`` and ``ci_high/K`` beside group keys.

    A not computable attribute has only ``fidelity_computable/<attribute> = 0``: the gate
    then finds no figure for it and fails closed.
    """
    flat: dict[str, float] = {}
    for name, item in result.attributes.items():
        flat[fidelity_key("computable", name)] = float(item.computable)
        if not item.computable:
            continue
        flat[fidelity_key("visible", name)] = float(item.visible)
        for stat in ("real_balanced_accuracy", "real_accuracy", "generated_accuracy", "majority_rate"):
            flat[fidelity_key(stat, name)] = float(getattr(item, stat))
        flat[fidelity_key("margin_retained", name)] = float(item.margin_retained)
        worst = item.worst_group
        flat[fidelity_key("worst", name)] = float(worst.fidelity) if worst else float("nan")
        for group in item.groups:
            for stat, value, interval in (
                ("fidelity", group.fidelity, group.fidelity_interval),
                ("real_rate", group.real_rate, group.real_interval),
                ("generated_rate", group.generated_rate, group.generated_interval),
            ):
                key = fidelity_key(stat, name, group.group)
                low, high = interval_keys(key)
                flat[key], flat[low], flat[high] = float(value), float(interval[0]), float(interval[1])
    return flat
