"""Shared fixtures: a small synthetic FairGenMed dataset and a tiny Stable Diffusion pipeline.

Both are written once per session into a temporary folder; tests that mutate the
dataset copy it first (see ``copy_dataset``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fairdiffusion.demo_data import DemoDatasetSpec, generate_demo_dataset

#: Seed 131 gives every group at least 4 subjects in train+val and in test:
#: train+val race Asian 7 / Black 11 / White 32, Female 26 / Male 24, Non-Hispanic 45 / Hispanic 5;
#: test race Asian 7 / Black 7 / White 16, Female 16 / Male 14, Non-Hispanic 26 / Hispanic 4.
DEMO_SPEC = DemoDatasetSpec(train=40, val=10, test=30, image_size=32, seed=131)
#: The smallest subgroup of DEMO_SPEC (test Hispanic); validation.min_group_count above it fails.
DEMO_MIN_GROUP = 4


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic FairGenMed folder (train 40, val 10, test 30; 32x32 images). Do not modify."""
    return generate_demo_dataset(tmp_path_factory.mktemp("fairgenmed") / "data", DEMO_SPEC)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Stable Diffusion pipeline in diffusers layout. Do not modify."""
    from fairdiffusion.models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def demo_min_group_count() -> int:
    """The smallest subgroup size of ``demo_dataset``: a ``validation.min_group_count`` it just meets."""
    return DEMO_MIN_GROUP


@pytest.fixture
def copy_dataset(demo_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of ``demo_dataset`` that a test may corrupt."""
    return Path(shutil.copytree(demo_dataset, tmp_path / "data"))
