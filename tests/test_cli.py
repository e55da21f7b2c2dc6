"""Tests of the ``fairdiffusion`` console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(sys.executable).with_name("fairdiffusion")
ATTRIBUTE_KEYS = {"subject", "split", "prompt", "race", "gender", "ethnicity"}


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1"}
    return subprocess.run(
        [str(CLI), *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.fixture
def config_file(tmp_path: Path, demo_min_group_count: int) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"validation:\n  min_group_count: {demo_min_group_count}\n  image_shape: [32, 32]\n")
    return path


def test_console_script_is_installed() -> None:
    assert CLI.is_file(), f"{CLI} missing: install the package (pip install -e .)"


def test_validate_clean_dataset(demo_dataset: Path, config_file: Path, tmp_path: Path) -> None:
    done = run_cli("validate", demo_dataset, "--config", config_file, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "validation passed" in done.stdout
    assert "on 80 subjects" in done.stdout


def test_validate_corrupted_dataset(copy_dataset: Path, config_file: Path, tmp_path: Path) -> None:
    bad = sorted((copy_dataset / "train").glob("data_*.npz"))[1]
    bad.write_bytes(b"garbage, not an npz archive")
    done = run_cli("validate", copy_dataset, "--config", config_file, cwd=tmp_path)
    assert done.returncode != 0
    assert "validation FAILED" in done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert str(bad) in done.stderr  # the file
    assert bad.stem in done.stderr  # the subject
    assert "every npz file can be opened and read" in done.stderr  # the rule
    assert "image decodes" in done.stderr


def test_data_show_json(demo_dataset: Path, config_file: Path, tmp_path: Path) -> None:
    done = run_cli("data", "show", demo_dataset, "--json", "--config", config_file, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 80
    records = [json.loads(line) for line in lines]
    assert all(set(record) == ATTRIBUTE_KEYS for record in records)
    assert {r["split"] for r in records} == {"train", "val", "test"}
    assert {r["race"] for r in records} == {"Asian", "Black", "White"}
    first = records[0]
    assert first["subject"] == "data_00001"
    assert first["prompt"].startswith(f"SLO fundus image of a {first['race']} {first['gender']} {first['ethnicity']} ")


def test_bad_config_is_one_message(demo_dataset: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  max_steps: lots\n")
    done = run_cli("validate", demo_dataset, "--config", config, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ")
    assert "training.max_steps" in done.stderr and "Traceback" not in done.stderr


def test_missing_dataset_folder_is_one_message(config_file: Path, tmp_path: Path) -> None:
    done = run_cli("data", "show", tmp_path / "absent", "--json", "--config", config_file, cwd=tmp_path)
    assert done.returncode == 1
    assert "dataset folder not found" in done.stderr and str(tmp_path / "absent") in done.stderr
    assert "Traceback" not in done.stderr
