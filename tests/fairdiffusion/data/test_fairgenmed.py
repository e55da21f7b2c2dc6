"""Tests for the FairGenMed reader and the paper's prompt."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fairdiffusion.data.demo import DemoDatasetSpec, demo_subjects, generate_demo_dataset
from fairdiffusion.data.fairgenmed import SAMPLE_COLUMNS, NewSubject, add_subjects, build_prompt, load_fairgenmed
from fairdiffusion.errors import DatasetError

SUMMARY_FIELDS = ["filename", "use", "md_severity", "cdr_status", "near_vision_refraction_stage", "rnflt_status"]


def write_subject(split_dir: Path, number: int, race: object, male: object = 0, hispanic: object = 0, **extra) -> Path:
    """One FairGenMed subject: data_XXXXX.npz (+ a jpg name; the reader does not open it)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    path = split_dir / f"data_{number:05d}.npz"
    values = {"race": race, "male": male, "hispanic": hispanic, "glaucoma": extra.pop("glaucoma", 1), **extra}
    arrays = {key: np.asarray(value) for key, value in values.items() if value is not None}  # None: key absent
    np.savez(path, slo_fundus=np.arange(16, dtype=np.uint8).reshape(4, 4), **arrays)
    return path


def write_summary(root: Path, rows: list[dict[str, str]], fields: list[str] = SUMMARY_FIELDS) -> None:
    with (root / "data_summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def summary_row(number: int, split: str = "train", md: str = "mild", cdr: str = "borderline", se: str = "positive"):
    return {
        "filename": f"data_{number:05d}.npz",
        "use": split,
        "md_severity": md,
        "cdr_status": cdr,
        "near_vision_refraction_stage": se,
        "rnflt_status": "normal",
    }


def test_prompt_matches_the_paper() -> None:
    prompt = build_prompt("Black", "Female", "Non-Hispanic", "glaucoma", "mild", "borderline", "positive")
    assert prompt == (
        "SLO fundus image of a Black Female Non-Hispanic patient with the following conditions: "
        "glaucoma, mild vision loss, borderline cup-disc ratio, positive"
    )


def test_prompt_writes_normal_vision() -> None:
    prompt = build_prompt("White", "Male", "Hispanic", "non-glaucoma", "normal", "normal", "neutral")
    assert prompt == (
        "SLO fundus image of a White Male Hispanic patient with the following conditions: "
        "non-glaucoma, normal vision, normal cup-disc ratio, neutral"
    )
    assert "normal vision loss" not in prompt


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (0, "Asian"),
        (1, "Black"),
        (2, "White"),
        (np.int64(1), "Black"),
        (2.0, "White"),
        ("Asian", "Asian"),
        ("Black or African American", "Black"),
        ("White or Caucasian", "White"),
        (np.str_("White or Caucasian"), "White"),
        (b"Black or African American", "Black"),
        ("1", "Black"),
        (7, "7"),
        ("Martian", "Martian"),
    ],
)
def test_race_codes_and_strings(tmp_path: Path, stored: object, expected: str) -> None:
    write_subject(tmp_path / "train", 1, race=stored)
    write_summary(tmp_path, [summary_row(1)])
    table = load_fairgenmed(tmp_path, ["train"])
    assert table.loc[0, "race"] == expected
    assert pd.isna(table.loc[0, "read_error"])


def test_row_contents(tmp_path: Path) -> None:
    write_subject(tmp_path / "test", 3, race="Black or African American", male=0, hispanic=0, glaucoma=1)
    write_summary(tmp_path, [summary_row(3, "test")])
    table = load_fairgenmed(tmp_path, ["test"])
    assert list(table.columns) == SAMPLE_COLUMNS and len(table) == 1
    row = table.iloc[0]
    assert row["subject"] == "data_00003" and row["split"] == "test"
    assert row["npz_path"] == str(tmp_path / "test" / "data_00003.npz")
    assert row["image_path"] == str(tmp_path / "test" / "slo_fundus_00003.jpg")
    assert (row["race"], row["gender"], row["ethnicity"], row["glaucoma"]) == (
        "Black",
        "Female",
        "Non-Hispanic",
        "glaucoma",
    )
    assert (row["md_severity"], row["cdr_status"], row["se_status"]) == ("mild", "borderline", "positive")
    assert row["prompt"] == build_prompt(
        "Black", "Female", "Non-Hispanic", "glaucoma", "mild", "borderline", "positive"
    )
    assert row["source"] == "real"


