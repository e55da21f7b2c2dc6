"""Slice metrics: FID per subgroup and its equity-scaled form.

Shapes follow Made-With-ML's slice metrics: ``{slice: {metric: value, "num_samples": n}}``.
Metric keys for MLflow carry the extractor's name, so a random-feature FID can never
be read as an Inception FID.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import linalg

OVERALL = "overall"


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between two Gaussians: |mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).

    Written here (not taken from torchmetrics) because it must run on cached features
    of any extractor, one slice at a time; it follows the reference FID code: when the
    product is near-singular, a small multiple of the identity is added before sqrtm.
    """
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Small slices give singular covariances; the offset below handles them.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(real: np.ndarray, generated: np.ndarray) -> float:
    """FID between two feature sets (rows are images). Needs two or more of each."""
    if len(real) < 2 or len(generated) < 2:
        return float("nan")
    return frechet_distance(
        real.mean(axis=0),
        np.cov(real, rowvar=False),
        generated.mean(axis=0),
        np.cov(generated, rowvar=False),
    )


def compute_slice_metrics(
    real: np.ndarray,
    generated: np.ndarray,
    groups: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
) -> dict[str, dict[str, float]]:
    """FID overall and for each group of each attribute.

    Args:
        real: Features of the real test images, one row per test subject.
        generated: Features of the images generated from those subjects' prompts,
            row-aligned with ``real``.
        groups: The test subjects' protected attributes, row-aligned with both.
        attributes: Attribute -> groups to report (absent groups get NaN and 0 samples).

    Returns:
        ``{"overall": {...}, "race/Asian": {"fid": ..., "num_samples": n}, ...}``.
    """
    slices = {OVERALL: {"fid": fid_from_features(real, generated), "num_samples": float(len(real))}}
    for attribute, names in attributes.items():
        column = groups[attribute].to_numpy()
        for group in names:
            mask = column == group
            slices[f"{attribute}/{group}"] = {
                "fid": fid_from_features(real[mask], generated[mask]),
                "num_samples": float(mask.sum()),
            }
    return slices


def equity_scaled(overall: float, group_values: Mapping[str, float], higher_is_better: bool) -> dict[str, float | str]:
    """Equity scaling of one metric over one attribute's groups.

    Disparity D = sum over groups of |M - M_g| (FairDiffusion's equity-scaled metrics,
    Sec. 4.2). Higher-is-better metrics give ES-M = M / (1 + D); lower-is-better ones
    (FID) ES-M = M * (1 + D). Groups whose value is NaN are skipped.
    """
    values = {g: v for g, v in group_values.items() if np.isfinite(v)}
    if not values or not np.isfinite(overall):
        nan = float("nan")
        return {
            "es": nan,
            "disparity": nan,
            "relative_disparity": nan,
            "max_gap": nan,
            "worst_group": "",
        }
    disparity = float(sum(abs(overall - v) for v in values.values()))
    es = overall / (1 + disparity) if higher_is_better else overall * (1 + disparity)
    worst = (min if higher_is_better else max)(values, key=values.__getitem__)
    return {
        "es": float(es),
        "disparity": disparity,
        "relative_disparity": disparity / overall if overall else float("nan"),
        "max_gap": float(max(values.values()) - min(values.values())),
        "worst_group": worst,
    }


def fid_metric_names(extractor: str) -> dict[str, str]:
    """The metric-name stems used in MLflow for one extractor."""
    return {
        "fid": f"fid_{extractor}",
        "es_fid": f"es_fid_{extractor}",
        "gap": f"fid_gap_{extractor}",
        "disparity": f"fid_disparity_{extractor}",
        "n": "num_samples",
    }


def flatten_metrics(
    slices: Mapping[str, Mapping[str, float]],
    equity: Mapping[str, Mapping[str, float | str]],
    extractor: str,
) -> dict[str, float]:
    """MLflow-ready metrics: ``fid_<x>/overall``, ``fid_<x>/race/Asian``, ``es_fid_<x>/race``..."""
    names = fid_metric_names(extractor)
    flat: dict[str, float] = {}
    for slice_name, values in slices.items():
        flat[f"{names['fid']}/{slice_name}"] = float(values["fid"])
        flat[f"{names['n']}/{slice_name}"] = float(values["num_samples"])
    for attribute, scaled in equity.items():
        flat[f"{names['es_fid']}/{attribute}"] = float(scaled["es"])
        flat[f"{names['gap']}/{attribute}"] = float(scaled["max_gap"])
        flat[f"{names['disparity']}/{attribute}"] = float(scaled["disparity"])
    return flat
