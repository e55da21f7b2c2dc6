"""`benchmarks/bench_generations.py`: its table and worst-off summary from generation summaries (no training)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fairdiffusion.registry.generations import GenerationSummary

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
bench = pytest.importorskip("bench_generations")


def _summary(generation: int, asian: float, white: float) -> GenerationSummary:
    groups = {
        "overall": {"fid": 1.0, "recall": 0.9, "diversity": 1.0},
        "race/Asian": {"fid": 2.0, "recall": asian, "diversity": asian},
        "race/White": {"fid": 1.0, "recall": white, "diversity": white},
    }
    return GenerationSummary(generation, f"r{generation}", None, "augment", 0.5 * bool(generation), groups, True)


def test_rows_worst_off_group_and_table(tmp_path: Path) -> None:
    rows = bench.curve_rows("baseline", "augment", [_summary(0, 1.0, 1.0), _summary(1, 0.4, 0.9)])
    assert len(rows) == 4 and {r["group"] for r in rows} == {"race/Asian", "race/White"}
    worst = bench.worst_off(rows, "baseline", "augment")
    assert worst["group"] == "race/Asian" and worst["diversity_kept"] == pytest.approx(0.4)
    table = bench.markdown(rows, [worst])
    assert "| baseline | augment | race/Asian | 0.40 | 0.40 |" in table
    assert [p.name for p in bench.plot_curves(rows, tmp_path)] == [
        "augment_fid.png",
        "augment_recall.png",
        "augment_diversity.png",
    ]
