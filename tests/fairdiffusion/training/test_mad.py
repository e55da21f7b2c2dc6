"""The MADness regulariser's math: scale invariance, uniform group weights, no gradient into the synthetic batch."""

from __future__ import annotations

import pytest
import torch

from fairdiffusion.config import TrainingConfig
from fairdiffusion.training.mad import (
    effective_gradient,
    effective_update,
    estimated_updates,
    mad_penalty,
    sample_without_gradients,
)

RANK, ALPHA = 2, 4.0


def _adapters(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, 5, generator=generator), torch.randn(3, RANK, generator=generator)


def _layer_gradients(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, target: torch.Tensor, groups: torch.Tensor):
    """G of the loss sum_i ||(W0 + dW) x_i - t_i||^2 through a real backward pass and hooks' tensors."""
    delta_w = effective_update(a.clone().requires_grad_(), b.clone().requires_grad_(), ALPHA, RANK)
    output = x @ delta_w.T
    output.retain_grad()
    ((output - target) ** 2).sum().backward()
    return effective_gradient(x, output.grad, groups, 2)


def test_the_effective_update_and_its_gradient_do_not_change_when_a_is_scaled_and_b_unscaled() -> None:
    a, b = _adapters()
    x, target = torch.randn(6, 4, 5), torch.randn(6, 4, 3)
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    torch.testing.assert_close(effective_update(a * 7, b / 7, ALPHA, RANK), effective_update(a, b, ALPHA, RANK))
    g1, _ = _layer_gradients(a, b, x, target, groups)
    g2, _ = _layer_gradients(a * 7, b / 7, x, target, groups)
    torch.testing.assert_close(g1, g2)
    # The adapters' own gradients are not invariant: that is why the penalty never uses them.
    scaled = (a * 7).requires_grad_()
    (((x @ effective_update(scaled, b / 7, ALPHA, RANK).T) - target) ** 2).sum().backward()
    plain = a.clone().requires_grad_()
    (((x @ effective_update(plain, b, ALPHA, RANK).T) - target) ** 2).sum().backward()
    assert not torch.allclose(scaled.grad, plain.grad)


def test_group_gradients_are_per_sample_means_of_the_hooks_outer_products() -> None:
    x, grads = torch.randn(3, 5), torch.randn(3, 2)
    g, present = effective_gradient(x, grads, torch.tensor([0, 0, 2]), 3)
    torch.testing.assert_close(g[0], (torch.outer(grads[0], x[0]) + torch.outer(grads[1], x[1])) / 2)
    torch.testing.assert_close(g[2], torch.outer(grads[2], x[2]))
    assert present.tolist() == [True, False, True] and torch.all(g[1] == 0)


def test_groups_count_equally_whatever_their_size() -> None:
    delta_w = torch.zeros(2, 2)
    real = torch.stack([torch.ones(2, 2), torch.zeros(2, 2)])  # group 0's update differs by 1 per entry
    synthetic = torch.zeros(2, 2, 2)
    both = torch.tensor([True, True])
    penalty = mad_penalty([estimated_updates(delta_w, -real, 1.0)], [synthetic], both, both)
    assert float(penalty) == pytest.approx(4.0 / 2)  # group 0: 4, group 1: 0, averaged over 2 groups
    # The group mean is a mean over a group's samples: ten copies of the majority change nothing.
    x, grads = torch.randn(2, 3), torch.randn(2, 3)
    few, _ = effective_gradient(x, grads, torch.tensor([0, 1]), 2)
    many, _ = effective_gradient(
        torch.cat([x[:1].repeat(10, 1), x[1:]]),
        torch.cat([grads[:1].repeat(10, 1), grads[1:]]),
        torch.tensor([0] * 10 + [1]),
        2,
    )
    torch.testing.assert_close(few, many)
    absent = mad_penalty([real], [synthetic], torch.tensor([True, True]), torch.tensor([False, True]))
    assert float(absent) == 0.0, "only groups with real and synthetic samples are compared"


def test_no_gradient_reaches_the_synthetic_batch_or_its_estimate() -> None:
    a, b = (t.requires_grad_() for t in _adapters())
    weights = torch.randn(3, 3, requires_grad=True)
    synthetic_images = sample_without_gradients(lambda w: w @ torch.randn(3, 3), weights)
    assert not synthetic_images.requires_grad
    delta_w = effective_update(a, b, ALPHA, RANK)
    synthetic = estimated_updates(delta_w, torch.randn(2, 3, 5), 0.1)
    real = estimated_updates(delta_w, torch.randn(2, 3, 5), 0.1)
    both = torch.tensor([True, True])
    mad_penalty([real], [synthetic], both, both).backward()
    assert a.grad is not None and b.grad is not None and weights.grad is None
    # d P / d dW = 2 eta / |groups| * sum_g (G_S,g - G_R,g): the synthetic side is a constant.


def test_the_regulariser_is_off_by_default() -> None:
    assert TrainingConfig().mad_regularizer.weight == 0.0


def test_the_probe_gives_the_gradient_of_the_effective_weight_without_touching_parameters() -> None:
    from fairdiffusion.training.mad import LayerProbe

    layer = torch.nn.Linear(5, 3, bias=False)
    x, groups = torch.randn(4, 2, 5), torch.tensor([0, 1, 1, 0])
    with LayerProbe([layer]) as probe:
        per_sample = (layer(x) ** 2).sum(dim=(1, 2))
    ((g, present),) = probe.group_gradients(per_sample.sum(), groups, 2)
    assert layer.weight.grad is None and present.tolist() == [True, True]
    expected = torch.autograd.grad(per_sample[groups == 1].sum() / 2, layer.weight)[0]
    torch.testing.assert_close(g[1], expected)


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


def test_the_term_on_lora_layers_is_invariant_and_flows_only_into_the_adapters() -> None:
    from fairdiffusion.training.mad import LayerProbe, mad_regularizer_term

    a, b = _adapters()
    x_real, x_synthetic = torch.randn(4, 5), torch.randn(4, 5)
    groups = torch.tensor([0, 1, 1, 0])

    def term(c: float) -> tuple[float, torch.Tensor]:
        layer = _LoraLinear(a * c, b / c)
        gradients = []
        for x in (x_real, x_synthetic):
            with LayerProbe([layer]) as probe:
                per_sample = ((layer(x) - 1) ** 2).sum(dim=1)
            gradients.append(probe.group_gradients(per_sample.sum(), groups, 2))
        penalty = mad_regularizer_term([layer], gradients[0], gradients[1], 0.5)
        penalty.backward()
        return float(penalty.detach()), layer.lora_A["default"].weight.grad

    (p1, grad), (p2, _) = term(1.0), term(3.0)
    assert p1 == pytest.approx(p2, rel=1e-5) and p1 > 0
    assert grad is not None
