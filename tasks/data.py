"""Stage 1: the data version, pulled and checked against what DVC records."""

from __future__ import annotations

import pandas as pd
from prefect import task

from fairdiffusion.config import PipelineConfig
from fairdiffusion.fairgenmed import load_fairgenmed
from fairdiffusion.versioning import DataVersion, pull_data, resolve_data_version, verify_data


@task(name="version_data", retries=2, retry_delay_seconds=5)
def version_data(config: PipelineConfig) -> DataVersion:
    """Resolve the version ``data.dvc`` names, ``dvc pull`` it and refuse a modified copy."""
    version = resolve_data_version(config.data.dvc_file)
    if config.data.pull:
        verify_data(config.data.dvc_file, allow_missing=True)  # never pull over local edits
        pull_data(config.data.dvc_file, config.data.remote)
    verify_data(config.data.dvc_file)
    return version


@task(name="load_samples")
def load_samples(config: PipelineConfig) -> pd.DataFrame:
    """Read the dataset into the sample table (train, val and test splits)."""
    splits = [*config.data.train_splits, config.data.test_split]
    return load_fairgenmed(config.data.path, splits, config.data.max_subjects_per_split)
