"""Representation similarity: linear CKA (Kornblith et al. 2019) with two HSIC estimators.

- ``debiased`` (the default): the unbiased HSIC U-statistic of Song et al. (2012), as in
  Kornblith et al.'s ``feature_space_linear_cka(..., debiased=True)``; Nguyen et al. (2021)
  average the same statistic over minibatches, here the whole probe is one batch. HSIC's
  estimate is 0 in expectation for independent representations at any ``n``.
- ``biased``: the plug-in HSIC ``tr(KHLH) / (n-1)^2`` of Kornblith et al. (2019, eq. 2). It is
  far from 0 for unrelated data when the feature count is not small against ``n`` (two
  independent 256-d Gaussian probes of 1000 samples give 0.20; ``n`` 30, ``d`` 100 give
  ≈ 0.78).

Either way, compare a CKA with its shuffled-rows baseline (:func:`shuffled_cka`): the CKA of
the same two representations with the row correspondence broken.
Shape legend: ``n`` samples (the same inputs for both), ``d1``/``d2`` features.
"""

from __future__ import annotations

import numpy as np

from neuroplex.errors import NeuroplexError

ESTIMATORS = ("debiased", "biased")
SHUFFLES = 10  # permutations averaged by the shuffled-rows baseline


def check_estimator(estimator: str, n: int) -> None:
    """Refuse an unknown estimator, or a probe too small for it (the U-statistic needs 4)."""
    if estimator not in ESTIMATORS:
        raise NeuroplexError(f"--cka {estimator!r}: expected one of {', '.join(ESTIMATORS)}")
    if estimator == "debiased" and n < 4:
        raise NeuroplexError(f"--probe {n}: the debiased CKA needs at least 4 samples")


def hsic(x: np.ndarray, y: np.ndarray, estimator: str = "debiased") -> float:
    """Linear-kernel HSIC of ``x [n, d1]`` and ``y [n, d2]`` up to a factor that depends on
    ``n`` only (it cancels in CKA), computed in feature space.

    With centred features, ``K = x xᵀ`` and ``r_x`` the squared row norms (``diag K``), the
    U-statistic times ``n (n-3)`` is
    ``‖xᵀy‖² - n/(n-2) r_x·r_y + ‖x‖² ‖y‖² / ((n-1)(n-2))``; the biased one times ``(n-1)²``
    is ``‖xᵀy‖²``.
    """
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = float(np.linalg.norm(x.T @ y, "fro") ** 2)
    if estimator == "biased":
        return cross
    n = len(x)
    rows_x, rows_y = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    return (
        cross
        - n / (n - 2) * float(rows_x @ rows_y)
        + float(rows_x.sum() * rows_y.sum()) / ((n - 1) * (n - 2))
    )


def linear_cka(x: np.ndarray, y: np.ndarray, estimator: str = "debiased") -> float:
    """Linear CKA between ``x [n, d1]`` and ``y [n, d2]``: ``HSIC(x, y) / sqrt(HSIC(x, x)
    HSIC(y, y))``. 1 for representations equal up to an orthogonal transform and isotropic
    scaling. For unrelated ones the debiased estimator is near 0 (it can be slightly
    negative); the biased one is not (module docstring). 0 when either side is constant."""
    norm = hsic(x, x, estimator) * hsic(y, y, estimator)
    return hsic(x, y, estimator) / float(np.sqrt(norm)) if norm > 0 else 0.0


def shuffled_cka(x: np.ndarray, y: np.ndarray, estimator: str = "debiased", seed: int = 0) -> float:
    """The shuffled-rows baseline: mean CKA of ``x [n, d1]`` with ``y [n, d2]`` under
    :data:`SHUFFLES` random row permutations of ``y`` (seeded): what the estimator gives for
    these two representations when the samples no longer correspond."""
    norm = hsic(x, x, estimator) * hsic(y, y, estimator)  # a row permutation leaves it as is
    if norm <= 0:
        return 0.0
    rng = np.random.default_rng(seed)
    cross = [hsic(x, y[rng.permutation(len(y))], estimator) for _ in range(SHUFFLES)]
    return float(np.mean(cross) / np.sqrt(norm))


def cka_matrix(a: list[np.ndarray], b: list[np.ndarray], estimator: str = "debiased") -> np.ndarray:
    """CKA between every representation in ``a`` and every one in ``b``: ``[len(a), len(b)]``."""
    return np.array([[linear_cka(x, y, estimator) for y in b] for x in a])


def shuffled_matrix(
    a: list[np.ndarray], b: list[np.ndarray], estimator: str = "debiased", seed: int = 0
) -> np.ndarray:
    """:func:`shuffled_cka` for every pair of :func:`cka_matrix`: ``[len(a), len(b)]``."""
    return np.array([[shuffled_cka(x, y, estimator, seed) for y in b] for x in a])
