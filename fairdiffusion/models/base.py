"""The demo's base model: a tiny Stable Diffusion the project pretrains itself, seeded.

The paper fine-tunes a *pretrained* Stable Diffusion. No such weights can be fetched here,
so the project builds its own stand-in once (``fairdiffusion base build`` / ``make base``),
versions it with DVC next to the data (``base-model.dvc``) and every run pulls it:

- the VAE (``AutoencoderKL``) is trained as an autoencoder on the pretraining set;
- the UNet (``UNet2DConditionModel``) is trained to denoise that set's latents, conditioned
  on its prompts (10% left empty, so classifier-free guidance works, as in SD);
- the CLIP text encoder stays randomly initialised and frozen: distinct tokens still give
  distinct embeddings, which is all the conditioning needs;
- the domain feature extractor for FID (:mod:`fairdiffusion.models.extractor`) is trained on
  the same set and ships in ``extractor/``.

The pretraining set (:mod:`fairdiffusion.data.pretraining`) is generic fundus images with no
demographic signal; the demo dataset is never seen here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from fairdiffusion.data.pretraining import LOOK_WORDS, PretrainingSet, generate_pretraining_set
from fairdiffusion.errors import ConfigError
from fairdiffusion.models.extractor import FundusDecoder, FundusEncoder, save_extractor
from fairdiffusion.models.tiny import build_text_encoder

logger = logging.getLogger(__name__)

#: Written into the bundle: how it was built, and what its training reached.
BUILD_FILE = "fairdiffusion_base.json"
_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

Progress = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class BaseBuildSpec:
    """Sizes, steps and seed of the base bundle; the defaults are what ``base-model.dvc`` holds."""

    resolution: int = 32
    images: int = 2000
    seed: int = 0
    batch_size: int = 32
    vae_batch_size: int = 16
    vae_steps: int = 3000
    unet_steps: int = 3000
    extractor_steps: int = 600
    extractor_dim: int = 64
    #: One downsample: 32-px images to 16 x 16 x 4 latents. Measured (benchmarks/bench_vae_roundtrip.py):
    #: with two (8 x 8 latents) the round trip erased the rare group's texture and the cup.
    vae_channels: tuple[int, ...] = (32, 64)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    prompt_dropout: float = 0.1
    #: Offset noise (Guttenberg 2023; diffusers' ``--noise_offset``): a per-image, per-channel
    #: constant added to the noise. Off: zero terminal SNR below fixes what it patches
    #: (measured with the demo's fine-tune: offset 0.1 lifted White's recognition from 0.47
    #: to 0.60 only; zero terminal SNR to 0.91).
    noise_offset: float = 0.0
    #: Zero terminal SNR (Lin et al. 2024, "Common diffusion noise schedules and sample steps
    #: are flawed"): betas rescaled so the last timestep is pure noise, v-prediction, and
    #: trailing timesteps at sampling. Without it the model reads an image's mean brightness
    #: from what the last timestep leaks in training, and at sampling, from pure noise, can
    #: draw only the average brightness whatever the prompt says. Measured (issue 26): without
    #: it, the demo's fine-tune drew White patients at 56-60 of 255 (real 67) and vision loss
    #: at chance; with it, 67 and vision loss above the real images' margin.
    zero_terminal_snr: bool = True
    #: The pretraining images are drawn at the demo images' size and downsampled as training
    #: downsamples them, so the VAE learns the look it will be asked to encode.
    render_size: int = 64


@dataclass(frozen=True)
class BaseBuildResult:
    """Where the bundle is, and how its parts trained."""

    bundle_dir: str
    seconds: dict[str, float]
    final_losses: dict[str, float]
    scaling_factor: float


def _as_rgb(images: np.ndarray) -> torch.Tensor:
    """Grayscale uint8 N x H x W -> float N x 3 x H x W in [-1, 1]."""
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator):  # noqa: ANN202
    for _ in range(steps):
        yield torch.randint(0, count, (batch_size,), generator=generator)


def build_vae(resolution: int, channels: tuple[int, ...]) -> AutoencoderKL:
    """An SD-layout VAE with ``len(channels)`` levels (one downsample fewer), 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=resolution,
    )


def latent_size(resolution: int, vae_channels: tuple[int, ...]) -> int:
    """The latent side of a ``resolution``-px image: one halving per VAE level but the last."""
    return resolution // 2 ** (len(vae_channels) - 1)


