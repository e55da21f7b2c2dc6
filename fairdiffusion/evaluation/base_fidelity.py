"""The base bundle's own prompt fidelity: does it draw the clinical signs its pretraining prompts name?

Run as ``fairdiffusion base build`` finishes. A classifier trained on the pretraining images
(the labels their prompts name) recognises those labels in held-out pretraining images and
in the bundle's images for the same prompts, as the evaluation's prompt fidelity does for a
fine-tune. The demographic words of the pretraining prompts are random, so only the
clinical labels are asked; a base model that draws them as prompted has a working
conditioning path for a fine-tune to build on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from fairdiffusion.config import EvaluationConfig, FidelityConfig
from fairdiffusion.data.pretraining import PROMPTED_LABELS, PretrainingSet, generate_pretraining_set
from fairdiffusion.evaluation.fidelity import measure_fidelity
from fairdiffusion.evaluation.generation import generate_images
from fairdiffusion.evaluation.results import FidelityResult
from fairdiffusion.evaluation.slices import SliceSettings

#: Held-out pretraining images the bundle is asked to draw (seeded apart from the build's).
HELD_OUT = 200


def _rgb(data: PretrainingSet) -> tuple[np.ndarray, pd.DataFrame]:
    images = np.repeat(data.images[..., None], 3, axis=-1)
    return images, pd.DataFrame(data.labels)


def measure_base_fidelity(
    bundle: str | Path, train: PretrainingSet, resolution: int, seed: int, render_size: int | None
) -> FidelityResult:
    """Prompt fidelity of the bundle on ``HELD_OUT`` new pretraining prompts (10 DDIM steps, guidance 3: the demo's)."""
    held_out = generate_pretraining_set(HELD_OUT, resolution, seed + 1, render_size)
    real, rows = _rgb(held_out)
    generation = EvaluationConfig(num_inference_steps=10, guidance_scale=3.0, batch_size=50, seed=seed, device="cpu")
    generated = generate_images(str(bundle), held_out.prompts, resolution, generation).images
    config = FidelityConfig(resolution=resolution, epochs=15, labels=list(PROMPTED_LABELS))
    return measure_fidelity(_rgb(train), real, generated, rows, {}, config, SliceSettings(resamples=200, seed=seed))


def summarise(result: FidelityResult) -> dict[str, object]:
    """Per clinical label: visible, real and generated accuracy, majority rate, margin kept, group fidelities."""
    summary: dict[str, object] = {}
    for name, item in result.attributes.items():
        summary[name] = {
            "visible": item.visible,
            "accuracy_real": item.real_accuracy,
            "accuracy_generated": item.generated_accuracy,
            "majority_rate": item.majority_rate,
            "margin_retained": item.margin_retained,
            "fidelity": {g.group: g.fidelity for g in item.groups},
        }
    return summary


def base_fidelity_check(
    resolution: int, seed: int, render_size: int | None, progress: Callable[[str], None]
) -> Callable[[Path, PretrainingSet], dict[str, object]]:
    """The check ``build_base_bundle`` runs: measures, prints one line per label, returns the record."""

    def check(bundle: Path, train: PretrainingSet) -> dict[str, object]:
        summary = summarise(measure_base_fidelity(bundle, train, resolution, seed, render_size))
        for name, item in summary.items():
            assert isinstance(item, dict)
            shown = (
                "not visible in its real images"
                if not item["visible"]
                else (
                    f"accuracy real {item['accuracy_real']:.2f}, generated {item['accuracy_generated']:.2f}, "
                    f"majority {item['majority_rate']:.2f}: margin kept {item['margin_retained']:.2f}"
                )
            )
            progress(f"base model prompt fidelity, {name}: {shown}")
        return {"prompt_fidelity": summary}

    return check
