"""A generation's config (the ceiling lifted only by its key), its per-group summary and the printed table."""

from __future__ import annotations

import math
from pathlib import Path

from fairdiffusion.config import PipelineConfig, parse_config
from fairdiffusion.registry.gate import GateDecision, RuleCheck
from fairdiffusion.registry.generations import (
    format_generations,
    generation_config,
    group_metrics,
    summarise_generation,
)

ATTRIBUTES = {"race": ["Asian", "White"]}


def test_the_ceilings_are_lifted_only_by_the_explicit_key(tmp_path: Path) -> None:
    kept = generation_config(PipelineConfig(), 1, tmp_path)
    assert kept.validation.max_synthetic_fraction == 0.2
    assert kept.validation.max_synthetic_fraction_per_group == 0.5
    lifted = generation_config(parse_config({"generations": {"max_synthetic_share": 1.0}}), 1, tmp_path)
    assert lifted.validation.max_synthetic_fraction == lifted.validation.max_synthetic_fraction_per_group == 1.0


def test_each_generation_has_its_own_data_outputs_and_experiment(tmp_path: Path) -> None:
    config = parse_config({"data": {"max_subjects_per_split": 5}, "generations": {"output_dir": str(tmp_path)}})
    first, second = generation_config(config, 0, None), generation_config(config, 1, tmp_path / "g1")
    assert first.data == config.data, "generation 0 trains on the configured real data"
    assert second.data.path == tmp_path / "g1" and not second.data.pull and second.data.max_subjects_per_split is None
    assert second.training.output_dir == tmp_path / "generation-1" / "train"
    assert first.evaluation.cache_dir == second.evaluation.cache_dir == tmp_path / "cache"
    assert second.tracking.experiment == "fairdiffusion-generations"
    assert config.validation == PipelineConfig().validation, "the experiment's own config is left alone"


def _metrics(recall: float) -> dict[str, float]:
    return {"fid_x/overall": 3.0, "recall_x/race/Asian": recall, "diversity_x/race/Asian": 0.5}


def test_summary_and_table_name_the_groups_and_the_guards_verdict() -> None:

    groups = group_metrics(_metrics(0.25) | {"fidelity/race/Asian": 0.9}, ATTRIBUTES, "x")
    assert groups["race/Asian"]["recall"] == 0.25 and math.isnan(groups["race/White"]["recall"])
    assert groups["race/Asian"]["fidelity"] == 0.9 and math.isnan(groups["race/White"]["fidelity"])
    failed = RuleCheck("madness_recall", "recall_x/race/Asian", 0.25, 0.6, False, "MADness: race=Asian lost 67%")
    decision = GateDecision(False, [failed], {}, reasons=[failed.detail])
    summary = summarise_generation(PipelineConfig(), 1, "run1", "run0", "augment", 0.5, _metrics(0.25), decision, "x")
    assert not summary.madness_passed and summary.madness_reasons == ["MADness: race=Asian lost 67%"]
    table = format_generations([summary])
    assert "generation 1 (augment, synthetic 50%, run run1, parent run0): MADness: race=Asian lost 67%" in table
    assert "race/Asian" in table and "0.250" in table
