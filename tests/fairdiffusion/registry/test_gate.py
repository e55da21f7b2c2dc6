"""Tests for the fairness gate: every rule, fail-closed handling, and non-regression."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from fairdiffusion.config import FAIRGENMED_ATTRIBUTES
from fairdiffusion.evaluation.metric_keys import flatten_metrics
from fairdiffusion.evaluation.slices import equity_scaled
from fairdiffusion.registry.gate import GateDecision, decide_promotion
from fairdiffusion.registry.policy import GatePolicy

# The integration tests' candidate builder: one helper for the fidelity metrics of a faithful model.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
from candidates import faithful_fidelity  # noqa: E402

X = "randcnn32"


def make_policy(
    max_es_fid: float | None = 100.0,
    max_group_fid_gap: float | None = 5.0,
    min_slice_size: int = 3,
    regression_tolerance: float = 0.10,
    min_group_fidelity: float | None = 0.8,
) -> GatePolicy:
    """A policy with one tolerance for overall FID and ES-FID."""
    return GatePolicy.model_validate(
        {
            "name": "test",
            "absolute": {
                "min_slice_size": min_slice_size,
                "max_es_fid": max_es_fid,
                "max_group_fid_gap": max_group_fid_gap,
            },
            "non_regression": {"fid_overall": regression_tolerance, "es_fid": regression_tolerance},
            # The reference rules have tests of their own below.
            "reference": {"beat_base_model": False},
            "fidelity": {"min_group_fidelity": min_group_fidelity},
        }
    )


CONFIG = make_policy()
#: Per-group FIDs of a candidate that meets every rule of CONFIG:
#: race D = 1 + 2 + 1 = 4 -> ES 50, gap 3; gender D = 1 -> ES 20, gap 1; ethnicity D = 2 -> ES 30, gap 2.
GOOD_GROUPS = {
    "race": {"Asian": 11.0, "Black": 12.0, "White": 9.0},
    "gender": {"Female": 10.0, "Male": 11.0},
    "ethnicity": {"Non-Hispanic": 10.0, "Hispanic": 12.0},
}


def make_metrics(overall: float = 10.0, groups: dict | None = None, size: float = 10.0) -> dict[str, float]:
    """Flat metrics built exactly as the evaluation builds them."""
    groups = groups or GOOD_GROUPS
    slices = {"overall": {"fid": overall, "num_samples": size * 3}}
    for attribute, values in groups.items():
        for group, fid in values.items():
            slices[f"{attribute}/{group}"] = {"fid": fid, "num_samples": size}
    equity = {attribute: equity_scaled(overall, values, higher_is_better=False) for attribute, values in groups.items()}
    return flatten_metrics(slices, equity, X) | faithful_fidelity(groups)


def decide(candidate, champion=None, config: GatePolicy = CONFIG, version: str | None = None) -> GateDecision:
    return decide_promotion(candidate, champion, FAIRGENMED_ATTRIBUTES, X, config, champion_version=version)


def failed_rules(decision: GateDecision) -> list[tuple[str, str]]:
    return [(c.rule, c.metric) for c in decision.checks if not c.passed]


def test_metrics_fixture_has_expected_values() -> None:
    metrics = make_metrics()
    assert metrics[f"es_fid_{X}/race"] == pytest.approx(50.0)
    assert metrics[f"fid_gap_{X}/race"] == pytest.approx(3.0)
    assert metrics["num_samples/race/Asian"] == 10.0


def test_candidate_meeting_every_rule_passes() -> None:
    decision = decide(make_metrics())
    assert decision.passed and decision.reasons == []
    rules = {c.rule for c in decision.checks}
    assert rules == {"max_es_fid", "max_group_fid_gap", "min_group_fidelity"}  # checks that ran, all passed
    groups = sum(len(g) for g in FAIRGENMED_ATTRIBUTES.values())
    assert len(decision.checks) == 2 * len(FAIRGENMED_ATTRIBUTES) + groups
    assert decision.policy["extractor"] == X and decision.policy["absolute"]["max_es_fid"] == 100.0
    json.dumps(decision.to_dict())  # serialisable for the registry


def test_max_es_fid_violated_alone() -> None:
    decision = decide(make_metrics(), config=make_policy(**{"max_es_fid": 40.0}))
    assert not decision.passed
    assert failed_rules(decision) == [("max_es_fid", f"es_fid_{X}/race")]
    assert len(decision.reasons) == 1
    assert "ES-FID on race" in decision.reasons[0] and "50 > 40" in decision.reasons[0]


def test_max_group_fid_gap_violated_alone() -> None:
    decision = decide(make_metrics(), config=make_policy(**{"max_group_fid_gap": 2.5}))
    assert not decision.passed
    assert failed_rules(decision) == [("max_group_fid_gap", f"fid_gap_{X}/race")]
    assert "largest FID gap between race groups 3 > 2.5" in decision.reasons[0]


def test_min_slice_size_violated_alone() -> None:
    metrics = make_metrics()
    metrics["num_samples/ethnicity/Hispanic"] = 2.0
    decision = decide(metrics)
    assert not decision.passed
    assert failed_rules(decision) == [("min_slice_size", "num_samples/ethnicity/Hispanic")]
    assert "slice ethnicity=Hispanic has 2 test images, below the minimum 3" in decision.reasons[0]


def test_slice_at_the_minimum_passes() -> None:
    metrics = make_metrics()
    metrics["num_samples/ethnicity/Hispanic"] = 3.0
    assert decide(metrics).passed


def test_rules_switched_off_with_null_thresholds() -> None:
    config = make_policy(**{"max_es_fid": None, "max_group_fid_gap": None, "min_group_fidelity": None})
    bad = make_metrics(groups={**GOOD_GROUPS, "race": {"Asian": 10.0, "Black": 90.0, "White": 10.0}})
    decision = decide(bad, config=config)
    assert decision.passed and decision.checks == []


def test_several_violations_are_all_reported() -> None:
    metrics = make_metrics(groups={**GOOD_GROUPS, "race": {"Asian": 11.0, "Black": 30.0, "White": 9.0}})
    metrics["num_samples/gender/Male"] = 1.0
    del metrics[f"es_fid_{X}/ethnicity"]
    # A champion with FID 5 everywhere (every ES-FID 5): the candidate regresses on all of them.
    champion = make_metrics(overall=5.0, groups={a: dict.fromkeys(g, 5.0) for a, g in GOOD_GROUPS.items()})
    decision = decide(metrics, champion, version="4")
    assert not decision.passed
    failed = set(failed_rules(decision))
    assert failed == {
        ("max_es_fid", f"es_fid_{X}/race"),
        ("max_group_fid_gap", f"fid_gap_{X}/race"),
        ("min_slice_size", "num_samples/gender/Male"),
        ("metric_present", f"es_fid_{X}/ethnicity"),
        ("non_regression", f"fid_{X}/overall"),
        ("non_regression", f"es_fid_{X}/race"),
        ("non_regression", f"es_fid_{X}/gender"),
    }
    assert len(decision.reasons) == len(failed) == 7
    assert decision.compared_with_version == "4"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_non_finite_or_missing_overall_fails_closed(bad: float | None) -> None:
    metrics = make_metrics()
    key = f"fid_{X}/overall"
    if bad is None:
        del metrics[key]
    else:
        metrics[key] = bad
    decision = decide(metrics)
    assert not decision.passed
    assert failed_rules(decision) == [("metric_present", key)]
    expected = "missing" if bad is None else f"not finite ({bad})"
    assert decision.reasons == [f"required metric {key} is {expected}"]


def test_nan_es_fid_fails_closed_even_without_thresholds() -> None:
    metrics = make_metrics()
    metrics[f"es_fid_{X}/gender"] = float("nan")
    config = make_policy(**{"max_es_fid": None})
    decision = decide(metrics, config=config)
    assert not decision.passed
    assert failed_rules(decision) == [("metric_present", f"es_fid_{X}/gender")]


def test_missing_group_slice_fails() -> None:
    metrics = make_metrics()
    del metrics["num_samples/race/Asian"]
    del metrics[f"fid_{X}/race/Asian"]
    decision = decide(metrics)
    assert not decision.passed
    assert set(failed_rules(decision)) == {
        ("min_slice_size", "num_samples/race/Asian"),
        ("metric_present", f"fid_{X}/race/Asian"),
    }
    assert any("slice race=Asian has no test images" in reason for reason in decision.reasons)


def test_nan_group_fid_fails() -> None:
    metrics = make_metrics()
    metrics[f"fid_{X}/gender/Female"] = float("nan")
    decision = decide(metrics)
    assert failed_rules(decision) == [("metric_present", f"fid_{X}/gender/Female")]


def test_metrics_of_another_extractor_do_not_count() -> None:
    decision = decide_promotion(make_metrics(), None, FAIRGENMED_ATTRIBUTES, "inception_v3", CONFIG)
    assert not decision.passed
    assert "required metric fid_inception_v3/overall is missing" in decision.reasons


def test_within_tolerance_of_champion_passes() -> None:
    champion = make_metrics(overall=9.5)  # limit 10.45 >= candidate 10; ES values grow too
    decision = decide(make_metrics(), champion, version="2")
    assert decision.passed, decision.reasons
    regression = [c for c in decision.checks if c.rule == "non_regression"]
    assert [c.metric for c in regression] == [f"fid_{X}/overall"] + [f"es_fid_{X}/{a}" for a in FAIRGENMED_ATTRIBUTES]
    assert regression[0].threshold == pytest.approx(9.5 * 1.1)
    assert decision.compared_with_version == "2"


def test_beyond_tolerance_of_champion_fails() -> None:
    champion = make_metrics()
    champion[f"fid_{X}/overall"] = 9.0  # limit 9.9 < candidate 10
    decision = decide(make_metrics(), champion, version="2")
    assert not decision.passed
    assert failed_rules(decision) == [("non_regression", f"fid_{X}/overall")]
    assert "vs champion v2" in decision.reasons[0] and "tolerance 10%" in decision.reasons[0]


def test_exact_tolerance_boundary() -> None:
    champion = make_metrics()
    champion[f"fid_{X}/overall"] = 10.0
    strict = make_policy(**{"regression_tolerance": 0.0})
    assert decide(make_metrics(), champion, config=strict).passed
    worse = make_metrics()
    worse[f"fid_{X}/overall"] = 10.01
    assert not decide(worse, champion, config=strict).passed


@pytest.mark.parametrize("missing", [f"fid_{X}/overall", f"es_fid_{X}/race"])
def test_champion_lacking_a_metric_fails_closed(missing: str) -> None:
    champion = make_metrics()
    del champion[missing]
    decision = decide(make_metrics(), champion, version="7")
    assert not decision.passed
    assert failed_rules(decision) == [("non_regression", missing)]
    assert f"champion v7 has no finite {missing}" in decision.reasons[0]


def test_champion_with_nan_metric_fails_closed() -> None:
    champion = make_metrics()
    champion[f"es_fid_{X}/gender"] = math.nan
    decision = decide(make_metrics(), champion, version="1")
    assert failed_rules(decision) == [("non_regression", f"es_fid_{X}/gender")]


def test_first_model_judged_by_absolute_rules_only() -> None:
    # Much worse than any plausible champion, yet within the absolute thresholds.
    groups = {a: {g: v * 3 for g, v in values.items()} for a, values in GOOD_GROUPS.items()}
    config = make_policy(**{"max_es_fid": 1000.0, "max_group_fid_gap": 10.0})
    candidate = make_metrics(overall=30.0, groups=groups)
    decision = decide(candidate, None, config=config)
    assert decision.passed and decision.compared_with_version is None
    assert all(c.rule != "non_regression" for c in decision.checks)
    # The same candidate against a better champion fails on non-regression alone.
    against = decide(candidate, make_metrics(), config=config, version="1")
    assert not against.passed and {r for r, _ in failed_rules(against)} == {"non_regression"}


def test_unparsable_policy_rejects_the_candidate() -> None:
    decision = decide_promotion(
        make_metrics(), None, FAIRGENMED_ATTRIBUTES, X, None, policy_error="gate policy p.yaml: not valid YAML"
    )
    assert not decision.passed
    assert decision.reasons == ["gate policy cannot be used: gate policy p.yaml: not valid YAML"]


def test_evaluation_of_another_data_version_fails_closed() -> None:
    decision = decide_promotion(
        make_metrics(), None, FAIRGENMED_ATTRIBUTES, X, CONFIG, candidate_data_md5="aaa", evaluated_data_md5="bbb"
    )
    assert not decision.passed
    assert "evaluation used data version bbb" in decision.reasons[0] and "aaa" in decision.reasons[0]
    unrecorded = decide_promotion(make_metrics(), None, FAIRGENMED_ATTRIBUTES, X, CONFIG, candidate_data_md5="aaa")
    assert not unrecorded.passed and "(unrecorded)" in unrecorded.reasons[0]


def test_non_regression_uses_the_interval_better_end() -> None:
    champion = make_metrics(overall=10.0)
    worse = make_metrics(overall=12.0)  # 20% worse than the champion, tolerance 10%
    assert not decide(worse, champion, version="1").passed
    uncertain = dict(worse) | {f"ci_low/fid_{X}/overall": 10.5}  # could be within 10%: not worse with confidence
    decision = decide(uncertain, champion, version="1")
    overall = next(c for c in decision.checks if c.metric == f"fid_{X}/overall")
    assert overall.passed and "interval low 10.5" in overall.detail
    certain = dict(worse) | {f"ci_low/fid_{X}/overall": 11.5}
    assert not decide(certain, champion, version="1").passed


def test_min_es_auc_needs_the_auc_and_meets_the_floor() -> None:
    policy = GatePolicy.model_validate(
        CONFIG.model_dump() | {"absolute": CONFIG.absolute.model_dump() | {"min_es_auc": {"race": 0.7}}}
    )
    missing = decide(make_metrics(), config=policy)
    assert not missing.passed and "no ES-AUC metric for race" in missing.reasons
    low = decide(make_metrics() | {"es_auc_smallcnn/glaucoma/race": 0.6}, config=policy)
    assert not low.passed and "es_auc_smallcnn/glaucoma/race 0.6 < 0.7" in low.reasons[0]
    assert decide(make_metrics() | {"es_auc_smallcnn/glaucoma/race": 0.8}, config=policy).passed


# --- Reference rules and scale-free ceilings -------------------------------------------------


def reference_policy(**reference: object) -> GatePolicy:
    raw = CONFIG.model_dump(mode="json")
    raw["reference"] = {"beat_base_model": True} | reference
    return GatePolicy.model_validate(raw)


def with_base(metrics: dict[str, float], base: float, ci_high: float) -> dict[str, float]:
    return metrics | {f"ref_base_fid_{X}/overall": base, f"ci_high/fid_{X}/overall": ci_high}


def test_a_candidate_beating_its_base_model_beyond_the_interval_passes() -> None:
    decision = decide(with_base(make_metrics(overall=10.0), base=20.0, ci_high=12.0), config=reference_policy())
    assert decision.passed, decision.reasons
    assert ("beat_base_model", f"fid_{X}/overall") in [(c.rule, c.metric) for c in decision.checks]


def test_a_candidate_no_better_than_its_base_model_is_rejected_with_the_rule_named() -> None:
    """A 1-step fine-tune: its point FID may be a little lower, but its interval reaches the base's."""
    decision = decide(with_base(make_metrics(overall=10.0), base=10.5, ci_high=11.0), config=reference_policy())
    assert not decision.passed
    assert failed_rules(decision) == [("beat_base_model", f"fid_{X}/overall")]
    assert "not better than the model it started from" in decision.reasons[0]


