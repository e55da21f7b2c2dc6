"""The one validation entry point: the ``fairdiffusion validate`` command and the pipeline's task both call it."""

from __future__ import annotations

from pathlib import Path

from fairdiffusion.config import DataConfig, ValidationConfig
from fairdiffusion.data.formats import load_dataset
from fairdiffusion.data.table import LoadedDataset
from fairdiffusion.validation.result import ReferenceCounts, ValidationResult
from fairdiffusion.validation.suites import validate_dataset


def run_validation(
    data: DataConfig,
    validation: ValidationConfig,
    *,
    dataset: LoadedDataset | None = None,
    reference: ReferenceCounts | None = None,
    docs_dir: str | Path | None = None,
) -> ValidationResult:
    """Validate the dataset that ``data`` names with the Great Expectations suites.

    Args:
        data: Where the dataset is, its format, attributes and splits.
        validation: Thresholds of the suites.
        dataset: The dataset already read by its format's adapter; ``None`` reads it.
        reference: Group counts of the champion's data, to compare group shares with.
        docs_dir: Also write Great Expectations Data Docs (HTML) here.

    Returns:
        The result; ``success`` is false when any expectation failed.

    Raises:
        DatasetError: if the dataset cannot be read.
    """
    if dataset is None:
        dataset = load_dataset(data)
    return validate_dataset(
        dataset.samples,
        data.attributes,
        validation,
        data.train_splits,
        data.test_split,
        schema=dataset.schema,
        excluded=dataset.excluded,
        reference=reference,
        docs_dir=docs_dir,
    )
