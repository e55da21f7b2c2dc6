"""A generation's dataset folder: real rows copied as they are, synthetic rows with their provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.data.generations import SyntheticBatch, kept_real_rows, write_generation_dataset

SPLITS = ["train", "val", "test"]


def test_regimes_keep_none_all_or_a_fresh_draw_of_the_real_rows() -> None:
    rows = pd.DataFrame({"subject": [f"s{i}" for i in range(10)]})
    assert kept_real_rows("synthetic-only", rows, 0.5, 1, 0).empty
    assert kept_real_rows("augment", rows, 0.5, 1, 0) is rows
    fresh = [kept_real_rows("fresh", rows, 0.5, g, 0)["subject"].tolist() for g in (1, 2)]
    assert len(fresh[0]) == 5 and fresh[0] != fresh[1]
    with pytest.raises(ValueError, match="one of synthetic-only, augment, fresh"):
        kept_real_rows("bogus", rows, 0.5, 1, 0)


def test_the_folder_holds_the_same_real_test_set_and_the_synthetic_rows(demo_dataset: Path, tmp_path: Path) -> None:
    real = load_fairgenmed(demo_dataset, SPLITS)
    test = real[real["split"] == "test"]
    prompts = real[real["split"] == "train"].head(6)
    images = np.random.default_rng(0).integers(0, 255, size=(6, 16, 16, 3), dtype=np.uint8)
    batch = SyntheticBatch(prompts, images, "fairdiffusion generation 0 (run abc)")
    root = write_generation_dataset(tmp_path / "g1", demo_dataset, test, [batch], ["train", "val", "test"])

    written = load_fairgenmed(root, SPLITS)
    assert written[written["split"] == "test"]["subject"].tolist() == test["subject"].tolist()
    copied = Path(written[written["split"] == "test"]["image_path"].iloc[0])
    assert copied.read_bytes() == Path(test["image_path"].iloc[0]).read_bytes()
    synthetic = written[written["source"] == "synthetic"]
    assert len(synthetic) == 6 and set(synthetic["split"]) == {"train"}
    assert (root / "val").is_dir() and not any((root / "val").iterdir()), "an empty training split still exists"
    assert set(synthetic["generated_by"]) == {"fairdiffusion generation 0 (run abc)"}
    assert synthetic["prompt"].tolist() == prompts["prompt"].tolist(), "labelled as the prompt that asked for it"
    with np.load(synthetic["npz_path"].iloc[0]) as stored:
        assert stored["slo_fundus"].shape == (32, 32), "resized to the data's own image size, one channel"
    with pytest.raises(FileExistsError):
        write_generation_dataset(root, demo_dataset, test, [], ["train", "val", "test"])