def test_an_unmeasured_base_model_fails_closed() -> None:
    decision = decide(make_metrics(), config=reference_policy())
    assert failed_rules(decision) == [("beat_base_model", f"ref_base_fid_{X}/overall")]


def test_fid_over_floor_ceiling() -> None:
    metrics = with_base(make_metrics(), base=20.0, ci_high=11.0) | {f"fid_over_floor_{X}/overall": 4.0}
    assert decide(metrics, config=reference_policy(max_fid_over_floor=5.0)).passed
    assert failed_rules(decide(metrics, config=reference_policy(max_fid_over_floor=3.0))) == [
        ("max_fid_over_floor", f"fid_over_floor_{X}/overall")
    ]


def test_scale_free_ceilings_read_the_same_at_any_fid_scale() -> None:
    """D / FID and gap / FID do not change when every FID is multiplied by 10."""
    raw = CONFIG.model_dump(mode="json")
    raw["absolute"] |= {"max_es_fid": None, "max_group_fid_gap": None, "max_relative_disparity": 0.3}
    policy = GatePolicy.model_validate(raw)
    small = make_metrics()
    large = make_metrics(overall=100.0, groups={a: {g: v * 10 for g, v in gs.items()} for a, gs in GOOD_GROUPS.items()})
    for metrics in (small, large):
        metrics |= {
            f"fid_rel_disparity_{X}/{a}": equity_scaled(
                metrics[f"fid_{X}/overall"], {g: metrics[f"fid_{X}/{a}/{g}"] for g in GOOD_GROUPS[a]}, False
            )["relative_disparity"]
            for a in GOOD_GROUPS
        }
    # race: D / FID = 4 / 10 = 0.4 > 0.3 at both scales; gender 0.1 and ethnicity 0.2 pass.
    for metrics in (small, large):
        assert failed_rules(decide(metrics, config=policy)) == [
            ("max_relative_disparity", f"fid_rel_disparity_{X}/race")
        ]


