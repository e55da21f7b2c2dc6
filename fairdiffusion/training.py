"""Fine-tuning of a Stable Diffusion UNet, with Fair Bayesian Perturbation or plain.

The loop follows diffusers' ``train_text_to_image.py``: the VAE and text encoder are
frozen, the UNet learns to predict the noise (or v) added to image latents at a random
timestep. With ``method: fair`` each sample's loss is scaled by the FBP weight
(FairDiffusion Sec. 3.2, see :mod:`fairdiffusion.fbp`); ``method: baseline`` is the
same loop with unit weights, for comparison.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fairdiffusion.config import TrainingConfig
from fairdiffusion.errors import TrainingError
from fairdiffusion.fbp import FBPController
from fairdiffusion.models import load_pipeline, load_training_components

MetricsCallback = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class TrainingResult:
    """Where the trained pipeline is and how training went."""

    model_dir: str
    method: str
    steps: int
    final_loss: float
    seconds: float
    sigma_names: list[str]
    final_sigma: list[float] | None
    windows: list[dict[str, object]]

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return asdict(self)


class FundusPromptDataset(Dataset):
    """Images, tokenised prompts and group codes of the training rows."""

    def __init__(
        self,
        samples: pd.DataFrame,
        attributes: Mapping[str, Sequence[str]],
        tokenizer: object,
        resolution: int,
    ) -> None:
        self.paths = samples["image_path"].tolist()
        self.resolution = resolution
        tokens = tokenizer(  # type: ignore[operator]
            samples["prompt"].tolist(),
            padding="max_length",
            max_length=tokenizer.model_max_length,  # type: ignore[attr-defined]
            truncation=True,
            return_tensors="pt",
        )
        self.input_ids = tokens.input_ids
        codes = [samples[a].map({g: i for i, g in enumerate(groups)}) for a, groups in attributes.items()]
        self.groups = torch.tensor(np.stack([c.to_numpy(dtype=np.int64) for c in codes], axis=1))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with Image.open(self.paths[index]) as image:
            # Resize then centre-crop, as diffusers does; no flip: it would swap the
            # laterality of a fundus image.
            rgb = image.convert("RGB")
            scale = self.resolution / min(rgb.size)
            size = (
                max(self.resolution, round(rgb.width * scale)),
                max(self.resolution, round(rgb.height * scale)),
            )
            rgb = rgb.resize(size, Image.Resampling.BICUBIC)
            left, top = (rgb.width - self.resolution) // 2, (rgb.height - self.resolution) // 2
            rgb = rgb.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {
            "pixel_values": pixels,
            "input_ids": self.input_ids[index],
            "groups": self.groups[index],
        }


def _group_losses(
    losses: torch.Tensor, groups: torch.Tensor, attributes: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    out = {}
    for a, (attribute, names) in enumerate(attributes.items()):
        for g, name in enumerate(names):
            mask = groups[:, a] == g
            if mask.any():
                out[f"train/group_loss/{attribute}/{name}"] = float(losses[mask].mean())
    return out


def train_unet(
    samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    pretrained: str,
    config: TrainingConfig,
    log_metrics: MetricsCallback | None = None,
) -> TrainingResult:
    """Fine-tune the UNet of a pipeline on the training rows and save the pipeline.

    Args:
        samples: Training rows of the sample table (``image_path``, ``prompt``, attributes).
        attributes: Protected attribute -> groups; FBP keeps one sigma entry per group.
        pretrained: Folder (or allowed hub id) of the pipeline to start from.
        config: Training settings.
        log_metrics: Called with ``(metrics, step)`` every ``log_every`` steps and at
            every FBP window; the caller decides where they go (MLflow).

    Returns:
        The result; the pipeline is saved (safetensors, diffusers layout) in
        ``config.output_dir / "pipeline"``.

    Raises:
        TrainingError: if the loss becomes NaN or infinite (naming the step).
    """
    started = time.perf_counter()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_training_components(pretrained)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()

    dataset = FundusPromptDataset(samples, attributes, tokenizer, config.resolution)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)

    fbp = None
    if config.method == "fair":
        fbp = FBPController(
            attributes,
            window=config.fair_time_window,
            exploitation_rate=config.fair_exploitation_rate,
            ucb_beta=config.ucb_beta,
            seed=config.seed,
            rank=accelerator.process_index,
        )

    step, loss_value = 0, float("nan")
    windows: list[dict[str, object]] = []
    while step < config.max_steps:
        for batch in loader:
            with torch.no_grad():
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0,
                noise_scheduler.config.num_train_timesteps,
                (latents.shape[0],),
                device=latents.device,
            )
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            prediction = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            if fbp is not None:
                # FBP (Sec. 3.2): loss = mean_i w_i * mse_i with w_i = 1 + sum_a sigma_g * eps.
                loss = (fbp.sample_weights(batch["groups"]) * per_sample).mean()
            else:
                loss = per_sample.mean()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"training loss became {loss_value} at step {step + 1}; lower training.learning_rate "
                    "or check the data"
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            step += 1

            # Every process sees the global batch, so every process holds the same sigma.
            all_losses = accelerator.gather(per_sample.detach())
            all_groups = accelerator.gather(batch["groups"])
            metrics = {"train/loss": loss_value} | _group_losses(all_losses, all_groups, attributes)
            if fbp is not None:
                result = fbp.observe(all_losses, all_groups)
                metrics["fbp/objective"] = result.y
                metrics |= {f"fbp/gap/{a}": gap for a, gap in result.gaps.items()}
                if result.window_closed:
                    window: dict[str, object] = {
                        "step": step,
                        "acquisition": result.acquisition_value,
                        "gaps": result.gaps,
                    }
                    window |= {"fit_failed": result.fit_failed, "reason": result.fit_failure_reason}
                    windows.append(window)
                    if result.acquisition_value is not None:
                        metrics["fbp/acquisition"] = result.acquisition_value
                    metrics["fbp/window_gap"] = sum(result.gaps.values())
                metrics |= {
                    f"fbp/sigma/{name.replace('=', '/')}": value
                    for name, value in zip(fbp.weight_names, result.sigma, strict=True)
                }
                must_log = result.window_closed
            else:
                must_log = False
            if (
                log_metrics is not None
                and accelerator.is_main_process
                and (must_log or step % config.log_every == 0 or step == config.max_steps)
            ):
                log_metrics(metrics, step)
            if step >= config.max_steps:
                break

    accelerator.wait_for_everyone()
    model_dir = Path(config.output_dir) / "pipeline"
    if accelerator.is_main_process:
        pipeline = load_pipeline(pretrained)
        pipeline.unet = accelerator.unwrap_model(unet)
        pipeline.save_pretrained(model_dir, safe_serialization=True)
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
    return TrainingResult(
        model_dir=str(model_dir),
        method=config.method,
        steps=step,
        final_loss=loss_value,
        seconds=time.perf_counter() - started,
        sigma_names=list(fbp.weight_names) if fbp else [],
        final_sigma=[float(s) for s in fbp.sigma] if fbp else None,
        windows=windows,
    )
