"""Tests of hardtovary.reference.consistency: I^eps on grids, ILC by Monte Carlo, GD with aggregation rules,
Propositions 1 and 2, the two-sigmoid toy. Tests named q9..q13 check the paper's quantitative claims: Q9
Proposition 1 (App. A.3), Q10-Q12 Proposition 2, eq. (4) and Fig. 4 (App. A.4), Q13 the toy of App. A.1.

Expected values come from an independent route: closed forms written out here (eps * max curvature ratio,
generalized eigenvalues, intervals of 1-D quadratics), brute-force enumeration of sign patterns, exact integer
binomial sums (fractions), Monte Carlo with confidence bounds, and values computed once by an independent script
(exact sums, cross-checked by Monte Carlo), quoted here to the digits given.
"""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import scipy.linalg
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hardtovary.reference import consistency as C
from hardtovary.reference.data import (
    patchwork_env_gradients,
    patchwork_env_losses,
    patchwork_regression,
    two_sigmoid_env_losses,
    two_sigmoid_theta_star,
)
from hardtovary.reference.rules import and_mask, and_mask_count, and_masked_mean

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

PROPERTY = settings(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------------------------------------------
# Loss families with closed forms (written here, independent of the code under test)
# ----------------------------------------------------------------------------------------------------------------


def quadratic_losses(hessians, minimizers=None):
    """``L_e(theta) = 1/2 (theta - mu_e)^T H_e (theta - mu_e)``, vectorised: ``theta[..., P] -> [..., K]``."""
    H = np.asarray(hessians, dtype=float)
    mu = np.zeros(H.shape[:2]) if minimizers is None else np.asarray(minimizers, dtype=float)

    def env_losses(theta):
        d = theta[..., None, :] - mu  # [..., K, P]
        return 0.5 * np.einsum("...ei,eij,...ej->...e", d, H, d)

    return env_losses


def quadratic_gradients(hessians, minimizers=None):
    """``G[e] = H_e (theta - mu_e)`` for ``theta[P]``."""
    H = np.asarray(hessians, dtype=float)
    mu = np.zeros(H.shape[:2]) if minimizers is None else np.asarray(minimizers, dtype=float)
    return lambda theta: np.einsum("eij,ej->ei", H, theta - mu)


def closed_form_common_minimizer(hessians, eps):
    """eps * max_{e != e'} lambda_max(H_e^{-1} H_e') (full SPD Hessians), at least eps (the e = e pairs)."""
    K = len(hessians)
    best = 1.0
    for e in range(K):
        for e2 in range(K):
            if e != e2:
                best = max(best, scipy.linalg.eigh(hessians[e2], hessians[e], eigvals_only=True).max())
    return eps * best


def interval_sup_1d(lams, mus, theta, eps):
    """Exact pair values of eq. (1) for 1-D quadratics L_e = lam_e/2 (x - mu_e)^2 at any point theta.

    N_e is the interval of {c_e - eps <= L_e <= c_e + eps} containing theta (c_e = L_e(theta)): the whole
    sublevel interval when c_e <= eps, otherwise the branch of the shell on theta's side of mu_e. L_e' is convex,
    so its extremes on [a, b] are at a, b and (if inside) its minimizer mu_e'.
    """
    L = [lambda x, lam=lam, m=m: 0.5 * lam * (x - m) ** 2 for lam, m in zip(lams, mus)]
    K = len(lams)
    values = np.zeros((K, K))
    for e in range(K):
        c = L[e](theta)
        outer = math.sqrt(2 * (c + eps) / lams[e])
        inner = math.sqrt(2 * max(c - eps, 0.0) / lams[e])
        if inner == 0.0:
            a, b = mus[e] - outer, mus[e] + outer
        elif theta >= mus[e]:
            a, b = mus[e] + inner, mus[e] + outer
        else:
            a, b = mus[e] - outer, mus[e] - inner
        for e2 in range(K):
            points = [a, b] + ([mus[e2]] if a <= mus[e2] <= b else [])
            values[e, e2] = max(abs(L[e2](x) - c) for x in points)
    return values


def axis(extent, n):
    return np.linspace(-extent, extent, n)


# ----------------------------------------------------------------------------------------------------------------
# I^eps on a grid vs closed forms  [eq. (1); App. A.2's closed form and its extensions]
# ----------------------------------------------------------------------------------------------------------------


@PROPERTY
@given(
    lamA=st.tuples(st.floats(0.2, 5.0), st.floats(0.2, 5.0)),
    lamB=st.tuples(st.floats(0.2, 5.0), st.floats(0.2, 5.0)),
    eps=st.floats(0.01, 1.0),
)
def test_grid_matches_eps_times_max_ratio_for_2d_diagonal_quadratics(lamA, lamB, eps):
    """Q1: I^eps = eps max_i max(lamB_i/lamA_i, lamA_i/lamB_i), up to the grid's one-cell under-estimate."""
    H = np.array([np.diag(lamA), np.diag(lamB)])
    exact = eps * max(max(b / a, a / b) for a, b in zip(lamA, lamB))
    radius = math.sqrt(2 * eps / min(lamA + lamB))  # the largest ellipse semi-axis
    n = 201
    grid = (axis(1.2 * radius, n), axis(1.2 * radius, n))
    h = 2.4 * radius / (n - 1)
    result = C.inconsistency_on_grid(quadratic_losses(H), np.zeros(2), eps, grid)
    tol = max(lamA + lamB) * (radius * h + h * h)  # loss change over one cell at the maximiser
    assert exact - tol <= result.value <= exact * (1 + 1e-12)
    assert not result.is_lower_bound and not result.touches_boundary.any()
    assert np.allclose(np.diag(result.pair_values), eps, rtol=0, atol=tol)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grid_matches_generalized_eigenvalue_for_rotated_quadratics(seed):
    """Full SPD Hessians, I^eps = eps max lambda_max(H_e^{-1} H_e'); K = 3 environments."""
    rng = np.random.default_rng(seed)
    H = []
    for _ in range(3):
        Q, _ = np.linalg.qr(rng.normal(size=(2, 2)))
        H.append(Q @ np.diag(rng.uniform(0.3, 3.0, size=2)) @ Q.T)
    H = np.array(H)
    eps = 0.05
    exact = closed_form_common_minimizer(H, eps)
    radius = max(math.sqrt(2 * eps / np.linalg.eigvalsh(h).min()) for h in H)
    n = 301
    result = C.inconsistency_on_grid(quadratic_losses(H), np.zeros(2), eps, (axis(1.1 * radius, n),) * 2)
    h = 2.2 * radius / (n - 1)
    tol = max(np.linalg.eigvalsh(h_).max() for h_ in H) * (radius * h + h * h)
    assert exact - tol <= result.value <= exact * (1 + 1e-12)
    assert result.value > exact - 0.02 * exact  # and the grid is fine enough for 2 %


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_grid_agrees_with_quadratic_trust_region_scores_for_different_minimizers(seed):
    """2-D quadratics with different minimizers and offsets, theta* = pooled minimizer (the GD
    limit). quadratic.inconsistency_score solves trust-region subproblems; the grid must lie below it (its points
    in the band are in N_e: a 2-D quadratic's band is one ellipse or elliptic shell) and within one cell of it."""
    quadratic = pytest.importorskip("hardtovary.reference.quadratic")
    rng = np.random.default_rng(100 + seed)
    K = 2 + seed % 2
    H = []
    for _ in range(K):
        Q, _ = np.linalg.qr(rng.normal(size=(2, 2)))
        H.append(Q @ np.diag(rng.uniform(0.5, 2.0, size=2)) @ Q.T)
    H, mu, offsets = np.array(H), rng.uniform(-0.5, 0.5, size=(K, 2)), rng.uniform(0.0, 0.2, size=K)
    problem = quadratic.QuadraticProblem(H, mu, offsets)
    star = problem.pooled_minimizer()
    eps = 0.3
    exact = quadratic.inconsistency_score(problem, eps, star)
    losses = lambda th: quadratic_losses(H, mu)(th) + offsets
    # every band lies in {L_e <= L_e(theta*) + eps}, an ellipse around mu_e
    above_min = losses(star) - offsets + eps
    reach = max(np.abs(mu[e]).max() + math.sqrt(2 * above_min[e] / np.linalg.eigvalsh(H[e]).min()) for e in range(K))
    n = 401
    result = C.inconsistency_on_grid(losses, star, eps, (axis(1.05 * reach, n),) * 2)
    assert not result.is_lower_bound
    h = 2.1 * reach / (n - 1)
    # |grad L_e'(x)| <= lambda_max (|x| + |mu_e'|) on the box; the maximiser is within one cell diagonal of a point
    slope = max(np.linalg.eigvalsh(h_).max() for h_ in H) * math.sqrt(2) * (1.05 * reach + np.abs(mu).max())
    tol = slope * h * math.sqrt(2)
    np.testing.assert_array_less(result.pair_values, exact.pair_values + 1e-9)
    np.testing.assert_array_less(exact.pair_values - tol, result.pair_values)
    assert exact.value - tol <= result.value <= exact.value + 1e-9


def test_grid_is_exact_for_1d_quadratics_on_a_dyadic_grid():
    """1-D, L_A = x^2 (band edge +-1 for eps = 1 is a grid point), L_B = 3 x^2: I = 3 eps exactly."""
    grid = np.arange(-512, 513) / 256.0  # dyadic: +-1 exactly, losses exact in float64
    losses = lambda th: np.stack([th[..., 0] ** 2, 3.0 * th[..., 0] ** 2], axis=-1)
    result = C.inconsistency_on_grid(losses, 0.0, 1.0, grid)
    assert result.value == 3.0
    assert result.pair == (0, 1)
    assert abs(result.argmax[0]) == 1.0
    # N_B = {3 x^2 <= 1} = |x| <= 1/sqrt(3): the largest grid point inside is floor(256/sqrt 3)/256, so row B is
    # the grid's under-estimate of (1/3, 1), exactly predictable
    x_max = math.floor(256 / math.sqrt(3)) / 256
    np.testing.assert_array_equal(result.pair_values, [[1.0, 3.0], [x_max**2, 3 * x_max**2]])
    # the component of A is exactly the 513 points of [-1, 1]
    assert result.components[0].sum() == 513
    same = C.inconsistency_1d_interval(losses, 0.0, 1.0, -2.0, 2.0, 1025)
    assert same.value == result.value


@PROPERTY
@given(
    lams=st.tuples(st.floats(0.5, 3.0), st.floats(0.5, 3.0)),
    mus=st.tuples(st.floats(-1.5, -0.2), st.floats(0.2, 1.5)),
    theta=st.floats(-2.0, 2.0),
    eps=st.floats(0.02, 0.5),
)
def test_grid_matches_exact_intervals_for_1d_quadratics_with_different_minimizers(lams, mus, theta, eps):
    """Different minimizers, P = 1: N_e is the branch of the eps-shell containing theta."""
    n, extent = 8001, 6.0
    h = 2 * extent / (n - 1)
    # keep away from shells whose hole is narrower than a few cells (the grid merges them: documented)
    for lam, m in zip(lams, mus):
        c = 0.5 * lam * (theta - m) ** 2
        hole = 2 * math.sqrt(2 * max(c - eps, 0.0) / lam)
        assume(hole == 0.0 or hole > 4 * h)
        assume(abs(c - eps) > 1e-3)  # the band's inner edge must not sit at theta itself
    exact = interval_sup_1d(lams, mus, theta, eps)
    result = C.inconsistency_on_grid(quadratic_losses(np.array(lams)[:, None, None], np.array(mus)[:, None]),
                                     theta, eps, axis(extent, n))
    slope = max(lams) * (extent + 2)  # |L_e'| on the grid
    assert np.all(result.pair_values <= exact + 1e-9)
    assert np.all(result.pair_values >= exact - slope * h)
    assert result.value == pytest.approx(exact.max(), abs=slope * h)


def test_only_the_component_containing_theta_star_counts_double_well():
    """N^eps is the connected component through theta* (paper §2.1), not the whole band.

    L_A = (x^2 - 1)^2 has minima at +-1 with L_A = 0; its eps-band has one component around each. theta* = 1.
    L_B = (x - 1)^2 is 4 at the other well, so counting that component would give I >= 4.
    Exact (eps = 0.01): N_A = [sqrt(0.9), sqrt(1.1)], N_B = [0.9, 1.1]; pairs (A,B) = (1 - sqrt 0.9)^2,
    (B,A) = max((0.81 - 1)^2, (1.21 - 1)^2) = 0.0441, diagonals eps.
    """
    eps = 0.01
    losses = lambda th: np.stack([(th[..., 0] ** 2 - 1) ** 2, (th[..., 0] - 1) ** 2], axis=-1)
    grid = np.linspace(-2.0, 2.0, 40001)
    band_A = np.abs((grid**2 - 1) ** 2) <= eps
    assert band_A[grid < 0].any()  # the band really has a second component
    result = C.inconsistency_on_grid(losses, 1.0, eps, grid)
    exact = np.array([[eps, (1 - math.sqrt(0.9)) ** 2], [0.0441, eps]])
    np.testing.assert_allclose(result.pair_values, exact, rtol=0, atol=2e-4)
    assert result.value == pytest.approx(0.0441, abs=2e-4)
    assert result.pair == (1, 0)
    assert np.all(grid[result.components[0]] > 0)
    assert grid[result.components[0]].min() == pytest.approx(math.sqrt(0.9), abs=2e-4)
    assert grid[result.components[0]].max() == pytest.approx(math.sqrt(1.1), abs=2e-4)


def test_unbounded_component_sets_the_boundary_flag_and_warns():
    """Remark 2: lamA_2 = 0 < lamB_2 gives I = inf. On a grid N_A is a strip reaching the edge: the value is a
    lower bound, eps + R^2/2 on [-R, R]^2 (x at the band edge sqrt(2 eps) and |y| = R), and grows with R."""
    eps = 0.1
    H = np.array([np.diag([1.0, 0.0]), np.diag([1.0, 1.0])])
    values = []
    for R in (1.0, 2.0):
        grid = (axis(R, 401), axis(R, 401))
        with pytest.warns(C.GridBoundaryWarning, match=r"\[0\]"):
            result = C.inconsistency_on_grid(quadratic_losses(H), np.zeros(2), eps, grid)
        np.testing.assert_array_equal(result.touches_boundary, [True, False])
        assert result.is_lower_bound
        h = 2 * R / 400
        assert eps + R**2 / 2 - 2 * h <= result.value <= eps + R**2 / 2
        assert result.pair == (0, 1)
        values.append(result.value)
    assert values[1] > 3 * values[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = C.inconsistency_on_grid(quadratic_losses(H), np.zeros(2), eps, grid, warn=False)
    assert quiet.is_lower_bound


def test_connectivity_8_keeps_diagonal_necks_that_4_splits():
    """The band {x y >= -eps} is connected through thin strips along the axes. On a grid that avoids the axes
    (points at +-0.05, ...), with eps below 0.05^2 its first and third quadrants touch only diagonally:
    8-connectivity keeps them together (the continuum answer), 4-connectivity splits them."""
    eps = 1e-3
    ax = (np.arange(-10, 10) + 0.5) * 0.1  # -0.95 .. 0.95, no zero
    losses = lambda th: np.stack(
        [np.maximum(-th[..., 0] * th[..., 1], 0.0), np.maximum(-th[..., 0], 0.0)], axis=-1
    )
    theta_star = np.array([0.45, 0.45])
    eight = C.inconsistency_on_grid(losses, theta_star, eps, (ax, ax), warn=False)
    four = C.inconsistency_on_grid(losses, theta_star, eps, (ax, ax), connectivity=4, warn=False)
    assert eight.components[0].sum() == 200  # both quadrants, 100 points each
    assert four.components[0].sum() == 100
    assert eight.pair_values[0, 1] == pytest.approx(0.95)  # L_B = -x on the third quadrant
    assert four.pair_values[0, 1] == 0.0


def test_theta_star_counts_even_when_it_is_not_a_grid_point():
    """theta* is in N^eps_e by definition. L_A = x^2, L_B = 1 - x^2 at theta* = 0 on a grid without 0: the pair
    (A, B) sup is |L_B(0) - L_A(0)| = 1 exactly, attained at theta* (grid points only reach 1 - (h/2)^2)."""
    grid = (np.arange(-50, 50) + 0.5) / 50.0
    losses = lambda th: np.stack([th[..., 0] ** 2, 1.0 - th[..., 0] ** 2], axis=-1)
    result = C.inconsistency_on_grid(losses, 0.0, 0.25, grid)
    # both cross pairs are |(1 - x^2) - 0| resp. |x^2 - 1|, largest at x = 0 = theta*
    np.testing.assert_array_equal(result.pair_values[[0, 1], [1, 0]], [1.0, 1.0])
    np.testing.assert_array_equal(result.pair_argmax[0, 1], [0.0])
    assert result.value == 1.0 and result.pair == (0, 1)  # first pair in row-major order on ties


def test_coarse_grid_around_theta_star_is_refused():
    losses = lambda th: 100.0 * th**2
    with pytest.raises(ValueError, match="too coarse"):
        C.inconsistency_on_grid(losses, 0.05, 1e-3, np.linspace(-1, 1, 11))


# ----------------------------------------------------------------------------------------------------------------
# Gradient descent with aggregation rules  [paper §2.2-2.3, footnotes 7-8]
# ----------------------------------------------------------------------------------------------------------------


def test_gd_mean_converges_to_the_pooled_minimizer():
    """Plain GD on quadratics with different minimizers reaches H̄^{-1} mean_e H_e mu_e (normal equations)."""
    rng = np.random.default_rng(3)
    A = rng.normal(size=(3, 3, 3))
    H = np.einsum("eij,ekj->eik", A, A) + 0.5 * np.eye(3)
    mu = rng.normal(size=(3, 3))
    target = np.linalg.solve(H.mean(0), np.einsum("eij,ej->i", H, mu) / 3)
    eta = 1.0 / np.linalg.eigvalsh(H.mean(0)).max()
    theta = C.gradient_descent(quadratic_gradients(H, mu), rng.normal(size=3), eta, 20000, tol=1e-14)
    np.testing.assert_allclose(theta, target, atol=1e-10)


def test_gd_geometric_mean_contracts_with_the_geometric_mean_hessian():
    """Paper §2.2, footnotes 7-8: on diagonal quadratics with a common minimizer, geometric-mean GD is GD on H^∧ =
    diag(prod_e lam^e_i)^{1/K}: theta^k - theta* = (1 - eta lam^∧)^k (theta^0 - theta*) per coordinate."""
    lam = np.array([[1.0, 4.0], [4.0, 0.25], [2.0, 1.0]])  # K = 3, P = 2
    H = np.array([np.diag(row) for row in lam])
    star = np.array([0.5, -1.0])
    theta0 = np.array([2.0, 1.0])  # both coordinates above theta*: signs agree in every environment
    eta = 0.1
    traj = C.gradient_descent(
        quadratic_gradients(H, np.tile(star, (3, 1))), theta0, eta, 25, rule="geometric_mean",
        return_trajectory=True,
    )
    lam_geo = np.prod(lam, axis=0) ** (1 / 3)
    k = np.arange(26)[:, None]
    np.testing.assert_allclose(traj.thetas, star + (1 - eta * lam_geo) ** k * (theta0 - star), rtol=1e-12)
    assert traj.masks.all() and traj.n_steps == 25 and not traj.converged


@pytest.mark.parametrize("theta0", [-3.0, -1.7, 2.2, 3.0, 4.5])
def test_and_mask_freezes_inside_the_interval_of_minimizers(theta0):
    """With minimizers mu_A = -1, mu_B = 1 the signs agree only outside [-1, 1]; AND-masked GD with
    tau = 1 stops once it enters, overshooting by at most eta |gbar| of the last move."""
    lams, mus, eta = np.array([1.0, 2.0]), np.array([-1.0, 1.0]), 0.3
    grads = quadratic_gradients(lams[:, None, None], mus[:, None])
    traj = C.gradient_descent(grads, np.array([theta0]), eta, 1000, rule="and_mask", tau=1.0, tol=0.0,
                              return_trajectory=True)
    assert traj.converged
    assert traj.directions[-1, 0] == 0.0 and not traj.masks[-1, 0]
    last_move = eta * abs(traj.directions[-2, 0])
    assert -1.0 - last_move <= traj.theta[0] <= 1.0 + last_move
    assert traj.thetas[-1, 0] == traj.thetas[-2, 0]  # the last (zero) step changed nothing
    assert abs(traj.thetas[-3, 0]) > 1.0  # the point before was still outside
    inside = C.gradient_descent(grads, np.array([0.3]), eta, 5, rule="and_mask", tau=1.0, tol=0.0)
    assert inside[0] == 0.3  # a coordinate starting inside never moves


def test_gd_warns_when_it_runs_out_of_steps():
    grads = quadratic_gradients(np.ones((1, 1, 1)))
    with pytest.warns(C.ConvergenceWarning, match="n_steps"):
        C.gradient_descent(grads, np.array([1.0]), 0.1, 3)


# ----------------------------------------------------------------------------------------------------------------
# ILC  [eq. (2)]
# ----------------------------------------------------------------------------------------------------------------


def test_ilc_of_gd_on_a_strictly_convex_quadratic_is_minus_inconsistency_at_theta_star_exactly():
    """GD on a strictly convex quadratic: A^inf(theta0) = theta* for every init, so ILC = -I^eps(theta*) with stderr 0.

    H_A = diag(1, 3), H_B = diag(3, 1): pooled Hessian 2 I, eta = 1/4 halves theta exactly each step until it
    underflows; I^eps = 3 eps (closed form)."""
    H = np.array([np.diag([1.0, 3.0]), np.diag([3.0, 1.0])])
    eps = 0.02
    grid = (axis(0.3, 241), axis(0.3, 241))
    algorithm = lambda t0: C.gradient_descent(quadratic_gradients(H), t0, 0.25, 3000, tol=0.0)
    limits = []

    def score(theta):
        limits.append(theta)
        return C.inconsistency_on_grid(quadratic_losses(H), theta, eps, grid)

    est = C.ilc_monte_carlo(algorithm, lambda rng: rng.normal(size=2), score, 6, np.random.default_rng(0))
    assert np.abs(np.array(limits)).max() <= 1e-300
    at_star = C.inconsistency_on_grid(quadratic_losses(H), np.zeros(2), eps, grid).value
    assert est.value == -at_star
    assert est.stderr == 0.0 and est.n == 6
    h = 0.6 / 240
    assert 3 * eps - 3 * (0.2 * h + h * h) <= at_star <= 3 * eps  # vs the closed form
    assert est.confidence_interval() == (est.value, est.value)


def _two_minimizers_toy():
    """Different minimizers, P = 1: L_A = (x + 1)^2 / 2, L_B = (x - 1)^2; AND-mask tau = 1 freezes in [-1, 1]."""
    lams, mus = (1.0, 2.0), (-1.0, 1.0)
    grads = quadratic_gradients(np.array(lams)[:, None, None], np.array(mus)[:, None])
    algorithm = lambda t0: C.gradient_descent(grads, t0, 0.1, 500, rule="and_mask", tau=1.0, tol=0.0)
    return lams, mus, algorithm


def test_ilc_monte_carlo_matches_quadrature_and_stderr_shrinks_like_one_over_sqrt_n():
    """Inits theta0 ~ U(-1, 1) never move (signs disagree), so ILC = -(1/2) int_{-1}^{1} I^eps(x) dx, which the
    test computes by the midpoint rule on the closed form; the MC estimate must lie within 4 stderr, and the
    stderr must shrink by ~4 from n = 64 to n = 1024."""
    lams, mus, algorithm = _two_minimizers_toy()
    eps = 0.1
    exact_I = lambda theta: float(interval_sup_1d(lams, mus, float(theta[0]), eps).max())
    midpoints = -1 + (np.arange(4000) + 0.5) / 2000
    truth = -np.mean([exact_I([x]) for x in midpoints])
    sample = lambda rng: rng.uniform(-1.0, 1.0, size=1)
    small = C.ilc_monte_carlo(algorithm, sample, exact_I, 64, np.random.default_rng(1))
    large = C.ilc_monte_carlo(algorithm, sample, exact_I, 1024, np.random.default_rng(2))
    for est in (small, large):
        assert abs(est.value - truth) <= 4 * est.stderr
        assert est.value == pytest.approx(-np.mean(est.scores), rel=1e-12)
        assert est.stderr == pytest.approx(np.std(est.scores, ddof=1) / math.sqrt(est.n), rel=1e-9)
    assert 4 / 1.5 <= small.stderr / large.stderr <= 4 * 1.5


def test_ilc_end_to_end_with_grid_inconsistency_on_the_two_minimizers_toy():
    """Same toy, inits U(-3, 3) (some move and freeze), I^eps by the 1-D grid: within 4 stderr (+ grid bias)
    of the estimate that uses the closed form at the same limits."""
    lams, mus, algorithm = _two_minimizers_toy()
    eps = 0.1
    env_losses = quadratic_losses(np.array(lams)[:, None, None], np.array(mus)[:, None])
    grid = np.linspace(-5, 5, 20001)
    grid_I = lambda theta: C.inconsistency_on_grid(env_losses, theta, eps, grid)
    exact_I = lambda theta: float(interval_sup_1d(lams, mus, float(theta[0]), eps).max())
    sample = lambda rng: rng.uniform(-3.0, 3.0, size=1)
    by_grid = C.ilc_monte_carlo(algorithm, sample, grid_I, 100, np.random.default_rng(5))
    by_formula = C.ilc_monte_carlo(algorithm, sample, exact_I, 100, np.random.default_rng(5))
    bias = 2.0 * 7.0 * (grid[1] - grid[0])  # max slope x cell
    assert np.all(by_grid.scores <= by_formula.scores + 1e-9)
    assert np.all(by_grid.scores >= by_formula.scores - bias)
    assert by_grid.stderr > 0


def test_ilc_of_identical_scores_is_exact_where_a_naive_mean_rounds():
    """sum(0.1, 0.1, 0.1) / 3 = 0.10000000000000002 in float64; identical scores must give exactly -0.1, stderr 0."""
    assert sum([0.1] * 3) / 3 != 0.1
    est = C.ilc_monte_carlo(lambda t: t, lambda rng: rng.normal(size=2), lambda t: 0.1, 3, 0)
    assert est.value == -0.1 and est.stderr == 0.0


def test_ilc_with_an_infinite_score_is_minus_infinity():
    scores = iter([1.0, math.inf, 2.0])
    est = C.ilc_monte_carlo(lambda t: t, lambda rng: np.zeros(1), lambda t: next(scores), 3, 0)
    assert est.value == -math.inf and est.stderr == math.inf
    np.testing.assert_array_equal(est.scores, [1.0, math.inf, 2.0])
    one = C.ilc_monte_carlo(lambda t: t, lambda rng: np.zeros(1), lambda t: 0.5, 1, 0)
    assert one.value == -0.5 and one.stderr == math.inf


# ----------------------------------------------------------------------------------------------------------------
# Q9 Proposition 1  [paper §2.3, App. A.3]
# ----------------------------------------------------------------------------------------------------------------

KS = (1, 2, 3, 5, 10, 30, 100, 300)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("start", ["zero", "random"])
def test_q9_prop1_and_masked_gd_on_patchwork_regression(tau, start):
    """Q9: min_{i<k} ||m ⊙ grad L||^2 <= 2 (L0 - inf L)/(eta k), eta = 1/Lip, Lip = lambda_max(X^T X)/K, inf L
    = 0 (4 consistent equations, 5 unknowns). Also the descent lemma step by step, and the recorded directions."""
    X, y = patchwork_regression()
    lip = np.linalg.eigvalsh(X.T @ X / 4).max()
    eta = 1.0 / lip
    theta0 = np.zeros(5) if start == "zero" else np.random.default_rng(7).normal(size=5)
    pooled = lambda th: float(np.mean(patchwork_env_losses(th, X, y)))
    traj = C.gradient_descent(lambda th: patchwork_env_gradients(th, X, y), theta0, eta, 300,
                              rule="and_mask", tau=tau, tol=0.0, return_trajectory=True)
    sq = np.sum(traj.directions**2, axis=1)
    for i in range(traj.n_steps):
        G = patchwork_env_gradients(traj.thetas[i], X, y)
        np.testing.assert_array_equal(traj.directions[i], and_masked_mean(G, tau))
        assert pooled(traj.thetas[i + 1]) <= pooled(traj.thetas[i]) - eta / 2 * sq[i] + 1e-12
    L0 = pooled(theta0)
    for k in KS:
        if k <= traj.n_steps:
            check = C.prop1_check(sq, L0, 0.0, eta, k)
            assert check.holds
            assert check.lhs == sq[:k].min() and check.rhs == pytest.approx(2 * L0 / (eta * k))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_q9_prop1_on_quadratics_with_different_minimizers(seed):
    """Random PSD quadratics with different minimizers (K = 3, P = 4): inf L = L(pooled minimizer)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(3, 4, 4))
    H = np.einsum("eij,ekj->eik", A, A)
    mu = rng.normal(size=(3, 4))
    losses = quadratic_losses(H, mu)
    Hbar = H.mean(0)
    star = np.linalg.solve(Hbar, np.einsum("eij,ej->i", H, mu) / 3)
    L_inf = float(losses(star).mean())
    eta = 1.0 / np.linalg.eigvalsh(Hbar).max()
    theta0 = 3 * rng.normal(size=4)
    for tau in (0.0, 1 / 3, 2 / 3, 1.0):
        traj = C.gradient_descent(quadratic_gradients(H, mu), theta0, eta, 300, rule="and_mask", tau=tau,
                                  tol=0.0, return_trajectory=True)
        sq = np.sum(traj.directions**2, axis=1)
        for k in KS:
            if k <= traj.n_steps:
                assert C.prop1_check(sq, float(losses(theta0).mean()), L_inf, eta, k).holds


def test_prop1_check_reports_a_violation():
    check = C.prop1_check(np.array([5.0, 4.0]), 1.0, 0.0, 1.0, 2)
    assert check.lhs == 4.0 and check.rhs == 1.0 and not check.holds


# ----------------------------------------------------------------------------------------------------------------
# Q10-Q12 Proposition 2, eq. (4), Fig. 4  [paper §2.3, App. A.4]
# ----------------------------------------------------------------------------------------------------------------


def _all_sign_patterns(K):
    return np.array(list(itertools.product([-1.0, 1.0], repeat=K))).T  # [K, 2^K]


@pytest.mark.parametrize("K", range(1, 11))
def test_q11_keep_probabilities_by_enumerating_sign_patterns(K):
    """Keep probabilities = fraction of the 2^K equally likely sign patterns that rules' masks keep."""
    G = _all_sign_patterns(K)
    for t in range(K + 1):
        brute = and_mask_count(G, t).mean()
        assert C.keep_probability_count(K, t) == pytest.approx(brute, rel=1e-12)
        if 2 * t > K:
            assert C.keep_probability_eq4_printed(K, t) == pytest.approx(brute, rel=1e-12)
    for tau in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.6, 2 * 0.8 - 1, 0.75, 0.9, 1.0):
        assert C.keep_probability_threshold(K, tau) == pytest.approx(and_mask(G, tau).mean(), rel=1e-12)


@pytest.mark.parametrize("K", [2, 4, 6, 10])
def test_q11_printed_eq4_double_counts_at_t_equal_half_K(K):
    """At t = K/2 every pattern is kept, but eq. (4) adds P[p = K/2] = C(K, K/2) / 2^K twice."""
    t = K // 2
    assert C.keep_probability_count(K, t) == 1.0
    excess = Fraction(math.comb(K, t), 2**K)
    assert C.keep_probability_eq4_printed(K, t) == pytest.approx(float(1 + excess), rel=1e-12)


@pytest.mark.parametrize("K", [7, 16])
def test_keep_rate_of_rules_and_mask_on_gaussian_gradients(K):
    rng = np.random.default_rng(K)
    G = rng.normal(size=(K, 200_000))
    for tau in (0.25, 0.6, 1.0):
        p = C.keep_probability_threshold(K, tau)
        rate = and_mask(G, tau).mean()
        assert abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / G.shape[1]) + 1e-12


