"""Image preprocessing shared by training and evaluation: one view of the data for both.

Training (:class:`fairdiffusion.training.dataset.FundusPromptDataset`) and evaluation
(:func:`load_real_images`) both go through :func:`resize_and_crop`, so the real images
that generated ones are compared with are the images the model learnt from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fairdiffusion import files

CropOffsets = Callable[[int, int], tuple[int, int]]
"""Maps the slack ``(width - resolution, height - resolution)`` to the crop's ``(left, top)``."""


def centre_offsets(slack_x: int, slack_y: int) -> tuple[int, int]:
    """The centre crop's ``(left, top)``."""
    return slack_x // 2, slack_y // 2


def resize_and_crop(image: Image.Image, resolution: int, offsets: CropOffsets = centre_offsets) -> Image.Image:
    """RGB, shorter side resized to ``resolution`` (PIL bicubic, antialiased), then cropped square.

    As diffusers' training scripts do. ``offsets`` places the crop (default: centred);
    training passes seeded random offsets for random crops.
    """
    rgb = image.convert("RGB")
    scale = resolution / min(rgb.size)
    size = (max(resolution, round(rgb.width * scale)), max(resolution, round(rgb.height * scale)))
    rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    left, top = offsets(rgb.width - resolution, rgb.height - resolution)
    return rgb.crop((left, top, left + resolution, top + resolution))


def load_rgb(path: str | Path, resolution: int) -> np.ndarray:
    """One image file as uint8 RGB (res x res x 3), resized and centre-cropped by :func:`resize_and_crop`.

    Raises:
        DatasetError: if the file is not a readable image.
    """
    return np.asarray(resize_and_crop(files.open_image(path), resolution), dtype=np.uint8)


def load_real_images(image_paths: Sequence[str], resolution: int) -> np.ndarray:
    """Real test images as uint8 RGB (N x res x res x 3), prepared as training prepares them.

    Shorter side resized to ``resolution`` (PIL bicubic, antialiased), then centre-cropped:
    the model learnt that view of the data, so its samples are compared with it.
    """
    images = [load_rgb(path, resolution) for path in image_paths]
    return np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8)
