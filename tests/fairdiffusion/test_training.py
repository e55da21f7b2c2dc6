"""Tests for UNet fine-tuning, with Fair Bayesian Perturbation and without."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fairdiffusion import training
from fairdiffusion.config import FAIRGENMED_ATTRIBUTES, TrainingConfig
from fairdiffusion.errors import TrainingError
from fairdiffusion.fairgenmed import load_fairgenmed
from fairdiffusion.training import TrainingResult, train_unet

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
SIGMA_KEYS = {
    f"fbp/sigma/{attribute}/{group}" for attribute, groups in FAIRGENMED_ATTRIBUTES.items() for group in groups
}


@dataclass
class Run:
    result: TrainingResult
    output_dir: Path
    logged: list[tuple[dict[str, float], int]] = field(default_factory=list)


@pytest.fixture(scope="module")
def train_samples(demo_dataset: Path) -> pd.DataFrame:
    return load_fairgenmed(demo_dataset, ["train", "val"])


def config(output_dir: Path, method: str, seed: int = 0, **overrides: object) -> TrainingConfig:
    values = {
        "method": method,
        "output_dir": output_dir,
        "resolution": 32,
        "batch_size": 4,
        "max_steps": 4,
        "log_every": 2,
        "fair_time_window": 2,
        "seed": seed,
    }
    return TrainingConfig(**(values | overrides))


def train(samples: pd.DataFrame, pipeline: Path, output_dir: Path, method: str, seed: int = 0) -> Run:
    logged: list[tuple[dict[str, float], int]] = []
    result = train_unet(
        samples,
        FAIRGENMED_ATTRIBUTES,
        str(pipeline),
        config(output_dir, method, seed),
        log_metrics=lambda metrics, step: logged.append((dict(metrics), step)),
    )
    return Run(result, output_dir, logged)


@pytest.fixture(scope="module")
def runs(train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("training")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return {
            "fair": train(train_samples, tiny_pipeline_dir, root / "fair", "fair"),
            "fair_again": train(train_samples, tiny_pipeline_dir, root / "fair_again", "fair"),
            "baseline": train(train_samples, tiny_pipeline_dir, root / "baseline", "baseline"),
        }
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("method", ["fair", "baseline"])
def test_pipeline_is_saved_in_diffusers_layout(runs: dict[str, Run], method: str) -> None:
    run = runs[method]
    model_dir = Path(run.result.model_dir)
    assert model_dir == run.output_dir / "pipeline"
    assert (model_dir / UNET_FILE).is_file()
    assert (model_dir / "model_index.json").is_file()
    assert run.result.method == method and run.result.steps == 4
    assert torch.isfinite(torch.tensor(run.result.final_loss))


@pytest.mark.parametrize("method", ["fair", "baseline"])
def test_unet_weights_changed(runs: dict[str, Run], tiny_pipeline_dir: Path, method: str) -> None:
    before = load_file(tiny_pipeline_dir / UNET_FILE)
    after = load_file(Path(runs[method].result.model_dir) / UNET_FILE)
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fbp_trajectory_written_for_fair_only(runs: dict[str, Run]) -> None:
    trajectory = json.loads((runs["fair"].output_dir / "fbp_trajectory.json").read_text())
    assert trajectory["weight_names"] == [f"{a}={g}" for a, gs in FAIRGENMED_ATTRIBUTES.items() for g in gs]
    assert len(trajectory["steps"]) == 4 and len(trajectory["windows"]) == 2
    assert not (runs["baseline"].output_dir / "fbp_trajectory.json").exists()


def test_fair_result_records_sigma_and_windows(runs: dict[str, Run]) -> None:
    result = runs["fair"].result
    assert result.sigma_names == [f"{a}={g}" for a, gs in FAIRGENMED_ATTRIBUTES.items() for g in gs]
    assert result.final_sigma is not None and len(result.final_sigma) == 7
    assert all(0.0 <= s <= 1.0 for s in result.final_sigma)
    assert [w["step"] for w in result.windows] == [2, 4]
    json.dumps(result.to_dict())
    baseline = runs["baseline"].result
    assert baseline.sigma_names == [] and baseline.final_sigma is None and baseline.windows == []


def test_same_seed_gives_identical_weights(runs: dict[str, Run]) -> None:
    a = load_file(Path(runs["fair"].result.model_dir) / UNET_FILE)
    b = load_file(Path(runs["fair_again"].result.model_dir) / UNET_FILE)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs["fair"].result.final_loss == runs["fair_again"].result.final_loss
    assert runs["fair"].result.final_sigma == runs["fair_again"].result.final_sigma


def test_fair_and_baseline_differ(runs: dict[str, Run]) -> None:
    a = load_file(Path(runs["fair"].result.model_dir) / UNET_FILE)
    b = load_file(Path(runs["baseline"].result.model_dir) / UNET_FILE)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_fair_log_callback(runs: dict[str, Run]) -> None:
    logged = runs["fair"].logged
    assert [step for _, step in logged] == [2, 4]  # window closes and log_every coincide
    for metrics, _ in logged:
        assert "train/loss" in metrics
        assert set(metrics) >= SIGMA_KEYS
        assert {"fbp/objective", "fbp/window_gap", "fbp/gap/race"} <= set(metrics)
        assert all(isinstance(v, float) for v in metrics.values())
    assert logged[-1][0]["train/loss"] == runs["fair"].result.final_loss
    assert any(key.startswith("train/group_loss/race/") for key in logged[0][0])


def test_baseline_log_callback_has_no_fbp_keys(runs: dict[str, Run]) -> None:
    logged = runs["baseline"].logged
    assert [step for _, step in logged] == [2, 4]
    assert all("train/loss" in m and not any(k.startswith("fbp/") for k in m) for m, _ in logged)


def test_nan_loss_stops_training(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nan_mse(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return torch.full_like(prediction, float("nan"))

    monkeypatch.setattr(training, "F", SimpleNamespace(mse_loss=nan_mse))
    with pytest.raises(TrainingError, match="training loss became nan at step 1"):
        train_unet(train_samples, FAIRGENMED_ATTRIBUTES, str(tiny_pipeline_dir), config(tmp_path, "baseline"))
    assert not (tmp_path / "pipeline").exists()
