"""The whole flow on HAM10000 and CheXpert, in their public layouts, with the real Prefect, MLflow, DVC and GE.

Each dataset is a subset (one image per split x group x diagnosis) of the session
fixture written from the public release's layout (``HAM10000_metadata.csv`` +
``HAM10000_images_part_1/ISIC_xxxxxxx.jpg``; ``train.csv``/``valid.csv`` naming
``CheXpert-v1.0-small/train/patient00011/study1/view1_frontal.jpg`` and the demographics
xlsx); both are versioned by DVC in one fresh git repo with a local remote
(``conftest.py``). The flow pulls the one its config names, validates it with Great Expectations, trains the tiny
pipeline for one step, evaluates (FID per group, clinical AUCs of the diagnosis), gates
and registers in a SQLite MLflow registry, under Prefect's test harness (``conftest.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from fairdiffusion import tracking
from fairdiffusion.config import load_config
from fairdiffusion.data.formats import load_dataset
from fairdiffusion.registry import schema
from fairdiffusion.registry.promotion import read_lineage

sys.path.insert(0, str(Path(__file__).parent))
from user_project import fast_config, write_config  # noqa: E402

pytestmark = pytest.mark.slow

#: One group of each attribute whose metrics must exist.
GROUPS = {"ham10000": ["sex/Female", "age_group/60 or older"], "chexpert": ["sex/Male", "race/Black"]}


@pytest.mark.parametrize("layout", sorted(GROUPS))
def test_flow_runs_end_to_end_on_the_public_layout(
    layout: str,
    prefect_harness: str,
    mlflow_store: str,
    layout_datasets: dict[str, Path],
    tiny_pipeline_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flows.pipeline import fairdiffusion_pipeline

    document = fast_config(
        tmp_path, layout_datasets[layout], {"format": layout}, tiny_pipeline_dir, mlflow_store, layout
    )
    config_path = write_config(tmp_path / "config.yaml", document)

    outcome = fairdiffusion_pipeline(config_path=str(config_path))

    # No task failed, not even once before a retry succeeded: nothing logged a traceback.
    assert [r.getMessage() for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()] == []
    config = load_config(config_path)
    assert (outcome.version, outcome.passed, outcome.promoted) == ("1", True, True), outcome.reasons
    lineage = read_lineage(config.tracking, alias=schema.CHAMPION)
    assert lineage.data.dvc_md5 == yaml.safe_load(config.data.dvc_file.read_text())["outs"][0]["md5"]
    assert lineage.validation.success is True and lineage.validation.failed_expectations == []
    assert tracking.run_tags(config.tracking, outcome.run_id)[schema.VALIDATION_FORMAT] == layout
    metrics = tracking.run_metrics(config.tracking, outcome.run_id)
    for group in GROUPS[layout]:
        assert f"fid_randcnn8/{group}" in metrics, sorted(metrics)
    assert "auc_small/diagnosis/overall" in metrics, sorted(metrics)
    # One PNG per test image from the candidate and from the base model, and one per
    # training image (the clinical classifier's training set), each directly in its cache
    # folder whatever the depth of the dataset's own paths.
    samples = load_dataset(config.data).samples
    pngs = sorted((tmp_path / "eval" / "cache").rglob("*.png"))
    assert {p.parent.name for p in pngs} == {"generated"}
    assert len(pngs) == len(samples) + (samples["split"] == "test").sum(), (len(pngs), len(samples))
    assert list((tmp_path / "train" / "pipeline" / "unet").glob("*.safetensors")), "the UNet is saved"
