"""Tests for generation and the whole evaluation on the tiny pipeline and the small dataset."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fairdiffusion.config import ClinicalConfig, EvaluationConfig, ExtractorConfig
from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.data.images import load_real_images
from fairdiffusion.evaluation.comparison import BaselineRun, compare_with_baseline
from fairdiffusion.evaluation.evaluate import evaluate_model
from fairdiffusion.evaluation.features import build_extractor, extract_features
from fairdiffusion.evaluation.generation import generate_images, resolve_device
from fairdiffusion.evaluation.image_metrics import fid_from_features
from fairdiffusion.evaluation.report import render_markdown, render_report_files
from fairdiffusion.evaluation.results import EvaluationReport
from fairdiffusion.evaluation.slices import define_slices

ATTRS = {"race": ["Asian", "Black", "White"], "gender": ["Female", "Male"], "ethnicity": ["Non-Hispanic", "Hispanic"]}
RESOLUTION = 32


def train_rows(root: Path) -> pd.DataFrame:
    """The training rows whose prompts the clinical classifier's images come from."""
    return load_fairgenmed(root, ["train"]).head(24).reset_index(drop=True)


def eval_config(output_dir: Path, **overrides: object) -> EvaluationConfig:
    values: dict[str, object] = {
        "output_dir": output_dir,
        "extractor": ExtractorConfig(name="randcnn", dim=8),
        "num_inference_steps": 2,
        "batch_size": 16,
        "feature_resolution": 32,
        "bootstrap_resamples": 30,
        "matched_draws": 3,
        "min_slice_size": 5,
        "clinical": ClinicalConfig(resolution=16, epochs=2),
    }
    return EvaluationConfig(**(values | overrides))  # type: ignore[arg-type]


