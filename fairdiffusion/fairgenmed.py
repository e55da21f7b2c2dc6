"""The FairGenMed on-disk format, read the way the published FairDiffusion code reads it.

Layout: split folders (``train/``, ``val/``, ``test/``) holding, per subject,
``data_XXXXX.npz`` (``slo_fundus``, ``race``, ``male``, ``hispanic``, ``glaucoma``, ...)
and ``slo_fundus_XXXXX.jpg``; at the top, ``data_summary.csv`` keyed by ``filename``
(the npz name) with ``md_severity``, ``cdr_status``, ``near_vision_refraction_stage``
and ``rnflt_status``.

The loader is deliberately tolerant: a value it cannot decode is kept as its raw
text, and an npz it cannot open is recorded in ``read_error``. Judging the table is
the validation suite's job, so every problem is reported at once, with the file.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

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

#: Allowed values of the clinical labels (data_summary.csv) and their decoded forms.
CLINICAL_LABELS: dict[str, list[str]] = {
    "glaucoma": ["non-glaucoma", "glaucoma"],
    "md_severity": ["normal", "mild", "moderate", "severe"],
    "cdr_status": ["normal", "borderline", "abnormal"],
    "se_status": ["positive", "neutral", "negative"],
}

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
    if not zipfile.is_zipfile(path):
        return dict.fromkeys(keys), "not an npz archive (cannot be opened as a zip file)"
    try:
        with np.load(path, allow_pickle=False) as npz:
            values = {key: _decode(npz[key], codes) if key in npz else None for key, codes in keys.items()}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        empty: dict[str, str | None] = dict.fromkeys(keys)
        return empty, f"cannot read npz ({type(error).__name__}: {error})"
    return values, None


def _read_summary(root: Path) -> pd.DataFrame:
    path = root / "data_summary.csv"
    if not path.is_file():
        raise DatasetError(f"{path}: missing (FairGenMed keeps its clinical labels there)")
    try:
        summary = pd.read_csv(path, dtype=str, keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not a readable CSV ({error})") from None
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
    rows: list[dict[str, object]] = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir}: split folder '{split}' not found")
        npz_files = sorted(p for p in split_dir.iterdir() if _NPZ_NAME.match(p.name))
        if max_subjects_per_split is not None:
            npz_files = npz_files[:max_subjects_per_split]
        for npz_path in npz_files:
            number = _NPZ_NAME.match(npz_path.name).group(1)  # type: ignore[union-attr]
            attributes, error = _read_npz_attributes(npz_path)
            labels = summary.loc[npz_path.name] if npz_path.name in summary.index else None

            def label(column: str, labels: pd.Series | None = labels) -> str | None:
                if labels is None or pd.isna(labels[column]):
                    return None
                return str(labels[column]).strip()

            row: dict[str, object] = {
                "subject": npz_path.stem,
                "patient_id": npz_path.stem,
                "split": split,
                "npz_path": str(npz_path),
                "image_path": str(split_dir / f"slo_fundus_{number}.jpg"),
                "race": attributes["race"],
                "gender": attributes["male"],
                "ethnicity": attributes["hispanic"],
                "glaucoma": attributes["glaucoma"],
                "md_severity": label("md_severity"),
                "cdr_status": label("cdr_status"),
                "se_status": label("near_vision_refraction_stage"),
                "rnflt_status": label("rnflt_status") if "rnflt_status" in summary.columns else None,
                "source": "real",
                "generated_by": None,
                "read_error": error,
            }
            prompt_parts = [
                row[key]
                for key in (
                    "race",
                    "gender",
                    "ethnicity",
                    "glaucoma",
                    "md_severity",
                    "cdr_status",
                    "se_status",
                )
            ]
            row["prompt"] = build_prompt(*prompt_parts) if all(prompt_parts) else None  # type: ignore[arg-type]
            rows.append(row)
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
