"""Evaluation of a trained pipeline on the held-out test prompts, per subgroup.

One image is generated per test subject from that subject's prompt, in batches, with
seed ``evaluation.seed + i`` for subject i, so the same model, prompts and seed give the
same images whatever the batch size. The images are written once, losslessly (PNG).
Features are extracted once for all real and all generated images and cached by
(model, data, extractor); every slice (overall, groups, intersections), every
bootstrap resample and every matched-size draw is computed from those features. A
classifier trained on the generated images and tested on the real ones measures
whether the images carry the clinical labels their prompts asked for.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fairdiffusion.config import EvaluationConfig
from fairdiffusion.data.images import load_real_images
from fairdiffusion.evaluation.cache import cache_key, fingerprint_files, model_fingerprint
from fairdiffusion.evaluation.clinical import evaluate_clinical_semantics
from fairdiffusion.evaluation.comparison import BaselineRun, compare_with_baseline
from fairdiffusion.evaluation.features import FeatureExtractor, build_extractor, extract_features
from fairdiffusion.evaluation.fidelity import flatten_fidelity, measure_fidelity
from fairdiffusion.evaluation.generation import generate_images, resolve_device
from fairdiffusion.evaluation.image_metrics import IMAGE_METRICS, FeatureStatistics
from fairdiffusion.evaluation.manifold import compute_manifold_slices
from fairdiffusion.evaluation.metric_keys import (
    flatten_analysis,
    flatten_manifold,
    flatten_metrics,
    flatten_slice_sizes,
    real_trained_auc_key,
)
from fairdiffusion.evaluation.reference import floor_metrics, reference_metrics
from fairdiffusion.evaluation.report import write_report
from fairdiffusion.evaluation.results import ClinicalResult, EvaluationReport, FidelityResult
from fairdiffusion.evaluation.slices import (
    SliceAnalysis,
    SliceSettings,
    analyse_slices,
    define_slices,
    matched_ci_method,
)

#: What the report says about how every FID here was measured.
RESIZE_PROTOCOL = (
    "real: shorter side resized to the generation size with PIL bicubic (antialiased), centre-cropped, "
    "by the function training uses (fairdiffusion.data.images.resize_and_crop); real and generated alike: "
    "bilinear antialiased resize to the feature size (one function, fairdiffusion.evaluation.features.to_unit_batch)"
)


@dataclass(frozen=True)
class _Features:
    real: np.ndarray
    generated: np.ndarray
    generated_logits: np.ndarray | None
    seconds: float


@dataclass(frozen=True)
class _Cache:
    """Where one (model, data, extractor, generation settings) keeps its PNGs and features."""

    key: str
    image_dir: Path
    features_file: Path
    pngs: list[Path]

    @property
    def complete(self) -> bool:
        return self.features_file.is_file() and all(p.is_file() for p in self.pngs)


@dataclass(frozen=True)
class _Images:
    """The generated images, every image's features, and how they were obtained."""

    generated: np.ndarray
    features: _Features
    generation: dict[str, object]


@dataclass(frozen=True)
class _Measured:
    quality: SliceAnalysis
    clinical: ClinicalResult | None
    metrics: dict[str, float]
    seconds: float


def _extract(extractor: FeatureExtractor, real: np.ndarray, generated: np.ndarray, resolution: int) -> _Features:
    started = time.perf_counter()
    real_f = extract_features(extractor, torch.from_numpy(real), resolution)
    generated_f = extract_features(extractor, torch.from_numpy(generated), resolution)
    logits = extractor.logits(generated_f).numpy() if extractor.has_classifier_head else None
    return _Features(real_f.numpy(), generated_f.numpy(), logits, time.perf_counter() - started)


def slice_settings(config: EvaluationConfig) -> SliceSettings:
    """The resampling settings an evaluation config names."""
    return SliceSettings(
        resamples=config.bootstrap_resamples,
        confidence_level=config.confidence_level,
        matched_draws=config.matched_draws,
        min_slice_size=config.min_slice_size,
        seed=config.seed,
        ci_method=config.ci_method,
    )


def _png_name(subject: str) -> str:
    """A subject's image file: its id where that is a plain file name, else a hash of it.

    Subjects of nested layouts (CheXpert's ``patient00011/study1/view1_frontal``) would
    otherwise name folders the cache never created.
    """
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", subject) and subject not in {".", ".."}:
        return f"{subject}.png"
    return f"s-{hashlib.sha256(subject.encode()).hexdigest()[:20]}.png"


