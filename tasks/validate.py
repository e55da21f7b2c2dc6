"""Stage 2: Great Expectations validation; a failure stops the flow before training."""

from __future__ import annotations

import tempfile
from dataclasses import replace

from prefect import task

from fairdiffusion.config import PipelineConfig
from fairdiffusion.data.table import LoadedDataset
from fairdiffusion.errors import ValidationFailed
from fairdiffusion.registry import lineage
from fairdiffusion.registry.skip import ChampionBaseline
from fairdiffusion.validation.result import ReferenceCounts, ValidationResult
from fairdiffusion.validation.run import run_validation


@task(name="validate_data")
def validate_data(
    dataset: LoadedDataset, config: PipelineConfig, run_id: str, champion: ChampionBaseline | None = None
) -> ValidationResult:
    """Run the suites (against the champion's group shares), record result and Data Docs, raise on failure."""
    reference = None
    if champion is not None and champion.group_counts:
        label = f"champion v{champion.version} (data md5 {(champion.data_md5 or '?')[:12]})"
        reference = ReferenceCounts(label, champion.group_counts)
    with tempfile.TemporaryDirectory(prefix="fd-data-docs-") as docs:
        result = run_validation(config.data, config.validation, dataset=dataset, reference=reference, docs_dir=docs)
        lineage.record_validation(config, run_id, result)
    result = replace(result, data_docs=f"runs:/{run_id}/validation/data_docs" if result.data_docs else None)
    if not result.success:
        raise ValidationFailed(result.summary(), result)
    return result
