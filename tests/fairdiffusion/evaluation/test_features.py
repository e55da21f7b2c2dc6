"""Tests for the feature extractors behind FID."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fairdiffusion.config import ExtractorConfig
from fairdiffusion.errors import ConfigError
from fairdiffusion.evaluation.features import (
    INCEPTION_FILENAME,
    InceptionExtractor,
    RandomConvExtractor,
    build_extractor,
    extract_features,
    inception_weight_candidates,
)


class FakeInception(nn.Module):
    """Stands in for the FID TorchScript network: same call signature, 2048-d features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))  # (N, 3)
        if return_features:
            return pooled.repeat(1, 683)[:, :2048]
        return torch.zeros(x.shape[0], 1008)


@pytest.fixture
def scripted_inception(tmp_path: Path) -> Path:
    path = tmp_path / "fake-inception.pt"
    torch.jit.script(FakeInception()).save(str(path))
    return path


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Inception weights anywhere the extractor looks."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    return home


def test_random_conv_extractor_is_deterministic() -> None:
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = RandomConvExtractor(dim=24), RandomConvExtractor(dim=24)
    fa, fb = a(images), b(images)
    assert fa.shape == (5, 24) and fa.dtype == torch.float64
    assert torch.equal(fa, fb)
    assert a.name == "randcnn24" and a.dim == 24
    assert fa.std() > 0  # not a degenerate all-zero map


def test_random_conv_extractor_seed_matters_and_global_rng_untouched() -> None:
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(99)
    before = torch.rand(2)
    torch.manual_seed(99)
    other = RandomConvExtractor(dim=8, seed=1)
    after = torch.rand(2)
    assert torch.equal(before, after)
    assert not torch.equal(RandomConvExtractor(dim=8, seed=0)(images), other(images))


def test_build_extractor_randcnn() -> None:
    extractor = build_extractor(ExtractorConfig(name="randcnn", dim=16))
    assert isinstance(extractor, RandomConvExtractor)
    assert extractor.name == "randcnn16" and extractor.dim == 16


def test_inception_without_weights_raises_and_never_falls_back(empty_caches: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_extractor(ExtractorConfig(name="inception"))
    message = str(info.value)
    assert message.startswith("evaluation.extractor:")
    assert str(empty_caches / "torch" / "hub" / "checkpoints" / INCEPTION_FILENAME) in message
    assert str(empty_caches / ".cache" / "fairdiffusion" / INCEPTION_FILENAME) in message


def test_inception_with_missing_configured_weights_names_that_path(tmp_path: Path, empty_caches: Path) -> None:
    missing = tmp_path / "nowhere" / "inception.pt"
    # Even with a file in the default cache, a configured path is the only place looked.
    cache = empty_caches / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / INCEPTION_FILENAME).write_bytes(b"x")
    assert inception_weight_candidates(missing) == [missing]
    with pytest.raises(ConfigError, match="weights not found") as info:
        build_extractor(ExtractorConfig(name="inception", weights=missing))
    assert f"looked in {missing})" in str(info.value)


def test_inception_found_in_torch_cache(scripted_inception: Path, empty_caches: Path) -> None:
    cache = empty_caches / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / INCEPTION_FILENAME).write_bytes(scripted_inception.read_bytes())
    extractor = build_extractor(ExtractorConfig(name="inception"))
    assert isinstance(extractor, InceptionExtractor)
    assert extractor.weights == cache / INCEPTION_FILENAME