def test_relative_gap_uses_matched_sizes_and_fails_closed_when_missing() -> None:
    raw = CONFIG.model_dump(mode="json")
    raw["absolute"] |= {"max_relative_gap": {"race": 0.25}}
    policy = GatePolicy.model_validate(raw)
    metrics = make_metrics()
    assert failed_rules(decide(metrics, config=policy)) == [
        ("metric_present", f"fid_gap_matched_{X}/race"),
        ("metric_present", f"fid_matched_overall_{X}/race"),
    ]
    metrics |= {f"fid_gap_matched_{X}/race": 2.0, f"fid_matched_overall_{X}/race": 10.0}
    assert decide(metrics, config=policy).passed
    metrics[f"fid_gap_matched_{X}/race"] = 3.0
    assert failed_rules(decide(metrics, config=policy)) == [
        ("max_relative_gap", f"fid_gap_matched_{X}/race / fid_matched_overall_{X}/race")
    ]


def test_a_nan_interval_falls_back_to_the_point_and_a_nan_fid_fails_closed() -> None:
    metrics = with_base(make_metrics(overall=10.0), base=20.0, ci_high=math.nan)
    assert decide(metrics, config=reference_policy()).passed  # the point 10 < 20
    metrics[f"fid_{X}/overall"] = math.nan
    assert ("beat_base_model", f"fid_{X}/overall") in failed_rules(decide(metrics, config=reference_policy()))


