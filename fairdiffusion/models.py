"""Stable Diffusion pipelines: the real loading path, and presets built from the same classes.

``load_pipeline`` is ``StableDiffusionPipeline.from_pretrained`` on a local folder or,
only when the config allows downloads, a hub id. ``build_tiny_pipeline`` writes a
pipeline made of the real diffusers/transformers classes with random weights and tiny
sizes, so the demo and tests exercise exactly the production loading code offline.
The ``sd-1.5`` and ``sd-2.1`` presets are the real architectures at true size with
random weights, built in memory, so throughput can be measured without a download.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fairdiffusion.errors import ConfigError
from fairdiffusion.fairgenmed import CLINICAL_LABELS

_BASE_WORDS = (
    "slo fundus image of a patient with the following conditions vision loss cup-disc ratio "
    "normal asian black white female male non-hispanic hispanic dermoscopic chest radiography "
    "diagnosed age under equal or older diagnostic category benign malignant pleural effusion non"
)


def _tokenizer_vocabulary(
    extra_words: Iterable[str] = (),
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary whose merges spell out each prompt word."""
    words = set(_BASE_WORDS.split()) | {w for labels in CLINICAL_LABELS.values() for w in labels}
    words |= {w.lower() for w in extra_words}
    pieces: set[str] = set()
    for word in words:
        pieces |= {p for p in word.replace("-", " - ").split()}
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(set("abcdefghijklmnopqrstuvwxyz0123456789-,:.'()/")):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for piece in sorted(pieces):
        current = piece[0]
        for index, char in enumerate(piece[1:]):
            nxt = char + ("</w>" if index == len(piece) - 2 else "")
            merges.append((current, nxt))
            current += nxt
            vocab.setdefault(current, len(vocab))
    return vocab, list(dict.fromkeys(merges))


def build_tiny_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Stable Diffusion pipeline (random weights) with ``save_pretrained``.

    The sizes follow diffusers' own tiny test pipelines: a two-level UNet with
    cross-attention, a one-downsample VAE, a small CLIP text encoder and a CLIP BPE
    tokenizer whose vocabulary covers the prompts of the supported datasets.

    Returns:
        The folder, loadable with :func:`load_pipeline`.
    """
    out = Path(out_dir)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=32,
        )
        vocab, merges = _tokenizer_vocabulary()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                projection_dim=32,
            )
        )
    # Built from in-memory files, a CLIPTokenizer has no model_max_length and would
    # let prompts overflow the 77 position embeddings; set it explicitly.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    (out / "fairdiffusion_preset.json").write_text(json.dumps({"preset": "tiny", "seed": seed}))
    return out


#: Full-size architecture presets (random weights, built in memory): diffusers' and
#: transformers' configs of the published checkpoints ``runwayml/stable-diffusion-v1-5``
#: and ``stabilityai/stable-diffusion-2-1``.
SD_PRESETS: dict[str, dict[str, Any]] = {
    "sd-1.5": {
        "unet": {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        "vae_sample_size": 512,
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        "prediction_type": "epsilon",
    },
    "sd-2.1": {
        "unet": {
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
        },
        "vae_sample_size": 768,
        # OpenCLIP ViT-H/14 as diffusers ships it: 23 of its 24 layers (the penultimate output).
        "text": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "hidden_act": "gelu",
            "projection_dim": 512,
        },
        "prediction_type": "v_prediction",
    },
}
#: Every value of ``model.pretrained`` that needs neither a folder nor a download.
PRESETS = ("tiny", *SD_PRESETS)


def build_preset_components(
    name: str, seed: int = 0, device: torch.device | str | None = None
) -> tuple[CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel, DDPMScheduler]:
    """The training components of a full-size preset, with random weights.

    Args:
        name: ``sd-1.5`` or ``sd-2.1``.
        seed: Seed of the random initialisation.
        device: Where the weights are created (a GPU builds an 865M-parameter UNet in
            a second; the CPU takes much longer); ``meta`` allocates nothing.

    Returns:
        Tokenizer, text encoder, VAE, UNet and noise scheduler, as
        :func:`load_training_components` returns them. The tokenizer is the offline
        one of the tiny pipeline (prompts are padded to 77 tokens either way, so the
        compute is the real model's).
    """
    preset = SD_PRESETS[name]
    with torch.random.fork_rng(), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=32,
            **preset["unet"],
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            norm_num_groups=32,
            sample_size=preset["vae_sample_size"],
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=1,
                **preset["text"],
            )
        )
    vocab, merges = _tokenizer_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        num_train_timesteps=1000,
        prediction_type=preset["prediction_type"],
    )
    return tokenizer, text_encoder, vae, unet, scheduler


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


def load_pipeline(source: str, allow_download: bool = False) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline with ``from_pretrained`` (the production path)."""
    return StableDiffusionPipeline.from_pretrained(
        source,
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=not allow_download,
    )


def load_training_components(
    source: str, allow_download: bool = False, seed: int = 0, device: torch.device | str | None = None
) -> tuple[CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel, DDPMScheduler]:
    """Load the pieces fine-tuning needs, as diffusers' ``train_text_to_image.py`` does.

    ``source`` is a folder or hub id, or a full-size preset name (``sd-1.5``, ``sd-2.1``),
    which :func:`build_preset_components` builds with ``seed`` directly on ``device``.
    """
    if source in SD_PRESETS:
        return build_preset_components(source, seed=seed, device=device)
    kwargs = {"local_files_only": not allow_download}
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


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
