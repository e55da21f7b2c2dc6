"""The MADness regulariser (``training.mad_regularizer``) on effective LoRA updates: the math.

The paper. Mayer et al. 2024 ("Improving Fairness and Mitigating MADness in Generative
Models", arXiv 2405.13977, Sec. 4, "Penalized autophagy estimation") constrain the
weights a model estimates from real data, ``theta_R = H(D_R)``, to agree with those it
would estimate from its own samples, ``theta_S = H(D_S)`` with ``D_S ~ p_theta_R``, and
train the Lagrangian relaxation ``L(theta_R; D_R) + lambda * ||theta_R - theta_S||^2``;
a hypernetwork ``H`` maps a data set to weights so that both estimates are differentiable.

What is followed here. No hypernetwork: the estimator ``H`` is one gradient step from the
current weights, taken in the space of the effective LoRA update ``dW = (alpha / r) B A``
of each adapted layer:

    H(D) = dW - eta * G(D; theta),    G(D; theta) = dL(D) / d(dW) = mean_i sum_t delta_it x_it^T,

with ``x_it`` the layer's input at token ``t`` of sample ``i`` and ``delta_it`` the loss
gradient at its output (:meth:`LayerProbe.per_sample_gradients`, from forward hooks). The
two estimates start from the same ``dW``, so their discrepancy is

    H(D_R,g) - H(D_S,g) = eta * (G_S,g - G_R,g),

and the penalty, per protected attribute ``a`` and per group ``g`` of it present in both
batches, with uniform group weights (a minority counts as much as the majority, whatever
its share of the batch), averaged over the attributes:

    P = eta^2 / |A| * sum_a 1 / |groups_a| * sum_g sum_layers || G_R,g(theta) - G_S,g(theta) ||_F^2.

Both ``G`` keep their dependence on the weights (``create_graph=True``), so ``dP/dtheta`` is
a second-order (Hessian-vector) term, computed by double back-propagation: it moves the
adapters so that the model's own samples and the real data of each group ask for the same
update, i.e. towards a fixed point of self-consuming refits, which is the paper's aim.

Why ``dW`` and not A and B: the model depends on the adapters only through ``B A``, so
``G`` (and ``P``) do not change when A is scaled by c and B by 1/c; a penalty on A and B
or on their own gradients (which scale by 1/c and c) would change under a
reparametrisation that changes nothing the model computes.

Where this diverges from the paper, and why. (1) A one-step estimator instead of a trained
hypernetwork: a hypernetwork that emits every adapter of a UNet is a second model to train
and tune, and the issue asks for a cheap option that composes with FBP. (2) ``D_S`` is
sampled under ``torch.no_grad`` (:func:`sample_without_gradients`): the samples are data,
the paper back-propagates through the sampler. (3) Per group and per attribute, uniformly
weighted; the paper's penalty is on the whole data set. (4) FBP's perturbed weights apply
to the real-data loss term only; ``G_R`` is the gradient of the unweighted real loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def effective_update(lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """``dW = (alpha / r) B A`` of one LoRA layer: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``."""
    return (alpha / rank) * lora_b @ lora_a


def per_sample_gradients(inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    """``sum_t delta_it x_it^T`` for each sample ``i``: ``(N, out, in)``.

    Args:
        inputs: The layer's inputs ``(N, ..., in)`` (N samples, any token dimensions).
        output_grads: The gradient of the *sum* of per-sample losses at its outputs
            ``(N, ..., out)``, so each sample's share is its own.
    """
    return torch.einsum("n...o,n...i->noi", output_grads.float(), inputs.float())


def group_means(per_sample: torch.Tensor, codes: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's mean of ``per_sample`` ``(N, ...)`` (zeros where absent), and which groups are present."""
    one_hot = torch.nn.functional.one_hot(codes.long(), num_groups).to(per_sample.dtype)  # (N, G)
    counts = one_hot.sum(dim=0)
    sums = torch.einsum("ng,n...->g...", one_hot, per_sample)
    shape = (num_groups,) + (1,) * (per_sample.dim() - 1)
    return sums / counts.clamp(min=1).view(shape), counts > 0


def mad_penalty(
    real: Sequence[torch.Tensor],
    synthetic: Sequence[torch.Tensor],
    real_groups: torch.Tensor,
    synthetic_groups: torch.Tensor,
    group_counts: Sequence[int],
    step_size: float,
) -> torch.Tensor:
    """``P`` of the module docstring, from per-layer per-sample gradients of both batches.

    Args:
        real: Per layer, the real batch's :func:`per_sample_gradients` ``(N, out, in)``.
        synthetic: Per layer, the synthetic batch's ``(M, out, in)``.
        real_groups: Group codes of the real samples ``(N, attributes)``.
        synthetic_groups: Group codes of the synthetic samples ``(M, attributes)``.
        group_counts: How many groups each attribute has.
        step_size: ``eta``.

    Returns:
        A scalar; zero (with a gradient path) for an attribute with no group in both batches.
    """
    if len(real) != len(synthetic) or not real:
        raise ValueError(f"{len(real)} real layers but {len(synthetic)} synthetic ones")
    per_attribute = []
    for a, num_groups in enumerate(group_counts):
        total = real[0].new_zeros(())
        both = None
        for r, s in zip(real, synthetic, strict=True):
            g_real, real_present = group_means(r, real_groups[:, a], num_groups)
            g_synthetic, synthetic_present = group_means(s, synthetic_groups[:, a], num_groups)
            both = (real_present & synthetic_present).to(r.dtype)
            total = total + (((g_real - g_synthetic) ** 2).sum(dim=(1, 2)) * both).sum()
        assert both is not None
        per_attribute.append(total / both.sum().clamp(min=1))
    return step_size**2 * torch.stack(per_attribute).mean()


def sample_without_gradients(sample: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run the model's own sampling (the synthetic batch) with autograd off: no gradient flows into it."""
    with torch.no_grad():
        return sample(*args, **kwargs)


class LayerProbe:
    """Records the inputs and outputs of some linear layers during one forward pass.

    For a LoRA layer ``y = (W0 + dW) x``, ``dL/d(dW) = sum_t delta_t x_t^T``, so its inputs
    and the loss gradient at its outputs give :func:`per_sample_gradients` without touching
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
            self.calls[index].append((inputs[0], output))

        return record

    def per_sample_gradients(self, loss_sum: torch.Tensor, create_graph: bool = True) -> list[torch.Tensor]:
        """Per layer, :func:`per_sample_gradients` of ``loss_sum`` (the sum of per-sample losses).

        With ``create_graph`` the result stays a function of the weights (and of the layer
        inputs), for the penalty's double back-propagation; the forward graph is kept.
        """
        outputs = [output for calls in self.calls for _, output in calls]
        grads = iter(torch.autograd.grad(loss_sum, outputs, create_graph=create_graph, retain_graph=True))
        return [
            torch.stack([per_sample_gradients(x, next(grads)) for x, _ in calls]).sum(dim=0) for calls in self.calls
        ]
