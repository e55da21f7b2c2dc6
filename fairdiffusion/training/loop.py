"""Fine-tuning of a Stable Diffusion UNet, with Fair Bayesian Perturbation or plain.

The loop follows diffusers' ``train_text_to_image.py``: the VAE and text encoder are
frozen, the UNet learns to predict the noise (or v) added to image latents at a random
timestep. With ``method: fair`` each sample's loss is scaled by the FBP weight
(FairDiffusion Sec. 3.2, see :mod:`fairdiffusion.training.fbp`); ``method: baseline`` is the
same loop with unit weights, for comparison.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fairdiffusion.config import TrainingConfig
from fairdiffusion.errors import TrainingError
from fairdiffusion.models.loading import assemble_pipeline, load_pipeline, load_training_components
from fairdiffusion.models.presets import SD_PRESETS
from fairdiffusion.training.checkpoints import (
    commit_checkpoint,
    find_resume_checkpoint,
    partial_folder,
    prune_checkpoints,
    read_state,
    set_aside_checkpoints,
)
from fairdiffusion.training.dataset import FundusPromptDataset, GlobalBatchSampler
from fairdiffusion.training.fbp import FBPController, derive_seed, diagnose_windows
from fairdiffusion.training.results import WARMUP_STEPS, TrainingResult, TrainingTiming

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]
#: Called with ``(local folder, artifact path)``; the caller uploads the folder's files.
ArtifactCallback = Callable[[Path, str], None]

_EXTRA_STATE = "fairdiffusion_state.pt"


def _group_metrics(
    losses: torch.Tensor, groups: torch.Tensor, attributes: Mapping[str, Sequence[str]]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-group mean losses and, per attribute, the gap between the present groups."""
    metrics, gaps = {}, {}
    for a, (attribute, names) in enumerate(attributes.items()):
        means = []
        for g, name in enumerate(names):
            mask = groups[:, a] == g
            if mask.any():
                means.append(float(losses[mask].mean()))
                metrics[f"train/group_loss/{attribute}/{name}"] = means[-1]
        gaps[attribute] = max(means) - min(means) if len(means) >= 2 else 0.0
    return metrics, gaps


