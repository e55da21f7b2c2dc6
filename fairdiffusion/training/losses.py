"""The per-sample denoising loss of the training loop, shared by the real and the synthetic batches."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def min_snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as diffusers' ``train_text_to_image.py`` computes them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: Any,
    snr_gamma: float | None,
) -> torch.Tensor:
    """Mean squared error of each sample ``(N,)``, Min-SNR weighted when ``snr_gamma`` is set."""
    losses = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.dim())))
    if snr_gamma is not None:
        losses = losses * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return losses


def diffusion_target(
    noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or v for a ``v_prediction`` scheduler."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise
