"""The FairGenMed on-disk format, read the way the published FairDiffusion code reads it.

Layout: split folders (``train/``, ``val/``, ``test/``) holding, per subject,
``data_XXXXX.npz`` (``slo_fundus``, ``race``, ``male``, ``hispanic``, ``glaucoma``, ...)
and ``slo_fundus_XXXXX.jpg``; at the top, ``data_summary.csv`` keyed by ``filename``
(the npz name) with ``md_severity``, ``cdr_status``, ``near_vision_refraction_stage``
and ``rnflt_status``. Two optional columns of ``data_summary.csv`` carry provenance:
``source`` (``real``, the default, or ``synthetic``) and ``generated_by`` (the model
version that generated a synthetic subject); being in the CSV, they are versioned by
DVC with the images.

The loader is deliberately tolerant: a value it cannot decode is kept as its raw
text, and an npz it cannot open is recorded in ``read_error``. Judging the table is
the validation suite's job, so every problem is reported at once, with the file.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fairdiffusion import files
from fairdiffusion.data.catalog import CLINICAL_LABELS
from fairdiffusion.data.table import SampleSchema
from fairdiffusion.errors import DatasetError

#: Columns of the sample table every adapter produces, in order.
SAMPLE_COLUMNS = [
    "subject",
    "patient_id",
    "split",
    "npz_path",
    "image_path",
    "prompt",
    "race",
    "gender",
    "ethnicity",
    "glaucoma",
    "md_severity",
    "cdr_status",
    "se_status",
    "rnflt_status",
    "source",
    "generated_by",
    "read_error",
]

# FairGenMed stores race as 0/1/2 in most files and as these strings in some.
_RACE_CODES: dict[object, str] = {
    0: "Asian",
    1: "Black",
    2: "White",
    "Asian": "Asian",
    "Black or African American": "Black",
    "White or Caucasian": "White",
}
_GENDER_CODES: dict[object, str] = {0: "Female", 1: "Male"}
_ETHNICITY_CODES: dict[object, str] = {0: "Non-Hispanic", 1: "Hispanic"}
_GLAUCOMA_CODES: dict[object, str] = {0: "non-glaucoma", 1: "glaucoma"}

#: What validation expects of a FairGenMed table: its labels, grayscale images stored in npz.
SCHEMA = SampleSchema("fairgenmed", dict(CLINICAL_LABELS), "glaucoma", image_ndim=2, npz_images=True)

_NPZ_NAME = re.compile(r"^data_(\d+)\.npz$")
_SUMMARY_COLUMNS = ["filename", "md_severity", "cdr_status", "near_vision_refraction_stage"]


def build_prompt(race: str, gender: str, ethnicity: str, glaucoma: str, md_severity: str, cdr: str, se: str) -> str:
    """Build the paper's FairGenMed text prompt (FairDiffusion, Sec. 4.1).

    "normal vision loss" is written "normal vision", as the published prompts do.
    """
    vision = "normal vision" if md_severity == "normal" else f"{md_severity} vision loss"
    return (
        f"SLO fundus image of a {race} {gender} {ethnicity} patient with the following "
        f"conditions: {glaucoma}, {vision}, {cdr} cup-disc ratio, {se}"
    )


def _decode(raw: object, codes: dict[object, str]) -> str | None:
    """Map a stored code to its label; unknown codes survive as text for validation."""
    if raw is None:
        return None
    value: object = raw
    if isinstance(raw, np.ndarray):
        if raw.size != 1:
            return f"<array of shape {raw.shape}>"
        value = raw.reshape(()).item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        value = value.strip()
        if value.lstrip("-").isdigit():
            value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, float) and np.isnan(value):
        return None
    return codes.get(value, str(value))


def _read_npz_attributes(path: Path) -> tuple[dict[str, str | None], str | None]:
    keys = {"race": _RACE_CODES, "male": _GENDER_CODES, "hispanic": _ETHNICITY_CODES}
    keys["glaucoma"] = _GLAUCOMA_CODES
    try:
        arrays = files.load_npz(path, keys)
    except DatasetError as error:
        # The row names the file in npz_path; read_error says what is wrong with it.
        return dict.fromkeys(keys), str(error).removeprefix(f"{path}: ")
    return {key: _decode(arrays.get(key), codes) for key, codes in keys.items()}, None


def _read_summary(root: Path) -> pd.DataFrame:
    path = root / "data_summary.csv"
    if not path.is_file():
        raise DatasetError(f"{path}: missing (FairGenMed keeps its clinical labels there)")
    summary = files.read_csv(path, dtype=str, keep_default_na=True)
    missing = [column for column in _SUMMARY_COLUMNS if column not in summary.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
    return summary.drop_duplicates("filename", keep="first").set_index("filename")


def load_fairgenmed(root: str | Path, splits: Sequence[str], max_subjects_per_split: int | None = None) -> pd.DataFrame:
    """Read a FairGenMed folder into the sample table.

    Args:
        root: The dataset folder (holding the split folders and ``data_summary.csv``).
        splits: Split folders to read, e.g. ``["train", "val", "test"]``.
        max_subjects_per_split: Keep only the first N subjects of each split (sorted by id).

    Returns:
        One row per subject with the columns of :data:`SAMPLE_COLUMNS`.

    Raises:
        DatasetError: if the folder, a split folder or ``data_summary.csv`` is unusable.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    summary = _read_summary(root)
    by_file: dict[str, dict[str, object]] = summary.to_dict(orient="index")
    columns = set(summary.columns)
    rows: list[dict[str, object]] = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir}: split folder '{split}' not found")
        npz_files = sorted(p for p in split_dir.iterdir() if _NPZ_NAME.match(p.name))
        if max_subjects_per_split is not None:
            npz_files = npz_files[:max_subjects_per_split]
        for npz_path in npz_files:
            rows.append(_subject_row(npz_path, split, by_file.get(npz_path.name), columns))
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


