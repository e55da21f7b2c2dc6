"""Evaluation of a trained pipeline on the held-out test prompts, per subgroup.

One image is generated per test subject from that subject's prompt, with a seed
derived from the evaluation seed and the subject's position, so the same model, prompts
and seed give the same images. Features are extracted once for all real and all
generated images; every slice's FID is computed from those cached features.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fairdiffusion.config import EvaluationConfig
from fairdiffusion.features import build_extractor, extract_features
from fairdiffusion.metrics import OVERALL, compute_slice_metrics, equity_scaled, flatten_metrics
from fairdiffusion.models import load_pipeline


@dataclass(frozen=True)
class EvaluationReport:
    """Per-slice FID and per-attribute equity-scaled FID of one model on one test split."""

    extractor: str
    slices: dict[str, dict[str, float]]
    equity: dict[str, dict[str, float | str]]
    metrics: dict[str, float]
    image_dir: str
    num_images: int
    protocol: dict[str, object]

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form (the ``evaluation.json`` artifact)."""
        return asdict(self)

    def to_markdown(self) -> str:
        """A readable table of every slice and the equity-scaled values."""
        lines = [
            f"# Evaluation ({self.extractor} features)",
            "",
            f"FID uses `{self.extractor}` features; it is comparable only with FIDs of the same extractor.",
            "",
            "| slice | FID | images |",
            "|---|---:|---:|",
        ]
        for name, values in self.slices.items():
            lines.append(f"| {name} | {values['fid']:.4f} | {int(values['num_samples'])} |")
        lines += [
            "",
            "| attribute | ES-FID | disparity D | largest gap | worst-off group |",
            "|---|---:|---:|---:|---|",
        ]
        for attribute, v in self.equity.items():
            lines.append(
                f"| {attribute} | {float(v['es']):.4f} | {float(v['disparity']):.4f} | "
                f"{float(v['max_gap']):.4f} | {v['worst_group']} |"
            )
        lines += [
            "",
            "ES-FID = FID_overall * (1 + D), D = sum over groups of |FID_overall - FID_group| "
            "(FairDiffusion Sec. 4.2; lower is better).",
        ]
        return "\n".join(lines) + "\n"


def load_real_images(image_paths: Sequence[str], resolution: int) -> np.ndarray:
    """Real test images as uint8 RGB (N x res x res x 3), resized antialiased (PIL bicubic)."""
    images = []
    for path in image_paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
            images.append(np.asarray(rgb, dtype=np.uint8))
    return np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8)


def generate_images(
    model_dir: str,
    prompts: Sequence[str],
    resolution: int,
    config: EvaluationConfig,
) -> np.ndarray:
    """Generate one image per prompt (uint8 RGB), batched, with a fixed seed per prompt."""
    pipeline = load_pipeline(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    outputs = []
    for start in range(0, len(prompts), config.batch_size):
        batch = list(prompts[start : start + config.batch_size])
        generators = [torch.Generator().manual_seed(config.seed + start + i) for i in range(len(batch))]
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
    return np.concatenate(outputs) if outputs else np.zeros((0, resolution, resolution, 3), np.uint8)


def evaluate_model(
    model_dir: str,
    test_samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    resolution: int,
    config: EvaluationConfig,
) -> EvaluationReport:
    """Generate images for the test prompts and compute FID overall and per subgroup.

    Args:
        model_dir: A saved diffusers pipeline (the trained candidate).
        test_samples: Test rows of the sample table (``prompt``, ``image_path``, attributes).
        attributes: Protected attribute -> groups.
        resolution: Generation resolution (the training resolution).
        config: Generation and feature settings.

    Returns:
        The report; generated images are written losslessly (PNG) under ``output_dir``.
    """
    extractor = build_extractor(config.extractor)
    out_dir = Path(config.output_dir) / "generated"
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = test_samples["prompt"].tolist()
    generated = generate_images(model_dir, prompts, resolution, config)
    for subject, image in zip(test_samples["subject"], generated, strict=True):
        Image.fromarray(image).save(out_dir / f"{subject}.png")
    real = load_real_images(test_samples["image_path"].tolist(), resolution)

    real_features = extract_features(extractor, torch.from_numpy(real), config.feature_resolution).numpy()
    generated_features = extract_features(extractor, torch.from_numpy(generated), config.feature_resolution).numpy()
    groups = test_samples[list(attributes)].reset_index(drop=True)
    slices = compute_slice_metrics(real_features, generated_features, groups, attributes)
    equity = {
        attribute: equity_scaled(
            slices[OVERALL]["fid"],
            {g: slices[f"{attribute}/{g}"]["fid"] for g in names},
            higher_is_better=False,
        )
        for attribute, names in attributes.items()
    }
    protocol: dict[str, object] = {
        "extractor": extractor.name,
        "feature_resolution": config.feature_resolution,
        "resize": "real: PIL bicubic to generation size; both: bilinear antialiased to feature size",
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "seed": config.seed,
        "num_real": len(real),
        "num_generated": len(generated),
    }
    report = EvaluationReport(
        extractor=extractor.name,
        slices=slices,
        equity=equity,
        metrics=flatten_metrics(slices, equity, extractor.name),
        image_dir=str(out_dir),
        num_images=len(generated),
        protocol=protocol,
    )
    (Path(config.output_dir) / "evaluation.json").write_text(json.dumps(report.to_dict(), indent=2))
    (Path(config.output_dir) / "evaluation.md").write_text(report.to_markdown())
    return report