def build_unet(sample_size: int, channels: tuple[int, ...], cross_attention_dim: int) -> UNet2DConditionModel:
    """A UNet on ``sample_size`` latents with cross-attention (the prompt) on every level but the lowest.

    As SD 2.1 (cross-attention on three of its four levels): the prompt reaches the layers
    that draw texture and small structures, not only the coarse layout.
    """
    attended = len(channels) - 1
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * attended + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * attended,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def train_vae(images: torch.Tensor, spec: BaseBuildSpec, generator: torch.Generator) -> tuple[AutoencoderKL, float]:
    """Reconstruction (MSE) plus a small KL term, as an SD-style VAE without its GAN loss."""
    vae = build_vae(spec.resolution, spec.vae_channels)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=spec.vae_steps, pct_start=0.1)
    loss_value = float("nan")
    for rows in _batches(len(images), spec.vae_batch_size, spec.vae_steps, generator):
        x = images[rows]
        posterior = vae.encode(x).latent_dist
        # Decoded from the latent mean: trained on sampled latents, the decoder learnt to blur
        # away what the sampling noise hid (measured: the rare group's texture, 0% kept).
        loss = F.mse_loss(vae.decode(posterior.mean).sample, x) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        loss_value = float(loss.detach())
    _fix_log_variance(vae, _LOG_VARIANCE)
    return vae.eval().requires_grad_(False), loss_value


#: The posterior's fixed log-variance (std 3e-7, the floor diffusers clamps it to): the VAE
#: is a deterministic autoencoder, so a fine-tune's ``latent_dist`` sample is its mean.
_LOG_VARIANCE = -30.0


@torch.no_grad()
def _fix_log_variance(vae: AutoencoderKL, value: float) -> None:
    """Set the log-variance half of ``quant_conv``'s output to a constant (weights 0, bias ``value``)."""
    half = vae.config.latent_channels
    vae.quant_conv.weight[half:] = 0.0
    vae.quant_conv.bias[half:] = value


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Latent means and stds of every image, and the scaling factor that gives them unit variance."""
    means, stds = [], []
    for start in range(0, len(images), 128):
        posterior = vae.encode(images[start : start + 128]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean = torch.cat(means)
    return mean, torch.cat(stds), float(1.0 / mean.std())


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Hidden states of each prompt, padded to 77 tokens exactly as the pipeline pads them."""
    states = []
    for start in range(0, len(prompts), 256):
        ids = tokenizer(
            prompts[start : start + 256], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        states.append(encoder(ids)[0])
    return torch.cat(states)


def noise_schedule(spec: BaseBuildSpec) -> dict[str, object]:
    """The bundle's noise schedule (SD's scaled-linear betas), with zero terminal SNR when the spec asks."""
    if not spec.zero_terminal_snr:
        return dict(_SCHEDULE)
    zero_snr = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    return _SCHEDULE | zero_snr


def offset_noise(shape: torch.Size, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise plus ``offset`` times one Gaussian constant per image and channel (0: plain noise)."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=generator)
    return noise


def train_unet(
    latents: tuple[torch.Tensor, torch.Tensor, float],
    text: tuple[torch.Tensor, torch.Tensor],
    spec: BaseBuildSpec,
    generator: torch.Generator,
) -> tuple[UNet2DConditionModel, float]:
    """Denoising (epsilon prediction) on the pretraining latents, with prompt dropout for guidance."""
    mean, std, scaling = latents
    states, empty = text
    unet = build_unet(mean.shape[-1], spec.unet_channels, states.shape[-1])
    scheduler = DDPMScheduler(**noise_schedule(spec))
    optimiser = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=1e-3, total_steps=spec.unet_steps, pct_start=0.05)
    loss_value = float("nan")
    for rows in _batches(len(mean), spec.batch_size, spec.unet_steps, generator):
        z = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator)) * scaling
        noise = offset_noise(z.shape, spec.noise_offset, generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=generator)
        dropped = torch.rand(len(rows), generator=generator) < spec.prompt_dropout
        context = torch.where(dropped[:, None, None], empty, states[rows])
        prediction = unet(scheduler.add_noise(z, noise, t), t, context).sample
        target = scheduler.get_velocity(z, noise, t) if spec.zero_terminal_snr else noise
        loss = F.mse_loss(prediction, target)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        loss_value = float(loss.detach())
    return unet.eval(), loss_value


