"""One preprocessing: training's pixels are evaluation's pixels."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fairdiffusion.data.images import load_real_images, load_rgb, resize_and_crop
from fairdiffusion.training.dataset import FundusPromptDataset


def _tokenizer(prompts: list[str], **_: object) -> SimpleNamespace:
    return SimpleNamespace(input_ids=torch.zeros(len(prompts), 4, dtype=torch.long))


_tokenizer.model_max_length = 4  # type: ignore[attr-defined]


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (30, 47, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_training_pixels_equal_evaluation_pixels(tmp_path: Path, image_file: Path, mode: str) -> None:
    path = tmp_path / f"image_{mode}.png"
    Image.open(image_file).convert(mode).save(path)
    samples = pd.DataFrame({"image_path": [str(path)], "prompt": ["a fundus"], "race": ["Asian"]})
    dataset = FundusPromptDataset(samples, {"race": ["Asian", "Black"]}, _tokenizer, resolution=16)

    training = dataset[0]["pixel_values"].permute(1, 2, 0).numpy()
    evaluation = load_real_images([str(path)], 16)[0]

    assert evaluation.shape == (16, 16, 3) and evaluation.dtype == np.uint8
    np.testing.assert_array_equal(training, evaluation.astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(evaluation, load_rgb(path, 16))


def test_resize_and_crop_resizes_the_short_side_and_centres_the_crop(image_file: Path) -> None:
    with Image.open(image_file) as image:
        cropped = resize_and_crop(image, 20)
        resized = image.resize((31, 20), Image.Resampling.BICUBIC)
    assert cropped.size == (20, 20) and cropped.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(resized)[:, 5:25])


def test_resize_and_crop_places_the_crop_where_offsets_say(image_file: Path) -> None:
    seen = []

    def corner(slack_x: int, slack_y: int) -> tuple[int, int]:
        seen.append((slack_x, slack_y))
        return slack_x, 0

    with Image.open(image_file) as image:
        cropped = resize_and_crop(image, 20, corner)
        resized = image.resize((31, 20), Image.Resampling.BICUBIC)
    assert seen == [(11, 0)]
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(resized)[:, 11:])


def test_no_images_give_an_empty_stack() -> None:
    assert load_real_images([], 8).shape == (0, 8, 8, 3)
