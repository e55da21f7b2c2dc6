"""Tests for the Great Expectations validation suites.

The clean fixture passes; each corruption of a private copy of it fails with a message
naming the file or subject, the column and the rule that broke.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fairdiffusion.config import FAIRGENMED_ATTRIBUTES, ValidationConfig
from fairdiffusion.fairgenmed import load_fairgenmed
from fairdiffusion.validation import ValidationResult, count_groups, validate_dataset

SPLITS = ["train", "val", "test"]
#: Passes on the clean fixture: its smallest subgroup (test Hispanic) has exactly 4 subjects.
DEMO_MIN_GROUP = 4
CONFIG = ValidationConfig(min_group_count=DEMO_MIN_GROUP, image_shape=(32, 32))


@pytest.fixture(autouse=True)
def _fixture_matches(demo_min_group_count: int) -> None:
    assert demo_min_group_count == DEMO_MIN_GROUP


def validate(root: Path, config: ValidationConfig = CONFIG) -> ValidationResult:
    samples = load_fairgenmed(root, SPLITS)
    return validate_dataset(samples, FAIRGENMED_ATTRIBUTES, config, ["train", "val"], "test")


def first_npz(root: Path, split: str = "train") -> Path:
    return sorted((root / split).glob("data_*.npz"))[0]


def rewrite_npz(path: Path, drop: tuple[str, ...] = (), **changes: np.ndarray) -> None:
    """Rewrite one subject's npz with some arrays replaced or removed."""
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files if key not in drop}
    arrays.update(changes)
    np.savez_compressed(path, **arrays)


def single_failure(result: ValidationResult, table: str, column: str) -> str:
    assert not result.success
    lines = [line for line in result.failed_expectations if line.startswith(f"{table}.{column}:")]
    assert len(lines) == 1, result.summary()
    assert lines[0] in result.summary()
    return lines[0]


def test_clean_dataset_passes(demo_dataset: Path) -> None:
    result = validate(demo_dataset)
    assert result.success, result.summary()
    assert result.failed == [] and result.n_subjects == 80
    assert result.evaluated_expectations >= 25
    assert result.summary().startswith("validation passed:")
    assert result.group_counts["test"]["ethnicity=Hispanic"] == DEMO_MIN_GROUP
    assert result.group_counts["train"]["race=White"] == 32
    assert sum(result.group_counts["train"][f"race={g}"] for g in ("Asian", "Black", "White")) == 50
    assert result.to_dict()["success"] is True


def test_count_groups_lists_absent_groups_at_zero() -> None:
    samples = pd.DataFrame({"split": ["train", "train", "test"], "race": ["Asian", "Asian", "White"]})
    counts = count_groups(samples, {"race": ["Asian", "Black", "White"]}, {"train": ["train"], "test": ["test"]})
    table = counts.set_index("slice")["count"].to_dict()
    assert table == {
        "train race=Asian": 2,
        "train race=Black": 0,
        "train race=White": 0,
        "test race=Asian": 0,
        "test race=Black": 0,
        "test race=White": 1,
    }


def test_corrupt_npz(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset)
    path.write_bytes(b"\x89garbage bytes, certainly not a zip archive" * 10)
    result = validate(copy_dataset)
    line = single_failure(result, "samples", "read_error")
    assert "every npz file can be opened and read" in line and path.stem in line and "not an npz archive" in line
    line = single_failure(result, "images", "error")
    assert "image decodes" in line and str(path) in line


def test_missing_protected_attribute(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset)
    rewrite_npz(path, drop=("male",))
    line = single_failure(validate(copy_dataset), "samples", "gender")
    assert "no missing protected attribute" in line
    assert "1 row(s)" in line and path.stem in line


def test_unknown_race_code(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset, "test")
    rewrite_npz(path, race=np.asarray(7))
    line = single_failure(validate(copy_dataset), "samples", "race")
    assert "value is one of the allowed codes ['Asian', 'Black', 'White']" in line
    assert f"{path.stem} (race='7')" in line


def test_subgroup_below_minimum(demo_dataset: Path) -> None:
    config = ValidationConfig(min_group_count=DEMO_MIN_GROUP + 1, image_shape=(32, 32))
    result = validate(demo_dataset, config)
    line = single_failure(result, "group_counts", "count")
    assert f"every subgroup has at least {DEMO_MIN_GROUP + 1} subjects" in line
    assert "test ethnicity=Hispanic" in line
    assert len(result.failed) == 1


