"""`benchmarks/bench_fairness.py --quick` runs every arm and writes its table, JSON and plots.

It checks that the benchmark runs and what it writes, never a timing or a finding: the
quick mode trains 4 steps, far too few for the comparison to mean anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.usefixtures("pulled_checkout")  # the demo data and base model, pulled (conftest.py)
def test_quick_run_writes_every_arm_with_paired_intervals_and_plots(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_fairness
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    report = bench_fairness.main(["--quick", "--out", str(tmp_path), "--json", str(tmp_path / "out.json")])

    written = json.loads((tmp_path / "out.json").read_text())
    arms = list(bench_fairness.ARMS)
    assert list(written["arms"]) == arms
    assert set(written["paired_vs_baseline"]) == set(arms) - {"baseline"}
    for arm, paired in written["paired_vs_baseline"].items():
        low, high = paired["overall_fid"]["images_ci"]
        assert low <= high, arm
        assert len(paired["race_gap"]["per_seed"]) == 1
    run = written["runs"]["fair"]["0"]
    assert set(run["matched_fid"]["race"]) == {"Asian", "Black", "White"}
    assert run["overall_fid"] > 0
    table = (tmp_path / "fairness.md").read_text()
    assert all(f"| {arm} |" in table for arm in arms)
    fidelity = written["arms"]["fair"]["fidelity"]  # the evaluation's prompt fidelity, per race group
    assert set(fidelity) == {"Asian", "Black", "White"} and all(0 <= v <= 5 for v in fidelity.values())
    assert set(written["arms"]["fair"]["margin_retained"]) == {"cdr_status", "md_severity"}
    assert "race fidelity per group" in table
    assert report["setting"]["quick"] is True
    plots = [Path(p) for p in written["plots"]]
    assert {p.name for p in plots} == {"loss_by_race_group.png", "loss_gap_race.png", "sigma.png"}
    assert all(p.stat().st_size > 1000 for p in plots)
