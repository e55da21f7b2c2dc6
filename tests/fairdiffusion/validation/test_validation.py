"""Tests for the Great Expectations validation suites, and the catalogue of bad inputs.

The clean fixture passes; each corruption of a private copy of it (or of its sample
table) fails with a message naming the file or subject, the column and the rule that
broke. The HAM10000 and CheXpert adapters' own bad inputs are in their test modules.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fairdiffusion.config import FAIRGENMED_ATTRIBUTES, ValidationConfig
from fairdiffusion.data.counts import count_groups
from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.validation.result import ReferenceCounts, ValidationResult
from fairdiffusion.validation.suites import compare_shares, validate_dataset

SPLITS = ["train", "val", "test"]
#: Passes on the clean fixture: its smallest subgroup (test Asian) has exactly 4 subjects.
MIN_GROUP = 4
CONFIG = ValidationConfig(min_group_count=MIN_GROUP, image_shape=(32, 32))


@pytest.fixture(autouse=True)
def _fixture_matches(demo_min_group_count: int) -> None:
    assert demo_min_group_count == MIN_GROUP


def validate(root: Path, config: ValidationConfig = CONFIG, **kwargs: object) -> ValidationResult:
    return validate_table(load_fairgenmed(root, SPLITS), config, **kwargs)


def validate_table(samples: pd.DataFrame, config: ValidationConfig = CONFIG, **kwargs: object) -> ValidationResult:
    return validate_dataset(samples, FAIRGENMED_ATTRIBUTES, config, ["train", "val"], "test", **kwargs)  # type: ignore[arg-type]


def first_npz(root: Path, split: str = "train", index: int = 0) -> Path:
    return sorted((root / split).glob("data_*.npz"))[index]


def rewrite_npz(path: Path, drop: tuple[str, ...] = (), **changes: np.ndarray) -> None:
    """Rewrite one subject's npz with some arrays replaced or removed."""
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files if key not in drop}
    arrays.update(changes)
    np.savez_compressed(path, **arrays)


def edit_summary(root: Path, changes: dict[str, dict[str, str]]) -> None:
    """Set columns of data_summary.csv rows (by subject id), adding columns as needed."""
    path = root / "data_summary.csv"
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    fields = list(rows[0])
    for row in rows:
        for column, value in changes.get(Path(row["filename"]).stem, {}).items():
            if column not in fields:
                fields.append(column)
            row[column] = value
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def single_failure(result: ValidationResult, table: str, column: str) -> str:
    assert not result.success
    lines = [line for line in result.failed_expectations if line.startswith(f"{table}.{column}:")]
    assert len(lines) == 1, result.summary()
    assert lines[0] in result.summary()
    return lines[0]


def test_clean_dataset_passes(valid_dataset: Path) -> None:
    result = validate(valid_dataset)
    assert result.success, result.summary()
    assert result.failed == [] and result.n_subjects == 80
    assert result.evaluated_expectations >= 50
    assert result.summary().startswith("validation passed:")
    assert result.group_counts["test"]["race=Asian"] == MIN_GROUP
    assert result.group_counts["train"]["race=White"] == 31
    assert sum(result.group_counts["train"][f"race={g}"] for g in ("Asian", "Black", "White")) == 50
    assert result.synthetic["train_fraction"] == 0.0 and result.synthetic["test_synthetic"] == 0
    assert result.reference is None and result.share_shifts == []
    document = result.to_dict()
    assert document["success"] is True and document["format"] == "fairgenmed"


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


def test_count_groups_counts_intersections() -> None:
    samples = pd.DataFrame(
        {"split": ["train"] * 3, "race": ["Asian", "Asian", "White"], "gender": ["Male", "Female", "Male"]}
    )
    attributes = {"race": ["Asian", "White"], "gender": ["Female", "Male"]}
    counts = count_groups(samples, attributes, {"train": ["train"]}, [["race", "gender"]])
    table = counts.set_index("slice")["count"].to_dict()
    assert table["train race=Asian&gender=Male"] == 1 and table["train race=White&gender=Female"] == 0
    assert table["train race=Asian"] == 2 and len(table) == 4 + 4


