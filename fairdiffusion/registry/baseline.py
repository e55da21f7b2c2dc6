"""The baseline a candidate's evaluation is shown beside: a ``method: baseline`` run on the same data.

Evaluation never reads the registry; this lookup hands it the baseline's flat metrics
(:class:`~fairdiffusion.evaluation.comparison.BaselineRun`), and the evaluation task passes
them on.
"""

from __future__ import annotations

from collections.abc import Mapping

from fairdiffusion.config import TrackingConfig
from fairdiffusion.evaluation.comparison import BaselineRun
from fairdiffusion.evaluation.metric_keys import NUM_SAMPLES
from fairdiffusion.evaluation.slices import OVERALL
from fairdiffusion.registry import schema
from fairdiffusion.registry.promotion import find_champion, search_literal
from fairdiffusion.tracking import mlflow_client

#: The ``training.method`` of a run without fairness intervention (the ``fd.training.method`` tag).
BASELINE_METHOD = "baseline"
# Sibling runs looked at, newest first, for one that finished its evaluation.
_SEARCHED_RUNS = 100


def find_baseline_run(tracking: TrackingConfig, data_md5: str, exclude_run_id: str | None = None) -> BaselineRun | None:
    """The champion if it is an evaluated baseline run on ``data_md5``, else the newest such run of the experiment.

    Args:
        tracking: The tracking store and experiment.
        data_md5: The candidate's data version (the ``fd.data.dvc_md5`` tag).
        exclude_run_id: The candidate's own run, never its own baseline.

    Returns:
        The baseline run and its flat metrics, or ``None`` when no evaluated baseline run
        on that data version exists.
    """
    champion = find_champion(tracking)
    client = mlflow_client(tracking)
    if champion is not None and champion.run_id != exclude_run_id and champion.data_md5 == data_md5:
        tags = client.get_run(champion.run_id).data.tags
        if tags.get(schema.TRAINING_METHOD) == BASELINE_METHOD and _evaluated(champion.metrics):
            return BaselineRun(champion.run_id, f"champion v{champion.version}", dict(champion.metrics))
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return None
    query = (
        f"tags.`{schema.TRAINING_METHOD}` = '{BASELINE_METHOD}' "
        f"and tags.`{schema.DATA_MD5}` = {search_literal(data_md5, 'data md5')}"
    )
    runs = client.search_runs(
        [experiment.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=_SEARCHED_RUNS
    )
    for run in runs:
        if run.info.run_id != exclude_run_id and _evaluated(run.data.metrics):
            source = f"latest baseline run of experiment '{tracking.experiment}'"
            return BaselineRun(str(run.info.run_id), source, dict(run.data.metrics))
    return None


def _evaluated(metrics: Mapping[str, float]) -> bool:
    return f"{NUM_SAMPLES}/{OVERALL}" in metrics
