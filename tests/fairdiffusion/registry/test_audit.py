"""Tests for the Lineage record and the auditor's HTML page, on an in-memory lineage."""

from __future__ import annotations

import html
import json

from fairdiffusion.registry import schema
from fairdiffusion.registry.audit import (
    CodeLineage,
    DataLineage,
    GateLineage,
    Lineage,
    MetricsLineage,
    TrainingLineage,
    ValidationLineage,
    render_audit_page,
)
from fairdiffusion.registry.promotion import DecisionRecord


def record(version: str, decision: str, reasons: list[str], at: str) -> DecisionRecord:
    return DecisionRecord(
        model="m",
        version=version,
        decision=decision,
        reasons=reasons,
        actor="bob",
        at=at,
        data_md5="md5-v1",
        policy_hash="a" * 64,
        champion_before="1",
        champion_after=version,
        audit_run_id=f"run-{version}",
    )


HISTORY = [
    record("1", schema.DECISION_PASS, ["every rule passed"], "2024-01-01T00:00:00.000Z"),
    record("2", schema.DECISION_OVERRIDE, ["clinical <sign-off>", "gate FAILED for this version"], "2024-01-02"),
]


def make_lineage(checks: list[dict] | None = None) -> Lineage:
    metrics = {"fid_x/overall": 10.0, "fid_x/race/Asian": 11.0, "num_samples/race/Asian": 5.0, "es_fid_x/race": 50.0}
    return Lineage(
        model="m",
        version="2",
        aliases=[schema.CHAMPION],
        run_id="run-abc",
        data=DataLineage(dvc_md5="md5-v1", data_dvc_commit="0" * 40, path="data"),
        code=CodeLineage(git_commit="1" * 40, dirty=False),
        validation=ValidationLineage(success=True, failed_expectations=[]),
        training=TrainingLineage(method="fair", config={"training": {"max_steps": 4}}),
        metrics=MetricsLineage.from_metrics(metrics),
        gate=GateLineage(
            passed=False,
            reasons=["ES-FID on race 50 > 40"],
            policy={"name": "demo"},
            policy_file="policies/demo.yaml",
            policy_hash="a" * 64,
            compared_with_version="1",
            checks=checks or [],
        ),
        status=schema.STATUS_CHAMPION,
        decisions=[HISTORY[1]],
        created_at="2024-01-02T00:00:00Z",
    )


def test_to_dict_keeps_the_json_shape_of_audit() -> None:
    document = make_lineage().to_dict()
    assert list(document) == [
        "model", "version", "aliases", "run_id", "data", "code", "validation",
        "training", "metrics", "gate", "status", "decisions", "created_at", "base_model", "alias_problems",
    ]  # fmt: skip
    assert set(document["data"]) == {"dvc_md5", "data_dvc_commit", "path"}
    assert set(document["code"]) == {"git_commit", "dirty"}
    assert document["validation"] == {"success": True, "failed_expectations": []}
    assert set(document["training"]) == {"method", "config"}
    assert set(document["gate"]) == {
        "passed", "reasons", "policy", "policy_file", "policy_hash", "compared_with_version", "checks",
    }  # fmt: skip
    assert document["decisions"] == [HISTORY[1].to_dict()]
    json.dumps(document)


def test_metrics_are_grouped_as_the_auditor_reads_them() -> None:
    metrics = make_lineage().metrics
    assert metrics.overall == {"fid_x/overall": 10.0}
    assert metrics.per_subgroup == {"fid_x/race/Asian": 11.0, "num_samples/race/Asian": 5.0}
    assert metrics.equity == {"es_fid_x/race": 50.0}


def test_dict_style_reads_still_work() -> None:
    lineage = make_lineage()
    assert lineage["gate"]["passed"] is False and lineage["aliases"] == [schema.CHAMPION]
    assert lineage["decisions"][0]["decision"] == schema.DECISION_OVERRIDE


def test_page_shows_lineage_gate_and_history() -> None:
    check = {"rule": "max_es_fid", "metric": "es_fid_x/race", "value": 50.0, "threshold": 40.0, "passed": False}
    lineage = make_lineage([check | {"detail": "ES-FID on race 50 > 40"}])
    validation = {"success": True, "evaluated_expectations": 12, "n_subjects": 80, "group_counts": {"train": {"A": 3}}}
    metrics = {"fid_x/overall": 10.0, "ci_low/fid_x/overall": 9.0, "ci_high/fid_x/overall": 11.0, "train/seconds": 1.0}
    page = render_audit_page(lineage, HISTORY, validation, metrics)
    assert page.startswith("<!doctype html>") and page.endswith("</body></html>")
    assert "<title>Audit: m v2</title>" in page and "Audit of m version 2" in page
    for needle in ("md5-v1", "policies/demo.yaml", "12 expectations", "[9, 11]", "ES-FID on race 50 &gt; 40"):
        assert needle in page
    assert "train/seconds" not in page  # not a slice metric
    assert "OVERRIDE" in page and "clinical &lt;sign-off&gt;" in page  # escaped
    assert "<tr class='override this'>" in page and "<tr class=''>" in page
    assert "<script" not in page and "<link" not in page


def test_page_without_validation_says_so() -> None:
    page = render_audit_page(make_lineage(), [], None, {})
    assert "No validation record on this run." in page


def test_page_leads_with_aliases_the_log_does_not_explain() -> None:
    lineage = make_lineage()
    problem = "alias 'champion' points at v1 but the decision log leaves it at v2"
    page = render_audit_page(Lineage(**{**vars(lineage), "alias_problems": [problem]}), HISTORY, None, {})
    assert "disagrees with its decision log" in page and html.escape(problem) in page
    assert "disagrees" not in render_audit_page(lineage, HISTORY, None, {})


def test_page_puts_the_gate_table_before_the_metric_rows() -> None:
    check = {"rule": "max_es_fid", "metric": "es_fid_x/race", "value": 50.0, "threshold": 40.0, "passed": False}
    metrics = {f"fid_x/slice{i}": float(i) for i in range(700)}
    page = render_audit_page(make_lineage([check | {"detail": "d"}]), HISTORY, None, metrics)
    headings = ["Fairness gate", "Promotion history", "Lineage", "Validation", "Metrics per subgroup"]
    positions = [page.index(f"<h2>{h}") for h in headings]
    assert positions == sorted(positions)
    assert page.index("max_es_fid") < page.index("fid_x/slice0")