def test_compare_shares_per_split_set_and_acknowledgement() -> None:
    now = {"train": {"race=Asian": 30, "race=White": 70}}
    before = {"train": {"race=Asian": 10, "race=White": 90}}
    shifts = compare_shares(now, before, {"race": ["Asian", "White"]}, {"race=Asian": "new site"})
    by_slice = {s.slice: s for s in shifts}
    assert by_slice["train race=Asian"].share_before == 0.1 and by_slice["train race=Asian"].share_now == 0.3
    assert by_slice["train race=Asian"].shift == 0.2 and by_slice["train race=Asian"].acknowledged == "new site"
    assert by_slice["train race=White"].acknowledged is None
    assert compare_shares(now, {"train": {"gender=Male": 3}}, {"race": ["Asian", "White"]}, {}) == []


def test_data_docs_are_written(valid_dataset: Path, tmp_path: Path) -> None:
    result = validate(valid_dataset, docs_dir=tmp_path / "docs")
    assert result.success and result.data_docs == str(tmp_path / "docs")
    index = (tmp_path / "docs" / "index.html").read_text()
    for suite in ("samples", "patients", "images", "group_counts", "class_balance"):
        assert f"fairdiffusion.{suite}" in index
    assert list((tmp_path / "docs" / "validations").rglob("*.html")), "one page per validation run"


# --- The catalogue of bad inputs: one test each, asserting the message a user reads. ---


def test_corrupt_npz(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset)
    path.write_bytes(b"\x89garbage bytes, certainly not a zip archive" * 10)
    result = validate(copy_dataset)
    line = single_failure(result, "samples", "read_error")
    assert "every file can be found and read" in line and path.stem in line and "not an npz archive" in line
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


def test_subgroup_below_minimum(valid_dataset: Path) -> None:
    config = ValidationConfig(min_group_count=MIN_GROUP + 1, image_shape=(32, 32))
    result = validate(valid_dataset, config)
    line = single_failure(result, "group_counts", "count")
    assert f"every subgroup has at least {MIN_GROUP + 1} subjects" in line
    assert "test race=Asian (count=4)" in line
    assert len(result.failed) == 1


def test_per_group_minimum_overrides_the_default(valid_dataset: Path) -> None:
    config = ValidationConfig(min_group_count=1, min_group_counts={"ethnicity=Hispanic": 8}, image_shape=(32, 32))
    line = single_failure(validate(valid_dataset, config), "group_counts", "count")
    assert "every subgroup has at least 8 subjects" in line and "train ethnicity=Hispanic (count=7)" in line
    assert "test ethnicity=Hispanic" not in line  # 9 in test


def test_absent_group_fails_even_at_count_zero(valid_dataset: Path) -> None:
    samples = load_fairgenmed(valid_dataset, SPLITS)
    samples = samples[samples["race"] != "Asian"]
    config = ValidationConfig(min_group_count=1, image_shape=(32, 32))
    line = single_failure(validate_table(samples, config), "group_counts", "count")
    assert "train race=Asian" in line and "test race=Asian (count=0)" in line and "2 row(s)" in line


def test_intersection_below_minimum(valid_dataset: Path) -> None:
    config = ValidationConfig(
        min_group_count=MIN_GROUP, intersections=[["race", "gender"]], min_intersection_count=3, image_shape=(32, 32)
    )
    result = validate(valid_dataset, config)
    line = single_failure(result, "group_counts", "count")
    assert "every subgroup has at least 3 subjects" in line
    assert "race=Asian&gender=" in line
    assert "race=Asian&gender=Female" in result.group_counts["test"]


