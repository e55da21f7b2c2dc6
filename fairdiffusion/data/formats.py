"""Dataset formats: one adapter per published layout, all producing the same sample table.

Every adapter returns a :class:`LoadedDataset`: the sample table (one row per image),
the rows it excluded and why, and the :class:`SampleSchema` that tells validation which
clinical labels and image layout to expect. The table always has the columns in
:data:`COMMON_COLUMNS`, plus one column per protected attribute and per clinical label:
training reads ``image_path``, ``prompt`` and the attributes; evaluation reads the test
rows' ``prompt``, ``image_path``, attributes and labels.

Formats:
- ``fairgenmed``: split folders of ``data_XXXXX.npz`` + ``slo_fundus_XXXXX.jpg`` and
  ``data_summary.csv`` (:mod:`fairdiffusion.data.fairgenmed`);
- ``ham10000``: ``HAM10000_metadata.csv`` and the image folders (:mod:`fairdiffusion.data.ham10000`);
- ``chexpert``: ``train.csv``/``valid.csv`` and the demographics table (:mod:`fairdiffusion.data.chexpert`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fairdiffusion.config import DataConfig
from fairdiffusion.data.chexpert import load_chexpert
from fairdiffusion.data.fairgenmed import SCHEMA as FAIRGENMED_SCHEMA
from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.data.ham10000 import load_ham10000
from fairdiffusion.data.table import LoadedDataset, excluded_frame
from fairdiffusion.errors import DatasetError


def _load_fairgenmed(root: Path, config: DataConfig) -> LoadedDataset:

    samples = load_fairgenmed(root, [*config.train_splits, config.test_split], config.max_subjects_per_split)
    return LoadedDataset(samples, excluded_frame([]), FAIRGENMED_SCHEMA)


def _load_ham10000(root: Path, config: DataConfig) -> LoadedDataset:

    return load_ham10000(root, config.split_fractions, config.split_seed, config.max_subjects_per_split)


def _load_chexpert(root: Path, config: DataConfig) -> LoadedDataset:

    return load_chexpert(
        root,
        config.chexpert,
        config.split_fractions,
        config.split_seed,
        list(config.attributes),
        config.max_subjects_per_split,
    )


@dataclass(frozen=True)
class DatasetFormat:
    """How one format is read, and which of its files describe its subjects."""

    name: str
    load: Callable[[Path, DataConfig], LoadedDataset]
    #: Glob patterns (relative to the dataset folder) of the files the table is read
    #: from: enough to rebuild the table of an old version without its images.
    metadata: Callable[[DataConfig], list[str]]


FORMATS: dict[str, DatasetFormat] = {
    "fairgenmed": DatasetFormat(
        "fairgenmed",
        _load_fairgenmed,
        lambda c: ["data_summary.csv", *[f"{split}/data_*.npz" for split in [*c.train_splits, c.test_split]]],
    ),
    "ham10000": DatasetFormat("ham10000", _load_ham10000, lambda c: ["HAM10000_metadata.csv"]),
    "chexpert": DatasetFormat(
        "chexpert", _load_chexpert, lambda c: ["train.csv", "valid.csv", c.chexpert.demographics.as_posix()]
    ),
}


def get_format(name: str) -> DatasetFormat:
    """The adapter of a format name.

    Raises:
        DatasetError: for a format no adapter reads.
    """
    if name not in FORMATS:
        raise DatasetError(f"unknown dataset format '{name}' (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def load_dataset(config: DataConfig, root: str | Path | None = None) -> LoadedDataset:
    """Read a dataset with its format's adapter.

    Args:
        config: The data section (format, splits, attributes, format options).
        root: The dataset folder; ``None``: ``config.path``.

    Raises:
        DatasetError: if the folder or a file the format needs is missing or unreadable.
    """
    return get_format(config.format).load(Path(root if root is not None else config.path), config)
