"""The gate's MADness guard: groups that lose diversity or recall after training on synthetic rows."""

from __future__ import annotations

import math

from fairdiffusion.config import FAIRGENMED_ATTRIBUTES
from fairdiffusion.evaluation.metric_keys import flatten_manifold, flatten_metrics
from fairdiffusion.evaluation.slices import equity_scaled
from fairdiffusion.registry.gate import GateDecision, check_madness, decide_promotion
from fairdiffusion.registry.policy import GatePolicy, MadnessRules

X = "randcnn32"
#: Every other rule lenient, so only the guard decides; ``madness`` left at its defaults.
CONFIG = GatePolicy.model_validate(
    {
        "name": "test",
        "absolute": {"min_slice_size": 3, "max_es_fid": None, "max_group_fid_gap": None},
        "non_regression": {"fid_overall": None, "es_fid": None},
        "reference": {"beat_base_model": False},
        "fidelity": {"min_group_fidelity": None, "min_margin_retained": None},
    }
)


def make_metrics() -> dict[str, float]:
    """FID keys of a candidate every non-MADness rule passes (every slice at FID 10, 10 images)."""
    slices = {"overall": {"fid": 10.0, "num_samples": 30.0}}
    slices |= {f"{a}/{g}": {"fid": 10.0, "num_samples": 10.0} for a, gs in FAIRGENMED_ATTRIBUTES.items() for g in gs}
    equity = {a: equity_scaled(10.0, dict.fromkeys(gs, 10.0), False) for a, gs in FAIRGENMED_ATTRIBUTES.items()}
    return flatten_metrics(slices, equity, X)


def manifold_metrics(diversity: float = 1.0, recall: float = 0.8, **worse: tuple[float, float]) -> dict[str, float]:
    """Every group at (diversity, recall), except ``worse``: group -> (diversity, recall)."""
    table = {}
    for attribute, groups in FAIRGENMED_ATTRIBUTES.items():
        for group in groups:
            d, r = worse.get(group.replace("-", "_"), (diversity, recall))
            table[f"{attribute}/{group}"] = {"precision": 0.9, "recall": r, "diversity": d}
    return flatten_manifold(table, X)


def decide(candidate, champion=None, **kwargs) -> GateDecision:
    return decide_promotion(candidate, champion, FAIRGENMED_ATTRIBUTES, X, CONFIG, champion_version="3", **kwargs)


def madness_failures(decision: GateDecision) -> list[str]:
    return [c.metric for c in decision.checks if c.rule.startswith("madness") and not c.passed]


GENERATION0 = make_metrics() | manifold_metrics()


def test_real_only_candidates_are_not_judged_by_the_guard() -> None:
    collapsed = make_metrics() | manifold_metrics(diversity=0.1, recall=0.1)
    assert decide(collapsed, generation0=GENERATION0).passed
    assert decide(collapsed, generation0=GENERATION0, synthetic_share=0.0).passed


def test_a_collapsed_minority_is_rejected_and_named() -> None:
    candidate = make_metrics() | manifold_metrics(Asian=(0.5, 0.79))
    decision = decide(candidate, generation0=GENERATION0, synthetic_share=0.3)
    assert not decision.passed
    assert madness_failures(decision) == [f"diversity_{X}/race/Asian"]
    (reason,) = decision.reasons
    assert reason == "MADness: race=Asian lost 50% of its diversity vs generation 0 (1 -> 0.5; tolerance 20%)"


def test_recall_loss_counts_too_and_every_group_is_reported() -> None:
    candidate = make_metrics() | manifold_metrics(Asian=(1.0, 0.4), Hispanic=(0.7, 0.8))
    decision = decide(candidate, generation0=GENERATION0, synthetic_share=0.1)
    assert madness_failures(decision) == [f"recall_{X}/race/Asian", f"diversity_{X}/ethnicity/Hispanic"]


def test_within_tolerance_passes_and_the_champion_is_the_default_reference() -> None:
    candidate = make_metrics() | manifold_metrics(diversity=0.85, recall=0.7)
    decision = decide(candidate, champion=GENERATION0, synthetic_share=0.2)
    assert decision.passed, decision.reasons
    assert any("vs champion v3" in c.detail for c in decision.checks if c.rule == "madness_recall")


def test_fails_closed_without_a_reference_or_with_missing_metrics() -> None:
    no_reference = decide(make_metrics() | manifold_metrics(), synthetic_share=0.1)
    assert [c.rule for c in no_reference.checks if not c.passed] == ["madness"]
    missing = decide(make_metrics(), generation0=GENERATION0, synthetic_share=0.1)
    assert len(madness_failures(missing)) == 2 * sum(len(g) for g in FAIRGENMED_ATTRIBUTES.values())
    nan_reference = dict(GENERATION0) | {f"recall_{X}/race/Asian": math.nan}
    unusable = decide(make_metrics() | manifold_metrics(), generation0=nan_reference, synthetic_share=0.1)
    assert madness_failures(unusable) == [f"recall_{X}/race/Asian"]


def test_rules_can_be_turned_off_and_the_policy_defaults_them_on() -> None:
    assert CONFIG.madness == MadnessRules(max_diversity_loss=0.2, max_recall_loss=0.2)
    off = MadnessRules(max_diversity_loss=None, max_recall_loss=None)
    assert check_madness(make_metrics(), None, "the champion", FAIRGENMED_ATTRIBUTES, X, off) == []
    policy = GatePolicy.model_validate(CONFIG.model_dump() | {"madness": {"max_recall_loss": None}})
    assert policy.madness.max_diversity_loss == 0.2 and policy.madness.max_recall_loss is None
