"""Image preprocessing shared by training and evaluation: one view of the data for both."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def load_real_images(image_paths: Sequence[str], resolution: int) -> np.ndarray:
    """Real test images as uint8 RGB (N x res x res x 3), prepared as training prepares them.

    Shorter side resized to ``resolution`` (PIL bicubic, antialiased), then centre-cropped:
    the model learnt that view of the data, so its samples are compared with it.
    """
    images = []
    for path in image_paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            scale = resolution / min(rgb.size)
            size = (max(resolution, round(rgb.width * scale)), max(resolution, round(rgb.height * scale)))
            rgb = rgb.resize(size, Image.Resampling.BICUBIC)
            left, top = (rgb.width - resolution) // 2, (rgb.height - resolution) // 2
            rgb = rgb.crop((left, top, left + resolution, top + resolution))
            images.append(np.asarray(rgb, dtype=np.uint8))
    return np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8)
