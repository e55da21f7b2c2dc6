"""The tiny pipeline: the real diffusers/transformers classes at toy sizes, random weights.

Tests build it so they exercise exactly the production loading code offline.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fairdiffusion.data.catalog import CLINICAL_LABELS

_BASE_WORDS = (
    "slo fundus image of a patient with the following conditions vision loss cup-disc ratio "
    "normal asian black white female male non-hispanic hispanic dermoscopic chest radiography "
    "diagnosed age under equal or older diagnostic category benign malignant pleural effusion non"
)


def tokenizer_vocabulary(
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


def build_text_encoder(
    hidden_size: int, intermediate_size: int, extra_words: Iterable[str] = ()
) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """The prompt vocabulary's tokenizer (plus ``extra_words``) and a small random CLIP text encoder.

    Two layers, four heads.
    """
    vocab, merges = tokenizer_vocabulary(extra_words)
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=hidden_size,
        )
    )
    # Built from in-memory files, a CLIPTokenizer has no model_max_length and would
    # let prompts overflow the 77 position embeddings; set it explicitly.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77), encoder


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
        tokenizer, text_encoder = build_text_encoder(hidden_size=32, intermediate_size=37)
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
