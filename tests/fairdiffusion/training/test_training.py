"""Tests for UNet fine-tuning, with Fair Bayesian Perturbation and without."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from fairdiffusion.config import FAIRGENMED_ATTRIBUTES, TrainingConfig
from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.errors import TrainingError
from fairdiffusion.models.loading import load_pipeline
from fairdiffusion.training import losses
from fairdiffusion.training.dataset import FundusPromptDataset, GlobalBatchSampler
from fairdiffusion.training.loop import drop_prompts, train_unet
from fairdiffusion.training.results import TrainingResult

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
        "fbp": {"time_window": 2},
        "seed": seed,
    }
    return TrainingConfig(**(values | overrides))


def train(
    samples: pd.DataFrame, pipeline: Path, output_dir: Path, method: str, seed: int = 0, **overrides: object
) -> Run:
    logged: list[tuple[dict[str, float], int]] = []
    result = train_unet(
        samples,
        FAIRGENMED_ATTRIBUTES,
        str(pipeline),
        config(output_dir, method, seed, **overrides),
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


#: Every departure from the paper at once (training.fbp).
FBP_VARIANTS = {
    "time_window": 2,
    "objective": "window",
    "history_windows": 2,
    "mix_toward": "candidate",
    "weights": "lognormal",
    "mean_shift": True,
}


@pytest.fixture(scope="module")
def arm_runs(train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The fairness baselines and the FBP variants, on the settings of ``runs``."""
    root = tmp_path_factory.mktemp("arms")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return {
            "reweight": train(train_samples, tiny_pipeline_dir, root / "reweight", "reweight"),
            "balanced": train(train_samples, tiny_pipeline_dir, root / "balanced", "balanced"),
            "fair_variants": train(train_samples, tiny_pipeline_dir, root / "variants", "fair", fbp=FBP_VARIANTS),
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
    assert [w.step for w in result.windows] == [2, 4]
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


@pytest.mark.parametrize("arm", ["reweight", "balanced", "fair_variants"])
def test_new_arms_train_and_differ_from_the_baseline(runs: dict[str, Run], arm_runs: dict[str, Run], arm: str) -> None:
    result = arm_runs[arm].result
    assert result.steps == 4 and math.isfinite(result.final_loss)
    a = load_file(Path(result.model_dir) / UNET_FILE)
    b = load_file(Path(runs["baseline"].result.model_dir) / UNET_FILE)
    assert any(not torch.equal(a[k], b[k]) for k in a), "the arm changes what is learnt"
    assert result.method == ("fair" if arm == "fair_variants" else arm)


def test_history_records_losses_by_group_at_every_log_step(runs: dict[str, Run], arm_runs: dict[str, Run]) -> None:
    for name, run in [("fair", runs["fair"]), ("baseline", runs["baseline"]), *arm_runs.items()]:
        history = run.result.history
        assert [(r.step, r.steps) for r in history] == [(2, 2), (4, 2)], name
        for record in history:
            for attribute, groups in FAIRGENMED_ATTRIBUTES.items():
                keys = [f"{attribute}/{g}" for g in groups if f"{attribute}/{g}" in record.group_losses]
                assert sum(record.group_samples[k] for k in keys) == 8, "2 steps of 4 samples"
                pooled = sum(record.group_losses[k] * record.group_samples[k] for k in keys) / 8
                assert pooled == pytest.approx(record.loss, rel=1e-5)
                means = [record.group_losses[k] for k in keys]
                assert record.gaps[attribute] == pytest.approx(max(means) - min(means))
        assert TrainingResult.from_dict(json.loads(json.dumps(run.result.to_dict()))) == run.result
    fair = json.loads((runs["fair"].output_dir / "fbp_trajectory.json").read_text())
    assert [r.sigma for r in runs["fair"].result.history] == [fair["steps"][1]["sigma"], fair["steps"][3]["sigma"]]
    assert all(r.sigma is None and r.mean_shift is None for r in runs["baseline"].result.history)
    assert all(r.mean_shift is None for r in runs["fair"].result.history)
    assert all(r.mean_shift is not None and len(r.mean_shift) == 7 for r in arm_runs["fair_variants"].result.history)
    balanced, baseline = arm_runs["balanced"].result.history, runs["baseline"].result.history
    assert [r.group_samples for r in balanced] != [r.group_samples for r in baseline], "other rows drawn"


def test_fbp_variants_are_wired_into_training(arm_runs: dict[str, Run]) -> None:
    run = arm_runs["fair_variants"]
    first, second = run.result.windows
    assert first.fit_failed and "fewer than 2 points" in (first.reason or ""), "one GP point per window"
    assert not second.fit_failed and second.acquisition is not None
    trajectory = json.loads((run.output_dir / "fbp_trajectory.json").read_text())
    assert all(len(step["mean_shift"]) == 7 for step in trajectory["steps"])
    metrics, _ = run.logged[-1]
    assert {"fbp/mean_shift/race/Black", "fbp/sigma/race/Black"} <= set(metrics)


def test_nan_loss_stops_training(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nan_mse(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return torch.full_like(prediction, float("nan"))

    monkeypatch.setattr(losses, "F", SimpleNamespace(mse_loss=nan_mse))
    with pytest.raises(TrainingError, match="training loss became nan at step 1"):
        train_unet(train_samples, FAIRGENMED_ATTRIBUTES, str(tiny_pipeline_dir), config(tmp_path, "baseline"))
    assert not (tmp_path / "pipeline").exists()


def test_out_of_memory_names_the_settings_that_reduce_memory(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(losses, "F", SimpleNamespace(mse_loss=oom))
    with pytest.raises(TrainingError, match="out of memory at step 1") as info:
        train_unet(train_samples, FAIRGENMED_ATTRIBUTES, str(tiny_pipeline_dir), config(tmp_path, "baseline"))
    for setting in ("training.batch_size", "gradient_checkpointing", "mixed_precision", "lora_rank"):
        assert setting in str(info.value)


def test_fp16_needs_a_gpu(train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TrainingError, match="fp16 needs a CUDA GPU"):
        train_unet(
            train_samples,
            FAIRGENMED_ATTRIBUTES,
            str(tiny_pipeline_dir),
            config(tmp_path, "fair", mixed_precision="fp16"),
        )


def test_training_options_run_on_the_cpu(train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    """bf16, accumulation, checkpointing, EMA, v-prediction, Min-SNR, warm-up, random crop: all wired."""
    uploaded: list[tuple[Path, str]] = []
    result = train_unet(
        train_samples,
        FAIRGENMED_ATTRIBUTES,
        str(tiny_pipeline_dir),
        config(
            tmp_path,
            "fair",
            max_steps=2,
            batch_size=2,
            mixed_precision="bf16",
            gradient_accumulation_steps=2,
            gradient_checkpointing=True,
            use_ema=True,
            prediction_type="v_prediction",
            snr_gamma=5.0,
            lr_scheduler="cosine",
            lr_warmup_steps=1,
            center_crop=False,
            resolution=24,
            sampling={"every": 2, "images_per_group": 1, "inference_steps": 2},
        ),
        log_artifact=lambda folder, path: uploaded.append((folder, path)),
    )
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert (Path(result.model_dir) / UNET_FILE).is_file()
    assert result.timing is not None and result.timing.samples_per_second > 0
    [(folder, path)] = uploaded
    assert path == "training/validation/step-000002"
    with Image.open(folder / "grid.png") as grid:
        assert grid.size == (24, 24 * 7)  # one row per subgroup of the dataset's config
    assert len(json.loads((folder / "rows.json").read_text())) == 7


def test_lora_run_saves_a_plain_pipeline_and_the_adapters(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    result = train_unet(
        train_samples,
        FAIRGENMED_ATTRIBUTES,
        str(tiny_pipeline_dir),
        config(tmp_path, "fair", max_steps=2, lora_rank=4, learning_rate=1e-2),
    )
    before = load_file(tiny_pipeline_dir / UNET_FILE)
    after = load_file(Path(result.model_dir) / UNET_FILE)
    assert set(before) == set(after), "adapters are merged: the registered UNet is a plain one"
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert result.lora_dir is not None
    adapters = load_file(Path(result.lora_dir) / "pytorch_lora_weights.safetensors")
    assert adapters and all("lora" in key for key in adapters)
    load_pipeline(result.model_dir)  # evaluation's loading path


def test_global_batches_do_not_depend_on_the_number_of_processes() -> None:
    one = GlobalBatchSampler(23, 4, 1, 0, seed=5, epoch=2)
    halves = [GlobalBatchSampler(23, 2, 2, r, seed=5, epoch=2) for r in range(2)]
    assert len(one) == len(halves[0]) == 5
    for single, first, second in zip(one, *halves, strict=True):
        assert single == first + second
    assert list(GlobalBatchSampler(23, 4, 1, 0, seed=5, epoch=2, start_batch=3)) == list(one)[3:]
    assert list(GlobalBatchSampler(23, 4, 1, 0, seed=5, epoch=3)) != list(one)


def test_augmentations_are_seeded_per_sample_and_epoch(train_samples: pd.DataFrame, tiny_pipeline_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline_dir, subfolder="tokenizer")
    dataset = FundusPromptDataset(
        train_samples, FAIRGENMED_ATTRIBUTES, tokenizer, 24, center_crop=False, random_flip=True
    )
    first = [dataset[i]["pixel_values"] for i in range(8)]
    assert all(torch.equal(a, dataset[i]["pixel_values"]) for i, a in enumerate(first))
    dataset.set_epoch(1)
    assert any(not torch.equal(a, dataset[i]["pixel_values"]) for i, a in enumerate(first))
    plain = FundusPromptDataset(train_samples, FAIRGENMED_ATTRIBUTES, tokenizer, 24)
    assert plain.random_flip is False and plain.center_crop is True  # flips would swap laterality


def resume_config(output_dir: Path, fit_lag: int, **overrides: object) -> TrainingConfig:
    settings: dict[str, object] = {
        "max_steps": 8,
        "checkpoint_every": 4,
        "checkpoints_total_limit": 2,
        "fbp": {"time_window": 2, "fit_lag": fit_lag},
        "use_ema": True,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 2,
        "log_every": 1,
    }
    return config(output_dir, "fair", **(settings | overrides))


class Killed(BaseException):
    """Stands for the process dying (BaseException: nothing may catch it)."""


@pytest.mark.slow
@pytest.mark.parametrize("fit_lag", [0, 1])
def test_resume_after_a_kill_matches_a_straight_run(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path, fit_lag: int
) -> None:
    """2N steps straight == N steps, a kill, then a resume to 2N: weights and sigma trajectory.

    N = 4 with windows of 2 steps: the checkpoint holds an open window's observation
    count of 0 or 1 across the cases, the EMA, a cosine warm-up schedule and, with
    ``fit_lag=1``, a GP fit still pending when the checkpoint was written.
    """
    pipeline = str(tiny_pipeline_dir)
    straight = train_unet(train_samples, FAIRGENMED_ATTRIBUTES, pipeline, resume_config(tmp_path / "a", fit_lag))

    def die_after_checkpoint(metrics: dict[str, float], step: int) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train_unet(
            train_samples,
            FAIRGENMED_ATTRIBUTES,
            pipeline,
            resume_config(tmp_path / "b", fit_lag),
            log_metrics=die_after_checkpoint,
        )
    checkpoints = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4"]
    # What a process killed while writing leaves behind: never loaded.
    for name in ("checkpoint-6.partial", "checkpoint-7"):
        (checkpoints / name).mkdir()
        (checkpoints / name / "model.safetensors").write_bytes(b"truncated")

    resumed = train_unet(
        train_samples, FAIRGENMED_ATTRIBUTES, pipeline, resume_config(tmp_path / "b", fit_lag, resume="latest")
    )

    assert resumed.resumed_from == str(checkpoints / "checkpoint-4")
    a = load_file(Path(straight.model_dir) / UNET_FILE)
    b = load_file(Path(resumed.model_dir) / UNET_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a), "identical weights"
    trajectory_a = json.loads((tmp_path / "a" / "fbp_trajectory.json").read_text())
    trajectory_b = json.loads((tmp_path / "b" / "fbp_trajectory.json").read_text())
    assert trajectory_a == trajectory_b, "identical sigma trajectory"
    assert len(trajectory_b["steps"]) == 8 and len(trajectory_b["windows"]) == (4 if fit_lag == 0 else 3)
    assert resumed.final_sigma == straight.final_sigma and resumed.windows == straight.windows
    assert resumed.final_loss == straight.final_loss
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-8"]


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["balanced", "fair_variants"])
def test_new_arms_resume_after_a_kill_like_a_straight_run(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path, arm: str
) -> None:
    """Balanced draws, and every FBP variant's state (history, open window, pending fit), survive a kill.

    ``log_every: 3`` leaves step 4's losses pooled but not yet recorded in the checkpoint.
    """
    settings: dict[str, object] = {"max_steps": 8, "checkpoint_every": 4, "log_every": 3}
    settings["fbp"] = FBP_VARIANTS | {"fit_lag": 1}
    method = "balanced" if arm == "balanced" else "fair"
    pipeline = str(tiny_pipeline_dir)
    straight = train_unet(train_samples, FAIRGENMED_ATTRIBUTES, pipeline, config(tmp_path / "a", method, **settings))

    def die_after_checkpoint(metrics: dict[str, float], step: int) -> None:
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train_unet(
            train_samples,
            FAIRGENMED_ATTRIBUTES,
            pipeline,
            config(tmp_path / "b", method, **settings),
            log_metrics=die_after_checkpoint,
        )
    resumed = train_unet(
        train_samples, FAIRGENMED_ATTRIBUTES, pipeline, config(tmp_path / "b", method, resume="latest", **settings)
    )
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-4")
    a = load_file(Path(straight.model_dir) / UNET_FILE)
    b = load_file(Path(resumed.model_dir) / UNET_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a), "identical weights"
    expected_steps = [3, 6, 8] if arm == "balanced" else [3, 5, 6, 7, 8]  # and every applied window (fit_lag 1)
    assert resumed.history == straight.history and [r.step for r in resumed.history] == expected_steps
    assert resumed.windows == straight.windows and resumed.final_sigma == straight.final_sigma
    with pytest.raises(TrainingError, match="different fbp_variant" if arm != "balanced" else "different balance"):
        changed = {"fbp": FBP_VARIANTS | {"fit_lag": 1, "weights": "clipped"}} if arm != "balanced" else {}
        extra = {"max_group_weight": 2.0} if arm == "balanced" else {}
        train_unet(
            train_samples,
            FAIRGENMED_ATTRIBUTES,
            pipeline,
            config(tmp_path / "b", method, resume="latest", **(settings | changed | extra)),
        )


def test_resume_refuses_an_incomplete_or_foreign_checkpoint(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    pipeline = str(tiny_pipeline_dir)
    half = tmp_path / "half"
    half.mkdir()
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        train_unet(train_samples, FAIRGENMED_ATTRIBUTES, pipeline, config(tmp_path / "x", "fair", resume=str(half)))
    with pytest.raises(TrainingError, match="does not exist"):
        train_unet(
            train_samples, FAIRGENMED_ATTRIBUTES, pipeline, config(tmp_path / "x", "fair", resume=str(tmp_path / "no"))
        )
    first = train_unet(
        train_samples, FAIRGENMED_ATTRIBUTES, pipeline, config(tmp_path / "c", "fair", max_steps=1, checkpoint_every=1)
    )
    assert first.resumed_from is None
    with pytest.raises(TrainingError, match="different seed"):
        train_unet(
            train_samples,
            FAIRGENMED_ATTRIBUTES,
            pipeline,
            config(tmp_path / "c", "fair", max_steps=2, seed=1, resume="latest"),
        )


def test_checkpoint_holds_the_loop_fbp_and_ema_state_in_a_file_nothing_unpickles(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    train_unet(
        train_samples,
        FAIRGENMED_ATTRIBUTES,
        str(tiny_pipeline_dir),
        config(tmp_path, "fair", max_steps=1, checkpoint_every=1, use_ema=True),
    )
    folder = tmp_path / "checkpoints" / "checkpoint-1"
    names = {p.name for p in folder.iterdir()}
    assert "custom_state.pt" in names
    assert not any(name.startswith("custom_checkpoint_") for name in names)  # accelerate unpickles those
    loop_state, fbp_state, ema_state = torch.load(folder / "custom_state.pt", weights_only=True)
    assert set(loop_state) == {"noise_generator", "windows", "warned", "history", "interval"}
    assert fbp_state["step"] == 1
    assert "shadow_params" in ema_state


def test_a_callers_accelerate_set_up_is_never_reset(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    Accelerator(cpu=True, mixed_precision="bf16")  # the caller's own set-up
    with pytest.raises(TrainingError, match="conflicts with the accelerate set-up"):
        train_unet(train_samples, FAIRGENMED_ATTRIBUTES, str(tiny_pipeline_dir), config(tmp_path, "baseline"))
    assert AcceleratorState().mixed_precision == "bf16"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_with_checkpointing_on_the_gpu(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path, precision: str
) -> None:
    result = train_unet(
        train_samples,
        FAIRGENMED_ATTRIBUTES,
        str(tiny_pipeline_dir),
        config(tmp_path, "fair", mixed_precision=precision, gradient_checkpointing=True, use_ema=True),
    )
    assert math.isfinite(result.final_loss)
    assert result.timing is not None and result.timing.peak_memory_bytes


TEXT_ENCODER_FILE = "text_encoder/model.safetensors"


def test_a_trained_text_encoder_is_saved_and_resumes_like_a_straight_run(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    """``train_text_encoder``: the saved pipeline holds the trained encoder; a killed run resumes to the same one."""
    pipeline = str(tiny_pipeline_dir)
    settings = {"max_steps": 4, "checkpoint_every": 2, "learning_rate": 1e-2, "train_text_encoder": True}
    straight = train_unet(train_samples, FAIRGENMED_ATTRIBUTES, pipeline, config(tmp_path / "a", "fair", **settings))
    before = load_file(tiny_pipeline_dir / TEXT_ENCODER_FILE)
    after = load_file(Path(straight.model_dir) / TEXT_ENCODER_FILE)
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)

    def die_after_checkpoint(metrics: dict[str, float], step: int) -> None:
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        run_b = config(tmp_path / "b", "fair", log_every=1, **settings)
        train_unet(train_samples, FAIRGENMED_ATTRIBUTES, pipeline, run_b, log_metrics=die_after_checkpoint)
    resumed = train_unet(
        train_samples, FAIRGENMED_ATTRIBUTES, pipeline, config(tmp_path / "b", "fair", resume="latest", **settings)
    )
    assert resumed.resumed_from is not None
    for name in (TEXT_ENCODER_FILE, UNET_FILE):
        a, b = load_file(Path(straight.model_dir) / name), load_file(Path(resumed.model_dir) / name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: identical weights"


def test_without_the_option_the_text_encoder_is_saved_as_it_was_loaded_and_offset_noise_changes_training(
    runs: dict[str, Run], tiny_pipeline_dir: Path, train_samples: pd.DataFrame, tmp_path: Path
) -> None:
    before = load_file(tiny_pipeline_dir / TEXT_ENCODER_FILE)
    after = load_file(Path(runs["fair"].result.model_dir) / TEXT_ENCODER_FILE)
    assert all(torch.equal(before[k], after[k]) for k in before)
    overrides = {"max_steps": 2, "learning_rate": 1e-2}
    plain_config = config(tmp_path / "p", "baseline", **overrides)
    plain = train_unet(train_samples, FAIRGENMED_ATTRIBUTES, str(tiny_pipeline_dir), plain_config)
    offset = train_unet(
        train_samples,
        FAIRGENMED_ATTRIBUTES,
        str(tiny_pipeline_dir),
        config(tmp_path / "o", "baseline", noise_offset=0.1, **overrides),
    )
    a, b = load_file(Path(plain.model_dir) / UNET_FILE), load_file(Path(offset.model_dir) / UNET_FILE)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_dropped_prompts_follow_the_share_and_do_not_depend_on_the_number_of_processes() -> None:
    ids = torch.arange(1, 4001).reshape(1000, 4)
    empty = torch.full((1, 4), -1)
    assert drop_prompts(ids, empty, 0.0, torch.Generator().manual_seed(0), 1, 0) is ids
    one = drop_prompts(ids, empty, 0.25, torch.Generator().manual_seed(0), 1, 0)
    rows = (one == -1).all(dim=1)
    assert 0.2 < rows.float().mean() < 0.3
    assert torch.equal(one[~rows], ids[~rows]), "the kept rows are untouched"
    halves = [
        drop_prompts(ids[r * 500 : (r + 1) * 500], empty, 0.25, torch.Generator().manual_seed(0), 2, r) for r in (0, 1)
    ]
    assert torch.equal(torch.cat(halves), one)


def test_empty_prompts_change_training_and_enter_the_run_identity(
    train_samples: pd.DataFrame, tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    overrides = {"max_steps": 2, "learning_rate": 1e-2, "checkpoint_every": 2}
    plain = train_unet(
        train_samples, FAIRGENMED_ATTRIBUTES, str(tiny_pipeline_dir), config(tmp_path / "p", "baseline", **overrides)
    )
    dropping = config(tmp_path / "d", "baseline", proportion_empty_prompts=0.5, **overrides)
    dropped = train_unet(train_samples, FAIRGENMED_ATTRIBUTES, str(tiny_pipeline_dir), dropping)
    a, b = load_file(Path(plain.model_dir) / UNET_FILE), load_file(Path(dropped.model_dir) / UNET_FILE)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainingError, match="proportion_empty_prompts"):
        resume = config(
            tmp_path / "d", "baseline", resume="latest", max_steps=4, learning_rate=1e-2, checkpoint_every=2
        )
        train_unet(train_samples, FAIRGENMED_ATTRIBUTES, str(tiny_pipeline_dir), resume)
