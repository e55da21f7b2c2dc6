"""Tests for the data and validation sections of the config: format defaults and bad keys."""

from __future__ import annotations

import pytest

from fairdiffusion.config import FAIRGENMED_ATTRIBUTES, PipelineConfig, parse_config
from fairdiffusion.errors import ConfigError


def test_defaults_keep_the_fairgenmed_demo_unchanged() -> None:
    config = PipelineConfig()
    assert config.data.format == "fairgenmed" and config.data.attributes == FAIRGENMED_ATTRIBUTES
    validation = config.validation
    assert (validation.max_synthetic_fraction, validation.max_share_shift, validation.min_class_count) == (0.2, 0.05, 1)
    assert validation.intersections == [] and validation.acknowledged_shifts == {}
    assert validation.intensity_range == (0, 255) and validation.image_dtype == "uint8"


@pytest.mark.parametrize(
    ("format_name", "attributes"),
    [
        ("ham10000", {"sex": ["Female", "Male"], "age_group": ["under 60", "60 or older"]}),
        ("chexpert", {"sex": ["Female", "Male"], "race": ["Asian", "Black", "White"]}),
    ],
)
def test_each_format_brings_its_attributes(format_name: str, attributes: dict[str, list[str]]) -> None:
    assert parse_config({"data": {"format": format_name}}).data.attributes == attributes


def test_acknowledged_shifts_and_intersections_parse() -> None:
    config = parse_config(
        {
            "validation": {
                "intersections": [["race", "gender"]],
                "acknowledged_shifts": {"race=Asian": "2025-03: new site in Osaka"},
                "min_group_counts": {"race=Asian&gender=Female": 2},
            }
        }
    )
    assert config.validation.acknowledged_shifts == {"race=Asian": "2025-03: new site in Osaka"}


@pytest.mark.parametrize(
    ("document", "fragments"),
    [
        ({"data": {"format": "dicom"}}, ["data.format"]),
        ({"data": {"format": "ham10000", "attributes": {"race": ["a", "b"]}}}, ["data.attributes", "'race'"]),
        ({"data": {"format": "ham10000", "train_splits": ["train"]}}, ["split_fractions", "['test', 'train']"]),
        ({"data": {"split_fractions": {"train": 0.5, "test": 0.2}}}, ["data.split_fractions", "add up to 1"]),
        ({"data": {"chexpert": {"target": "Flu"}}}, ["data.chexpert.target"]),
        ({"data": {"chexpert": {"views": []}}}, ["data.chexpert.views"]),
        ({"validation": {"max_synthetic_fraction": 1.5}}, ["validation.max_synthetic_fraction"]),
        ({"validation": {"max_share_shift": -0.1}}, ["validation.max_share_shift"]),
        ({"validation": {"intersections": [["race"]]}}, ["validation.intersections", "two or more"]),
        ({"validation": {"intersections": [["race", "age"]]}}, ["validation.intersections", "['age']"]),
        ({"validation": {"acknowledged_shifts": {"Asian": "why"}}}, ["validation.acknowledged_shifts", "race=Asian"]),
        ({"validation": {"acknowledged_shifts": {"race=Asian": " "}}}, ["validation.acknowledged_shifts", "reason"]),
        ({"validation": {"acknowledged_shifts": {"race=Martian": "x"}}}, ["validation.acknowledged_shifts", "Martian"]),
        ({"validation": {"min_group_counts": {"race=Asain": 3}}}, ["validation.min_group_counts", "race=Asain"]),
        ({"validation": {"intensity_range": [200, 10]}}, ["validation", "intensity_range [200, 10] is empty"]),
        ({"validation": {"min_class_count": 0}}, ["validation.min_class_count"]),
    ],
)
def test_bad_data_and_validation_keys_are_named(document: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(document, source="bad.yaml")
    message = str(info.value)
    assert message.startswith("bad.yaml: invalid configuration")
    for fragment in fragments:
        assert fragment in message, message
