"""A run's outcome as an orchestrator shows it: one log line, the MLflow link, the gate table in Markdown.

The orchestration layer (``tasks/promote.py``) publishes what this module renders; the
decision itself is read back from the run, where stage 5 stored it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fairdiffusion import tracking as runs
from fairdiffusion.config import TrackingConfig
from fairdiffusion.registry import schema
from fairdiffusion.registry.gate import GateDecision
from fairdiffusion.registry.lineage import PromotionOutcome

#: Where ``mlflow ui`` serves by default, for a tracking URI that is not a server.
LOCAL_UI = "http://127.0.0.1:5000"


@dataclass(frozen=True)
class MlflowLink:
    """Where a run (and its registered version) sits in MLflow."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    model_name: str
    version: str | None

    @property
    def run_url(self) -> str:
        """The run's page: on the tracking server, else on a local ``mlflow ui`` over the same store."""
        return f"{_ui_base(self.tracking_uri)}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    @property
    def version_url(self) -> str | None:
        """The registered version's page (``None`` when nothing was registered)."""
        if not self.version:
            return None
        return f"{_ui_base(self.tracking_uri)}/#/models/{self.model_name}/versions/{self.version}"

    def describe(self) -> str:
        """One line: tracking URI, experiment and run ids, and the page to open."""
        where = f"MLflow {self.tracking_uri} experiment {self.experiment_id} run {self.run_id}: {self.run_url}"
        if not _is_server(self.tracking_uri):
            where += f" (after `mlflow ui --backend-store-uri {self.tracking_uri}`)"
        return where


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _ui_base(uri: str) -> str:
    return uri.rstrip("/") if _is_server(uri) else LOCAL_UI


def gate_artifact_key(model_name: str) -> str:
    """The artifact key for a model's gate decisions: ``gate-`` and the name in lowercase letters, digits, dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")
    return f"gate-{slug or 'model'}"


def outcome_line(outcome: PromotionOutcome) -> str:
    """The outcome in one log line: status, version and every reason."""
    reasons = "; ".join(outcome.reasons) or "every rule passed"
    model = f"{outcome.model_name} v{outcome.version}"
    if outcome.status == schema.STATUS_SKIPPED:
        return f"skipped, champion {model} unchanged: {reasons}"
    if outcome.status == schema.STATUS_REJECTED:
        return f"gate rejected {model}, not promoted: {reasons}"
    return f"gate passed: {model} is {outcome.status} ({reasons})"


def read_mlflow_link(tracking: TrackingConfig, outcome: PromotionOutcome) -> MlflowLink:
    """The link to the outcome's run, with its experiment id read from MLflow."""
    run = runs.mlflow_client(tracking).get_run(outcome.run_id)
    version = None if outcome.status == schema.STATUS_SKIPPED else outcome.version
    return MlflowLink(
        tracking.resolved_tracking_uri(), run.info.experiment_id, outcome.run_id, outcome.model_name, version
    )


def read_gate_decision(tracking: TrackingConfig, run_id: str) -> GateDecision | None:
    """The decision stage 5 stored on the run (``None`` for a run that never reached the gate)."""
    stored = runs.run_artifact_json(tracking, run_id, schema.GATE_DECISION_ARTIFACT)
    return GateDecision.from_dict(stored) if stored is not None else None


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def render_gate_markdown(outcome: PromotionOutcome, decision: GateDecision | None, link: MlflowLink) -> str:
    """The outcome, the MLflow links and the gate's rule table (every rule checked, failures first)."""
    lines = [f"# {outcome.model_name}: {outcome.status}", "", outcome_line(outcome), ""]
    where = f"experiment {link.experiment_id} at {link.tracking_uri}"
    lines.append(f"- MLflow run: [{link.run_id}]({link.run_url}), {where}")
    if link.version_url:
        lines.append(f"- Model version: [{outcome.model_name} v{outcome.version}]({link.version_url})")
    if outcome.compared_with_version:
        lines.append(f"- Compared with: champion v{outcome.compared_with_version}")
    if decision is None:
        return "\n".join(lines) + "\n"
    lines += ["", "| rule | metric | value | threshold | verdict | detail |", "|---|---|---|---|---|---|"]
    for check in sorted(decision.checks, key=lambda c: c.passed):
        verdict = "pass" if check.passed else "FAIL"
        cells = [check.rule, check.metric, check.value, check.threshold, verdict, check.detail]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
