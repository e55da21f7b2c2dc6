"""Group reweighting and group-balanced sampling: the fairness baselines FBP is compared with.

``method: reweight`` multiplies each sample's loss by its group's weight;
``method: balanced`` draws training rows with probability proportional to the same
weights, so every group is equally likely and the loss stays unweighted. A group is a
combination of the groups of ``training.balance_attributes`` (all protected attributes
by default) that occurs in the training rows; combinations that never occur have no
weight and are never drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fairdiffusion.errors import TrainingError

__all__ = ["GroupBalance", "build_group_balance", "cap_group_weights"]


@dataclass(frozen=True)
class GroupBalance:
    """Inverse-frequency weights of the intersectional groups of some protected attributes.

    Attributes:
        attributes: The attributes whose combined groups are balanced.
        columns: Their positions among the group-code columns (``data.attributes`` order).
        radices: Groups per attribute: a group's index is the mixed-radix number of its codes.
        names: Every combination's name, ``race=Asian&gender=Female``, by index.
        counts: ``[combinations]`` training rows of each group.
        table: ``[combinations]`` weight of a row of each group, 0 where the group has no
            row; its mean over the training rows is 1.
    """

    attributes: list[str]
    columns: list[int]
    radices: list[int]
    names: list[str]
    counts: Tensor
    table: Tensor

    def group_index(self, groups: Tensor) -> Tensor:
        """``[N]`` combination index of each row of ``[N, n_attributes]`` group codes."""
        index = torch.zeros(groups.shape[0], dtype=torch.long)
        for column, radix in zip(self.columns, self.radices, strict=True):
            index = index * radix + groups[:, column].long().cpu()
        return index

    def row_weights(self, groups: Tensor) -> Tensor:
        """``[N]`` float32 loss weight (``reweight``) or relative sampling rate (``balanced``) of each row."""
        return self.table[self.group_index(groups)].to(torch.float32)


def cap_group_weights(table: Tensor, counts: Tensor, cap: float) -> Tensor:
    """Caps group weights at ``cap`` while keeping their mean over the rows at 1.

    Water-filling: the groups above the cap are set to it and the others scaled up to
    restore the mean, until no group exceeds the cap (at most one pass per group, plus one).

    Args:
        table: ``[K]`` weights per group, mean 1 over the rows (``counts``).
        counts: ``[K]`` rows per group.
        cap: The largest weight, at least 1.

    Returns:
        ``[K]`` capped weights (``table`` itself when none exceeds ``cap``).
    """
    rows, present = counts.sum(), counts > 0
    capped = torch.zeros_like(present)
    scaled = table
    for _ in range(int(present.sum()) + 1):
        free = present & ~capped
        mass = (table * counts)[free].sum()
        if not bool(mass > 0):  # every group capped: only possible at cap 1, i.e. no reweighting
            return torch.where(present, 1.0, 0.0).to(table.dtype)
        scaled = torch.where(free, table * (rows - cap * counts[capped].sum()) / mass, scaled)
        over = free & (scaled > cap)
        if not bool(over.any()):
            break
        capped |= over
    return torch.where(capped, torch.tensor(cap, dtype=table.dtype), scaled)


def build_group_balance(
    groups: Tensor,
    attributes: Mapping[str, Sequence[str]],
    balance_attributes: Sequence[str] | None,
    max_weight: float | None,
) -> GroupBalance:
    """Inverse-frequency weights of the groups of ``balance_attributes`` in the training rows.

    A row of group ``g`` weighs ``N / (G n_g)`` (``N`` rows, ``G`` groups present,
    ``n_g`` rows of ``g``): proportional to ``1 / n_g``, with mean 1 over the rows, and
    each group's rows together carry ``1 / G`` of the total. With ``max_weight`` the
    weights are capped (:func:`cap_group_weights`): a tiny intersectional group would
    otherwise get a huge weight, or, sampled, the same few rows over and over.

    Args:
        groups: ``[N, n_attributes]`` group codes of the training rows.
        attributes: Protected attribute -> groups (the columns of ``groups``).
        balance_attributes: The attributes whose combinations are the groups; ``None``: all.
        max_weight: Cap on a group's weight; ``None``: none.

    Raises:
        TrainingError: If ``balance_attributes`` names an attribute not in ``attributes``.
    """
    names = list(attributes)
    chosen = list(balance_attributes) if balance_attributes is not None else names
    unknown = [name for name in chosen if name not in names]
    if unknown:
        raise TrainingError(f"training.balance_attributes: {unknown} not in data.attributes {names}")
    columns = [names.index(name) for name in chosen]
    radices = [len(attributes[name]) for name in chosen]
    labels = [""]
    for name in chosen:
        labels = [f"{prefix}&{name}={group}".lstrip("&") for prefix in labels for group in attributes[name]]
    balance = GroupBalance(chosen, columns, radices, labels, torch.zeros(0), torch.zeros(0))
    counts = torch.bincount(balance.group_index(groups), minlength=math.prod(radices)).to(torch.float64)
    present = counts > 0
    table = torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1.0)), 0.0)
    if max_weight is not None:
        table = cap_group_weights(table, counts, max_weight)
    return GroupBalance(chosen, columns, radices, labels, counts, table)
