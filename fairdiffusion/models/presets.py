"""Full-size presets (``sd-1.5``, ``sd-2.1``): the real architectures with random weights, built in memory.

They let throughput be measured without a download.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fairdiffusion.models.tiny import tokenizer_vocabulary


class ModelComponents(NamedTuple):
    """The pieces fine-tuning needs, in the order diffusers' ``train_text_to_image.py`` loads them.

    A tuple, so ``tokenizer, text_encoder, vae, unet, noise_scheduler = components`` works.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


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


def build_preset_components(name: str, seed: int = 0, device: torch.device | str | None = None) -> ModelComponents:
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
    vocab, merges = tokenizer_vocabulary()
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
    return ModelComponents(tokenizer, text_encoder, vae, unet, scheduler)