def _locate_cache(key: str, subjects: Sequence[str], extractor: FeatureExtractor, config: EvaluationConfig) -> _Cache:
    folder = Path(config.cache_dir or Path(config.output_dir) / "cache") / key
    image_dir = folder / "generated"
    pngs = [image_dir / _png_name(subject) for subject in subjects]
    return _Cache(key, image_dir, folder / f"features_{extractor.name}.npz", pngs)


def _load_cached(cache: _Cache) -> _Images:
    generated = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in cache.pngs])
    with np.load(cache.features_file) as stored:
        features = _Features(stored["real"], stored["generated"], stored.get("generated_logits"), 0.0)
    return _Images(generated, features, {"cached": True})


def _generate_and_extract(
    model_dir: str,
    prompts: Sequence[str],
    real: np.ndarray,
    resolution: int,
    extractor: FeatureExtractor,
    config: EvaluationConfig,
    cache: _Cache,
) -> _Images:
    made = generate_images(model_dir, list(prompts), resolution, config)
    cache.image_dir.mkdir(parents=True, exist_ok=True)
    for path, image in zip(cache.pngs, made.images, strict=True):
        Image.fromarray(image).save(path)  # PNG: lossless, so features can be recomputed exactly
    features = _extract(extractor, real, made.images, config.feature_resolution)
    if features.generated_logits is None:
        np.savez(cache.features_file, real=features.real, generated=features.generated)
    else:
        logits = features.generated_logits
        np.savez(cache.features_file, real=features.real, generated=features.generated, generated_logits=logits)
    generation: dict[str, object] = {
        "cached": False,
        "seconds": made.seconds,
        "images_per_second": made.images_per_second,
        "batch_size": config.batch_size,
    }
    return _Images(made.images, features, generation)


def _measure(
    images: _Images,
    real: np.ndarray,
    test_samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    extractor_name: str,
    config: EvaluationConfig,
    device: str,
    train: tuple[np.ndarray, pd.DataFrame, np.ndarray] | None = None,
) -> _Measured:
    """Every slice's image metrics (and, with training-prompt images, clinical AUCs), with their flat keys."""
    started = time.perf_counter()
    features = images.features
    statistics = FeatureStatistics(features.real, features.generated, features.generated_logits, device)
    slices = define_slices(test_samples[list(attributes)], attributes, config.intersections)
    settings = slice_settings(config)
    quality = analyse_slices(statistics, statistics.metric_names, IMAGE_METRICS, slices, attributes, settings)
    seconds = time.perf_counter() - started

    clinical = None
    if train is not None:
        train_images, train_rows, real_train = train
        clinical = evaluate_clinical_semantics(
            train_images, train_rows, real, test_samples, attributes, config.clinical, settings, device, real_train
        )

    metrics = flatten_analysis(quality, {m: (m, extractor_name) for m in quality.metric_names})
    metrics |= flatten_slice_sizes(quality)
    metrics |= flatten_metrics(quality.slices, quality.equity["fid"], extractor_name)
    # Fidelity, coverage and spread per slice: what self-consuming retraining erodes first.
    metrics |= flatten_manifold(compute_manifold_slices(features.real, features.generated, slices), extractor_name)
    if clinical is not None:
        tags = {label: ("auc", f"{clinical.classifier}/{label}") for label in clinical.classes}
        metrics |= flatten_analysis(clinical.analysis, tags)
        ceiling = clinical.real_trained_auc or {}
        metrics |= {real_trained_auc_key(clinical.classifier, label): auc for label, auc in ceiling.items()}
    return _Measured(quality, clinical, metrics, seconds)


def _clinical_protocol(config: EvaluationConfig, clinical: ClinicalResult | None) -> str | bool:
    if not config.clinical.enabled:
        return False
    if clinical is None:
        return "skipped: no training prompts given, or no prompted labels in the rows"
    return "trained on images generated from the training prompts, tested on the real test images"


