"""Stage 1: the data version, pulled and checked against what DVC records, and compared with the champion's."""

from __future__ import annotations

from prefect import get_run_logger, task

from fairdiffusion.config import PipelineConfig
from fairdiffusion.data.formats import load_dataset
from fairdiffusion.data.table import LoadedDataset
from fairdiffusion.data.versioning import DataVersion, pull_data, resolve_data_version, verify_data
from fairdiffusion.registry import lineage
from fairdiffusion.registry.lineage import PromotionOutcome
from fairdiffusion.registry.policy import check_fidelity_attributes
from fairdiffusion.registry.skip import ChampionBaseline, config_fingerprint, decide_skip


@task(name="version_data", retries=2, retry_delay_seconds=5)
def version_data(config: PipelineConfig) -> DataVersion:
    """Resolve the version ``data.dvc`` names, ``dvc pull`` it and refuse a modified copy."""
    version = resolve_data_version(config.data.dvc_file)
    if config.data.pull:
        verify_data(config.data.dvc_file, allow_missing=True)  # never pull over local edits
        pull_data(config.data.dvc_file, config.data.remote)
    verify_data(config.data.dvc_file)
    return version


@task(name="version_base_model", retries=2, retry_delay_seconds=5)
def version_base_model(config: PipelineConfig) -> DataVersion | None:
    """The version ``model.dvc_file`` names, pulled and checked as the data is (``None``: not DVC-versioned)."""
    dvc_file = config.model.dvc_file
    if dvc_file is None:
        return None
    version = resolve_data_version(dvc_file)
    if config.model.pull:
        verify_data(dvc_file, allow_missing=True)  # never pull over local edits
        pull_data(dvc_file, config.data.remote)
    verify_data(dvc_file)
    return version


@task(name="read_champion", retries=2, retry_delay_seconds=2)
def read_champion(config: PipelineConfig) -> ChampionBaseline | None:
    """The data, config and group counts the current champion was trained on (``None``: no champion)."""
    return lineage.read_champion_baseline(config)


@task(name="skip_if_unchanged", retries=2, retry_delay_seconds=2)
def skip_if_unchanged(
    config: PipelineConfig,
    data_version: DataVersion,
    champion: ChampionBaseline | None,
    run_id: str,
    force: bool = False,
) -> PromotionOutcome | None:
    """Record whether this run trains; a skipped run's outcome (nothing trained) is returned."""
    decision = decide_skip(data_version.dvc_md5, config_fingerprint(config), champion, force)
    get_run_logger().info("%s: %s", "skipping" if decision.skip else "training", decision.reason)
    return lineage.record_skip_decision(config, run_id, decision)


@task(name="load_samples")
def load_samples(config: PipelineConfig) -> LoadedDataset:
    """Read the dataset with its format's adapter (train, val and test splits; exclusions).

    The gate policy's fidelity rules must name columns of it: checked here, before training.
    """
    dataset = load_dataset(config.data)
    check_fidelity_attributes(config.gate.policy, dataset.samples.columns)
    return dataset