def test_q10_unmasked_norm_is_p_sigma2_over_k_by_monte_carlo():
    """E||gbar||^2 = P sigma^2 / K; each sample's ||gbar||^2 is (sigma^2/K) chi^2_P (variance 2P sigma^4/K^2)."""
    P, K, sigma, n = 3000, 10, 1.5, 300
    rng = np.random.default_rng(11)
    norms = np.array([np.sum(rng.normal(0, sigma, size=(K, P)).mean(0) ** 2) for _ in range(n)])
    expected = C.expected_sq_norm_mean(P, K, sigma)
    assert expected == P * sigma**2 / K
    bound = 4.5 * math.sqrt(2 * P) * sigma**2 / K / math.sqrt(n)
    assert abs(norms.mean() - expected) <= bound


@pytest.mark.parametrize("K, printed, half_unit", [(10, 99.96, 0.005), (20, 9.54, 0.005), (40, 0.137, 0.0005)])
def test_q10_exact_masked_expectation_matches_the_table(K, printed, half_unit):
    """P = 3000, sigma = 1, t = 0.8 K (tau = 0.6): the independently computed exact values, to their digits."""
    value = C.expected_sq_norm_masked(3000, K, 1.0, 0.6)
    assert abs(value - printed) <= half_unit
    assert C.expected_sq_norm_masked(3000, K, 1.0, 2 * 0.8 - 1) == value  # float-noise tau gives the same


