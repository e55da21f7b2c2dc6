"""What an auditor reads about one model version: its :class:`Lineage`, and a self-contained HTML page.

Everything on the page is read from MLflow by the caller
(:func:`fairdiffusion.registry.promotion.read_lineage`, the decision history, the
validation artifact, the run metrics); this module only holds and renders it. No
external CSS, scripts or images, so the file can be archived and opened anywhere.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from fairdiffusion.registry import schema

if TYPE_CHECKING:
    from fairdiffusion.registry.promotion import DecisionRecord


@dataclass(frozen=True)
class DataLineage:
    """The data version a run trained on."""

    dvc_md5: str | None
    #: The git commit that last changed the ``.dvc`` file.
    data_dvc_commit: str | None
    path: str | None


@dataclass(frozen=True)
class CodeLineage:
    """The code version a run ran."""

    git_commit: str | None
    #: Whether the checkout had uncommitted changes (``None`` if unrecorded).
    dirty: Any


@dataclass(frozen=True)
class ValidationLineage:
    """The data validation's verdict on the run."""

    success: Any
    failed_expectations: Any = field(default_factory=list)


@dataclass(frozen=True)
class TrainingLineage:
    """How the model was trained: the method and the resolved config."""

    method: str | None
    config: dict[str, Any] | None


@dataclass(frozen=True)
class MetricsLineage:
    """The run's metrics, grouped as an auditor reads them."""

    overall: dict[str, float]
    per_subgroup: dict[str, float]
    equity: dict[str, float]

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> MetricsLineage:
        """Group flat metric keys: ``*/overall``, per-subgroup FIDs and sizes, ES-FIDs."""
        return cls(
            overall={k: v for k, v in metrics.items() if k.endswith("/overall")},
            per_subgroup={
                k: v
                for k, v in metrics.items()
                if (k.startswith("fid_") or k.startswith("num_samples/")) and not k.endswith("/overall")
            },
            equity={k: v for k, v in metrics.items() if k.startswith("es_fid_")},
        )


@dataclass(frozen=True)
class GateLineage:
    """The fairness gate's verdict on the version, as the registry recorded it."""

    passed: Any
    reasons: Any
    policy: Any
    policy_file: str | None
    policy_hash: str | None
    compared_with_version: str | None
    #: Every :class:`~fairdiffusion.registry.gate.RuleCheck`, as recorded in JSON.
    checks: list[dict[str, Any]]


