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


def test_seed_option_makes_a_replicate_config(tmp_path: Path) -> None:
    """--seed S changes the training seed and moves the image seeds; without it the demo's stand."""
    import argparse

    import yaml

    def config(seed: int | None) -> dict:
        args = argparse.Namespace(out=str(tmp_path / str(seed)), steps=3, quick=False, mad_weight=4.0, seed=seed)
        return yaml.safe_load(bench.arm_config("fbp+reg", "augment", args).read_text())

    demo, replicate = config(None), config(2)
    assert replicate["training"]["seed"] == 2 and demo["training"]["seed"] == 0
    assert replicate["evaluation"]["seed"] == demo["evaluation"]["seed"] + 2 * bench.SEED_STRIDE
    assert replicate["training"]["mad_regularizer"]["weight"] == 4.0
