"""The outcome as Prefect shows it: artifact key, MLflow links, the one-line summary and the gate table."""

from __future__ import annotations

from fairdiffusion.registry import schema
from fairdiffusion.registry.gate import GateDecision, RuleCheck
from fairdiffusion.registry.gate_summary import (
    MlflowLink,
    gate_artifact_key,
    outcome_line,
    render_gate_markdown,
)
from fairdiffusion.registry.lineage import PromotionOutcome


def _outcome(status: str, reasons: list[str] | None = None) -> PromotionOutcome:
    return PromotionOutcome(
        model_name="fundus SD",
        version="3",
        promoted=status == schema.STATUS_CHAMPION,
        passed=status != schema.STATUS_REJECTED,
        status=status,
        reasons=reasons or [],
        compared_with_version="2",
        run_id="r1",
        report_path="",
    )


def test_artifact_key_is_lowercase_letters_digits_and_dashes() -> None:
    assert gate_artifact_key("fundus SD_v2.1") == "gate-fundus-sd-v2-1"
    assert gate_artifact_key("fairdiffusion") == "gate-fairdiffusion"
    assert gate_artifact_key("__") == "gate-model"


def test_links_point_at_the_server_or_at_a_local_mlflow_ui() -> None:
    served = MlflowLink("https://mlflow.example/", "7", "r1", "fundus", "3")
    assert served.run_url == "https://mlflow.example/#/experiments/7/runs/r1"
    assert served.version_url == "https://mlflow.example/#/models/fundus/versions/3"
    assert "mlflow ui" not in served.describe()
    local = MlflowLink("sqlite:////tmp/mlflow.db", "7", "r1", "fundus", None)
    assert local.run_url == "http://127.0.0.1:5000/#/experiments/7/runs/r1"
    assert local.version_url is None
    assert "sqlite:////tmp/mlflow.db" in local.describe() and "mlflow ui --backend-store-uri" in local.describe()


def test_outcome_line_names_the_verdict_and_every_reason() -> None:
    rejected = outcome_line(_outcome(schema.STATUS_REJECTED, ["FID gap too wide", "ES-AUC too low"]))
    assert rejected == "gate rejected fundus SD v3, not promoted: FID gap too wide; ES-AUC too low"
    assert outcome_line(_outcome(schema.STATUS_CHAMPION)) == "gate passed: fundus SD v3 is champion (every rule passed)"
    assert outcome_line(_outcome(schema.STATUS_SKIPPED, ["nothing new"])).startswith("skipped, champion fundus SD v3")


def test_gate_table_lists_failures_first_and_escapes_cells() -> None:
    checks = [
        RuleCheck("absolute", "fid/overall", 1.5, 2.0, True, "ok"),
        RuleCheck("equity", "es_fid/race", 0.123456, 0.1, False, "a|b"),
    ]
    decision = GateDecision(passed=False, checks=checks, policy={}, reasons=["es_fid/race above 0.1"])
    link = MlflowLink("http://mlflow:5000", "1", "r1", "fundus SD", "3")
    page = render_gate_markdown(_outcome(schema.STATUS_REJECTED, decision.reasons), decision, link)
    rows = [line for line in page.splitlines() if line.startswith("| ") and "rule" not in line]
    assert rows == [
        "| equity | es_fid/race | 0.1235 | 0.1 | FAIL | a\\|b |",
        "| absolute | fid/overall | 1.5 | 2 | pass | ok |",
    ]
    assert "[r1](http://mlflow:5000/#/experiments/1/runs/r1)" in page
    assert "(http://mlflow:5000/#/models/fundus SD/versions/3)" in page


def test_a_skipped_run_has_no_table_and_no_version_link() -> None:
    link = MlflowLink("http://mlflow:5000", "1", "r1", "fundus SD", None)
    page = render_gate_markdown(_outcome(schema.STATUS_SKIPPED, ["nothing new"]), None, link)
    assert "| rule |" not in page and "Model version" not in page and "MLflow run" in page
