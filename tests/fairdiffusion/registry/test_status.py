"""A version's status and the expected aliases, replayed from an in-memory decision log."""

from __future__ import annotations

from fairdiffusion.registry import schema
from fairdiffusion.registry.promotion import DecisionRecord
from fairdiffusion.registry.status import derive_status, replay_aliases, status_after, unexplained_aliases


def decided(version: str, decision: str, before: str | None, after: str | None, at: str) -> DecisionRecord:
    return DecisionRecord("m", version, decision, [], "ci", at, None, None, before, after)


#: v1 champion, v2 rejected, v3 replaces v1, v4 waits for approval.
LOG = [
    decided("1", schema.DECISION_PASS, None, "1", "t1"),
    decided("2", schema.DECISION_FAIL, "1", "1", "t2"),
    decided("3", schema.DECISION_PASS, "1", "3", "t3"),
    decided("4", schema.DECISION_PASS, "3", "3", "t4"),
]
ALIASES = {schema.CHAMPION: "3", schema.PREVIOUS_CHAMPION: "1", schema.CANDIDATE: "4"}


def test_status_comes_from_the_aliases_and_the_log() -> None:
    statuses = {v: derive_status(v, ALIASES, LOG) for v in ("1", "2", "3", "4", "5")}
    assert statuses == {
        "1": schema.STATUS_REPLACED,
        "2": schema.STATUS_REJECTED,
        "3": schema.STATUS_CHAMPION,
        "4": schema.STATUS_AWAITING_APPROVAL,
        "5": schema.STATUS_UNRECORDED,
    }


def test_the_log_explains_the_aliases_it_left() -> None:
    assert replay_aliases(LOG).aliases == {schema.CHAMPION: "3", schema.PREVIOUS_CHAMPION: "1"}
    assert unexplained_aliases(ALIASES, LOG) == [] and replay_aliases(LOG).gaps == []


def test_a_rollback_clears_previous_champion() -> None:
    log = [*LOG, decided("1", schema.DECISION_ROLLBACK, "3", "1", "t5")]
    assert replay_aliases(log).aliases == {schema.CHAMPION: "1"}
    assert derive_status("3", {schema.CHAMPION: "1"}, log) == schema.STATUS_REPLACED


def test_a_hand_moved_champion_is_reported_now_and_as_a_gap_once_recorded() -> None:
    moved = ALIASES | {schema.CHAMPION: "1"}
    problems = unexplained_aliases(moved, LOG)
    assert len(problems) == 1 and "alias 'champion' points at v1 but the decision log leaves it at v3" in problems[0]
    # Recorded afterwards with `promote --force` on v1: the alias is explained, the move stays visible.
    log = [*LOG, decided("1", schema.DECISION_OVERRIDE, "1", "1", "t5")]
    assert unexplained_aliases(moved, log) == []
    assert replay_aliases(log).gaps == [
        "before the override of v1 at t5, champion moved from v3 to v1 with no decision recorded"
    ]


def test_a_deleted_alias_is_reported() -> None:
    problems = unexplained_aliases({schema.CHAMPION: "3"}, LOG)
    assert problems and "'previous-champion' points at no version" in problems[0]


def test_the_status_a_decision_leaves() -> None:
    assert [status_after(r) for r in LOG] == [
        schema.STATUS_CHAMPION,
        schema.STATUS_REJECTED,
        schema.STATUS_CHAMPION,
        schema.STATUS_AWAITING_APPROVAL,
    ]