def test_group_without_both_classes_of_the_main_label(demo_dataset: Path) -> None:
    """The seed-131 fixture's test Hispanic subjects all have glaucoma: their AUC is undefined."""
    result = validate(demo_dataset)
    line = single_failure(result, "class_balance", "count")
    assert "each group has every class of glaucoma" in line
    assert "test ethnicity=Hispanic glaucoma=non-glaucoma (count=0)" in line


def test_duplicate_subject_ids(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset, "train")
    number = path.stem.split("_")[1]
    shutil.copy(path, copy_dataset / "test" / path.name)
    shutil.copy(copy_dataset / "train" / f"slo_fundus_{number}.jpg", copy_dataset / "test" / f"slo_fundus_{number}.jpg")
    result = validate(copy_dataset)
    line = single_failure(result, "samples", "subject")
    assert "subject ids are unique" in line and path.stem in line
    # The copy is also the same patient and the same pixels in two splits.
    assert path.stem in single_failure(result, "patients", "splits")
    assert str(path) in single_failure(result, "images", "duplicate_in_other_split")


def test_patient_in_two_splits(valid_dataset: Path) -> None:
    samples = load_fairgenmed(valid_dataset, SPLITS)
    train_patient = samples.loc[samples["split"] == "train", "patient_id"].iloc[0]
    samples.loc[samples.index[samples["split"] == "test"][0], "patient_id"] = train_patient
    line = single_failure(validate_table(samples), "patients", "splits")
    assert "no patient is in two splits" in line and f"{train_patient} (splits='test, train')" in line


def test_same_image_in_two_splits(copy_dataset: Path) -> None:
    source, target = first_npz(copy_dataset, "train"), first_npz(copy_dataset, "test")
    with np.load(source) as npz:
        pixels = npz["slo_fundus"]
    rewrite_npz(target, slo_fundus=pixels)
    line = single_failure(validate(copy_dataset), "images", "duplicate_in_other_split")
    assert "no image is repeated (same pixels) in another split" in line
    assert f"{target} (duplicate_in_other_split='{source} in train')" in line


def test_wrong_image_shape(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset)
    rewrite_npz(path, slo_fundus=np.random.default_rng(0).integers(0, 255, (16, 24), dtype=np.uint8))
    line = single_failure(validate(copy_dataset), "images", "shape")
    assert "image shape is 32x32" in line
    assert f"{path} (shape='16x24')" in line


def test_unset_image_shape_passes_any_single_shape(valid_dataset: Path) -> None:
    result = validate(valid_dataset, ValidationConfig(min_group_count=MIN_GROUP))
    assert result.success, result.summary()


def test_unset_image_shape_means_one_shape_for_all(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset, "test")
    rewrite_npz(path, slo_fundus=np.random.default_rng(0).integers(0, 255, (16, 24), dtype=np.uint8))
    odd = validate(copy_dataset, ValidationConfig(min_group_count=MIN_GROUP))
    line = single_failure(odd, "images", "shape")
    assert "all images share one shape" in line and "seen 32x32 (79), 16x24 (1)" in line
    assert f"{path} (shape='16x24')" in line and len(odd.failed) == 1
    mixed = validate(copy_dataset, ValidationConfig(min_group_count=MIN_GROUP, image_shape="any"))
    assert mixed.success, mixed.summary()


def test_image_shape_accepts_only_a_pair_or_any() -> None:
    assert ValidationConfig(image_shape=[664, 512]).image_shape == (664, 512)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_shape"):
        ValidationConfig(image_shape="mixed")  # type: ignore[arg-type]


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


def test_intensity_outside_the_range(copy_dataset: Path) -> None:
    path = first_npz(copy_dataset, "val")
    rewrite_npz(path, slo_fundus=np.random.default_rng(0).integers(0, 4096, (32, 32), dtype=np.uint16))
    result = validate(copy_dataset)
    line = single_failure(result, "images", "max")
    assert "every pixel lies in the intensity range [0, 255]" in line and f"{path} (max=40" in line
    assert str(path) in single_failure(result, "images", "dtype")  # a 12-bit export, caught twice


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


