"""The ``fairdiffusion`` command line.

Errors caused by input (:class:`FairDiffusionError`) are printed as one message and a
non-zero exit, never a traceback. ``run`` and ``demo`` import the Prefect flow inside
the command, so the library package itself never imports Prefect.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, cast

import typer

from fairdiffusion.config import PipelineConfig, TrackingConfig, config_to_dict, load_config, parse_config
from fairdiffusion.errors import FairDiffusionError, GateRejected
from fairdiffusion.models.notices import settle_image_processor_fallbacks
from fairdiffusion.registry import schema

if TYPE_CHECKING:
    from fairdiffusion.registry.lineage import PromotionOutcome

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(no_args_is_help=True, help="Inspect, compare and publish datasets.")
app.add_typer(data_app, name="data")
base_app = typer.Typer(no_args_is_help=True, help="The base model the demo fine-tunes.")
app.add_typer(base_app, name="base")

DEMO_CONFIG = Path("configs/demo.yaml")


def _print_version(requested: bool) -> None:
    if requested:
        typer.echo(f"fairdiffusion {metadata.version('fairdiffusion')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Fairness-gated retraining of text-to-image diffusion models (FairDiffusion, Luo et al. 2024).

    Exit status: 0 success (or a run that skipped); 1 bad input, a failed validation or a rejected gate; 2 usage.

    Without --config a verb takes the library's defaults (fairdiffusion/config.py), never a file in this folder.

    Only `demo` reads a file by itself: configs/demo.yaml.
    """


def _config_or_default(config: Path | None) -> PipelineConfig:
    """The named config, else the library's defaults: never a file found in the working directory."""
    return load_config(config) if config is not None else PipelineConfig()


def _run_pipeline(config: Path, force: bool = False, as_json: bool = False) -> None:
    cfg = load_config(config)  # fail on a bad config before Prefect starts
    # With --json, stdout carries the outcome alone; anything the flow prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        outcome = _pipeline_outcome(config, force)
    uri = cfg.tracking.resolved_tracking_uri()
    if as_json:
        typer.echo(json.dumps({**outcome.to_dict(), "tracking_uri": uri}, indent=2))
    elif outcome.status == schema.STATUS_SKIPPED:
        _print_skip(outcome)
    else:
        _print_decision(outcome, uri)
    if outcome.status == schema.STATUS_REJECTED:
        raise typer.Exit(1)  # a rejected candidate fails the command, as a failed validation does


def _pipeline_outcome(config: Path, force: bool) -> PromotionOutcome:
    """The flow's outcome; a rejected gate ends the flow ``Rejected`` and its error carries the outcome."""
    settle_image_processor_fallbacks()  # before diffusers is imported
    from flows.pipeline import fairdiffusion_pipeline

    try:
        return fairdiffusion_pipeline(config_path=str(config), force=force)
    except GateRejected as rejected:
        if rejected.outcome is None:
            raise
        return cast("PromotionOutcome", rejected.outcome)


def _print_skip(outcome: PromotionOutcome) -> None:
    typer.echo("")
    typer.echo("Skipped        : nothing trained, nothing registered")
    for reason in outcome.reasons:
        typer.echo(f"  - {reason}")
    typer.echo(f"Champion       : {outcome.model_name} v{outcome.version} (unchanged)")
    typer.echo(f"MLflow run     : {outcome.run_id} (tags {schema.SKIPPED}=true, {schema.SKIP_REASON})")
    typer.echo("Retrain anyway : add --force (fairdiffusion demo --force, or run --config FILE --force)")


def _print_decision(outcome: PromotionOutcome, uri: str) -> None:
    verdict = {
        schema.STATUS_CHAMPION: "PASSED: promoted to champion",
        schema.STATUS_AWAITING_APPROVAL: "PASSED: awaiting approval (fairdiffusion approve --version N --reason TEXT)",
        schema.STATUS_REJECTED: "FAILED: not promoted",
    }[outcome.status]
    typer.echo("")
    typer.echo(f"Gate decision  : {verdict} ({outcome.model_name} v{outcome.version})")
    for reason in outcome.reasons:
        typer.echo(f"  - {reason}")
    if outcome.compared_with_version:
        typer.echo(f"Compared with  : champion v{outcome.compared_with_version}")
    typer.echo(f"Report         : {outcome.report_path}")
    typer.echo(f"MLflow run     : {outcome.run_id}")
    typer.echo(f"Lineage        : fairdiffusion audit --model {outcome.model_name} --version {outcome.version}")
    typer.echo(f"Audit page     : fairdiffusion audit --version {outcome.version} --report outputs/audit.html")
    typer.echo(f"MLflow UI      : mlflow ui --backend-store-uri {uri} --port 5000")
    typer.echo(
        f"                 then open http://127.0.0.1:5000/#/models/{outcome.model_name}/versions/{outcome.version}"
    )