def test_unknown_codes_survive_as_text(tmp_path: Path) -> None:
    write_subject(tmp_path / "train", 1, race=5, male=3, hispanic=9)
    write_summary(tmp_path, [summary_row(1)])
    row = load_fairgenmed(tmp_path, ["train"]).iloc[0]
    assert (row["race"], row["gender"], row["ethnicity"]) == ("5", "3", "9")


def test_missing_attribute_is_none_and_prompt_is_none(tmp_path: Path) -> None:
    write_subject(tmp_path / "train", 1, race=0, male=None)
    write_summary(tmp_path, [summary_row(1)])
    row = load_fairgenmed(tmp_path, ["train"]).iloc[0]
    assert pd.isna(row["read_error"]) and row["race"] == "Asian"
    assert pd.isna(row["gender"]) and pd.isna(row["prompt"])


def test_subject_absent_from_summary_has_no_labels(tmp_path: Path) -> None:
    write_subject(tmp_path / "train", 1, race=0)
    write_subject(tmp_path / "train", 2, race=1)
    write_summary(tmp_path, [summary_row(1)])
    table = load_fairgenmed(tmp_path, ["train"]).set_index("subject")
    assert pd.isna(table.loc["data_00002", "md_severity"]) and pd.isna(table.loc["data_00002", "prompt"])
    assert table.loc["data_00001", "prompt"].startswith("SLO fundus image of a Asian")


def test_garbage_npz_gives_read_error(tmp_path: Path) -> None:
    write_subject(tmp_path / "train", 1, race=0)
    (tmp_path / "train" / "data_00002.npz").write_bytes(b"this is not a zip archive at all")
    write_summary(tmp_path, [summary_row(1), summary_row(2)])
    table = load_fairgenmed(tmp_path, ["train"]).set_index("subject")
    assert pd.isna(table.loc["data_00001", "read_error"])
    bad = table.loc["data_00002"]
    assert "not an npz archive" in bad["read_error"]
    assert pd.isna(bad["race"]) and pd.isna(bad["prompt"])


def test_truncated_npz_member_gives_read_error(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(100, dtype=np.int64))
    (tmp_path / "train").mkdir()
    with zipfile.ZipFile(tmp_path / "train" / "data_00001.npz", "w") as archive:
        archive.writestr("race.npy", buffer.getvalue()[:-50])  # valid header, short payload
    write_summary(tmp_path, [summary_row(1)])
    row = load_fairgenmed(tmp_path, ["train"]).iloc[0]
    assert row["read_error"] is not None and row["read_error"].startswith("cannot read npz")


def test_reads_every_split_and_ignores_other_files(tmp_path: Path) -> None:
    write_subject(tmp_path / "train", 1, race=0)
    write_subject(tmp_path / "test", 2, race=1)
    (tmp_path / "train" / "notes.txt").write_text("ignored")
    (tmp_path / "train" / "data_x.npz").write_bytes(b"ignored too: not a data_<digits> name")
    write_summary(tmp_path, [summary_row(1), summary_row(2, "test")])
    table = load_fairgenmed(tmp_path, ["train", "test"])
    assert table["subject"].tolist() == ["data_00001", "data_00002"]
    assert table["split"].tolist() == ["train", "test"]


def test_missing_summary_raises_naming_the_path(tmp_path: Path) -> None:
    write_subject(tmp_path / "train", 1, race=0)
    with pytest.raises(DatasetError, match="missing") as info:
        load_fairgenmed(tmp_path, ["train"])
    assert str(tmp_path / "data_summary.csv") in str(info.value)


def test_summary_without_required_columns(tmp_path: Path) -> None:
    write_subject(tmp_path / "train", 1, race=0)
    write_summary(tmp_path, [summary_row(1)], fields=["filename", "use", "md_severity"])
    with pytest.raises(DatasetError, match="cdr_status, near_vision_refraction_stage") as info:
        load_fairgenmed(tmp_path, ["train"])
    assert str(tmp_path / "data_summary.csv") in str(info.value)


def test_missing_split_folder_raises_naming_the_path(tmp_path: Path) -> None:
    write_subject(tmp_path / "train", 1, race=0)
    write_summary(tmp_path, [summary_row(1)])
    with pytest.raises(DatasetError, match="split folder 'val' not found") as info:
        load_fairgenmed(tmp_path, ["train", "val"])
    assert str(tmp_path / "val") in str(info.value)


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset folder not found") as info:
        load_fairgenmed(tmp_path / "absent", ["train"])
    assert str(tmp_path / "absent") in str(info.value)


