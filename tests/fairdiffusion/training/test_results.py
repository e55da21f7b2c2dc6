"""Tests for the result types of training: torch-free, and JSON in the shape they always had."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fairdiffusion.training.results import FBPWindowSummary, TrainingLogRecord, TrainingResult, TrainingTiming

REPO = Path(__file__).resolve().parents[3]


def test_results_import_without_torch() -> None:
    """The registry reads training results; it must not load the deep-learning stack for that."""
    code = (
        "import sys, fairdiffusion.training.results; "
        "print(sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def result() -> TrainingResult:
    window = FBPWindowSummary(step=2, applied_step=2, acquisition=0.5, gaps={"race": 0.1}, fit_failed=False)
    failed = FBPWindowSummary(
        step=4, applied_step=5, acquisition=None, gaps={"race": 0.0}, fit_failed=True, reason="constant objective"
    )
    timing = TrainingTiming(1.0, 2, 0.5, 0.25, 16.0, 0.01, 0.1, 0.0, None)
    record = TrainingLogRecord(
        step=2,
        steps=2,
        loss=0.3,
        group_losses={"race/Asian": 0.4, "race/White": 0.2},
        group_samples={"race/Asian": 3, "race/White": 5},
        gaps={"race": 0.2},
        sigma=[0.5],
    )
    return TrainingResult(
        "out/pipeline", "fair", 4, 0.2, 3.0, ["race=Asian"], [0.5], [window, failed], timing=timing, history=[record]
    )


def test_windows_keep_their_json_shape() -> None:
    document = json.loads(json.dumps(result().to_dict()))
    assert document["windows"][0] == {
        "step": 2,
        "applied_step": 2,
        "acquisition": 0.5,
        "gaps": {"race": 0.1},
        "fit_failed": False,
        "reason": None,
    }
    assert document["timing"]["samples_per_second"] == 16.0


def test_result_round_trips_through_json() -> None:
    original = result()
    again = TrainingResult.from_dict(json.loads(json.dumps(original.to_dict())))
    assert again == original
    assert isinstance(again.windows[1], FBPWindowSummary) and again.windows[1].reason == "constant objective"


def test_history_keeps_its_json_shape() -> None:
    document = json.loads(json.dumps(result().to_dict()))
    assert document["history"] == [
        {
            "step": 2,
            "steps": 2,
            "loss": 0.3,
            "group_losses": {"race/Asian": 0.4, "race/White": 0.2},
            "group_samples": {"race/Asian": 3, "race/White": 5},
            "gaps": {"race": 0.2},
            "sigma": [0.5],
            "mean_shift": None,
        }
    ]
    older = {key: value for key, value in document.items() if key != "history"}
    assert TrainingResult.from_dict(older).history == [], "results written before the history still load"
