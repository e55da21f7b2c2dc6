"""The FairDiffusion retraining pipeline: five stages, in order, nothing else."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from fairdiffusion.config import load_config, with_run_output_dirs
from fairdiffusion.data.versioning import require_data_md5
from fairdiffusion.registry.lineage import PromotionOutcome
from flows.events import emit_awaiting_approval
from flows.states import final_state
from flows.user_errors import log_user_errors_as_one_line
from tasks.data import load_samples, read_champion, skip_if_unchanged, version_base_model, version_data
from tasks.evaluate import evaluate_candidate
from tasks.promote import promote_if_fair
from tasks.publish import publish_outcome
from tasks.tracking import close_tracking_run, open_tracking_run
from tasks.train import train_candidate
from tasks.validate import validate_data


@flow(name="fairdiffusion-pipeline", log_prints=True)
def fairdiffusion_pipeline(
    config_path: str = "configs/demo.yaml",
    force: bool = False,
    per_run_outputs: bool = False,
    data_md5: str | None = None,
) -> PromotionOutcome:
    """Data version -> validation -> training -> evaluation -> gate and promotion.

    When the data version and the config are those the current champion was trained
    on, the run records that it skipped, and why, and trains nothing (unless ``force``).
    The run ends ``Completed``, ``AwaitingApproval``, ``Skipped`` or ``Rejected`` (a
    Failed state: calling the flow raises ``GateRejected``, which carries the outcome).

    ``per_run_outputs`` (on in the deployment): training and evaluation write under
    ``<output_dir>/<flow run id>``, so concurrent or successive runs never share a folder;
    off, a rerun finds the previous run's checkpoints (``training.resume: latest``).

    ``data_md5`` (set by the deployment's trigger from a ``fairdiffusion.data.published``
    event): the data version the run was started for; the run stops, before anything is
    recorded, if the checkout's ``.dvc`` file records another.
    """
    log_user_errors_as_one_line()
    config = load_config(config_path)
    data_version = version_data(config)
    if data_md5:
        require_data_md5(data_version, data_md5)
    base_version = version_base_model(config)
    champion = read_champion(config)
    run_id = open_tracking_run(config, data_version, base_version)
    try:
        outcome = skip_if_unchanged(config, data_version, champion, run_id, force)  # closes a skipped run
        if outcome is None:
            # After the skip check: the champion's config fingerprint names the shared folders.
            config = with_run_output_dirs(config, flow_run.get_id() or run_id) if per_run_outputs else config
            dataset = load_samples(config)
            validate_data(dataset, config, run_id, champion)
            training = train_candidate(dataset.samples, config, run_id)
            report = evaluate_candidate(training, dataset.samples, config, run_id, data_version.dvc_md5)
            outcome = promote_if_fair(training, report, config, run_id)
            close_tracking_run(config, run_id, "FINISHED")
    except BaseException:
        close_tracking_run(config, run_id, "FAILED")
        raise
    publish_outcome(config, outcome)
    emit_awaiting_approval(outcome)  # the event an approver's automation or notification listens for
    # A returned state becomes the run's final state; callers of the flow get its result.
    return final_state(outcome)  # type: ignore[return-value]


if __name__ == "__main__":
    fairdiffusion_pipeline()
