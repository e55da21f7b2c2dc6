"""What a pipeline run records about itself, beyond the MLflow round trips (tests/integration)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fairdiffusion.config import PipelineConfig
from fairdiffusion.data.versioning import DataVersion
from fairdiffusion.registry import lineage, schema
from fairdiffusion.registry.lineage import PromotionOutcome

OUTCOME = PromotionOutcome(
    model_name="m",
    version="3",
    promoted=True,
    passed=True,
    status=schema.STATUS_CHAMPION,
    reasons=[],
    compared_with_version="2",
    run_id="run-1",
    report_path="",
)


@pytest.mark.parametrize(
    ("changes", "verdict"),
    [
        ({}, schema.VERDICT_PROMOTED),
        ({"promoted": False, "status": schema.STATUS_AWAITING_APPROVAL}, schema.VERDICT_AWAITING_APPROVAL),
        ({"promoted": False, "passed": False, "status": schema.STATUS_REJECTED}, schema.VERDICT_REJECTED),
        ({"promoted": False, "passed": False, "status": schema.STATUS_SKIPPED}, schema.VERDICT_SKIPPED),
    ],
)
def test_the_verdict_follows_the_outcome(changes: dict, verdict: str) -> None:
    assert lineage.verdict_of(dataclasses.replace(OUTCOME, **changes)) == verdict


def test_source_tags_name_the_flow_and_the_commit() -> None:
    tags = lineage.mlflow_source_tags("1" * 40)
    assert tags[schema.MLFLOW_GIT_COMMIT] == "1" * 40
    assert tags[schema.MLFLOW_SOURCE_NAME] == schema.PIPELINE_SOURCE_NAME
    assert schema.MLFLOW_GIT_COMMIT not in lineage.mlflow_source_tags(""), "no commit outside a git checkout"


def test_dataset_inputs_are_digested_by_the_dvc_md5(tmp_path: Path) -> None:
    data = DataVersion("a" * 32 + ".dir", "c" * 40, "data", str(tmp_path / "data.dvc"))
    base = DataVersion("b" * 32 + ".dir", None, "base-model", str(tmp_path / "base-model.dvc"))
    training, base_model = lineage.dataset_inputs(data, base)
    assert (training.name, training.digest, training.context) == ("data", data.dvc_md5, "training")
    assert training.source == {"uri": str(tmp_path / "data"), "dvc_file": data.dvc_file, "dvc_commit": "c" * 40}
    assert (base_model.digest, base_model.context) == (base.dvc_md5, schema.DATASET_CONTEXT_BASE_MODEL)
    assert len(training.digest) <= 36, "MLflow's dataset digest column"
    assert [i.context for i in lineage.dataset_inputs(data)] == [schema.DATASET_CONTEXT_TRAINING]


def test_card_facts_come_from_the_run_tags() -> None:
    tags = {
        schema.DATA_MD5: "md5-v1",
        schema.DATA_PATH: "data",
        schema.BASE_MD5: "md5-base",
        schema.CODE_GIT_COMMIT: "1" * 40,
        schema.VALIDATION_SYNTHETIC: '{"train_fraction": 0.25, "by_model": {}}',
    }
    facts = lineage.model_card_facts(PipelineConfig(), OUTCOME, tags)
    assert (facts.version, facts.verdict, facts.run_id) == ("3", schema.VERDICT_PROMOTED, "run-1")
    assert (facts.data.dvc_md5, facts.base_model_version.dvc_md5, facts.code.git_commit) == (
        "md5-v1",
        "md5-base",
        "1" * 40,
    )
    assert facts.synthetic_share == 0.25 and facts.data.data_dvc_commit is None