def test_demo_dataset_reads_cleanly(demo_dataset: Path) -> None:
    table = load_fairgenmed(demo_dataset, ["train", "val", "test"])
    assert table["split"].value_counts().to_dict() == {"train": 40, "test": 30, "val": 10}
    assert table["read_error"].isna().all() and table["prompt"].notna().all()
    assert set(table["race"]) == {"Asian", "Black", "White"}
    assert set(table["gender"]) == {"Female", "Male"}
    assert set(table["ethnicity"]) == {"Non-Hispanic", "Hispanic"}
    assert table["subject"].is_unique


def test_demo_dataset_stores_race_both_ways(demo_dataset: Path) -> None:
    kinds = set()
    for path in sorted((demo_dataset / "train").glob("data_*.npz")):
        with np.load(path) as npz:
            kinds.add(npz["race"].dtype.kind)
    assert kinds == {"i", "U"}  # codes and FairGenMed's strings both occur


def test_max_subjects_per_split(demo_dataset: Path) -> None:
    table = load_fairgenmed(demo_dataset, ["train", "val", "test"], max_subjects_per_split=3)
    assert table["split"].value_counts().to_dict() == {"train": 3, "val": 3, "test": 3}
    full = load_fairgenmed(demo_dataset, ["train"])
    first = table[table["split"] == "train"]["subject"].tolist()
    assert first == sorted(full["subject"])[:3]


def test_provenance_columns_of_the_summary(tmp_path: Path) -> None:
    write_subject(tmp_path / "train", 1, race=0)
    write_subject(tmp_path / "train", 2, race=1)
    rows = [summary_row(1) | {"source": "synthetic", "generated_by": "fairdiffusion v3"}, summary_row(2)]
    write_summary(tmp_path, rows, fields=[*SUMMARY_FIELDS, "source", "generated_by"])
    table = load_fairgenmed(tmp_path, ["train"]).set_index("subject")
    assert (table.loc["data_00001", "source"], table.loc["data_00001", "generated_by"]) == (
        "synthetic",
        "fairdiffusion v3",
    )
    assert table.loc["data_00002", "source"] == "real" and pd.isna(table.loc["data_00002", "generated_by"])


def test_add_subjects_grows_the_folder_with_provenance(tmp_path: Path) -> None:
    root = generate_demo_dataset(tmp_path / "data", DemoDatasetSpec(train=3, val=1, test=2, image_size=16, seed=1))
    before = load_fairgenmed(root, ["train", "val", "test"])
    real = add_subjects(root, "test", demo_subjects(2, seed=5, image_size=16))
    synthetic = add_subjects(
        root, "train", demo_subjects(3, seed=6, image_size=16), source="synthetic", generated_by="fd v1"
    )
    assert real == ["data_00007", "data_00008"] and synthetic == ["data_00009", "data_00010", "data_00011"]
    after = load_fairgenmed(root, ["train", "val", "test"]).set_index("subject")
    assert len(after) == len(before) + 5 and after["read_error"].isna().all() and after["prompt"].notna().all()
    assert after.loc["data_00007", "split"] == "test" and after.loc["data_00007", "source"] == "real"
    assert set(after.loc[synthetic, "source"]) == {"synthetic"} and set(after.loc[synthetic, "generated_by"]) == {
        "fd v1"
    }
    assert after.loc[before["subject"], "source"].eq("real").all(), "existing rows keep their provenance"
    with np.load(root / "train" / "data_00009.npz") as npz:
        assert npz["slo_fundus"].shape == (16, 16) and npz["slo_fundus"].dtype == np.uint8


def test_add_subjects_refuses_synthetic_test_rows_and_missing_model(tmp_path: Path) -> None:
    root = generate_demo_dataset(tmp_path / "data", DemoDatasetSpec(train=2, val=1, test=1, image_size=16, seed=1))
    subjects = demo_subjects(1, seed=2, image_size=16)
    with pytest.raises(DatasetError, match="never enter the test split"):
        add_subjects(root, "test", subjects, source="synthetic", generated_by="fd v1")
    with pytest.raises(DatasetError, match="need generated_by"):
        add_subjects(root, "train", subjects, source="synthetic")
    bad = [NewSubject(**{**subjects[0].__dict__, "race": "Martian"})]
    with pytest.raises(DatasetError, match="has no FairGenMed code"):
        add_subjects(root, "train", bad)


def test_render_fundus_at_fairgenmed_resolution() -> None:
    from fairdiffusion.data.demo import _sample_labels, render_fundus

    rng = np.random.default_rng(0)
    image = render_fundus(_sample_labels(rng), (664, 512), rng)
    assert image.shape == (664, 512) and image.dtype == np.uint8
    assert image[0, 0] == 0 and image[332, 256] > 0, "dark corners, lit fundus field"
