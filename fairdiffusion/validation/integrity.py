"""Image integrity: every image opened, described and hashed, in parallel; duplicates across splits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from fairdiffusion import files
from fairdiffusion.data.fairgenmed import SCHEMA as FAIRGENMED_SCHEMA
from fairdiffusion.data.table import SampleSchema
from fairdiffusion.errors import DatasetError

#: How many offending rows a failure message names at most.
_IMAGE_COLUMNS = ["subject", "split", "file", "error", "ndim", "channels", "dtype", "shape", "min", "max", "constant"]


def _hash_pixels(array: np.ndarray) -> str:
    digest = hashlib.blake2b(f"{array.dtype}{array.shape}".encode(), digest_size=16)
    digest.update(np.ascontiguousarray(array).data.cast("B"))
    return digest.hexdigest()


def _describe_array(image: np.ndarray) -> dict[str, object]:
    channels = 1 if image.ndim == 2 else (image.shape[2] if image.ndim == 3 else None)
    empty = image.size == 0
    low = None if empty else float(image.min())
    high = None if empty else float(image.max())
    return {
        "ndim": image.ndim,
        "channels": channels,
        "dtype": str(image.dtype),
        "shape": "x".join(map(str, image.shape[:2])),
        "min": low,
        "max": high,
        "constant": bool(empty or low == high),
        "hash": _hash_pixels(image),
    }


def _check_npz_image(npz_path: str, jpg_path: str) -> dict[str, object]:
    """FairGenMed: facts of the npz ``slo_fundus`` array; the jpg beside it must decode too."""
    facts: dict[str, object] = {"file": npz_path, "error": None}
    errors = []
    try:
        arrays = files.load_npz(npz_path, ["slo_fundus"])
        if "slo_fundus" not in arrays:
            raise DatasetError(f"{npz_path}: no 'slo_fundus' array")
        facts |= _describe_array(arrays["slo_fundus"])
    except DatasetError as error:
        errors.append(str(error))
    try:
        # A reduced-scale decode still reads every entropy-coded block, so a truncated
        # or corrupt file fails here; the full-size pixels come from the npz above.
        files.open_image(jpg_path, scale=8)
    except DatasetError as error:
        errors.append(str(error))
    facts["error"] = "; ".join(errors) or None
    return facts


def _check_image_file(path: str) -> dict[str, object]:
    facts: dict[str, object] = {"file": path, "error": None}
    try:
        facts |= _describe_array(np.asarray(files.open_image(path)))
    except DatasetError as error:
        facts["error"] = str(error)
    return facts


def inspect_images(samples: pd.DataFrame, schema: SampleSchema = FAIRGENMED_SCHEMA, workers: int = 2) -> pd.DataFrame:
    """Decode every subject's image; one row of facts per subject.

    Each worker holds one image at a time and keeps only its facts, so memory does not
    grow with the dataset. Decoding (zlib, JPEG) and hashing release the GIL, so threads
    run in parallel.
    """
    jobs: Iterable[tuple[str, ...]]
    if schema.npz_images:
        jobs = zip(samples["npz_path"].astype(str), samples["image_path"].astype(str), strict=True)
    else:
        jobs = ((path,) for path in samples["image_path"].astype(str))

    def check(job: tuple[str, ...]) -> dict[str, object]:
        return _check_npz_image(job[0], job[1]) if len(job) == 2 else _check_image_file(job[0])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        facts = list(pool.map(check, jobs))
    frame = pd.DataFrame(facts, columns=[*_IMAGE_COLUMNS[2:], "hash"])
    frame.insert(0, "subject", samples["subject"].to_numpy())
    frame.insert(1, "split", samples["split"].to_numpy())
    frame["duplicate_in_other_split"] = _cross_split_duplicates(frame)
    return frame.drop(columns=["hash"])


def _cross_split_duplicates(images: pd.DataFrame) -> pd.Series:
    """For each image, another file with the same pixels in another split (else ``None``)."""
    known = images[images["hash"].notna()]
    spread = known.groupby("hash")["split"].nunique()
    shared = set(spread[spread > 1].index)
    result = pd.Series([None] * len(images), index=images.index, dtype=object)
    if not shared:
        return result
    rows = known[known["hash"].isin(shared)]
    for _, group in rows.groupby("hash"):
        for index, split in zip(group.index, group["split"], strict=True):
            other = group[group["split"] != split].iloc[0]
            result[index] = f"{other['file']} in {other['split']}"
    return result
