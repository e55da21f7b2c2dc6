"""Image metrics: FID, KID and IS, as pure functions of features, and their batched form.

The functional forms (:func:`fid_from_features`, :func:`kid_from_features`,
:func:`inception_score`) take features and return a number; :class:`FeatureStatistics`
evaluates them on many row sets of one cached feature matrix at once (slices, bootstrap
resamples, matched-size draws), as torchmetrics keeps a metric's ``_compute`` beside the
module that accumulates it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import linalg

#: The Inception Score's metric name: it is computed in one split (see :func:`inception_score`).
INCEPTION_SCORE = "is_1split"
#: Image metrics and whether higher is better.
IMAGE_METRICS: dict[str, bool] = {"fid": False, "kid": False, INCEPTION_SCORE: True}

# Keep one batch of per-resample matrices under ~160 MB of float64.
_BATCH_ELEMENTS = 20_000_000
# Kernel matrices are cached for up to this many images (3 x N^2 float64: 400 MB at 4096).
_MAX_CACHED_KERNEL = 4096


# --- Fréchet distance -------------------------------------------------------------------


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between two Gaussians: |mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).

    The reference form on summary statistics (as in the reference FID code): when the
    product is near-singular, a small multiple of the identity is added before sqrtm.
    Slices use :func:`fid_from_features`, which is exact and much faster on features.
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


def _frechet_batch(real: np.ndarray, generated: np.ndarray, device: str = "cpu") -> np.ndarray:
    """FID of B pairs of feature sets at once: ``(B, n, d)`` and ``(B, m, d)`` -> ``(B,)``.

    Hand-written, not torchmetrics' or scipy's, because a slice evaluation needs
    thousands of FIDs (slices x bootstrap resamples x matched draws) on cached features
    and a d x d ``sqrtm`` each (seconds at d = 2048) would dominate. The trace term is
    computed exactly without it: with centred features X (n x d) and Y (m x d),
    Tr((S_x S_y)^1/2) is the sum of the singular values of X Y^T / sqrt((n-1)(m-1)) (the
    non-zero eigenvalues of S_x S_y are those of (X Y^T)(X Y^T)^T), an n x m problem when
    slices are smaller than the feature dimension; otherwise the same singular values
    come from R_x R_y^T (QR, X = Q_x R_x), at most d x d. Tested against the scipy
    ``sqrtm`` reference and torchmetrics.
    """
    n, m, dim = real.shape[1], generated.shape[1], real.shape[2]
    mu_r, mu_g = real.mean(axis=1), generated.mean(axis=1)
    xr, xg = real - mu_r[:, None, :], generated - mu_g[:, None, :]
    mean_term = np.sum((mu_r - mu_g) ** 2, axis=-1)
    trace_r = np.einsum("bij,bij->b", xr, xr) / (n - 1)
    trace_g = np.einsum("bij,bij->b", xg, xg) / (m - 1)
    # numpy's batched QR and SVD are fast on small matrices and very slow on large ones
    # (0.5 s for one 100 x 2048 QR); torch's are the other way round, and can use a GPU.
    if dim > _TORCH_FROM_DIM or device != "cpu":
        singular = _singular_values_torch(xr, xg, device)
    else:
        cross = np.matmul(xr, xg.transpose(0, 2, 1)) if min(n, m) <= dim else _qr_cross_numpy(xr, xg)
        singular = np.linalg.svd(cross, compute_uv=False)
    root_trace = singular.sum(axis=-1) / math.sqrt((n - 1) * (m - 1))
    return mean_term + trace_r + trace_g - 2 * root_trace


_TORCH_FROM_DIM = 256


def _qr_cross_numpy(xr: np.ndarray, xg: np.ndarray) -> np.ndarray:
    r_r = np.asarray(np.linalg.qr(xr, mode="r"))
    r_g = np.asarray(np.linalg.qr(xg, mode="r"))
    return np.matmul(r_r, r_g.transpose(0, 2, 1))


def _singular_values_torch(xr: np.ndarray, xg: np.ndarray, device: str) -> np.ndarray:
    import torch  # only for high-dimensional features: keeps reading a report free of torch

    x = torch.from_numpy(np.ascontiguousarray(xr)).to(device)
    y = torch.from_numpy(np.ascontiguousarray(xg)).to(device)
    if min(x.shape[1], y.shape[1]) <= x.shape[2]:
        return torch.linalg.svdvals(x @ y.transpose(1, 2)).cpu().numpy()
    # torch's batched QR is slow on the CPU; the symmetric square root of X^T X is another
    # factor F with X = Q F (Q orthonormal), and the singular values of F_x F_y are the
    # square roots of the eigenvalues of F_x (Y^T Y) F_x.
    w, v = torch.linalg.eigh(x.transpose(1, 2) @ x)
    root = (v * w.clamp(min=0).sqrt()[:, None, :]) @ v.transpose(1, 2)
    inner = root @ (y.transpose(1, 2) @ y) @ root
    return torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().cpu().numpy()


def fid_from_features(real: np.ndarray, generated: np.ndarray) -> float:
    """FID between two feature sets (rows are images). Needs two or more of each."""
    if len(real) < 2 or len(generated) < 2:
        return float("nan")
    return float(_frechet_batch(real[None].astype(np.float64), generated[None].astype(np.float64))[0])


# --- KID and IS -------------------------------------------------------------------------


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> np.ndarray:
    """KID's kernel k(x, y) = (x.y / d + coef)^degree (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def kid_from_features(real: np.ndarray, generated: np.ndarray) -> float:
    """Unbiased KID (squared MMD, cubic polynomial kernel) between equal-sized feature sets.

    The unbiased estimator has no sample-size bias, so small minority groups are not
    penalised for their size the way FID penalises them. Computed on the whole slice
    (no random subsets), so it is deterministic. Hand-written rather than torchmetrics'
    ``KernelInceptionDistance`` (which draws random subsets of images it extracts
    itself) so the kernel matrices are computed once and indexed per slice and per
    resample; the estimator is torchmetrics' ``poly_mmd``, and is tested against it.
    """
    if len(real) != len(generated):
        raise ValueError("KID here compares paired sets of equal size")
    if len(real) < 2:
        return float("nan")
    k_rr = polynomial_kernel(real, real)
    k_gg = polynomial_kernel(generated, generated)
    k_rg = polynomial_kernel(real, generated)
    return float(_mmd_from_kernels(k_rr[None], k_gg[None], k_rg[None])[0])


