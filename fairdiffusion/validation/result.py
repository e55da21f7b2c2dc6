"""What validation returns: every failed expectation, counts, and share shifts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class FailedExpectation:
    """One expectation that did not hold, with the rows that broke it."""

    table: str
    expectation: str
    column: str | None
    rule: str
    unexpected_count: int
    examples: list[str] = field(default_factory=list)
    #: Extra evidence, e.g. the observed share for a rule that tolerates some rows.
    detail: str = ""

    def describe(self) -> str:
        """One line: where, which rule, how many and which rows."""
        where = f"{self.table}.{self.column}" if self.column else self.table
        text = f"{where}: {self.rule} [{self.expectation}]"
        if self.unexpected_count:
            text += f" - {self.unexpected_count} row(s) break it"
        if self.detail:
            text += f" ({self.detail})"
        if self.examples:
            text += ", e.g. " + "; ".join(self.examples)
        return text


@dataclass(frozen=True)
class ReferenceCounts:
    """Group counts of an earlier data version (the current champion's), to compare shares with."""

    #: Names the version in messages, e.g. ``champion v3 (data md5 6b5ef68b)``.
    label: str
    #: ``{split set: {"attribute=group": count}}``, as :attr:`ValidationResult.group_counts`.
    group_counts: Mapping[str, Mapping[str, int]]


@dataclass(frozen=True)
class ShareShift:
    """How one group's share of its attribute moved since the reference data."""

    slice: str
    share_before: float
    share_now: float
    shift: float
    acknowledged: str | None


@dataclass(frozen=True)
class ValidationResult:
    """The outcome of every suite on one dataset."""

    success: bool
    n_subjects: int
    evaluated_expectations: int
    failed: list[FailedExpectation]
    #: ``{split set: {"attribute=group": count}}``; intersections as ``race=Asian&gender=Male``.
    group_counts: dict[str, dict[str, int]]
    format: str = "fairgenmed"
    #: One line per exclusion reason of the adapter (count and example rows).
    excluded: list[str] = field(default_factory=list)
    n_excluded: int = 0
    #: Synthetic rows: their share of training, per generating model, and in test.
    synthetic: dict[str, Any] = field(default_factory=dict)
    #: Against the reference data (``None``: there was none, e.g. no champion yet).
    reference: str | None = None
    share_shifts: list[ShareShift] = field(default_factory=list)
    #: The Data Docs folder (``index.html``), when they were built.
    data_docs: str | None = None

    @property
    def failed_expectations(self) -> list[str]:
        """Each failure as one readable line (the lineage's ``failed_expectations``)."""
        return [failure.describe() for failure in self.failed]

    def summary(self) -> str:
        """A readable report of the run, listing every failure."""
        head = (
            f"{self.evaluated_expectations - len(self.failed)}/{self.evaluated_expectations} "
            f"expectations passed on {self.n_subjects} subjects"
        )
        notes = [f"  ({line})" for line in self.excluded]
        if self.success:
            return "\n".join([f"validation passed: {head}", *notes])
        lines = [f"validation FAILED: {head}"] + [f"  - {line}" for line in self.failed_expectations]
        return "\n".join(lines + notes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form for MLflow and the lineage."""
        return {
            "success": self.success,
            "format": self.format,
            "n_subjects": self.n_subjects,
            "n_excluded": self.n_excluded,
            "excluded": self.excluded,
            "evaluated_expectations": self.evaluated_expectations,
            "failed_expectations": self.failed_expectations,
            "failures": [asdict(failure) for failure in self.failed],
            "group_counts": self.group_counts,
            "synthetic": self.synthetic,
            "reference": self.reference,
            "share_shifts": [asdict(shift) for shift in self.share_shifts],
        }
