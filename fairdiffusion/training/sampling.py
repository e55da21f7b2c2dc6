"""Validation grids: samples of the model being trained, one row per subgroup.

As diffusers' ``log_validation`` in ``train_text_to_image.py``: every
``training.sampling.every`` steps the main process assembles a pipeline around the
UNet being trained (its EMA weights when there are some), generates
``images_per_group`` images for one training prompt of each subgroup, and hands the
grid to the caller (who logs it to MLflow).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from PIL import Image

from fairdiffusion.config import TrainingConfig
from fairdiffusion.models.loading import ModelComponents, assemble_pipeline

#: Called with ``(local folder, artifact path)``; the caller uploads the folder's files.
ArtifactCallback = Callable[[Path, str], None]


def build_validation_prompts(samples: pd.DataFrame, attributes: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """One training prompt per subgroup, ``(attribute=group, prompt)``."""
    prompts = []
    for attribute, groups in attributes.items():
        for group in groups:
            rows = samples[samples[attribute] == group]
            if len(rows):
                prompts.append((f"{attribute}={group}", str(rows["prompt"].iloc[0])))
    return prompts


@torch.no_grad()
def save_validation_grid(
    pipeline: Any,
    prompts: list[tuple[str, str]],
    config: TrainingConfig,
    step: int,
    dtype: torch.dtype,
    log_artifact: ArtifactCallback | None,
) -> Path:
    """A grid (one row per subgroup) of generated samples, saved and handed to ``log_artifact``."""
    pipeline.set_progress_bar_config(disable=True)
    device = pipeline.unet.device
    per_group = config.sampling.images_per_group
    rows = []
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _, prompt in prompts:
            generators = [torch.Generator(device).manual_seed(config.seed + i) for i in range(per_group)]
            rows.append(
                pipeline(
                    [prompt] * len(generators),
                    num_inference_steps=config.sampling.inference_steps,
                    height=config.resolution,
                    width=config.resolution,
                    generator=generators,
                ).images
            )
    size = config.resolution
    grid = Image.new("RGB", (size * per_group, size * len(rows)))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * size, r * size))
    folder = Path(config.output_dir) / "validation" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / "grid.png")
    (folder / "rows.json").write_text(
        json.dumps([{"row": i, "group": g, "prompt": p} for i, (g, p) in enumerate(prompts)])
    )
    if log_artifact is not None:
        log_artifact(folder, f"training/validation/step-{step:06d}")
    return folder


def sample_validation_grid(
    components: ModelComponents,
    unet: Any,
    accelerator: Accelerator,
    ema: Any,
    trainable: list[torch.nn.Parameter],
    prompts: list[tuple[str, str]],
    config: TrainingConfig,
    step: int,
    dtype: torch.dtype,
    log_artifact: ArtifactCallback | None,
) -> None:
    """Samples the UNet being trained (``unet``, as prepared by accelerate) into a validation grid."""
    model = accelerator.unwrap_model(unet)
    pipeline = assemble_pipeline(*components._replace(unet=model))
    model.eval()
    if ema is not None:
        # As diffusers does: sample with the EMA weights, then put the trained ones back.
        ema.store(trainable)
        ema.copy_to(trainable)
    try:
        save_validation_grid(pipeline, prompts, config, step, dtype, log_artifact)
    finally:
        if ema is not None:
            ema.restore(trainable)
        model.train()
