"""The ``fairdiffusion`` command line.

Errors caused by input (:class:`FairDiffusionError`) are printed as one message and a
non-zero exit, never a traceback. ``run`` and ``demo`` import the Prefect flow inside
the command, so the library package itself never imports Prefect.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click
import typer

from fairdiffusion.config import PipelineConfig, load_config
from fairdiffusion.errors import FairDiffusionError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
app.add_typer(data_app, name="data")

DEMO_CONFIG = Path("configs/demo.yaml")


def _config_or_default(config: Path | None) -> PipelineConfig:
    if config is not None:
        return load_config(config)
    return load_config(DEMO_CONFIG) if DEMO_CONFIG.is_file() else PipelineConfig()


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failed task's traceback; for bad input the message is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FairDiffusionError):
            record.exc_info, record.exc_text = None, None
        return True


def _run_pipeline(config: Path) -> None:
    load_config(config)  # fail on a bad config before Prefect starts
    from flows.pipeline import fairdiffusion_pipeline

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForUserErrors())

    outcome = fairdiffusion_pipeline(config_path=str(config))
    cfg = load_config(config)
    uri = cfg.tracking.resolved_tracking_uri()
    verdict = "PASSED: promoted to champion" if outcome.promoted else "FAILED: not promoted"
    typer.echo("")
    typer.echo(f"Gate decision  : {verdict} ({outcome.model_name} v{outcome.version})")
    for reason in outcome.reasons:
        typer.echo(f"  - {reason}")
    if outcome.compared_with_version:
        typer.echo(f"Compared with  : champion v{outcome.compared_with_version}")
    typer.echo(f"Report         : {outcome.report_path}")
    typer.echo(f"MLflow run     : {outcome.run_id}")
    typer.echo(f"Lineage        : fairdiffusion audit --model {outcome.model_name} --version {outcome.version}")
    typer.echo(f"MLflow UI      : mlflow ui --backend-store-uri {uri} --port 5000")
    typer.echo(
        f"                 then open http://127.0.0.1:5000/#/models/{outcome.model_name}/versions/{outcome.version}"
    )


@app.command()
def demo() -> None:
    """Run the whole pipeline on the bundled synthetic demo data (CPU, embedded services)."""
    _run_pipeline(DEMO_CONFIG)


@app.command()
def run(config: Path = typer.Option(..., "--config", "-c", help="Pipeline YAML config.")) -> None:
    """Run the whole pipeline with a config file."""
    _run_pipeline(config)


@app.command()
def validate(
    data_dir: Path = typer.Argument(..., help="Dataset folder (FairGenMed layout)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Config for thresholds and attributes."),
) -> None:
    """Validate a dataset with the Great Expectations suites; exit 1 on any failure."""
    from fairdiffusion.fairgenmed import load_fairgenmed
    from fairdiffusion.validation import validate_dataset

    cfg = _config_or_default(config)
    splits = [*cfg.data.train_splits, cfg.data.test_split]
    samples = load_fairgenmed(data_dir, splits, cfg.data.max_subjects_per_split)
    result = validate_dataset(samples, cfg.data.attributes, cfg.validation, cfg.data.train_splits, cfg.data.test_split)
    typer.echo(result.summary(), err=not result.success)
    if not result.success:
        raise typer.Exit(1)


@data_app.command("show")
def data_show(
    data_dir: Path = typer.Argument(..., help="Dataset folder (FairGenMed layout)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per subject, one per line."),
    config: Path | None = typer.Option(None, "--config", "-c"),
) -> None:
    """Show the sample table a run would train and evaluate on."""
    from fairdiffusion.fairgenmed import load_fairgenmed

    cfg = _config_or_default(config)
    samples = load_fairgenmed(data_dir, [*cfg.data.train_splits, cfg.data.test_split], cfg.data.max_subjects_per_split)
    columns = ["subject", "split", "prompt", *cfg.data.attributes]
    if as_json:
        for record in samples[columns].to_dict(orient="records"):
            typer.echo(json.dumps({k: (None if v != v else v) for k, v in record.items()}))
        return
    with_prompt = samples[columns]
    typer.echo(with_prompt.to_string(index=False, max_colwidth=90))
    typer.echo(
        f"\n{len(samples)} subjects; " + ", ".join(f"{s}: {n}" for s, n in samples["split"].value_counts().items())
    )


def _print_table(lineage: dict[str, object], prefix: str = "") -> None:
    for key, value in lineage.items():
        if isinstance(value, dict) and key != "config":
            typer.echo(f"{prefix}{key}:")
            _print_table(value, prefix + "  ")
        elif key == "config":
            typer.echo(f"{prefix}{key}: (the resolved config; see --json)")
        else:
            typer.echo(f"{prefix}{key}: {value}")


@app.command()
def audit(
    model: str | None = typer.Option(None, "--model", help="Registered model name (default: the config's)."),
    version: str | None = typer.Option(None, "--version", help="Model version number."),
    alias: str | None = typer.Option(None, "--alias", help="Model alias, e.g. champion."),
    as_json: bool = typer.Option(False, "--json", help="Print the lineage as one JSON object."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Config naming the tracking URI."),
) -> None:
    """Print the lineage of a registered model version, read from MLflow alone."""
    from fairdiffusion.registry import read_lineage

    if (version is None) == (alias is None):
        raise FairDiffusionError("audit: give exactly one of --version N or --alias NAME")
    cfg = _config_or_default(config)
    tracking = cfg.tracking if model is None else cfg.tracking.model_copy(update={"model_name": model})
    lineage = read_lineage(tracking, version=version, alias=alias)
    if as_json:
        typer.echo(json.dumps(lineage, indent=2, sort_keys=True, default=str))
    else:
        _print_table(lineage)


def main() -> None:
    """Console entry point: user errors become one line and exit code 1."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Offline machines: no telemetry calls, no progress bars in piped output.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        # Without standalone mode, click returns (not raises) the code of a typer.Exit;
        # dropping it would turn e.g. a failed `validate` into exit status 0.
        code = app(standalone_mode=False)
    except FairDiffusionError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)
    except click.exceptions.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.exceptions.Exit as error:
        sys.exit(error.exit_code)
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