_PROMPT_COLUMNS = ("race", "gender", "ethnicity", "glaucoma", "md_severity", "cdr_status", "se_status")


def _subject_row(
    npz_path: Path, split: str, labels: dict[str, object] | None, summary_columns: set[str]
) -> dict[str, object]:
    """One subject's row: attributes from its npz, labels from its ``data_summary.csv`` row."""
    number = _NPZ_NAME.match(npz_path.name).group(1)  # type: ignore[union-attr]
    attributes, error = _read_npz_attributes(npz_path)

    def label(column: str) -> str | None:
        value = None if labels is None else labels.get(column)
        if value is None or pd.isna(value):
            return None
        return str(value).strip()

    row: dict[str, object] = {
        "subject": npz_path.stem,
        "patient_id": npz_path.stem,
        "split": split,
        "npz_path": str(npz_path),
        "image_path": str(npz_path.parent / f"slo_fundus_{number}.jpg"),
        "race": attributes["race"],
        "gender": attributes["male"],
        "ethnicity": attributes["hispanic"],
        "glaucoma": attributes["glaucoma"],
        "md_severity": label("md_severity"),
        "cdr_status": label("cdr_status"),
        "se_status": label("near_vision_refraction_stage"),
        "rnflt_status": label("rnflt_status") if "rnflt_status" in summary_columns else None,
        "source": label("source") if "source" in summary_columns and label("source") else "real",
        "generated_by": label("generated_by") if "generated_by" in summary_columns else None,
        "read_error": error,
    }
    prompt_parts = [row[key] for key in _PROMPT_COLUMNS]
    row["prompt"] = build_prompt(*prompt_parts) if all(prompt_parts) else None  # type: ignore[arg-type]
    return row


@dataclass(frozen=True)
class NewSubject:
    """One subject to add to a FairGenMed folder: its image and its labels, decoded."""

    image: np.ndarray
    race: str
    gender: str
    ethnicity: str
    glaucoma: str
    md_severity: str
    cdr_status: str
    se_status: str
    rnflt_status: str | None = None