def _protocol(
    extractor: FeatureExtractor,
    config: EvaluationConfig,
    resolution: int,
    num_subjects: int,
    device: str,
    dtype: torch.dtype,
    versions: Mapping[str, str],
    images: _Images,
    measured: _Measured,
) -> dict[str, object]:
    """How every number of the report was measured (``versions``: model, data and cache key)."""
    clinical = measured.clinical
    return {
        "extractor": extractor.name,
        "extractor_weights_sha256": extractor.weights_hash,
        "feature_resolution": config.feature_resolution,
        "generation_resolution": resolution,
        "resize": RESIZE_PROTOCOL,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "seed": config.seed,
        "seeds": f"image i uses seed {config.seed} + i ({config.seed}..{config.seed + num_subjects - 1})",
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "num_real": len(images.features.real),
        "num_generated": len(images.generated),
        "model_version": versions["model"],
        "data_version": versions["data"],
        "cache_key": versions["cache_key"],
        "intersections": config.intersections,
        "bootstrap_resamples": config.bootstrap_resamples,
        "confidence_level": config.confidence_level,
        "ci_method": config.ci_method,
        "matched_ci_method": matched_ci_method(config.ci_method),
        "matched_draws": config.matched_draws,
        "min_slice_size": config.min_slice_size,
        "generation": images.generation,
        "clinical": _clinical_protocol(config, clinical),
        "seconds": {
            "feature_extraction": images.features.seconds,
            "slice_metrics": measured.seconds,
            "clinical": clinical.seconds if clinical else 0.0,
        },
    }


def _generated_for(
    model_dir: str,
    samples: pd.DataFrame,
    real: np.ndarray,
    resolution: int,
    extractor: FeatureExtractor,
    config: EvaluationConfig,
    data_version: str,
) -> tuple[_Images, dict[str, str]]:
    """One image per row's prompt, with every image's features: from the cache, else generated and cached."""
    subjects = [str(s) for s in samples["subject"]]
    model_version = model_fingerprint(model_dir)
    dtype = str(resolve_device(config)[1])
    key = cache_key(model_version, data_version, extractor, subjects, resolution, config, dtype)
    cache = _locate_cache(key, subjects, extractor, config)
    if cache.complete:
        images = _load_cached(cache)
    else:
        images = _generate_and_extract(
            model_dir, samples["prompt"].tolist(), real, resolution, extractor, config, cache
        )
    return images, {"model": model_version, "data": data_version, "cache_key": key}


def _real_training_images(
    train_samples: pd.DataFrame | None, resolution: int, config: EvaluationConfig
) -> tuple[np.ndarray, pd.DataFrame] | None:
    """The real training images and their rows, loaded once for the clinical and the fidelity classifiers."""
    if train_samples is None or train_samples.empty or not (config.clinical.enabled or config.fidelity.enabled):
        return None
    rows = train_samples.reset_index(drop=True)
    return load_real_images([str(p) for p in rows["image_path"]], resolution), rows


def _clinical_training_images(
    model_dir: str,
    real_train: tuple[np.ndarray, pd.DataFrame] | None,
    resolution: int,
    extractor: FeatureExtractor,
    config: EvaluationConfig,
    data_version: str,
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray] | None:
    """Images generated from the *training* prompts, the clinical classifier's training set (and the real ones).

    The paper's protocol (Sec. 4.3; the authors' evaluation script): generate from the
    training prompts, train on those images, test on the real test images, so the test
    set's label and group mix never enters the classifier's training.
    """
    if not config.clinical.enabled or real_train is None:
        return None
    real, rows = real_train
    images, _ = _generated_for(model_dir, rows, real, resolution, extractor, config, data_version)
    return images.generated, rows, real


#: What the report says each direction of "does the image carry its prompt" answers.
FIDELITY_PROTOCOL = (
    "a classifier trained on the real training images, applied to the real test images and to the images "
    "generated from the same test prompts; per group: generated rate / real rate of being classified as the "
    "group (the reverse of the clinical AUC, which trains on generated images and tests on real ones)"
)


def _fidelity(
    config: EvaluationConfig,
    real_train: tuple[np.ndarray, pd.DataFrame] | None,
    test: tuple[np.ndarray, np.ndarray, pd.DataFrame],
    attributes: Mapping[str, Sequence[str]],
    data_version: str,
    device: str,
) -> FidelityResult | None:
    """Prompt fidelity of the generated test images (``test``: real, generated, rows); needs the training rows."""
    if not config.fidelity.enabled or real_train is None:
        return None
    fidelity_config = config.fidelity
    if fidelity_config.labels is None and config.clinical.labels is not None:
        # The clinical labels a config names (HAM10000's and CheXpert's diagnosis) are prompted too.
        fidelity_config = fidelity_config.model_copy(update={"labels": [*attributes, *config.clinical.labels]})
    cache = (Path(config.cache_dir or Path(config.output_dir) / "cache"), data_version)
    real, generated, test_rows = test
    settings = slice_settings(config)
    return measure_fidelity(
        real_train, real, generated, test_rows, attributes, fidelity_config, settings, cache, device
    )


