"""A version's status and the aliases, derived from the decision log at read time.

MLflow keeps aliases and tags but no history of them, and anyone with access can move an
alias in its UI. The decision log (one immutable audit run per decision, see
:func:`fairdiffusion.registry.promotion.decision_history`) is the record; this module
replays it to say what each version is now and which aliases it does not explain. A
status tag written once cannot do either: it goes stale the moment a newer champion
replaces the version. Pure functions on plain values, so every rule is unit-tested.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fairdiffusion.registry import schema

if TYPE_CHECKING:
    from fairdiffusion.registry.promotion import DecisionRecord

#: The aliases the decision log accounts for (``candidate`` only marks the newest registration).
LOGGED_ALIASES = (schema.CHAMPION, schema.PREVIOUS_CHAMPION)


@dataclass(frozen=True)
class AliasReplay:
    """The aliases the decision log leaves, and the moves it cannot account for."""

    aliases: dict[str, str]
    #: Champion changes between two decisions that no decision made (oldest first).
    gaps: list[str]


def replay_aliases(history: Sequence[DecisionRecord]) -> AliasReplay:
    """Replay the log (oldest first) as the registry moved the aliases when it wrote each record."""
    aliases: dict[str, str] = {}
    gaps = []
    for record in history:
        current = aliases.get(schema.CHAMPION)
        if record.champion_before != current:
            gaps.append(
                f"before the {record.decision} of v{record.version} at {record.at}, champion moved from "
                f"{_v(current)} to {_v(record.champion_before)} with no decision recorded"
            )
        if record.champion_before and record.champion_before != record.champion_after:
            aliases[schema.PREVIOUS_CHAMPION] = record.champion_before
        if record.decision == schema.DECISION_ROLLBACK:
            aliases.pop(schema.PREVIOUS_CHAMPION, None)
        if record.champion_after:
            aliases[schema.CHAMPION] = record.champion_after
        else:
            aliases.pop(schema.CHAMPION, None)
    return AliasReplay(aliases=aliases, gaps=gaps)


def unexplained_aliases(aliases: Mapping[str, str], history: Sequence[DecisionRecord]) -> list[str]:
    """Each alias of ``champion``/``previous-champion`` that differs from what the log leaves.

    Args:
        aliases: The registered model's aliases now (alias -> version).
        history: Every decision on the model, oldest first.

    Returns:
        One sentence per disagreement (empty when the log explains every alias).
    """
    expected = replay_aliases(history).aliases
    problems = []
    for alias in LOGGED_ALIASES:
        actual, logged = aliases.get(alias), expected.get(alias)
        if actual != logged:
            problems.append(
                f"alias '{alias}' points at {_v(actual)} but the decision log leaves it at {_v(logged)}: "
                "it was moved outside fairdiffusion (MLflow UI or API), or a promotion stopped half-way"
            )
    return problems


def derive_status(version: str, aliases: Mapping[str, str], history: Sequence[DecisionRecord]) -> str:
    """What a version is now: champion, replaced, awaiting-approval, rejected or unrecorded.

    The ``champion`` alias decides who serves; a version any decision left as champion (or
    that ``previous-champion`` points at) and that does not serve now was replaced; else its
    gate decision says whether it waits for approval or was rejected.
    """
    if aliases.get(schema.CHAMPION) == version:
        return schema.STATUS_CHAMPION
    if aliases.get(schema.PREVIOUS_CHAMPION) == version or any(r.champion_after == version for r in history):
        return schema.STATUS_REPLACED
    gate = [r.decision for r in history if r.version == version and r.decision in schema.GATE_DECISIONS]
    if not gate:
        return schema.STATUS_UNRECORDED
    return schema.STATUS_AWAITING_APPROVAL if gate[-1] == schema.DECISION_PASS else schema.STATUS_REJECTED


def status_after(record: DecisionRecord) -> str:
    """The status a decision leaves its version in (what the ``fd.status`` mirror tag shows)."""
    if record.champion_after == record.version:
        return schema.STATUS_CHAMPION
    if record.decision == schema.DECISION_PASS:
        return schema.STATUS_AWAITING_APPROVAL
    return schema.STATUS_REJECTED


def _v(version: str | None) -> str:
    return f"v{version}" if version else "no version"
