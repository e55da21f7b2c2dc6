"""The MADness regulariser: its math (invariance, uniform group weights, second-order gradient, no
gradient into the synthetic batch) and its place in the training loop."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from fairdiffusion.config import FAIRGENMED_ATTRIBUTES, TrainingConfig
from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.errors import TrainingError
from fairdiffusion.training.mad import (
    LayerProbe,
    effective_update,
    group_means,
    mad_penalty,
    per_sample_gradients,
    sample_without_gradients,
)
from fairdiffusion.training.mad_step import MadRegularizer, lora_layers

RANK, ALPHA = 2, 4.0


def _adapters(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, 5, generator=generator), torch.randn(3, RANK, generator=generator)


class _LoraLinear(torch.nn.Module):
    """peft's layout: a frozen base, ``lora_A``/``lora_B`` dicts and ``scaling``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.base = torch.nn.Linear(a.shape[1], b.shape[0], bias=False).requires_grad_(False)
        self.base.weight.data = torch.linspace(-1, 1, b.shape[0] * a.shape[1]).reshape(b.shape[0], a.shape[1])
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(a.shape[1], RANK, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(RANK, b.shape[0], bias=False)})
        self.lora_A["default"].weight.data, self.lora_B["default"].weight.data = a.clone(), b.clone()
        self.scaling = {"default": ALPHA / RANK}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora_B["default"](self.lora_A["default"](x)) * self.scaling["default"]
        return self.base(x) + lora