def test_truncated_jpg(copy_dataset: Path) -> None:
    jpg = sorted((copy_dataset / "train").glob("slo_fundus_*.jpg"))[2]
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    line = single_failure(validate(copy_dataset), "images", "error")
    assert "image decodes" in line and str(jpg) in line and "truncated" in line


@pytest.mark.parametrize(
    ("csv_column", "table_column", "allowed"),
    [
        ("md_severity", "md_severity", "['normal', 'mild', 'moderate', 'severe']"),
        ("cdr_status", "cdr_status", "['normal', 'borderline', 'abnormal']"),
        ("near_vision_refraction_stage", "se_status", "['positive', 'neutral', 'negative']"),
    ],
)
def test_clinical_label_outside_its_set(copy_dataset: Path, csv_column: str, table_column: str, allowed: str) -> None:
    subject = first_npz(copy_dataset, "train", 2).stem
    edit_summary(copy_dataset, {subject: {csv_column: "catastrophic"}})
    result = validate(copy_dataset)
    line = single_failure(result, "samples", table_column)
    assert f"value is one of the allowed codes {allowed}" in line
    assert f"{subject} ({table_column}='catastrophic')" in line
    assert len(result.failed) == 1


def test_synthetic_row_in_the_test_split(copy_dataset: Path) -> None:
    subject = first_npz(copy_dataset, "test").stem
    edit_summary(copy_dataset, {subject: {"source": "synthetic", "generated_by": "fairdiffusion v3"}})
    result = validate(copy_dataset)
    line = single_failure(result, "samples", "source")
    assert "the test split 'test' is entirely real (synthetic images never enter evaluation)" in line
    assert f"{subject} (source='synthetic')" in line
    assert result.synthetic["test_synthetic"] == 1


def test_synthetic_row_without_its_model_version(copy_dataset: Path) -> None:
    subject = first_npz(copy_dataset, "train").stem
    edit_summary(copy_dataset, {subject: {"source": "synthetic", "generated_by": ""}})
    line = single_failure(validate(copy_dataset), "samples", "generated_by")
    assert "every synthetic row names the model version that generated it" in line and subject in line


def test_unknown_source(copy_dataset: Path) -> None:
    subject = first_npz(copy_dataset, "val").stem
    edit_summary(copy_dataset, {subject: {"source": "scraped"}})
    line = single_failure(validate(copy_dataset), "samples", "source")
    assert "source is one of ['real', 'synthetic']" in line and f"{subject} (source='scraped')" in line


def _mark_synthetic(root: Path, count: int) -> dict[str, dict[str, str]]:
    subjects = [p.stem for p in sorted((root / "train").glob("data_*.npz"))[:count]]
    return {s: {"source": "synthetic", "generated_by": "fairdiffusion v2"} for s in subjects}


def test_synthetic_share_above_the_ceiling(copy_dataset: Path) -> None:
    edit_summary(copy_dataset, _mark_synthetic(copy_dataset, 11))  # 11 of 50 training rows: 22%
    result = validate(copy_dataset)
    line = single_failure(result, "samples", "source")
    assert "at most 20% of the training rows are synthetic (validation.max_synthetic_fraction)" in line
    assert "11 row(s) break it (22.0% of 50 rows)" in line
    assert result.synthetic["by_model"] == {"fairdiffusion v2": 11} and result.synthetic["train_fraction"] == 0.22


def test_synthetic_share_at_the_ceiling_passes(copy_dataset: Path) -> None:
    edit_summary(copy_dataset, _mark_synthetic(copy_dataset, 10))  # exactly 20%
    result = validate(copy_dataset)
    assert result.success, result.summary()
    assert result.synthetic == {
        "train_rows": 50,
        "train_synthetic": 10,
        "train_fraction": 0.2,
        "by_model": {"fairdiffusion v2": 10},
        "test_synthetic": 0,
    }


