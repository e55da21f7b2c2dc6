"""Clinical semantics: do the generated images carry what their prompts asked for?

As in the paper (FairDiffusion Sec. 4.3), a classifier is trained on the generated
images with the labels their prompts named (glaucoma, md_severity, cdr_status,
se_status) and tested on the real test images; its AUC overall and per subgroup, and
the equity-scaled AUC, say how much clinical meaning survives generation, and for whom.

One network with one head per label is trained, so every label costs one pass. The
backbone is configurable: ``small`` (a compact CNN trained from scratch, for CPUs and
the demo), or transformers' ``efficientnet`` / ``vit`` fine-tuned from local weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from fairdiffusion.config import ClinicalConfig
from fairdiffusion.data.catalog import CLINICAL_LABELS
from fairdiffusion.errors import ConfigError
from fairdiffusion.evaluation.features import to_unit_batch
from fairdiffusion.evaluation.progress import progress_bar
from fairdiffusion.evaluation.results import ClinicalResult
from fairdiffusion.evaluation.slices import SliceSettings, analyse_slices, define_slices

_IGNORE = -100


class _SmallCNN(nn.Module):
    """Three strided conv blocks and global pooling: enough to read disc and cup size."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dim = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


class _PretrainedBackbone(nn.Module):
    """A transformers EfficientNet or ViT returning one pooled vector per image."""

    def __init__(self, kind: str, source: str, allow_download: bool) -> None:
        super().__init__()
        from transformers import EfficientNetModel, ViTModel

        kwargs = {"local_files_only": not allow_download}
        self.kind = kind
        if kind == "vit":
            self.model = ViTModel.from_pretrained(source, add_pooling_layer=False, **kwargs)
            self.dim = int(self.model.config.hidden_size)
        else:
            self.model = EfficientNetModel.from_pretrained(source, **kwargs)
            self.dim = int(self.model.config.hidden_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "vit":
            # The classifier resolution need not be the pre-training one.
            hidden = self.model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
            return hidden[:, 0]
        return self.model(pixel_values=images).pooler_output.flatten(1)


class LabelClassifier(nn.Module):
    """A backbone with one linear head per prompted label."""

    def __init__(self, backbone: nn.Module, dim: int, classes: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({label: nn.Linear(dim, len(names)) for label, names in classes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.backbone(images)
        return {label: head(pooled) for label, head in self.heads.items()}


def build_classifier(config: ClinicalConfig, classes: Mapping[str, Sequence[str]]) -> LabelClassifier:
    """The configured backbone with a head per label.

    Raises:
        ConfigError: if pretrained weights cannot be loaded.
    """
    if config.classifier == "small":
        small = _SmallCNN()
        return LabelClassifier(small, small.dim, classes)
    try:
        backbone = _PretrainedBackbone(config.classifier, str(config.weights), config.allow_download)
    except OSError as error:
        raise ConfigError(
            f"evaluation.clinical.weights: cannot load {config.classifier} weights from '{config.weights}' ({error})"
        ) from None
    return LabelClassifier(backbone, backbone.dim, classes)


def ordered_classes(values: pd.Series, known: Sequence[str] = ()) -> list[str]:
    """The observed classes of a column: those of ``known`` in its order, then the others sorted."""
    observed = sorted(str(v) for v in values.dropna().unique())
    return [c for c in known if c in observed] + [c for c in observed if c not in known]


def label_classes(samples: pd.DataFrame, labels: Sequence[str]) -> dict[str, list[str]]:
    """Each label's classes: FairGenMed's known order, else the sorted observed values."""
    classes = {}
    for label in labels:
        if label not in samples:
            raise ConfigError(f"evaluation.clinical.labels: '{label}' is not a column of the sample table")
        classes[label] = ordered_classes(samples[label], CLINICAL_LABELS.get(label, ()))
    return classes


def encode_labels(samples: pd.DataFrame, classes: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """Class indices per label (unknown or missing values: -100, ignored)."""
    return {
        label: samples[label].map({c: i for i, c in enumerate(names)}).fillna(_IGNORE).to_numpy(np.int64)
        for label, names in classes.items()
    }


def _prepare(images: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x res x res in [-1, 1], antialiased resize."""
    # A numpy batch: to_unit_batch makes it contiguous first (see there), so the fresh
    # generation and the PNG cache give the same scores.
    return to_unit_batch(images, resolution) * 2 - 1


def train_classifier(
    images: np.ndarray,
    targets: Mapping[str, np.ndarray],
    classes: Mapping[str, Sequence[str]],
    config: ClinicalConfig,
    device: str = "cpu",
) -> tuple[LabelClassifier, float]:
    """Train the label classifier on (generated) images; returns it and the last epoch's loss.

    Seeded (initialisation and batch order); CPU kernels may still round differently
    between runs at the 1e-8 level, which can swap two near-tied scores in an AUC.
    """
    # Measured: after a diffusers generation in the same process, CPU training ran 3x
    # slower on denormal floats; flushing them to zero (off again afterwards, torch's
    # default) restores the speed and changes nothing above 1e-38.
    torch.set_flush_denormal(True)
    try:
        return _train(images, targets, classes, config, device)
    finally:
        torch.set_flush_denormal(False)


def _train(
    images: np.ndarray,
    targets: Mapping[str, np.ndarray],
    classes: Mapping[str, Sequence[str]],
    config: ClinicalConfig,
    device: str,
) -> tuple[LabelClassifier, float]:
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = build_classifier(config, classes).to(device)
        inputs = _prepare(images, config.resolution)
        labels = {k: torch.as_tensor(np.array(v, dtype=np.int64)) for k, v in targets.items()}
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
        generator = torch.Generator().manual_seed(config.seed)
        loss_value = float("nan")
        model.train()
        with progress_bar(config.epochs, "clinical classifier", "epoch") as bar:
            for _ in range(config.epochs):
                order = torch.randperm(len(inputs), generator=generator)
                total, seen = 0.0, 0
                for start in range(0, len(order), config.batch_size):
                    rows = order[start : start + config.batch_size]
                    if len(rows) < 2:  # batch norm needs two images
                        continue
                    outputs = model(inputs[rows].to(device))
                    losses = [
                        F.cross_entropy(outputs[k], labels[k][rows].to(device), ignore_index=_IGNORE)
                        for k in classes
                        if (labels[k][rows] != _IGNORE).any()
                    ]
                    if not losses:
                        continue
                    loss = torch.stack(losses).sum()
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    total, seen = total + float(loss.detach()) * len(rows), seen + len(rows)
                loss_value = total / max(seen, 1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                bar.update()
        model.eval()
    return model, loss_value


@torch.no_grad()
def predict_probabilities(
    model: LabelClassifier, images: np.ndarray, resolution: int, device: str = "cpu", batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Class probabilities per label (N x classes) of uint8 images."""
    chunks: dict[str, list[np.ndarray]] = {label: [] for label in model.heads}
    for start in range(0, len(images), batch_size):
        outputs = model(_prepare(images[start : start + batch_size], resolution).to(device))
        for label, logits in outputs.items():
            chunks[label].append(logits.float().softmax(dim=-1).cpu().numpy())
    return {label: np.concatenate(parts) for label, parts in chunks.items()}


def auc_batch(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUC of B resamples at once: targets ``(B, n)``, scores ``(B, n, C)``.

    Hand-written (the Mann-Whitney form, with average ranks for ties) because the
    bootstrap needs thousands of AUCs per label; it equals scikit-learn's
    ``roc_auc_score`` (binary, and ``multi_class="ovr"`` macro) and is tested against it.
    Classes absent from a resample (no positives or no negatives) are left out of the
    macro average; rows with target -100 are ignored.
    """
    valid = targets != _IGNORE
    per_class = []
    for column in range(scores.shape[-1]):
        # Ignored rows rank above every valid row, so valid rows keep their ranks.
        ranked = stats.rankdata(np.where(valid, scores[..., column], np.inf), axis=-1)
        positive = valid & (targets == column)
        n_pos = positive.sum(axis=-1)
        n_neg = valid.sum(axis=-1) - n_pos
        with np.errstate(invalid="ignore", divide="ignore"):
            u = (ranked * positive).sum(axis=-1) - n_pos * (n_pos + 1) / 2
            per_class.append(np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan))
    stacked = np.stack(per_class)
    counted = np.isfinite(stacked).sum(axis=0)
    return np.where(counted > 0, np.nansum(stacked, axis=0) / np.maximum(counted, 1), np.nan)


class AucStatistic:
    """Per-label AUC of any set of test rows (the :data:`~fairdiffusion.evaluation.slices.Statistic` shape)."""

    def __init__(self, targets: Mapping[str, np.ndarray], probabilities: Mapping[str, np.ndarray]) -> None:
        self.targets, self.probabilities = targets, probabilities

    def __call__(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """``index`` ``(B, n)`` -> ``{label: AUC (B,)}``."""
        index = np.asarray(index, dtype=np.int64)
        if index.shape[1] < 2:
            return {label: np.full(len(index), np.nan) for label in self.targets}
        return {
            label: auc_batch(self.targets[label][index], self.probabilities[label][index]) for label in self.targets
        }


def evaluate_clinical_semantics(
    train_generated: np.ndarray,
    train_samples: pd.DataFrame,
    real: np.ndarray,
    test_samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    config: ClinicalConfig,
    settings: SliceSettings,
    device: str = "cpu",
    real_train: np.ndarray | None = None,
) -> ClinicalResult | None:
    """Train on images generated from the training prompts, with those prompts' labels; test on the real test images.

    The paper's protocol (Sec. 4.3, and the authors' evaluation script): the classifier
    never sees the test set's prompts, so the test split's label and group mix cannot leak
    into its training.

    Args:
        train_generated: Images generated from the training rows' prompts (uint8 N x H x W x 3).
        train_samples: The training rows (their prompts' labels), row-aligned with ``train_generated``.
        real: The real test images (uint8 M x H x W x 3).
        test_samples: The test rows (labels and protected attributes), row-aligned with ``real``.
        attributes: Protected attribute -> groups (AUC per group and ES-AUC per attribute).
        config: The classifier and its training.
        settings: Bootstrap and small-slice settings shared with the image metrics.
        device: Torch device.
        real_train: The *real* training images, row-aligned with ``train_samples``: the same
            classifier trained on them gives the ceiling the data allows (overall AUC per label).

    Returns:
        AUC per label overall and per group, with intervals and equity scaling; ``None``
        when no labels are configured and the tables have none of FairGenMed's.
    """
    started = time.perf_counter()
    train_rows, rows = train_samples.reset_index(drop=True), test_samples.reset_index(drop=True)
    labels = config.labels
    if labels is None:
        labels = [label for label in CLINICAL_LABELS if label in rows and rows[label].notna().any()]
        labels = [label for label in labels if label in train_rows and train_rows[label].notna().any()]
        if not labels:
            return None
    classes = label_classes(pd.concat([train_rows, rows], ignore_index=True), labels)
    model, final_loss = train_classifier(train_generated, encode_labels(train_rows, classes), classes, config, device)
    targets = encode_labels(rows, classes)
    probabilities = predict_probabilities(model, real, config.resolution, device)
    statistic = AucStatistic(targets, probabilities)
    slices = define_slices(rows[list(attributes)], attributes, intersections=False)
    analysis = analyse_slices(
        statistic, list(classes), dict.fromkeys(classes, True), slices, attributes, settings, matched=False
    )
    ceiling = None
    if real_train is not None:
        train_targets = encode_labels(train_rows, classes)
        ceiling = real_trained_auc(real_train, train_targets, classes, real, targets, config, device)
    return ClinicalResult(
        classifier=config.classifier,
        classes=classes,
        analysis=analysis,
        train_images=len(train_generated),
        test_images=len(real),
        epochs=config.epochs,
        final_loss=final_loss,
        seconds=time.perf_counter() - started,
        real_trained_auc=ceiling,
    )


def real_trained_auc(
    real_train: np.ndarray,
    train_targets: Mapping[str, np.ndarray],
    classes: Mapping[str, Sequence[str]],
    real_test: np.ndarray,
    test_targets: Mapping[str, np.ndarray],
    config: ClinicalConfig,
    device: str = "cpu",
) -> dict[str, float]:
    """Overall AUC per label of the same classifier trained on the *real* training images.

    The ceiling the data allows the paper's protocol: a generated training set can at best
    teach what the real one teaches.
    """
    model, _ = train_classifier(real_train, train_targets, classes, config, device)
    probabilities = predict_probabilities(model, real_test, config.resolution, device)
    every = np.arange(len(real_test))[None]
    return {label: float(auc_batch(test_targets[label][every], probabilities[label][every])[0]) for label in classes}
