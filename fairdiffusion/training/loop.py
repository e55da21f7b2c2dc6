"""Fine-tuning of a Stable Diffusion UNet, with Fair Bayesian Perturbation or plain.

The loop follows diffusers' ``train_text_to_image.py``: the VAE and text encoder are
frozen, the UNet learns to predict the noise (or v) added to image latents at a random
timestep. With ``method: fair`` each sample's loss is scaled by the FBP weight
(FairDiffusion Sec. 3.2, see :mod:`fairdiffusion.training.fbp`); ``method: baseline`` is the
same loop with unit weights, for comparison; ``method: reweight`` weighs each loss by the
inverse frequency of its group and ``method: balanced`` draws the groups equally often
(:mod:`fairdiffusion.training.balance`), the standard fairness baselines.

Every random draw of a step (data order, latent sampling, noise, timesteps, FBP's
``eps``) is made for the whole global batch, identically on every process, and each
process keeps its slice. So a run gives the same losses, loss gaps and sigma whatever
the number of processes that share the global batch, and a run resumed from a
checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.state import is_initialized
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fairdiffusion.config import TrainingConfig
from fairdiffusion.errors import TrainingError
from fairdiffusion.models.loading import ModelComponents, assemble_pipeline, load_pipeline, load_training_components
from fairdiffusion.models.presets import SD_PRESETS
from fairdiffusion.training.balance import GroupBalance, build_group_balance
from fairdiffusion.training.checkpoints import (
    CHECKPOINT_FORMAT,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_aside_checkpoints,
)
from fairdiffusion.training.dataset import FundusPromptDataset, GlobalBatchSampler
from fairdiffusion.training.fbp import FBPController, FBPVariant, derive_seed, diagnose_windows
from fairdiffusion.training.losses import diffusion_target, per_sample_loss
from fairdiffusion.training.mad_step import MadRegularizer
from fairdiffusion.training.results import (
    WARMUP_STEPS,
    FBPWindowSummary,
    TrainingLogRecord,
    TrainingResult,
    TrainingTiming,
)
from fairdiffusion.training.sampling import ArtifactCallback, build_validation_prompts, sample_validation_grid

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]
#: Loss weights of a global batch from its group codes (FBP's, or the reweighting's).
Weigher = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Model:
    """The UNet being trained and what steps it, on the accelerator's device."""

    accelerator: Accelerator
    #: As loaded; the frozen VAE and text encoder in ``dtype``.
    components: ModelComponents
    #: ``components.unet`` as ``accelerator.prepare`` returned it (wrapped when distributed).
    unet: Any
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    #: diffusers' ``EMAModel`` of the trainable parameters, or ``None``.
    ema: Any
    dtype: torch.dtype
    #: ``training.noise_offset``: the offset noise's scale (0: plain noise).
    noise_offset: float = 0.0
    #: The text encoder as ``accelerator.prepare`` returned it when it trains, else ``None``.
    text_encoder: Any = None
    #: ``training.proportion_empty_prompts``, and the empty prompt's token ids (``[1, length]``).
    empty_share: float = 0.0
    empty_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 1, dtype=torch.long))


@dataclass
class _LoopState:
    """Where the loop is, and what it has reported.

    Saved in every checkpoint beside accelerate's model, optimiser and RNG states.
    ``step`` and ``loss`` are not in its state dict: they are the checkpoint's position
    in ``training_state.json``, which must be read before ``accelerator.load_state`` (it
    marks the checkpoint complete and names its run).
    """

    #: The loop's own generator, never the global one: a background GP fit forks the
    #: global CPU generator (see ``fbp._fit_and_maximise``).
    noise_generator: torch.Generator
    step: int = 0
    loss: float = float("nan")
    windows: list[FBPWindowSummary] = field(default_factory=list)
    #: FBP warnings by kind, each given once.
    warned: dict[str, str] = field(default_factory=dict)
    history: list[TrainingLogRecord] = field(default_factory=list)
    #: The (per-sample losses, group codes) of the steps since the last history record.
    interval: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise_generator": self.noise_generator.get_state(),
            "windows": [asdict(w) for w in self.windows],
            "warned": dict(self.warned),
            "history": [asdict(r) for r in self.history],
            "interval": list(self.interval),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.noise_generator.set_state(state["noise_generator"])
        self.windows = [FBPWindowSummary.from_dict(w) for w in state["windows"]]
        self.warned = dict(state["warned"])
        self.history = [TrainingLogRecord(**r) for r in state.get("history", [])]
        self.interval = list(state.get("interval", []))


