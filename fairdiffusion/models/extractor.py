"""The domain feature extractor behind the demo's FID: a small fundus encoder.

Inception-v3 features are the standard for FID, but its weights cannot be fetched here and
a random conv net measures little on fundus images. This encoder is trained (as the
bottleneck of an autoencoder) on the base model's pretraining set only
(:mod:`fairdiffusion.data.pretraining`), never on the demo's images, and ships in the base
bundle under ``extractor/``, versioned with it by DVC. Its metrics carry its name
(``fid_fundus-enc128/...``), so they are never read as Inception FIDs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fairdiffusion.errors import ConfigError

#: The bundle's sub-folder that holds the extractor.
EXTRACTOR_FOLDER = "extractor"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"


def _block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1), nn.GroupNorm(8, channels_out), nn.SiLU()
    )


def _up(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(channels_in, channels_out, 4, stride=2, padding=1),
        nn.GroupNorm(8, channels_out),
        nn.SiLU(),
    )


class FundusEncoder(nn.Module):
    """Images in [0, 1] (N x 3 x res x res, res = 64) -> ``dim`` features, through four stride-2 convs."""

    def __init__(self, dim: int = 128, resolution: int = 64) -> None:
        super().__init__()
        if resolution % 16:
            raise ValueError(f"resolution {resolution} must be a multiple of 16")
        self.dim, self.resolution = dim, resolution
        side = resolution // 16
        self.convs = nn.Sequential(_block(3, 32), _block(32, 64), _block(64, 128), _block(128, 128))
        self.project = nn.Linear(128 * side * side, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The bottleneck features (no activation): what FID compares."""
        return self.project(self.convs(images * 2 - 1).flatten(1))


class FundusDecoder(nn.Module):
    """The other half of the autoencoder the encoder is trained in; not shipped."""

    def __init__(self, dim: int = 128, resolution: int = 64) -> None:
        super().__init__()
        self.side = resolution // 16
        self.expand = nn.Linear(dim, 128 * self.side * self.side)
        self.ups = nn.Sequential(_up(128, 128), _up(128, 64), _up(64, 32), _up(32, 32), nn.Conv2d(32, 3, 3, padding=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstructed images in [-1, 1]."""
        grid = self.expand(features).view(len(features), 128, self.side, self.side)
        return torch.tanh(self.ups(grid))


def save_extractor(encoder: FundusEncoder, bundle_dir: Path) -> Path:
    """Write the encoder to ``<bundle>/extractor/`` (safetensors and its config)."""
    folder = bundle_dir / EXTRACTOR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(folder / _WEIGHTS))
    config = {"architecture": "FundusEncoder", "dim": encoder.dim, "resolution": encoder.resolution}
    (folder / _CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


class DomainExtractor:
    """A :class:`FundusEncoder` loaded from a bundle, as FID's :class:`FeatureExtractor`."""

    has_classifier_head = False

    def __init__(self, bundle_dir: Path) -> None:
        folder = Path(bundle_dir) / EXTRACTOR_FOLDER
        weights, config_file = folder / _WEIGHTS, folder / _CONFIG
        if not weights.is_file() or not config_file.is_file():
            raise ConfigError(
                f"evaluation.extractor: {folder} has no {_WEIGHTS} and {_CONFIG}; the domain extractor "
                "ships in the base bundle (`dvc pull base-model.dvc`, or `fairdiffusion base build`)"
            )
        config = json.loads(config_file.read_text())
        self.dim, self.resolution = int(config["dim"]), int(config["resolution"])
        self.name = f"fundus-enc{self.dim}"
        self.weights_hash = hashlib.sha256(weights.read_bytes()).hexdigest()
        self.model = FundusEncoder(self.dim, self.resolution)
        self.model.load_state_dict(load_file(str(weights)))
        self.model.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of images in [0, 1], resized to the encoder's resolution if needed."""
        if images.shape[-1] != self.resolution:
            images = nn.functional.interpolate(
                images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True
            )
        return self.model(images.float()).double()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """An encoder has no classes; Inception Score is not defined for it."""
        raise ValueError(f"{self.name} has no classifier head")