def _code(codes: dict[object, str], label: str) -> int:
    return next(int(code) for code, name in codes.items() if isinstance(code, int) and name == label)


def write_subject(
    split_dir: Path, number: int, subject: NewSubject, source: str = "real", generated_by: str | None = None
) -> dict[str, str]:
    """Write one subject's ``data_XXXXX.npz`` and ``slo_fundus_XXXXX.jpg``; return its summary row.

    Raises:
        DatasetError: if a label has no FairGenMed code.
    """
    name = f"data_{number:05d}.npz"
    try:
        race = _code(_RACE_CODES, subject.race)
        male = _code(_GENDER_CODES, subject.gender)
        hispanic = _code(_ETHNICITY_CODES, subject.ethnicity)
        glaucoma = _code(_GLAUCOMA_CODES, subject.glaucoma)
    except StopIteration:
        raise DatasetError(f"{name}: a label of {subject!r:.200} has no FairGenMed code") from None
    np.savez_compressed(
        split_dir / name,
        slo_fundus=subject.image,
        race=np.asarray(race),
        male=np.asarray(male),
        hispanic=np.asarray(hispanic),
        glaucoma=np.asarray(glaucoma),
    )
    Image.fromarray(subject.image).save(split_dir / f"slo_fundus_{number:05d}.jpg", quality=95)
    return {
        "filename": name,
        "use": split_dir.name,
        "md_severity": subject.md_severity,
        "cdr_status": subject.cdr_status,
        "near_vision_refraction_stage": subject.se_status,
        "rnflt_status": subject.rnflt_status or "",
        "source": source,
        "generated_by": generated_by or "",
    }


def add_subjects(
    root: str | Path,
    split: str,
    subjects: Sequence[NewSubject],
    source: str = "real",
    generated_by: str | None = None,
) -> list[str]:
    """Grow a FairGenMed folder: one npz and jpg per subject, one row each in ``data_summary.csv``.

    Subjects are numbered after the highest existing ``data_XXXXX``. Then ``dvc add`` the
    folder and commit ``data.dvc`` to make the grown data a version.

    Args:
        root: The dataset folder (with ``data_summary.csv``).
        split: The split folder the subjects go to (created if absent).
        subjects: Images (2-D uint8) and decoded labels.
        source: ``real``, or ``synthetic`` for images a model generated.
        generated_by: The generating model version; required for synthetic subjects.

    Returns:
        The new subject ids.

    Raises:
        DatasetError: if the folder has no summary, a label is unknown, or synthetic
            subjects lack ``generated_by`` or are meant for a split other than training.
    """
    root = Path(root)
    summary_path = root / "data_summary.csv"
    if not summary_path.is_file():
        raise DatasetError(f"{summary_path}: missing; add subjects to an existing FairGenMed folder")
    if source not in ("real", "synthetic"):
        raise DatasetError(f"source '{source}': must be 'real' or 'synthetic'")
    if source == "synthetic" and not generated_by:
        raise DatasetError("synthetic subjects need generated_by (the model version that made them)")
    if source == "synthetic" and split == "test":
        raise DatasetError("synthetic subjects never enter the test split (evaluation is on real images only)")
    numbers = [int(m.group(1)) for p in root.glob("*/data_*.npz") if (m := _NPZ_NAME.match(p.name))]
    number = max(numbers, default=0)
    reader = csv.DictReader(io.StringIO(files.read_text(summary_path), newline=""))
    fields = list(reader.fieldnames or [])
    rows = list(reader)
    fields += [column for column in ("rnflt_status", "source", "generated_by") if column not in fields]
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    added = []
    for subject in subjects:
        number += 1
        rows.append(write_subject(split_dir, number, subject, source, generated_by))
        added.append(f"data_{number:05d}")
    with summary_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return added
