"""Tests for writing, finding and pruning training checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from fairdiffusion.errors import TrainingError
from fairdiffusion.training.checkpoints import (
    STATE_FILE,
    commit_checkpoint,
    complete_checkpoints,
    find_resume_checkpoint,
    partial_folder,
    prune_checkpoints,
    read_state,
    set_aside_checkpoints,
)


def write(root: Path, step: int) -> Path:
    folder = partial_folder(root, step)
    (folder / "model.safetensors").write_bytes(b"weights")
    return commit_checkpoint(folder, {"step": step})


def test_commit_renames_into_place_after_the_marker(tmp_path: Path) -> None:
    final = write(tmp_path, 10)
    assert final == tmp_path / "checkpoint-10" and (final / STATE_FILE).is_file()
    assert not (tmp_path / "checkpoint-10.partial").exists()
    assert read_state(final) == {"step": 10}


def test_latest_is_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    assert find_resume_checkpoint("latest", tmp_path / "none") is None
    assert find_resume_checkpoint(None, tmp_path) is None
    for step in (2, 10, 4):
        write(tmp_path, step)
    partial_folder(tmp_path, 12)  # died while writing
    (tmp_path / "checkpoint-11").mkdir()  # no marker
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert find_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-10"
    assert find_resume_checkpoint(str(tmp_path / "checkpoint-4"), tmp_path) == tmp_path / "checkpoint-4"
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        find_resume_checkpoint(str(tmp_path / "checkpoint-11"), tmp_path)


def test_prune_keeps_the_newest_and_drops_leftovers(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        write(tmp_path, step)
    partial_folder(tmp_path, 5)
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert set_aside_checkpoints(root) is None
    write(root, 80)
    previous = set_aside_checkpoints(root)
    assert previous == tmp_path / "checkpoints.previous"
    assert not root.exists() and (previous / "checkpoint-80" / STATE_FILE).is_file()
    write(root, 5)
    set_aside_checkpoints(root)
    assert [p.name for p in previous.iterdir()] == ["checkpoint-5"]  # one set is kept
