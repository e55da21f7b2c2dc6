"""The fairness model card, rendered from in-memory results: front matter, sections, limitations."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from fairdiffusion.evaluation.results import EvaluationReport
from fairdiffusion.registry import schema
from fairdiffusion.registry.audit import CodeLineage, DataLineage
from fairdiffusion.registry.gate import GateDecision, RuleCheck
from fairdiffusion.registry.model_card import ModelCardFacts, render_model_card
from fairdiffusion.training.results import TrainingResult

FACTS = ModelCardFacts(
    model_name="fd-demo",
    version="3",
    run_id="run-abc",
    verdict=schema.VERDICT_PROMOTED,
    base_model="base-model",
    data=DataLineage(dvc_md5="0123456789abcdef0123456789abcdef.dir", data_dvc_commit="c" * 40, path="data"),
    base_model_version=DataLineage(dvc_md5="fedcba9876543210fedcba9876543210.dir", data_dvc_commit=None, path="b"),
    code=CodeLineage(git_commit="1" * 40, dirty=False),
    synthetic_share=0.0,
    policy_file="policies/demo.yaml",
)
DECISION = GateDecision(
    passed=True,
    checks=[RuleCheck("max_es_fid", "es_fid_randcnn8/race", 12.5, 40.0, True, "ES-FID on race 12.5 <= 40")],
    policy={"name": "demo"},
    compared_with_version="2",
    policy_hash="a" * 64,
)
REPORT = EvaluationReport(
    extractor="randcnn8",
    slices={
        "overall": {"fid": 10.0, "kid": 0.02, "num_samples": 30.0},
        "race/Asian": {"fid": 11.0, "kid": 0.03, "num_samples": 4.0},
        "race/Black|x": {"fid": 12.0, "kid": 0.03, "num_samples": 6.0},
        "gender/Female": {"fid": 10.5, "kid": 0.02, "num_samples": 15.0},
    },
    equity={"race": {"es": 12.5, "worst_group": "Black"}},
    metrics={},
    image_dir="",
    num_images=30,
    protocol={},
)
TRAINING = TrainingResult(
    model_dir="/tmp/x",
    method="fair",
    steps=4,
    final_loss=0.1,
    seconds=1.0,
    sigma_names=[],
    final_sigma=None,
    windows=[],
)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_front_matter_follows_the_diffusers_convention() -> None:
    meta = _front_matter(render_model_card(FACTS, DECISION, REPORT, TRAINING))
    assert meta["library_name"] == "diffusers" and meta["base_model"] == "base-model"
    assert meta["pipeline_tag"] == "text-to-image"
    assert {"diffusers", "fairness", "fairness-gate-promoted"} <= set(meta["tags"])


def test_card_has_the_gate_decision_before_the_subgroup_table() -> None:
    card = render_model_card(FACTS, DECISION, REPORT, TRAINING)
    sections = ["## Fairness gate decision", "## Subgroup metrics", "## Versions", "## Intended use", "## Limitations"]
    assert [card.index(s) for s in sections] == sorted(card.index(s) for s in sections)
    assert "passed the fairness gate and was made champion" in card
    assert "compared with champion v2" in card and "a" * 64 in card
    assert "| max_es_fid | es_fid_randcnn8/race | 12.5 | 40 | pass |" in card


def test_subgroup_table_keeps_every_slice_with_its_size() -> None:
    card = render_model_card(FACTS, DECISION, REPORT, TRAINING)
    assert "| slice | n | fid (randcnn8) | kid (randcnn8) |" in card
    assert "| race/Asian | 4 | 11 | 0.03 |" in card
    assert "| race/Black\\|x | 6 | 12 | 0.03 |" in card  # a pipe in a name does not break the table
    assert "| race | 12.5 | Black |" in card


def test_card_names_the_data_base_model_and_code_versions() -> None:
    card = render_model_card(FACTS, DECISION, REPORT, TRAINING)
    for needle in (FACTS.data.dvc_md5, FACTS.base_model_version.dvc_md5, "1" * 40, "c" * 40):
        assert needle in card


def test_limitations_name_the_extractor_smallest_slice_and_attributes() -> None:
    card = render_model_card(FACTS, DECISION, REPORT, TRAINING)
    limitations = card[card.index("## Limitations") :]
    assert "`randcnn8` feature extractor, a fixed random (untrained) CNN" in limitations
    assert "smallest subgroup slice has 4 test images" in limitations
    assert "across gender, race only" in limitations
    assert "none of the training images were generated" in limitations


@pytest.mark.parametrize(
    ("share", "extractor", "base", "needles"),
    [
        (0.25, "inception_v3", "base-model", ["25.0% of the training images", "Inception-v3 trained on natural"]),
        (0.0, "fundus-enc64", "tiny", ["domain encoder", "preset with random weights"]),
    ],
)
def test_limitations_follow_the_facts(share: float, extractor: str, base: str, needles: list[str]) -> None:
    facts = dataclasses.replace(FACTS, synthetic_share=share, base_model=base)
    card = render_model_card(facts, DECISION, dataclasses.replace(REPORT, extractor=extractor), TRAINING)
    for needle in needles:
        assert needle in card


def test_a_rejected_version_lists_every_violation() -> None:
    failed = dataclasses.replace(
        DECISION, passed=False, reasons=["ES-FID on race 50 > 40", "gap 21 > 5"], compared_with_version=None
    )
    facts = dataclasses.replace(FACTS, verdict=schema.VERDICT_REJECTED)
    card = render_model_card(facts, failed, REPORT, TRAINING)
    assert "failed the fairness gate and was not promoted" in card and "**FAILED**" in card
    assert "- ES-FID on race 50 > 40\n- gap 21 > 5\n" in card and "compared with no champion" in card
    assert "fairness-gate-rejected" in _front_matter(card)["tags"]


def test_the_card_is_the_same_on_a_retry() -> None:
    assert render_model_card(FACTS, DECISION, REPORT, TRAINING) == render_model_card(FACTS, DECISION, REPORT, TRAINING)


def test_the_card_carries_prompt_fidelity_per_group_and_says_what_is_not_visible() -> None:
    import numpy as np

    from fairdiffusion.evaluation.fidelity import compute_attribute_fidelity
    from fairdiffusion.evaluation.results import FidelityResult
    from fairdiffusion.evaluation.slices import SliceSettings

    settings = SliceSettings(resamples=20, seed=0)
    targets = np.repeat(np.arange(3), 10)
    blind = np.full(30, 1)
    race = compute_attribute_fidelity(
        "race", "protected", ["Asian", "Black", "White"], targets, (targets, blind), settings, 0.1
    )
    guesses = np.tile([0, 1], 15)
    gender = compute_attribute_fidelity(
        "gender", "protected", ["Female", "Male"], targets % 2, (guesses, guesses), settings, 0.1
    )
    fidelity = FidelityResult("small", {"race": race, "gender": gender}, 60, 30, False, 0.1)
    card = render_model_card(FACTS, DECISION, dataclasses.replace(REPORT, fidelity=fidelity), TRAINING)
    assert "## Prompt fidelity" in card
    assert "| race | Asian | 10 | 1 | 0 | 0 |" in card and "| race | Black | 10 | 1 | 1 | 1 |" in card
    assert "| gender | – | – | – | – | – | not visible in the real images" in card
    assert "Not measured" in render_model_card(FACTS, DECISION, REPORT, TRAINING)
