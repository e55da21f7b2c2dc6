"""The FairDiffusion retraining pipeline: five stages, in order, nothing else."""

from __future__ import annotations

from prefect import flow

from fairdiffusion.config import load_config
from fairdiffusion.registry.lineage import PromotionOutcome
from tasks.data import load_samples, read_champion, skip_if_unchanged, version_base_model, version_data
from tasks.evaluate import evaluate_candidate
from tasks.promote import promote_if_fair
from tasks.tracking import close_tracking_run, open_tracking_run
from tasks.train import train_candidate
from tasks.validate import validate_data


@flow(name="fairdiffusion-pipeline", log_prints=True)
def fairdiffusion_pipeline(config_path: str = "configs/demo.yaml", force: bool = False) -> PromotionOutcome:
    """Data version -> validation -> training -> evaluation -> gate and promotion.

    When the data version and the config are those the current champion was trained
    on, the run records that it skipped, and why, and trains nothing (unless ``force``).
    """
    config = load_config(config_path)
    data_version = version_data(config)
    base_version = version_base_model(config)
    champion = read_champion(config)
    run_id = open_tracking_run(config, data_version, base_version)
    try:
        skipped = skip_if_unchanged(config, data_version, champion, run_id, force)
        if skipped is not None:
            return skipped
        dataset = load_samples(config)
        validate_data(dataset, config, run_id, champion)
        training = train_candidate(dataset.samples, config, run_id)
        report = evaluate_candidate(training, dataset.samples, config, run_id, data_version.dvc_md5)
        outcome = promote_if_fair(training, report, config, run_id)
    except BaseException:
        close_tracking_run(config, run_id, "FAILED")
        raise
    close_tracking_run(config, run_id, "FINISHED")
    return outcome


if __name__ == "__main__":
    fairdiffusion_pipeline()