_FORCE = typer.Option(False, "--force", help="Train even if data and config are those the champion was trained on.")
_OUTCOME_JSON = typer.Option(
    False, "--json", help="Print the outcome (status, version, run id, gate passed, reasons) as JSON on stdout."
)


@app.command()
def demo(force: bool = _FORCE, as_json: bool = _OUTCOME_JSON) -> None:
    """Run the whole pipeline on the bundled synthetic demo data (CPU, embedded services).

    Reads configs/demo.yaml from the current folder (the repository's root, as `make demo` runs it).

    Exit status: 0 promoted, awaiting approval or skipped; 1 a failed validation or a rejected gate.
    """
    _run_pipeline(DEMO_CONFIG, force, as_json)


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="Pipeline YAML config (required)."),
    force: bool = _FORCE,
    as_json: bool = _OUTCOME_JSON,
) -> None:
    """Run the whole pipeline with a config file.

    Exit status: 0 promoted, awaiting approval or skipped; 1 a failed validation or a rejected gate.
    """
    _run_pipeline(config, force, as_json)


@app.command()
def generations(
    config: Path = typer.Option(..., "--config", "-c", help="Pipeline YAML config (required)."),
    count: int = typer.Option(3, "--generations", min=1, help="Generations, the real-data generation 0 included."),
    regime: str = typer.Option("augment", "--regime", help="synthetic-only, augment or fresh."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write every generation's summary here."),
) -> None:
    """Retrain on the model's own images for N generations and print each group's FID, recall and diversity.

    Self-consuming retraining (Mayer et al. 2024): nothing is registered; every generation is an
    MLflow run tagged with its parent's. Regimes other than a small augment need
    generations.max_synthetic_share in the config to lift the synthetic-share ceilings.
    """
    from fairdiffusion.data.generations import REGIMES

    if regime not in REGIMES:
        raise typer.BadParameter(f"'{regime}': one of {', '.join(REGIMES)}", param_hint="--regime")
    load_config(config)  # fail on a bad config before Prefect starts
    settle_image_processor_fallbacks()  # before diffusers is imported
    from flows.generations import fairdiffusion_generations

    summaries = fairdiffusion_generations(config_path=str(config), generations=count, regime=regime)
    if json_path is not None:
        json_path.write_text(json.dumps([s.to_dict() for s in summaries], indent=2, default=str))
        typer.echo(f"Summary JSON   : {json_path}")


_FORMAT = typer.Option(None, "--format", "-f", help="fairgenmed, ham10000 or chexpert (default: the config's).")


def _data_section(cfg: PipelineConfig, data_dir: Path, data_format: str | None) -> PipelineConfig:
    """The config with ``data.path`` replaced, and with ``--format``, ``data.format`` too.

    Another format brings its own attributes, and ``validation.image_shape`` falls back to
    one shape for all images: the config's attributes and shape describe its own format.
    """
    document = config_to_dict(cfg)
    data = dict(document["data"])  # type: ignore[call-overload]
    validation = dict(document["validation"])  # type: ignore[call-overload]
    if data_format is not None and data_format != cfg.data.format:
        data.pop("attributes")
        validation["image_shape"] = None
    data.update(path=str(data_dir), format=data_format or cfg.data.format)
    return parse_config({**document, "data": data, "validation": validation}, source="--format/--config")


@app.command()
def validate(
    data_dir: Path = typer.Argument(..., help="Dataset folder (in the layout of its format)."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Config for thresholds and attributes (default: the library's defaults)."
    ),
    data_format: str | None = _FORMAT,
    docs: Path | None = typer.Option(None, "--docs", help="Also write Great Expectations Data Docs (HTML) here."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Validate a dataset with the Great Expectations suites; exit 1 on any failure.

    Without --config: the library's defaults (fairdiffusion/config.py), whatever the current folder holds.

    validation.image_shape unset: all images share one shape; [H, W] requires that one; any accepts mixed sizes.
    """
    from fairdiffusion.validation.run import run_validation

    cfg = _data_section(_config_or_default(config), data_dir, data_format)
    result = run_validation(cfg.data, cfg.validation, docs_dir=docs)
    if as_json:
        index = str(docs / "index.html") if docs is not None else None
        typer.echo(json.dumps({**result.to_dict(), "data_docs": index}, indent=2))
    else:
        typer.echo(result.summary(), err=not result.success)
        if docs is not None:
            typer.echo(f"Data Docs: {docs / 'index.html'}", err=not result.success)
    if not result.success:
        raise typer.Exit(1)


@data_app.command("show")
def data_show(
    data_dir: Path = typer.Argument(..., help="Dataset folder (in the layout of its format)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per subject, one per line."),
    config: Path | None = typer.Option(None, "--config", "-c"),
    data_format: str | None = _FORMAT,
) -> None:
    """Show the sample table a run would train and evaluate on (and the rows the format excludes)."""
    from fairdiffusion.data.formats import load_dataset

    cfg = _data_section(_config_or_default(config), data_dir, data_format)
    dataset = load_dataset(cfg.data)
    samples = dataset.samples
    columns = ["subject", "patient_id", "split", "image_path", "prompt", *cfg.data.attributes, "source", "generated_by"]
    if as_json:
        for record in samples[columns].to_dict(orient="records"):
            typer.echo(json.dumps({k: (None if v != v else v) for k, v in record.items()}))
    else:
        shown = ["subject", "split", "source", *cfg.data.attributes, "prompt"]
        typer.echo(samples[shown].to_string(index=False, max_colwidth=90))
        typer.echo(
            f"\n{len(samples)} subjects; " + ", ".join(f"{s}: {n}" for s, n in samples["split"].value_counts().items())
        )
    for line in dataset.exclusion_lines():
        typer.echo(line, err=as_json)


@data_app.command("diff")
def data_diff(
    rev_a: str = typer.Argument(..., help="Git revision of the data's .dvc file (before)."),
    rev_b: str = typer.Argument(..., help="Git revision of the data's .dvc file (after)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Config naming data.dvc_file and the format."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """What changed between two data versions: subjects added/removed/changed, group counts before and after."""
    from fairdiffusion.data.versioning import diff_data_versions

    cfg = _config_or_default(config)
    diff = diff_data_versions(cfg.data.dvc_file, rev_a, rev_b, cfg.data)
    typer.echo(json.dumps(diff.to_dict(), indent=2) if as_json else diff.render())


@data_app.command("publish")
def data_publish(
    data_dir: Path | None = typer.Argument(None, help="Dataset folder (default: the config's data.path)."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Config naming data.path, data.dvc_file and the validation (default: library's)."
    ),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message (default names both md5s)."),
    no_push: bool = typer.Option(
        False, "--no-push", help="Commit without `dvc push` (a worker elsewhere cannot pull)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the publication and the event's delivery as JSON."),
) -> None:
    """Version changed data (validate, dvc commit, dvc push, git commit of the .dvc) and send the event.

    The event `fairdiffusion.data.published` goes to PREFECT_API_URL, where the weekly-retraining
    deployment's trigger starts a run on the new version; without PREFECT_API_URL no event is sent.

    Exit status: 0 published, or nothing changed (nothing done, no event); 1 not a DVC-tracked dataset,
    a failed validation, DVC or git failed, or the event could not be sent (the data is published then).
    """
    from fairdiffusion.data.versioning import publish_data
    from fairdiffusion.validation.run import run_validation

    base = _config_or_default(config)
    cfg = _data_section(base, data_dir, None) if data_dir is not None else base
    dvc_file = cfg.data.dvc_file if data_dir is None else None  # a named folder's pointer is <folder>.dvc

    def validate() -> None:
        result = run_validation(cfg.data, cfg.validation)
        if not result.success:
            typer.echo(result.summary(), err=True)
            raise FairDiffusionError(f"{cfg.data.path} fails validation: nothing published")

    publication = publish_data(cfg.data.path, dvc_file, message=message, push=not no_push, check=validate)
    delivery = None
    if publication.published:
        from flows.events import send_data_published

        delivery = send_data_published(publication)
    if as_json:
        typer.echo(json.dumps({**publication.to_dict(), "event": delivery and delivery.to_dict()}, indent=2))
    elif not publication.published:
        typer.echo(
            f"Nothing to publish: {publication.dataset} matches {Path(publication.dvc_file).name} as committed "
            f"in {publication.commit} (md5 {publication.dvc_md5}); no event sent"
        )
    else:
        typer.echo(f"Published      : {publication.dataset} md5 {publication.dvc_md5} (was {publication.previous_md5})")
        typer.echo(f"Committed      : {Path(publication.dvc_file).name} in {publication.commit}")
        pushed = "to the DVC remote" if publication.pushed else "no (--no-push): `dvc push` before a worker pulls it"
        typer.echo(f"Pushed         : {pushed}")
    if delivery is None:
        return
    if not delivery.sent and delivery.api_url is not None:
        raise FairDiffusionError(
            f"data published (commit {publication.commit}), but the event {delivery.event} did not reach "
            f"{delivery.api_url} ({delivery.reason}); start the run by hand: prefect deployment run "
            f"fairdiffusion-pipeline/weekly-retraining --param data_md5={publication.dvc_md5}"
        )
    if not as_json:
        sent = f"sent to {delivery.api_url}" if delivery.sent else f"not sent ({delivery.reason})"
        typer.echo(f"Event          : {delivery.event} {sent}")


def _print_table(lineage: dict[str, object], prefix: str = "") -> None:
    for key, value in lineage.items():
        if isinstance(value, dict) and key != "config":
            typer.echo(f"{prefix}{key}:")
            _print_table(value, prefix + "  ")
        elif key == "config":
            typer.echo(f"{prefix}{key}: (the resolved config; see --json)")
        else:
            typer.echo(f"{prefix}{key}: {value}")


def _tracking(config: Path | None, model: str | None) -> TrackingConfig:
    cfg = _config_or_default(config)
    return cfg.tracking if model is None else cfg.tracking.model_copy(update={"model_name": model})


_MODEL = typer.Option(None, "--model", help="Registered model name (default: the config's).")
_CONFIG = typer.Option(
    None,
    "--config",
    "-c",
    help="Config naming the tracking URI (default: the library's, sqlite:///outputs/mlflow.db here; "
    "MLFLOW_TRACKING_URI overrides).",
)
_RECORD_JSON = typer.Option(False, "--json", help="Print the decision record as JSON on stdout.")


@data_app.command("make-demo")
def data_make_demo(out: Path = typer.Argument(..., help="Folder to write (must be empty or absent).")) -> None:
    """Write the synthetic demo dataset (FairGenMed layout; its README says how it is drawn)."""
    from fairdiffusion.data.demo import generate_demo_dataset

    typer.echo(f"Demo dataset   : {generate_demo_dataset(out)}")


@base_app.command("build")
def base_build(
    out: Path = typer.Option(Path("base-model"), "--out", help="Bundle folder (replaced if it exists)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the pretraining set and every weight."),
) -> None:
    """Pretrain the base bundle (VAE, UNet, FID extractor) on the generated pretraining set.

    Prints and records its prompt fidelity on held-out pretraining prompts' clinical labels
    as it finishes. `make base` also versions it (dvc add + push).
    """
    settle_image_processor_fallbacks()  # before diffusers is imported
    from fairdiffusion.evaluation.base_fidelity import base_fidelity_check
    from fairdiffusion.models.base import BaseBuildSpec, build_base_bundle

    spec = BaseBuildSpec(seed=seed)
    check = base_fidelity_check(spec.resolution, seed, spec.render_size, typer.echo)
    result = build_base_bundle(out, spec, progress=typer.echo, check=check)
    typer.echo(f"Base bundle    : {result.bundle_dir}")
    typer.echo(f"Seconds        : {json.dumps(result.seconds)}")
    typer.echo(f"Final losses   : {json.dumps({k: round(v, 4) for k, v in result.final_losses.items()})}")


@app.command()
def audit(
    model: str | None = _MODEL,
    version: str | None = typer.Option(None, "--version", help="Model version number."),
    alias: str | None = typer.Option(None, "--alias", help="Model alias, e.g. champion."),
    history: bool = typer.Option(False, "--history", help="List every decision on the model, oldest first."),
    report: Path | None = typer.Option(None, "--report", help="Write a self-contained HTML audit page here."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    config: Path | None = _CONFIG,
) -> None:
    """Lineage of a model version, or the decision history, read from MLflow alone."""
    from fairdiffusion import tracking as runs
    from fairdiffusion.registry import promotion as registry

    tracking = _tracking(config, model)
    if history and version is None and alias is None:
        decisions = registry.decision_history(tracking)
        _warn_alias_problems(registry.alias_problems(tracking))
        if as_json:
            typer.echo(json.dumps([d.to_dict() for d in decisions], indent=2))
            return
        typer.echo(f"{'when (UTC)':24} {'version':>7}  {'decision':10} {'who':22} {'data md5':14} policy   reasons")
        for d in decisions:
            typer.echo(
                f"{d.at:24} {d.version:>7}  {d.decision:10} {d.actor[:22]:22} "
                f"{(d.data_md5 or '')[:12]:14} {(d.policy_hash or '')[:8]:8} {'; '.join(d.reasons)}"
            )
        return
    if (version is None) == (alias is None):
        raise FairDiffusionError("audit: give exactly one of --version N or --alias NAME (or --history alone)")
    lineage = registry.read_lineage(tracking, version=version, alias=alias)
    _warn_alias_problems(lineage.alias_problems)
    if report is not None:
        from fairdiffusion.registry.audit import render_audit_page

        page = render_audit_page(
            lineage,
            registry.decision_history(tracking),
            runs.run_artifact_json(tracking, lineage.run_id, schema.VALIDATION_ARTIFACT),
            runs.run_metrics(tracking, lineage.run_id),
        )
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(page)
        typer.echo(f"audit page written to {report}")
        return
    if as_json:
        typer.echo(json.dumps(lineage.to_dict(), indent=2, sort_keys=True, default=str))
    else:
        _print_table(lineage.to_dict())


def _warn_alias_problems(problems: list[str]) -> None:
    """Aliases the decision log does not explain, on stderr (the JSON carries them as ``alias_problems``)."""
    if problems:
        listed = "".join(f"\n  - {p}" for p in problems)
        typer.echo(f"warning: the registry disagrees with its decision log:{listed}", err=True)


_REASON = typer.Option(..., "--reason", help="Why; recorded in the audit trail.")


@app.command()
def approve(
    version: str = typer.Option(..., "--version", help="The version that passed the gate and waits."),
    reason: str = _REASON,
    approver: str | None = typer.Option(
        None, "--approver", help="Who approves (default $FAIRDIFFUSION_ACTOR or user)."
    ),
    model: str | None = _MODEL,
    config: Path | None = _CONFIG,
    as_json: bool = _RECORD_JSON,
) -> None:
    """Promote a version that passed the gate (when require_approval is on); recorded."""
    from fairdiffusion.registry import promotion as registry
    from flows.events import send_model_approved

    tracking = _tracking(config, model)
    record = registry.approve_version(tracking, version, reason, registry.current_actor(approver))
    # A notification: the promotion is recorded whether or not it arrives, so a failed
    # delivery is reported, not an error.
    delivery = send_model_approved(record)
    if as_json:
        typer.echo(json.dumps({**record.to_dict(), "event": delivery.to_dict()}, indent=2))
    else:
        typer.echo(f"approved: {tracking.model_name} v{record.version} is champion (was v{record.champion_before})")
        if delivery.sent:
            typer.echo(f"Event          : {delivery.event} sent to {delivery.api_url}")
    if not delivery.sent and delivery.api_url is not None:
        typer.echo(f"warning: {delivery.event} did not reach {delivery.api_url} ({delivery.reason})", err=True)


@app.command()
def promote(
    version: str = typer.Option(..., "--version", help="The version to make champion."),
    force: bool = typer.Option(False, "--force", help="Required: this overrides the fairness gate."),
    reason: str = _REASON,
    actor: str | None = typer.Option(None, "--actor", help="Who overrides (default $FAIRDIFFUSION_ACTOR or user)."),
    model: str | None = _MODEL,
    config: Path | None = _CONFIG,
    as_json: bool = _RECORD_JSON,
) -> None:
    """Override the gate for one version (``--force --reason`` required); recorded as an override."""
    from fairdiffusion.registry import promotion as registry

    if not force:
        raise FairDiffusionError(
            "promote: the fairness gate decides promotions; use `approve` for a passing version, "
            "or `promote --force --reason TEXT` to override it on the record"
        )
    tracking = _tracking(config, model)
    record = registry.force_promote(tracking, version, reason, registry.current_actor(actor))
    if as_json:
        typer.echo(json.dumps(record.to_dict(), indent=2))
        return
    typer.echo(f"OVERRIDE recorded: {tracking.model_name} v{record.version} is champion ({'; '.join(record.reasons)})")


@app.command()
def rollback(
    reason: str = _REASON,
    actor: str | None = typer.Option(None, "--actor", help="Who rolls back (default $FAIRDIFFUSION_ACTOR or user)."),
    model: str | None = _MODEL,
    config: Path | None = _CONFIG,
    as_json: bool = _RECORD_JSON,
) -> None:
    """Move champion back to previous-champion; recorded like any promotion."""
    from fairdiffusion.registry import promotion as registry

    tracking = _tracking(config, model)
    record = registry.rollback_champion(tracking, reason, registry.current_actor(actor))
    if as_json:
        typer.echo(json.dumps(record.to_dict(), indent=2))
        return
    typer.echo(f"rolled back: {tracking.model_name} champion v{record.champion_before} -> v{record.version}")


@app.command()
def report(
    version: str = typer.Option(..., "--version", help="Registered model version."),
    model: str | None = typer.Option(None, "--model", help="Registered model name (default: the config's)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Config naming the tracking URI."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default outputs/reports/<model>-v<N>)."),
) -> None:
    """Render the evaluation report (HTML, Markdown, charts) of a registered version from MLflow."""
    import tempfile

    from mlflow.artifacts import download_artifacts

    from fairdiffusion.registry.promotion import read_lineage

    cfg = _config_or_default(config)
    tracking = cfg.tracking if model is None else cfg.tracking.model_copy(update={"model_name": model})
    run_id = read_lineage(tracking, version=version).run_id
    from fairdiffusion.evaluation.report import render_report_files
    from fairdiffusion.evaluation.results import EvaluationReport

    target = out or Path("outputs") / "reports" / f"{tracking.model_name}-v{version}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(
                download_artifacts(
                    run_id=run_id,
                    artifact_path=schema.EVALUATION_DIR,
                    dst_path=tmp,
                    tracking_uri=tracking.resolved_tracking_uri(),
                )
            )
            data = json.loads((local / schema.EVALUATION_JSON).read_text())
        except Exception as error:  # noqa: BLE001 - any failure to read means there is no report to render
            raise FairDiffusionError(
                f"report: {tracking.model_name} v{version} (run {run_id}) has no readable evaluation ({error})"
            ) from None
        files = render_report_files(EvaluationReport.from_dict(data), target, grid_dir=local)
    typer.echo(f"report of {tracking.model_name} v{version} (run {run_id}):")
    for name in ("html", "markdown", "json"):
        typer.echo(f"  {name:8} {files[name]}")


def quiet_environment() -> None:
    """Offline machines: no telemetry calls (Prefect's ephemeral server otherwise sends a
    heartbeat that can meet its SQLite database locked and print a traceback), no progress
    bars in piped output. Settings the user made are kept. The benchmarks call it too."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point; always ends in :class:`SystemExit` with the status below.

    0: success, or a run that skipped; 1: bad input (one ``error:`` line), a failed
    validation or a rejected gate; 2: a usage error (click prints the usage, no traceback).
    """
    quiet_environment()
    try:
        # Standalone mode: typer (with its own vendored click) reports usage errors and
        # turns every typer.Exit into that exit status; only our own errors get through.
        app(args=argv, prog_name="fairdiffusion")
    except FairDiffusionError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
