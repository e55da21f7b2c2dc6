"""How a decision is written to MLflow tags and read back; the MLflow round trips are in tests/integration."""

from __future__ import annotations

import pytest

from fairdiffusion.errors import RegistryError
from fairdiffusion.registry import promotion, schema
from fairdiffusion.registry.gate import GateDecision
from fairdiffusion.registry.promotion import DecisionRecord, GatedCandidate


def test_an_audit_record_reads_back_from_its_tags() -> None:
    written = DecisionRecord(
        model="m",
        version="3",
        decision=schema.DECISION_ROLLBACK,
        reasons=["override withdrawn"],
        actor="carol",
        at="2024-01-01T00:00:00.000Z",
        data_md5=None,
        policy_hash="a" * 64,
        champion_before="4",
        champion_after="3",
    )
    tags = promotion._audit_tags(written)
    assert set(tags) == {value for name, value in vars(schema).items() if name.startswith("AUDIT_")}
    assert promotion._record_from_audit_tags(tags, "run-1") == DecisionRecord(
        **(written.to_dict() | {"audit_run_id": "run-1"})  # type: ignore[arg-type]
    )


CANDIDATE = GatedCandidate(
    run_id="run-1",
    model_uri="file:///model",
    model_id=None,
    run_tags={schema.DATA_MD5: "md5-v1", schema.CODE_GIT_COMMIT: "1" * 40, schema.SKIPPED: "false", "other": "x"},
    training_method="fair",
    policy_file="policies/demo.yaml",
    actor="ci",
)


def test_version_tags_carry_the_verdict_and_only_the_data_and_code_tags() -> None:
    decision = GateDecision(False, [], {"name": "demo"}, "2", ["too unfair"], "h" * 64)
    tags = promotion._gate_version_tags(CANDIDATE, decision, schema.STATUS_REJECTED)
    assert tags[schema.DATA_MD5] == "md5-v1" and tags[schema.CODE_GIT_COMMIT] == "1" * 40
    assert schema.SKIPPED not in tags and "other" not in tags
    assert tags[schema.GATE_PASSED] == "false" and tags[schema.GATE_REASONS] == ["too unfair"]
    assert tags[schema.GATE_COMPARED_WITH_VERSION] == "2" and tags[schema.STATUS] == schema.STATUS_REJECTED
    assert tags[schema.GATE_POLICY_FILE] == "policies/demo.yaml" and tags[schema.TRAINING_METHOD] == "fair"


def test_description_states_verdict_and_provenance_but_no_status() -> None:
    passed = GateDecision(True, [], {"name": "demo"}, None, [], "h" * 64)
    text = promotion._gate_description(CANDIDATE, passed)
    assert text.startswith("PASSED the fairness gate. Data md5 md5-v1")
    assert "Status" not in text  # a status written once goes stale when a newer champion replaces it
    assert text.endswith(f"policy policies/demo.yaml (sha256 {'h' * 64}).")


def test_status_of_a_candidate() -> None:
    assert promotion._candidate_status(passed=True, promote=True) == schema.STATUS_CHAMPION
    assert promotion._candidate_status(passed=True, promote=False) == schema.STATUS_AWAITING_APPROVAL
    assert promotion._candidate_status(passed=False, promote=False) == schema.STATUS_REJECTED


def test_search_literal_survives_mlflow_parsing_of_quotes() -> None:
    from mlflow.utils.search_utils import SearchUtils

    for value in ("fd'x", 'fd"x', "plain", "a\\b"):
        parsed = SearchUtils.parse_search_filter(f"tags.`k` = {promotion.search_literal(value, 'model name')}")
        assert parsed[0]["value"] == value
    for value in ("fd'\"x", "ends\\"):
        with pytest.raises(RegistryError, match="model name"):
            promotion.search_literal(value, "model name")


def test_a_stored_gate_decision_reads_back() -> None:
    from fairdiffusion.registry.gate import RuleCheck

    check = RuleCheck("max_es_fid", "es_fid_x/race", 50.0, 40.0, False, "ES-FID on race 50 > 40")
    decision = GateDecision(False, [check], {"name": "demo"}, "2", ["too unfair"], "h" * 64)
    assert GateDecision.from_dict(decision.to_dict()) == decision
