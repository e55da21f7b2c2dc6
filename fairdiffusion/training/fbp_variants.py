"""Opt-in departures from the paper's Fair Bayesian Perturbation, as pure functions.

:class:`~fairdiffusion.training.fbp.FBPController` follows Luo et al. 2024 exactly by
default. A simulation of that controller with FairGenMed-like group shares (batch 16,
per-sample losses spread over timesteps, +5% loss on minority groups; issue 11) found
four things that these variants address, each named where it is used:

1. Only the variance is controlled: E[w] = 1 whatever sigma is, so no group is
   up-weighted on average (``mean_shift``); and at sigma about 0.5 over three
   attributes 12% of the weights are negative, i.e. gradient ascent for those samples
   (``weights: lognormal`` or ``clipped``).
2. The objective is noise: the per-step gap has a spread near 0.078 against a group
   effect near 0.003, mostly from the timestep each sample drew, and it is measured
   before the step that uses the sigma (``objective: window``).
3. Sigma barely moves: mixing toward U(0,1) every step pulls it to 0.5
   (``mix_toward: candidate``).
4. The GP forgets: it sees only the current window (``history_windows``).

None of them is the paper's method; ``benchmarks/bench_fairness.py`` measures whether any helps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "FBPVariant",
    "explore_around",
    "group_mean_offsets",
    "perturbation_weights",
    "window_objective",
]


@dataclass(frozen=True)
class FBPVariant:
    """Which departures from the paper a controller makes; the defaults are the paper.

    Attributes mirror ``training.fbp`` (:class:`fairdiffusion.config.FBPConfig`), where
    each is documented.
    """

    objective: Literal["step", "window"] = "step"
    timestep_buckets: int = 10
    history_windows: int = 1
    mix_toward: Literal["uniform", "candidate"] = "uniform"
    candidate_noise: float = 0.1
    weights: Literal["gaussian", "lognormal", "clipped"] = "gaussian"
    mean_shift: bool = False
    mean_shift_max: float = 0.5

    def __post_init__(self) -> None:
        if self.history_windows < 1 or self.timestep_buckets < 1:
            raise ValueError("history_windows and timestep_buckets must be >= 1")
        if self.objective == "window" and self.history_windows < 2:
            raise ValueError("objective 'window' gives one GP point per window: history_windows must be >= 2")
        if not 0.0 < self.mean_shift_max < 1.0:
            raise ValueError(f"mean_shift_max must be in (0, 1), got {self.mean_shift_max}")


def perturbation_weights(kind: str, eps: Tensor, scales: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Per-sample loss weights from ``eps``, ``scales`` and mean ``offsets``, all ``[B, A]``.

    ``gaussian`` (paper): ``1 + sum_a (m_a + s_a eps_a)``. ``lognormal``:
    ``exp(sum_a (m_a + s_a eps_a - s_a^2 / 2))``, mean ``exp(sum_a m_a)`` (1 without
    offsets) and always positive. ``clipped``: the gaussian weights clipped at 0 and
    divided by their mean over the batch (all zero: left at zero, the step then trains
    nothing), because clipping alone raises the mean above 1 by an amount that grows
    with sigma, which would change the effective learning rate with sigma.
    """
    if kind == "lognormal":
        # Variant (reason 1 in the module docstring): positive weights with E[w] = 1.
        exponent = (scales * eps - 0.5 * scales**2).sum(dim=1)
        return torch.exp(exponent if offsets is None else exponent + offsets.sum(dim=1))
    weights = 1.0 + (scales * eps).sum(dim=1)
    if offsets is not None:
        weights = weights + offsets.sum(dim=1)
    if kind == "clipped":
        # Variant (reason 1): no negative weight, i.e. no gradient ascent on a sample.
        weights = weights.clamp(min=0.0)
        mean = weights.mean()
        return weights / mean if bool(mean > 0) else weights
    if kind != "gaussian":
        raise ValueError(f"unknown weights {kind!r}")
    return weights


def group_mean_offsets(unit: Tensor, sizes: Sequence[int], max_shift: float) -> Tensor:
    """Per-group weight mean offsets from their unit-box coordinates (the GP's search space).

    ``unit`` holds ``sum_a (G_a - 1)`` values in [0, 1]: the first group of each
    attribute is the reference with offset 0, because shifting every group of an
    attribute alike changes only the loss scale (the learning rate), not who is
    up-weighted; this also keeps the GP's dimension down. A coordinate ``u`` is the
    offset ``(2u - 1) max_shift / A`` (``A`` attributes), so the summed offsets of a
    sample lie in ``[-max_shift, max_shift]`` and its mean weight stays positive.

    Returns:
        ``[sum_a G_a]`` offsets, in the controller's sigma order.
    """
    per_attribute = max_shift / len(sizes)
    values = (2.0 * unit.to(torch.float64) - 1.0) * per_attribute
    parts, start = [], 0
    for size in sizes:
        parts += [torch.zeros(1, dtype=torch.float64), values[start : start + size - 1]]
        start += size - 1
    return torch.cat(parts)


def explore_around(candidate: Tensor, noise: float, generator: torch.Generator) -> Tensor:
    """The exploration target of ``mix_toward: candidate``: the GP's optimum plus seeded noise, in [0, 1].

    Variant (reason 3 in the module docstring): mixing toward U(0,1) every step leaves
    half the weight on the window's candidate; exploring around it keeps sigma near
    what the GP chose while still perturbing it.
    """
    draw = torch.randn(candidate.shape, generator=generator, dtype=torch.float64)
    return (candidate + noise * draw).clamp(0.0, 1.0)


def window_objective(
    losses: Tensor,
    groups: Tensor,
    timesteps: Tensor,
    sizes: Sequence[int],
    buckets: int,
    num_timesteps: int,
) -> tuple[float, dict[int, float]]:
    """The BO objective of a whole window: minus the summed group gaps of bucket-normalised losses.

    Variant (reason 2 in the module docstring). A sample's loss depends far more on its
    timestep than on its group, so each loss is divided by the mean loss of its
    timestep bucket (``buckets`` equal-width buckets of ``[0, num_timesteps)``) over
    the window; groups are then compared by their mean normalised loss over the window.
    The window mean (not a running mean over training) is used because the loss falls
    as training goes: a running mean would lag it. Non-finite losses are ignored.

    Args:
        losses: ``[N]`` per-sample losses of every step of the window.
        groups: ``[N, A]`` group codes.
        timesteps: ``[N]`` the timestep each sample was noised at.
        sizes: Groups per attribute.
        buckets: Number of timestep buckets.
        num_timesteps: The scheduler's training timesteps.

    Returns:
        ``y`` and the gap (max - min present-group mean) per attribute index.
    """
    loss = losses.to(torch.float64).reshape(-1)
    finite = torch.isfinite(loss)
    bucket = (timesteps.long().reshape(-1) * buckets // num_timesteps).clamp(0, buckets - 1)
    total = torch.zeros(buckets, dtype=torch.float64).index_add_(0, bucket[finite], loss[finite])
    count = torch.zeros(buckets, dtype=torch.float64).index_add_(0, bucket[finite], torch.ones_like(loss[finite]))
    bucket_mean = total / count.clamp(min=1.0)
    normalised = loss / bucket_mean[bucket].clamp(min=torch.finfo(torch.float64).tiny)
    gaps: dict[int, float] = {}
    for a, size in enumerate(sizes):
        means = [normalised[m].mean() for g in range(size) if (m := finite & (groups[:, a] == g)).any()]
        gaps[a] = float(max(means) - min(means)) if len(means) >= 2 else 0.0
    return -sum(gaps.values()), gaps
