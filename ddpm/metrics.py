"""Metric math on feature sets: Frechet distance, k-NN precision and recall. Features are (N, D) arrays."""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negative round-off -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})   (Dowson & Landau 1982; FID).

    tr((S1 S2)^{1/2}) is computed as tr((S1^{1/2} S2 S1^{1/2})^{1/2}): the inner matrix is symmetric PSD, so two
    symmetric eigendecompositions replace the non-symmetric ``scipy.linalg.sqrtm`` and its complex round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _sqrtm_psd(s1)
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(d2, 0.0)


def frechet_distance_features(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.clip(d, 0, None)


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded). (N,)."""
    d = _pairwise_sq_dists(features, features)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    The manifold of a set is the union of balls around its points, each with the radius of that point's k-th
    nearest neighbour. Precision: the fraction of fake points inside the real manifold. Recall: the fraction of
    real points inside the fake manifold.
    """
    real_r, fake_r = knn_radii(real, k), knn_radii(fake, k)
    d = _pairwise_sq_dists(fake, real)  # (N_fake, N_real)
    precision = float((d <= real_r[None, :]).any(axis=1).mean())
    recall = float((d.T <= fake_r[None, :]).any(axis=1).mean())
    return precision, recall


class FeatureStats:
    """The mean and covariance of a feature set, kept as (n, mean, scatter) so that parts computed apart merge exactly.

    ``scatter`` is sum_i (f_i - mean)(f_i - mean)^T, (D, D) float64. Merging two parts uses the pairwise update of
    Chan, Golub & LeVeque (1979): centred sums never subtract two large numbers, so the merged covariance is as
    accurate as one computed in one pass, in any order of merging. ``cov`` is the unbiased estimate (divides by n - 1,
    as ``numpy.cov`` and :func:`gaussian_stats` do).
    """

    def __init__(self, n: int, mean: np.ndarray, scatter: np.ndarray):
        self.n, self.mean, self.scatter = int(n), np.asarray(mean, np.float64), np.asarray(scatter, np.float64)

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStats":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, D), got {f.shape}")
        if f.shape[0] == 0:
            return cls(0, np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1])))
        mean = f.mean(axis=0)
        centred = f - mean
        return cls(f.shape[0], mean, centred.T @ centred)

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean  # (D,)
        mean = self.mean + delta * (other.n / n)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.n * other.n / n)
        return FeatureStats(n, mean, scatter)

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 features, got {self.n}")
        return self.scatter / (self.n - 1)


def frechet_distance_stats(a: FeatureStats, b: FeatureStats) -> float:
    """:func:`frechet_distance` between two :class:`FeatureStats`."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)
