"""Self-consuming retraining (Mayer et al. 2024): N generations over the pipeline's own tasks.

Generation 0 trains on the real data; each later one on the images its predecessor
generated for the training prompts, mixed with real data by the regime, and every one
is evaluated on the same real test set and judged by the gate's MADness guard against
generation 0. Nothing is registered or promoted.
"""

from __future__ import annotations

from collections.abc import Mapping

from prefect import flow

from fairdiffusion.config import PipelineConfig, load_config
from fairdiffusion.data.generations import REGIMES, SyntheticBatch
from fairdiffusion.registry.generations import (
    GenerationSummary,
    format_generations,
    generation_config,
    summarise_generation,
)
from flows.user_errors import log_user_errors_as_one_line
from tasks.data import load_samples, version_base_model, version_data
from tasks.evaluate import evaluate_candidate
from tasks.generations import (
    generate_training_images,
    judge_generation,
    open_generation_run,
    plot_generations,
    write_generation_data,
)
from tasks.tracking import close_tracking_run
from tasks.train import train_candidate
from tasks.validate import validate_data


@flow(name="fairdiffusion-generations", log_prints=True)
def fairdiffusion_generations(
    config_path: str = "configs/demo.yaml", generations: int = 3, regime: str = "augment"
) -> list[GenerationSummary]:
    """Generation 0 on real data, then ``generations - 1`` generations retrained on their predecessors' images."""
    log_user_errors_as_one_line()
    if regime not in REGIMES:
        raise ValueError(f"regime '{regime}': must be one of {', '.join(REGIMES)}")
    config = load_config(config_path)
    data_md5 = version_data(config).dvc_md5
    version_base_model(config)
    real = load_samples(config).samples
    summaries: list[GenerationSummary] = []
    batches: list[SyntheticBatch] = []
    model_dir, first_metrics = "", None
    for generation in range(generations):
        data_dir = None
        if generation > 0:
            batch = generate_training_images(config, real, model_dir, generation, summaries[-1].run_id)
            batches = [*batches, batch] if regime == "augment" else [batch]
            data_dir = write_generation_data(config, generation, regime, real, batches)
        parent = summaries[-1].run_id if summaries else None
        gen_config = generation_config(config, generation, data_dir)
        parent_model = model_dir or None
        summary, model_dir, metrics = _one_generation(
            gen_config, generation, regime, data_md5, (parent, parent_model), first_metrics
        )
        first_metrics = first_metrics or metrics
        summaries.append(summary)
        print(format_generations([summary]))
    print(format_generations(summaries))
    for path in plot_generations(config, summaries):
        print(f"curves: {path}")
    return summaries


def _one_generation(
    config: PipelineConfig,
    generation: int,
    regime: str,
    data_md5: str,
    parent: tuple[str | None, str | None],
    generation0: Mapping[str, float] | None,
) -> tuple[GenerationSummary, str, dict[str, float]]:
    """One generation as the pipeline runs a candidate: validate, train, evaluate; then the guard.

    ``parent``: the run and the model folder of the generation whose images it trains on.
    """
    parent_run_id, parent_model_dir = parent
    run_id = open_generation_run(config, generation, regime, data_md5, parent_run_id, parent_model_dir)
    try:
        dataset = load_samples(config)
        validation = validate_data(dataset, config, run_id)
        share = float(validation.synthetic.get("train_fraction", 0.0))
        training = train_candidate(dataset.samples, config, run_id)
        report = evaluate_candidate(training, dataset.samples, config, run_id, data_md5)
        decision = judge_generation(config, run_id, report.metrics, generation0, report.extractor, share)
    except BaseException:
        close_tracking_run(config, run_id, "FAILED")
        raise
    close_tracking_run(config, run_id, "FINISHED")
    summary = summarise_generation(
        config, generation, run_id, parent_run_id, regime, share, report.metrics, decision, report.extractor
    )
    return summary, training.model_dir, report.metrics


if __name__ == "__main__":
    fairdiffusion_generations()
