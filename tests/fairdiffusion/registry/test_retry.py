"""Which stored gate decision a retried promotion reuses; the MLflow round trips are in tests/integration."""

from __future__ import annotations

import pytest

from fairdiffusion.config import PipelineConfig
from fairdiffusion.registry import lineage
from fairdiffusion.registry.gate import GateDecision
from fairdiffusion.registry.promotion import ChampionInfo, DecisionRecord

STORED = GateDecision(True, [], {"name": "demo"}, compared_with_version="3", reasons=[], policy_hash="h")


def champion(version: str) -> ChampionInfo:
    return ChampionInfo(version=version, run_id="r", metrics={}, data_md5=None)


@pytest.fixture
def registry_state(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """What a failed attempt left: the stored decision, this run's version, its gate record."""
    state: dict[str, object] = {"stored": STORED.to_dict(), "version": None, "record": None}
    monkeypatch.setattr(lineage.runs, "run_artifact_json", lambda tracking, run_id, path: state["stored"])
    monkeypatch.setattr(lineage.registry, "run_version", lambda tracking, run_id: state["version"])
    monkeypatch.setattr(lineage.registry, "gate_record", lambda tracking, version: state["record"])
    return state


def stored_decision(current: ChampionInfo | None) -> GateDecision | None:
    return lineage._stored_decision(PipelineConfig(), "run-1", current)


def test_the_stored_decision_holds_while_its_champion_serves(registry_state) -> None:
    assert stored_decision(champion("3")) == STORED
    registry_state["stored"] = None
    assert stored_decision(champion("3")) is None  # nothing stored: decide


def test_a_new_champion_means_deciding_again(registry_state) -> None:
    assert stored_decision(champion("4")) is None
    assert stored_decision(None) is None


def test_the_decision_stands_once_acted_on(registry_state) -> None:
    registry_state["version"] = "5"
    assert stored_decision(champion("5")) == STORED  # the failed attempt made this run's version champion
    registry_state["record"] = DecisionRecord("m", "5", "pass", [], "ci", "t", None, None, "3", "5")
    assert stored_decision(champion("6")) == STORED  # recorded: a later promotion moved champion since