def _mmd_from_kernels(k_rr: np.ndarray, k_gg: np.ndarray, k_rg: np.ndarray) -> np.ndarray:
    """Unbiased squared MMD from batched kernel blocks ``(B, n, n)`` (same estimator as
    torchmetrics' ``maximum_mean_discrepancy``)."""
    n = k_rr.shape[1]
    diag_rr = np.trace(k_rr, axis1=1, axis2=2)
    diag_gg = np.trace(k_gg, axis1=1, axis2=2)
    within = (k_rr.sum(axis=(1, 2)) - diag_rr + k_gg.sum(axis=(1, 2)) - diag_gg) / (n * (n - 1))
    return within - 2 * k_rg.sum(axis=(1, 2)) / (n * n)


def inception_score(logits: np.ndarray) -> float:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of one set of images, in one split.

    One split, not the usual ten (torchmetrics' default ``splits=10`` averages the score
    of ten random tenths): a minority slice of 20 images would leave splits of two, and
    the score depends on the split size, so a ten-split value of a slice is comparable
    neither across slices nor with published numbers. The metric is therefore named
    ``is_1split`` (:data:`INCEPTION_SCORE`) in every key. Computed from cached logits
    (torchmetrics' ``InceptionScore`` re-runs the network on images), so every slice and
    resample costs no extraction; tested against torchmetrics with ``splits=1``.
    """
    if len(logits) < 2:
        return float("nan")
    log_p = _log_softmax(logits)
    return float(_inception_score_batch(log_p[None])[0])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _inception_score_batch(log_p: np.ndarray) -> np.ndarray:
    p = np.exp(log_p)
    log_marginal = np.log(p.mean(axis=1, keepdims=True))
    kl = np.sum(p * (log_p - log_marginal), axis=-1).mean(axis=1)
    return np.exp(kl)


# --- Many row sets of one feature matrix ----------------------------------------------


class FeatureStatistics:
    """FID, KID (and IS) of any set of rows of cached, paired features.

    Row i of ``real`` is the real test image of subject i and row i of ``generated`` the
    image generated from that subject's prompt; a slice, a bootstrap resample or a
    matched-size draw is a set of row indices, evaluated in batches.

    Args:
        real: Real-image features (N x d).
        generated: Generated-image features (N x d), row-aligned with ``real``.
        generated_logits: Classifier logits of the generated images (N x classes), for
            IS; ``None`` when the extractor has no classifier head.
        device: Torch device for the large linear algebra of high-dimensional features.
    """

    def __init__(
        self,
        real: np.ndarray,
        generated: np.ndarray,
        generated_logits: np.ndarray | None = None,
        device: str = "cpu",
    ) -> None:
        if real.shape != generated.shape:
            raise ValueError(f"real {real.shape} and generated {generated.shape} features must be paired")
        self.real = np.asarray(real, dtype=np.float64)
        self.generated = np.asarray(generated, dtype=np.float64)
        self.log_probs = None if generated_logits is None else _log_softmax(np.asarray(generated_logits, np.float64))
        self.metric_names = ["fid", "kid"] + ([] if self.log_probs is None else [INCEPTION_SCORE])
        self.device = device
        self._kernels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if len(self.real) <= _MAX_CACHED_KERNEL:
            self._kernels = (
                polynomial_kernel(self.real, self.real),
                polynomial_kernel(self.generated, self.generated),
                polynomial_kernel(self.real, self.generated),
            )

    def __call__(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics of B row sets of equal size: ``index`` is ``(B, n)``; returns ``{metric: (B,)}``."""
        index = np.asarray(index, dtype=np.int64)
        count, n = index.shape
        nan = np.full(count, np.nan)
        if n < 2:
            return {name: nan.copy() for name in self.metric_names}
        dim = self.real.shape[1]
        per_item = max(n * dim, n * n) * 3
        step = max(1, _BATCH_ELEMENTS // per_item)
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.metric_names}
        for start in range(0, count, step):
            rows = index[start : start + step]
            out["fid"].append(_frechet_batch(self.real[rows], self.generated[rows], self.device))
            out["kid"].append(self._kid(rows))
            if self.log_probs is not None:
                out[INCEPTION_SCORE].append(_inception_score_batch(self.log_probs[rows]))
        return {name: np.concatenate(values) for name, values in out.items()}

    def _kid(self, rows: np.ndarray) -> np.ndarray:
        if self._kernels is not None:
            k_rr, k_gg, k_rg = self._kernels
            pick = (rows[:, :, None], rows[:, None, :])
            return _mmd_from_kernels(k_rr[pick], k_gg[pick], k_rg[pick])
        real, generated = self.real[rows], self.generated[rows]
        dim = real.shape[2]

        def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return (np.matmul(a, b.transpose(0, 2, 1)) / dim + 1.0) ** 3

        return _mmd_from_kernels(kernel(real, real), kernel(generated, generated), kernel(real, generated))