@dataclass
class _StepBuffer:
    """The micro-batches of one optimiser step: per-sample losses and timesteps, global group codes and weights."""

    losses: list[torch.Tensor] = field(default_factory=list)
    groups: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)

    def add(self, losses: torch.Tensor, timesteps: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor) -> None:
        # Timesteps (< 2^24, exact in float32) travel with the losses: one gather, not two.
        self.losses.append(torch.stack([losses.float(), timesteps.to(torch.float32)], dim=1))
        self.groups.append(groups)
        self.weights.append(weights)

    def flush(self, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """The global batch's per-sample losses, group codes and timesteps, and its loss; empties the buffer."""
        # Every process sees the global batch, so every process holds the same sigma.
        gathered = _gather_in_global_order(accelerator, self.losses).cpu()
        losses, timesteps = gathered[:, 0].contiguous(), gathered[:, 1].long()
        groups = torch.cat(self.groups)
        # The global batch's loss, as one process holding it would compute it.
        loss = float((torch.cat(self.weights) * losses).mean())
        self.losses, self.groups, self.weights = [], [], []
        return losses, groups, timesteps, loss


@dataclass
class _Clock:
    """Wall time of the loop: each optimiser step, and the checkpoints and grids kept out of them."""

    started: float = field(default_factory=time.perf_counter)
    step_started: float = field(default_factory=time.perf_counter)
    step_seconds: list[float] = field(default_factory=list)
    aside_seconds: dict[str, float] = field(default_factory=lambda: {"checkpoint": 0.0, "validation": 0.0})

    def step_done(self) -> None:
        self.step_seconds.append(time.perf_counter() - self.step_started)

    def next_step(self) -> None:
        self.step_started = time.perf_counter()

    @contextmanager
    def aside(self, kind: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.aside_seconds[kind] += time.perf_counter() - started

    def timing(
        self, loop_seconds: float, samples_per_step: int, fbp: FBPController | None, peak_memory: int | None
    ) -> TrainingTiming:
        steady = self.step_seconds[WARMUP_STEPS:] if len(self.step_seconds) > WARMUP_STEPS else self.step_seconds
        steady_seconds = float(sum(steady))
        return TrainingTiming(
            loop_seconds=loop_seconds,
            steady_steps=len(steady),
            steady_seconds=steady_seconds,
            median_step_seconds=float(np.median(steady)) if steady else 0.0,
            samples_per_second=samples_per_step * len(steady) / steady_seconds if steady_seconds > 0 else 0.0,
            fbp_seconds=fbp.busy_seconds if fbp is not None else 0.0,
            checkpoint_seconds=self.aside_seconds["checkpoint"],
            validation_seconds=self.aside_seconds["validation"],
            peak_memory_bytes=peak_memory,
            fbp_setup_seconds=fbp.setup_seconds if fbp is not None else 0.0,
        )


def _group_summary(
    losses: torch.Tensor, groups: torch.Tensor, attributes: Mapping[str, Sequence[str]]
) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    """Per-group (``attribute/group``) mean losses and sample counts; per attribute, the present groups' gap."""
    means, counts, gaps = {}, {}, {}
    for a, (attribute, names) in enumerate(attributes.items()):
        present = []
        for g, name in enumerate(names):
            mask = groups[:, a] == g
            if mask.any():
                present.append(float(losses[mask].mean()))
                means[f"{attribute}/{name}"], counts[f"{attribute}/{name}"] = present[-1], int(mask.sum())
        gaps[attribute] = max(present) - min(present) if len(present) >= 2 else 0.0
    return means, counts, gaps


def _group_metrics(
    losses: torch.Tensor, groups: torch.Tensor, attributes: Mapping[str, Sequence[str]]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-group mean losses (``train/group_loss/*``) and, per attribute, the gap between the present groups."""
    means, _, gaps = _group_summary(losses, groups, attributes)
    return {f"train/group_loss/{key}": value for key, value in means.items()}, gaps


def _make_accelerator(config: TrainingConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    if config.mixed_precision == "fp16" and not cuda:
        raise TrainingError("training.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    set_up_before = is_initialized()
    try:
        return Accelerator(
            cpu=not cuda,
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
    except ValueError as error:
        if not set_up_before:
            raise
        # AcceleratorState is a process-wide singleton that keeps the first precision it
        # was given. It belongs to whoever set it up, so the library never resets it.
        raise TrainingError(
            f"training.mixed_precision '{config.mixed_precision}' conflicts with the accelerate set-up this "
            f"process already has ({error}); train in a fresh process"
        ) from None


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Casts a component to ``dtype`` (in place) unless all its parameters already are.

    diffusers' ``ModelMixin.to`` warns "should be kept in float32: []" whenever a dtype is
    passed, even a no-op one with no such modules, so a float32 run on the CPU passes none.
    """
    if any(parameter.dtype != dtype for parameter in module.parameters()):
        module.to(dtype=dtype)


def _prepare_unet(unet: torch.nn.Module, config: TrainingConfig, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Adds LoRA adapters or not, turns on checkpointing; returns the trainable parameters."""
    if config.lora_rank is not None:
        from peft import LoraConfig

        # As diffusers' train_text_to_image_lora.py: the frozen base in the mixed
        # precision dtype, adapters on the attention projections, trained in fp32.
        unet.requires_grad_(False)
        _cast(unet, dtype)
        unet.add_adapter(  # type: ignore[operator]
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha or config.lora_rank,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
        for parameter in unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # type: ignore[operator]
    unet.train()
    return [p for p in unet.parameters() if p.requires_grad]


def _build_model(pretrained: str, allow_download: bool, config: TrainingConfig, accelerator: Accelerator) -> _Model:
    """Loads the components, freezes all but the UNet, and prepares the UNet, optimiser and LR schedule."""
    from diffusers.optimization import get_scheduler

    components = load_training_components(pretrained, allow_download, seed=config.seed, device=accelerator.device)
    if config.prediction_type is not None:
        components.noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    frozen_parts = (components.vae,) if config.train_text_encoder else (components.vae, components.text_encoder)
    for frozen in frozen_parts:
        frozen.requires_grad_(False)
        _cast(frozen, dtype)
        frozen.to(accelerator.device)
    components.unet.to(accelerator.device)
    trainable = _prepare_unet(components.unet, config, dtype)
    if config.train_text_encoder:  # in float32, as the trained UNet parameters
        components.text_encoder.to(accelerator.device, dtype=torch.float32).requires_grad_(True).train()
        trainable += list(components.text_encoder.parameters())
    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=config.ema_decay)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
    world = accelerator.num_processes
    # accelerate steps a prepared scheduler once per process (diffusers scales the same way).
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * world,
        num_training_steps=config.max_steps * world,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(components.unet, optimizer, lr_scheduler)
    # Prepared too, so accelerate's checkpoint state holds it and DDP syncs its gradients.
    text_encoder = accelerator.prepare(components.text_encoder) if config.train_text_encoder else None
    tokenizer = components.tokenizer
    empty_ids = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return _Model(
        accelerator,
        components,
        unet,
        trainable,
        optimizer,
        lr_scheduler,
        ema,
        dtype,
        config.noise_offset,
        text_encoder,
        config.proportion_empty_prompts,
        empty_ids,
    )


def _fbp_variant(config: TrainingConfig) -> FBPVariant:
    fbp = config.fbp
    return FBPVariant(
        objective=fbp.objective,
        timestep_buckets=fbp.timestep_buckets,
        history_windows=fbp.history_windows,
        mix_toward=fbp.mix_toward,
        candidate_noise=fbp.candidate_noise,
        weights=fbp.weights,
        mean_shift=fbp.mean_shift,
        mean_shift_max=fbp.mean_shift_max,
    )


def _make_fbp(
    attributes: Mapping[str, Sequence[str]], config: TrainingConfig, num_timesteps: int
) -> FBPController | None:
    if config.method != "fair":
        return None
    # rank=0 on every process: each draws the eps of the whole global batch from the
    # same stream and keeps its slice (see the module docstring).
    return FBPController(
        attributes,
        window=config.fbp.time_window,
        exploitation_rate=config.fbp.exploitation_rate,
        ucb_beta=config.fbp.ucb_beta,
        seed=config.seed,
        rank=0,
        fit_lag=config.fbp.fit_lag,
        variant=_fbp_variant(config),
        num_timesteps=num_timesteps,
    )


def _make_balance(
    dataset: FundusPromptDataset, attributes: Mapping[str, Sequence[str]], config: TrainingConfig
) -> GroupBalance | None:
    if config.method not in ("reweight", "balanced"):
        return None
    balance = build_group_balance(dataset.groups, attributes, config.balance_attributes, config.max_group_weight)
    logger.info(
        "%s: group weights %s",
        config.method,
        ", ".join(
            f"{name} {float(w):.3g} ({int(n)} rows)"
            for name, w, n in zip(balance.names, balance.table, balance.counts, strict=True)
            if n
        ),
    )
    return balance


def _make_mad(model: _Model, attributes: Mapping[str, Sequence[str]], config: TrainingConfig) -> MadRegularizer | None:
    if config.mad_regularizer.weight == 0:
        return None
    if model.accelerator.num_processes > 1:
        # DDP's gradient hooks do not support the penalty's double back-propagation.
        raise TrainingError("training.mad_regularizer needs a single training process (it back-propagates twice)")
    return MadRegularizer(
        model.components.unet,
        config.mad_regularizer,
        model.components.noise_scheduler,
        [len(groups) for groups in attributes.values()],
        config.seed,
        config.snr_gamma,
    )


def _batches_per_epoch(num_rows: int, config: TrainingConfig, num_processes: int) -> int:
    micro_batch = config.batch_size * num_processes
    if num_rows < micro_batch:
        raise TrainingError(
            f"training.batch_size {config.batch_size} x {num_processes} processes = {micro_batch} exceeds the "
            f"{num_rows} training rows"
        )
    return num_rows // micro_batch


def _loss_weigher(fbp: FBPController | None, balance: GroupBalance | None, config: TrainingConfig) -> Weigher | None:
    """What weighs a global batch's losses: FBP, the inverse-frequency weights, or nothing (unit weights)."""
    if fbp is not None:
        return fbp.sample_weights
    if balance is not None and config.method == "reweight":
        return balance.row_weights
    return None


def _micro_batches(
    dataset: FundusPromptDataset,
    config: TrainingConfig,
    accelerator: Accelerator,
    start_step: int,
    balance: GroupBalance | None = None,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """This process's micro-batches from optimiser step ``start_step`` to ``max_steps``.

    Each comes with the group codes of its whole global batch, which FBP weighs and observes.
    ``method: balanced`` draws rows with replacement in proportion to ``balance``'s group weights.
    """
    row_weights = balance.row_weights(dataset.groups) if balance is not None and config.method == "balanced" else None
    world, rank = accelerator.num_processes, accelerator.process_index
    accumulation = config.gradient_accumulation_steps
    remaining = (config.max_steps - start_step) * accumulation
    epoch, start_batch = divmod(start_step * accumulation, _batches_per_epoch(len(dataset), config, world))
    while remaining > 0:
        dataset.set_epoch(epoch)
        sampler = GlobalBatchSampler(
            len(dataset), config.batch_size, world, rank, config.seed, epoch, start_batch, row_weights
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=config.dataloader_num_workers,
            pin_memory=accelerator.device.type == "cuda",
            generator=torch.Generator().manual_seed(derive_seed(config.seed, epoch)),
        )
        for batch_index, batch in enumerate(loader, start=start_batch):
            yield dataset.groups[sampler.global_indices(batch_index)], batch
            remaining -= 1
            if remaining == 0:
                return
        epoch, start_batch = epoch + 1, 0


def _draw_step_noise(
    generator: torch.Generator,
    latent_shape: torch.Size,
    num_processes: int,
    rank: int,
    num_timesteps: int,
    noise_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent-sampling noise, diffusion noise (with its offset) and timesteps of this process's slice."""
    local = latent_shape[0]
    shape = (local * num_processes, *latent_shape[1:])
    device = generator.device
    latent_eps = torch.randn(shape, generator=generator, device=device)
    noise = torch.randn(shape, generator=generator, device=device)
    timesteps = torch.randint(0, num_timesteps, (shape[0],), generator=generator, device=device)
    if noise_offset:  # drawn last, so a run without it draws exactly what it drew before
        noise = noise + noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator, device=device)
    part = slice(rank * local, (rank + 1) * local)
    return latent_eps[part], noise[part], timesteps[part]


@torch.no_grad()
def _noisy_latents(
    model: _Model, batch: dict[str, torch.Tensor], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy latents, timesteps and the prediction target of a micro-batch (no gradients)."""
    accelerator, (_, _, vae, _, noise_scheduler) = model.accelerator, model.components
    pixel_values = batch["pixel_values"].to(accelerator.device, dtype=model.dtype)
    posterior = vae.encode(pixel_values).latent_dist
    latent_eps, noise, timesteps = _draw_step_noise(
        generator,
        posterior.mean.shape,
        accelerator.num_processes,
        accelerator.process_index,
        noise_scheduler.config.num_train_timesteps,
        model.noise_offset,
    )
    latents = posterior.mean + posterior.std * latent_eps.to(posterior.mean.dtype)
    latents = latents * vae.config.scaling_factor
    noise = noise.to(latents.dtype)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    return noisy_latents, timesteps, diffusion_target(noise_scheduler, latents, noise, timesteps)


def drop_prompts(
    input_ids: torch.Tensor, empty_ids: torch.Tensor, share: float, generator: torch.Generator, world: int, rank: int
) -> torch.Tensor:
    """This process's prompt token ids with a ``share`` of them replaced by the empty prompt's.

    The draw covers the global batch (``world`` processes' micro-batches, this one the
    ``rank``-th), so which rows are dropped does not depend on the number of processes.
    Nothing is drawn when ``share`` is 0, so a run without it draws what it drew before.
    """
    if not share:
        return input_ids
    local = len(input_ids)
    dropped = torch.rand(local * world, generator=generator, device=generator.device) < share
    dropped = dropped[rank * local : (rank + 1) * local].to(input_ids.device)
    return torch.where(dropped[:, None], empty_ids.to(input_ids.device), input_ids)


def _prompt_states(model: _Model, input_ids: torch.Tensor) -> torch.Tensor:
    """The prompts' hidden states: with gradients only when the text encoder trains."""
    trained = model.text_encoder is not None
    encoder = model.text_encoder if trained else model.components.text_encoder
    with torch.set_grad_enabled(trained):
        states = encoder(input_ids.to(model.accelerator.device), return_dict=False)[0]
    return states.to(model.dtype) if trained else states


def _weighted_loss(
    per_sample: torch.Tensor, global_groups: torch.Tensor, weigh: Weigher | None, rank: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch's loss, and the loss weights of its whole global batch (ones without weights)."""
    if weigh is None:
        return per_sample.mean(), torch.ones(len(global_groups))
    # FBP (Sec. 3.2): loss = mean_i w_i * mse_i with w_i = 1 + sum_a sigma_g * eps;
    # reweight: w_i the fixed inverse-frequency weight of the sample's group.
    global_weights = weigh(global_groups)
    local = slice(rank * batch_size, (rank + 1) * batch_size)
    return (global_weights[local].to(per_sample.device) * per_sample).mean(), global_weights


def _train_step(
    model: _Model,
    batch: dict[str, torch.Tensor],
    global_groups: torch.Tensor,
    weigh: Weigher | None,
    generator: torch.Generator,
    config: TrainingConfig,
    step: int,
    mad: MadRegularizer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One micro-batch of optimiser step ``step`` (1-based): forward, backward, and the update when the
    gradients sync. Returns this process's per-sample losses and timesteps, and the global weights."""
    accelerator, noise_scheduler = model.accelerator, model.components.noise_scheduler
    trained = (model.unet,) if model.text_encoder is None else (model.unet, model.text_encoder)
    with accelerator.accumulate(*trained):
        noisy_latents, timesteps, target = _noisy_latents(model, batch, generator)
        input_ids = drop_prompts(  # drawn after the step's noise
            batch["input_ids"],
            model.empty_ids,
            model.empty_share,
            generator,
            accelerator.num_processes,
            accelerator.process_index,
        )
        encoder_hidden_states = _prompt_states(model, input_ids)
        with mad.probe() if mad is not None else nullcontext() as probe:
            prediction = model.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        per_sample = per_sample_loss(prediction, target, timesteps, noise_scheduler, config.snr_gamma)
        loss, global_weights = _weighted_loss(
            per_sample, global_groups, weigh, accelerator.process_index, config.batch_size
        )
        micro_loss = float(loss.detach())
        if not math.isfinite(micro_loss):
            raise TrainingError(
                f"training loss became {micro_loss} at step {step}; lower training.learning_rate or check the data"
            )
        if mad is not None and probe is not None:  # Mayer et al. 2024, Sec. 4: beside the (weighted) real loss
            loss = loss + mad.term(model.unet, probe, per_sample, encoder_hidden_states, global_groups, step)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.trainable, config.max_grad_norm)
        model.optimizer.step()
        model.lr_scheduler.step()
        model.optimizer.zero_grad()
    return per_sample.detach(), timesteps, global_weights


def _gather_in_global_order(accelerator: Accelerator, local: list[torch.Tensor]) -> torch.Tensor:
    """The per-sample values (``[local batch, ...]`` each) of every micro-batch of a step, in the order
    one process would see them: ``[global batch, ...]``."""
    stacked = torch.stack(local)  # [micro-batches, local batch, ...]
    gathered = accelerator.gather(stacked)  # [processes * micro-batches, local batch, ...], process-major
    ordered = gathered.view(accelerator.num_processes, *stacked.shape).transpose(0, 1)
    return ordered.reshape(-1, *stacked.shape[2:])


def _loss_metrics(
    losses: torch.Tensor, groups: torch.Tensor, attributes: Mapping[str, Sequence[str]], loss: float, lr: float
) -> dict[str, float]:
    group_metrics, gaps = _group_metrics(losses, groups, attributes)
    metrics = {"train/loss": loss, "train/lr": lr}
    metrics |= group_metrics | {f"train/loss_gap/{a}": gap for a, gap in gaps.items()}
    metrics["train/loss_gap"] = sum(gaps.values())
    return metrics


def _warn_fbp(progress: Any, message: str) -> None:
    logger.warning("Fair Bayesian Perturbation: %s", message)
    progress.write(f"WARNING Fair Bayesian Perturbation: {message}")


def _observe_fbp(
    fbp: FBPController,
    losses: torch.Tensor,
    groups: torch.Tensor,
    timesteps: torch.Tensor,
    state: _LoopState,
    warn_windows: int,
    warn: Callable[[str], None] | None,
) -> tuple[dict[str, float], bool]:
    """Feeds the step's global losses to FBP. Returns its metrics, and whether a window closed."""
    result = fbp.observe(losses, groups, timesteps)
    metrics = {"fbp/objective": result.y} | {f"fbp/gap/{a}": gap for a, gap in result.gaps.items()}
    if result.window_closed:
        summary = FBPWindowSummary(
            # 1-based training steps: when the window closed, when its sigma took over.
            step=fbp.windows[-1].step + 1,
            applied_step=state.step,
            acquisition=result.acquisition_value,
            gaps=result.gaps,
            fit_failed=result.fit_failed,
            reason=result.fit_failure_reason,
        )
        state.windows.append(summary)
        if result.acquisition_value is not None:
            metrics["fbp/acquisition"] = result.acquisition_value
        metrics["fbp/window_gap"] = sum(result.gaps.values())
        for key, message in diagnose_windows(fbp.windows, fbp.weight_names, warn_windows).items():
            if key not in state.warned:
                state.warned[key] = f"step {state.step}: {message}"
                if warn is not None:
                    warn(state.warned[key])
        metrics["fbp/warnings"] = float(len(state.warned))
    metrics |= {
        f"fbp/sigma/{name.replace('=', '/')}": value for name, value in zip(fbp.weight_names, result.sigma, strict=True)
    }
    if fbp.variant.mean_shift:
        offsets = fbp.mean_offsets.tolist()
        metrics |= {f"fbp/mean_shift/{n.replace('=', '/')}": v for n, v in zip(fbp.weight_names, offsets, strict=True)}
    return metrics, result.window_closed


def _log_due(config: TrainingConfig, step: int, window_closed: bool) -> bool:
    return window_closed or step % config.log_every == 0 or step == config.max_steps


def _keep_history(
    state: _LoopState,
    losses: torch.Tensor,
    groups: torch.Tensor,
    attributes: Mapping[str, Sequence[str]],
    fbp: FBPController | None,
    due: bool,
) -> None:
    """Pools the step's losses; when a log is due, turns the pooled steps into a history record."""
    state.interval.append((losses, groups))
    if not due:
        return
    pooled = torch.cat([loss for loss, _ in state.interval])
    means, counts, gaps = _group_summary(pooled, torch.cat([g for _, g in state.interval]), attributes)
    used = fbp.steps[-1] if fbp is not None else None  # the sigma that weighted this step
    record = TrainingLogRecord(
        step=state.step,
        steps=len(state.interval),
        loss=float(pooled.mean()),
        group_losses=means,
        group_samples=counts,
        gaps=gaps,
        sigma=None if used is None else list(used.sigma),
        mean_shift=list(used.mean_shift) if used is not None and used.mean_shift else None,
    )
    state.history.append(record)
    state.interval = []


def _finish_step(
    model: _Model,
    buffer: _StepBuffer,
    fbp: FBPController | None,
    state: _LoopState,
    attributes: Mapping[str, Sequence[str]],
    config: TrainingConfig,
    warn: Callable[[str], None] | None,
    mad: MadRegularizer | None = None,
) -> tuple[dict[str, float], bool]:
    """After an optimiser step: the EMA update, the global batch's loss and metrics, FBP's observation.

    Returns the step's metrics, and whether an FBP window closed.
    """
    if model.ema is not None:
        model.ema.step(model.trainable)
    losses, groups, timesteps, state.loss = buffer.flush(model.accelerator)
    metrics = _loss_metrics(losses, groups, attributes, state.loss, float(model.lr_scheduler.get_last_lr()[0]))
    if mad is not None:
        metrics["train/mad_penalty"] = mad.take_mean_penalty()
    window_closed = False
    if fbp is not None:
        fbp_metrics, window_closed = _observe_fbp(fbp, losses, groups, timesteps, state, config.fbp.warn_windows, warn)
        metrics |= fbp_metrics
    _keep_history(state, losses, groups, attributes, fbp, _log_due(config, state.step, window_closed))
    return metrics, window_closed


def _report_step(
    metrics: dict[str, float],
    step: int,
    window_closed: bool,
    config: TrainingConfig,
    log_metrics: MetricsCallback | None,
    progress: Any,
    fbp: FBPController | None,
) -> None:
    """Hands the metrics to ``log_metrics`` when due (and at every closed window); updates the bar."""
    if log_metrics is not None and _log_due(config, step, window_closed):
        log_metrics(metrics, step)
    progress.update(1)
    postfix = {"loss": f"{metrics['train/loss']:.4f}", "gap": f"{metrics['train/loss_gap']:.4f}"}
    if fbp is not None:
        postfix["sigma"] = " ".join(f"{s:.2f}" for s in fbp.sigma.tolist())
    progress.set_postfix(postfix, refresh=False)


def _sample_grid(
    model: _Model,
    prompts: list[tuple[str, str]],
    config: TrainingConfig,
    step: int,
    log_artifact: ArtifactCallback | None,
) -> None:
    sample_validation_grid(
        model.components,
        model.unet,
        model.accelerator,
        model.ema,
        model.trainable,
        prompts,
        config,
        step,
        model.dtype,
        log_artifact,
    )


def _run_identity(dataset: FundusPromptDataset, config: TrainingConfig, num_processes: int) -> dict[str, object]:
    """What a checkpoint must agree with to be resumed: the data and the settings that shape a step."""
    digest = hashlib.sha256()
    for path, ids, groups in zip(dataset.paths, dataset.input_ids, dataset.groups, strict=True):
        digest.update(str(path).encode())
        digest.update(ids.numpy().tobytes())
        digest.update(groups.numpy().tobytes())
    return {
        "data_sha256": digest.hexdigest(),
        "method": config.method,
        "seed": config.seed,
        "global_batch": config.batch_size * num_processes,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "resolution": config.resolution,
        "lora_rank": config.lora_rank,
        "use_ema": config.use_ema,
        "checkpoint_format": CHECKPOINT_FORMAT,
        # None for the paper's settings, so the checkpoints of earlier runs stay loadable.
        "balance": (
            {"attributes": config.balance_attributes, "max_group_weight": config.max_group_weight}
            if config.method in ("reweight", "balanced")
            else None
        ),
        "fbp_variant": None if config.method != "fair" or config.fbp.is_paper() else asdict(_fbp_variant(config)),
        "mad_regularizer": config.mad_regularizer.model_dump() if config.mad_regularizer.weight > 0 else None,
        "train_text_encoder": config.train_text_encoder,
        "noise_offset": config.noise_offset,
        "proportion_empty_prompts": config.proportion_empty_prompts or None,  # None: earlier checkpoints load
    }


def _resume(
    accelerator: Accelerator,
    config: TrainingConfig,
    identity: dict[str, object],
    stateful: tuple[Any, ...],
    root: Path,
) -> Path | None:
    """Loads the checkpoint ``training.resume`` names, if any; else sets an earlier run's checkpoints aside.

    ``accelerator.load_state`` restores the model, optimiser, LR scheduler, scaler and RNG
    states; ``stateful`` (the loop state first, then the FBP controller and EMA) is loaded
    from the checkpoint's own file.
    """
    state = stateful[0]
    resume_from = find_resume_checkpoint(config.resume, root)
    main = accelerator.is_main_process
    if resume_from is None:
        if main and (previous := set_aside_checkpoints(root)):
            logger.warning(
                "starting afresh: the checkpoints of an earlier run in this output_dir are now in %s", previous
            )
        return None
    position = load_checkpoint(accelerator, resume_from, identity, stateful)
    state.step, state.loss = int(position["step"]), float(position["loss"])
    if main:
        logger.info("resuming from %s at step %d", resume_from, state.step)
    return resume_from


def _checkpoint_due(config: TrainingConfig, step: int) -> bool:
    every = config.checkpoint_every
    return every is not None and (step % every == 0 or step == config.max_steps)


def _checkpoint_position(
    state: _LoopState, config: TrainingConfig, batches_per_epoch: int, num_processes: int, identity: dict[str, object]
) -> dict[str, Any]:
    """The ``training_state.json`` of a checkpoint: where the run stands, and which run it is."""
    micro = state.step * config.gradient_accumulation_steps
    return {
        "step": state.step,
        "loss": state.loss,
        "epoch": micro // batches_per_epoch,
        "batch_in_epoch": micro % batches_per_epoch,
        "num_processes": num_processes,
        "identity": identity,
    }


def _save_pipeline(
    model_dir: Path,
    pretrained: str,
    allow_download: bool,
    components: ModelComponents,
    unet: Any,
    config: TrainingConfig,
) -> str | None:
    """Saves the pipeline (float32, safetensors); with LoRA also the adapters alone. Returns their folder."""
    tokenizer, text_encoder, vae, _, noise_scheduler = components
    lora_dir = None
    _cast(unet, torch.float32)
    if config.lora_rank is not None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        lora_dir = Path(config.output_dir) / "lora"
        StableDiffusionPipeline.save_lora_weights(
            lora_dir,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            safe_serialization=True,
        )
        # The registered pipeline is a plain one: the adapters are merged into the UNet,
        # so evaluation, registry and serving treat a LoRA run like any other.
        unet.fuse_lora()
        unet.unload_lora()
    if pretrained in SD_PRESETS:
        pipeline = assemble_pipeline(tokenizer, text_encoder.float(), vae.float(), unet, noise_scheduler)
    else:
        pipeline = load_pipeline(pretrained, allow_download=allow_download)
        pipeline.unet = unet
        if config.train_text_encoder:
            pipeline.text_encoder = text_encoder.float()
    pipeline.save_pretrained(model_dir, safe_serialization=True)
    return None if lora_dir is None else str(lora_dir)


def _save_outputs(
    model: _Model, fbp: FBPController | None, pretrained: str, allow_download: bool, config: TrainingConfig
) -> str | None:
    """The trained pipeline (EMA weights when kept) and the FBP trajectory; returns the LoRA folder."""
    final_unet = model.accelerator.unwrap_model(model.unet)
    if model.ema is not None:
        model.ema.copy_to(model.trainable)
    model_dir = Path(config.output_dir) / "pipeline"
    lora_dir = _save_pipeline(model_dir, pretrained, allow_download, model.components, final_unet, config)
    if fbp is not None:
        trajectory = {
            "weight_names": fbp.weight_names,
            "steps": [asdict(r) for r in fbp.steps],
            "windows": [asdict(w) for w in fbp.windows],
        }
        (Path(config.output_dir) / "fbp_trajectory.json").write_text(json.dumps(trajectory))
    return lora_dir


def _out_of_memory_message(config: TrainingConfig, step: int) -> str:
    options = []
    if config.batch_size > 1:
        options.append(
            f"a smaller training.batch_size (now {config.batch_size}; raise gradient_accumulation_steps to keep "
            "the global batch)"
        )
    if not config.gradient_checkpointing:
        options.append("training.gradient_checkpointing: true")
    if config.mixed_precision == "no":
        options.append("training.mixed_precision: bf16 (or fp16)")
    if config.use_ema:
        options.append("training.use_ema: false (the EMA holds a second copy of the weights)")
    if config.lora_rank is None:
        options.append("training.lora_rank: 8 (LoRA adapters instead of full fine-tuning)")
    options.append(f"a lower training.resolution (now {config.resolution})")
    return f"out of memory at step {step}; settings that reduce memory: " + "; ".join(options)


# 113 lines, 86 without its docstring: kept whole on purpose. It is the one function that reads
# top to bottom like diffusers' train_text_to_image.py (set-up, loop, save), each part a helper
# above; splitting the set-up from the loop would hand a dozen locals between them. The next cut,
# when the resume and two-process tests can be rerun: the set-up (FBP, balance, regulariser,
# checkpoint state, resume) into one helper returning a small run context.
def train_unet(
    samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    pretrained: str,
    config: TrainingConfig,
    log_metrics: MetricsCallback | None = None,
    log_artifact: ArtifactCallback | None = None,
    allow_download: bool = False,
) -> TrainingResult:
    """Fine-tune the UNet of a pipeline on the training rows and save the pipeline.

    Runs in every process of an ``accelerate launch`` / ``torchrun`` job as well as in
    a plain process; only the main process logs and writes the pipeline. The process's
    accelerate state is used as it is (never reset): a process that trains twice with
    different ``mixed_precision`` must reset it itself.

    Args:
        samples: Training rows of the sample table (``image_path``, ``prompt``, attributes).
        attributes: Protected attribute -> groups; FBP keeps one sigma entry per group.
        pretrained: Folder or hub id of the pipeline to start from, or a full-size
            preset (``sd-1.5``, ``sd-2.1``; random weights).
        config: Training settings.
        log_metrics: Called with ``(metrics, step)`` every ``log_every`` steps and at
            every FBP window; the caller decides where they go (MLflow).
        log_artifact: Called with ``(folder, artifact_path)`` for each validation grid.
        allow_download: Whether a hub id may be downloaded.

    Returns:
        The result; the pipeline is saved (safetensors, diffusers layout) in
        ``config.output_dir / "pipeline"``.

    Raises:
        TrainingError: if the loss becomes NaN or infinite (naming the step), memory
            runs out (naming the settings that reduce it), or ``training.resume``
            names a checkpoint that is missing, incomplete or from another run.
    """
    # One readable loop in the manner of diffusers' training scripts: set-up, the step loop
    # with its periodic checkpoint and sample grid, then saving. Each part it calls is
    # its own function; what remains is the order they run in (why it is not cut further:
    # the comment above the function).
    started = time.perf_counter()
    accelerator = _make_accelerator(config)
    world, main = accelerator.num_processes, accelerator.is_main_process
    set_seed(config.seed)
    model = _build_model(pretrained, allow_download, config, accelerator)
    tokenizer = model.components.tokenizer
    dataset = FundusPromptDataset(
        samples, attributes, tokenizer, config.resolution, config.center_crop, config.random_flip, config.seed
    )
    batches_per_epoch = _batches_per_epoch(len(dataset), config, world)
    prompts = build_validation_prompts(samples, attributes) if config.sampling.every else []
    fbp = _make_fbp(attributes, config, model.components.noise_scheduler.config.num_train_timesteps)
    balance = _make_balance(dataset, attributes, config)
    weigh = _loss_weigher(fbp, balance, config)
    mad = _make_mad(model, attributes, config)
    state = _LoopState(torch.Generator(accelerator.device).manual_seed(config.seed))
    # Saved and loaded beside accelerate's state, by position: the run identity (method,
    # use_ema) guarantees a resumed run has the same ones.
    stateful = (state, *(o for o in (fbp, model.ema) if o is not None))
    checkpoint_root = Path(config.output_dir) / "checkpoints"
    identity = _run_identity(dataset, config, world)
    resume_from = _resume(accelerator, config, identity, stateful, checkpoint_root)
    accelerator.wait_for_everyone()
    if model.ema is not None:
        model.ema.to(accelerator.device)

    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    buffer, clock = _StepBuffer(), _Clock()
    # disable=None: no bar when stderr is not a terminal (Prefect logs, CI), and none off the main process.
    progress = tqdm(
        total=config.max_steps, initial=state.step, disable=None if main else True, desc="training", dynamic_ncols=True
    )
    warn = partial(_warn_fbp, progress) if main else None
    try:
        for global_groups, batch in _micro_batches(dataset, config, accelerator, state.step, balance):
            losses, timesteps, weights = _train_step(
                model, batch, global_groups, weigh, state.noise_generator, config, state.step + 1, mad
            )
            buffer.add(losses, timesteps, global_groups, weights)
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            metrics, window_closed = _finish_step(model, buffer, fbp, state, attributes, config, warn, mad)
            _report_step(metrics, state.step, window_closed, config, log_metrics if main else None, progress, fbp)
            clock.step_done()

            if _checkpoint_due(config, state.step):
                with clock.aside("checkpoint"):
                    position = _checkpoint_position(state, config, batches_per_epoch, world, identity)
                    save_checkpoint(accelerator, checkpoint_root, position, config.checkpoints_total_limit, stateful)
            if config.sampling.every is not None and state.step % config.sampling.every == 0:
                with clock.aside("validation"):
                    if main:
                        _sample_grid(model, prompts, config, state.step, log_artifact)
                    accelerator.wait_for_everyone()
            clock.next_step()
    except torch.OutOfMemoryError:
        raise TrainingError(_out_of_memory_message(config, state.step + 1)) from None
    finally:
        progress.close()
        if fbp is not None:
            fbp.close()
    loop_seconds = time.perf_counter() - clock.started
    peak_memory = torch.cuda.max_memory_allocated(accelerator.device) if accelerator.device.type == "cuda" else None

    accelerator.wait_for_everyone()
    lora_dir = _save_outputs(model, fbp, pretrained, allow_download, config) if main else None
    accelerator.wait_for_everyone()
    samples_per_step = config.batch_size * world * config.gradient_accumulation_steps
    timing = clock.timing(loop_seconds, samples_per_step, fbp, peak_memory)
    return _training_result(config, state, fbp, resume_from, lora_dir, timing, time.perf_counter() - started)


def _training_result(
    config: TrainingConfig,
    state: _LoopState,
    fbp: FBPController | None,
    resume_from: Path | None,
    lora_dir: str | None,
    timing: TrainingTiming,
    seconds: float,
) -> TrainingResult:
    return TrainingResult(
        model_dir=str(Path(config.output_dir) / "pipeline"),
        method=config.method,
        steps=state.step,
        final_loss=state.loss,
        seconds=seconds,
        sigma_names=list(fbp.weight_names) if fbp else [],
        final_sigma=[float(s) for s in fbp.sigma] if fbp else None,
        windows=state.windows,
        warnings=list(state.warned.values()),
        resumed_from=None if resume_from is None else str(resume_from),
        lora_dir=lora_dir,
        timing=timing,
        history=state.history,
    )