@pytest.mark.parametrize("K, n", [(10, 300), (20, 600)])
def test_q10_exact_masked_expectation_by_monte_carlo(K, n):
    """MC with rules.and_masked_mean on N(0, 1) gradients, P = 3000, tau = 0.6: within 4.5 standard errors."""
    P = 3000
    rng = np.random.default_rng(K)
    norms = np.array([np.sum(and_masked_mean(rng.normal(size=(K, P)), 0.6) ** 2) for _ in range(n)])
    exact = C.expected_sq_norm_masked(P, K, 1.0, 0.6)
    assert abs(norms.mean() - exact) <= 4.5 * norms.std(ddof=1) / math.sqrt(n)


def test_q10_masked_expectation_at_tau_zero_is_the_mean_and_closed_form_by_hand():
    assert C.expected_sq_norm_masked(50, 7, 2.0, 0.0) == pytest.approx(50 * 4.0 / 7, rel=1e-12)
    # K = 10, tau = 1 (t = K): only p in {0, 10}, each 2^-10, E[gbar^2 | p] = (1 - 2/pi)/10 + 2/pi
    by_hand = 3000 * 2 / 1024 * ((1 - 2 / math.pi) / 10 + 2 / math.pi)
    assert C.expected_sq_norm_masked(3000, 10, 1.0, 1.0) == pytest.approx(by_hand, rel=1e-12)


