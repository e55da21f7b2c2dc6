"""Tests for the CheXpert adapter on a fixture in the public layout (xlsx demographics), and its suite."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fairdiffusion.config import parse_config
from fairdiffusion.data.chexpert import SAMPLE_COLUMNS, build_chexpert_prompt, map_race
from fairdiffusion.data.formats import load_dataset
from fairdiffusion.data.table import LoadedDataset
from fairdiffusion.errors import DatasetError
from fairdiffusion.validation.result import ValidationResult
from fairdiffusion.validation.suites import validate_dataset

CONFIG = parse_config({"data": {"format": "chexpert"}})


def load(root: Path, **chexpert: object) -> LoadedDataset:
    data = CONFIG.data.model_copy(update={"chexpert": CONFIG.data.chexpert.model_copy(update=chexpert)})
    return load_dataset(data, root)


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
def copy(chexpert_dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(chexpert_dataset, tmp_path / "CheXpert-v1.0-small"))


def edit_csv(path: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(table).to_csv(path, index=False)


def test_prompt_matches_the_paper() -> None:
    assert build_chexpert_prompt("Female", "Asian", "Pleural Effusion") == (
        "Chest Radiography image of a Female Asian patient diagnosed with Pleural Effusion"
    )
    assert build_chexpert_prompt("Male", "White", "non Pleural Effusion") == (
        "Chest Radiography image of a Male White patient diagnosed with non Pleural Effusion"
    )


@pytest.mark.parametrize(
    ("primary_race", "group"),
    [
        ("White", "White"),
        ("White, non-Hispanic", "White"),
        ("White or Caucasian", "White"),
        ("Black or African American", "Black"),
        ("Black, Hispanic", "Black"),
        ("Asian", "Asian"),
        ("Asian - Historical Conv", "Asian"),
        ("Other", None),
        ("Native Hawaiian or Other Pacific Islander", None),
        ("Unknown", None),
        (float("nan"), None),
    ],
)
def test_race_by_prefix(primary_race: object, group: str | None) -> None:
    assert map_race(primary_race) == group


def test_fixture_reads_into_the_sample_table(chexpert_dataset: Path) -> None:
    dataset = load(chexpert_dataset)
    samples = dataset.samples.set_index("subject")
    assert list(dataset.samples.columns) == SAMPLE_COLUMNS
    assert len(samples) == 200, "lateral views are left out by default"
    assert dataset.excluded.empty and dataset.schema.labels == {
        "diagnosis": ["non Pleural Effusion", "Pleural Effusion"]
    }
    row = samples.loc["train/patient00002/study1/view1_frontal"]
    assert row["image_path"] == str(chexpert_dataset / "train/patient00002/study1/view1_frontal.jpg")
    assert (row["patient_id"], row["sex"], row["race"], row["ethnicity"]) == (
        "patient00002",
        "Male",
        "Black",
        "Non-Hispanic",
    )
    assert row["prompt"] == build_chexpert_prompt("Male", "Black", row["diagnosis"])
    assert (dataset.samples.groupby("patient_id")["split"].nunique() == 1).all(), "a patient's images share a split"


def test_each_raw_value_of_the_target(copy: Path) -> None:
    """Positive only when 1: uncertain (-1) and blank count as negative, as the paper does."""
    raw = ["1.0", "0.0", "-1.0", "", "1", "0"]
    edit_csv(copy / "train.csv", lambda t: t.assign(**{"Pleural Effusion": [raw[i % 6] for i in range(len(t))]}))
    samples = load(copy).samples
    frontal = pd.read_csv(copy / "train.csv", dtype=str, keep_default_na=False)
    frontal = frontal[frontal["Frontal/Lateral"] == "Frontal"]
    expected = [
        "Pleural Effusion" if v in ("1.0", "1") else "non Pleural Effusion" for v in frontal["Pleural Effusion"]
    ]
    assert samples["diagnosis"].tolist() == expected


def test_target_is_configurable(copy: Path) -> None:
    edit_csv(copy / "train.csv", lambda t: t.assign(Cardiomegaly="1.0"))
    dataset = load(copy, target="Cardiomegaly")
    assert set(dataset.samples["diagnosis"]) == {"Cardiomegaly"}
    assert dataset.samples["prompt"].iloc[0].endswith("patient diagnosed with Cardiomegaly")


def test_lateral_views_when_asked(chexpert_dataset: Path) -> None:
    dataset = load(chexpert_dataset, views=["Frontal", "Lateral"])
    assert len(dataset.samples) == 220 and set(dataset.samples["view"]) == {"Frontal", "Lateral"}


def test_demographics_as_csv_read_like_the_xlsx(chexpert_dataset: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(chexpert_dataset, tmp_path / "chexpert"))
    pd.read_excel(root / "CHEXPERT DEMO.xlsx", dtype=str).to_csv(root / "demographics.csv", index=False)
    (root / "CHEXPERT DEMO.xlsx").unlink()
    from_csv = load(root, demographics=Path("demographics.csv")).samples
    pd.testing.assert_frame_equal(
        from_csv.drop(columns=["image_path"]), load(chexpert_dataset).samples.drop(columns=["image_path"])
    )


def test_valid_csv_is_pooled_and_split_by_patient(copy: Path) -> None:
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (20, 16), dtype=np.uint8))
    (copy / "valid" / "patient64541" / "study1").mkdir(parents=True)
    image.save(copy / "valid" / "patient64541" / "study1" / "view1_frontal.jpg")
    header = pd.read_csv(copy / "train.csv", dtype=str, nrows=1, keep_default_na=False)
    row = header.iloc[0].to_dict() | {"Path": "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"}
    pd.DataFrame([row]).to_csv(copy / "valid.csv", index=False)
    demographics = pd.read_excel(copy / "CHEXPERT DEMO.xlsx", dtype=str)
    extra = {"PATIENT": "patient64541", "PRIMARY_RACE": "Asian", "ETHNICITY": "Hispanic/Latino"}
    pd.concat([demographics, pd.DataFrame([extra])]).to_excel(copy / "CHEXPERT DEMO.xlsx", index=False)
    samples = load(copy).samples.set_index("subject")
    assert samples.loc["valid/patient64541/study1/view1_frontal", "race"] == "Asian"
    assert pd.isna(samples.loc["valid/patient64541/study1/view1_frontal", "read_error"])


def test_unknown_sex_other_race_and_missing_demographics_are_excluded(copy: Path) -> None:
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table.loc[0, "Sex"] = "Unknown"
        table.loc[3, "Path"] = "CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg"
        return table

    edit_csv(copy / "train.csv", edit)
    demographics = pd.read_excel(copy / "CHEXPERT DEMO.xlsx", dtype=str)
    demographics.loc[demographics["PATIENT"] == "patient00005", "PRIMARY_RACE"] = "Other"
    demographics.to_excel(copy / "CHEXPERT DEMO.xlsx", index=False)
    dataset = load(copy)
    reasons = dict(zip(dataset.excluded["subject"], dataset.excluded["reason"], strict=True))
    assert reasons == {
        "train/patient00001/study1/view1_frontal": "unknown sex ('Unknown')",
        "train/patient99999/study1/view1_frontal": "patient not in the demographics table",
        "train/patient00005/study1/view1_frontal": "race 'Other' is not Asian, Black or White",
        "train/patient00005/study2/view1_frontal": "race 'Other' is not Asian, Black or White",
    }
    assert len(dataset.samples) == 196
    result = validate(dataset)
    assert result.n_excluded == 4 and "race 'Other' is not Asian, Black or White" in result.summary()


def test_ethnicity_as_an_attribute_excludes_unknown_ethnicity(copy: Path) -> None:
    demographics = pd.read_excel(copy / "CHEXPERT DEMO.xlsx", dtype=str)
    demographics.loc[demographics["PATIENT"] == "patient00004", "ETHNICITY"] = "Patient Refused"
    demographics.to_excel(copy / "CHEXPERT DEMO.xlsx", index=False)
    data = parse_config(
        {
            "data": {
                "format": "chexpert",
                "attributes": {"race": ["Asian", "Black", "White"], "ethnicity": ["Non-Hispanic", "Hispanic"]},
            }
        }
    ).data
    dataset = load_dataset(data, copy)
    assert set(dataset.excluded["reason"]) == {"unknown ethnicity ('Patient Refused')"}
    assert set(dataset.samples["ethnicity"]) == {"Non-Hispanic", "Hispanic"}


def test_fixture_passes_its_suite(chexpert_dataset: Path) -> None:
    result = validate(load(chexpert_dataset))
    assert result.success, result.summary()
    assert result.format == "chexpert" and result.group_counts["train"]["race=Black"] > 0


# --- CheXpert entries of the bad-input catalogue ---


def test_target_value_outside_its_codes(copy: Path) -> None:
    edit_csv(
        copy / "train.csv", lambda t: t.assign(**{"Pleural Effusion": t["Pleural Effusion"].where(t.index != 2, "2")})
    )
    result = validate(load(copy))
    line = next(line for line in result.failed_expectations if line.startswith("samples.diagnosis:"))
    assert "value is one of the allowed codes ['non Pleural Effusion', 'Pleural Effusion']" in line
    assert "train/patient00002/study1/view1_frontal (diagnosis='2')" in line


def test_colour_image_where_grayscale_is_expected(copy: Path) -> None:
    path = copy / "train" / "patient00003" / "study2" / "view1_frontal.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (20, 16, 3), dtype=np.uint8)).save(path)
    result = validate(load(copy))
    assert [f"{f.table}.{f.column}" for f in result.failed] == ["images.ndim"]
    assert "image is 2-D" in result.failed_expectations[0] and f"{path} (ndim=3)" in result.failed_expectations[0]


def test_missing_demographics_table(copy: Path) -> None:
    (copy / "CHEXPERT DEMO.xlsx").unlink()
    with pytest.raises(DatasetError, match="demographics table not found \\(data.chexpert.demographics\\)"):
        load(copy)


def test_demographics_without_race_column(copy: Path) -> None:
    pd.read_excel(copy / "CHEXPERT DEMO.xlsx").drop(columns=["PRIMARY_RACE"]).to_excel(
        copy / "CHEXPERT DEMO.xlsx", index=False
    )
    with pytest.raises(DatasetError, match="missing column\\(s\\) PRIMARY_RACE"):
        load(copy)
