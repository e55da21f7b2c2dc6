"""The registered model as an MLflow pyfunc: prompts in, images out.

``mlflow.pyfunc.load_model("models:/fairdiffusion@champion").predict(
pandas.DataFrame({"prompt": [...]}))`` returns a uint8 array of images (N x H x W x 3).
The weights inside are the diffusers pipeline's safetensors files, loaded with the same
``from_pretrained`` path as training and evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

PIPELINE_ARTIFACT = "pipeline"
#: The models-from-code file that builds :class:`FairDiffusionPyfunc` when MLflow loads the model.
MODEL_CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
DEFAULT_PARAMS: dict[str, Any] = {
    "num_inference_steps": 20,
    "guidance_scale": 7.5,
    "seed": 0,
    "height": 0,  # 0: the UNet's native size
    "width": 0,
}


class FairDiffusionPyfunc(PythonModel):
    """Generates one image per prompt with the registered Stable Diffusion pipeline."""

    def load_context(self, context: Any) -> None:
        """Load the pipeline from the model's ``pipeline`` artifact (offline)."""
        from fairdiffusion.models.loading import load_pipeline

        self.pipeline = load_pipeline(context.artifacts[PIPELINE_ARTIFACT])
        self.pipeline.set_progress_bar_config(disable=True)

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """Images for ``model_input["prompt"]``; params: steps, guidance, seed, size."""
        # `pd.DataFrame` is a hint MLflow derives no schema from: the explicit signature
        # (model_signature) stands. Unhinted, MLflow warns on every load to add hints; other
        # hints (list[str]) would make it wrap predict with its own input conversion.
        import torch

        settings = DEFAULT_PARAMS | (params or {})
        prompts = [str(p) for p in model_input["prompt"]]
        size = int(self.pipeline.unet.config.sample_size) * int(self.pipeline.vae_scale_factor)
        generators = [torch.Generator().manual_seed(int(settings["seed"]) + i) for i in range(len(prompts))]
        result = self.pipeline(
            prompts,
            num_inference_steps=int(settings["num_inference_steps"]),
            guidance_scale=float(settings["guidance_scale"]),
            height=int(settings["height"]) or size,
            width=int(settings["width"]) or size,
            generator=generators,
            output_type="np",
        )
        return (np.clip(result.images, 0, 1) * 255).round().astype(np.uint8)


def model_signature() -> Any:
    """The signature: a ``prompt`` string column in; uint8 images out; generation params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    params = ParamSchema(
        [ParamSpec(name, "double" if isinstance(v, float) else "long", v) for name, v in DEFAULT_PARAMS.items()]
    )
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        params=params,
    )
