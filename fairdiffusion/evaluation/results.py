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
    #: Overall AUC per label of the same classifier trained on the real training images: the
    #: ceiling the data allows (``None``: not measured, as in reports from before it existed).
    real_trained_auc: dict[str, float] | None = None

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
class GroupFidelity:
    """One group's recognition rates, real and generated, and their ratio, with intervals."""

    group: str
    num_samples: int
    real_rate: float
    generated_rate: float
    fidelity: float
    real_interval: list[float]
    generated_interval: list[float]
    fidelity_interval: list[float]


@dataclass(frozen=True)
class AttributeFidelity:
    """Fidelity of one attribute: whether the real images show it, and every group's figures."""

    attribute: str
    kind: str
    classes: list[str]
    computable: bool
    visible: bool
    #: Why the attribute is not computable or not visible ('' when it is both).
    reason: str
    chance: float
    real_balanced_accuracy: float
    real_balanced_accuracy_interval: list[float]
    real_accuracy: float
    generated_accuracy: float
    #: Accuracy of always answering the test split's most frequent class.
    majority_rate: float
    #: (generated - majority) / (real - majority): the share of the real images' margin
    #: over the majority class that the generated images keep (NaN when real has none).
    margin_retained: float
    groups: list[GroupFidelity]

    @property
    def worst_group(self) -> GroupFidelity | None:
        """The group with the lowest fidelity (NaN last), or ``None`` without groups."""
        ranked = sorted(self.groups, key=lambda g: (not np.isfinite(g.fidelity), g.fidelity))
        return ranked[0] if ranked else None


@dataclass(frozen=True)
class FidelityResult:
    """Prompt fidelity of one model on one test split, per attribute and group."""

    classifier: str
    attributes: dict[str, AttributeFidelity]
    train_images: int
    test_images: int
    #: Whether the real-image classifier came from the cache (fitted once per data version).
    cached_classifier: bool
    seconds: float

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FidelityResult:
        """Inverse of :meth:`to_dict`."""
        raw = dict(data)
        attributes = {}
        for name, item in raw["attributes"].items():
            groups = [GroupFidelity(**g) for g in item["groups"]]
            attributes[name] = AttributeFidelity(**{**item, "groups": groups})
        return cls(**{**raw, "attributes": attributes})


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
    #: Prompt fidelity per attribute and group (a classifier trained on real images).
    fidelity: FidelityResult | None = None

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
        if raw.get("fidelity") is not None:
            raw["fidelity"] = FidelityResult.from_dict(raw["fidelity"])
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
