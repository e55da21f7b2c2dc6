"""References that make a FID mean something: the real-vs-real floor and the base model.

A FID alone says little: a model that learnt nothing has one too. Two references put it
on a scale (the style guide's rule that every gate compares with a reference):

- the floor: FID between two disjoint halves of the real test images, the distance that
  sampling alone produces at that size; the candidate is measured at the same halves, so
  ``fid_over_floor`` is 1 for a model as good as real data and grows as it gets worse;
- the base model: the FID of the model the candidate was fine-tuned from, on the same
  test prompts and seeds; a fine-tune must beat it (the gate's reference rule).
"""

from __future__ import annotations

import numpy as np

from fairdiffusion.evaluation.image_metrics import fid_from_features
from fairdiffusion.evaluation.metric_keys import reference_keys

#: Seeded half splits averaged for the floor: one split's FID varies with the split.
FLOOR_SPLITS = 5


def _half_splits(count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng([seed, 20251])
    half = count // 2
    splits = []
    for _ in range(FLOOR_SPLITS):
        order = rng.permutation(count)
        splits.append((order[:half], order[half : 2 * half]))
    return splits


def floor_metrics(real: np.ndarray, generated: np.ndarray, extractor: str, seed: int) -> dict[str, float]:
    """Real-vs-real FID of the test halves, the candidate's FID at the same halves, and their ratio."""
    if len(real) < 4:
        return {}
    floors, halves = [], []
    for a, b in _half_splits(len(real), seed):
        floors.append(fid_from_features(real[a], real[b]))
        halves.append(fid_from_features(real[a], generated[b]))
    keys = reference_keys(extractor)
    floor, half = float(np.mean(floors)), float(np.mean(halves))
    return {keys["floor"]: floor, keys["half"]: half, keys["over_floor"]: half / floor if floor > 0 else float("nan")}


def reference_metrics(real: np.ndarray, base_generated: np.ndarray, extractor: str, seed: int) -> dict[str, float]:
    """The base model's overall FID on the same test prompts and seeds."""
    return {reference_keys(extractor)["base"]: fid_from_features(real, base_generated)}


def pixel_frechet(real: np.ndarray, other: np.ndarray, block: int = 4) -> float:
    """Fréchet distance in raw pixel space (grayscale, means of ``block`` x ``block`` pixels).

    An independent check that needs no trained network: what a person would call "looks
    like the real images" against what noise scores.
    """

    def pixels(images: np.ndarray) -> np.ndarray:
        gray = images.astype(np.float64).mean(axis=-1) if images.ndim == 4 else images.astype(np.float64)
        n, h, w = gray.shape
        rows, cols = h // block, w // block
        cells = gray[:, : rows * block, : cols * block].reshape(n, rows, block, cols, block)
        return cells.mean(axis=(2, 4)).reshape(n, -1) / 255.0

    return fid_from_features(pixels(real), pixels(other))


def noise_ratio(real: np.ndarray, generated: np.ndarray, seed: int = 0) -> float:
    """Pixel-space Fréchet distance of ``generated`` over that of uniform noise images (1 = as far as noise)."""
    noise = np.random.default_rng(seed).integers(0, 256, size=generated.shape, dtype=np.uint8)
    return pixel_frechet(real, generated) / pixel_frechet(real, noise)
