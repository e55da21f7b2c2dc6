"""Stage 2: Great Expectations validation; a failure stops the flow before training."""

from __future__ import annotations

import pandas as pd
from prefect import task

from fairdiffusion import lineage
from fairdiffusion.config import PipelineConfig
from fairdiffusion.errors import ValidationFailed
from fairdiffusion.validation import ValidationResult, validate_dataset


@task(name="validate_data")
def validate_data(samples: pd.DataFrame, config: PipelineConfig, run_id: str) -> ValidationResult:
    """Run the suites, record the result on the run, and raise if any expectation failed."""
    result = validate_dataset(
        samples,
        config.data.attributes,
        config.validation,
        config.data.train_splits,
        config.data.test_split,
    )
    lineage.record_validation(config, run_id, result)
    if not result.success:
        raise ValidationFailed(result.summary(), result)
    return result