def fidelity_failures(decision: GateDecision) -> list[str]:
    return [
        c.detail for c in decision.checks if c.rule in {"min_group_fidelity", "min_margin_retained"} and not c.passed
    ]


def test_a_prompt_blind_candidate_is_rejected_by_the_fidelity_rule_naming_group_and_figure() -> None:
    metrics = make_metrics()
    metrics |= {"fidelity/race/Asian": 0.0, "fidelity_generated_rate/race/Asian": 0.0}
    metrics |= {"fidelity/race/White": 0.62, "fidelity_generated_rate/race/White": 0.58}
    decision = decide(metrics)
    assert not decision.passed
    failures = fidelity_failures(decision)
    assert len(failures) == 2
    assert failures[0].startswith("prompt fidelity of race=Asian 0.00 < 0.80: 0% of images prompted as Asian")
    assert "race=White 0.62 < 0.80" in failures[1]


def test_an_attribute_not_visible_in_real_images_is_left_out_by_name() -> None:
    metrics = make_metrics() | {"fidelity_visible/gender": 0.0, "fidelity/gender/Male": 0.0}
    decision = decide(metrics)
    assert decision.passed
    left_out = [c.detail for c in decision.checks if c.metric == "fidelity_visible/gender"]
    assert left_out == ["gender is not visible in the real images beyond chance: left out of min_group_fidelity"]


