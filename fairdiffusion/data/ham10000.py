"""The HAM10000 dermatoscopy dataset in its public release layout.

Layout: ``HAM10000_metadata.csv`` (``lesion_id``, ``image_id``, ``dx``, ``dx_type``,
``age``, ``sex``, ``localization``) beside the image folders ``HAM10000_images_part_1/``
and ``HAM10000_images_part_2/`` of ``<image_id>.jpg`` (any sub-folder is searched). Two
optional columns carry provenance: ``source`` (``real`` or ``synthetic``) and
``generated_by``.

As in the paper (FairDiffusion Sec. 4.1): malignant means ``dx`` in {mel, bcc, akiec},
benign otherwise; the attributes are sex and age group (under 60, 60 or older). Rows
with unknown sex or age are excluded and reported. The release has no split: each
lesion goes to a split by a hash of its ``lesion_id``, so all images of a lesion share
a split.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from fairdiffusion import files
from fairdiffusion.data.table import (
    COMMON_COLUMNS,
    LoadedDataset,
    SampleSchema,
    assign_split,
    excluded_frame,
    limit_per_split,
)
from fairdiffusion.errors import DatasetError

METADATA_FILE = "HAM10000_metadata.csv"
METADATA_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
#: The seven diagnostic categories of HAM10000.
DX_CODES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
MALIGNANT_DX = {"mel", "bcc", "akiec"}
LABELS: dict[str, list[str]] = {"diagnosis": ["benign", "malignant"], "dx": DX_CODES}
SCHEMA = SampleSchema("ham10000", LABELS, "diagnosis", image_ndim=3)
AGE_THRESHOLD = 60
SAMPLE_COLUMNS = [*COMMON_COLUMNS[:5], "sex", "age_group", "age", "diagnosis", "dx", *COMMON_COLUMNS[5:]]
_SEX = {"male": "Male", "female": "Female"}


def build_ham10000_prompt(sex: str, age_group: str, diagnosis: str) -> str:
    """The paper's HAM10000 prompt (FairDiffusion Sec. 4.1)."""
    age = "Age under 60" if age_group == "under 60" else "Age equal 60 or older"
    return f"Dermoscopic image of a {sex} {age} patient with the following diagnostic category: {diagnosis}"


def _read_metadata(root: Path) -> pd.DataFrame:
    path = root / METADATA_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: missing (HAM10000 keeps its labels and demographics there)")
    table = files.read_csv(path, dtype=str, keep_default_na=True)
    missing = [column for column in METADATA_COLUMNS if column not in table.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def _image_index(root: Path) -> dict[str, Path]:
    """image_id -> jpg, from the release's part folders (or any folder below the root)."""
    return {path.stem: path for path in sorted(root.rglob("*.jpg"))}


def _text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value).strip()
    return text or None


def load_ham10000(
    root: str | Path,
    split_fractions: Mapping[str, float],
    split_seed: int = 0,
    max_subjects_per_split: int | None = None,
) -> LoadedDataset:
    """Read a HAM10000 release folder into the sample table.

    Args:
        root: The folder holding ``HAM10000_metadata.csv`` and the image folders.
        split_fractions: Split name -> share of lesions.
        split_seed: Salt of the lesion hash that picks each lesion's split.
        max_subjects_per_split: Keep only the first N images of each split (by id).

    Returns:
        One row per image (``subject`` is the ``image_id``, ``patient_id`` the ``lesion_id``)
        and the rows excluded for unknown sex or age.

    Raises:
        DatasetError: if the folder or the metadata file is missing or unreadable.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    metadata = _read_metadata(root)
    images = _image_index(root)
    rows: list[dict[str, object]] = []
    excluded: list[tuple[str, str]] = []
    for record in metadata.to_dict(orient="records"):
        image_id = _text(record["image_id"]) or "?"
        person = _sex_and_age(record)
        if isinstance(person, str):
            excluded.append((image_id, person))
            continue
        rows.append(_sample_row(record, image_id, person, images.get(image_id), root, split_fractions, split_seed))
    samples = limit_per_split(pd.DataFrame(rows, columns=SAMPLE_COLUMNS), max_subjects_per_split)
    return LoadedDataset(samples, excluded_frame(excluded), SCHEMA)


def _sex_and_age(record: Mapping[str, object]) -> tuple[str, float] | str:
    """An image's sex and age, or the reason it is excluded."""
    sex = _SEX.get((_text(record["sex"]) or "").lower())
    try:
        age = float(record["age"]) if _text(record["age"]) is not None else None  # type: ignore[arg-type]
    except ValueError:
        age = None
    if sex is None:
        return f"unknown sex ({_text(record['sex'])!r})"
    if age is None:
        return f"unknown age ({_text(record['age'])!r})"
    return sex, age


def _sample_row(
    record: Mapping[str, object],
    image_id: str,
    person: tuple[str, float],
    image: Path | None,
    root: Path,
    split_fractions: Mapping[str, float],
    split_seed: int,
) -> dict[str, object]:
    sex, age = person
    lesion_id = _text(record["lesion_id"])
    dx = _text(record["dx"])
    diagnosis = None if dx not in DX_CODES else ("malignant" if dx in MALIGNANT_DX else "benign")
    age_group = "under 60" if age < AGE_THRESHOLD else "60 or older"
    return {
        "subject": image_id,
        "patient_id": lesion_id,
        "split": assign_split(lesion_id or image_id, split_fractions, split_seed),
        "image_path": str(image if image is not None else root / "HAM10000_images_part_1" / f"{image_id}.jpg"),
        "prompt": build_ham10000_prompt(sex, age_group, diagnosis) if diagnosis else None,
        "sex": sex,
        "age_group": age_group,
        "age": age,
        "diagnosis": diagnosis,
        "dx": dx,
        "source": _text(record.get("source")) or "real",
        "generated_by": _text(record.get("generated_by")),
        "read_error": None if image is not None else f"no image file {image_id}.jpg under {root}",
    }
