"""The demo's promises, on the repo's own DVC-versioned data and base model (pulled, never rebuilt).

- the base model draws fundus images: in raw pixel space (no learnt network) they are far
  closer to the real test images than uniform noise is;
- a candidate fine-tuned for one step has learnt nothing, and the demo policy rejects it
  with the reference rule named; its lineage names the base model's DVC version;
- that candidate is prompt-blind (the base model was pretrained on random demographic
  words), and the fidelity rule rejects it too, naming the rare group.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fairdiffusion.config import EvaluationConfig, load_config
from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.data.images import load_real_images
from fairdiffusion.data.versioning import resolve_data_version
from fairdiffusion.evaluation.generation import generate_images
from fairdiffusion.evaluation.reference import noise_ratio
from fairdiffusion.registry.promotion import read_lineage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pulled(pulled_checkout: Path) -> Path:
    """The checkout with the demo data and base model pulled (``conftest.py``), as ``make demo`` does."""
    return pulled_checkout


def test_the_base_model_draws_images_far_closer_to_the_real_ones_than_noise(pulled: Path) -> None:
    rows = load_fairgenmed(pulled / "data", ["test"]).reset_index(drop=True)
    real = load_real_images(list(rows["image_path"]), 32)
    config = EvaluationConfig(num_inference_steps=10, guidance_scale=3.0, batch_size=50, seed=1234)
    made = generate_images(str(pulled / "base-model"), rows["prompt"].tolist(), 32, config)
    # Measured: 0.04 for the base model, 0.02 for a 300-step demo fine-tune; noise is 1.
    assert noise_ratio(real, made.images) < 0.15


def test_a_one_step_candidate_is_rejected_by_the_reference_rule(
    prefect_harness: str, pulled: Path, tmp_path: Path
) -> None:
    # The session's Prefect server: without one, the flow would start an ephemeral server of its own.
    from flows.pipeline import fairdiffusion_pipeline

    document = yaml.safe_load((pulled / "configs" / "demo.yaml").read_text())
    document["data"]["path"] = str(pulled / "data")
    document["data"]["dvc_file"] = str(pulled / "data.dvc")
    document["model"] |= {"pretrained": str(pulled / "base-model"), "dvc_file": str(pulled / "base-model.dvc")}
    document["training"] |= {"max_steps": 1, "checkpoint_every": None, "output_dir": str(tmp_path / "train")}
    document["evaluation"] |= {
        "output_dir": str(tmp_path / "eval"),
        "extractor": {"name": "domain", "weights": str(pulled / "base-model")},
        "bootstrap_resamples": 50,
        "intersections": False,
        "clinical": {"enabled": False},
    }
    document["gate"]["policy"] = str(pulled / "policies" / "demo.yaml")
    document["tracking"] |= {
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "artifact_root": str(tmp_path / "mlartifacts"),
    }
    config_path = tmp_path / "one-step.yaml"
    config_path.write_text(yaml.safe_dump(document))

    state = fairdiffusion_pipeline(config_path=str(config_path), return_state=True)

    assert state.is_failed() and state.name == "Rejected", state
    outcome = state.result(raise_on_failure=False).outcome  # the GateRejected error carries it
    assert not outcome.promoted and not outcome.passed
    assert any("not better than the model it started from" in reason for reason in outcome.reasons), outcome.reasons
    # Prompt-blind: the rare group is never drawn as prompted, though the real images show it.
    asian = [r for r in outcome.reasons if r.startswith("prompt fidelity of race=Asian ")]
    assert asian and "< 0.80" in asian[0], outcome.reasons
    lineage = read_lineage(load_config(config_path).tracking, version=outcome.version)
    assert lineage.base_model.dvc_md5 == resolve_data_version(pulled / "base-model.dvc").dvc_md5
    assert lineage.to_dict()["base_model"]["dvc_md5"] == lineage.base_model.dvc_md5