def evaluate_model(
    model_dir: str,
    test_samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    resolution: int,
    config: EvaluationConfig,
    data_version: str | None = None,
    *,
    train_samples: pd.DataFrame | None = None,
    reference_dir: str | None = None,
    baseline: BaselineRun | None = None,
) -> EvaluationReport:
    """Generate images for the test prompts and measure quality, equity and clinical semantics.

    Args:
        model_dir: A saved diffusers pipeline (the trained candidate).
        test_samples: Test rows of the sample table (``subject``, ``prompt``,
            ``image_path``, attributes, clinical labels).
        attributes: Protected attribute -> groups.
        resolution: Generation resolution (the training resolution).
        config: Generation, feature, resampling and classifier settings.
        data_version: The dataset version (DVC md5); ``None`` hashes the test images.
        train_samples: The training rows; the clinical classifier trains on images
            generated from their prompts (without them, no clinical AUCs).
        reference_dir: The model the candidate was fine-tuned from; its FIDs on the same
            test prompts (``ref_base_...``) are what the gate's reference rule compares with.
        baseline: A ``method: baseline`` run on the same data version; the report shows
            the candidate's per-group deltas from its logged metrics.

    Returns:
        The report. Generated images (PNG) and features are cached under
        ``cache_dir``; the report (``evaluation.json``, ``evaluation.md``, ``report.html``,
        ``charts/``, ``grids/``) is written to ``output_dir``.
    """
    test_samples = test_samples.reset_index(drop=True)
    extractor = build_extractor(config.extractor)
    device, dtype = resolve_device(config)
    image_paths = [Path(p) for p in test_samples["image_path"]]
    data_version = data_version or fingerprint_files(image_paths)
    real = load_real_images([str(p) for p in image_paths], resolution)
    images, versions = _generated_for(model_dir, test_samples, real, resolution, extractor, config, data_version)
    real_train = _real_training_images(train_samples, resolution, config)
    train = _clinical_training_images(model_dir, real_train, resolution, extractor, config, data_version)
    measured = _measure(images, real, test_samples, attributes, extractor.name, config, device, train)
    test = (real, images.generated, test_samples)
    fidelity = _fidelity(config, real_train, test, attributes, data_version, device)
    metrics = measured.metrics | floor_metrics(
        images.features.real, images.features.generated, extractor.name, config.seed
    )
    if reference_dir is not None:
        base, _ = _generated_for(reference_dir, test_samples, real, resolution, extractor, config, data_version)
        metrics |= reference_metrics(base.features.real, base.features.generated, extractor.name, config.seed)

    protocol = _protocol(extractor, config, resolution, len(test_samples), device, dtype, versions, images, measured)
    protocol["reference_model"] = reference_dir
    protocol["fidelity"] = FIDELITY_PROTOCOL if fidelity is not None else False
    if fidelity is not None:
        metrics |= flatten_fidelity(fidelity)
        protocol["seconds"] = {**protocol["seconds"], "fidelity": fidelity.seconds}  # type: ignore[dict-item]
    report = EvaluationReport(
        extractor=extractor.name,
        slices=measured.quality.slices,
        equity=measured.quality.equity["fid"],
        metrics=metrics,
        image_dir=str(images_dir(config, versions["cache_key"])),
        num_images=len(images.generated),
        protocol=protocol,
        quality=measured.quality,
        clinical=measured.clinical,
        baseline=None if baseline is None else compare_with_baseline(metrics, baseline, attributes, extractor.name),
        fidelity=fidelity,
    )
    groups = test_samples[list(attributes)]
    return write_report(report, Path(config.output_dir), real, images.generated, groups, attributes, config)


def images_dir(config: EvaluationConfig, key: str) -> Path:
    """Where the generated images of one cache key are."""
    return Path(config.cache_dir or Path(config.output_dir) / "cache") / key / "generated"