def test_absent_group_fails_even_at_count_zero(demo_dataset: Path) -> None:
    samples = load_fairgenmed(demo_dataset, SPLITS)
    samples = samples[samples["race"] != "Asian"]
    config = ValidationConfig(min_group_count=1, image_shape=(32, 32))
    result = validate_dataset(samples, FAIRGENMED_ATTRIBUTES, config, ["train", "val"], "test")
    line = single_failure(result, "group_counts", "count")
    assert "train race=Asian" in line and "test race=Asian (count=0)" in line and "2 row(s)" in line


def test_duplicate_subject_ids(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset, "train")
    number = path.stem.split("_")[1]
    shutil.copy(path, copy_dataset / "test" / path.name)
    shutil.copy(copy_dataset / "train" / f"slo_fundus_{number}.jpg", copy_dataset / "test" / f"slo_fundus_{number}.jpg")
    line = single_failure(validate(copy_dataset), "samples", "subject")
    assert "subject ids are unique" in line and path.stem in line


def test_wrong_image_shape(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset)
    rewrite_npz(path, slo_fundus=np.random.default_rng(0).integers(0, 255, (16, 24), dtype=np.uint8))
    line = single_failure(validate(copy_dataset), "images", "shape")
    assert "image shape is 32x32" in line
    assert f"{path} (shape='16x24')" in line


def test_three_dimensional_image(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset)
    rewrite_npz(path, slo_fundus=np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    line = single_failure(validate(copy_dataset), "images", "ndim")
    assert "image is 2-D" in line and str(path) in line


def test_non_uint8_image(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset)
    rewrite_npz(path, slo_fundus=np.random.default_rng(0).random((32, 32)).astype(np.float32))
    result = validate(copy_dataset)
    line = single_failure(result, "images", "dtype")
    assert "image dtype is uint8" in line and f"{path} (dtype='float32')" in line
    assert len(result.failed) == 1


def test_constant_image(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset, "val")
    rewrite_npz(path, slo_fundus=np.full((32, 32), 17, dtype=np.uint8))
    result = validate(copy_dataset)
    line = single_failure(result, "images", "constant")
    assert "image is not constant" in line and str(path) in line
    assert len(result.failed) == 1


def test_unreadable_jpg(copy_dataset: Path) -> None:
    jpg = sorted((copy_dataset / "test").glob("slo_fundus_*.jpg"))[0]
    jpg.write_bytes(b"not a jpeg")
    line = single_failure(validate(copy_dataset), "images", "error")
    assert "image decodes" in line and str(jpg) in line


@pytest.mark.parametrize(
    ("csv_column", "table_column", "allowed"),
    [
        ("md_severity", "md_severity", "['normal', 'mild', 'moderate', 'severe']"),
        ("cdr_status", "cdr_status", "['normal', 'borderline', 'abnormal']"),
        ("near_vision_refraction_stage", "se_status", "['positive', 'neutral', 'negative']"),
    ],
)
def test_clinical_label_outside_its_set(copy_dataset: Path, csv_column: str, table_column: str, allowed: str) -> None:
    summary = copy_dataset / "data_summary.csv"
    with summary.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[2][csv_column] = "catastrophic"
    with summary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    subject = Path(rows[2]["filename"]).stem
    result = validate(copy_dataset)
    line = single_failure(result, "samples", table_column)
    assert f"value is one of the allowed codes {allowed}" in line
    assert f"{subject} ({table_column}='catastrophic')" in line
    assert len(result.failed) == 1


def test_every_failure_is_reported_at_once(copy_dataset: Path) -> None:
    rewrite_npz(first_npz(copy_dataset, "train"), race=np.asarray(9))
    rewrite_npz(first_npz(copy_dataset, "val"), slo_fundus=np.zeros((32, 32), dtype=np.uint8))
    rewrite_npz(first_npz(copy_dataset, "test"), drop=("hispanic",))
    result = validate(copy_dataset)
    failed = {f"{f.table}.{f.column}" for f in result.failed}
    assert {"samples.race", "images.constant", "samples.ethnicity"} <= failed
    assert result.summary().startswith("validation FAILED:")
    assert result.to_dict()["failed_expectations"] == result.failed_expectations


def test_missing_required_column_is_reported(demo_dataset: Path) -> None:
    samples = load_fairgenmed(demo_dataset, SPLITS).drop(columns=["prompt"])
    result = validate_dataset(samples, FAIRGENMED_ATTRIBUTES, CONFIG, ["train", "val"], "test")
    line = single_failure(result, "samples", "prompt")
    assert "required column is present" in line
