"""The CheXpert chest X-ray dataset in its public layout, joined with its demographics.

Layout: ``train.csv`` and ``valid.csv`` (``Path``, ``Sex``, ``Age``, ``Frontal/Lateral``,
``AP/PA`` and the 14 observations, each 1, 0, -1 (uncertain) or blank) beside the image
tree their ``Path`` column names (``CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg``,
read relative to the dataset folder whatever its own name). The demographics table
(``PATIENT``, ``PRIMARY_RACE``, ``ETHNICITY``; CSV or the published xlsx) is joined on the
patient id. Two optional columns of the CSVs carry provenance: ``source`` and
``generated_by``.

As in the paper (FairDiffusion Sec. 4.1): race is Asian, Black or White by the prefix of
``PRIMARY_RACE`` (other races are excluded and reported), the target observation is
positive only when 1 (uncertain -1 and blank count as negative). ``train.csv`` and
``valid.csv`` are pooled and split by a hash of the patient id, so no patient is in two
splits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import pandas as pd

from fairdiffusion import files
from fairdiffusion.config import CheXpertConfig
from fairdiffusion.data.table import (
    COMMON_COLUMNS,
    LoadedDataset,
    SampleSchema,
    assign_split,
    excluded_frame,
    limit_per_split,
)
from fairdiffusion.errors import DatasetError

LABEL_FILES = ("train.csv", "valid.csv")
LABEL_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
DEMOGRAPHICS_COLUMNS = ["PATIENT", "PRIMARY_RACE", "ETHNICITY"]
#: ``PRIMARY_RACE`` values starting with these words map to the paper's three groups.
RACE_PREFIXES = {"White": "White", "Black": "Black", "Asian": "Asian"}
ETHNICITY = {"Non-Hispanic/Non-Latino": "Non-Hispanic", "Hispanic/Latino": "Hispanic"}
SAMPLE_COLUMNS = [*COMMON_COLUMNS[:5], "sex", "race", "ethnicity", "age", "view", "diagnosis", *COMMON_COLUMNS[5:]]
_PATIENT = re.compile(r"^patient\d+$")
_SEX = {"Male": "Male", "Female": "Female"}


class _Person(NamedTuple):
    patient: str
    sex: str
    race: str
    ethnicity: str | None


def build_chexpert_prompt(sex: str, race: str, diagnosis: str) -> str:
    """The paper's CheXpert prompt (FairDiffusion Sec. 4.1), e.g. ``... diagnosed with non Pleural Effusion``."""
    return f"Chest Radiography image of a {sex} {race} patient diagnosed with {diagnosis}"


def diagnosis_classes(target: str) -> list[str]:
    """The two values of the ``diagnosis`` label for a target observation: negative, positive."""
    return [f"non {target}", target]


def map_race(primary_race: object) -> str | None:
    """Asian, Black or White by the prefix of ``PRIMARY_RACE``; ``None`` for any other."""
    text = str(primary_race).strip() if isinstance(primary_race, str) else ""
    return next((group for prefix, group in RACE_PREFIXES.items() if text.startswith(prefix)), None)


def _read_table(path: Path, required: Sequence[str]) -> pd.DataFrame:
    if path.suffix.lower() in {".xlsx", ".xlsm"}:
        table = files.read_excel(path, dtype=str)
    else:
        table = files.read_csv(path, dtype=str, keep_default_na=True)
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def _relative_image_path(path: str) -> PurePosixPath:
    """``CheXpert-v1.0-small/train/p/s/v.jpg`` -> ``train/p/s/v.jpg`` (the folder's own name dropped)."""
    parts = PurePosixPath(path.strip()).parts
    while parts and parts[0] not in ("train", "valid"):
        parts = parts[1:]
    return PurePosixPath(*parts) if parts else PurePosixPath(path.strip())


def _target_value(raw: object, target: str) -> str | None:
    text = str(raw).strip() if isinstance(raw, str) else ""
    if text in ("", "0", "0.0", "-1", "-1.0"):
        return f"non {target}"
    if text in ("1", "1.0"):
        return target
    return text


