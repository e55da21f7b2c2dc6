"""The datasets of a self-consuming retraining experiment, one FairGenMed folder per generation.

Alemohammad et al. 2023 and Mayer et al. 2024 (Sec. 3) study three regimes, named as in
``fairdiffusion generations --regime``:

- ``synthetic-only`` (their *fully synthetic* loop): generation g trains only on the images
  generation g-1 generated for the training prompts; the real training data is replaced.
- ``augment`` (*synthetic augmentation*): the real training data plus the synthetic images
  of every earlier generation.
- ``fresh`` (*fresh data*): generation g-1's images plus a fresh draw of real training rows.

Real subjects (the test split always, and the real training rows a regime keeps) are
copied byte for byte with their ids, so every generation is evaluated on exactly the
same real test set. Synthetic subjects go in through :func:`add_subjects`, the path users
take to add synthetic images, with ``source: synthetic`` and ``generated_by``, so
validation bounds them and the lineage records them as it would any user's.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fairdiffusion.data.fairgenmed import NewSubject, add_subjects

#: The regimes of the MAD protocol (see the module docstring).
REGIMES = ("synthetic-only", "augment", "fresh")
_LABELS = ("race", "gender", "ethnicity", "glaucoma", "md_severity", "cdr_status", "se_status")


@dataclass(frozen=True)
class SyntheticBatch:
    """Images one generation made for the training prompts of ``rows``, and who made them."""

    rows: pd.DataFrame
    images: np.ndarray
    generated_by: str


def synthetic_subjects(batch: SyntheticBatch, image_shape: tuple[int, int]) -> list[NewSubject]:
    """One subject per generated image, labelled as the row whose prompt asked for it.

    Generated images are RGB at the training resolution; FairGenMed stores one grey channel
    at the data's own size, so they are converted and resized (bicubic) to ``image_shape``.
    """
    subjects = []
    for row, image in zip(batch.rows.to_dict(orient="records"), batch.images, strict=True):
        grey = Image.fromarray(image).convert("L").resize((image_shape[1], image_shape[0]), Image.Resampling.BICUBIC)
        labels = {name: str(row[name]) for name in _LABELS}
        rnflt = row.get("rnflt_status")
        subjects.append(NewSubject(np.asarray(grey), **labels, rnflt_status=None if pd.isna(rnflt) else str(rnflt)))
    return subjects


def copy_real_subjects(source: Path, rows: pd.DataFrame, destination: Path) -> None:
    """Copy rows' npz and jpg files (same ids, same bytes); write their ``data_summary.csv`` rows."""
    summary_path = destination / "data_summary.csv"
    with (source / "data_summary.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        wanted = {Path(str(p)).name for p in rows["npz_path"]}
        kept = [row for row in reader if row["filename"] in wanted]
    for row in rows.itertuples(index=False):
        split_dir = destination / str(row.split)
        split_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(str(row.npz_path), split_dir)
        shutil.copy2(str(row.image_path), split_dir)
    with summary_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)


def fresh_rows(real_train: pd.DataFrame, fraction: float, generation: int, seed: int) -> pd.DataFrame:
    """A seeded draw of ``fraction`` of the real training rows, a different one per generation."""
    count = max(1, round(fraction * len(real_train)))
    return real_train.sample(n=count, random_state=seed + generation).sort_values("subject")


def kept_real_rows(regime: str, real_train: pd.DataFrame, fraction: float, generation: int, seed: int) -> pd.DataFrame:
    """The real training rows a later generation keeps under ``regime``."""
    if regime not in REGIMES:
        raise ValueError(f"regime '{regime}': must be one of {', '.join(REGIMES)}")
    if regime == "synthetic-only":
        return real_train.iloc[0:0]
    if regime == "augment":
        return real_train
    return fresh_rows(real_train, fraction, generation, seed)


def write_generation_dataset(
    destination: Path,
    source: Path,
    real_rows: pd.DataFrame,
    batches: Sequence[SyntheticBatch],
    splits: Sequence[str],
) -> Path:
    """A FairGenMed folder with every split in ``splits``: ``real_rows`` copied from ``source``
    (the test split among them), then every batch added to the first split as synthetic subjects.

    Raises:
        FileExistsError: if ``destination`` exists (a generation's data is written once).
    """
    destination.mkdir(parents=True, exist_ok=False)
    for split in splits:
        (destination / split).mkdir()  # a regime may leave a training split empty
    copy_real_subjects(source, real_rows, destination)
    shape = _image_shape(real_rows)
    for batch in batches:
        add_subjects(destination, splits[0], synthetic_subjects(batch, shape), "synthetic", batch.generated_by)
    return destination


def _image_shape(rows: pd.DataFrame) -> tuple[int, int]:
    with np.load(str(rows["npz_path"].iloc[0])) as stored:
        height, width = stored["slo_fundus"].shape[:2]
    return int(height), int(width)
