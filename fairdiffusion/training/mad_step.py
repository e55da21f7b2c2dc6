"""The MADness regulariser inside the training loop: the model's own batch, and the penalty of a micro-step.

The math, its derivation and where it departs from Mayer et al. 2024 are in
:mod:`fairdiffusion.training.mad`. Here: which layers (the UNet's LoRA layers), where the
synthetic batch comes from (the model itself, for the prompts of the real batch, sampled
without gradients every ``refresh_every`` steps), and the term the loop adds to its loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fairdiffusion.config import MadRegularizerConfig
from fairdiffusion.errors import TrainingError
from fairdiffusion.training.fbp import derive_seed
from fairdiffusion.training.losses import diffusion_target, per_sample_loss
from fairdiffusion.training.mad import LayerProbe, mad_penalty, sample_without_gradients

#: Entropy that separates the regulariser's random stream from the loop's.
_STREAM = 0x4D4144


def lora_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft LoRA layers of a UNet (modules with ``lora_A`` adapters), in module order."""
    return [m for m in unet.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and m.lora_A]


@dataclass
class SyntheticBatch:
    """Clean latents the model drew for some prompts, and those prompts' group codes."""

    latents: torch.Tensor
    encoder_hidden_states: torch.Tensor
    groups: torch.Tensor
    drawn_at: int


class MadRegularizer:
    """Adds ``weight * P`` (see :mod:`~fairdiffusion.training.mad`) to each micro-step's loss.

    Args:
        unet: The UNet with its LoRA adapters, unwrapped. Its attention processors become
            diffusers' plain ``AttnProcessor``: the penalty back-propagates twice, and
            PyTorch's fused CPU attention kernel has no second derivative.
        config: ``training.mad_regularizer``.
        noise_scheduler: The training noise scheduler (its config gives the DDIM sampler).
        group_counts: Number of groups of each protected attribute.
        seed: ``training.seed``; each synthetic batch draws from ``(seed, step)``, so a
            resumed run draws what an uninterrupted one would.
        snr_gamma: ``training.snr_gamma``, applied to the synthetic loss as to the real one.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        config: MadRegularizerConfig,
        noise_scheduler: Any,
        group_counts: Sequence[int],
        seed: int,
        snr_gamma: float | None = None,
    ) -> None:
        from diffusers import DDIMScheduler
        from diffusers.models.attention_processor import AttnProcessor

        self.modules = lora_layers(unet)
        if not self.modules:
            raise TrainingError("training.mad_regularizer needs LoRA adapters (training.lora_rank); the UNet has none")
        unet.set_attn_processor(AttnProcessor())  # type: ignore[operator]
        self.config, self.noise_scheduler, self.seed, self.snr_gamma = config, noise_scheduler, seed, snr_gamma
        self.group_counts = list(group_counts)
        self.sampler = DDIMScheduler.from_config(noise_scheduler.config)
        self.batch: SyntheticBatch | None = None
        self.penalties: list[float] = []
        self._step, self._micro = 0, 0

    def probe(self) -> LayerProbe:
        """A probe for the real forward pass."""
        return LayerProbe(self.modules)

    def term(
        self,
        unet: Any,
        real: LayerProbe,
        real_losses: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        groups: torch.Tensor,
        step: int,
    ) -> torch.Tensor:
        """``weight * P`` for a real micro-batch whose forward ran under ``real``.

        Args:
            unet: The UNet as the loop calls it.
            real: The probe of the real forward pass.
            real_losses: The real batch's unweighted per-sample losses (FBP weighs only the loss).
            encoder_hidden_states: The real batch's prompt embeddings.
            groups: The real batch's group codes ``(N, attributes)``.
            step: The 1-based optimiser step.
        """
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        generator = torch.Generator(real_losses.device).manual_seed(derive_seed(self.seed, _STREAM, step, self._micro))
        # Drawn on steps 1, 1 + k, 1 + 2k, ... (k = refresh_every); a run resumed between two
        # draws draws at once, from the first batch it sees.
        due = (step - 1) % self.config.refresh_every == 0 and self._micro == 0
        if self.batch is None or due:
            self.batch = self._draw(unet, encoder_hidden_states, groups, generator, step)
        synthetic = self._synthetic_gradients(unet, self.batch, generator)
        penalty = mad_penalty(
            real.per_sample_gradients(real_losses.sum()),
            synthetic,
            groups,
            self.batch.groups,
            self.group_counts,
            self.config.step_size,
        )
        self.penalties.append(float(penalty.detach()))
        return self.config.weight * penalty

    def take_mean_penalty(self) -> float:
        """The mean ``P`` of the micro-steps since the last call (for ``train/mad_penalty``)."""
        mean = sum(self.penalties) / len(self.penalties) if self.penalties else float("nan")
        self.penalties = []
        return mean

    def _draw(
        self,
        unet: Any,
        encoder_hidden_states: torch.Tensor,
        groups: torch.Tensor,
        generator: torch.Generator,
        step: int,
    ) -> SyntheticBatch:
        """The model's own clean latents for the real batch's prompts (cycled to ``synthetic_batch_size``)."""
        size = self.config.synthetic_batch_size or len(groups)
        rows = torch.arange(size) % len(groups)
        states = encoder_hidden_states[rows.to(encoder_hidden_states.device)].detach()
        latents = sample_without_gradients(self._sample, unet, states, generator)
        return SyntheticBatch(latents, states, groups[rows], step)

    def _sample(self, unet: Any, states: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        config = unet.config if hasattr(unet, "config") else unet.module.config
        shape = (len(states), config.in_channels, config.sample_size, config.sample_size)
        latents = torch.randn(shape, generator=generator, device=generator.device).to(states.dtype)
        latents = latents * self.sampler.init_noise_sigma
        self.sampler.set_timesteps(self.config.inference_steps, device=latents.device)
        for t in self.sampler.timesteps:
            prediction = unet(self.sampler.scale_model_input(latents, t), t, states, return_dict=False)[0]
            latents = self.sampler.step(prediction, t, latents, return_dict=False)[0]
        return latents

    def _synthetic_gradients(self, unet: Any, batch: SyntheticBatch, generator: torch.Generator) -> list[torch.Tensor]:
        """Per LoRA layer, the per-sample gradients of the denoising loss on the synthetic batch (kept in the graph)."""
        latents = batch.latents
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.dtype)
        count = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, count, (len(latents),), generator=generator, device=generator.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        with LayerProbe(self.modules) as probe:
            prediction = unet(noisy, timesteps, batch.encoder_hidden_states, return_dict=False)[0]
        losses = per_sample_loss(prediction, target, timesteps, self.noise_scheduler, self.snr_gamma)
        return probe.per_sample_gradients(losses.sum())
