"""Image generation for the test prompts: batched, one seeded generator per prompt."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from fairdiffusion.config import EvaluationConfig
from fairdiffusion.evaluation.progress import progress_bar
from fairdiffusion.evaluation.results import GeneratedImages


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
    from fairdiffusion.models.loading import load_pipeline

    device, dtype = resolve_device(config)
    batch_size = batch_size or config.batch_size
    pipeline = load_pipeline(model_dir)
    # Cast only to change the dtype: diffusers warns about float32-kept modules on every
    # `.to(dtype=...)`, a no-op fp32 -> fp32 cast on the CPU included.
    pipeline = pipeline.to(device) if pipeline.dtype == dtype else pipeline.to(device=device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    outputs = []
    started = time.perf_counter()
    with progress_bar(len(prompts), "generating", "image") as bar:
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
            bar.update(len(batch))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    images = np.concatenate(outputs) if outputs else np.zeros((0, resolution, resolution, 3), np.uint8)
    return GeneratedImages(images, seconds, device, str(dtype).removeprefix("torch."))