CHAMPION_COUNTS = {
    "train": {"race=Asian": 10, "race=Black": 14, "race=White": 26, "gender=Female": 25, "gender=Male": 25},
    "test": {"race=Asian": 4, "race=Black": 5, "race=White": 21},
}


def test_group_share_moved_since_the_champion(valid_dataset: Path) -> None:
    reference = ReferenceCounts("champion v4 (data md5 0123abcd)", CHAMPION_COUNTS)
    result = validate(valid_dataset, reference=reference)
    line = single_failure(result, "group_shares", "shift")
    assert "no group's share moves by more than 5 percentage points since champion v4 (data md5 0123abcd)" in line
    assert "unless acknowledged in validation.acknowledged_shifts" in line
    assert "train race=Asian 20.0% -> 10.0% (shift=0.1)" in line and "train race=White 52.0% -> 62.0%" in line
    assert result.reference == "champion v4 (data md5 0123abcd)"


def test_acknowledged_share_move_passes_and_is_recorded(valid_dataset: Path) -> None:
    reference = ReferenceCounts("champion v4", CHAMPION_COUNTS)
    reasons = {"race=Asian": "site B left the study", "race=White": "site B left the study"}
    config = CONFIG.model_copy(update={"acknowledged_shifts": reasons})
    result = validate(valid_dataset, config, reference=reference)
    assert result.success, result.summary()
    moved = {s.slice: s.acknowledged for s in result.share_shifts if s.shift > 0.05}
    assert moved == {"train race=Asian": "site B left the study", "train race=White": "site B left the study"}
    assert result.to_dict()["share_shifts"][0]["share_before"] == 0.2


def test_text_column_holding_numbers(valid_dataset: Path) -> None:
    samples = load_fairgenmed(valid_dataset, SPLITS)
    samples["patient_id"] = samples["patient_id"].astype(object)
    samples.loc[samples.index[3], "patient_id"] = 12345
    line = single_failure(validate_table(samples), "samples", "patient_id")
    assert "values are text" in line and "(patient_id=12345)" in line


def test_split_that_is_not_configured(valid_dataset: Path) -> None:
    samples = load_fairgenmed(valid_dataset, SPLITS)
    subject = samples["subject"].iloc[5]
    samples.loc[samples.index[5], "split"] = "holdout"
    line = single_failure(validate_table(samples), "samples", "split")
    assert "split is one of ['train', 'val', 'test']" in line and f"{subject} (split='holdout')" in line


def test_every_failure_is_reported_at_once(copy_dataset: Path) -> None:
    rewrite_npz(first_npz(copy_dataset, "train"), race=np.asarray(9))
    rewrite_npz(first_npz(copy_dataset, "val"), slo_fundus=np.zeros((32, 32), dtype=np.uint8))
    rewrite_npz(first_npz(copy_dataset, "test"), drop=("hispanic",))
    result = validate(copy_dataset)
    failed = {f"{f.table}.{f.column}" for f in result.failed}
    assert {"samples.race", "images.constant", "samples.ethnicity"} <= failed
    assert result.summary().startswith("validation FAILED:")
    assert result.to_dict()["failed_expectations"] == result.failed_expectations


def test_missing_required_column_is_reported(valid_dataset: Path) -> None:
    samples = load_fairgenmed(valid_dataset, SPLITS).drop(columns=["prompt"])
    line = single_failure(validate_table(samples), "samples", "prompt")
    assert "required column is present" in line


def test_excluded_rows_are_reported_not_failed(valid_dataset: Path) -> None:
    excluded = pd.DataFrame({"subject": ["ISIC_1", "ISIC_2"], "reason": ["unknown sex ('unknown')"] * 2})
    result = validate(valid_dataset, excluded=excluded)
    assert result.success and result.n_excluded == 2
    assert result.excluded == ["2 row(s) excluded: unknown sex ('unknown'), e.g. ISIC_1, ISIC_2"]
    assert "2 row(s) excluded" in result.summary()