def test_q10_printed_bound_is_zero_at_t_equal_k_but_the_truth_is_positive():
    """Erratum demo (K = 10, P = 3000): printed bound (K - t) ... = 0 at t = K, exact 3.94."""
    assert C.prop2_bound_printed(3000, 10, 1.0, 10) == 0.0
    exact = C.expected_sq_norm_masked(3000, 10, 1.0, 1.0)
    assert round(exact, 2) == 3.94
    assert C.prop2_bound_corrected(3000, 10, 1.0, 10) >= exact
    # the printed bound evaluated independently: 527 (K = 10), 111 (K = 20), 3.36 (K = 40), 5.07e-5 (K = 100)
    for K, printed in [(10, 527), (20, 111), (40, 3.36), (100, 5.07e-5)]:
        assert float(f"{C.prop2_bound_printed(3000, K, 1.0, int(0.8 * K)):.3g}") == printed


def test_q10_corrected_bound_holds_and_printed_one_fails_somewhere():
    """Count form m_t = threshold form with tau = (2t - K)/K (no zeros); (K - t + 1) C(K,t) 2^{1-K} bounds it.
    The printed bound by hand: sigma^2 P (K - t) C(K, t) / 2^(K-1) with exact integers."""
    failures = 0
    for K in range(1, 31):
        for t in range((K + 1) // 2, K + 1):
            exact = C.expected_sq_norm_masked(100, K, 1.0, (2 * t - K) / K)
            assert C.prop2_bound_corrected(100, K, 1.0, t) >= exact * (1 - 1e-12)
            by_hand = float(Fraction(100 * (K - t) * math.comb(K, t), 2 ** (K - 1)))
            assert C.prop2_bound_printed(100, K, 1.0, t) == pytest.approx(by_hand, rel=1e-10)
            failures += C.prop2_bound_printed(100, K, 1.0, t) < exact
    assert failures >= 30  # at least every t = K


def test_q12_fig4_survival_probabilities_at_k100_t80():
    """Fig. 4 claim 'always zero for more than 100 examples': P(component survives) = 2^{-99} sum_{k>=80}
    C(100, k) ~ 1.12e-9 and P(any of 3000 survives) ~ 3.4e-6."""
    exact = Fraction(2 * sum(math.comb(100, k) for k in range(80, 101)), 2**100)
    p = C.keep_probability_count(100, 80)
    assert p == pytest.approx(float(exact), rel=1e-10)
    assert float(f"{p:.3g}") == 1.12e-9
    # 1 - (1 - p)^3000 = 3.35e-6; the quoted 3.4e-6 is 3000 x the rounded 1.12e-9 = 3.36e-6, rounded again
    any_of = -math.expm1(3000 * math.log1p(-p))
    assert any_of == pytest.approx(3.4e-6, rel=0.02)
    assert any_of == pytest.approx(3000 * float(exact), rel=2e-6)
    assert C.keep_probability_threshold(100, 0.6) == pytest.approx(p, rel=1e-12)
    assert C.expected_sq_norm_masked(3000, 100, 1.0, 0.6) == pytest.approx(7.96e-7, rel=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Q13 two-sigmoid toy  [App. A.1, Fig. 10]
# ----------------------------------------------------------------------------------------------------------------


def test_q13_segment_stays_in_band_and_lower_bound_for_theta2_minus_50():
    """L_A along theta6 in [-0.5, 1] (sampled here at 151 points) stays within eps = 1e-6 of L_A(theta*), and
    I^eps(theta*) >= |L_B(theta~*) - L_A(theta*)| ~ 1.0623 - 0.04609 = 1.0162 (App. A.1's inequality, corrected)."""
    eps = 1e-6
    bound = C.two_sigmoid_inconsistency_lower_bound(-50.0, eps)
    theta = two_sigmoid_theta_star(-50.0)
    L_A_star = two_sigmoid_env_losses(theta)[0]
    sampled = []
    for t6 in np.linspace(1.0, -0.5, 151):
        theta[5] = t6
        sampled.append(abs(two_sigmoid_env_losses(theta)[0] - L_A_star))
    assert max(sampled) <= eps
    assert max(sampled) <= bound.max_abs_delta_L_A + 1e-16  # the function's exact max is >= samples
    # s ~ sigmoid(100 x - 75) <= 1.4e-11 on A: L_A's vertex in theta6 is far away, the max is the endpoint -0.5
    assert abs(bound.theta6_vertex) > 1e6
    assert bound.max_abs_delta_L_A == abs(bound.L_A_tilde - bound.L_A_star) == sampled[-1]
    assert bound.max_abs_delta_L_A == pytest.approx(4.9e-13, rel=0.05)
    assert bound.lower_bound == pytest.approx(1.0623 - 0.04609, abs=2e-4)
    assert bound.L_A_star == pytest.approx(4.609e-2, rel=1e-3)
    assert bound.L_B_tilde == pytest.approx(1.0623, rel=1e-4)
    assert bound.lower_bound > 1e5 * eps  # "very inconsistent": the bound dwarfs eps


def test_q13_segment_check_finds_a_dip_inside_the_segment(monkeypatch):
    """The band check must cover L_A dipping *below* L_A(theta*) between the endpoints (the vertex of the
    quadratic in theta6), not only the endpoints. A stand-in model f = theta6 with target 1/4 on A has
    L_A(theta6) = (theta6 - 1/4)^2: equal at theta6 = 1 and -0.5 (0.5625), but 0 at 1/4."""
    monkeypatch.setattr(C, "two_sigmoid_model", lambda theta, x: np.full(np.shape(x), theta[5]))
    monkeypatch.setattr(C, "two_sigmoid_target", lambda x: np.full(np.shape(x), 0.25))
    monkeypatch.setattr(C, "two_sigmoid_env_losses", lambda theta, n_grid=10: ((theta[5] - 0.25) ** 2, 0.0))
    with pytest.raises(ValueError, match="0.562"):
        C.two_sigmoid_inconsistency_lower_bound(-50.0, 0.1, n_grid=10)
    assert C.two_sigmoid_inconsistency_lower_bound(-50.0, 0.6, n_grid=10).theta6_vertex == pytest.approx(0.25)


def test_q13_theta2_minus_45_and_too_small_eps():
    bound = C.two_sigmoid_inconsistency_lower_bound(-45.0, 1e-6)
    assert bound.lower_bound == pytest.approx(1.0584 - 3.192e-3, abs=2e-4)
    with pytest.raises(ValueError, match="eps"):
        C.two_sigmoid_inconsistency_lower_bound(-50.0, 1e-14)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

_Q = quadratic_losses(np.array([np.eye(2), 2 * np.eye(2)]))
_GRID2 = (axis(1.0, 21), axis(1.0, 21))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"eps": math.nan}, ValueError, "eps"),
        ({"eps": "0.1"}, TypeError, "eps"),
        ({"grid": (axis(1, 5),) * 3, "theta_star": np.zeros(3)}, ValueError, "P <= 2"),
        ({"theta_star": np.zeros(3)}, ValueError, "theta_star"),
        ({"theta_star": np.array([np.nan, 0.0])}, ValueError, "theta_star"),
        ({"theta_star": np.array([2.0, 0.0])}, ValueError, "theta_star"),
        ({"grid": (axis(1, 21)[::-1], axis(1, 21))}, ValueError, "increasing"),
        ({"grid": (np.array([0.0, np.inf]), axis(1, 21))}, ValueError, "grid"),
        ({"grid": (np.arange(-2, 3), axis(1, 21))}, TypeError, "grid"),
        ({"env_losses": lambda th: np.zeros(th.shape[:-1] + (0,))}, ValueError, "K >= 1"),
        ({"env_losses": lambda th: np.full(th.shape[:-1] + (2,), np.nan)}, ValueError, "env_losses"),
        ({"env_losses": lambda th: np.zeros(th.shape)[..., 0]}, ValueError, "env_losses"),
        ({"connectivity": 6}, ValueError, "connectivity"),
        ({"connectivity": True}, TypeError, "connectivity"),
    ],
)
def test_grid_bad_input(kwargs, error, match):
    args = {"env_losses": _Q, "theta_star": np.zeros(2), "eps": 0.1, "grid": _GRID2}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        C.inconsistency_on_grid(**args)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: C.keep_probability_count(0, 0), ValueError, "K"),
        (lambda: C.keep_probability_count(5, 6), ValueError, "t"),
        (lambda: C.keep_probability_count(5, -1), ValueError, "t"),
        (lambda: C.keep_probability_count(5, 2.0), TypeError, "t"),
        (lambda: C.keep_probability_eq4_printed(10, 4), ValueError, "t"),
        (lambda: C.keep_probability_threshold(0, 0.5), ValueError, "K"),
        (lambda: C.keep_probability_threshold(5, 1.5), ValueError, "tau"),
        (lambda: C.expected_sq_norm_mean(0, 5, 1.0), ValueError, "P"),
        (lambda: C.expected_sq_norm_mean(5, 0, 1.0), ValueError, "K"),
        (lambda: C.expected_sq_norm_masked(5, 5, 0.0, 0.5), ValueError, "sigma"),
        (lambda: C.expected_sq_norm_masked(5, 5, 1.0, math.inf), ValueError, "tau"),
        (lambda: C.prop2_bound_printed(5, 10, 1.0, 11), ValueError, "t"),
        (lambda: C.prop2_bound_corrected(5, 10, 1.0, 4), ValueError, "t"),
        (lambda: C.prop1_check(np.ones(3), 1.0, 0.0, 0.1, 4), ValueError, "k"),
        (lambda: C.prop1_check(np.ones(3), 0.0, 1.0, 0.1, 1), ValueError, "L_inf"),
        (lambda: C.prop1_check(-np.ones(3), 1.0, 0.0, 0.1, 1), ValueError, "masked_grad_sq_norms"),
        (lambda: C.prop1_check(np.ones(3), 1.0, 0.0, 0.0, 1), ValueError, "eta"),
        (lambda: C.ilc_monte_carlo(abs, abs, abs, 0, 0), ValueError, "n_samples"),
        (lambda: C.ilc_monte_carlo(abs, abs, abs, 2, "seed"), TypeError, "rng"),
        (lambda: C.ilc_monte_carlo(None, abs, abs, 2, 0), TypeError, "algorithm"),
        (lambda: C.ilc_monte_carlo(lambda t: t, lambda r: 0.0, lambda t: math.nan, 2, 0), ValueError, "NaN"),
        (lambda: C.ilc_monte_carlo(lambda t: t, lambda r: 0.0, lambda t: -1.0, 2, 0), ValueError, ">= 0"),
        (lambda: C.gradient_descent(lambda t: t[None], np.ones(2), 0.0, 5), ValueError, "eta"),
        (lambda: C.gradient_descent(lambda t: t[None], np.array([np.nan]), 0.1, 5), ValueError, "theta0"),
        (lambda: C.gradient_descent(lambda t: t[None], np.ones(2), 0.1, -1), ValueError, "n_steps"),
        (lambda: C.gradient_descent(lambda t: t[None], np.ones(2), 0.1, 5, rule="max"), ValueError, "rule"),
        (lambda: C.gradient_descent(lambda t: t[None], np.ones(2), 0.1, 5, tau=2.0), ValueError, "tau"),
        (lambda: C.gradient_descent(lambda t: t, np.ones(2), 0.1, 5), ValueError, "env_gradients"),
        (lambda: C.gradient_descent(lambda t: np.full((1, 1), 1e308), np.ones(1), 10.0, 5), ValueError, "diverged"),
        (lambda: C.inconsistency_1d_interval(_Q, 0.0, 0.1, 1.0, -1.0, 11), ValueError, "lo"),
        (lambda: C.inconsistency_1d_interval(_Q, 0.0, 0.1, -1.0, 1.0, 1), ValueError, "n"),
        (lambda: C.two_sigmoid_inconsistency_lower_bound(-50.0, 0.0), ValueError, "eps"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
