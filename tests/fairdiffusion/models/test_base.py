"""The base bundle builder, on a miniature spec: real classes, saved and loaded the production way."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fairdiffusion.config import ExtractorConfig
from fairdiffusion.data.pretraining import LOOK_WORDS, PROMPTED_LABELS, PretrainingSet, generate_pretraining_set
from fairdiffusion.errors import ConfigError
from fairdiffusion.evaluation.base_fidelity import measure_base_fidelity, summarise
from fairdiffusion.evaluation.features import build_extractor
from fairdiffusion.models.base import BaseBuildSpec, build_base_bundle, check_bundle_resolution
from fairdiffusion.models.loading import load_pipeline

MINI = BaseBuildSpec(images=24, batch_size=4, vae_batch_size=4, vae_steps=2, unet_steps=2, extractor_steps=2)


@pytest.fixture(scope="module")
def mini_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "bundle"
    build_base_bundle(out, MINI, progress=lambda _: None)
    return out


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_the_bundle_loads_as_a_pipeline_and_draws_images(mini_bundle: Path) -> None:
    pipeline = load_pipeline(str(mini_bundle))
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(["SLO fundus image"], height=32, width=32, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 32, 32, 3)
    assert (mini_bundle / "fairdiffusion_base.json").is_file()


def test_the_build_is_reproducible(mini_bundle: Path, tmp_path: Path) -> None:
    again = build_base_bundle(tmp_path / "again", MINI, progress=lambda _: None)
    assert _digest(Path(again.bundle_dir)) == _digest(mini_bundle)


def test_the_domain_extractor_ships_in_the_bundle(mini_bundle: Path) -> None:
    extractor = build_extractor(ExtractorConfig(name="domain", weights=mini_bundle))
    assert extractor.name == "fundus-enc64" and not extractor.has_classifier_head
    features = extractor(torch.rand(3, 3, 32, 32))
    assert features.shape == (3, 64) and features.dtype == torch.float64
    with pytest.raises(ConfigError, match="extractor"):
        build_extractor(ExtractorConfig(name="domain", weights=mini_bundle.parent / "absent"))


def test_a_bundle_of_another_resolution_is_refused_before_training(mini_bundle: Path) -> None:
    check_bundle_resolution(str(mini_bundle), 32)
    with pytest.raises(ConfigError, match=r"training.resolution is 64.*built for 32"):
        check_bundle_resolution(str(mini_bundle), 64)


def test_the_pretraining_set_names_no_group_and_its_captions_describe_the_look() -> None:
    """No demographic word appears; the tone word follows the brightness and the texture word the texture."""
    data = generate_pretraining_set(300, 32, seed=3)
    words = {w.strip(",").lower() for p in data.prompts for w in p.split()}
    assert not words & {"asian", "black", "white", "female", "male", "hispanic", "non-hispanic"}
    brightness = data.images.reshape(len(data.images), -1).mean(axis=1)
    tones = ("dark", "medium", "pale")
    by_tone = {tone: brightness[[f" a {tone} " in p for p in data.prompts]].mean() for tone in tones}
    assert by_tone["dark"] + 5 < by_tone["medium"] < by_tone["pale"] - 5
    tessellated = np.array([" tessellated " in p for p in data.prompts])
    assert 0.35 < tessellated.mean() < 0.65
    rough = np.abs(np.diff(data.images.astype(float), axis=2)).mean(axis=(1, 2))
    assert rough[tessellated].mean() > rough[~tessellated].mean()
    assert set(LOOK_WORDS) <= words


def test_the_build_runs_its_check_on_the_written_bundle_and_records_it(tmp_path: Path) -> None:
    seen: list[tuple[bool, int]] = []

    def check(bundle: Path, train: PretrainingSet) -> dict[str, object]:
        seen.append(((bundle / "unet").is_dir(), len(train.labels)))
        return {"prompt_fidelity": {"cdr_status": {"margin_retained": 0.5}}}

    build_base_bundle(tmp_path / "b", MINI, progress=lambda _: None, check=check)
    assert seen == [(True, MINI.images)]
    record = json.loads((tmp_path / "b" / "fairdiffusion_base.json").read_text())
    assert record["prompt_fidelity"]["cdr_status"]["margin_retained"] == 0.5 and "check" in record["result"]["seconds"]


def test_the_base_models_prompt_fidelity_is_measured_on_its_clinical_labels(mini_bundle: Path) -> None:
    train = generate_pretraining_set(60, 32, seed=0, render_size=64)
    summary = summarise(measure_base_fidelity(mini_bundle, train, 32, seed=0, render_size=64))
    assert set(summary) == set(PROMPTED_LABELS)
    assert all({"visible", "margin_retained", "fidelity"} <= set(item) for item in summary.values())  # type: ignore[operator]
