"""Tests of hardtovary.reference.quadratic: quadratic environments, means of Hessians, the exact inconsistency
score of eq. (1), Prop. 3 (printed and corrected) and the GD / geometric-mean GD trajectories. Tests named q1..q8
check the paper's quantitative claims: Q1 the exact score (App. A.2's proof), Q2 Prop. 3, Q3 Remark 2, Q4-Q6 the
determinant ordering and Figs. 3 and 12, Q7-Q8 GD and geometric-mean GD (§2.2, footnotes 7-8).

Expected values come from an independent route: dense sampling of the boundary of the level sets (points built
with a Cholesky factor, not the eigendecomposition the code uses), scipy.optimize.minimize (SLSQP) from many
starts, grids with connected-component labelling (scipy.ndimage.label), numbers worked out by hand or printed in
the paper, plain-Python loops, explicit iteration of the update rules (through
``reference.rules`` for the geometric mean), and scipy.linalg's sqrtm / logm / eigh(b=...).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st

from hardtovary.reference import rules
from hardtovary.reference.quadratic import (
    InconsistencyScore,
    QuadraticProblem,
    arithmetic_mean,
    determinant_ratio,
    gd_contraction_factors,
    gd_trajectory,
    geometric_mean_commuting,
    geometric_mean_contraction_factors,
    geometric_mean_diagonal,
    geometric_mean_gd_trajectory,
    inconsistency_score,
    inconsistency_score_diagonal,
    karcher_mean,
    prop3_bound_corrected,
    prop3_bound_printed,
    two_matrix_geometric_mean,
)

# A NaN or an overflow warning anywhere means a degenerate case was not defined.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

PROPERTY = settings(max_examples=25, deadline=None)
SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------------------------
# Builders and brute-force references (independent of the module under test)
# ----------------------------------------------------------------------------------------------------------------


def rotation(rng, P):
    Q, R = np.linalg.qr(rng.normal(size=(P, P)))
    return Q * np.sign(np.diag(R))


def spd(rng, eigenvalues):
    Q = rotation(rng, len(eigenvalues))
    H = Q @ np.diag(eigenvalues) @ Q.T
    return (H + H.T) / 2


def sphere(rng, n, P):
    u = rng.normal(size=(n, P))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def boundary_points(H_e, eps, rng, n=200_000):
    """Points d on {1/2 d^T H_e d = eps} (H_e positive definite): d = sqrt(2 eps) L^-T u, H_e = L L^T, |u| = 1."""
    L = np.linalg.cholesky(H_e)
    u = sphere(rng, n, H_e.shape[0])
    return math.sqrt(2 * eps) * scipy.linalg.solve_triangular(L, u.T, lower=True, trans="T").T


def quad(H, d):
    """1/2 d^T H d for a batch of rows d."""
    return 0.5 * np.einsum("np,pq,nq->n", d, H, d)


def sampled_pair(H_e, H_f, eps, rng, delta=0.0, n=200_000):
    """max |delta + 1/2 d^T H_f d| over theta* (d = 0) and n points on the boundary of N_e (common minimizer)."""
    d = boundary_points(H_e, eps, rng, n)
    return max(abs(delta), float(np.max(np.abs(delta + quad(H_f, d)))))


def slsqp_pair(H_e, H_f, eps, rng, starts=20):
    """max 1/2 d^T H_f d subject to 1/2 d^T H_e d <= eps, SLSQP from random starts on the boundary."""
    best = -np.inf
    for d0 in boundary_points(H_e, eps, rng, starts):
        result = scipy.optimize.minimize(
            lambda d: -0.5 * d @ H_f @ d,
            d0,
            jac=lambda d: -(H_f @ d),
            constraints=[{"type": "ineq", "fun": lambda d: eps - 0.5 * d @ H_e @ d, "jac": lambda d: -(H_e @ d)}],
            method="SLSQP",
            options={"ftol": 1e-14, "maxiter": 500},
        )
        if eps - 0.5 * result.x @ H_e @ result.x >= -1e-9 * eps:
            best = max(best, -result.fun)
    return best


def hand_diagonal_score(lams, eps):
    """eps * max over ordered pairs and i of lam^e'_i / lam^e_i (0/0 -> 0, x/0 -> inf), in plain Python."""
    best = 0.0
    for row_e in lams:
        for row_f in lams:
            for a, b in zip(row_e, row_f):
                if a > 0:
                    best = max(best, b / a)
                elif b > 0:
                    best = math.inf
    return eps * best


@st.composite
def diagonal_lams(draw, min_K=2, max_K=4, max_P=4, low=-3.0, high=3.0):
    K = draw(st.integers(min_K, max_K))
    P = draw(st.integers(1, max_P))
    exponents = draw(st.lists(st.floats(low, high), min_size=K * P, max_size=K * P))
    return np.array([10.0**x for x in exponents]).reshape(K, P)


