"""What evaluation returns: the report of one model, and the images it generated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fairdiffusion.evaluation.comparison import BaselineComparison
from fairdiffusion.evaluation.slices import SliceAnalysis


@dataclass(frozen=True)
class ClinicalResult:
    """AUC of a classifier trained on generated images and tested on real ones, per slice."""

    classifier: str
    classes: dict[str, list[str]]  # label -> class names, in score-column order
    analysis: SliceAnalysis  # metrics are the labels; values are macro one-vs-rest AUCs
    train_images: int
    test_images: int
    epochs: int
    final_loss: float
    seconds: float

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClinicalResult:
        """Inverse of :meth:`to_dict`."""
        raw = dict(data)
        raw["analysis"] = SliceAnalysis.from_dict(raw["analysis"])
        return cls(**raw)


@dataclass(frozen=True)
class EvaluationReport:
    """Per-slice image quality, equity, and clinical semantics of one model on one test split.

    ``slices``, ``equity`` and ``metrics`` keep the shapes the gate reads: ``slices`` is
    ``{slice: {metric: value, "num_samples": n}}``, ``equity`` the FID equity per
    attribute, ``metrics`` every flat key (see :mod:`fairdiffusion.evaluation.slices`).
    :func:`fairdiffusion.evaluation.report.render_markdown` renders it.
    """

    extractor: str
    slices: dict[str, dict[str, float]]
    equity: dict[str, dict[str, float | str]]
    metrics: dict[str, float]
    image_dir: str
    num_images: int
    protocol: dict[str, object]
    quality: SliceAnalysis | None = None
    clinical: ClinicalResult | None = None
    #: Attribute -> sample grid PNG (real beside generated, per group).
    grids: dict[str, str] = field(default_factory=dict)
    #: The deltas from a ``method: baseline`` run on the same data version, when one exists.
    baseline: BaselineComparison | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form (the ``evaluation.json`` artifact)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Inverse of :meth:`to_dict` (e.g. an ``evaluation.json`` read back from MLflow)."""
        raw = dict(data)
        if raw.get("quality") is not None:
            raw["quality"] = SliceAnalysis.from_dict(raw["quality"])
        if raw.get("clinical") is not None:
            raw["clinical"] = ClinicalResult.from_dict(raw["clinical"])
        if raw.get("baseline") is not None:
            raw["baseline"] = BaselineComparison.from_dict(raw["baseline"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class GeneratedImages:
    """Images generated for the test prompts, and what it cost."""

    images: np.ndarray  # uint8 N x H x W x 3
    seconds: float
    device: str
    dtype: str

    @property
    def images_per_second(self) -> float:
        """Generation throughput."""
        return len(self.images) / self.seconds if self.seconds > 0 else float("nan")
