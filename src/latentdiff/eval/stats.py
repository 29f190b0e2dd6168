"""Distances between two sets of feature vectors: FID, CMMD's MMD, and k-NN precision / recall.

Everything here is numpy in float64 and deterministic (the same inputs give the same numbers), with
pairwise distances computed in row blocks so that 10k x 10k sets fit in memory. Features are (N, D)
arrays or tensors, one row per image.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from latentdiff.errors import UserError

CHUNK = 1024  # rows per block of pairwise distances: 1024 x 10k float64 = 80 MB at most


def _as_features(x: Any, name: str) -> np.ndarray:
    """A (N, D) float64 array, or a UserError naming the argument and its shape."""
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise UserError(f"{name}: expected features of shape (N, D), got {a.shape}")
    if not np.isfinite(a).all():
        raise UserError(f"{name}: features contain NaN or infinity")
    return a


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise UserError(f"feature sets differ in width: {a.shape} vs {b.shape}")


def feature_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, as FID uses them."""
    f = _as_features(feats, "feats")
    if f.shape[0] < 2:
        raise UserError(f"feats: a covariance needs at least 2 samples, got {f.shape[0]}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½): the Fréchet (2-Wasserstein) distance of two Gaussians."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise UserError(f"frechet_distance: shapes do not fit: mu {mu1.shape}, {mu2.shape}; "
                        f"sigma {s1.shape}, {s2.shape}")
    # Σ1Σ2 is not symmetric, so scipy's sqrtm on it can return complex round-off. Its eigenvalues equal
    # those of the symmetric PSD matrix √Σ1 Σ2 √Σ1, whose square-root trace is Σ √λ: real and stable,
    # and exact even for singular Σ1 (fewer samples than dimensions) without pytorch-fid's ε offset.
    r = _sqrt_psd(s1)
    lam = np.linalg.eigvalsh(r @ s2 @ r)
    tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()
    diff = mu1 - mu2
    fid = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    return float(max(fid, 0.0))  # a squared distance: a tiny negative is round-off


def fid_from_features(a: Any, b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    fa, fb = _as_features(a, "a"), _as_features(b, "b")
    _same_dim(fa, fb)
    return frechet_distance(*feature_stats(fa), *feature_stats(fb))


def _sq_dist_blocks(a: np.ndarray, b: np.ndarray, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (row offset, block of squared Euclidean distances a[i:i+chunk] to all of b)."""
    bb = np.einsum("ij,ij->i", b, b)
    for i in range(0, a.shape[0], chunk):
        x = a[i : i + chunk]
        d = np.einsum("ij,ij->i", x, x)[:, None] + bb[None, :] - 2.0 * (x @ b.T)
        yield i, np.maximum(d, 0.0)  # round-off can make ‖x‖²+‖y‖²−2x·y slightly negative


def mmd_rbf(a: Any, b: Any, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """Unbiased MMD² with k(x,y)=exp(−‖x−y‖²/2σ²), times `scale` (CMMD's σ=10, scale=1000)."""
    x, y = _as_features(a, "a"), _as_features(b, "b")
    _same_dim(x, y)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise UserError(f"mmd_rbf: the unbiased estimate needs at least 2 samples per set, got {m} and {n}")
    gamma = 1.0 / (2.0 * sigma**2)

    def kernel_sum(p: np.ndarray, q: np.ndarray, same: bool) -> float:
        total = 0.0
        for _, d in _sq_dist_blocks(p, q):
            total += np.exp(-gamma * d).sum()
        # Unbiased: drop the diagonal k(x_i, x_i) = 1 (CMMD's reference code keeps it: a V-statistic).
        return total - p.shape[0] if same else total

    k_xx = kernel_sum(x, x, True) / (m * (m - 1))
    k_yy = kernel_sum(y, y, True) / (n * (n - 1))
    k_xy = kernel_sum(x, y, False) / (m * n)
    return float(scale * (k_xx + k_yy - 2.0 * k_xy))


def _kth_nn_sq_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of each row of x to its k-th nearest other row of x."""
    radii = np.empty(x.shape[0])
    for i, d in _sq_dist_blocks(x, x):
        radii[i : i + d.shape[0]] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
    return radii


def _coverage(manifold: np.ndarray, radii: np.ndarray, probes: np.ndarray) -> float:
    """Fraction of probes inside at least one k-NN ball of the manifold's points."""
    inside = np.zeros(probes.shape[0], dtype=bool)
    for i, d in _sq_dist_blocks(probes, manifold):
        inside[i : i + d.shape[0]] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real: Any, fake: Any, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: precision = fakes inside the real k-NN manifold, recall = the converse."""
    r, f = _as_features(real, "real"), _as_features(fake, "fake")
    _same_dim(r, f)
    if not isinstance(k, int) or k < 1 or min(r.shape[0], f.shape[0]) <= k:
        raise UserError(f"precision_recall: need 1 <= k < number of samples, got k={k!r} with "
                        f"{r.shape[0]} real and {f.shape[0]} fake")
    precision = _coverage(r, _kth_nn_sq_radii(r, k), f)
    recall = _coverage(f, _kth_nn_sq_radii(f, k), r)
    return precision, recall
