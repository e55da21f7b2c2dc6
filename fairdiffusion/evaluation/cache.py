"""Cache keys of generated images and features: model, data, extractor and generation settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from fairdiffusion.config import EvaluationConfig
from fairdiffusion.evaluation.features import FeatureExtractor


def fingerprint_files(paths: Sequence[Path]) -> str:
    """sha256 over the names and bytes of some files (a model's or a data split's version)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model_dir: str) -> str:
    """Version of a saved pipeline: a hash of its weights and configs."""
    root = Path(model_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".json", ".txt"})
    return fingerprint_files(files)


def cache_key(
    model_version: str,
    data_version: str,
    extractor: FeatureExtractor,
    subjects: Sequence[str],
    resolution: int,
    config: EvaluationConfig,
    dtype: str,
) -> str:
    key = {
        "model": model_version,
        "data": data_version,
        "extractor": [extractor.name, extractor.weights_hash, config.feature_resolution],
        "generation": [config.num_inference_steps, config.guidance_scale, config.seed, resolution, dtype],
        "subjects": list(subjects),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