def _make_accelerator(config: TrainingConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    if config.mixed_precision == "fp16" and not cuda:
        raise TrainingError("training.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    # AcceleratorState is a process-wide singleton that refuses a second precision; a
    # process that trains more than once (tests, benchmarks) starts from a clean state.
    # The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        cpu=not cuda,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )


def _prepare_unet(unet: torch.nn.Module, config: TrainingConfig, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Adds LoRA adapters or not, turns on checkpointing; returns the trainable parameters."""
    if config.lora_rank is not None:
        from peft import LoraConfig

        # As diffusers' train_text_to_image_lora.py: the frozen base in the mixed
        # precision dtype, adapters on the attention projections, trained in fp32.
        unet.requires_grad_(False)
        unet.to(dtype=dtype)
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


def _draw_step_noise(
    generator: torch.Generator, latent_shape: torch.Size, num_processes: int, rank: int, num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent-sampling noise, diffusion noise and timesteps of this process's slice."""
    local = latent_shape[0]
    shape = (local * num_processes, *latent_shape[1:])
    device = generator.device
    latent_eps = torch.randn(shape, generator=generator, device=device)
    noise = torch.randn(shape, generator=generator, device=device)
    timesteps = torch.randint(0, num_timesteps, (shape[0],), generator=generator, device=device)
    part = slice(rank * local, (rank + 1) * local)
    return latent_eps[part], noise[part], timesteps[part]


def _min_snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    # Min-SNR-gamma (Hang et al. 2023), as diffusers' train_text_to_image.py computes it.
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def _gather_in_global_order(accelerator: Accelerator, local: list[torch.Tensor]) -> torch.Tensor:
    """The per-sample values of every micro-batch of a step, ordered as one process would see them."""
    stacked = torch.stack(local)  # [micro-batches, local batch]
    gathered = accelerator.gather(stacked)  # [processes * micro-batches, local batch], process-major
    return gathered.view(accelerator.num_processes, *stacked.shape).transpose(0, 1).reshape(-1)


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
    }


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


def _save_checkpoint(
    accelerator: Accelerator, root: Path, step: int, position: dict[str, Any], extra: dict[str, Any], keep: int
) -> None:
    """Model, optimiser, LR scheduler, gradient scaler and RNG states (accelerate), plus ours."""
    partial = root / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        partial_folder(root, step)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(extra, partial / _EXTRA_STATE)
        commit_checkpoint(partial, position)
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()


def _validation_prompts(samples: pd.DataFrame, attributes: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """One training prompt per subgroup, ``(attribute=group, prompt)``."""
    prompts = []
    for attribute, groups in attributes.items():
        for group in groups:
            rows = samples[samples[attribute] == group]
            if len(rows):
                prompts.append((f"{attribute}={group}", str(rows["prompt"].iloc[0])))
    return prompts


@torch.no_grad()
def _log_validation(
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
    rows = []
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _, prompt in prompts:
            generators = [
                torch.Generator(device).manual_seed(config.seed + i) for i in range(config.validation_images_per_group)
            ]
            rows.append(
                pipeline(
                    [prompt] * len(generators),
                    num_inference_steps=config.validation_inference_steps,
                    height=config.resolution,
                    width=config.resolution,
                    generator=generators,
                ).images
            )
    size = config.resolution
    grid = Image.new("RGB", (size * config.validation_images_per_group, size * len(rows)))
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


def _validate(
    components: tuple[Any, Any, Any, Any, Any],
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
    tokenizer, text_encoder, vae, _, noise_scheduler = components
    model = accelerator.unwrap_model(unet)
    pipeline = assemble_pipeline(tokenizer, text_encoder, vae, model, noise_scheduler)
    model.eval()
    if ema is not None:
        # As diffusers does: sample with the EMA weights, then put the trained ones back.
        ema.store(trainable)
        ema.copy_to(trainable)
    try:
        _log_validation(pipeline, prompts, config, step, dtype, log_artifact)
    finally:
        if ema is not None:
            ema.restore(trainable)
        model.train()


def _save_pipeline(
    model_dir: Path,
    pretrained: str,
    allow_download: bool,
    components: tuple[Any, Any, Any, Any, Any],
    unet: Any,
    config: TrainingConfig,
) -> str | None:
    """Saves the pipeline (float32, safetensors); with LoRA also the adapters alone. Returns their folder."""
    tokenizer, text_encoder, vae, _, noise_scheduler = components
    lora_dir = None
    unet = unet.to(torch.float32)
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
    pipeline.save_pretrained(model_dir, safe_serialization=True)
    return None if lora_dir is None else str(lora_dir)


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
    a plain process; only the main process logs and writes the pipeline.

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
    started = time.perf_counter()
    accelerator = _make_accelerator(config)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    set_seed(config.seed)
    components = load_training_components(pretrained, allow_download, seed=config.seed, device=accelerator.device)
    tokenizer, text_encoder, vae, unet, noise_scheduler = components
    if config.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.to(accelerator.device)
    trainable = _prepare_unet(unet, config, weight_dtype)

    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=config.ema_decay)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process (diffusers scales the same way).
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * world,
        num_training_steps=config.max_steps * world,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    dataset = FundusPromptDataset(
        samples, attributes, tokenizer, config.resolution, config.center_crop, config.random_flip, config.seed
    )
    micro_batch = config.batch_size * world
    if len(dataset) < micro_batch:
        raise TrainingError(
            f"training.batch_size {config.batch_size} x {world} processes = {micro_batch} exceeds the "
            f"{len(dataset)} training rows"
        )
    batches_per_epoch = len(dataset) // micro_batch
    prompts = _validation_prompts(samples, attributes) if config.validation_every else []

    fbp = None
    if config.method == "fair":
        # rank=0 on every process: each draws the eps of the whole global batch from the
        # same stream and keeps its slice (see the module docstring).
        fbp = FBPController(
            attributes,
            window=config.fair_time_window,
            exploitation_rate=config.fair_exploitation_rate,
            ucb_beta=config.ucb_beta,
            seed=config.seed,
            rank=0,
            fit_lag=config.fair_fit_lag,
        )
    # The loop's own generator, never the global one: a background GP fit forks the
    # global CPU generator (see fbp._fit_and_maximise).
    noise_generator = torch.Generator(accelerator.device).manual_seed(config.seed)

    checkpoint_root = Path(config.output_dir) / "checkpoints"
    identity = _run_identity(dataset, config, world)
    resume_from = find_resume_checkpoint(config.resume, checkpoint_root)
    step, loss_value = 0, float("nan")
    windows: list[dict[str, object]] = []
    warned: dict[str, str] = {}
    if resume_from is not None:
        position = read_state(resume_from)
        differing = [key for key, value in identity.items() if position["identity"].get(key) != value]
        if differing:
            raise TrainingError(
                f"training.resume: {resume_from} was written by a run with different {', '.join(differing)}; "
                "set training.resume: null to start afresh (its checkpoints are then moved to checkpoints.previous)"
            )
        accelerator.load_state(str(resume_from))
        extra = torch.load(resume_from / _EXTRA_STATE, map_location="cpu", weights_only=True)
        noise_generator.set_state(extra["noise_generator"])
        if fbp is not None:
            fbp.load_state_dict(extra["fbp"])
        if ema is not None:
            ema.load_state_dict(extra["ema"])
        step, loss_value = int(position["step"]), float(position["loss"])
        windows, warned = extra["windows"], extra["warned"]
        if main:
            logger.info("resuming from %s at step %d", resume_from, step)
    elif main and (previous := set_aside_checkpoints(checkpoint_root)):
        logger.warning("starting afresh: the checkpoints of an earlier run in this output_dir are now in %s", previous)
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.to(accelerator.device)

    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    loop_started = time.perf_counter()
    step_seconds: list[float] = []
    checkpoint_seconds = validation_seconds = 0.0
    epoch, start_batch = divmod(step * config.gradient_accumulation_steps, batches_per_epoch)
    step_losses: list[torch.Tensor] = []
    step_groups: list[torch.Tensor] = []
    step_weights: list[torch.Tensor] = []
    progress = tqdm(total=config.max_steps, initial=step, disable=not main, desc="training", dynamic_ncols=True)
    try:
        step_started = time.perf_counter()
        while step < config.max_steps:
            dataset.set_epoch(epoch)
            sampler = GlobalBatchSampler(len(dataset), config.batch_size, world, rank, config.seed, epoch, start_batch)
            loader = DataLoader(
                dataset,
                batch_sampler=sampler,
                num_workers=config.dataloader_num_workers,
                pin_memory=accelerator.device.type == "cuda",
                generator=torch.Generator().manual_seed(derive_seed(config.seed, epoch)),
            )
            for batch_index, batch in enumerate(loader, start=start_batch):
                global_groups = dataset.groups[sampler.global_indices(batch_index)]
                with accelerator.accumulate(unet):
                    pixel_values = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
                    with torch.no_grad():
                        posterior = vae.encode(pixel_values).latent_dist
                        latent_eps, noise, timesteps = _draw_step_noise(
                            noise_generator,
                            posterior.mean.shape,
                            world,
                            rank,
                            noise_scheduler.config.num_train_timesteps,
                        )
                        latents = posterior.mean + posterior.std * latent_eps.to(posterior.mean.dtype)
                        latents = latents * vae.config.scaling_factor
                        encoder_hidden_states = text_encoder(
                            batch["input_ids"].to(accelerator.device), return_dict=False
                        )[0]
                    noise = noise.to(latents.dtype)
                    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                    if noise_scheduler.config.prediction_type == "v_prediction":
                        target = noise_scheduler.get_velocity(latents, noise, timesteps)
                    else:
                        target = noise
                    prediction = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                    if config.snr_gamma is not None:
                        per_sample = per_sample * _min_snr_weights(noise_scheduler, timesteps, config.snr_gamma)
                    if fbp is not None:
                        # FBP (Sec. 3.2): loss = mean_i w_i * mse_i with w_i = 1 + sum_a sigma_g * eps.
                        global_weights = fbp.sample_weights(global_groups)
                        local = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
                        loss = (global_weights[local].to(per_sample.device) * per_sample).mean()
                    else:
                        global_weights = torch.ones(len(global_groups))
                        loss = per_sample.mean()
                    micro_loss = float(loss.detach())
                    if not math.isfinite(micro_loss):
                        raise TrainingError(
                            f"training loss became {micro_loss} at step {step + 1}; lower training.learning_rate "
                            "or check the data"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                step_losses.append(per_sample.detach())
                step_groups.append(global_groups)
                step_weights.append(global_weights)
                if not accelerator.sync_gradients:
                    continue

                step += 1
                if ema is not None:
                    ema.step(trainable)
                # Every process sees the global batch, so every process holds the same sigma.
                all_losses = _gather_in_global_order(accelerator, step_losses).float().cpu()
                all_groups = torch.cat(step_groups)
                # The global batch's loss, as one process holding it would compute it.
                loss_value = float((torch.cat(step_weights) * all_losses).mean())
                step_losses, step_groups, step_weights = [], [], []
                group_metrics, gaps = _group_metrics(all_losses, all_groups, attributes)
                metrics = {"train/loss": loss_value, "train/lr": float(lr_scheduler.get_last_lr()[0])}
                metrics |= group_metrics | {f"train/loss_gap/{a}": gap for a, gap in gaps.items()}
                metrics["train/loss_gap"] = sum(gaps.values())
                must_log = False
                if fbp is not None:
                    result = fbp.observe(all_losses, all_groups)
                    metrics["fbp/objective"] = result.y
                    metrics |= {f"fbp/gap/{a}": gap for a, gap in result.gaps.items()}
                    if result.window_closed:
                        window: dict[str, object] = {
                            # 1-based training steps: when the window closed, when its sigma took over.
                            "step": fbp.windows[-1].step + 1,
                            "applied_step": step,
                            "acquisition": result.acquisition_value,
                            "gaps": result.gaps,
                        }
                        window |= {"fit_failed": result.fit_failed, "reason": result.fit_failure_reason}
                        windows.append(window)
                        if result.acquisition_value is not None:
                            metrics["fbp/acquisition"] = result.acquisition_value
                        metrics["fbp/window_gap"] = sum(result.gaps.values())
                        findings = diagnose_windows(fbp.windows, fbp.weight_names, config.fair_warn_windows)
                        for key, message in findings.items():
                            if key not in warned:
                                warned[key] = f"step {step}: {message}"
                                if main:
                                    logger.warning("Fair Bayesian Perturbation: %s", warned[key])
                                    progress.write(f"WARNING Fair Bayesian Perturbation: {warned[key]}")
                        metrics["fbp/warnings"] = float(len(warned))
                        must_log = True
                    metrics |= {
                        f"fbp/sigma/{name.replace('=', '/')}": value
                        for name, value in zip(fbp.weight_names, result.sigma, strict=True)
                    }
                if (
                    log_metrics is not None
                    and main
                    and (must_log or step % config.log_every == 0 or step == config.max_steps)
                ):
                    log_metrics(metrics, step)
                progress.update(1)
                postfix = {"loss": f"{loss_value:.4f}", "gap": f"{metrics['train/loss_gap']:.4f}"}
                if fbp is not None:
                    postfix["sigma"] = " ".join(f"{s:.2f}" for s in fbp.sigma.tolist())
                progress.set_postfix(postfix, refresh=False)
                now = time.perf_counter()
                step_seconds.append(now - step_started)

                if config.checkpoint_every is not None and (
                    step % config.checkpoint_every == 0 or step == config.max_steps
                ):
                    micro = step * config.gradient_accumulation_steps
                    position = {
                        "step": step,
                        "loss": loss_value,
                        "epoch": micro // batches_per_epoch,
                        "batch_in_epoch": micro % batches_per_epoch,
                        "num_processes": world,
                        "identity": identity,
                    }
                    extra = {
                        "noise_generator": noise_generator.get_state(),
                        "fbp": None if fbp is None else fbp.state_dict(),
                        "ema": None if ema is None else ema.state_dict(),
                        "windows": windows,
                        "warned": warned,
                    }
                    _save_checkpoint(
                        accelerator, checkpoint_root, step, position, extra, config.checkpoints_total_limit
                    )
                    checkpoint_seconds += time.perf_counter() - now
                if config.validation_every is not None and step % config.validation_every == 0:
                    validation_started = time.perf_counter()
                    if main:
                        _validate(
                            components,
                            unet,
                            accelerator,
                            ema,
                            trainable,
                            prompts,
                            config,
                            step,
                            weight_dtype,
                            log_artifact,
                        )
                    accelerator.wait_for_everyone()
                    validation_seconds += time.perf_counter() - validation_started
                step_started = time.perf_counter()
                if step >= config.max_steps:
                    break
            epoch, start_batch = epoch + 1, 0
    except torch.OutOfMemoryError:
        raise TrainingError(_out_of_memory_message(config, step + 1)) from None
    finally:
        progress.close()
        if fbp is not None:
            fbp.close()
    loop_seconds = time.perf_counter() - loop_started
    peak_memory = torch.cuda.max_memory_allocated(accelerator.device) if accelerator.device.type == "cuda" else None

    accelerator.wait_for_everyone()
    model_dir = Path(config.output_dir) / "pipeline"
    lora_dir = None
    if main:
        final_unet = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(trainable)
        lora_dir = _save_pipeline(model_dir, pretrained, allow_download, components, final_unet, config)
        if fbp is not None:
            (Path(config.output_dir) / "fbp_trajectory.json").write_text(
                json.dumps(
                    {
                        "weight_names": fbp.weight_names,
                        "steps": [asdict(r) for r in fbp.steps],
                        "windows": [asdict(w) for w in fbp.windows],
                    }
                )
            )
    accelerator.wait_for_everyone()
    steady = step_seconds[WARMUP_STEPS:] if len(step_seconds) > WARMUP_STEPS else step_seconds
    steady_seconds = float(sum(steady))
    samples_per_step = micro_batch * config.gradient_accumulation_steps
    timing = TrainingTiming(
        loop_seconds=loop_seconds,
        steady_steps=len(steady),
        steady_seconds=steady_seconds,
        median_step_seconds=float(np.median(steady)) if steady else 0.0,
        samples_per_second=samples_per_step * len(steady) / steady_seconds if steady_seconds > 0 else 0.0,
        fbp_seconds=fbp.busy_seconds if fbp is not None else 0.0,
        checkpoint_seconds=checkpoint_seconds,
        validation_seconds=validation_seconds,
        peak_memory_bytes=peak_memory,
    )
    return TrainingResult(
        model_dir=str(model_dir),
        method=config.method,
        steps=step,
        final_loss=loss_value,
        seconds=time.perf_counter() - started,
        sigma_names=list(fbp.weight_names) if fbp else [],
        final_sigma=[float(s) for s in fbp.sigma] if fbp else None,
        windows=windows,
        warnings=list(warned.values()),
        resumed_from=None if resume_from is None else str(resume_from),
        lora_dir=lora_dir,
        timing=timing,
    )