def load_chexpert(
    root: str | Path,
    options: CheXpertConfig,
    split_fractions: Mapping[str, float],
    split_seed: int = 0,
    attributes: Sequence[str] = ("sex", "race"),
    max_subjects_per_split: int | None = None,
) -> LoadedDataset:
    """Read a CheXpert folder and its demographics into the sample table.

    Args:
        root: The folder holding ``train.csv``, ``valid.csv`` and the image tree.
        options: Target observation, demographics table, views kept.
        split_fractions: Split name -> share of patients.
        split_seed: Salt of the patient hash that picks each patient's split.
        attributes: The configured attributes; rows missing any of them are excluded.
        max_subjects_per_split: Keep only the first N images of each split (by id).

    Returns:
        One row per image of a kept view (``subject`` is its path without suffix) and
        the rows excluded (unknown sex, race outside the three groups, no demographics).

    Raises:
        DatasetError: if the folder, ``train.csv`` or the demographics table is missing
            or lacks a column.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    labels = _read_labels(root, options.target)
    by_patient = _read_demographics(root, options)
    rows: list[dict[str, object]] = []
    excluded: list[tuple[str, str]] = []
    for record in labels.to_dict(orient="records"):
        view = str(record["Frontal/Lateral"]).strip()
        if view not in options.views:
            continue
        relative = _relative_image_path(str(record["Path"]))
        subject = relative.with_suffix("").as_posix()
        patient = next((part for part in relative.parts if _PATIENT.match(part)), None)
        person = _demographics(record, patient, by_patient, attributes)
        if isinstance(person, str):
            excluded.append((subject, person))
            continue
        split = assign_split(person.patient, split_fractions, split_seed)
        rows.append(_sample_row(record, root, relative, split, view, person, options.target))
    samples = limit_per_split(pd.DataFrame(rows, columns=SAMPLE_COLUMNS), max_subjects_per_split)
    schema = SampleSchema("chexpert", {"diagnosis": diagnosis_classes(options.target)}, "diagnosis", image_ndim=2)
    return LoadedDataset(samples, excluded_frame(excluded), schema)


def _read_labels(root: Path, target: str) -> pd.DataFrame:
    """``train.csv`` and ``valid.csv`` (when present), pooled."""
    if not (root / LABEL_FILES[0]).is_file():
        raise DatasetError(f"{root / LABEL_FILES[0]}: missing (CheXpert keeps its labels there)")
    tables = []
    for name in LABEL_FILES:
        if (root / name).is_file():
            table = _read_table(root / name, [*LABEL_COLUMNS, target])
            tables.append(table.assign(_file=name))
    return pd.concat(tables, ignore_index=True)


def _read_demographics(root: Path, options: CheXpertConfig) -> pd.DataFrame:
    """The demographics table, one row per patient id (the first of any duplicates)."""
    path = options.demographics if options.demographics.is_absolute() else root / options.demographics
    if not path.is_file():
        raise DatasetError(f"{path}: demographics table not found (data.chexpert.demographics)")
    demographics = _read_table(path, DEMOGRAPHICS_COLUMNS)
    demographics["PATIENT"] = demographics["PATIENT"].str.strip()
    return demographics.drop_duplicates("PATIENT").set_index("PATIENT")


def _demographics(
    record: Mapping[str, object], patient: str | None, by_patient: pd.DataFrame, attributes: Sequence[str]
) -> _Person | str:
    """Who an image shows, or the reason it is excluded."""
    sex = _SEX.get(str(record["Sex"]).strip())
    if sex is None:
        return f"unknown sex ({record['Sex']!r})"
    if patient is None or patient not in by_patient.index:
        return "patient not in the demographics table"
    demo = by_patient.loc[patient]
    race = map_race(demo["PRIMARY_RACE"])
    if race is None:
        return f"race {demo['PRIMARY_RACE']!r} is not Asian, Black or White"
    ethnicity = ETHNICITY.get(str(demo["ETHNICITY"]).strip())
    if "ethnicity" in attributes and ethnicity is None:
        return f"unknown ethnicity ({demo['ETHNICITY']!r})"
    return _Person(patient, sex, race, ethnicity)


def _sample_row(
    record: Mapping[str, object],
    root: Path,
    relative: PurePosixPath,
    split: str,
    view: str,
    person: _Person,
    target: str,
) -> dict[str, object]:
    sex, race = person.sex, person.race
    diagnosis = _target_value(record[target], target)
    age = pd.to_numeric(record["Age"], errors="coerce")
    image_path = root / relative
    source, generated_by = record.get("source"), record.get("generated_by")
    return {
        "subject": relative.with_suffix("").as_posix(),
        "patient_id": person.patient,
        "split": split,
        "image_path": str(image_path),
        "prompt": build_chexpert_prompt(sex, race, diagnosis) if diagnosis in diagnosis_classes(target) else None,
        "sex": sex,
        "race": race,
        "ethnicity": person.ethnicity,
        "age": None if pd.isna(age) else float(age),
        "view": view,
        "diagnosis": diagnosis,
        "source": (source.strip() or "real") if isinstance(source, str) else "real",
        "generated_by": generated_by.strip() if isinstance(generated_by, str) else None,
        "read_error": None if image_path.is_file() else f"no image file {relative} under {root}",
    }
