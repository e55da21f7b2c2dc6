"""The per-group synthetic-share ceiling, beside the overall one."""

from __future__ import annotations

import pandas as pd

from fairdiffusion.config import ValidationConfig
from fairdiffusion.validation.suites import _run_synthetic_group_shares, synthetic_group_shares, validate_dataset

ATTRIBUTES = {"race": ["Asian", "White"], "gender": ["Female", "Male"]}


def _table(asian_synthetic: int) -> pd.DataFrame:
    """Train: 4 Asian and 16 White (alternating genders); the first ``asian_synthetic`` Asian rows synthetic."""
    races = ["Asian"] * 4 + ["White"] * 16
    return pd.DataFrame(
        {
            "subject": [f"s{i}" for i in range(20)],
            "split": ["train"] * 20,
            "race": races,
            "gender": ["Female", "Male"] * 10,
            "source": ["synthetic" if i < asian_synthetic else "real" for i in range(20)],
            "generated_by": ["fairdiffusion v1" if i < asian_synthetic else None for i in range(20)],
        }
    )


def test_shares_are_counted_per_group() -> None:
    shares = synthetic_group_shares(_table(3), ATTRIBUTES, ["train"]).set_index("group")
    assert shares.loc["train race=Asian"].tolist() == [4, 3, 0.75]
    assert shares.loc["train race=White", "share"] == 0.0
    assert shares.loc["train gender=Female"].tolist() == [10, 2, 0.2]


class _RecordingSuites:
    def __init__(self) -> None:
        self.runs: list[tuple[str, pd.DataFrame, str]] = []

    def run(self, table: str, frame: pd.DataFrame, checks: list, id_column: str) -> None:
        self.runs.append((table, frame, checks[0].rule))


def test_the_ceiling_is_a_suite_of_its_own_and_one_key_lifts_it() -> None:
    suites = _RecordingSuites()
    _run_synthetic_group_shares(suites, _table(3), ATTRIBUTES, ValidationConfig(), ["train"])  # type: ignore[arg-type]
    ((table, frame, rule),) = suites.runs
    assert table == "synthetic_shares" and len(frame) == 4
    assert (
        rule == "at most 50% of each group's training rows are synthetic (validation.max_synthetic_fraction_per_group)"
    )
    lifted = ValidationConfig(max_synthetic_fraction_per_group=1.0)
    _run_synthetic_group_shares(suites, _table(4), ATTRIBUTES, lifted, ["train"])  # type: ignore[arg-type]
    assert len(suites.runs) == 1


def test_a_minority_topped_up_with_synthetic_rows_fails_naming_the_group() -> None:
    # 3 of 20 rows overall (15%, under the overall ceiling), but 3 of 4 Asian rows (75%).
    result = validate_dataset(_table(3), ATTRIBUTES, ValidationConfig(min_group_count=1), ["train"], "test")
    (line,) = [line for line in result.failed_expectations if line.startswith("synthetic_shares.")]
    assert "at most 50% of each group's training rows are synthetic" in line
    assert "train race=Asian" in line and "train race=White" not in line
