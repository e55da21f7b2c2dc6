"""Tests for the format registry: dispatch by ``data.format`` and the hash split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from fairdiffusion.config import parse_config
from fairdiffusion.data.formats import FORMATS, get_format, load_dataset
from fairdiffusion.data.table import assign_split, limit_per_split
from fairdiffusion.errors import DatasetError

FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def test_every_configurable_format_has_an_adapter() -> None:
    from typing import get_args

    from fairdiffusion.config import DataConfig

    assert set(get_args(DataConfig.model_fields["format"].annotation)) == set(FORMATS)
    with pytest.raises(DatasetError, match="unknown dataset format 'dicom'"):
        get_format("dicom")


def test_assign_split_is_deterministic_and_follows_the_fractions() -> None:
    splits = [assign_split(f"HAM_{i:07d}", FRACTIONS, seed=0) for i in range(5000)]
    assert splits == [assign_split(f"HAM_{i:07d}", FRACTIONS, seed=0) for i in range(5000)]
    shares = {name: count / 5000 for name, count in Counter(splits).items()}
    for name, fraction in FRACTIONS.items():
        assert shares[name] == pytest.approx(fraction, abs=0.025)
    other_seed = [assign_split(f"HAM_{i:07d}", FRACTIONS, seed=1) for i in range(5000)]
    assert other_seed != splits


def test_limit_per_split_keeps_the_first_ids_of_each_split() -> None:
    samples = pd.DataFrame({"subject": ["c", "a", "b", "d", "e"], "split": ["train", "train", "train", "test", "test"]})
    kept = limit_per_split(samples, 2)
    assert sorted(kept["subject"]) == ["a", "b", "d", "e"]
    assert limit_per_split(samples, None) is samples


def test_load_dataset_dispatches_on_the_format(valid_dataset: Path, ham10000_dataset: Path) -> None:
    fairgenmed = load_dataset(parse_config({"data": {"path": str(valid_dataset)}}).data)
    assert fairgenmed.schema.format == "fairgenmed" and len(fairgenmed.samples) == 80
    assert fairgenmed.schema.main_label == "glaucoma" and fairgenmed.schema.npz_images
    ham = load_dataset(parse_config({"data": {"format": "ham10000", "path": str(ham10000_dataset)}}).data)
    assert ham.schema.format == "ham10000" and ham.schema.main_label == "diagnosis" and len(ham.samples) == 160


def test_max_subjects_per_split_applies_to_every_format(ham10000_dataset: Path) -> None:
    data = parse_config({"data": {"format": "ham10000", "max_subjects_per_split": 4}}).data
    assert load_dataset(data, ham10000_dataset).samples["split"].value_counts().to_dict() == {
        "train": 4,
        "val": 4,
        "test": 4,
    }