@dataclass(frozen=True)
class Lineage:
    """A model version's whole story, reconstructed from MLflow alone."""

    model: str
    version: str
    aliases: list[str]
    run_id: str
    data: DataLineage
    code: CodeLineage
    validation: ValidationLineage
    training: TrainingLineage
    metrics: MetricsLineage
    gate: GateLineage
    #: Derived from the aliases and the decision log at read time (champion, replaced,
    #: awaiting-approval, rejected, unrecorded); see :mod:`fairdiffusion.registry.status`.
    status: str | None
    #: Every decision on this version, oldest first.
    decisions: list[DecisionRecord]
    created_at: str
    #: The DVC version of the pretrained model that was fine-tuned (``None``s for a preset or hub id).
    base_model: DataLineage = field(default_factory=lambda: DataLineage(None, None, None))
    #: Aliases of the model the decision log does not explain, and champion moves it does not record.
    alias_problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what ``fairdiffusion audit --json`` prints)."""
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        # Dict-style reads (lineage["gate"]["passed"]) keep callers written against the
        # dict read_lineage used to return working; new code reads the attributes.
        return self.to_dict()[key]


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#1b1b1b;max-width:1100px}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.pass{color:#0a6b2d;font-weight:600}.fail{color:#b00020;font-weight:600}
.override{background:#fff3cd}.this{background:#e8f0fe}code{font-size:.9em}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], row_classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        cls = row_classes[index] if index < len(row_classes) else ""
        cells = "".join(f"<td>{cell if isinstance(cell, _Raw) else _e(cell)}</td>" for cell in row)
        body.append(f"<tr class='{cls}'>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


class _Raw(str):
    """Already-escaped HTML."""


def _verdict(passed: object) -> _Raw:
    if passed is True or passed == "true":
        return _Raw("<span class='pass'>PASS</span>")
    if passed is False or passed == "false":
        return _Raw("<span class='fail'>FAIL</span>")
    return _Raw("<span>unknown</span>")


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else _e(value)


def render_audit_page(
    lineage: Lineage,
    history: Sequence[DecisionRecord],
    validation: Mapping[str, Any] | None,
    metrics: Mapping[str, float],
) -> str:
    """Render the audit page of one model version.

    Args:
        lineage: :func:`fairdiffusion.registry.promotion.read_lineage` of the version.
        history: Every :class:`~fairdiffusion.registry.promotion.DecisionRecord` of the model, oldest first.
        validation: The run's ``lineage/validation.json`` artifact, if any.
        metrics: The run's metrics (slice metrics and, where present, ``ci_low/``/``ci_high/`` bounds).

    Returns:
        A complete HTML document.
    """
    title = f"Audit: {_e(lineage.model)} v{_e(lineage.version)}"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{title}</title><style>{_STYLE}</style></head><body>",
        # The verdict first: the gate and the decisions, then the lineage, and the hundreds of
        # metric rows last, where they no longer push the decision off the first screen.
        *_headline_section(lineage),
        *_gate_section(lineage.gate),
        *_history_section(history, lineage.version),
        *_lineage_section(lineage),
        *_validation_section(validation),
        *_metrics_section(metrics),
        "</body></html>",
    ]
    return "\n".join(parts)


def _headline_section(lineage: Lineage) -> list[str]:
    problems = [
        "<p class='fail'>The registry disagrees with its decision log:</p><ul>"
        + "".join(f"<li class='fail'>{_e(p)}</li>" for p in lineage.alias_problems)
        + "</ul>"
    ]
    return [
        f"<h1>Audit of {_e(lineage.model)} version {_e(lineage.version)}</h1>",
        *(problems if lineage.alias_problems else []),
        f"<p>Aliases: <b>{_e(', '.join(lineage.aliases) or 'none')}</b> · status "
        f"<b>{_e(lineage.status)}</b> · gate {_verdict(lineage.gate.passed)} · created "
        f"{_e(lineage.created_at)} · MLflow run <code>{_e(lineage.run_id)}</code></p>",
    ]


def _lineage_section(lineage: Lineage) -> list[str]:
    gate = lineage.gate
    facts = [
        ["data: DVC md5", lineage.data.dvc_md5],
        ["base model: DVC md5", lineage.base_model.dvc_md5],
        ["data: commit that last changed data.dvc", lineage.data.data_dvc_commit],
        ["data: path", lineage.data.path],
        ["code: git commit", lineage.code.git_commit],
        ["code: uncommitted changes", lineage.code.dirty],
        ["training: method", lineage.training.method],
        ["gate policy", f"{gate.policy_file} (sha256 {gate.policy_hash})"],
        ["compared with champion", gate.compared_with_version or "none (first model)"],
    ]
    return ["<h2>Lineage</h2>", _table(["fact", "value"], facts)]


def _validation_section(validation: Mapping[str, Any] | None) -> list[str]:
    parts = ["<h2>Validation</h2>"]
    if not validation:
        return [*parts, "<p class='fail'>No validation record on this run.</p>"]
    parts.append(
        f"<p>{_verdict(validation.get('success'))} {validation.get('evaluated_expectations')} expectations "
        f"on {validation.get('n_subjects')} subjects.</p>"
    )
    failed = validation.get("failed_expectations") or []
    if failed:
        parts.append("<ul>" + "".join(f"<li>{_e(f)}</li>" for f in failed) + "</ul>")
    counts = validation.get("group_counts") or {}
    groups = sorted({g for split in counts.values() for g in split})
    parts.append(_table(["group", *counts], [[g, *[counts[s].get(g) for s in counts]] for g in groups]))
    return parts


def _metrics_section(metrics: Mapping[str, float]) -> list[str]:
    slice_keys = sorted(
        k for k in metrics if not k.startswith(("ci_low/", "ci_high/", "train/", "fbp/", "validation/"))
    )
    rows = []
    for key in slice_keys:
        low, high = metrics.get(f"ci_low/{key}"), metrics.get(f"ci_high/{key}")
        interval = f"[{low:.4g}, {high:.4g}]" if low is not None and high is not None else "—"
        rows.append([key, _fmt(metrics[key]), interval])
    return ["<h2>Metrics per subgroup</h2>", _table(["metric", "value", "bootstrap interval"], rows)]


def _gate_section(gate: GateLineage) -> list[str]:
    parts = ["<h2>Fairness gate</h2>"]
    if gate.reasons:
        parts.append("<ul>" + "".join(f"<li class='fail'>{_e(r)}</li>" for r in gate.reasons) + "</ul>")
    rows = [
        [
            c.get("rule"),
            c.get("metric"),
            _fmt(c.get("value")),
            _fmt(c.get("threshold")),
            _verdict(c.get("passed")),
            c.get("detail"),
        ]
        for c in gate.checks or []
    ]
    parts.append(_table(["rule", "metric", "value", "threshold", "verdict", "detail"], rows))
    policy = _e(json.dumps(gate.policy, indent=2))
    parts.append(f"<details><summary>Policy</summary><pre>{policy}</pre></details>")
    return parts


def _history_section(history: Sequence[DecisionRecord], version: str) -> list[str]:
    rows, classes = [], []
    for record in history:
        override = record.decision == schema.DECISION_OVERRIDE
        rows.append(
            [
                record.at,
                record.version,
                "OVERRIDE" if override else record.decision,
                record.actor,
                "; ".join(record.reasons),
                record.data_md5,
                (record.policy_hash or "")[:12],
                f"{record.champion_before or '—'} → {record.champion_after or '—'}",
            ]
        )
        marks = ("override" if override else "", "this" if str(record.version) == version else "")
        classes.append(" ".join(c for c in marks if c))
    headers = ["when (UTC)", "version", "decision", "who", "reasons", "data md5", "policy", "champion"]
    return ["<h2>Promotion history of the model</h2>", _table(headers, rows, classes)]