def test_fidelity_fails_closed_when_not_measured_or_not_computable() -> None:
    unmeasured = {k: v for k, v in make_metrics().items() if not k.startswith("fidelity_computable/race")}
    assert "prompt fidelity of race was not measured" in " ".join(decide(unmeasured).reasons)
    not_computable = make_metrics() | {"fidelity_computable/ethnicity": 0.0}
    assert "prompt fidelity of ethnicity is not computable" in " ".join(decide(not_computable).reasons)


def test_margin_retained_floor_for_named_clinical_labels() -> None:
    policy = GatePolicy.model_validate(
        CONFIG.model_dump() | {"fidelity": {"min_group_fidelity": None, "min_margin_retained": {"cdr_status": 0.5}}}
    )
    clinical = {
        "fidelity_computable/cdr_status": 1.0,
        "fidelity_visible/cdr_status": 1.0,
        "fidelity_real_accuracy/cdr_status": 0.88,
        "fidelity_generated_accuracy/cdr_status": 0.38,
        "fidelity_majority_rate/cdr_status": 0.45,
        "fidelity_margin_retained/cdr_status": -0.16,
    }
    decision = decide(make_metrics() | clinical, config=policy)
    assert not decision.passed
    assert fidelity_failures(decision) == [
        "prompt fidelity of cdr_status: generated images keep -0.16 of the real images' margin over the majority "
        "class (< 0.50; accuracy real 0.88, generated 0.38, majority 0.45)"
    ]
    kept = clinical | {"fidelity_margin_retained/cdr_status": 0.7}
    assert decide(make_metrics() | kept, config=policy).passed
    # The accuracies only explain the reason: without them the rule still judges, and does not crash.
    bare = {k: v for k, v in clinical.items() if "accuracy" not in k and "majority" not in k}
    reason = fidelity_failures(decide(make_metrics() | bare, config=policy))[0]
    assert reason.endswith("(< 0.50; accuracy real nan, generated nan, majority nan)")
