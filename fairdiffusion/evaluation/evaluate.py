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
from fairdiffusion.evaluation.features import FeatureExtractor, build_extractor, extract_features
from fairdiffusion.evaluation.generation import generate_images, resolve_device
from fairdiffusion.evaluation.image_metrics import IMAGE_METRICS, FeatureStatistics
from fairdiffusion.evaluation.metric_keys import flatten_analysis, flatten_metrics, flatten_slice_sizes
from fairdiffusion.evaluation.results import EvaluationReport
from fairdiffusion.evaluation.slices import SliceSettings, analyse_slices, define_slices

#: What the report says about how every FID here was measured.
RESIZE_PROTOCOL = (
    "real: shorter side resized to the generation size with PIL bicubic (antialiased), centre-cropped, "
    "as in training; real and generated alike: bilinear antialiased resize to the feature size "
    "(one function, fairdiffusion.evaluation.features.extract_features)"
)


@dataclass(frozen=True)
class _Features:
    real: np.ndarray
    generated: np.ndarray
    generated_logits: np.ndarray | None
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


def evaluate_model(
    model_dir: str,
    test_samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    resolution: int,
    config: EvaluationConfig,
    data_version: str | None = None,
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

    Returns:
        The report. Generated images (PNG) and features are cached under
        ``cache_dir``; the report (``evaluation.json``, ``evaluation.md``, ``report.html``,
        ``charts/``, ``grids/``) is written to ``output_dir``.
    """
    from fairdiffusion.evaluation.report import write_report

    test_samples = test_samples.reset_index(drop=True)
    extractor = build_extractor(config.extractor)
    device, dtype = resolve_device(config)
    subjects = [str(s) for s in test_samples["subject"]]
    image_paths = [Path(p) for p in test_samples["image_path"]]
    model_version = model_fingerprint(model_dir)
    data_version = data_version or fingerprint_files(image_paths)
    key = cache_key(model_version, data_version, extractor, subjects, resolution, config, str(dtype))
    cache = Path(config.cache_dir or Path(config.output_dir) / "cache") / key
    image_dir = cache / "generated"
    features_file = cache / f"features_{extractor.name}.npz"

    real = load_real_images([str(p) for p in image_paths], resolution)
    pngs = [image_dir / f"{subject}.png" for subject in subjects]
    cached = features_file.is_file() and all(p.is_file() for p in pngs)
    generation: dict[str, object]
    if cached:
        generated = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
        with np.load(features_file) as stored:
            features = _Features(
                stored["real"],
                stored["generated"],
                stored.get("generated_logits"),
                0.0,
            )
        generation = {"cached": True}
    else:
        made = generate_images(model_dir, test_samples["prompt"].tolist(), resolution, config)
        generated = made.images
        image_dir.mkdir(parents=True, exist_ok=True)
        for path, image in zip(pngs, generated, strict=True):
            Image.fromarray(image).save(path)  # PNG: lossless, so features can be recomputed exactly
        features = _extract(extractor, real, generated, config.feature_resolution)
        if features.generated_logits is None:
            np.savez(features_file, real=features.real, generated=features.generated)
        else:
            np.savez(
                features_file,
                real=features.real,
                generated=features.generated,
                generated_logits=features.generated_logits,
            )
        generation = {
            "cached": False,
            "seconds": made.seconds,
            "images_per_second": made.images_per_second,
            "batch_size": config.batch_size,
        }

    started = time.perf_counter()
    statistics = FeatureStatistics(features.real, features.generated, features.generated_logits, device)
    groups = test_samples[list(attributes)]
    slices = define_slices(groups, attributes, config.intersections)
    settings = slice_settings(config)
    quality = analyse_slices(statistics, statistics.metric_names, IMAGE_METRICS, slices, attributes, settings)
    metrics_seconds = time.perf_counter() - started

    clinical = None
    if config.clinical.enabled:
        clinical = evaluate_clinical_semantics(
            generated, real, test_samples, attributes, config.clinical, settings, device
        )

    name = extractor.name
    metrics = flatten_analysis(quality, {m: (m, name) for m in quality.metric_names})
    metrics |= flatten_slice_sizes(quality)
    metrics |= flatten_metrics(quality.slices, quality.equity["fid"], name)
    if clinical is not None:
        tags = {label: ("auc", f"{clinical.classifier}/{label}") for label in clinical.classes}
        metrics |= flatten_analysis(clinical.analysis, tags)

    protocol: dict[str, object] = {
        "extractor": name,
        "extractor_weights_sha256": extractor.weights_hash,
        "feature_resolution": config.feature_resolution,
        "generation_resolution": resolution,
        "resize": RESIZE_PROTOCOL,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "seed": config.seed,
        "seeds": f"image i uses seed {config.seed} + i ({config.seed}..{config.seed + len(subjects) - 1})",
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "num_real": len(real),
        "num_generated": len(generated),
        "model_version": model_version,
        "data_version": data_version,
        "cache_key": key,
        "intersections": config.intersections,
        "bootstrap_resamples": config.bootstrap_resamples,
        "confidence_level": config.confidence_level,
        "ci_method": config.ci_method,
        "matched_draws": config.matched_draws,
        "min_slice_size": config.min_slice_size,
        "generation": generation,
        "clinical": "skipped: no prompted labels in the test rows"
        if config.clinical.enabled and clinical is None
        else config.clinical.enabled,
        "seconds": {
            "feature_extraction": features.seconds,
            "slice_metrics": metrics_seconds,
            "clinical": clinical.seconds if clinical else 0.0,
        },
    }
    report = EvaluationReport(
        extractor=name,
        slices=quality.slices,
        equity=quality.equity["fid"],
        metrics=metrics,
        image_dir=str(image_dir),
        num_images=len(generated),
        protocol=protocol,
        quality=quality,
        clinical=clinical,
    )
    return write_report(report, Path(config.output_dir), real, generated, groups, attributes, config)
