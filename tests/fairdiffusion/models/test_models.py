"""Tests for the tiny pipeline, the loading path and ``model.pretrained`` resolution."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from fairdiffusion.config import FAIRGENMED_ATTRIBUTES
from fairdiffusion.data.catalog import CLINICAL_LABELS
from fairdiffusion.data.fairgenmed import build_prompt
from fairdiffusion.errors import ConfigError
from fairdiffusion.models import loading as models
from fairdiffusion.models import presets
from fairdiffusion.models.loading import ModelComponents, load_pipeline, load_training_components, resolve_pretrained
from fairdiffusion.models.tiny import build_tiny_pipeline

WEIGHT_FILES = [
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_pipeline_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tiny_pipeline_dir, subfolder="tokenizer", local_files_only=True)


def all_prompts() -> list[str]:
    """Every FairGenMed prompt the clinical labels and groups can make."""
    return [
        build_prompt(*combo)
        for combo in itertools.product(
            FAIRGENMED_ATTRIBUTES["race"],
            FAIRGENMED_ATTRIBUTES["gender"],
            FAIRGENMED_ATTRIBUTES["ethnicity"],
            CLINICAL_LABELS["glaucoma"],
            CLINICAL_LABELS["md_severity"],
            CLINICAL_LABELS["cdr_status"],
            CLINICAL_LABELS["se_status"],
        )
    ]


def test_tiny_pipeline_is_in_diffusers_layout_with_safetensors(tiny_pipeline_dir: Path) -> None:
    assert (tiny_pipeline_dir / "model_index.json").is_file()
    for name in WEIGHT_FILES:
        assert (tiny_pipeline_dir / name).is_file(), name
    assert not list(tiny_pipeline_dir.rglob("*.bin"))  # no pickled weights
    for sub in ("tokenizer", "scheduler"):
        assert (tiny_pipeline_dir / sub).is_dir()


def test_round_trip_through_load_pipeline(tiny_pipeline_dir: Path) -> None:
    pipeline = load_pipeline(str(tiny_pipeline_dir))
    assert isinstance(pipeline, StableDiffusionPipeline)
    assert isinstance(pipeline.unet, UNet2DConditionModel) and isinstance(pipeline.vae, AutoencoderKL)
    assert isinstance(pipeline.text_encoder, CLIPTextModel) and isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.safety_checker is None
    saved = load_file(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    state = pipeline.unet.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size == 32


def test_build_is_seeded(tmp_path: Path) -> None:
    a = build_tiny_pipeline(tmp_path / "a", seed=3)
    b = build_tiny_pipeline(tmp_path / "b", seed=3)
    c = build_tiny_pipeline(tmp_path / "c", seed=4)
    name = "unet/diffusion_pytorch_model.safetensors"
    wa, wb, wc = (load_file(p / name) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_training_components_load(tiny_pipeline_dir: Path) -> None:
    tokenizer, text_encoder, vae, unet, scheduler = load_training_components(str(tiny_pipeline_dir))
    assert isinstance(scheduler, DDPMScheduler) and scheduler.config.num_train_timesteps == 1000
    assert isinstance(unet, UNet2DConditionModel) and isinstance(vae, AutoencoderKL)
    assert tokenizer.model_max_length == 77


def test_training_components_are_named(tiny_pipeline_dir: Path) -> None:
    components = load_training_components(str(tiny_pipeline_dir))
    assert isinstance(components, ModelComponents)
    assert components.unet is components[3] and isinstance(components.noise_scheduler, DDPMScheduler)
    assert components._fields == ("tokenizer", "text_encoder", "vae", "unet", "noise_scheduler")


def test_tokenizer_max_length(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.model_max_length == 77


def test_example_prompt_tokenises_without_unknown_tokens(tokenizer: CLIPTokenizer) -> None:
    prompt = build_prompt("Black", "Female", "Non-Hispanic", "glaucoma", "mild", "borderline", "positive")
    ids = tokenizer(prompt).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) < 77
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert "<|endoftext|>" not in tokens[:-1]
    assert "black</w>" in tokens and "hispanic</w>" in tokens  # vocabulary words, not letters
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == prompt.lower().replace(" ", "")


def test_every_fairgenmed_prompt_fits(tokenizer: CLIPTokenizer) -> None:
    prompts = all_prompts()
    assert len(prompts) == 3 * 2 * 2 * 2 * 4 * 3 * 3
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for ids in tokenizer(prompts).input_ids:
        assert len(ids) < 77
        assert ids[-1] == eos and eos not in ids[:-1]


def test_resolve_tiny_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "tiny"
    assert resolve_pretrained("tiny", folder, allow_download=False) == str(folder)
    assert (folder / "model_index.json").is_file()

    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("rebuilt an existing tiny pipeline")

    monkeypatch.setattr(models, "build_tiny_pipeline", fail)
    assert resolve_pretrained("tiny", folder, allow_download=False) == str(folder)


def test_resolve_local_pipeline_folder(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    assert resolve_pretrained(str(tiny_pipeline_dir), tmp_path / "unused", False) == str(tiny_pipeline_dir)
    assert not (tmp_path / "unused").exists()


def test_resolve_hub_id_without_allow_download(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allow_download") as info:
        resolve_pretrained("runwayml/stable-diffusion-v1-5", tmp_path / "tiny", allow_download=False)
    assert "model.pretrained: 'runwayml/stable-diffusion-v1-5'" in str(info.value)


def test_resolve_hub_id_with_allow_download_is_passed_through(tmp_path: Path) -> None:
    assert resolve_pretrained("org/model", tmp_path / "tiny", allow_download=True) == "org/model"


def test_resolve_folder_without_model_index(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-pipeline"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="has no model_index.json") as info:
        resolve_pretrained(str(folder), tmp_path / "tiny", allow_download=True)
    assert str(folder) in str(info.value)


@pytest.mark.parametrize(
    ("preset", "unet_params", "text_params", "prediction_type"),
    [
        # The published checkpoints' sizes: the presets are the real architectures.
        ("sd-1.5", 859_520_964, 123_060_480, "epsilon"),
        ("sd-2.1", 865_910_724, 340_387_840, "v_prediction"),
    ],
)
def test_full_size_presets_match_the_published_architectures(
    preset: str, unet_params: int, text_params: int, prediction_type: str
) -> None:
    tokenizer, text_encoder, vae, unet, scheduler = presets.build_preset_components(preset, device="meta")
    assert sum(p.numel() for p in unet.parameters()) == unet_params
    assert sum(p.numel() for p in text_encoder.parameters()) == text_params
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert scheduler.config.prediction_type == prediction_type
    assert tokenizer.model_max_length == 77


def test_presets_resolve_without_a_folder_or_download(tmp_path: Path) -> None:
    for preset in ("sd-1.5", "sd-2.1"):
        assert resolve_pretrained(preset, tmp_path / "tiny", allow_download=False) == preset
    assert not (tmp_path / "tiny").exists()
    assert set(presets.PRESETS) == {"tiny", "sd-1.5", "sd-2.1"}