def test_generation_is_seeded_per_prompt_whatever_the_batch(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    prompts = ["SLO fundus image of a Black Female Hispanic patient", "SLO fundus image", "glaucoma"]
    config = eval_config(tmp_path, batch_size=3)
    batched = generate_images(str(tiny_pipeline_dir), prompts, RESOLUTION, config)
    again = generate_images(str(tiny_pipeline_dir), prompts, RESOLUTION, config)
    one_by_one = generate_images(str(tiny_pipeline_dir), prompts, RESOLUTION, config, batch_size=1)
    assert batched.images.shape == (3, RESOLUTION, RESOLUTION, 3) and batched.images.dtype == np.uint8
    np.testing.assert_array_equal(batched.images, again.images)
    # Batched convolutions may round differently; the noise, and so the image, is the same.
    assert np.abs(batched.images.astype(int) - one_by_one.images.astype(int)).max() <= 1
    assert not np.array_equal(batched.images[0], batched.images[1])
    assert batched.device == "cpu" and batched.dtype == "float32" and batched.images_per_second > 0
    other_seed = generate_images(str(tiny_pipeline_dir), prompts, RESOLUTION, eval_config(tmp_path, seed=7))
    assert not np.array_equal(batched.images, other_seed.images)


def test_device_and_precision_resolution() -> None:
    assert resolve_device(EvaluationConfig(device="cpu")) == ("cpu", torch.float32)
    assert resolve_device(EvaluationConfig(device="cpu", precision="bf16")) == ("cpu", torch.bfloat16)
    assert resolve_device(EvaluationConfig(device="cuda")) == ("cuda", torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generation_in_half_precision_on_a_gpu(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    made = generate_images(str(tiny_pipeline_dir), ["SLO fundus image"] * 4, RESOLUTION, eval_config(tmp_path))
    assert made.device == "cuda" and made.dtype == "float16" and made.images.shape[0] == 4


@pytest.fixture(scope="module")
def evaluated(
    demo_dataset: Path, tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[EvaluationReport, pd.DataFrame, EvaluationConfig]:
    samples = load_fairgenmed(demo_dataset, ["test"]).reset_index(drop=True)
    config = eval_config(tmp_path_factory.mktemp("eval"))
    report = evaluate_model(
        str(tiny_pipeline_dir),
        samples,
        ATTRS,
        RESOLUTION,
        config,
        data_version="md5-test",
        train_samples=train_rows(demo_dataset),
    )
    return report, samples, config


def test_evaluation_writes_lossless_images_and_every_report_file(evaluated) -> None:
    report, samples, config = evaluated
    out = Path(config.output_dir)
    pngs = sorted(Path(report.image_dir).glob("*.png"))
    assert [p.stem for p in pngs] == sorted(samples["subject"])
    assert not list(Path(report.image_dir).glob("*.jp*g"))
    for name in ("evaluation.json", "evaluation.md", "report.html"):
        assert (out / name).is_file(), name
    charts = {p.name for p in (out / "charts").glob("*.png")}
    assert {"fid.png", "kid.png", "auc_glaucoma.png", "auc_se_status.png"} <= charts
    assert set(report.grids) == set(ATTRS) and all((out / p).is_file() for p in report.grids.values())
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(charts) + len(ATTRS) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page
    assert "ES-M = M * (1 + D)" in page and "race/Black/gender/Female" in page


def test_slice_fid_equals_fid_computed_from_scratch_on_only_that_slices_images(evaluated) -> None:
    """Re-read the slice's real images and generated PNGs, extract their features alone."""
    report, samples, config = evaluated
    extractor = build_extractor(config.extractor)
    slices = define_slices(samples[list(ATTRS)], ATTRS, intersections=True)
    checked = 0
    for name in ("overall", "race/White", "gender/Male", "race/White/gender/Female"):
        rows = slices[name]
        real = load_real_images(samples["image_path"].iloc[rows].tolist(), RESOLUTION)
        generated = np.stack(
            [np.asarray(Image.open(Path(report.image_dir) / f"{s}.png")) for s in samples["subject"].iloc[rows]]
        )
        features = [
            extract_features(extractor, torch.from_numpy(x.copy()), config.feature_resolution).numpy()
            for x in (real, generated)
        ]
        assert report.slices[name]["fid"] == pytest.approx(fid_from_features(*features), rel=1e-6), name
        assert report.metrics[f"fid_{report.extractor}/{name}"] == report.slices[name]["fid"]
        checked += 1
    assert checked == 4


def test_metrics_follow_the_key_conventions_and_the_gate_keys_stay(evaluated) -> None:
    report, samples, _ = evaluated
    metrics, x = report.metrics, report.extractor
    assert x == "randcnn8"
    for attribute, groups in ATTRS.items():
        for key in (f"es_fid_{x}/{attribute}", f"fid_gap_{x}/{attribute}", f"fid_disparity_{x}/{attribute}"):
            assert math.isfinite(metrics[key]), key
        for group in groups:
            assert metrics[f"num_samples/{attribute}/{group}"] == (samples[attribute] == group).sum()
    for key in (
        f"kid_{x}/race/Black/gender/Female",
        f"es_kid_{x}/race",
        f"fid_matched_{x}/race/Asian",
        f"es_fid_matched_{x}/ethnicity",
        "auc_small/glaucoma/overall",
        "auc_small/md_severity/race/Black",
        "es_auc_small/cdr_status/gender",
        "auc_gap_small/se_status/race",
        f"ci_low/fid_{x}/overall",
        f"ci_high/es_fid_{x}/race",
        "ci_low/auc_small/glaucoma/overall",
    ):
        assert key in metrics, key
    assert report.equity == report.quality.equity["fid"] if report.quality else False
    assert report.protocol["confidence_level"] == 0.95
    assert (
        report.protocol["extractor_weights_sha256"]
        == build_extractor(ExtractorConfig(name="randcnn", dim=8)).weights_hash
    )
    assert report.protocol["num_real"] == report.protocol["num_generated"] == len(samples)
    assert report.protocol["data_version"] == "md5-test"
    assert "antialiased" in str(report.protocol["resize"])


def test_a_second_evaluation_of_the_same_model_reuses_the_cache(
    evaluated, tiny_pipeline_dir: Path, demo_dataset: Path
) -> None:
    report, samples, config = evaluated
    again = evaluate_model(
        str(tiny_pipeline_dir),
        samples,
        ATTRS,
        RESOLUTION,
        config,
        data_version="md5-test",
        train_samples=train_rows(demo_dataset),
    )
    assert again.protocol["generation"] == {"cached": True}
    assert again.protocol["cache_key"] == report.protocol["cache_key"]
    image_keys = [k for k in report.metrics if "auc" not in k]
    assert json.dumps({k: again.metrics[k] for k in image_keys}) == json.dumps(
        {k: report.metrics[k] for k in image_keys}
    )
    # The classifier is seeded, but CPU kernels may round differently at 1e-8 between runs,
    # which can swap two near-tied scores: AUCs agree closely, not bit for bit.
    assert set(again.metrics) == set(report.metrics)
    for key in (k for k in report.metrics if k.startswith("auc_small/")):
        assert again.metrics[key] == pytest.approx(report.metrics[key], abs=0.05, nan_ok=True), key


def test_report_renders_again_from_its_json(evaluated, tmp_path: Path) -> None:
    report, _, config = evaluated
    data = json.loads((Path(config.output_dir) / "evaluation.json").read_text())
    restored = EvaluationReport.from_dict(data)
    files = render_report_files(restored, tmp_path / "again", grid_dir=Path(config.output_dir))
    assert files["markdown"].read_text() == (Path(config.output_dir) / "evaluation.md").read_text()
    assert (tmp_path / "again" / report.grids["race"]).is_file()
    assert restored.clinical is not None and restored.clinical.classes == report.clinical.classes  # type: ignore[union-attr]


def test_the_report_shows_the_deltas_from_a_baseline_run_and_keeps_them_in_its_json(evaluated, tmp_path: Path) -> None:
    report, _, _ = evaluated
    x = report.extractor
    worse = {k: v + 1.0 for k, v in report.metrics.items() if k.startswith(f"fid_{x}/")}
    baseline = BaselineRun("run-b", "champion v7", worse)
    compared = replace(report, baseline=compare_with_baseline(report.metrics, baseline, ATTRS, x))
    files = render_report_files(compared, tmp_path / "with-baseline")
    markdown = files["markdown"].read_text()
    assert "## Against the baseline: champion v7 (run run-b), same data version" in markdown
    assert f"| fid_{x}/race/Asian |" in markdown and "| -1 | better |" in markdown
    assert "Against the baseline: champion v7" in files["html"].read_text()
    restored = EvaluationReport.from_dict(json.loads(files["json"].read_text()))
    assert restored.baseline == compared.baseline
    assert "Against the baseline" not in render_markdown(report)
