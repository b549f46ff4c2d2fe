import numpy as np
import pytest

from neuroplex.analysis.similarity import (
    check_estimator,
    cka_matrix,
    linear_cka,
    shuffled_cka,
    shuffled_matrix,
)
from neuroplex.errors import NeuroplexError


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from its HSIC definition with a centring matrix (Kornblith et al. 2019, eq. 1-2)."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def unbiased_hsic_loops(k: np.ndarray, l_: np.ndarray) -> float:
    """HSIC_1 of Song et al. (2012, eq. 5) with explicit sums over sample indices:
    K~, L~ are the Gram matrices with their diagonal set to zero, and
    HSIC_1 = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = len(k)
    kt = [[0.0 if i == j else float(k[i, j]) for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else float(l_[i, j]) for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    sum_k = sum(kt[i][j] for i in range(n) for j in range(n))
    sum_l = sum(lt[i][j] for i in range(n) for j in range(n))
    row_k = [sum(kt[i][j] for j in range(n)) for i in range(n)]  # (K~1)_i
    col_l = [sum(lt[i][j] for i in range(n)) for j in range(n)]  # (1'L~)_j
    ones_kl_ones = sum(row_k[i] * col_l[i] for i in range(n))  # 1'K~ L~1 with K~, L~ symmetric
    total = trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * ones_kl_ones
    return total / (n * (n - 3))


def reference_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA from the U-statistic on uncentred Gram matrices (it needs none)."""
    k, l_ = x @ x.T, y @ y.T
    xy, xx, yy = (unbiased_hsic_loops(a, b) for a, b in ((k, l_), (k, k), (l_, l_)))
    return xy / np.sqrt(xx * yy)


@pytest.fixture
def reps():
    rng = np.random.default_rng(0)
    return rng.standard_normal((60, 10)), rng.standard_normal((60, 7))


@pytest.mark.parametrize("estimator", ["debiased", "biased"])
def test_identical_representations_have_cka_one(reps, estimator):
    x, _ = reps
    assert linear_cka(x, x, estimator) == pytest.approx(1.0)


@pytest.mark.parametrize("estimator", ["debiased", "biased"])
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(reps, estimator):
    x, _ = reps
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((10, 10)))
    assert linear_cka(x, 3.5 * x @ q, estimator) == pytest.approx(1.0)


def test_not_invariant_to_arbitrary_linear_maps(reps):
    x, _ = reps
    a = np.random.default_rng(2).standard_normal((10, 10)) * np.linspace(0.1, 3, 10)
    assert linear_cka(x, x @ a) < 0.99


def test_biased_matches_the_hsic_reference_and_is_low_for_unrelated_data(reps):
    x, y = reps
    assert linear_cka(x, y, "biased") == pytest.approx(reference_cka(x, y), rel=1e-9)
    assert linear_cka(x, y, "biased") < 0.4
    m = cka_matrix([x, y], [x], "biased")
    assert m.shape == (2, 1) and m[0, 0] == pytest.approx(1.0)


def test_debiased_equals_the_u_statistic_written_with_loops():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((24, 5)) + 2.0  # uncentred on purpose
    y = x[:, :3] @ rng.standard_normal((3, 4)) + 0.5 * rng.standard_normal((24, 4))
    assert linear_cka(x, y) == pytest.approx(reference_debiased_cka(x, y), rel=1e-9)
    z = rng.standard_normal((24, 6))
    assert linear_cka(x, z) == pytest.approx(reference_debiased_cka(x, z), rel=1e-9, abs=1e-12)


def test_debiased_is_near_zero_for_unrelated_data_where_biased_is_not():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((1000, 256)), rng.standard_normal((1000, 256))
    assert abs(linear_cka(x, y)) < 0.05
    assert linear_cka(x, y, "biased") > 0.15  # the finite-n bias the debiased estimator removes


def test_shuffled_baseline_is_the_mean_over_permutations_of_the_rows(reps):
    x, _ = reps
    y = x @ np.random.default_rng(5).standard_normal((10, 6))
    rng = np.random.default_rng(7)
    expected = np.mean([linear_cka(x, y[rng.permutation(60)]) for _ in range(10)])
    assert shuffled_cka(x, y, seed=7) == pytest.approx(expected)
    assert abs(shuffled_cka(x, y, seed=7)) < 0.2 < linear_cka(x, y)
    assert shuffled_matrix([x], [y, x], seed=7).shape == (1, 2)


def test_unknown_estimator_or_too_small_probe_is_one_line_error():
    with pytest.raises(NeuroplexError, match="--cka 'unbiased': expected one of debiased, biased"):
        check_estimator("unbiased", 100)
    with pytest.raises(NeuroplexError, match="--probe 3: the debiased CKA needs at least 4"):
        check_estimator("debiased", 3)
    check_estimator("biased", 3)