def train_extractor(
    images: torch.Tensor, spec: BaseBuildSpec, generator: torch.Generator
) -> tuple[FundusEncoder, float]:
    """The FID encoder, as the bottleneck of an autoencoder on the pretraining images."""
    encoder = FundusEncoder(spec.extractor_dim, spec.resolution)
    decoder = FundusDecoder(spec.extractor_dim, spec.resolution)
    parameters = [*encoder.parameters(), *decoder.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=1e-3, total_steps=spec.extractor_steps)
    loss_value = float("nan")
    for rows in _batches(len(images), spec.batch_size, spec.extractor_steps, generator):
        x = images[rows]
        loss = F.mse_loss(decoder(encoder((x + 1) / 2)), x)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        loss_value = float(loss.detach())
    return encoder.eval().requires_grad_(False), loss_value


def _timed(seconds: dict[str, float], name: str, progress: Progress, work: Callable[[], T]) -> T:
    progress(f"base model: {name} ...")
    started = time.perf_counter()
    out = work()
    seconds[name] = round(time.perf_counter() - started, 1)
    progress(f"base model: {name} done in {seconds[name]:.0f} s")
    return out


def check_bundle_resolution(source: str, resolution: int) -> None:
    """Refuse, before training, a pipeline folder built for another image size than ``resolution``.

    Raises:
        ConfigError: naming both sizes and the files they come from.
    """
    folder = Path(source)
    vae_file, unet_file = folder / "vae" / "config.json", folder / "unet" / "config.json"
    if not vae_file.is_file() or not unet_file.is_file():
        return  # not a local diffusers folder: from_pretrained reports what is wrong
    vae, unet = json.loads(vae_file.read_text()), json.loads(unet_file.read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    built = int(unet["sample_size"]) * factor
    if built != resolution:
        raise ConfigError(
            f"model.pretrained: training.resolution is {resolution}, but {folder} was built for {built} x {built} "
            f"images ({unet_file} sample_size {unet['sample_size']} x the VAE's downsampling {factor}); "
            "set training.resolution to match, or build a bundle for that size"
        )


#: Measures the written bundle on its pretraining set; what it returns is recorded in :data:`BUILD_FILE`.
Check = Callable[[Path, PretrainingSet], dict[str, object]]


def build_base_bundle(
    out_dir: str | Path,
    spec: BaseBuildSpec | None = None,
    progress: Progress = logger.info,
    check: Check | None = None,
) -> BaseBuildResult:
    """Pretrain the base bundle and write it with ``save_pretrained`` (safetensors).

    Args:
        out_dir: The bundle folder (created; replaced if it exists).
        spec: Sizes, steps and seed; the defaults are the versioned bundle's.
        progress: Receives one line per phase.
        check: Run on the written bundle and its pretraining set (the CLI passes the prompt
            fidelity of :mod:`fairdiffusion.evaluation.base_fidelity`); its result is recorded.
    """
    spec = spec or BaseBuildSpec()
    out = Path(out_dir)
    seconds: dict[str, float] = {}
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    data = _timed(
        seconds,
        "pretraining set",
        progress,
        lambda: generate_pretraining_set(spec.images, spec.resolution, spec.seed, spec.render_size),
    )
    images = _as_rgb(data.images)
    vae, vae_loss = _timed(seconds, "vae", progress, lambda: train_vae(images, spec, generator))
    latents = encode_latents(vae, images)
    # The text encoder stays random and frozen: distinct tokens still give distinct embeddings.
    tokenizer, text_encoder = build_text_encoder(hidden_size=64, intermediate_size=128, extra_words=LOOK_WORDS)
    text_encoder.requires_grad_(False).eval()
    states = encode_prompts(tokenizer, text_encoder, data.prompts)
    empty = encode_prompts(tokenizer, text_encoder, [""])
    unet, unet_loss = _timed(seconds, "unet", progress, lambda: train_unet(latents, (states, empty), spec, generator))
    encoder, enc_loss = _timed(seconds, "extractor", progress, lambda: train_extractor(images, spec, generator))
    vae.register_to_config(scaling_factor=latents[2])
    _save_bundle(out, (tokenizer, text_encoder, vae, unet), encoder, noise_schedule(spec))
    checked = _timed(seconds, "check", progress, lambda: check(out, data)) if check else {}
    result = BaseBuildResult(str(out), seconds, {"vae": vae_loss, "unet": unet_loss, "extractor": enc_loss}, latents[2])
    record = {"spec": asdict(spec), "result": asdict(result) | {"bundle_dir": None}} | checked
    (out / BUILD_FILE).write_text(json.dumps(record, indent=2, default=float) + "\n")
    return result


def _save_bundle(
    out: Path,
    parts: tuple[CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel],
    encoder: FundusEncoder,
    schedule: dict[str, object],
) -> None:
    tokenizer, text_encoder, vae, unet = parts
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    pipeline.save_pretrained(out, safe_serialization=True)
    save_extractor(encoder, out)
