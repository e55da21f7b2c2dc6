"""A self-contained HTML page for an auditor: one model version, its lineage and its history.

Everything on the page is read from MLflow by the caller (lineage, decision history,
validation artifact, run metrics); this module only renders. No external CSS, scripts
or images, so the file can be archived and opened anywhere.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
    lineage: Mapping[str, Any],
    history: Sequence[Any],
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
    version = str(lineage["version"])
    gate = lineage.get("gate", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Audit: {_e(lineage['model'])} v{_e(version)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Audit of {_e(lineage['model'])} version {_e(version)}</h1>",
        f"<p>Aliases: <b>{_e(', '.join(lineage.get('aliases', [])) or 'none')}</b> · status "
        f"<b>{_e(lineage.get('status'))}</b> · gate {_verdict(gate.get('passed'))} · created "
        f"{_e(lineage.get('created_at'))} · MLflow run <code>{_e(lineage.get('run_id'))}</code></p>",
        "<h2>Lineage</h2>",
        _table(
            ["fact", "value"],
            [
                ["data: DVC md5", lineage["data"].get("dvc_md5")],
                ["data: commit that last changed data.dvc", lineage["data"].get("data_dvc_commit")],
                ["data: path", lineage["data"].get("path")],
                ["code: git commit", lineage["code"].get("git_commit")],
                ["code: uncommitted changes", lineage["code"].get("dirty")],
                ["training: method", lineage["training"].get("method")],
                ["gate policy", f"{gate.get('policy_file')} (sha256 {gate.get('policy_hash')})"],
                ["compared with champion", gate.get("compared_with_version") or "none (first model)"],
            ],
        ),
        "<h2>Validation</h2>",
    ]
    if validation:
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
    else:
        parts.append("<p class='fail'>No validation record on this run.</p>")

    parts.append("<h2>Metrics per subgroup</h2>")
    slice_keys = sorted(
        k for k in metrics if not k.startswith(("ci_low/", "ci_high/", "train/", "fbp/", "validation/"))
    )
    rows = []
    for key in slice_keys:
        low, high = metrics.get(f"ci_low/{key}"), metrics.get(f"ci_high/{key}")
        interval = f"[{low:.4g}, {high:.4g}]" if low is not None and high is not None else "—"
        rows.append([key, _fmt(metrics[key]), interval])
    parts.append(_table(["metric", "value", "bootstrap interval"], rows))

    parts.append("<h2>Fairness gate</h2>")
    if gate.get("reasons"):
        parts.append("<ul>" + "".join(f"<li class='fail'>{_e(r)}</li>" for r in gate["reasons"]) + "</ul>")
    checks = gate.get("checks") or []
    parts.append(
        _table(
            ["rule", "metric", "value", "threshold", "verdict", "detail"],
            [
                [
                    c.get("rule"),
                    c.get("metric"),
                    _fmt(c.get("value")),
                    _fmt(c.get("threshold")),
                    _verdict(c.get("passed")),
                    c.get("detail"),
                ]
                for c in checks
            ],
        )
    )
    parts.append(
        f"<details><summary>Policy</summary><pre>{_e(json.dumps(gate.get('policy'), indent=2))}</pre></details>"
    )

    parts.append("<h2>Promotion history of the model</h2>")
    history_rows, classes = [], []
    for record in history:
        r = record.to_dict() if hasattr(record, "to_dict") else dict(record)
        label = "OVERRIDE" if r["decision"] == "override" else r["decision"]
        history_rows.append(
            [
                r["at"],
                r["version"],
                label,
                r["actor"],
                "; ".join(r["reasons"]),
                r["data_md5"],
                (r["policy_hash"] or "")[:12],
                f"{r['champion_before'] or '—'} → {r['champion_after'] or '—'}",
            ]
        )
        classes.append(
            " ".join(
                c
                for c in (
                    "override" if r["decision"] == "override" else "",
                    "this" if str(r["version"]) == version else "",
                )
                if c
            )
        )
    parts.append(
        _table(
            ["when (UTC)", "version", "decision", "who", "reasons", "data md5", "policy", "champion"],
            history_rows,
            classes,
        )
    )
    parts.append("</body></html>")
    return "\n".join(parts)
