"""The MADness regulariser (``training.mad_regularizer``) on effective LoRA updates, as pure tensor math.

The paper. Mayer et al. 2024 ("Improving Fairness and Mitigating MADness in Generative
Models", arXiv 2405.13977) constrain the weights a model estimates from real data,
``theta_R = H(D_R)``, to agree with those it would estimate from its own samples,
``theta_S = H(D_S)`` with ``D_S ~ p_theta_R`` (their *Penalized Autophagy Estimation*),
and train the Lagrangian relaxation ``L(theta_R; D_R) + lambda * ||theta_R - theta_S||^2``,
where a hypernetwork ``H`` maps a data set to weights so both estimates are differentiable.

What is followed here. No hypernetwork: the estimator ``H`` is one gradient step from the
current weights, taken in the space of the effective LoRA updates ``dW = (alpha / r) B A``
of each adapted layer:

    H(D) = dW - eta * G(D),    G(D) = dL(D) / d(dW) = sum over tokens of delta_t x_t^T,

with ``x_t`` the layer's input and ``delta_t`` the gradient of the loss at its output
(:func:`effective_gradient`, from two hooks). The penalty, per group ``g`` of the protected
attributes and with uniform group weights (a minority counts as much as the majority,
whatever its share of the batch):

    P = lambda / |groups| * sum_g sum_layers || H(D_R,g) - stopgrad(H(D_S,g)) ||_F^2.

Why ``dW`` and not A and B: the loss depends on the adapters only through ``B A``, so
``dW`` and ``G`` are unchanged when A is scaled by c and B by 1/c; a penalty on A and B
(or on their gradients, which scale by 1/c and c) would change with a reparametrisation
that changes nothing the model computes. ``dW`` is also small: r (k + d) numbers define it.

Where this diverges from the paper, and why. (1) One-step estimator instead of a trained
hypernetwork: a hypernetwork that emits every adapter of a UNet is a second model to train
and tune, and the issue asks for a cheap option that composes with FBP. (2) The synthetic
branch is a constant (stop-gradient, and ``D_S`` sampled under ``torch.no_grad``, see
:func:`sample_without_gradients`); the paper differentiates through both estimates. (3)
``G(D_R,g)`` enters as a constant too (no second-order terms): the penalty's gradient with
respect to ``dW`` is then ``2 lambda eta / |groups| * sum_g (G_S,g - G_R,g)``, a first-order
correction that moves each group's update towards what its real data asks and away from
what its own samples ask. (4) Per group, uniformly weighted; the paper's penalty is on the
whole data set. FBP's perturbed weights apply to the real-data loss term only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def effective_update(lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """``dW = (alpha / r) B A`` of one LoRA layer: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``."""
    return (alpha / rank) * lora_b @ lora_a


def effective_gradient(
    inputs: torch.Tensor, output_grads: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean gradient of the loss with respect to a linear layer's effective weight.

    Args:
        inputs: The layer's inputs ``(N, ..., in)`` (N samples, any token dimensions).
        output_grads: The loss gradient at its outputs ``(N, ..., out)``, from a backward of
            the *sum* of per-sample losses, so each sample's share is its own.
        groups: Group index of each sample ``(N,)``, in ``[0, num_groups)``.
        num_groups: How many groups.

    Returns:
        ``(G, present)``: ``G`` is ``(num_groups, out, in)``, each group's mean per-sample
        gradient (zeros where absent); ``present`` marks the groups with samples.
    """
    per_sample = torch.einsum("n...o,n...i->noi", output_grads.float(), inputs.float())
    one_hot = torch.nn.functional.one_hot(groups.long(), num_groups).to(per_sample.dtype)  # (N, G)
    counts = one_hot.sum(dim=0)
    sums = torch.einsum("ng,noi->goi", one_hot, per_sample)
    return sums / counts.clamp(min=1)[:, None, None], counts > 0


def estimated_updates(delta_w: torch.Tensor, group_gradients: torch.Tensor, step_size: float) -> torch.Tensor:
    """``H(D_g) = dW - eta * G_g`` for every group: ``(num_groups, out, in)``; gradients are constants."""
    return delta_w[None] - step_size * group_gradients.detach()