def _losses(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A non-quadratic per-sample loss, so that its gradient depends on the adapters."""
    return (torch.tanh(layer(x)) - 0.5).pow(2).sum(dim=(1, 2))


def _penalty(layer: torch.nn.Module, x_real: torch.Tensor, x_synthetic: torch.Tensor, groups: torch.Tensor):
    gradients = []
    for x in (x_real, x_synthetic):
        with LayerProbe([layer]) as probe:
            losses = _losses(layer, x)
        gradients.append(probe.per_sample_gradients(losses.sum()))
    return mad_penalty(gradients[0], gradients[1], groups, groups, [2], 0.5)


def test_the_probe_gives_each_samples_gradient_of_the_effective_weight() -> None:
    layer = torch.nn.Linear(5, 3, bias=False)
    x = torch.randn(4, 2, 5)
    with LayerProbe([layer]) as probe:
        losses = (layer(x) ** 2).sum(dim=(1, 2))
    (per_sample,) = probe.per_sample_gradients(losses.sum())
    assert layer.weight.grad is None
    for i in range(4):
        expected = torch.autograd.grad(losses[i], layer.weight, retain_graph=True)[0]
        torch.testing.assert_close(per_sample[i], expected)


def test_the_penalty_and_the_gradients_it_compares_do_not_change_when_a_is_scaled_and_b_unscaled() -> None:
    a, b = _adapters()
    torch.testing.assert_close(effective_update(a * 7, b / 7, ALPHA, RANK), effective_update(a, b, ALPHA, RANK))
    x_real, x_synthetic = torch.randn(4, 2, 5), torch.randn(4, 2, 5)
    groups = torch.tensor([[0], [1], [1], [0]])
    one = _penalty(_LoraLinear(a, b), x_real, x_synthetic, groups)
    seven = _penalty(_LoraLinear(a * 7, b / 7), x_real, x_synthetic, groups)
    assert float(one.detach()) > 0
    torch.testing.assert_close(one, seven)


def test_the_penalty_is_eta_squared_times_each_groups_squared_difference_of_mean_gradients() -> None:
    real = torch.stack([torch.ones(2, 2), torch.ones(2, 2), torch.zeros(2, 2)])  # group 0 twice, group 1
    synthetic = torch.zeros(2, 2, 2)
    both = torch.tensor([[0], [1]])
    penalty = mad_penalty([real], [synthetic], torch.tensor([[0], [0], [1]]), both, [2], 0.5)
    # group 0: ||1 - 0||^2 = 4 entries; group 1: 0; uniform over the 2 groups; times eta^2.
    assert float(penalty) == pytest.approx(0.25 * 4.0 / 2)
    # A mean over a group's samples: ten copies of the majority change nothing.
    many = mad_penalty(
        [torch.cat([real[:1].repeat(10, 1, 1), real[2:]])],
        [synthetic],
        torch.tensor([[0]] * 10 + [[1]]),
        both,
        [2],
        0.5,
    )
    torch.testing.assert_close(penalty, many)
    absent = mad_penalty([real], [synthetic[1:]], torch.tensor([[0], [0], [1]]), torch.tensor([[1]]), [2], 0.5)
    assert float(absent) == 0.0, "only groups with real and synthetic samples are compared"


def test_every_attribute_counts_equally() -> None:
    real = torch.stack([torch.ones(1, 1), torch.zeros(1, 1)])
    synthetic = torch.zeros(2, 1, 1)
    groups = torch.tensor([[0, 0], [1, 0]])  # attribute 0: two groups; attribute 1: both in group 0
    penalty = mad_penalty([real], [synthetic], groups, groups, [2, 3], 1.0)
    # attribute 0: group 0 differs by 1, group 1 by 0 -> 1/2; attribute 1: group 0's mean differs by 1/2 -> 1/4.
    assert float(penalty) == pytest.approx((0.5 + 0.25) / 2)


def test_group_means_mark_absent_groups() -> None:
    means, present = group_means(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 2]), 3)
    assert means.squeeze(1).tolist() == [2.0, 0.0, 5.0] and present.tolist() == [True, False, True]


def test_the_penalty_is_zero_on_the_models_own_data_and_its_gradient_is_second_order() -> None:
    a, b = _adapters()
    layer = _LoraLinear(a, b)
    x = torch.randn(4, 2, 5)
    groups = torch.tensor([[0], [1], [1], [0]])
    same = _penalty(layer, x, x.clone(), groups)
    assert float(same) == 0.0
    different = _penalty(layer, x, torch.randn(4, 2, 5), groups)
    different.backward()
    grad_a, grad_b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    # P depends on the adapters only through G_R and G_S: a first-order treatment would give no gradient.
    assert grad_a is not None and grad_b is not None and grad_a.abs().sum() > 0 and grad_b.abs().sum() > 0
    assert layer.base.weight.grad is None


def test_no_gradient_reaches_the_synthetic_batch() -> None:
    weights = torch.randn(3, 3, requires_grad=True)
    synthetic_images = sample_without_gradients(lambda w: w @ torch.randn(3, 3), weights)
    assert not synthetic_images.requires_grad


def test_per_sample_gradients_sum_over_tokens() -> None:
    x, grads = torch.randn(2, 4, 5), torch.randn(2, 4, 3)
    result = per_sample_gradients(x, grads)
    torch.testing.assert_close(result[1], sum(torch.outer(grads[1, t], x[1, t]) for t in range(4)))


def test_the_regulariser_is_off_by_default_and_needs_lora_without_gradient_checkpointing() -> None:
    assert TrainingConfig().mad_regularizer.weight == 0.0
    with pytest.raises(ValidationError, match="needs lora_rank"):
        TrainingConfig(mad_regularizer={"weight": 1.0})
    with pytest.raises(ValidationError, match="gradient_checkpointing"):
        TrainingConfig(mad_regularizer={"weight": 1.0}, lora_rank=4, gradient_checkpointing=True)


def test_a_unet_without_adapters_is_refused_by_name(tiny_pipeline_dir: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(tiny_pipeline_dir, subfolder="scheduler")
    assert lora_layers(unet) == []
    with pytest.raises(TrainingError, match="training.lora_rank"):
        MadRegularizer(unet, TrainingConfig().mad_regularizer, scheduler, [3, 2, 2], 0)


def test_training_with_the_regulariser_logs_its_penalty_and_differs_from_without(
    demo_dataset: Path, tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    from fairdiffusion.training.loop import train_unet

    samples: pd.DataFrame = load_fairgenmed(demo_dataset, ["train", "val"])
    results, logged = {}, {}
    for name, weight, encoder in (("plain", 0.0, False), ("regularised", 50.0, False), ("with-encoder", 50.0, True)):
        logs: list[dict[str, float]] = []
        config = TrainingConfig(
            method="fair",
            output_dir=tmp_path / name,
            resolution=32,
            batch_size=4,
            max_steps=3,
            log_every=1,
            lora_rank=4,
            learning_rate=1e-2,
            fbp={"time_window": 2},
            checkpoint_every=None,
            mad_regularizer={"weight": weight, "inference_steps": 2, "refresh_every": 2},
            train_text_encoder=encoder,
        )
        results[name] = train_unet(
            samples, FAIRGENMED_ATTRIBUTES, str(tiny_pipeline_dir), config, lambda m, s, logs=logs: logs.append(m)
        )
        logged[name] = logs
    penalties = [m["train/mad_penalty"] for m in logged["regularised"]]
    assert len(penalties) == 3 and all(p > 0 for p in penalties)
    assert all("train/mad_penalty" not in m for m in logged["plain"])
    # The first step's real loss is the same (same weights, same batch); the penalty changes the update.
    assert logged["plain"][0]["train/loss"] == pytest.approx(logged["regularised"][0]["train/loss"])
    assert logged["plain"][-1]["train/loss"] != pytest.approx(logged["regularised"][-1]["train/loss"])
    # With the text encoder trained too (the demo's setting), the penalty is computed and finite.
    assert all(0 < m["train/mad_penalty"] < float("inf") for m in logged["with-encoder"])
