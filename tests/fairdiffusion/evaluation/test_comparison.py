"""Tests for the candidate's per-group deltas from a baseline run (two flat metric dicts in, a table out)."""

from __future__ import annotations

import json
import math

import pytest

from fairdiffusion.evaluation.comparison import (
    BaselineComparison,
    BaselineRun,
    MetricDelta,
    compare_with_baseline,
    comparison_keys,
)

ATTRS = {"race": ["Asian", "White"]}
X = "fundus-enc64"


def flat(fid_asian: float, gap: float, is_overall: float) -> dict[str, float]:
    return {
        f"fid_{X}/overall": 10.0,
        f"fid_{X}/race/Asian": fid_asian,
        f"ci_low/fid_{X}/race/Asian": fid_asian - 1,
        f"ci_high/fid_{X}/race/Asian": fid_asian + 1,
        f"fid_gap_{X}/race": gap,
        f"is_1split_{X}/overall": is_overall,
        f"fid_{X}/race/Black": 99.0,  # not a configured group: never compared
        "train/loss": 0.5,
    }


def test_deltas_are_candidate_minus_baseline_with_the_metrics_direction() -> None:
    baseline = BaselineRun("run-b", "champion v1", flat(fid_asian=20.0, gap=8.0, is_overall=2.0))
    comparison = compare_with_baseline(flat(fid_asian=15.0, gap=9.5, is_overall=2.5), baseline, ATTRS, X)
    by_key = {d.key: d for d in comparison.deltas}
    assert list(by_key) == [f"fid_{X}/overall", f"fid_{X}/race/Asian", f"fid_gap_{X}/race", f"is_1split_{X}/overall"]
    asian = by_key[f"fid_{X}/race/Asian"]
    assert (asian.baseline, asian.candidate, asian.delta, asian.verdict) == (20.0, 15.0, -5.0, "better")
    assert asian.baseline_interval == [19.0, 21.0] and asian.candidate_interval == [14.0, 16.0]
    assert by_key[f"fid_gap_{X}/race"].verdict == "worse"  # a wider gap between groups
    assert by_key[f"is_1split_{X}/overall"].verdict == "better"  # IS: higher is better
    assert by_key[f"fid_{X}/overall"].verdict == "same" and by_key[f"fid_{X}/overall"].candidate_interval == []
    assert (comparison.run_id, comparison.source) == ("run-b", "champion v1")


def test_a_missing_value_has_no_verdict_and_another_extractor_matches_nothing() -> None:
    baseline = BaselineRun("run-b", "s", flat(20.0, 8.0, 2.0) | {f"fid_{X}/race/Asian": math.nan})
    comparison = compare_with_baseline(flat(15.0, 9.5, 2.5), baseline, ATTRS, X)
    assert next(d for d in comparison.deltas if d.key.endswith("race/Asian")).verdict == "–"
    assert compare_with_baseline(flat(15.0, 9.5, 2.5), baseline, ATTRS, "inception_v3").deltas == []


def test_compared_keys_cover_every_group_at_full_and_matched_size() -> None:
    keys = comparison_keys(ATTRS, X)
    for key in (
        f"fid_matched_{X}/race/Asian",
        f"fid_matched_overall_{X}/race",
        f"es_fid_matched_{X}/race",
        f"kid_{X}/race/White",
        f"es_is_1split_{X}/race",
    ):
        assert key in keys, key
    assert keys[f"es_is_1split_{X}/race"] is True and keys[f"is_1split_gap_{X}/race"] is False


def test_a_comparison_round_trips_through_json() -> None:
    baseline = BaselineRun("run-b", "s", flat(20.0, 8.0, 2.0))
    comparison = compare_with_baseline(flat(15.0, 9.5, 2.5), baseline, ATTRS, X)
    assert BaselineComparison.from_dict(json.loads(json.dumps(comparison.to_dict()))) == comparison


@pytest.mark.parametrize(
    ("delta", "higher", "verdict"),
    [(1.0, True, "better"), (1.0, False, "worse"), (-1.0, False, "better"), (0.0, True, "same")],
)
def test_verdict_follows_the_direction(delta: float, higher: bool, verdict: str) -> None:
    assert MetricDelta("k", 1.0, 1.0 + delta, delta, higher).verdict == verdict