def mad_penalty(
    real: Sequence[torch.Tensor],
    synthetic: Sequence[torch.Tensor],
    real_present: torch.Tensor,
    synthetic_present: torch.Tensor,
) -> torch.Tensor:
    """``1/|groups| * sum_g sum_layers ||H_R,g - stopgrad(H_S,g)||_F^2`` over groups present in both.

    Args:
        real: Per layer, the real-data estimates ``(num_groups, out, in)`` (with gradient).
        synthetic: Per layer, the synthetic-data estimates (treated as constants).
        real_present: Groups that had real samples ``(num_groups,)``.
        synthetic_present: Groups that had synthetic samples.

    Returns:
        A scalar; zero (with a gradient path) when no group has both.
    """
    if len(real) != len(synthetic):
        raise ValueError(f"{len(real)} real layers but {len(synthetic)} synthetic ones")
    both = (real_present & synthetic_present).to(real[0].dtype)
    squared = [((r - s.detach()) ** 2).sum(dim=(1, 2)) for r, s in zip(real, synthetic, strict=True)]
    per_group = torch.stack(squared).sum(dim=0)  # (num_groups,)
    return (per_group * both).sum() / both.sum().clamp(min=1)


def sample_without_gradients(sample: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run the model's own sampling (the synthetic batch) with autograd off: no gradient flows into it."""
    with torch.no_grad():
        return sample(*args, **kwargs)


class LayerProbe:
    """Records the inputs and outputs of some linear layers during one forward pass.

    For a LoRA layer ``y = (W0 + dW) x``, ``dL/d(dW) = sum_t delta_t x_t^T``, so its inputs
    and the loss gradient at its outputs give :func:`effective_gradient` without touching
    the parameters' ``.grad`` (``torch.autograd.grad`` with respect to the outputs only).
    A layer called more than once in the pass (shared modules) adds up over its calls.
    """

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.modules = list(modules)
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.modules]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LayerProbe:
        for index, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._recorder(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, index: int) -> Callable[..., None]:
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.calls[index].append((inputs[0].detach(), output))

        return record

    def group_gradients(
        self, loss_sum: torch.Tensor, groups: torch.Tensor, num_groups: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, :func:`effective_gradient` of ``loss_sum`` (the sum of per-sample losses); graph kept."""
        outputs = [output for calls in self.calls for _, output in calls]
        grads = iter(torch.autograd.grad(loss_sum, outputs, retain_graph=True))
        result = []
        for calls in self.calls:
            per_call = [effective_gradient(x, next(grads), groups, num_groups) for x, _ in calls]
            result.append((torch.stack([g for g, _ in per_call]).sum(dim=0), per_call[0][1]))
        return result


def lora_effective_update(module: torch.nn.Module, adapter: str = "default") -> torch.Tensor:
    """``dW`` of a peft LoRA layer (``lora_A``, ``lora_B``, ``scaling``: peft's alpha / r)."""
    layer: Any = module  # peft's LoraLayer; duck-typed so tests need no peft model
    return layer.scaling[adapter] * layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight


def mad_regularizer_term(
    modules: Sequence[torch.nn.Module],
    real: Sequence[tuple[torch.Tensor, torch.Tensor]],
    synthetic: Sequence[tuple[torch.Tensor, torch.Tensor]],
    step_size: float,
) -> torch.Tensor:
    """The unweighted penalty over LoRA layers, from :meth:`LayerProbe.group_gradients` of both batches.

    The real estimate keeps its gradient path through ``dW`` (so through A and B); the
    synthetic one is a constant. Multiply by ``training.mad_regularizer.weight``.
    """
    real_updates, synthetic_updates = [], []
    for module, (g_real, _), (g_synthetic, _) in zip(modules, real, synthetic, strict=True):
        delta_w = lora_effective_update(module)
        real_updates.append(estimated_updates(delta_w, g_real, step_size))
        synthetic_updates.append(estimated_updates(delta_w.detach(), g_synthetic, step_size))
    return mad_penalty(real_updates, synthetic_updates, real[0][1], synthetic[0][1])
