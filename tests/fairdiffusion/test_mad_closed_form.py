"""Model autophagy in closed form: a Gaussian refitted on its own samples, per group.

The simplest self-consuming loop (Mayer et al. 2024, Sec. 3; Alemohammad et al. 2023):
each generation draws n samples from the previous generation's Gaussian and refits it by
maximum likelihood. The ML variance is biased by (n - 1) / n, so after t refits starting
from the true variance 1 its expectation is ((n - 1) / n) ** t, and a small group loses
its diversity far faster than a big one. The gate's MADness guard must see that first.
"""

from __future__ import annotations

import numpy as np
import pytest

from fairdiffusion.evaluation.manifold import diversity_ratio, precision_recall
from fairdiffusion.evaluation.metric_keys import flatten_manifold
from fairdiffusion.registry.gate import check_madness
from fairdiffusion.registry.policy import MadnessRules

GENERATIONS = 10


def refit_variances(n: int, repetitions: int, generations: int, rng: np.random.Generator) -> np.ndarray:
    """ML variances ``(repetitions, generations)`` of chains refitted on their own n samples, from N(0, 1)."""
    mean, variance = np.zeros(repetitions), np.ones(repetitions)
    history = np.empty((repetitions, generations))
    for t in range(generations):
        samples = rng.normal(mean[:, None], np.sqrt(variance)[:, None], size=(repetitions, n))
        mean, variance = samples.mean(axis=1), samples.var(axis=1)  # ML: divides by n
        history[:, t] = variance
    return history


@pytest.mark.parametrize("n", [5, 50])
def test_ml_variance_follows_the_closed_form_within_sampling_error(n: int) -> None:
    variances = refit_variances(n, repetitions=8_000, generations=GENERATIONS, rng=np.random.default_rng(n))
    t = np.arange(1, GENERATIONS + 1)
    expected = ((n - 1) / n) ** t
    mean = variances.mean(axis=0)
    standard_error = variances.std(axis=0, ddof=1) / np.sqrt(len(variances))
    assert np.all(np.abs(mean - expected) < 4 * standard_error), (mean, expected)


def test_the_small_group_decays_faster() -> None:
    rng = np.random.default_rng(0)
    small, big = (refit_variances(n, 5_000, GENERATIONS, rng).mean(axis=0) for n in (5, 50))
    assert small[-1] < 0.15 < 0.8 < big[-1]


class _GroupChain:
    """One group's d-dimensional Gaussian, refitted each generation on n of its own samples."""

    def __init__(self, n: int, dim: int, rng: np.random.Generator) -> None:
        self.n, self.rng = n, rng
        self.mean, self.cov = np.zeros(dim), np.eye(dim)

    def refit(self) -> None:
        samples = self.rng.multivariate_normal(self.mean, self.cov, size=self.n)
        self.mean, self.cov = samples.mean(axis=0), np.cov(samples, rowvar=False, bias=True)

    def sample(self, size: int) -> np.ndarray:
        return self.rng.multivariate_normal(self.mean, self.cov, size=size)


def _group_metrics(chains: dict[str, _GroupChain], real: dict[str, np.ndarray]) -> dict[str, float]:
    table = {}
    for group, chain in chains.items():
        generated = chain.sample(len(real[group]))
        precision, recall = precision_recall(real[group], generated)
        table[f"group/{group}"] = {
            "precision": precision,
            "recall": recall,
            "diversity": diversity_ratio(real[group], generated),
        }
    return flatten_manifold(table, "x")


def test_the_madness_guard_trips_for_the_small_group_first() -> None:
    rng = np.random.default_rng(7)
    chains = {"big": _GroupChain(10_000, 2, rng), "small": _GroupChain(10, 2, rng)}
    real = {group: rng.normal(size=(400, 2)) for group in chains}  # the fixed real test set
    for chain in chains.values():
        chain.refit()  # generation 0: fitted on real data
    generation0 = _group_metrics(chains, real)
    tripped: dict[str, int] = {}
    for generation in range(1, GENERATIONS + 1):
        for chain in chains.values():
            chain.refit()  # fully synthetic: fitted on the previous generation's samples
        checks = check_madness(
            _group_metrics(chains, real), generation0, "generation 0", {"group": ["big", "small"]}, "x", MadnessRules()
        )
        for check in checks:
            if not check.passed:
                tripped.setdefault(check.metric.split("/")[-1], generation)
    assert "small" in tripped, "ten refits on 10 samples must cost the small group its diversity"
    assert tripped["small"] < tripped.get("big", GENERATIONS + 1)
    assert "big" not in tripped, tripped
