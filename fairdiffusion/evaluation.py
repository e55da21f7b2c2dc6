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
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fairdiffusion.clinical import ClinicalResult, evaluate_clinical_semantics
from fairdiffusion.config import EvaluationConfig
from fairdiffusion.features import FeatureExtractor, build_extractor, extract_features
from fairdiffusion.metrics import (
    IMAGE_METRICS,
    FeatureStatistics,
    SliceAnalysis,
    SliceSettings,
    analyse_slices,
    define_slices,
    flatten_analysis,
    flatten_metrics,
    flatten_slice_sizes,
)

#: What the report says about how every FID here was measured.
RESIZE_PROTOCOL = (
    "real: shorter side resized to the generation size with PIL bicubic (antialiased), centre-cropped, "
    "as in training; real and generated alike: bilinear antialiased resize to the feature size "
    "(one function, fairdiffusion.features.extract_features)"
)


@dataclass(frozen=True)
class EvaluationReport:
    """Per-slice image quality, equity, and clinical semantics of one model on one test split.

    ``slices``, ``equity`` and ``metrics`` keep the shapes the gate reads: ``slices`` is
    ``{slice: {metric: value, "num_samples": n}}``, ``equity`` the FID equity per
    attribute, ``metrics`` every flat key (see :mod:`fairdiffusion.metrics`).
    """

    extractor: str
    slices: dict[str, dict[str, float]]
    equity: dict[str, dict[str, float | str]]
    metrics: dict[str, float]
    image_dir: str
    num_images: int
    protocol: dict[str, object]
    quality: SliceAnalysis | None = None
    clinical: ClinicalResult | None = None
    #: Attribute -> sample grid PNG (real beside generated, per group).
    grids: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form (the ``evaluation.json`` artifact)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Inverse of :meth:`to_dict` (e.g. an ``evaluation.json`` read back from MLflow)."""
        raw = dict(data)
        if raw.get("quality") is not None:
            raw["quality"] = SliceAnalysis.from_dict(raw["quality"])
        if raw.get("clinical") is not None:
            raw["clinical"] = ClinicalResult.from_dict(raw["clinical"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_markdown(self) -> str:
        """The Markdown summary: every metric per slice with intervals, equity, definitions."""
        from fairdiffusion.report import render_markdown

        return render_markdown(self)


@dataclass(frozen=True)
class GeneratedImages:
    """Images generated for the test prompts, and what it cost."""

    images: np.ndarray  # uint8 N x H x W x 3
    seconds: float
    device: str
    dtype: str

    @property
    def images_per_second(self) -> float:
        """Generation throughput."""
        return len(self.images) / self.seconds if self.seconds > 0 else float("nan")


def resolve_device(config: EvaluationConfig) -> tuple[str, torch.dtype]:
    """The device and dtype generation runs in: fp16 on a GPU, fp32 on the CPU, unless set."""
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = config.precision
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "fp32"
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return device, dtypes[precision]


def load_real_images(image_paths: Sequence[str], resolution: int) -> np.ndarray:
    """Real test images as uint8 RGB (N x res x res x 3), prepared as training prepares them.

    Shorter side resized to ``resolution`` (PIL bicubic, antialiased), then centre-cropped:
    the model learnt that view of the data, so its samples are compared with it.
    """
    images = []
    for path in image_paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            scale = resolution / min(rgb.size)
            size = (max(resolution, round(rgb.width * scale)), max(resolution, round(rgb.height * scale)))
            rgb = rgb.resize(size, Image.Resampling.BICUBIC)
            left, top = (rgb.width - resolution) // 2, (rgb.height - resolution) // 2
            rgb = rgb.crop((left, top, left + resolution, top + resolution))
            images.append(np.asarray(rgb, dtype=np.uint8))
    return np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8)


def generate_images(
    model_dir: str,
    prompts: Sequence[str],
    resolution: int,
    config: EvaluationConfig,
    batch_size: int | None = None,
) -> GeneratedImages:
    """Generate one image per prompt (uint8 RGB), batched, with seed ``config.seed + i`` for prompt i.

    Each prompt gets its own generator, so its initial noise, and hence its image, does
    not depend on the batch it falls in.

    Args:
        model_dir: A saved diffusers pipeline.
        prompts: One prompt per image.
        resolution: Height and width of the images.
        config: Steps, guidance, seed, device and precision.
        batch_size: Overrides ``config.batch_size`` (the benchmark's batch-1 run).
    """
    # Imported here: reading a report back (``fairdiffusion report``) needs no diffusers.
    from fairdiffusion.models import load_pipeline

    device, dtype = resolve_device(config)
    batch_size = batch_size or config.batch_size
    pipeline = load_pipeline(model_dir).to(device=device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    outputs = []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        generators = [torch.Generator(device).manual_seed(config.seed + start + i) for i in range(len(batch))]
        with torch.inference_mode():
            result = pipeline(
                batch,
                height=resolution,
                width=resolution,
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                generator=generators,
                output_type="np",
            )
        outputs.append((np.clip(result.images, 0, 1) * 255).round().astype(np.uint8))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    images = np.concatenate(outputs) if outputs else np.zeros((0, resolution, resolution, 3), np.uint8)
    return GeneratedImages(images, seconds, device, str(dtype).removeprefix("torch."))


def fingerprint_files(paths: Sequence[Path]) -> str:
    """sha256 over the names and bytes of some files (a model's or a data split's version)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model_dir: str) -> str:
    """Version of a saved pipeline: a hash of its weights and configs."""
    root = Path(model_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".json", ".txt"})
    return fingerprint_files(files)


def _cache_key(
    model_version: str,
    data_version: str,
    extractor: FeatureExtractor,
    subjects: Sequence[str],
    resolution: int,
    config: EvaluationConfig,
    dtype: str,
) -> str:
    key = {
        "model": model_version,
        "data": data_version,
        "extractor": [extractor.name, extractor.weights_hash, config.feature_resolution],
        "generation": [config.num_inference_steps, config.guidance_scale, config.seed, resolution, dtype],
        "subjects": list(subjects),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


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
    from fairdiffusion.report import write_report

    test_samples = test_samples.reset_index(drop=True)
    extractor = build_extractor(config.extractor)
    device, dtype = resolve_device(config)
    subjects = [str(s) for s in test_samples["subject"]]
    image_paths = [Path(p) for p in test_samples["image_path"]]
    model_version = model_fingerprint(model_dir)
    data_version = data_version or fingerprint_files(image_paths)
    key = _cache_key(model_version, data_version, extractor, subjects, resolution, config, str(dtype))
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
