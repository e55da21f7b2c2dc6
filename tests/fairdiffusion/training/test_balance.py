"""Tests for the fairness baselines: inverse-frequency reweighting and group-balanced sampling."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fairdiffusion.config import parse_config
from fairdiffusion.errors import ConfigError, TrainingError
from fairdiffusion.training.balance import build_group_balance, cap_group_weights
from fairdiffusion.training.dataset import GlobalBatchSampler

ATTRS = {"race": ["Asian", "Black", "White"], "gender": ["Female", "Male"]}
#: (race, gender) -> rows: Asian women are a tiny intersectional group.
SHARES = {(0, 0): 2, (0, 1): 8, (1, 0): 30, (1, 1): 30, (2, 0): 100, (2, 1): 130}


def table_groups() -> torch.Tensor:
    rows = [[race, gender] for (race, gender), n in SHARES.items() for _ in range(n)]
    return torch.tensor(rows)


def test_reweight_weights_are_inverse_to_frequency_with_mean_one() -> None:
    groups = table_groups()
    balance = build_group_balance(groups, ATTRS, None, max_weight=None)
    weights = balance.row_weights(groups).double()
    assert float(weights.mean()) == pytest.approx(1.0)
    counts = {name: int(n) for name, n in zip(balance.names, balance.counts, strict=True)}
    assert counts["race=Asian&gender=Female"] == 2 and counts["race=White&gender=Male"] == 130
    # Inverse frequency: every group's rows together carry the same weight, 1/6 of the total.
    mass = balance.table * balance.counts
    torch.testing.assert_close(mass, torch.full((6,), float(len(groups)) / 6, dtype=torch.float64))
    assert balance.table[0] / balance.table[5] == pytest.approx(130 / 2)


def test_balance_attributes_choose_the_groups() -> None:
    groups = table_groups()
    balance = build_group_balance(groups, ATTRS, ["race"], max_weight=None)
    assert balance.names == ["race=Asian", "race=Black", "race=White"]
    assert balance.counts.tolist() == [10, 60, 230]
    weights = balance.row_weights(groups)
    assert float(weights[0]) == pytest.approx(300 / (3 * 10))  # an Asian row
    assert float(weights.double().mean()) == pytest.approx(1.0)


def test_cap_keeps_the_mean_and_the_order() -> None:
    groups = table_groups()
    free = build_group_balance(groups, ATTRS, None, max_weight=None).table
    capped = build_group_balance(groups, ATTRS, None, max_weight=5.0)
    weights = capped.row_weights(groups).double()
    assert float(weights.max()) == pytest.approx(5.0) and float(weights.mean()) == pytest.approx(1.0)
    assert capped.table[0] == capped.table[1] == pytest.approx(5.0)  # 25 and 6.25 before the cap
    # Groups under the cap keep their ratios (one common scale) and stay below it.
    ratio = capped.table[2:] / free[2:]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
    assert bool((capped.table[2:] < 5.0).all())
    uniform = cap_group_weights(free, capped.counts, 1.0)
    torch.testing.assert_close(uniform, torch.ones(6, dtype=torch.float64))


def test_unknown_balance_attribute_names_the_key() -> None:
    with pytest.raises(TrainingError, match=r"training\.balance_attributes: \['age'\] not in data\.attributes"):
        build_group_balance(table_groups(), ATTRS, ["age"], max_weight=None)


@pytest.mark.parametrize(
    ("training", "key"),
    [
        ({"balance_attributes": ["race", "race"]}, "training.balance_attributes"),
        ({"balance_attributes": []}, "training.balance_attributes"),
        ({"max_group_weight": 0.5}, "training.max_group_weight"),
        ({"method": "resample"}, "training.method"),
    ],
)
def test_bad_balance_settings_name_the_key(training: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({"training": training})


def balanced_draws(seed: int, epoch: int, processes: int = 1, rank: int = 0, start: int = 0) -> list[list[int]]:
    weights = build_group_balance(table_groups(), ATTRS, ["race"], max_weight=None).row_weights(table_groups())
    batch = 20 // processes
    return list(GlobalBatchSampler(300, batch, processes, rank, seed, epoch, start, weights=weights))


def test_balanced_sampling_draws_each_group_about_equally() -> None:
    races = table_groups()[:, 0]
    drawn = Counter(int(races[i]) for epoch in range(20) for batch in balanced_draws(3, epoch) for i in batch)
    total = sum(drawn.values())
    assert total == 20 * 300  # an epoch keeps its length: 15 global batches of 20
    for race in range(3):  # shares 3%, 20%, 77% in the table
        assert drawn[race] / total == pytest.approx(1 / 3, abs=0.03)


def test_balanced_sampling_is_seeded_per_epoch_and_independent_of_processes() -> None:
    first = balanced_draws(3, 0)
    assert first == balanced_draws(3, 0)
    assert first != balanced_draws(4, 0) and first != balanced_draws(3, 1)
    assert balanced_draws(3, 0, start=4) == first[4:], "a resume continues the same draws"
    halves = [balanced_draws(3, 0, processes=2, rank=r) for r in range(2)]
    assert [a + b for a, b in zip(*halves, strict=True)] == first
    assert len({i for batch in first for i in batch}) < 300, "drawn with replacement"


def test_sampler_weights_must_cover_every_row() -> None:
    with pytest.raises(ValueError, match="shape"):
        GlobalBatchSampler(10, 2, 1, 0, 0, 0, weights=torch.ones(9))
