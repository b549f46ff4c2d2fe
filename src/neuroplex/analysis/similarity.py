"""Representation similarity: linear CKA (Kornblith et al. 2019).

Shape legend: ``n`` samples (the same inputs for both), ``d1``/``d2`` features.
"""

from __future__ import annotations

import numpy as np


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between ``x [n, d1]`` and ``y [n, d2]``: 1 for representations equal up to an
    orthogonal transform and isotropic scaling, 0 for unrelated ones."""
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x, "fro") ** 2
    norm = np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")
    return float(cross / norm) if norm > 0 else 0.0


def cka_matrix(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """CKA between every representation in ``a`` and every one in ``b``: ``[len(a), len(b)]``."""
    return np.array([[linear_cka(x, y) for y in b] for x in a])
