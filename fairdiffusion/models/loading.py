"""Stable Diffusion pipelines: the real loading path, and presets built from the same classes.

``load_pipeline`` is ``StableDiffusionPipeline.from_pretrained`` on a local folder or,
only when the config allows downloads, a hub id. ``build_tiny_pipeline`` writes a
pipeline made of the real diffusers/transformers classes with random weights and tiny
sizes, so the demo and tests exercise exactly the production loading code offline.
The ``sd-1.5`` and ``sd-2.1`` presets are the real architectures at true size with
random weights, built in memory, so throughput can be measured without a download.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from fairdiffusion.config import ModelConfig
from fairdiffusion.errors import ConfigError
from fairdiffusion.models.presets import SD_PRESETS, ModelComponents, build_preset_components
from fairdiffusion.models.tiny import build_tiny_pipeline


def resolve_pretrained(pretrained: str, tiny_dir: str | Path, allow_download: bool) -> str:
    """Turn the config's ``model.pretrained`` into something ``from_pretrained`` accepts.

    ``tiny`` builds (once) and returns the tiny pipeline's folder; ``sd-1.5`` and
    ``sd-2.1`` are returned as they are (built in memory by
    :func:`load_training_components`); a local folder is returned as is; a hub id is
    returned only when downloads are allowed.

    Raises:
        ConfigError: for a hub id without ``allow_download``, or a folder that is not
            a diffusers pipeline.
    """
    if pretrained == "tiny":
        folder = Path(tiny_dir)
        if not (folder / "model_index.json").is_file():
            build_tiny_pipeline(folder)
        return str(folder)
    if pretrained in SD_PRESETS:
        return pretrained
    folder = Path(pretrained)
    if folder.exists():
        if not (folder / "model_index.json").is_file():
            raise ConfigError(f"model.pretrained: {folder} has no model_index.json (not a diffusers pipeline)")
        return str(folder)
    if not allow_download:
        raise ConfigError(
            f"model.pretrained: '{pretrained}' is not a local folder, and downloading it from a hub "
            "needs model.allow_download: true"
        )
    return pretrained


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No loading bars from diffusers and transformers inside the block (restored after).

    Their "Loading pipeline components" and "Loading weights" bars take well under a
    second here and land as noise in Prefect and CI logs; nothing a user can act on.
    """
    bars = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in bars:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in bars:
            if enabled:
                lib.enable_progress_bar()


def load_pipeline(source: str, allow_download: bool = False) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline with ``from_pretrained`` (the production path)."""
    with quiet_loading():
        return StableDiffusionPipeline.from_pretrained(
            source,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=not allow_download,
        )


def load_training_components(
    source: str, allow_download: bool = False, seed: int = 0, device: torch.device | str | None = None
) -> ModelComponents:
    """Load the pieces fine-tuning needs, as diffusers' ``train_text_to_image.py`` does.

    ``source`` is a folder or hub id, or a full-size preset name (``sd-1.5``, ``sd-2.1``),
    which :func:`build_preset_components` builds with ``seed`` directly on ``device``.
    """
    if source in SD_PRESETS:
        return build_preset_components(source, seed=seed, device=device)
    kwargs = {"local_files_only": not allow_download}
    with quiet_loading():
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    return ModelComponents(tokenizer, text_encoder, vae, unet, noise_scheduler)


def assemble_pipeline(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
) -> StableDiffusionPipeline:
    """A pipeline from in-memory components, sampling with DDIM on the training schedule."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def reference_model(model: ModelConfig) -> str | None:
    """The pretrained pipeline a candidate is compared with (the gate's reference rule).

    A local folder or, with downloads allowed, a hub id; ``None`` for the random-weight
    presets, which are no reference a fine-tune should be measured against.
    """
    if model.pretrained in SD_PRESETS:
        return None
    return resolve_pretrained(model.pretrained, model.tiny_dir, model.allow_download)
