"""Tests for starting training in this process or as several (torchrun / accelerate launch)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest

from fairdiffusion.config import DistributedConfig, PipelineConfig, parse_config
from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.errors import TrainingError
from fairdiffusion.training.launch import launch_command, needs_launcher, run_training


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_one_process_trains_in_the_calling_process() -> None:
    assert not needs_launcher(DistributedConfig())
    assert needs_launcher(DistributedConfig(num_processes=2))
    assert needs_launcher(DistributedConfig(num_machines=2, machine_rank=1))


def test_accelerate_command_counts_processes_over_all_machines() -> None:
    distributed = DistributedConfig(num_processes=8, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    command = launch_command(distributed, "bf16", Path("spec.json"))
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    for flag in ("--num_processes=16", "--num_machines=2", "--machine_rank=1", "--main_process_ip=10.0.0.1"):
        assert flag in command
    assert "--mixed_precision=bf16" in command
    assert command[-4:] == ["-m", "fairdiffusion.training.launch", "--spec", "spec.json"]


def test_torchrun_command() -> None:
    distributed = DistributedConfig(num_processes=2, launcher="torchrun", main_process_port=29511)
    command = launch_command(distributed, "no", Path("spec.json"))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in command and "--master_port=29511" in command
    assert command[-4:] == ["-m", "fairdiffusion.training.launch", "--spec", "spec.json"]


def test_machine_rank_must_be_below_the_machine_count() -> None:
    with pytest.raises(Exception, match="machine_rank"):
        DistributedConfig(num_machines=2, machine_rank=2)


def two_process_config(output_dir: Path, processes: int, batch_size: int, **overrides: object) -> PipelineConfig:
    training = {
        "output_dir": str(output_dir),
        "batch_size": batch_size,
        "max_steps": 6,
        "fbp": {"time_window": 3},
        "log_every": 1,
        "checkpoint_every": None,
        "distributed": {"num_processes": processes, "launcher": "torchrun", "main_process_port": free_port()},
    }
    return parse_config({"training": training | overrides})


@pytest.fixture(scope="module")
def train_samples(demo_dataset: Path) -> pd.DataFrame:
    return load_fairgenmed(demo_dataset, ["train", "val"])


@pytest.mark.slow
def test_two_processes_hold_the_sigma_of_one_process_with_the_same_global_batch(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    """Two CPU processes (torchrun, gloo) with 2 images each == one process with 4.

    Per-sample losses are gathered before the FBP update, so the loss gaps, the GP
    windows and the sigma trajectory match the single process's to float rounding
    (the two processes' convolutions run on batches of 2, not 4).
    """
    lines: list[str] = []
    two = run_training(
        train_samples, str(tiny_pipeline_dir), two_process_config(tmp_path / "two", 2, 2), None, lines.append
    )
    one = run_training(train_samples, str(tiny_pipeline_dir), two_process_config(tmp_path / "one", 1, 4), None)

    assert any("torch.distributed.run" in line for line in lines), "the processes' output is streamed"
    assert two.steps == one.steps == 6
    a = json.loads((tmp_path / "two" / "fbp_trajectory.json").read_text())
    b = json.loads((tmp_path / "one" / "fbp_trajectory.json").read_text())
    assert len(a["steps"]) == len(b["steps"]) == 6 and len(a["windows"]) == len(b["windows"]) == 2
    for x, y in zip(a["steps"], b["steps"], strict=True):
        assert x["y"] == pytest.approx(y["y"], rel=1e-4, abs=1e-6), "the summed loss gap"
        assert x["sigma"] == pytest.approx(y["sigma"], abs=1e-5)
    for x, y in zip(two.windows, one.windows, strict=True):
        assert x.gaps == pytest.approx(y.gaps, rel=1e-4, abs=1e-6)
    assert two.final_sigma == pytest.approx(one.final_sigma, abs=1e-5)
    assert two.final_loss == pytest.approx(one.final_loss, rel=1e-4)


@pytest.mark.slow
def test_a_training_error_in_the_processes_reaches_the_caller(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    config = two_process_config(tmp_path / "bad", 2, 2, resume=str(tmp_path / "missing"))
    with pytest.raises(TrainingError, match="does not exist"):
        run_training(train_samples, str(tiny_pipeline_dir), config, None, lambda line: None)