@st.composite
def spd_stacks(draw, min_K=2, max_K=4, max_P=4):
    """[K, P, P] SPD, eigenvalues log-uniform in [1e-2, 1e2]; 'nearly_singular' puts one eigenvalue at 1e-8."""
    K = draw(st.integers(min_K, max_K))
    P = draw(st.integers(1, max_P))
    kind = draw(st.sampled_from(["well", "nearly_singular"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    stack = []
    for _ in range(K):
        w = 10.0 ** rng.uniform(-2, 2, P)
        if kind == "nearly_singular":
            w = 10.0 ** rng.uniform(-1, 0, P)
            w[rng.integers(P)] = 1e-8
        stack.append(spd(rng, w))
    return np.array(stack), rng


# ----------------------------------------------------------------------------------------------------------------
# QuadraticProblem
# ----------------------------------------------------------------------------------------------------------------


def test_problem_losses_gradients_and_pooled_quantities_match_plain_loops():
    rng = np.random.default_rng(0)
    K, P = 3, 4
    H = np.array([spd(rng, rng.uniform(0.5, 2, P)) for _ in range(K)])
    mu, c = rng.normal(size=(K, P)), rng.normal(size=K)
    problem = QuadraticProblem(H, mu, c)
    thetas = rng.normal(size=(5, P))
    for n, theta in enumerate(thetas):
        expected = [c[e] + 0.5 * (theta - mu[e]) @ H[e] @ (theta - mu[e]) for e in range(K)]
        grads = [H[e] @ (theta - mu[e]) for e in range(K)]
        np.testing.assert_allclose(problem.losses(theta), expected, rtol=1e-13)
        np.testing.assert_allclose(problem.losses(thetas)[n], expected, rtol=1e-13)
        np.testing.assert_allclose(problem.gradients(theta), grads, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(problem.gradients(thetas)[n], grads, rtol=1e-12, atol=1e-14)
        assert problem.pooled_loss(theta) == pytest.approx(sum(expected) / K, rel=1e-13)
        np.testing.assert_allclose(problem.pooled_gradient(theta), np.mean(grads, axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(problem.pooled_hessian(), (H[0] + H[1] + H[2]) / 3, rtol=1e-14)
    # The pooled minimizer: the pooled loss is minimal there (scipy.optimize from another start agrees).
    result = scipy.optimize.minimize(problem.pooled_loss, np.zeros(P), jac=problem.pooled_gradient, tol=1e-14)
    np.testing.assert_allclose(problem.pooled_minimizer(), result.x, atol=1e-6)
    assert problem.common_minimizer() is None
    assert not problem.diagonal and problem.K == K and problem.P == P


def test_problem_defaults_diagonal_input_and_read_only_attributes():
    problem = QuadraticProblem([[1.0, 0.0], [2.0, 3.0]])
    assert problem.diagonal and problem.K == 2 and problem.P == 2
    np.testing.assert_array_equal(problem.H[1], [[2.0, 0.0], [0.0, 3.0]])
    np.testing.assert_array_equal(problem.mu, np.zeros((2, 2)))
    np.testing.assert_array_equal(problem.c, [0.0, 0.0])
    np.testing.assert_array_equal(problem.common_minimizer(), [0.0, 0.0])
    # theta = (1, 2): L_1 = 1/2 (2*1 + 3*4) = 7
    np.testing.assert_allclose(problem.losses(np.array([1.0, 2.0])), [0.5, 7.0])
    with pytest.raises(ValueError):
        problem.H[0, 0, 0] = 5.0
    # Full matrices with exactly zero off-diagonals are diagonal too; a rotated one is not.
    assert QuadraticProblem(np.array([np.diag([1.0, 2.0])])).diagonal
    assert not QuadraticProblem(np.array([[[2.0, 1.0], [1.0, 2.0]]])).diagonal


def test_pooled_minimizer_singular_pooled_hessian_raises():
    problem = QuadraticProblem([[1.0, 0.0], [2.0, 0.0]], minimizers=[[0.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="singular"):
        problem.pooled_minimizer()


# ----------------------------------------------------------------------------------------------------------------
# Q1: exact inconsistency score  [paper App. A.2 proof, extended to K environments and full Hessians]
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@PROPERTY
@given(diagonal_lams(), st.floats(0.01, 10.0), st.integers(0, 2**32 - 1))
def test_q1_diagonal_score_matches_boundary_sampling(lams, eps, seed):
    rng = np.random.default_rng(seed)
    score = inconsistency_score_diagonal(lams, eps)
    assert score.value == pytest.approx(hand_diagonal_score(lams, eps), rel=1e-12)
    K = lams.shape[0]
    for e in range(K):
        for f in range(K):
            sampled = sampled_pair(np.diag(lams[e]), np.diag(lams[f]), eps, rng, n=50_000)
            exact = score.pair_values[e, f]
            assert sampled <= exact * (1 + 1e-9)
            assert sampled >= exact * (1 - 1e-2)
    # The same problem through QuadraticProblem gives the same score.
    assert inconsistency_score(QuadraticProblem(lams), eps).value == score.value


@pytest.mark.slow
@PROPERTY
@given(spd_stacks(), st.floats(0.01, 10.0))
def test_q1_full_spd_score_matches_sampling_and_generalized_eigenvalues(drawn, eps):
    H, rng = drawn
    score = inconsistency_score(QuadraticProblem(H), eps)
    assert score.method == ("diagonal" if H.shape[1] == 1 else "generalized_eigenvalue")
    K = H.shape[0]
    for e in range(K):
        for f in range(K):
            exact = score.pair_values[e, f]
            reference = eps * scipy.linalg.eigh(H[f], H[e], eigvals_only=True)[-1]
            assert exact == pytest.approx(reference, rel=1e-6)
            sampled = sampled_pair(H[e], H[f], eps, rng, n=50_000)
            assert sampled <= exact * (1 + 1e-7)
            assert sampled >= exact * (1 - 1e-2)
    assert score.value == pytest.approx(score.pair_values.max())
    assert score.value >= eps * (1 - 1e-12)


def test_q1_two_hundred_thousand_boundary_points_full_problem():
    """Full SPD Hessians: eps * lambda_max(H_A^-1 H_B), checked with 200k points on the boundary of N_A."""
    rng = np.random.default_rng(11)
    H_A, H_B = spd(rng, [0.3, 1.0, 4.0]), spd(rng, [0.5, 2.0, 9.0])
    eps = 0.7
    score = inconsistency_score(QuadraticProblem(np.array([H_A, H_B])), eps)
    for e, f, (H_e, H_f) in [(0, 1, (H_A, H_B)), (1, 0, (H_B, H_A))]:
        sampled = sampled_pair(H_e, H_f, eps, rng, n=200_000)
        assert sampled == pytest.approx(score.pair_values[e, f], rel=1e-3)
        assert sampled <= score.pair_values[e, f] * (1 + 1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("P", [2, 3])
def test_q1_score_matches_slsqp_from_many_starts(seed, P):
    rng = np.random.default_rng(100 * seed + P)
    H = np.array([spd(rng, 10.0 ** rng.uniform(-1, 1, P)) for _ in range(3)])
    eps = 0.4
    score = inconsistency_score(QuadraticProblem(H), eps)
    for e in range(3):
        for f in range(3):
            assert slsqp_pair(H[e], H[f], eps, rng) == pytest.approx(score.pair_values[e, f], rel=1e-6)


def test_q1_direction_attains_the_sup_on_the_boundary():
    rng = np.random.default_rng(5)
    H = np.array([spd(rng, [0.2, 1.0, 3.0]), spd(rng, [1.0, 1.5, 0.1])])
    mu = np.tile(rng.normal(size=3), (2, 1))
    problem = QuadraticProblem(H, mu)
    eps = 0.25
    score = inconsistency_score(problem, eps)
    e, f = score.pair
    d = score.direction
    assert np.linalg.norm(d) == pytest.approx(1.0)
    t = math.sqrt(2 * eps / (d @ H[e] @ d))  # the boundary point of N_e along d
    theta = mu[0] + t * d
    assert problem.losses(theta)[e] == pytest.approx(eps)
    assert problem.losses(theta)[f] == pytest.approx(score.value, rel=1e-10)


def test_q1_rotated_diagonal_problem_gives_the_diagonal_score():
    rng = np.random.default_rng(3)
    lams = np.array([[0.5, 2.0, 7.0], [1.0, 0.1, 3.0], [4.0, 1.0, 1.0]])
    Q = rotation(rng, 3)
    full = np.array([Q @ np.diag(row) @ Q.T for row in lams])
    score = inconsistency_score(QuadraticProblem(full), 0.3)
    # by hand: largest ratio is lam^1_1 / lam^0_1 ... = 2.0 / 0.1 = 20 (pair (1, 0), i = 1)
    assert score.value == pytest.approx(0.3 * 20.0, rel=1e-10)
    assert score.pair == (1, 0)
    np.testing.assert_allclose(abs(score.direction @ Q[:, 1]), 1.0, rtol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q1_singular_hessian_null_space_not_contained_gives_inf(seed):
    rng = np.random.default_rng(seed)
    Q = rotation(rng, 3)
    H_A = Q @ np.diag([0.0, 1.0, 2.0]) @ Q.T
    H_B = spd(rng, [0.5, 1.0, 2.0])
    score = inconsistency_score(QuadraticProblem(np.array([H_A, H_B])), 0.1)
    assert score.value == math.inf and score.pair == (0, 1)
    assert math.isfinite(score.pair_values[1, 0])
    d = score.direction
    # d spans null(H_A) (built by hand: Q[:, 0]) and H_B curves along it, so L_B is unbounded on N_A.
    assert abs(d @ Q[:, 0]) == pytest.approx(1.0, rel=1e-10)
    assert d @ H_B @ d > 0.1
    assert np.linalg.norm(H_A @ d) < 1e-12
    far = 1e4 * d
    assert 0.5 * far @ H_A @ far <= 1e-8 and 0.5 * far @ H_B @ far > 1e6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q1_singular_hessians_with_nested_null_spaces_are_finite(seed):
    """null(H_A) inside null(H_B): restrict to range(H_A); expected by sampling the restricted ellipse."""
    rng = np.random.default_rng(seed)
    Q = rotation(rng, 3)
    R = Q[:, 1:]  # range(H_A), by construction
    H_A = R @ np.diag([0.5, 3.0]) @ R.T
    M = spd(rng, [0.2, 4.0])
    H_B = R @ M @ R.T
    eps = 0.2
    score = inconsistency_score(QuadraticProblem(np.array([H_A, H_B])), eps)
    expected_AB = sampled_pair(np.diag([0.5, 3.0]), M, eps, rng)
    # plus an arbitrary null-space component: L_B does not see it
    d = boundary_points(np.diag([0.5, 3.0]), eps, rng, 1000) @ R.T + rng.normal(size=(1000, 1)) * Q[:, 0] * 100
    assert np.max(quad(H_B, d)) <= expected_AB * (1 + 1e-9)
    assert score.pair_values[0, 1] == pytest.approx(expected_AB, rel=2e-3)
    assert score.pair_values[1, 0] == pytest.approx(sampled_pair(M, np.diag([0.5, 3.0]), eps, rng), rel=2e-3)
    assert math.isfinite(score.value)


def test_q1_diagonal_zero_conventions():
    eps = 0.5
    # lamA_1 = 0 < lamB_1: inf along axis 1 (Remark 2)
    score = inconsistency_score_diagonal(np.array([[1.0, 0.0], [2.0, 3.0]]), eps)
    assert score.value == math.inf and score.pair == (0, 1)
    np.testing.assert_array_equal(score.direction, [0.0, 1.0])
    assert score.pair_values[1, 0] == pytest.approx(eps * 0.5)
    # lamA_1 = lamB_1 = 0: 0/0 -> 0, the direction is flat for both
    score = inconsistency_score_diagonal(np.array([[1.0, 0.0], [2.0, 0.0]]), eps)
    assert score.value == pytest.approx(eps * 2.0)
    # H_e = 0: the e = e pair is 0 with no direction; a zero partner gives 0 too
    score = inconsistency_score_diagonal(np.zeros((2, 3)), eps)
    assert score.value == 0.0 and score.direction is None
    np.testing.assert_array_equal(score.pair_values, np.zeros((2, 2)))


def test_q1_single_environment_gives_eps_or_zero():
    assert inconsistency_score_diagonal(np.array([[2.0, 5.0]]), 0.3).value == 0.3
    assert inconsistency_score(QuadraticProblem(np.array([[[2.0, 1.0], [1.0, 2.0]]])), 0.3).value == 0.3
    zero = inconsistency_score(QuadraticProblem(np.zeros((1, 2, 2))), 0.3)
    assert zero.value == 0.0 and zero.direction is None and zero.pair == (0, 0)


@PROPERTY
@given(diagonal_lams(max_P=3), st.data(), st.floats(0.01, 10.0), st.integers(0, 2**32 - 1))
def test_q1_exact_zeros_diagonal_and_rotated_full_routes_agree(lams, data, eps, seed):
    """Zero curvatures (0/0 -> 0, x/0 -> inf) by hand, and through the full-matrix route (null-space test)."""
    zeros = data.draw(st.lists(st.booleans(), min_size=lams.size, max_size=lams.size))
    lams = np.where(np.reshape(zeros, lams.shape), 0.0, lams)
    expected = hand_diagonal_score(lams, eps)
    # the e = e pairs give eps whenever some H_e != 0 (the band reaches its edge)
    expected = max(expected, eps if lams.any() else 0.0)
    score = inconsistency_score_diagonal(lams, eps)
    assert score.value == pytest.approx(expected, rel=1e-12)
    Q = rotation(np.random.default_rng(seed), lams.shape[1])
    full = np.array([Q @ np.diag(row) @ Q.T for row in lams])
    rotated = inconsistency_score(QuadraticProblem(full), eps)
    for e in range(lams.shape[0]):
        for f in range(lams.shape[0]):
            assert rotated.pair_values[e, f] == pytest.approx(score.pair_values[e, f], rel=1e-8, abs=1e-12)


@PROPERTY
@given(diagonal_lams(max_P=3), st.floats(0.01, 10.0), st.floats(0.1, 10.0), st.permutations(range(4)))
def test_q1_score_is_linear_in_eps_and_invariant_to_environment_order(lams, eps, factor, order):
    order = [k for k in order if k < lams.shape[0]]
    score = inconsistency_score_diagonal(lams, eps)
    assert inconsistency_score_diagonal(lams, factor * eps).value == pytest.approx(factor * score.value, rel=1e-12)
    assert inconsistency_score_diagonal(lams[order], eps).value == score.value


# ----------------------------------------------------------------------------------------------------------------
# Unequal offsets  [beyond the paper: L_e(theta*) differ, common minimizer]
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_unequal_offsets_match_sampling(seed):
    rng = np.random.default_rng(seed)
    K, P = 3, 3
    H = np.array([spd(rng, 10.0 ** rng.uniform(-1, 1, P)) for _ in range(K)])
    c = rng.uniform(-2, 2, K)
    eps = 0.3
    mu = np.tile(rng.normal(size=P), (K, 1))
    score = inconsistency_score(QuadraticProblem(H, mu, c), eps)
    for e in range(K):
        for f in range(K):
            sampled = sampled_pair(H[e], H[f], eps, rng, delta=c[f] - c[e])
            assert score.pair_values[e, f] == pytest.approx(sampled, rel=2e-3)
            assert sampled <= score.pair_values[e, f] * (1 + 1e-9)


def test_unequal_offsets_diagonal_by_hand():
    # lams A = 1, B = 4 (P = 1), c = (0, -3), eps = 0.5. Pair (A, B): delta = -3, q in [0, 0.5 * 4] = [0, 2]:
    # max(|-3|, |-3 + 2|) = 3. Pair (B, A): delta = 3, q in [0, 0.5 / 4]: 3.125. Diagonal pairs: 0.5.
    score = inconsistency_score_diagonal(np.array([[1.0], [4.0]]), 0.5, offsets=np.array([0.0, -3.0]))
    np.testing.assert_allclose(score.pair_values, [[0.5, 3.0], [3.125, 0.5]])
    assert score.value == 3.125 and score.pair == (1, 0)
    problem = QuadraticProblem(np.array([[[1.0]], [[4.0]]]), offsets=[0.0, -3.0])
    np.testing.assert_allclose(inconsistency_score(problem, 0.5).pair_values, [[0.5, 3.0], [3.125, 0.5]])


# ----------------------------------------------------------------------------------------------------------------
# Different minimizers: the trust-region route  [beyond the paper: no closed form]
# ----------------------------------------------------------------------------------------------------------------


def slsqp_band_pair(H_e, mu_e, c_e, H_f, mu_f, c_f, theta_star, eps, rng, starts=12):
    """sup over the band {|L_e - L_e(theta*)| <= eps} of |L_f - L_e(theta*)|, SLSQP max and min from many starts.

    For P >= 2 and H_e positive definite the band (a ball or a shell) is connected, so it is the component."""

    def L(H, mu, c, t):
        return c + 0.5 * (t - mu) @ H @ (t - mu)

    level = L(H_e, mu_e, c_e, theta_star)
    low, high = level - eps, level + eps
    r_in, r_out = math.sqrt(max(0.0, 2 * (low - c_e))), math.sqrt(2 * (high - c_e))
    constraints = [
        {"type": "ineq", "fun": lambda t: L(H_e, mu_e, c_e, t) - low, "jac": lambda t: H_e @ (t - mu_e)},
        {"type": "ineq", "fun": lambda t: high - L(H_e, mu_e, c_e, t), "jac": lambda t: -(H_e @ (t - mu_e))},
    ]
    best = abs(L(H_f, mu_f, c_f, theta_star) - level)
    radii = rng.uniform(r_in, r_out, starts)
    for d0 in boundary_points(H_e, 0.5, rng, starts) * radii[:, None]:  # 1/2 d0^T H_e d0 = radius^2 / 2
        for s in (1.0, -1.0):  # minimise L_f, then maximise it
            result = scipy.optimize.minimize(
                lambda t, s=s: s * L(H_f, mu_f, c_f, t),
                mu_e + d0,
                jac=lambda t, s=s: s * (H_f @ (t - mu_f)),
                constraints=constraints,
                method="SLSQP",
                options={"ftol": 1e-14, "maxiter": 500},
            )
            value_e = L(H_e, mu_e, c_e, result.x)
            if low - 1e-9 <= value_e <= high + 1e-9:
                best = max(best, abs(L(H_f, mu_f, c_f, result.x) - level))
    return best


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("P", [2, 3])
def test_different_minimizers_match_slsqp(seed, P):
    rng = np.random.default_rng(10 * seed + P)
    K = 3
    H = np.array([spd(rng, 10.0 ** rng.uniform(-0.5, 0.5, P)) for _ in range(K)])
    mu, c = rng.normal(size=(K, P)), rng.uniform(0, 1, K)
    problem = QuadraticProblem(H, mu, c)
    eps = 0.5
    theta_star = problem.pooled_minimizer() if seed % 2 == 0 else rng.normal(size=P)
    score = inconsistency_score(problem, eps, None if seed % 2 == 0 else theta_star)
    assert score.method == "band_extremes"
    for e in range(K):
        for f in range(K):
            expected = slsqp_band_pair(H[e], mu[e], c[e], H[f], mu[f], c[f], theta_star, eps, rng)
            assert score.pair_values[e, f] == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_different_minimizers_match_a_grid_with_connected_components_2d():
    rng = np.random.default_rng(7)
    H = np.array([spd(rng, [0.5, 2.0]), spd(rng, [1.0, 3.0])])
    mu = np.array([[0.0, 0.0], [1.0, -0.5]])
    c = np.array([0.0, 0.2])
    problem = QuadraticProblem(H, mu, c)
    theta_star = problem.pooled_minimizer()
    eps = 0.15
    score = inconsistency_score(problem, eps)
    n = 1201
    axis = np.linspace(-4.0, 4.0, n)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)
    losses = problem.losses(grid).reshape(n, n, 2)
    level = problem.losses(theta_star)
    star_index = tuple(int(np.argmin(np.abs(axis - x))) for x in theta_star)
    for e in range(2):
        band = np.abs(losses[..., e] - level[e]) <= eps
        labels, _ = scipy.ndimage.label(band)
        component = labels == labels[star_index]
        assert not component[[0, -1], :].any() and not component[:, [0, -1]].any()  # the box holds it
        for f in range(2):
            expected = np.max(np.abs(losses[..., f][component] - level[e]))
            assert score.pair_values[e, f] == pytest.approx(expected, rel=2e-2)
            assert expected <= score.pair_values[e, f] * (1 + 1e-9)


def test_different_minimizers_one_dimension_keeps_the_interval_holding_theta_star():
    # L_A = 1/2 theta^2, L_B = 1/2 * 4 (theta - 1)^2, theta* = 1 (the minimizer of B, not of A): L_A(theta*) = 0.5.
    # eps = 0.3: band of A is 0.2 <= theta^2/2 <= 0.8, i.e. |theta| in [sqrt(0.4), sqrt(1.6)]; the component holding
    # theta* = 1 is [0.632.., 1.264..]. On it L_B goes from 0 (theta = 1) to 2 (1 - 0.632..)^2 = 0.2702..:
    # pair (A, B) = max(0.2702.. - 0.5 (<0), 0.5 - 0) = 0.5. (The other interval would give 2 (1 + 1.26)^2 ~ 10.2.)
    problem = QuadraticProblem([[1.0], [4.0]], minimizers=[[0.0], [1.0]])
    score = inconsistency_score(problem, 0.3, theta_star=[1.0])
    assert score.pair_values[0, 1] == pytest.approx(0.5, rel=1e-10)
    # Pair (B, A): L_B(theta*) = 0, band 2 (theta - 1)^2 <= 0.3: theta in 1 +- sqrt(0.15); L_A up to
    # (1 + sqrt(0.15))^2 / 2, minus L_B(theta*) = 0.
    assert score.pair_values[1, 0] == pytest.approx((1 + math.sqrt(0.15)) ** 2 / 2, rel=1e-10)
    np.testing.assert_allclose(np.diag(score.pair_values), [0.3, 0.3])


def test_different_minimizers_singular_hessian_gives_inf():
    # H_A = diag(1, 0): N_A is unbounded along axis 1, where H_B curves.
    problem = QuadraticProblem([[1.0, 0.0], [1.0, 1.0]], minimizers=[[0.0, 0.0], [1.0, 1.0]])
    score = inconsistency_score(problem, 0.1, theta_star=[0.5, 0.5])
    assert score.value == math.inf and score.pair == (0, 1)
    assert abs(score.direction[1]) == pytest.approx(1.0)
    assert math.isfinite(score.pair_values[1, 0])


def test_different_minimizers_flat_partner_gives_the_offset_difference():
    # H_B = 0: L_B = c_B = 2 everywhere; theta* = (1, 0): L_A(theta*) = 0.5, so the pair (A, B) is |2 - 0.5|.
    problem = QuadraticProblem([[1.0, 1.0], [0.0, 0.0]], minimizers=[[0.0, 0.0], [3.0, 3.0]], offsets=[0.0, 2.0])
    score = inconsistency_score(problem, 0.1, theta_star=[1.0, 0.0])
    assert score.pair_values[0, 1] == pytest.approx(1.5)
    assert score.pair_values[1, 1] == 0.0  # L_B constant
    assert score.pair_values[1, 0] == math.inf  # N_B is everything, L_A curves
    with pytest.raises(ValueError, match="pass theta_star"):
        inconsistency_score(QuadraticProblem([[1.0, 0.0], [1.0, 0.0]], minimizers=[[0.0, 0.0], [1.0, 0.0]]), 0.1)


def test_theta_star_off_the_common_minimizer_uses_the_band_route():
    # Common minimizer 0, theta* = (1, 0) elsewhere; H_A = diag(1, 1), H_B = diag(1, 1): same loss, so
    # sup over the band of |L_B - L_A(theta*)| is eps, and every pair is eps.
    problem = QuadraticProblem([[1.0, 1.0], [1.0, 1.0]])
    score = inconsistency_score(problem, 0.2, theta_star=[1.0, 0.0])
    assert score.method == "band_extremes"
    np.testing.assert_allclose(score.pair_values, 0.2 * np.ones((2, 2)), rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Q2: Prop. 3 as printed is false; the corrected bound holds  [paper §2.2, App. A.2]
# ----------------------------------------------------------------------------------------------------------------


def test_q2_printed_bound_counterexample_lamA_1_lamB_100():
    eps = 0.3
    exact = inconsistency_score_diagonal(np.array([[1.0], [100.0]]), eps).value
    printed = prop3_bound_printed(np.array([1.0]), np.array([100.0]), eps)
    assert exact == pytest.approx(100 * eps)
    assert printed == pytest.approx(51.005 * eps)  # 2 (50.5 / 10)^2 = 51.005
    assert exact > printed  # the erratum
    assert prop3_bound_corrected(np.array([1.0]), np.array([100.0]), eps) == pytest.approx(102.01 * eps)


@PROPERTY
@given(diagonal_lams(min_K=2, max_K=2), st.floats(0.01, 10.0))
def test_q2_corrected_bound_holds(lams, eps):
    a, b = lams
    exact = eps * max(max(x / y, y / x) for x, y in zip(a, b))
    product = math.prod(((x + y) / 2) ** 2 / (x * y) for x, y in zip(a, b))
    bound = prop3_bound_corrected(a, b, eps)
    assert bound == pytest.approx(4 * eps * product, rel=1e-10)
    assert prop3_bound_printed(a, b, eps) == pytest.approx(2 * eps * product, rel=1e-10)
    assert inconsistency_score_diagonal(lams, eps).value == pytest.approx(exact, rel=1e-12)
    assert bound >= exact


@pytest.mark.parametrize("ratio", [1.0, 2.0, 1 + SQRT2 - 1e-6, 1 + SQRT2 + 1e-6, 3.0, 100.0])
def test_q2_printed_bound_fails_iff_ratio_exceeds_one_plus_sqrt2(ratio):
    eps = 0.7
    exact = eps * ratio  # by hand: App. A.2's eps * max(lamB/lamA, lamA/lamB)
    printed = prop3_bound_printed(np.array([2.0]), np.array([2.0 * ratio]), eps)
    assert (printed < exact) == (ratio > 1 + SQRT2)
    assert prop3_bound_corrected(np.array([2.0]), np.array([2.0 * ratio]), eps) >= exact


def test_q2_commuting_matrices_pair_their_eigenvalues():
    rng = np.random.default_rng(4)
    Q = rotation(rng, 2)
    A, B = Q @ np.diag([1.0, 2.0]) @ Q.T, Q @ np.diag([100.0, 2.0]) @ Q.T
    assert prop3_bound_printed(A, B, 1.0) == pytest.approx(51.005, rel=1e-9)
    assert prop3_bound_corrected(A, B, 1.0) == pytest.approx(102.01, rel=1e-9)


def test_q2_doubly_flat_direction_is_undefined_unless_dropped():
    a, b = np.array([1.0, 0.0]), np.array([2.0, 0.0])
    assert prop3_bound_printed(a, b, 1.0) is None
    assert prop3_bound_corrected(a, b, 1.0) is None
    # drop_flat: only i = 0 is left, r_0^2 = 1.5^2 / 2 = 1.125
    assert prop3_bound_printed(a, b, 1.0, drop_flat=True) == pytest.approx(2.25)
    assert prop3_bound_corrected(a, b, 1.0, drop_flat=True) == pytest.approx(4.5)
    assert inconsistency_score_diagonal(np.array([a, b]), 1.0).value == pytest.approx(2.0)  # finite


# ----------------------------------------------------------------------------------------------------------------
# Q3: Remark 2
# ----------------------------------------------------------------------------------------------------------------


@PROPERTY
@given(spd_stacks(min_K=1, max_K=1), st.floats(0.01, 10.0))
def test_q3_equal_hessians_give_eps(drawn, eps):
    H, _ = drawn
    score = inconsistency_score(QuadraticProblem(np.concatenate([H, H])), eps)
    assert score.value == pytest.approx(eps, rel=1e-6)
    lams = np.abs(np.diagonal(H[0])) + 0.1
    assert inconsistency_score_diagonal(np.array([lams, lams]), eps).value == eps


def test_q3_flat_in_one_environment_gives_inf_score_and_bound():
    a, b = np.array([0.0, 1.0]), np.array([3.0, 1.0])
    assert inconsistency_score_diagonal(np.array([a, b]), 0.1).value == math.inf
    assert prop3_bound_printed(a, b, 0.1) == math.inf
    assert prop3_bound_corrected(a, b, 0.1) == math.inf


# ----------------------------------------------------------------------------------------------------------------
# Q4-Q6: determinants, Figs. 3 and 12
# ----------------------------------------------------------------------------------------------------------------


@PROPERTY
@given(diagonal_lams(), spd_stacks())
def test_q4_determinant_ordering(lams, drawn):
    H, _ = drawn
    det_am = np.prod(lams.mean(axis=0))
    det_gm = np.prod([math.prod(column) ** (1 / lams.shape[0]) for column in lams.T])
    assert 0 <= det_gm <= det_am * (1 + 1e-12)
    assert determinant_ratio(lams) == pytest.approx(det_am / det_gm, rel=1e-9)
    am = np.linalg.det(H.mean(axis=0))
    gm = np.prod(np.linalg.det(H)) ** (1 / H.shape[0])
    assert 0 <= gm <= am * (1 + 1e-9)
    assert determinant_ratio(H) == pytest.approx(am / gm, rel=1e-6)


@PROPERTY
@given(diagonal_lams(min_K=1, max_K=3), st.integers(0, 3), st.floats(1.01, 10.0))
def test_q4_equality_iff_equal(lams, index, factor):
    K = 3
    equal = np.repeat(lams[:1], K, axis=0)
    assert determinant_ratio(equal) == pytest.approx(1.0, rel=1e-12)
    perturbed = equal.copy()
    perturbed[index % K, index % lams.shape[1]] *= factor
    assert determinant_ratio(perturbed) > 1 + 1e-7


def test_q5_figure_3():
    lams = np.array([[0.05, 1.0], [1.0, 0.05]])
    # det AM = 0.525^2 = 0.275625, det GM = sqrt(0.05)^2 = 0.05
    assert determinant_ratio(lams) == pytest.approx(5.5125, rel=1e-12)
    assert inconsistency_score_diagonal(lams, 0.1).value == pytest.approx(20 * 0.1)


def test_q6_figure_12():
    lams = np.array([[0.01, 1.0], [1.0, 0.01]])
    assert determinant_ratio(lams) == pytest.approx(25.5025, rel=1e-12)
    assert round(determinant_ratio(lams), 2) == 25.50
    assert inconsistency_score_diagonal(lams, 0.1).value == pytest.approx(100 * 0.1)
    # The printed 2-eps bound happens to hold here (prod r_i^2 = 650.3).
    assert prop3_bound_printed(lams[0], lams[1], 0.1) == pytest.approx(2 * 0.1 * 25.5025**2)


def test_determinant_ratio_singular_cases():
    assert determinant_ratio(np.array([[0.0, 1.0], [2.0, 1.0]])) == math.inf
    assert determinant_ratio(np.array([[0.0, 1.0], [0.0, 1.0]])) is None
    rng = np.random.default_rng(0)
    Q = rotation(rng, 2)
    singular = np.array([Q @ np.diag([0.0, 1.0]) @ Q.T, spd(rng, [1.0, 2.0])])
    assert determinant_ratio(singular) == math.inf
    assert determinant_ratio(np.array([singular[0], singular[0]])) is None


def test_determinant_ratio_equals_karcher_route():
    rng = np.random.default_rng(8)
    H = np.array([spd(rng, 10.0 ** rng.uniform(-1, 1, 3)) for _ in range(4)])
    X = karcher_mean(H).mean
    assert determinant_ratio(H) == pytest.approx(np.linalg.det(H.mean(axis=0)) / np.linalg.det(X), rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Means of Hessians: arithmetic, geometric, two-matrix, Karcher
# ----------------------------------------------------------------------------------------------------------------


def test_arithmetic_and_geometric_means_by_hand():
    np.testing.assert_allclose(arithmetic_mean(np.array([[1.0, 4.0], [3.0, 0.0]])), [2.0, 2.0])
    np.testing.assert_allclose(arithmetic_mean(np.array([np.eye(2), 3 * np.eye(2)])), 2 * np.eye(2))
    np.testing.assert_allclose(geometric_mean_diagonal(np.array([[1.0, 4.0, 2.0], [9.0, 0.0, 8.0]])), [3.0, 0.0, 4.0])
    # the log domain neither underflows nor overflows
    np.testing.assert_allclose(geometric_mean_diagonal(np.array([[1e-300, 1e300]] * 16)), [1e-300, 1e300])
    np.testing.assert_allclose(geometric_mean_diagonal(np.array([[1e-200], [1e200]])), [1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_matrix_geometric_mean_independent_routes(seed):
    rng = np.random.default_rng(seed)
    A, B = spd(rng, 10.0 ** rng.uniform(-1, 1, 3)), spd(rng, 10.0 ** rng.uniform(-1, 1, 3))
    X = two_matrix_geometric_mean(A, B)
    root = scipy.linalg.sqrtm(A).real
    inverse_root = np.linalg.inv(root)
    expected = root @ scipy.linalg.sqrtm(inverse_root @ B @ inverse_root).real @ root
    np.testing.assert_allclose(X, expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(X @ np.linalg.inv(A) @ X, B, rtol=1e-8, atol=1e-10)  # Riccati: X A^-1 X = B
    np.testing.assert_allclose(two_matrix_geometric_mean(B, A), X, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(karcher_mean(np.array([A, B])).mean, X, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m", [3, 5])
def test_karcher_mean_properties(seed, m):
    rng = np.random.default_rng(10 * seed + m)
    H = np.array([spd(rng, 10.0 ** rng.uniform(-1, 1, 3)) for _ in range(m)])
    X, iterations = karcher_mean(H)
    assert 0 < iterations < 500
    assert np.linalg.det(X) == pytest.approx(np.prod(np.linalg.det(H)) ** (1 / m), rel=1e-9)
    # The defining equation sum_i log(A_i^-1 X) = 0, with scipy's general logm.
    total = sum(scipy.linalg.logm(np.linalg.solve(A, X)) for A in H)
    assert np.abs(total).max() < 1e-8
    # Invariance to the order of the matrices and to congruence X -> S X S^T.
    np.testing.assert_allclose(karcher_mean(H[::-1]).mean, X, rtol=1e-9, atol=1e-12)
    S = rng.normal(size=(3, 3)) + 3 * np.eye(3)
    np.testing.assert_allclose(karcher_mean(S @ H @ S.T).mean, S @ X @ S.T, rtol=1e-7, atol=1e-9)


def test_karcher_and_commuting_means_reduce_to_elementwise_geometric_mean():
    rng = np.random.default_rng(6)
    Q = rotation(rng, 3)
    lams = np.array([[1.0, 2.0, 0.5], [4.0, 8.0, 2.0], [2.0, 0.5, 4.0]])
    H = np.array([Q @ np.diag(row) @ Q.T for row in lams])
    expected = Q @ np.diag([2.0, 2.0, 4.0 ** (1 / 3)]) @ Q.T  # (1*4*2)^(1/3)=2, (2*8*0.5)^(1/3)=2, (0.5*2*4)^(1/3)
    np.testing.assert_allclose(geometric_mean_commuting(H), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(karcher_mean(H).mean, expected, rtol=1e-9, atol=1e-12)
    # For commuting matrices one unit step from the arithmetic mean lands on the mean (the logs commute), and
    # equal matrices need none.
    assert karcher_mean(H).iterations == 1
    assert karcher_mean(np.array([H[0], H[0], H[0]])).iterations == 0
    # with a zero eigenvalue in one environment: that common direction gets 0
    singular = H.copy()
    singular[0] = Q @ np.diag([0.0, 2.0, 0.5]) @ Q.T
    np.testing.assert_allclose(
        geometric_mean_commuting(singular), Q @ np.diag([0.0, 2.0, 4.0 ** (1 / 3)]) @ Q.T, atol=1e-10
    )
    # repeated eigenvalues (degenerate common eigenspaces) are fine
    twins = np.array([np.diag([1.0, 1.0, 2.0]), np.diag([4.0, 4.0, 2.0])])
    np.testing.assert_allclose(geometric_mean_commuting(twins), np.diag([2.0, 2.0, 2.0]), atol=1e-12)


def test_karcher_not_converged_and_not_commuting_raise():
    rng = np.random.default_rng(1)
    H = np.array([spd(rng, [1.0, 5.0]), spd(rng, [0.2, 3.0]), spd(rng, [1.0, 2.0])])
    with pytest.raises(RuntimeError, match="did not converge"):
        karcher_mean(H, max_iter=1)
    with pytest.raises(ValueError, match="commute"):
        geometric_mean_commuting(H)
    with pytest.raises(ValueError, match=r"H\[1\] must be positive definite"):
        karcher_mean(np.array([np.eye(2), np.diag([1.0, 0.0])]))
    with pytest.raises(ValueError, match="B must be positive definite"):
        two_matrix_geometric_mean(np.eye(2), np.diag([1.0, 0.0]))


# ----------------------------------------------------------------------------------------------------------------
# Q7, Q8: GD and geometric-mean GD  [paper §2.2, footnotes 7-8]
# ----------------------------------------------------------------------------------------------------------------


@PROPERTY
@given(diagonal_lams(low=-2, high=2), st.floats(0.05, 0.99), st.integers(0, 2**32 - 1))
def test_q7_gd_contracts_each_coordinate_by_one_minus_eta_mean_curvature(lams, fraction, seed):
    rng = np.random.default_rng(seed)
    K, P = lams.shape
    theta_star = rng.normal(size=P)
    problem = QuadraticProblem(lams, minimizers=np.tile(theta_star, (K, 1)))
    eta = fraction / lams.max()  # eta < 1 / lam_max (footnote 7)
    theta0 = theta_star + rng.normal(size=P) + 0.1
    trajectory = gd_trajectory(problem, theta0, eta, 30)
    factors = [1 - eta * sum(lams[:, i]) / K for i in range(P)]  # by hand
    np.testing.assert_allclose(gd_contraction_factors(problem, eta), factors, rtol=1e-12)
    deviations = np.abs(trajectory - theta_star)
    for k in range(5):
        for i in range(P):
            assert deviations[k + 1, i] == pytest.approx(factors[i] * deviations[k, i], rel=1e-9, abs=1e-14)
    # Explicit iteration of theta <- theta - eta * mean_e lam^e (theta - theta*).
    theta = theta0.copy()
    for k in range(1, 31):
        theta = theta - eta * np.mean([row * (theta - theta_star) for row in lams], axis=0)
        np.testing.assert_allclose(trajectory[k], theta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("common", [True, False])
def test_q7_full_hessian_gd_trajectory_matches_iteration(common):
    rng = np.random.default_rng(12)
    K, P = 3, 3
    H = np.array([spd(rng, rng.uniform(0.2, 2.0, P)) for _ in range(K)])
    mu = np.tile(rng.normal(size=P), (K, 1)) if common else rng.normal(size=(K, P))
    problem = QuadraticProblem(H, mu)
    theta0, eta = rng.normal(size=P), 0.3
    trajectory = gd_trajectory(problem, theta0, eta, 40)
    theta = theta0.copy()
    for k in range(1, 41):
        theta = theta - eta * np.mean([H[e] @ (theta - mu[e]) for e in range(K)], axis=0)
        np.testing.assert_allclose(trajectory[k], theta, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(trajectory[0], theta0)


@PROPERTY
@given(diagonal_lams(max_K=5), st.integers(0, 2**32 - 1))
def test_q8_geometric_mean_gradient_is_the_signed_product_root(lams, seed):
    rng = np.random.default_rng(seed)
    K, P = lams.shape
    theta_star, theta = rng.normal(size=P), rng.normal(size=P)
    problem = QuadraticProblem(lams, minimizers=np.tile(theta_star, (K, 1)))
    G = problem.gradients(theta)
    expected = []
    for i in range(P):  # footnote 8: the common sign times (prod_e |g_e,i|)^(1/K)
        sign = 1.0 if theta[i] > theta_star[i] else -1.0
        expected.append(sign * math.prod(abs(g) for g in G[:, i]) ** (1 / K))
    np.testing.assert_allclose(rules.geometric_mean(G), expected, rtol=1e-9)
    np.testing.assert_allclose(geometric_mean_diagonal(lams) * (theta - theta_star), expected, rtol=1e-9)


@PROPERTY
@given(diagonal_lams(low=-2, high=1), st.floats(0.05, 0.99), st.integers(0, 2**32 - 1))
def test_q8_geometric_mean_trajectory_equals_iterating_the_rule(lams, fraction, seed):
    rng = np.random.default_rng(seed)
    K, P = lams.shape
    theta_star = rng.normal(size=P)
    problem = QuadraticProblem(lams, minimizers=np.tile(theta_star, (K, 1)))
    eta = fraction / lams.max()
    theta0 = theta_star + rng.normal(size=P)
    trajectory = geometric_mean_gd_trajectory(lams, theta_star, theta0, eta, 25)
    theta = theta0.copy()
    for k in range(1, 26):
        theta = theta - eta * rules.geometric_mean(problem.gradients(theta))
        np.testing.assert_allclose(trajectory[k], theta, rtol=1e-9, atol=1e-12)
    # It is slower than GD per coordinate: lam^∧_i <= lam^+_i (geometric <= arithmetic mean).
    assert np.all(geometric_mean_contraction_factors(lams, eta) >= gd_contraction_factors(problem, eta) - 1e-12)


def test_q8_flat_coordinate_never_moves():
    lams = np.array([[1.0, 0.0], [2.0, 3.0]])
    trajectory = geometric_mean_gd_trajectory(lams, np.zeros(2), np.array([1.0, 1.0]), 0.1, 10)
    np.testing.assert_array_equal(trajectory[:, 1], np.ones(11))
    # coordinate 0: factor 1 - 0.1 * sqrt(2)
    assert trajectory[10, 0] == pytest.approx((1 - 0.1 * SQRT2) ** 10)


def test_diverging_trajectory_raises_instead_of_returning_inf():
    problem = QuadraticProblem([[1.0], [3.0]])
    with pytest.raises(ValueError, match="overflows"):
        gd_trajectory(problem, np.array([1.0]), 5.0, 2000)  # factor 1 - 5 * 2 = -9


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"hessians": np.array([[[1.0, 0.5], [0.0, 1.0]]])}, ValueError, r"hessians\[0\] must be symmetric"),
        ({"hessians": np.array([np.eye(2), [[1.0, 2.0], [2.0, 1.0]]])}, ValueError, r"hessians\[1\].*semidefinite.*-1"),
        ({"hessians": np.array([[1.0, -1e-30]])}, ValueError, r"hessians\[0, 1\] = -1e-30"),
        ({"hessians": np.zeros((0, 2, 2))}, ValueError, "K >= 1"),
        ({"hessians": np.zeros((2, 0))}, ValueError, "P >= 1"),
        ({"hessians": np.zeros((2, 2, 3))}, ValueError, r"hessians must have shape \[K, P, P\]"),
        ({"hessians": np.zeros(3)}, ValueError, r"hessians must have shape"),
        ({"hessians": np.array([[1.0, np.nan]])}, ValueError, "hessians must be finite"),
        ({"hessians": np.array([[True, False]])}, TypeError, "hessians"),
        ({"hessians": np.ones((2, 3)), "minimizers": np.zeros((2, 2))}, ValueError, r"minimizers must have shape"),
        ({"hessians": np.ones((2, 3)), "minimizers": np.full((2, 3), np.inf)}, ValueError, "minimizers must be finite"),
        ({"hessians": np.ones((2, 3)), "offsets": np.zeros(3)}, ValueError, r"offsets must have shape \[K\]"),
    ],
)
def test_problem_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        QuadraticProblem(**kwargs)


def test_bad_input_of_functions():
    problem = QuadraticProblem([[1.0, 2.0], [2.0, 1.0]])
    bad_eps = [(0.0, ValueError), (-1.0, ValueError), (np.nan, ValueError), ("1", TypeError), (True, TypeError)]
    for eps, error in bad_eps:
        with pytest.raises(error, match="eps"):
            inconsistency_score(problem, eps)
        with pytest.raises(error, match="eps"):
            inconsistency_score_diagonal(np.ones((2, 2)), eps)
        with pytest.raises(error, match="eps"):
            prop3_bound_corrected(np.ones(2), np.ones(2), eps)
    with pytest.raises(ValueError, match="theta_star must have shape"):
        inconsistency_score(problem, 0.1, theta_star=np.zeros(3))
    with pytest.raises(ValueError, match="theta must have shape"):
        problem.losses(np.zeros(3))
    with pytest.raises(ValueError, match="lams must hold diagonal Hessians with entries >= 0"):
        geometric_mean_diagonal(np.array([[1.0, -2.0]]))
    with pytest.raises(ValueError, match="offsets must have shape"):
        inconsistency_score_diagonal(np.ones((2, 2)), 0.1, offsets=np.zeros(3))
    with pytest.raises(ValueError, match="H_A and H_B must both be"):
        prop3_bound_printed(np.ones(2), np.ones(3), 0.1)
    with pytest.raises(ValueError, match="H_B must be symmetric"):
        prop3_bound_printed(np.eye(2), np.array([[1.0, 1.0], [0.0, 1.0]]), 0.1)
    with pytest.raises(ValueError, match="eta"):
        gd_trajectory(problem, np.zeros(2), 0.0, 3)
    with pytest.raises(TypeError, match="n_steps"):
        gd_trajectory(problem, np.zeros(2), 0.1, 3.0)
    with pytest.raises(TypeError, match="problem must be a QuadraticProblem"):
        inconsistency_score(np.ones((2, 2)), 0.1)
    with pytest.raises(ValueError, match="tol"):
        karcher_mean(np.array([np.eye(2)]), tol=0.0)
    with pytest.raises(ValueError, match="H_A and H_B must commute"):
        prop3_bound_printed(np.diag([1.0, 2.0]), np.array([[1.0, 0.5], [0.5, 1.0]]), 0.1)
    with pytest.raises(ValueError, match="gd_contraction_factors needs diagonal"):
        gd_contraction_factors(QuadraticProblem(np.array([[[2.0, 1.0], [1.0, 2.0]]])), 0.1)


def test_score_result_type():
    score = inconsistency_score_diagonal(np.array([[1.0, 2.0], [3.0, 1.0]]), 1.0)
    assert isinstance(score, InconsistencyScore)
    assert score.pair_values.shape == (2, 2) and not score.pair_values.flags.writeable
    with pytest.raises(AttributeError):
        score.value = 2.0
