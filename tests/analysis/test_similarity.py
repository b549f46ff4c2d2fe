import numpy as np
import pytest

from neuroplex.analysis.similarity import cka_matrix, linear_cka


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from its HSIC definition with a centring matrix (Kornblith et al. 2019, eq. 1-2)."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


@pytest.fixture
def reps():
    rng = np.random.default_rng(0)
    return rng.standard_normal((60, 10)), rng.standard_normal((60, 7))


def test_identical_representations_have_cka_one(reps):
    x, _ = reps
    assert linear_cka(x, x) == pytest.approx(1.0)


def test_invariant_to_orthogonal_transform_and_isotropic_scaling(reps):
    x, _ = reps
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((10, 10)))
    assert linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0)


def test_not_invariant_to_arbitrary_linear_maps(reps):
    x, _ = reps
    a = np.random.default_rng(2).standard_normal((10, 10)) * np.linspace(0.1, 3, 10)
    assert linear_cka(x, x @ a) < 0.99


def test_matches_the_hsic_reference_and_is_low_for_unrelated_data(reps):
    x, y = reps
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y), rel=1e-9)
    assert linear_cka(x, y) < 0.4
    m = cka_matrix([x, y], [x])
    assert m.shape == (2, 1) and m[0, 0] == pytest.approx(1.0)
