"""The metric math (ddpm/metrics.py): Frechet distance in closed form, precision and recall on toy sets."""

import numpy as np
import pytest

from ddpm import frechet_distance, frechet_distance_features, precision_recall


def test_frechet_distance_closed_form_and_self():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2000, 8))
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-8)
    # N(m1, a^2 I) vs N(m2, b^2 I) in d dims: |m1 - m2|^2 + d (a - b)^2
    d, a, b = 8, 1.0, 2.0
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    assert frechet_distance(mu1, a**2 * np.eye(d), mu2, b**2 * np.eye(d)) == pytest.approx(
        d * 0.25 + d * (a - b) ** 2)
    # Non-commuting covariances: compare against the definition through an explicit matrix square root.
    s1 = np.cov(rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4)), rowvar=False)
    s2 = np.cov(rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4)), rowvar=False)
    w, v = np.linalg.eig(s1 @ s2)
    tr_sqrt = np.sqrt(w.astype(complex)).real.sum()
    assert frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(
        np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, rel=1e-6)


def test_precision_recall_on_toy_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 2))
    same = rng.normal(size=(500, 2))
    far = rng.normal(size=(500, 2)) + 10
    collapsed = rng.normal(size=(500, 2)) * 0.05  # all fakes near the mode: precise, poor recall
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    assert precision_recall(real, far) == (0.0, 0.0)
    p, r = precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.2