def test_inception_loading_path_on_a_torchscript_module(scripted_inception: Path) -> None:
    extractor = build_extractor(ExtractorConfig(name="inception", weights=scripted_inception))
    assert isinstance(extractor, InceptionExtractor)
    assert extractor.name == "inception_v3" and extractor.dim == 2048
    images = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    features = extractor(images)
    assert features.shape == (3, 2048) and features.dtype == torch.float64
    # The network is given 0-255 input and asked for its pool features.
    expected = (images * 255.0).mean(dim=(2, 3)).double()
    torch.testing.assert_close(features[:, :3], expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(features[:, 3:6], expected, rtol=1e-5, atol=1e-4)


class Recorder:
    """A fake extractor that records what it is given."""

    name = "recorder"
    dim = 3

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(images)
        return images.mean(dim=(2, 3)).double()


def test_extract_features_resizes_to_the_feature_resolution() -> None:
    images = torch.randint(0, 256, (7, 20, 30, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    recorder = Recorder()
    features = extract_features(recorder, images, resolution=16, batch_size=3)
    assert [tuple(b.shape) for b in recorder.batches] == [(3, 3, 16, 16), (3, 3, 16, 16), (1, 3, 16, 16)]
    assert all(b.dtype == torch.float32 and b.min() >= 0 and b.max() <= 1 for b in recorder.batches)
    assert features.shape == (7, 3)


def test_extract_features_keeps_images_already_at_resolution() -> None:
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    recorder = Recorder()
    extract_features(recorder, images, resolution=16)
    torch.testing.assert_close(recorder.batches[0], images.permute(0, 3, 1, 2).float() / 255.0)


def test_extract_features_with_real_extractor_and_empty_input() -> None:
    extractor = RandomConvExtractor(dim=8)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    assert extract_features(extractor, images, resolution=16).shape == (4, 8)
    empty = extract_features(extractor, images[:0], resolution=16)
    assert empty.shape == (0, 8) and empty.dtype == torch.float64


def test_weights_hash_names_the_exact_weights(scripted_inception: Path) -> None:
    import hashlib

    assert RandomConvExtractor(dim=8).weights_hash == RandomConvExtractor(dim=8).weights_hash
    assert RandomConvExtractor(dim=8).weights_hash != RandomConvExtractor(dim=8, seed=1).weights_hash
    extractor = InceptionExtractor(scripted_inception)
    assert extractor.weights_hash == hashlib.sha256(scripted_inception.read_bytes()).hexdigest()


class FakeInceptionWithHead(FakeInception):
    """The FID network's layout: pool features, then ``output`` (2048 -> 1008 logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.output = nn.Linear(2048, 1008)


def test_inception_logits_use_the_output_weights_without_bias(tmp_path: Path) -> None:
    path = tmp_path / "with-head.pt"
    module = FakeInceptionWithHead()
    torch.jit.script(module).save(str(path))
    extractor = InceptionExtractor(path)
    assert extractor.has_classifier_head
    features = torch.rand(4, 2048, dtype=torch.float64)
    expected = features @ module.output.weight.detach().double().T
    torch.testing.assert_close(extractor.logits(features), expected)


def test_extractors_without_a_head_refuse_logits(scripted_inception: Path) -> None:
    for extractor in (RandomConvExtractor(dim=8), InceptionExtractor(scripted_inception)):
        assert not extractor.has_classifier_head
        with pytest.raises(ValueError, match="Inception Score|classifier head"):
            extractor.logits(torch.zeros(1, extractor.dim, dtype=torch.float64))


#: torch-fidelity's port of the same network, which torchmetrics' FID uses.
TORCH_FIDELITY_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def test_fid_equals_torchmetrics_frechet_inception_distance_on_the_same_images() -> None:
    """Where the Inception weights are on disk: our FID and torchmetrics' agree within 1e-3."""
    import importlib.util

    from fairdiffusion.evaluation.image_metrics import fid_from_features

    ours = next((p for p in inception_weight_candidates(None) if p.is_file()), None)
    if ours is None:
        looked = ", ".join(str(p) for p in inception_weight_candidates(None))
        pytest.skip(f"no FID Inception weights ({INCEPTION_FILENAME}) on this machine (looked in {looked})")
    theirs = ours.parent / TORCH_FIDELITY_WEIGHTS
    if not theirs.is_file():
        pytest.skip(f"no torch-fidelity Inception weights (torchmetrics' network) at {theirs}")
    fid_module = pytest.importorskip("torchmetrics.image.fid", reason="torchmetrics is not installed")
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity (torchmetrics' Inception network) is not installed")
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, 299, 299, generator=generator)
    real = ((base + 0.3 * torch.rand(60, 3, 299, 299, generator=generator)).clamp(0, 1) * 255).to(torch.uint8)
    fake = ((base.flip(-1) + 0.4 * torch.rand(60, 3, 299, 299, generator=generator)).clamp(0, 1) * 255).to(torch.uint8)
    extractor = InceptionExtractor(ours)
    features = [extract_features(extractor, x.permute(0, 2, 3, 1), 299).numpy() for x in (real, fake)]
    metric = fid_module.FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(theirs))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert fid_from_features(*features) == pytest.approx(float(metric.compute()), rel=1e-3)
