"""Tests for the HAM10000 adapter on a fixture in the public release layout, and its suite."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fairdiffusion.config import parse_config
from fairdiffusion.data.formats import load_dataset
from fairdiffusion.data.ham10000 import SAMPLE_COLUMNS, build_ham10000_prompt
from fairdiffusion.data.table import LoadedDataset
from fairdiffusion.errors import DatasetError
from fairdiffusion.validation.result import ValidationResult
from fairdiffusion.validation.suites import validate_dataset

CONFIG = parse_config({"data": {"format": "ham10000"}})


def load(root: Path) -> LoadedDataset:
    return load_dataset(CONFIG.data, root)


def validate(dataset: LoadedDataset) -> ValidationResult:
    data = CONFIG.data
    return validate_dataset(
        dataset.samples,
        data.attributes,
        CONFIG.validation,
        data.train_splits,
        data.test_split,
        schema=dataset.schema,
        excluded=dataset.excluded,
    )


@pytest.fixture
def copy(ham10000_dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ham10000_dataset, tmp_path / "HAM10000"))


def edit_metadata(root: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    path = root / "HAM10000_metadata.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table = edit(table)
    table.to_csv(path, index=False)


def test_prompt_matches_the_paper() -> None:
    assert build_ham10000_prompt("Female", "under 60", "benign") == (
        "Dermoscopic image of a Female Age under 60 patient with the following diagnostic category: benign"
    )
    assert build_ham10000_prompt("Male", "60 or older", "malignant") == (
        "Dermoscopic image of a Male Age equal 60 or older patient with the following diagnostic category: malignant"
    )


def test_default_attributes_are_sex_and_age_group() -> None:
    assert CONFIG.data.attributes == {"sex": ["Female", "Male"], "age_group": ["under 60", "60 or older"]}


def test_fixture_reads_into_the_sample_table(ham10000_dataset: Path) -> None:
    dataset = load(ham10000_dataset)
    samples = dataset.samples
    assert list(samples.columns) == SAMPLE_COLUMNS and len(samples) == 160
    assert dataset.excluded.empty and dataset.schema.image_ndim == 3
    row = samples.set_index("subject").loc["ISIC_0024307"]  # second image of the first lesion, in part_2
    assert row["patient_id"] == "HAM_0000000"
    assert row["image_path"] == str(ham10000_dataset / "HAM10000_images_part_2" / "ISIC_0024307.jpg")
    assert (row["dx"], row["diagnosis"], row["sex"]) == ("nv", "benign", "Male")
    assert row["prompt"] == build_ham10000_prompt(row["sex"], row["age_group"], "benign")
    assert row["source"] == "real" and pd.isna(row["read_error"])
    assert set(samples["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize(
    ("dx", "diagnosis"),
    [("mel", "malignant"), ("bcc", "malignant"), ("akiec", "malignant")]
    + [("nv", "benign"), ("bkl", "benign"), ("df", "benign"), ("vasc", "benign")],
)
def test_malignant_means_mel_bcc_akiec(copy: Path, dx: str, diagnosis: str) -> None:
    edit_metadata(copy, lambda t: t.assign(dx=dx))
    assert set(load(copy).samples["diagnosis"]) == {diagnosis}


@pytest.mark.parametrize(("age", "group"), [("59.0", "under 60"), ("60.0", "60 or older"), ("5", "under 60")])
def test_age_groups(copy: Path, age: str, group: str) -> None:
    edit_metadata(copy, lambda t: t.assign(age=age))
    assert set(load(copy).samples["age_group"]) == {group}


def test_unknown_sex_or_age_is_reported_and_excluded(copy: Path) -> None:
    def blank(table: pd.DataFrame) -> pd.DataFrame:
        table.loc[0, "sex"] = "unknown"
        table.loc[1, "sex"] = ""
        table.loc[5, "age"] = ""
        return table

    edit_metadata(copy, blank)
    dataset = load(copy)
    assert len(dataset.samples) == 157
    assert set(dataset.excluded["subject"]) == {"ISIC_0024306", "ISIC_0024307", "ISIC_0024311"}
    assert dataset.exclusion_lines() == [
        "1 row(s) excluded: unknown age (None), e.g. ISIC_0024311",
        "1 row(s) excluded: unknown sex ('unknown'), e.g. ISIC_0024306",
        "1 row(s) excluded: unknown sex (None), e.g. ISIC_0024307",
    ]
    result = validate(dataset)
    assert result.success and result.n_excluded == 3 and "unknown age" in result.summary()


def test_splits_by_lesion_and_stable_under_growth(copy: Path) -> None:
    before = load(copy).samples
    assert (before.groupby("patient_id")["split"].nunique() == 1).all(), "a lesion's images share a split"
    extra = [
        {"lesion_id": f"HAM_9{i:06d}", "image_id": f"ISIC_99{i:05d}", "dx": "nv", "dx_type": "histo"}
        | {"age": "45.0", "sex": "female", "localization": "back"}
        for i in range(30)
    ]
    edit_metadata(copy, lambda t: pd.concat([t, pd.DataFrame(extra)], ignore_index=True))
    after = load(copy).samples.set_index("subject")
    assert len(after) == 190
    assert (after.loc[before["subject"], "split"].to_numpy() == before["split"].to_numpy()).all()


def test_fixture_passes_its_suite(ham10000_dataset: Path) -> None:
    result = validate(load(ham10000_dataset))
    assert result.success, result.summary()
    assert result.format == "ham10000" and result.group_counts["test"]["age_group=under 60"] > 0


# --- HAM10000 entries of the bad-input catalogue ---


def test_unknown_dx_code(copy: Path) -> None:
    edit_metadata(copy, lambda t: t.assign(dx=t["dx"].where(t.index != 4, "melanoma?")))
    result = validate(load(copy))
    lines = [line for line in result.failed_expectations if line.startswith("samples.dx:")]
    assert len(lines) == 1, result.summary()
    assert "value is one of the allowed codes ['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']" in lines[0]
    assert "ISIC_0024310 (dx='melanoma?')" in lines[0]
    assert any(line.startswith("samples.diagnosis: no missing clinical label") for line in result.failed_expectations)


def test_missing_image_file(copy: Path) -> None:
    (copy / "HAM10000_images_part_1" / "ISIC_0024306.jpg").unlink()
    result = validate(load(copy))
    line = next(line for line in result.failed_expectations if line.startswith("samples.read_error:"))
    assert "every file can be found and read" in line and "ISIC_0024306" in line and "no image file" in line
    line = next(line for line in result.failed_expectations if line.startswith("images.error:"))
    assert "image file decodes" in line and "ISIC_0024306.jpg" in line


def test_grayscale_image_where_colour_is_expected(copy: Path) -> None:
    path = copy / "HAM10000_images_part_2" / "ISIC_0024307.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 32), dtype=np.uint8)).save(path)
    result = validate(load(copy))
    assert {f"{f.table}.{f.column}" for f in result.failed} == {"images.ndim", "images.channels"}
    ndim, channels = result.failed_expectations
    assert "image is colour (H x W x channels)" in ndim and f"{path} (ndim=2)" in ndim
    assert "image is RGB" in channels and f"{path} (channels=1)" in channels


def test_missing_metadata_file_and_column(copy: Path) -> None:
    edit_metadata(copy, lambda t: t.drop(columns=["lesion_id"]))
    with pytest.raises(DatasetError, match="missing column\\(s\\) lesion_id"):
        load(copy)
    (copy / "HAM10000_metadata.csv").unlink()
    with pytest.raises(DatasetError, match="HAM10000_metadata.csv: missing"):
        load(copy)
