"""Image feature extractors behind FID. Pluggable, and never silently swapped.

- ``inception``: the standard FID network (Inception-v3 of Heusel et al., in the
  TorchScript form that clean-fid and StyleGAN3's metrics use), loaded only from a
  local file: ``evaluation.extractor.weights`` or the usual caches. If it is absent the
  run stops and says where it looked; it is never replaced by something else.
- ``domain``: the fundus encoder trained with the base model on its pretraining set only
  (:mod:`fairdiffusion.models.extractor`), loaded from the base bundle; its metrics are
  named ``fid_fundus-enc64`` so they are never read as Inception FIDs.
- ``randcnn``: a fixed, seeded, randomly initialised conv net that needs no weights.
  Random-feature FID tracks distribution shift but is on another scale than
  Inception FID, so every metric it produces carries its name (``fid_randcnn32``).

Each extractor reports a hash of its weights, recorded with every FID in the
evaluation protocol, and says whether it has a classifier head (for IS).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairdiffusion.config import ExtractorConfig
from fairdiffusion.errors import ConfigError
from fairdiffusion.evaluation.progress import progress_bar
from fairdiffusion.models.extractor import DomainExtractor

INCEPTION_FILENAME = "inception-2015-12-05.pt"


class FeatureExtractor(Protocol):
    """Maps images (float, [0, 1], shape N x 3 x H x W) to features (N x dim)."""

    name: str
    dim: int
    #: sha256 of the weights (file bytes, or the seeded parameters), for the protocol.
    weights_hash: str
    #: Whether :meth:`logits` gives class logits (Inception Score needs them).
    has_classifier_head: bool

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of already-extracted features (only with a classifier head)."""
        ...


class RandomConvExtractor(nn.Module):
    """A seeded random conv net: same seed, same weights, same features on any machine."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.name = f"randcnn{dim}"
        self.dim = dim
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, dim, 3, stride=2, padding=1),
                nn.ReLU(),
            )
            # He initialisation keeps activations on the scale of the input, so FIDs
            # are not vanishingly small numbers.
            for layer in self.net:
                if isinstance(layer, nn.Conv2d):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    nn.init.zeros_(layer.bias)  # type: ignore[arg-type]
        self.eval()
        digest = hashlib.sha256()
        for tensor in self.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
        self.weights_hash = digest.hexdigest()
        self.has_classifier_head = False

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled activations of the last layer."""
        return self.net(images * 2 - 1).mean(dim=(2, 3)).double()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """A random network has no classes; Inception Score is not defined for it."""
        raise ValueError(f"{self.name} has no classifier head")


class InceptionExtractor:
    """The FID Inception-v3 TorchScript network (2048-d pool features)."""

    name = "inception_v3"
    dim = 2048

    def __init__(self, weights: Path) -> None:
        self.weights = weights
        self.weights_hash = hashlib.sha256(weights.read_bytes()).hexdigest()
        self.model = torch.jit.load(str(weights), map_location="cpu").eval()
        output = getattr(self.model, "output", None)
        self._head = getattr(output, "weight", None)
        self.has_classifier_head = self._head is not None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of images in [0, 1]; the network expects 0-255 and resizes itself."""
        return self.model(images * 255.0, return_features=True).double()

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The 1008 class logits of pool features, without the output bias.

        The original Inception Score code multiplies the pool features by the softmax
        weights without the bias, and torch-fidelity's ``logits_unbiased`` (torchmetrics'
        IS default) does the same; so does this.
        """
        if self._head is None:
            raise ValueError(f"{self.weights} has no output layer; Inception Score is not defined")
        return features @ self._head.double().T


def inception_weight_candidates(configured: Path | None) -> list[Path]:
    """Where the Inception weights are looked for, in order."""
    if configured is not None:
        return [configured]
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return [
        torch_home / "hub" / "checkpoints" / INCEPTION_FILENAME,
        Path.home() / ".cache" / "fairdiffusion" / INCEPTION_FILENAME,
    ]


def build_extractor(config: ExtractorConfig) -> FeatureExtractor:
    """Build the configured extractor.

    Raises:
        ConfigError: if the Inception weights are not on disk (nothing is downloaded).
    """
    if config.name == "randcnn":
        return RandomConvExtractor(dim=config.dim)
    if config.name == "domain":
        return DomainExtractor(config.weights or Path("base-model"))
    candidates = inception_weight_candidates(config.weights)
    for path in candidates:
        if path.is_file():
            return InceptionExtractor(path)
    looked = ", ".join(str(p) for p in candidates)
    raise ConfigError(
        "evaluation.extractor: Inception-v3 FID weights not found (looked in "
        f"{looked}). Place {INCEPTION_FILENAME} there or set evaluation.extractor.weights; "
        "to run without them, name another extractor explicitly (e.g. name: randcnn)."
    )


def to_unit_batch(images: torch.Tensor | np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 images (N x H x W x 3) -> float N x 3 x res x res in [0, 1], bilinear antialiased resize.

    The one resize that every image fed to a network in evaluation goes through: FID
    features here and the clinical classifier (:mod:`fairdiffusion.evaluation.clinical`).
    """
    if isinstance(images, np.ndarray):
        # Contiguous first: the same pixels in another memory layout take other CPU kernels, whose
        # rounding differs enough to swap near-tied scores (fresh generation vs the PNG cache).
        images = torch.from_numpy(np.ascontiguousarray(images))
    batch = images.permute(0, 3, 1, 2).float() / 255.0
    if batch.shape[-2:] != (resolution, resolution):
        batch = F.interpolate(batch, size=(resolution, resolution), mode="bilinear", antialias=True)
    return batch.clamp(0, 1)


def extract_features(
    extractor: FeatureExtractor, images: torch.Tensor, resolution: int, batch_size: int = 64
) -> torch.Tensor:
    """Features of uint8 images (N x H x W x 3), resized with one antialiased protocol.

    Real and generated images go through exactly this function, so both see the same
    resize (:func:`to_unit_batch`) before the network.
    """
    chunks = []
    with progress_bar(len(images), "features", "image") as bar:
        for start in range(0, len(images), batch_size):
            chunks.append(extractor(to_unit_batch(images[start : start + batch_size], resolution)))
            bar.update(len(chunks[-1]))
    return torch.cat(chunks) if chunks else torch.empty(0, extractor.dim, dtype=torch.float64)
