"""Tests of hardtovary.reference.trust_region: the trust-region subproblem and extremes over a level band.

Expected values come from independent routes, never from the code under test:

- 1-D problems solved by hand (endpoints and vertex of a parabola; interval arithmetic for the band);
- dense sampling: a fine parametrisation of the circle (P = 2), a polar grid of the disc, many random unit
  vectors (P = 3);
- scipy.optimize.minimize (SLSQP) from many random starts, with the constraints written here;
- the global optimality conditions of the TRS (Moré & Sorensen) checked on the returned point;
- for P = 2 bands, a fine grid over a bounding box with scipy.ndimage.label (8-connectivity) to extract the
  component containing theta_star, or (singular H_e) a 1-D grid over the range coordinate with the free
  coordinate minimised by hand.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage, optimize
from scipy.stats import special_ortho_group

from hardtovary.reference.trust_region import BandExtremes, band_extremes, quadratic_value, trs

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

FAST = settings(max_examples=60, deadline=None)
SLOW = settings(max_examples=20, deadline=None)


# ----------------------------------------------------------------------------------------------------------------
# Independent helpers
# ----------------------------------------------------------------------------------------------------------------


def q_of(A, g, x):
    """q(x) = 1/2 x^T A x + g^T x for a batch x[..., P], written out by einsum."""
    return 0.5 * np.einsum("...i,ij,...j->...", x, A, x) + x @ g


def L_of(H, mu, c, theta):
    d = np.asarray(theta, dtype=float) - mu
    return c + 0.5 * np.einsum("...i,ij,...j->...", d, H, d)


def rotation(P, seed):
    if P == 1:
        return np.ones((1, 1))
    return special_ortho_group.rvs(P, random_state=seed)


def symmetric(eigenvalues, seed):
    Q = rotation(len(eigenvalues), seed)
    A = Q @ np.diag(eigenvalues) @ Q.T
    return 0.5 * (A + A.T)


KINDS = {
    "definite": [0.5, 2.0, 3.5],
    "negative_definite": [-3.0, -1.0, -0.4],
    "indefinite": [-2.0, 0.7, 3.0],
    "singular_psd": [0.0, 1.0, 2.5],
    "singular_indefinite": [-1.5, 0.0, 2.0],
    "repeated_bottom": [-1.0, -1.0, 2.0],
    "zero": [0.0, 0.0, 0.0],
}


def matrix_of_kind(kind, P, seed):
    return symmetric(np.array(KINDS[kind][:P]) if P == 3 else np.array(KINDS[kind][:1] + KINDS[kind][2:3]), seed)


def problem_scale(A, g, radius):
    return np.linalg.norm(A, 2) * radius**2 + np.linalg.norm(g) * radius + 1e-300


def slsqp_trs(A, g, radius, boundary, maximize, starts):
    """Values of q at SLSQP's end points from the given starts that are feasible (to 1e-9 relative)."""
    s = -1.0 if maximize else 1.0
    constraint = {
        "type": "eq" if boundary else "ineq",
        "fun": lambda x: radius**2 - x @ x,
        "jac": lambda x: -2 * x,
    }
    values = []
    for x0 in starts:
        res = optimize.minimize(
            lambda x: s * q_of(A, g, x), x0, jac=lambda x: s * (A @ x + g), method="SLSQP",
            constraints=[constraint], options={"ftol": 1e-12, "maxiter": 500},
        )
        norm = np.linalg.norm(res.x)
        feasible = abs(norm - radius) <= 1e-9 * radius if boundary else norm <= radius * (1 + 1e-9)
        if feasible:  # a feasible point's value bounds the optimum whether or not SLSQP reports convergence
            values.append(float(q_of(A, g, res.x)))
    return np.array(values)


def check_trs_certificate(A, g, radius, boundary, maximize, value, x, rtol=1e-8):
    """Global optimality conditions of the TRS (Gay 1981, Moré & Sorensen 1983), checked on the returned x."""
    scale = problem_scale(A, g, radius)
    P = len(g)
    assert x.shape == (P,)
    assert value == pytest.approx(float(q_of(A, g, x)), abs=1e-12 * scale)
    norm = np.linalg.norm(x)
    assert norm <= radius * (1 + 1e-12) + 1e-300
    if boundary:
        assert norm == pytest.approx(radius, rel=1e-12, abs=1e-300)
    As, gs = (-A, -g) if maximize else (A, g)  # minimise As, gs
    a_scale = np.linalg.norm(A, 2) + np.linalg.norm(g) / max(radius, 1e-300)
    if norm == 0.0:
        # x = 0 optimal (ball, radius > 0): needs g = 0 and As PSD
        assert np.linalg.norm(g) <= rtol * scale
        assert np.linalg.eigvalsh(As).min() >= -rtol * a_scale
        return
    sigma = -(x @ As @ x + gs @ x) / (x @ x)
    residual = As @ x + sigma * x + gs
    assert np.linalg.norm(residual) <= rtol * a_scale * radius
    assert np.linalg.eigvalsh(As + sigma * np.eye(P)).min() >= -rtol * a_scale
    if not boundary:
        assert sigma >= -rtol * a_scale
        if norm < radius * (1 - 1e-9):
            assert abs(sigma) <= rtol * a_scale


# ----------------------------------------------------------------------------------------------------------------
# trs: hand-solved 1-D cases
# ----------------------------------------------------------------------------------------------------------------


reals = st.floats(-5, 5, allow_nan=False)


@FAST
@given(a=reals, b=reals, r=st.floats(0, 3), boundary=st.booleans(), maximize=st.booleans())
def test_trs_1d_against_endpoints_and_vertex(a, b, r, boundary, maximize):
    candidates = [-r, r]
    if not boundary and a != 0 and abs(b / a) <= r:
        candidates.append(-b / a)
    values = [0.5 * a * t * t + b * t for t in candidates]
    expected = max(values) if maximize else min(values)
    value, x = trs(np.array([[a]]), np.array([b]), r, boundary=boundary, maximize=maximize)
    scale = abs(a) * r * r + abs(b) * r
    assert value == pytest.approx(expected, abs=1e-12 * scale + 1e-300)
    assert abs(x[0]) <= r * (1 + 1e-15)
    assert value == pytest.approx(0.5 * a * x[0] ** 2 + b * x[0], abs=1e-13 * scale + 1e-300)


def test_trs_documented_examples():
    value, x = trs(np.array([[2.0]]), np.array([-1.0]), 1.0)
    assert value == pytest.approx(-0.25) and x == pytest.approx([0.5])
    value, x = trs(np.array([[2.0]]), np.array([-1.0]), 1.0, maximize=True)
    assert value == pytest.approx(2.0) and x == pytest.approx([-1.0])


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("boundary", [False, True])
def test_trs_radius_zero(kind, boundary):
    A = matrix_of_kind(kind, 3, 0)
    value, x = trs(A, np.array([1.0, -2.0, 0.5]), 0.0, boundary=boundary)
    assert value == 0.0
    np.testing.assert_array_equal(x, np.zeros(3))


# ----------------------------------------------------------------------------------------------------------------
# trs: dense sampling (P = 2 circle and disc, P = 3 sphere) and SLSQP from many starts
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("boundary", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_trs_p2_against_fine_circle_and_disc(kind, boundary, maximize, seed):
    rng = np.random.default_rng(seed)
    A = matrix_of_kind(kind, 2, seed)
    g = rng.normal(size=2) * rng.choice([0.05, 1.0, 5.0])
    radius = float(rng.uniform(0.3, 2.0))
    value, x = trs(A, g, radius, boundary=boundary, maximize=maximize)

    n_angle = 100_000
    t = np.linspace(0.0, 2 * np.pi, n_angle, endpoint=False)
    circle = radius * np.stack([np.cos(t), np.sin(t)], axis=-1)
    if boundary:
        points = circle
        spacing = 0.0
    else:
        n_radius = 1001
        radii = np.linspace(0.0, radius, n_radius)
        ta = np.linspace(0.0, 2 * np.pi, 2048, endpoint=False)
        disc = (radii[:, None, None] * np.stack([np.cos(ta), np.sin(ta)], axis=-1)[None]).reshape(-1, 2)
        points = np.concatenate([circle, disc])
        spacing = radius / (n_radius - 1) + radius * 2 * np.pi / 2048  # max distance to a disc grid point (bound)
    sampled = q_of(A, g, points)
    best = sampled.max() if maximize else sampled.min()

    scale = problem_scale(A, g, radius)
    norm_a = np.linalg.norm(A, 2)
    # Optimum on the circle: q'(t) = 0 there and |q''(t)| <= 2 r^2 ||A|| + r ||g||, nearest sample within dt/2.
    dt = 2 * np.pi / n_angle
    circle_error = 0.5 * (2 * radius**2 * norm_a + radius * np.linalg.norm(g)) * (dt / 2) ** 2
    # Optimum inside: gradient 0 there, nearest disc grid point within `spacing`.
    interior_error = 0.5 * norm_a * spacing**2
    slack = 2 * (circle_error + interior_error) + 1e-12 * scale
    if maximize:
        assert value >= best - 1e-12 * scale  # no sample beats the oracle
        assert value <= best + slack
    else:
        assert value <= best + 1e-12 * scale
        assert value >= best - slack
    check_trs_certificate(A, g, radius, boundary, maximize, value, x)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("boundary", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_trs_p3_against_sphere_samples_and_slsqp(kind, boundary, maximize):
    rng = np.random.default_rng(zlib.crc32(f"{kind}-{boundary}-{maximize}".encode()))
    A = matrix_of_kind(kind, 3, int(rng.integers(1000)))
    g = rng.normal(size=3) * rng.choice([0.1, 1.0, 4.0])
    radius = float(rng.uniform(0.5, 2.0))
    value, x = trs(A, g, radius, boundary=boundary, maximize=maximize)
    scale = problem_scale(A, g, radius)

    directions = rng.normal(size=(100_000, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    points = radius * directions
    if not boundary:
        points = np.concatenate([points, points * rng.uniform(0, 1, size=(100_000, 1)) ** (1 / 3)])
    sampled = q_of(A, g, points)
    starts = points[rng.choice(len(points), 20, replace=False)]
    local = slsqp_trs(A, g, radius, boundary, maximize, starts)
    assert len(local) >= 10
    if maximize:
        assert value >= sampled.max() - 1e-12 * scale
        assert value >= local.max() - 1e-9 * scale
        assert value <= local.max() + 1e-7 * scale
    else:
        assert value <= sampled.min() + 1e-12 * scale
        assert value <= local.min() + 1e-9 * scale
        assert value >= local.min() - 1e-7 * scale
    check_trs_certificate(A, g, radius, boundary, maximize, value, x)


# ----------------------------------------------------------------------------------------------------------------
# trs: the hard case, built on purpose
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("boundary", [False, True])
@pytest.mark.parametrize("repeated", [False, True])
def test_trs_hard_case_hand_solved(seed, boundary, repeated):
    """g orthogonal to the bottom eigenspace and the radius large: sigma = -lam_1 and x leaves along v_1.

    In the eigenbasis: x_i = -gt_i / (lam_i - lam_1) for i off the bottom eigenspace, and the rest of the norm
    goes along it; q = sum_i (1/2 lam_i x_i^2 + gt_i x_i) (worked out here, not by the code under test).
    """
    rng = np.random.default_rng(seed)
    lam = np.array([-1.0, -1.0, 2.0]) if repeated else np.array([-1.0, 0.5, 2.0])
    Q = rotation(3, seed + 10)
    A = Q @ np.diag(lam) @ Q.T
    A = 0.5 * (A + A.T)
    gt = np.array([0.0, 0.0, 1.5]) if repeated else np.array([0.0, 0.6, -1.5])
    g = Q @ gt
    off = lam > lam[0]
    x_off = -gt[off] / (lam[off] - lam[0])
    radius = 1.5 * float(np.linalg.norm(x_off)) + 0.2 * seed
    along = radius**2 - x_off @ x_off
    assert along > 0  # the hard case proper
    expected = 0.5 * lam[0] * along + float(np.sum(0.5 * lam[off] * x_off**2 + gt[off] * x_off))

    value, x = trs(A, g, radius, boundary=boundary)
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert np.linalg.norm(x) == pytest.approx(radius, rel=1e-12)
    xt = Q.T @ x
    np.testing.assert_allclose(xt[off], x_off, rtol=1e-9, atol=1e-12)
    check_trs_certificate(A, g, radius, boundary, False, value, x)

    # The same problem mirrored, as a maximisation: top eigenvector orthogonal to g.
    value_max, x_max = trs(-A, -g, radius, boundary=boundary, maximize=True)
    assert value_max == pytest.approx(-expected, rel=1e-12, abs=1e-12)
    check_trs_certificate(-A, -g, radius, boundary, True, value_max, x_max)

    # Sampling agrees (no random point on the sphere is better).
    d = rng.normal(size=(50_000, 3))
    d = radius * d / np.linalg.norm(d, axis=1, keepdims=True)
    assert value <= q_of(A, g, d).min() + 1e-12


@pytest.mark.parametrize("tilt", [1e-14, 1e-11, 1e-8, 1e-5, 1e-2])
@pytest.mark.parametrize("boundary", [False, True])
def test_trs_near_hard_case(tilt, boundary):
    """A tiny component of g along the bottom eigenvector: the value is continuous in it (|dq| <= |dg| r)."""
    Q = rotation(3, 5)
    lam = np.array([-1.0, 0.5, 2.0])
    A = 0.5 * (Q @ np.diag(lam) @ Q.T + (Q @ np.diag(lam) @ Q.T).T)
    radius = 2.0
    g_hard = Q @ np.array([0.0, 0.6, -1.5])
    g = Q @ np.array([tilt, 0.6, -1.5])
    value_hard, _ = trs(A, g_hard, radius, boundary=boundary)
    value, x = trs(A, g, radius, boundary=boundary)
    assert abs(value - value_hard) <= tilt * radius * (1 + 1e-6) + 1e-13
    assert value <= value_hard + 1e-13  # tilting lets the sign along v_1 help
    check_trs_certificate(A, g, radius, boundary, False, value, x)
    starts = np.random.default_rng(0).normal(size=(15, 3))
    local = slsqp_trs(A, g, radius, boundary, False, starts)
    assert value <= local.min() + 1e-9
    assert value >= local.min() - 1e-7


# ----------------------------------------------------------------------------------------------------------------
# trs: optimality certificate on hypothesis-drawn problems of any inertia
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def trs_problems(draw):
    P = draw(st.integers(1, 5))
    eigenvalues = draw(
        st.lists(st.one_of(st.just(0.0), st.floats(-4, 4, allow_nan=False)), min_size=P, max_size=P)
    )
    if draw(st.booleans()) and P >= 2:  # a repeated eigenvalue
        eigenvalues[1] = eigenvalues[0]
    seed = draw(st.integers(0, 2**31))
    A = symmetric(np.array(eigenvalues), seed)
    g = np.array(draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=P, max_size=P)))
    if draw(st.booleans()):  # make the hard case likely: remove g's component on the bottom eigenvector
        lam, Q = np.linalg.eigh(A)
        g = g - Q[:, 0] * (Q[:, 0] @ g)
    radius = draw(st.floats(0.01, 5))
    return A, g, radius, draw(st.booleans()), draw(st.booleans())


@FAST
@given(trs_problems())
def test_trs_global_optimality_certificate(problem):
    A, g, radius, boundary, maximize = problem
    value, x = trs(A, g, radius, boundary=boundary, maximize=maximize)
    check_trs_certificate(A, g, radius, boundary, maximize, value, x, rtol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# band_extremes, P = 1: exact interval arithmetic
# ----------------------------------------------------------------------------------------------------------------


def component_interval_1d(h, m, c, low, high, t_star):
    """The interval of {t : low <= c + h/2 (t - m)^2 <= high} that contains t_star (h >= 0)."""
    if h == 0.0:
        return -math.inf, math.inf
    outer = math.sqrt(2 * (high - c) / h)
    if low <= c:
        return m - outer, m + outer
    inner = math.sqrt(2 * (low - c) / h)
    return (m + inner, m + outer) if t_star >= m else (m - outer, m - inner)


def extremes_on_interval_1d(k, m, c, lo, hi):
    """min and max of c + k/2 (t - m)^2 (k >= 0) over [lo, hi] (possibly infinite)."""
    f = lambda t: c + 0.5 * k * (t - m) ** 2
    t_min = min(max(m, lo), hi)
    if math.isinf(lo) or math.isinf(hi):
        return f(t_min) if k > 0 else c, (math.inf if k > 0 else c)
    return f(t_min), max(f(lo), f(hi))


curvatures = st.one_of(st.just(0.0), st.floats(0.1, 5.0))
centres = st.floats(-3, 3, allow_nan=False)


@FAST
@given(
    h=curvatures, m=centres, c=centres, t_star=centres, below=st.floats(0, 3), above=st.floats(0, 3),
    k=curvatures, mf=centres, cf=centres,
)
def test_band_extremes_1d_interval_arithmetic(h, m, c, t_star, below, above, k, mf, cf):
    L_star = c + 0.5 * h * (t_star - m) ** 2
    low, high = L_star - below, L_star + above
    lo, hi = component_interval_1d(h, m, c, low, high, t_star)
    assert lo - 1e-9 <= t_star <= hi + 1e-9  # (rounding when below = above = 0)
    expected_min, expected_max = extremes_on_interval_1d(k, mf, cf, lo, hi)

    result = band_extremes(
        np.array([[h]]), np.array([m]), c, low, high, np.array([[k]]), np.array([mf]), cf, np.array([t_star])
    )
    assert isinstance(result, BandExtremes)
    scale = 1 + abs(cf) + k * (abs(mf) + abs(m) + abs(t_star) + 10) ** 2
    assert result.min_value == pytest.approx(expected_min, abs=1e-10 * scale)
    assert lo - 1e-9 * (1 + abs(lo)) <= result.argmin[0] <= hi + 1e-9 * (1 + abs(hi))
    if math.isinf(expected_max):
        assert result.max_value == math.inf and result.argmax is None
    else:
        assert result.max_value == pytest.approx(expected_max, abs=1e-10 * scale)
        assert lo - 1e-9 * (1 + abs(lo)) <= result.argmax[0] <= hi + 1e-9 * (1 + abs(hi))


def test_band_extremes_1d_two_intervals_hand_solved():
    # L_e = t^2/2: band [2, 4.5] is |t| in [2, 3]; theta_star = -2.5 keeps [-3, -2]. L_f = (t - 1)^2 / 2.
    result = band_extremes(
        np.array([[1.0]]), np.array([0.0]), 0.0, 2.0, 4.5, np.array([[1.0]]), np.array([1.0]), 0.0, np.array([-2.5])
    )
    assert result.min_value == pytest.approx(4.5) and result.argmin == pytest.approx([-2.0])
    assert result.max_value == pytest.approx(8.0) and result.argmax == pytest.approx([-3.0])
    # On the other side, the minimiser of L_f (t = 1) is not in [2, 3] either: min at t = 2.
    result = band_extremes(
        np.array([[1.0]]), np.array([0.0]), 0.0, 2.0, 4.5, np.array([[1.0]]), np.array([1.0]), 0.0, np.array([2.5])
    )
    assert result.min_value == pytest.approx(0.5) and result.max_value == pytest.approx(2.0)


# ----------------------------------------------------------------------------------------------------------------
# band_extremes, P = 2: grid + connected components
# ----------------------------------------------------------------------------------------------------------------


def grid_component_extremes(H_e, mu_e, c_e, low, high, H_f, mu_f, c_f, theta_star, box, n):
    """min/max of L_f over the 8-connected grid component of the band that holds theta_star's grid point."""
    (x0, x1), (y0, y1) = box
    xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    points = np.stack([X, Y], axis=-1)
    Le = L_of(H_e, mu_e, c_e, points)
    mask = (Le >= low) & (Le <= high)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    i = int(round((theta_star[0] - x0) / (x1 - x0) * (n - 1)))
    j = int(round((theta_star[1] - y0) / (y1 - y0) * (n - 1)))
    assert labels[i, j] > 0, "theta_star's grid point must lie in the band"
    component = labels == labels[i, j]
    Lf = L_of(H_f, mu_f, c_f, points[component])
    spacing = max((x1 - x0), (y1 - y0)) / (n - 1)
    return Lf.min(), Lf.max(), spacing, points


@st.composite
def band_problems_2d(draw, rank):
    """P = 2 band problems with theta_star well inside the band (margins >> grid spacing)."""
    angle = draw(st.floats(0, math.pi))
    R = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    if rank == 2:
        lam_e = np.array([draw(st.floats(0.4, 3.0)), draw(st.floats(0.4, 3.0))])
    else:
        lam_e = np.array([draw(st.floats(0.4, 3.0)), 0.0])
    H_e = R @ np.diag(lam_e) @ R.T
    H_e = 0.5 * (H_e + H_e.T)
    mu_e = np.array([draw(st.floats(-1, 1)), draw(st.floats(-1, 1))])
    c_e = draw(st.floats(-1, 1))
    level = draw(st.floats(0.0, 2.0))  # L_e(theta_star) - c_e
    phi = draw(st.floats(0, 2 * math.pi))
    # theta_star on the level set 1/2 d^T H_e d = level, moved along the null direction when rank 1
    u = np.array([math.cos(phi), math.sin(phi)])
    if rank == 2:
        d = u * math.sqrt(2 * level / (u @ H_e @ u))
    else:
        sign = 1.0 if math.cos(phi) >= 0 else -1.0
        d = R[:, 0] * sign * math.sqrt(2 * level / lam_e[0]) + R[:, 1] * draw(st.floats(-1, 1))
    theta_star = mu_e + d
    below = draw(st.floats(0.3, 2.0))
    above = draw(st.floats(0.3, 1.5))
    L_star = c_e + level
    low, high = L_star - below, L_star + above
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    if rank == 2 or draw(st.booleans()):
        Qf = rotation(2, seed)
        lam_f = np.array([draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])), draw(st.floats(0.1, 3.0))])
        H_f = Qf @ np.diag(lam_f) @ Qf.T
    else:  # L_f constant along null(H_e): bounded above on the strip
        H_f = draw(st.floats(0.0, 3.0)) * np.outer(R[:, 0], R[:, 0])
    H_f = 0.5 * (H_f + H_f.T)
    mu_f = rng.uniform(-2, 2, size=2)
    c_f = float(rng.uniform(-1, 1))
    return H_e, mu_e, c_e, low, high, H_f, mu_f, c_f, theta_star


def assert_in_component(H_e, mu_e, c_e, low, high, theta_star, theta, tol):
    value = L_of(H_e, mu_e, c_e, theta)
    assert low - tol <= value <= high + tol
    lam, U = np.linalg.eigh(H_e)
    if lam[-1] > 0 and np.sum(lam > 1e-9 * lam[-1]) == 1 and low > c_e:  # two slabs: the same side
        u = U[:, -1]
        assert (u @ (theta - mu_e)) * (u @ (theta_star - mu_e)) > 0


@pytest.mark.slow
@SLOW
@given(band_problems_2d(rank=2))
def test_band_extremes_2d_pd_against_grid(problem):
    H_e, mu_e, c_e, low, high, H_f, mu_f, c_f, theta_star = problem
    lam_min = np.linalg.eigvalsh(H_e)[0]
    half = math.sqrt(2 * (high - c_e) / lam_min) * 1.02
    box = ((mu_e[0] - half, mu_e[0] + half), (mu_e[1] - half, mu_e[1] + half))
    n = 701
    spacing = 2 * half / (n - 1)
    # The shell must be many cells thick for the grid component to be the true (connected) one.
    lam_max = np.linalg.eigvalsh(H_e)[1]
    thickness = (math.sqrt(2 * (high - c_e)) - math.sqrt(max(0.0, 2 * (low - c_e)))) / math.sqrt(lam_max)
    assume(thickness > 6 * spacing)
    grid_min, grid_max, spacing, _ = grid_component_extremes(*problem, box, n)

    result = band_extremes(*problem)
    scale = 1 + abs(c_f) + np.linalg.norm(H_f, 2) * (2 * half + np.linalg.norm(mu_e - mu_f)) ** 2
    lipschitz = np.linalg.norm(H_f, 2) * (2 * half * math.sqrt(2) + np.linalg.norm(mu_e - mu_f))
    tol = 3 * lipschitz * spacing + 1e-12 * scale
    assert result.min_value <= grid_min + 1e-10 * scale  # no grid point of the component beats the oracle
    assert result.min_value >= grid_min - tol
    assert result.max_value >= grid_max - 1e-10 * scale
    assert result.max_value <= grid_max + tol
    for theta, value in ((result.argmin, result.min_value), (result.argmax, result.max_value)):
        assert_in_component(H_e, mu_e, c_e, low, high, theta_star, theta, 1e-9 * (1 + abs(high)))
        assert value == pytest.approx(float(L_of(H_f, mu_f, c_f, theta)), abs=1e-12 * scale)


@SLOW
@given(band_problems_2d(rank=1))
def test_band_extremes_2d_rank1_strip(problem):
    """Singular H_e in P = 2: a strip (sublevel) or two strips (shell). Two independent routes:

    - max: +inf iff H_f curves along null(H_e), else a grid over a box (any extent along the null direction, as
      L_f is constant along it) labelled with 8-connectivity picks theta_star's strip;
    - min: a fine 1-D grid over the range coordinate s (interval arithmetic) with the null coordinate t minimised
      by hand: L_f(s, t) = a t^2/2 + b(s) t + const(s) is a 1-D parabola in t.
    """
    H_e, mu_e, c_e, low, high, H_f, mu_f, c_f, theta_star = problem
    lam, U = np.linalg.eigh(H_e)
    u, n_dir, h = U[:, 1], U[:, 0], lam[1]
    s_star = u @ (theta_star - mu_e)
    lo, hi = component_interval_1d(h, 0.0, c_e, low, high, s_star)
    result = band_extremes(*problem)
    scale = 1 + abs(c_f) + np.linalg.norm(H_f, 2) * (hi - lo + np.linalg.norm(mu_e - mu_f) + 5) ** 2

    # min over the strip, s in [lo, hi], t free
    s = np.linspace(lo, hi, 20_001)
    a = n_dir @ H_f @ n_dir
    w0 = (mu_e - mu_f)[None, :] + s[:, None] * u[None, :]  # theta - mu_f at t = 0
    b = w0 @ H_f @ n_dir
    at_t0 = c_f + 0.5 * np.einsum("ki,ij,kj->k", w0, H_f, w0)
    reduced = at_t0 - 0.5 * b**2 / a if a > 1e-12 else at_t0
    ds = (hi - lo) / 20_000
    assert result.min_value <= reduced.min() + 1e-10 * scale
    assert result.min_value >= reduced.min() - np.linalg.norm(H_f, 2) * ds * (hi - lo + 10) - 1e-10 * scale
    assert_in_component(H_e, mu_e, c_e, low, high, theta_star, result.argmin, 1e-9 * (1 + abs(high)))
    assert result.min_value == pytest.approx(float(L_of(H_f, mu_f, c_f, result.argmin)), abs=1e-12 * scale)

    if np.linalg.norm(H_f @ n_dir) > 1e-9 * (1 + np.linalg.norm(H_f)):
        assert result.max_value == math.inf and result.argmax is None
        # and indeed L_f grows without bound inside the component
        far = result.argmin + 1e4 * n_dir
        assert L_of(H_e, mu_e, c_e, far) == pytest.approx(L_of(H_e, mu_e, c_e, result.argmin), abs=1e-6)
        assert L_of(H_f, mu_f, c_f, far) > result.min_value + 0.25 * a * 1e8
        return
    half = max(abs(lo), abs(hi)) * 1.05 + 1.0
    box = ((mu_e[0] - half, mu_e[0] + half), (mu_e[1] - half, mu_e[1] + half))
    thickness = hi - lo
    n = 701
    assume(thickness > 6 * 2 * half / (n - 1))
    _, grid_max, spacing, _ = grid_component_extremes(*problem, box, n)
    lipschitz = np.linalg.norm(H_f, 2) * (2 * half * math.sqrt(2) + np.linalg.norm(mu_e - mu_f))
    assert result.max_value >= grid_max - 1e-10 * scale
    assert result.max_value <= grid_max + 3 * lipschitz * spacing + 1e-12 * scale
    assert_in_component(H_e, mu_e, c_e, low, high, theta_star, result.argmax, 1e-9 * (1 + abs(high)))


# ----------------------------------------------------------------------------------------------------------------
# band_extremes, P = 3: SLSQP from many starts
# ----------------------------------------------------------------------------------------------------------------


def slsqp_band(H_e, mu_e, c_e, low, high, H_f, mu_f, c_f, theta_star, side_vector, maximize, starts):
    """Feasible local optima of L_f on {low <= L_e <= high} (and side_vector . (theta - mu_e) >= 0 if given)."""
    s = -1.0 if maximize else 1.0
    constraints = [
        {"type": "ineq", "fun": lambda x: L_of(H_e, mu_e, c_e, x) - low, "jac": lambda x: H_e @ (x - mu_e)},
        {"type": "ineq", "fun": lambda x: high - L_of(H_e, mu_e, c_e, x), "jac": lambda x: -H_e @ (x - mu_e)},
    ]
    if side_vector is not None:
        constraints.append({"type": "ineq", "fun": lambda x: side_vector @ (x - mu_e), "jac": lambda x: side_vector})
    values = []
    for x0 in starts:
        res = optimize.minimize(
            lambda x: s * L_of(H_f, mu_f, c_f, x), x0, jac=lambda x: s * (H_f @ (x - mu_f)), method="SLSQP",
            constraints=constraints, options={"ftol": 1e-13, "maxiter": 500},
        )
        Le = L_of(H_e, mu_e, c_e, res.x)
        tol = 1e-8 * (1 + abs(low) + abs(high))
        ok = low - tol <= Le <= high + tol  # feasible points bound the optimum, converged or not
        if side_vector is not None:
            ok = ok and side_vector @ (res.x - mu_e) >= -1e-8
        if ok:
            values.append(float(L_of(H_f, mu_f, c_f, res.x)))
    return np.array(values)


@st.composite
def band_problems_3d(draw):
    rank = draw(st.sampled_from([3, 3, 2, 1]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    lam_e = np.zeros(3)
    lam_e[:rank] = [draw(st.floats(0.3, 3.0)) for _ in range(rank)]
    Ue = rotation(3, seed)
    H_e = Ue @ np.diag(lam_e) @ Ue.T
    H_e = 0.5 * (H_e + H_e.T)
    mu_e = rng.uniform(-1, 1, 3)
    c_e = draw(st.floats(-1, 1))
    level = draw(st.floats(0.0, 2.0))
    y = rng.normal(size=rank)
    y = y / np.linalg.norm(y) * math.sqrt(2 * level) if rank else y
    d = Ue[:, :rank] @ (y / np.sqrt(lam_e[:rank])) + Ue[:, rank:] @ rng.uniform(-1, 1, 3 - rank)
    theta_star = mu_e + d
    low = c_e + level - draw(st.floats(0.05, 2.0))
    high = c_e + level + draw(st.floats(0.05, 1.5))
    bounded = rank == 3 or draw(st.booleans())
    lam_f = np.array([draw(st.sampled_from([0.0, 0.3, 1.0])), draw(st.floats(0.1, 3.0)), draw(st.floats(0.1, 3.0))])
    Uf = rotation(3, seed + 1)
    if bounded and rank < 3:  # H_f supported on range(H_e)
        B = Ue[:, :rank] @ rotation(rank, seed + 2)
        H_f = B @ np.diag(lam_f[:rank]) @ B.T
    else:
        H_f = Uf @ np.diag(lam_f) @ Uf.T
    H_f = 0.5 * (H_f + H_f.T)
    mu_f = rng.uniform(-2, 2, 3)
    c_f = float(rng.uniform(-1, 1))
    return (H_e, mu_e, c_e, low, high, H_f, mu_f, c_f, theta_star), rank, Ue, seed


@pytest.mark.slow
@SLOW
@given(band_problems_3d())
def test_band_extremes_3d_against_slsqp_multistart(drawn):
    problem, rank, Ue, seed = drawn
    H_e, mu_e, c_e, low, high, H_f, mu_f, c_f, theta_star = problem
    result = band_extremes(*problem)
    side = None
    if rank == 1 and low > c_e:  # two slabs: keep theta_star's side
        u = Ue[:, 0]
        side = u if u @ (theta_star - mu_e) > 0 else -u
    rng = np.random.default_rng(seed + 7)
    # Starts near theta_star and spread over a box holding the band's cross-section (SLSQP finds local optima).
    lam_e = np.linalg.eigvalsh(H_e)
    reach = math.sqrt(2 * (high - c_e) / lam_e[lam_e > 1e-9].min()) + 1.0
    starts = np.concatenate([
        theta_star + rng.normal(size=(8, 3)) * rng.choice([0.3, 1.0], size=(8, 1)),
        mu_e + rng.uniform(-reach, reach, size=(16, 3)),
    ])
    scale = 1 + abs(c_f) + np.linalg.norm(H_f, 2) * (10 + np.linalg.norm(mu_e - mu_f)) ** 2

    local_min = slsqp_band(*problem, side, False, starts)
    assert len(local_min) >= 4
    assert result.min_value <= local_min.min() + 1e-8 * scale
    assert result.min_value >= local_min.min() - 1e-6 * scale
    assert_in_component(H_e, mu_e, c_e, low, high, theta_star, result.argmin, 1e-9 * (1 + abs(high)))
    assert result.min_value == pytest.approx(float(L_of(H_f, mu_f, c_f, result.argmin)), abs=1e-12 * scale)

    null_curvature = np.linalg.norm(H_f @ Ue[:, rank:]) if rank < 3 else 0.0
    if null_curvature > 1e-9:
        assert result.max_value == math.inf and result.argmax is None
        return
    local_max = slsqp_band(*problem, side, True, starts)
    assert len(local_max) >= 4
    assert result.max_value >= local_max.max() - 1e-8 * scale
    assert result.max_value <= local_max.max() + 1e-6 * scale
    assert_in_component(H_e, mu_e, c_e, low, high, theta_star, result.argmax, 1e-9 * (1 + abs(high)))
    assert result.max_value == pytest.approx(float(L_of(H_f, mu_f, c_f, result.argmax)), abs=1e-12 * scale)


# ----------------------------------------------------------------------------------------------------------------
# band_extremes: closed forms, unbounded cases, degenerate bands
# ----------------------------------------------------------------------------------------------------------------


def test_band_extremes_common_minimizer_matches_generalized_eigenvalue():
    """Common minimizer: sup over {1/2 d^T H_e d <= eps} of 1/2 d^T H_f d = eps * lambda_max(H_e^-1 H_f)."""
    H_e = symmetric(np.array([0.5, 1.0, 4.0]), 3)
    H_f = symmetric(np.array([0.2, 2.0, 3.0]), 4)
    eps = 0.7
    mu = np.array([0.1, -0.2, 0.3])
    kappa = np.max(np.linalg.eigvals(np.linalg.solve(H_e, H_f)).real)
    result = band_extremes(H_e, mu, 1.0, 1.0 - eps, 1.0 + eps, H_f, mu, 2.0, mu)
    assert result.max_value == pytest.approx(2.0 + eps * kappa, rel=1e-12)
    assert result.min_value == pytest.approx(2.0, abs=1e-14)


def test_band_extremes_annulus_hand_solved():
    # 1 <= |theta| <= sqrt(2); L_f = (x - 0.3)^2 + x2^2 / 4. On |theta| = 1: 0.75 c^2 - 0.6 c + 0.34, min 0.22 at
    # c = 0.4; on the outer circle the max: 2 + 0.6 sqrt(2) + 0.09 at theta = (-sqrt 2, 0).
    result = band_extremes(
        np.eye(2), np.zeros(2), 0.0, 0.5, 1.0, np.diag([2.0, 0.5]), np.array([0.3, 0.0]), 0.0, np.array([1.2, 0.0])
    )
    assert result.min_value == pytest.approx(0.22, rel=1e-13)
    assert result.argmin[0] == pytest.approx(0.4) and abs(result.argmin[1]) == pytest.approx(math.sqrt(0.84))
    assert result.max_value == pytest.approx(2.09 + 0.6 * math.sqrt(2), rel=1e-13)
    assert result.argmax == pytest.approx([-math.sqrt(2), 0.0])


def test_band_extremes_unbounded_along_null_space():
    H_e = np.diag([1.0, 0.0])
    result = band_extremes(H_e, np.zeros(2), 0.0, 0.0, 1.0, np.eye(2), np.array([0.5, 3.0]), 0.0, np.zeros(2))
    assert result.max_value == math.inf and result.argmax is None
    assert result.min_value == pytest.approx(0.0, abs=1e-15)  # mu_f lies in the strip |x| <= sqrt 2
    assert result.argmin == pytest.approx([0.5, 3.0])
    # A tilted H_f: the free coordinate is minimised exactly (by hand: x2* = 3 - (x - 0.5) / 2 ... at x = 1.5,
    # L = 1/2 [(x-0.5)^2 + (x-0.5)(y-3) + (y-3)^2] minimised over y gives 3/8 (x - 0.5)^2 = 3/8 at x = 1.5).
    H_f = np.array([[1.0, 0.5], [0.5, 1.0]])
    result = band_extremes(H_e, np.zeros(2), 0.0, 0.5, 1.125, H_f, np.array([-2.5, 3.0]), 0.0, np.array([1.2, 0.0]))
    # slab x in [1, 1.5]; reduced L = 3/8 (x + 2.5)^2, min at x = 1
    assert result.min_value == pytest.approx(3 / 8 * 3.5**2, rel=1e-13)
    assert result.argmin[0] == pytest.approx(1.0)
    assert result.max_value == math.inf


def test_band_extremes_zero_hessians():
    theta_star = np.array([1.0, 2.0])
    # L_e constant: the whole plane. L_f constant too: both extremes are c_f.
    result = band_extremes(np.zeros((2, 2)), np.zeros(2), 1.0, 0.0, 2.0, np.zeros((2, 2)), np.ones(2), -3.0, theta_star)
    assert result.min_value == -3.0 and result.max_value == -3.0
    # L_f curved: min c_f, max +inf.
    result = band_extremes(np.zeros((2, 2)), np.zeros(2), 1.0, 1.0, 1.0, np.diag([0.0, 2.0]), np.ones(2), -3.0,
                           theta_star)
    assert result.min_value == pytest.approx(-3.0, abs=1e-15) and result.max_value == math.inf
    assert result.argmin[1] == pytest.approx(1.0)


@pytest.mark.parametrize("P", [1, 2, 3])
def test_band_extremes_constant_L_f_on_a_shell_returns_points_of_the_shell(P):
    # L_f constant: every point of the component is an argmin and an argmax; the returned ones must be in it.
    theta_star = np.zeros(P)
    theta_star[0] = -1.2
    result = band_extremes(np.eye(P), np.zeros(P), 0.0, 0.5, 1.0, np.zeros((P, P)), np.ones(P), 4.0, theta_star)
    assert result.min_value == 4.0 and result.max_value == 4.0
    for theta in (result.argmin, result.argmax):
        assert 1.0 - 1e-12 <= np.linalg.norm(theta) <= math.sqrt(2.0) + 1e-12
        if P == 1:
            assert theta[0] < 0


def test_band_extremes_level_set_only():
    # low == high: the circle |theta| = 1 (P = 2), and a single point per side (P = 1).
    result = band_extremes(
        np.eye(2), np.zeros(2), 0.0, 0.5, 0.5, np.diag([1.0, 3.0]), np.zeros(2), 0.0, np.array([1.0, 0.0])
    )
    assert result.min_value == pytest.approx(0.5) and result.max_value == pytest.approx(1.5)
    result = band_extremes(
        np.array([[2.0]]), np.array([0.0]), 0.0, 1.0, 1.0, np.array([[1.0]]), np.array([5.0]), 0.0, np.array([-1.0])
    )
    assert result.min_value == pytest.approx(18.0) and result.max_value == pytest.approx(18.0)
    assert result.argmin == pytest.approx([-1.0])


def test_band_extremes_sublevel_degenerate_to_point():
    # high == c_e: the band is {mu_e} (P = 2, H_e PD).
    mu_e = np.array([0.5, -1.0])
    result = band_extremes(np.eye(2), mu_e, 0.0, -1.0, 0.0, np.eye(2), np.zeros(2), 0.0, mu_e)
    assert result.min_value == pytest.approx(0.625) and result.max_value == pytest.approx(0.625)
    np.testing.assert_allclose(result.argmin, mu_e)


def test_band_extremes_theta_star_outside_band_raises():
    with pytest.raises(ValueError, match="theta_star"):
        band_extremes(np.eye(2), np.zeros(2), 0.0, 1.0, 2.0, np.eye(2), np.zeros(2), 0.0, np.array([0.1, 0.0]))
    with pytest.raises(ValueError, match="theta_star"):
        band_extremes(np.eye(2), np.zeros(2), 0.0, 0.0, 2.0, np.eye(2), np.zeros(2), 0.0, np.array([3.0, 0.0]))
    # L_e constant but outside [low, high]
    with pytest.raises(ValueError, match="theta_star"):
        band_extremes(np.zeros((1, 1)), np.zeros(1), 5.0, 0.0, 2.0, np.eye(1), np.zeros(1), 0.0, np.zeros(1))


def test_band_extremes_theta_star_on_the_edge_is_accepted():
    # low = high = L_e(theta_star) computed by the caller with a different rounding.
    H = symmetric(np.array([0.3, 1.7]), 9)
    theta_star = np.array([0.1, 0.7])
    L_star = 0.5 * theta_star @ H @ theta_star * (1 + 1e-15)
    result = band_extremes(H, np.zeros(2), 0.0, L_star, L_star, np.eye(2), np.zeros(2), 0.0, theta_star)
    assert math.isfinite(result.max_value)


# ----------------------------------------------------------------------------------------------------------------
# quadratic_value
# ----------------------------------------------------------------------------------------------------------------


def test_quadratic_value_hand_computed_and_batched():
    H = np.array([[2.0, 1.0], [1.0, 4.0]])
    mu = np.array([1.0, -1.0])
    # d = (1, 2): d^T H d = 2 + 4 + 16 = 22
    assert quadratic_value(H, mu, 0.5, np.array([2.0, 1.0])) == pytest.approx(11.5)
    batch = np.array([[[2.0, 1.0], [1.0, -1.0]]])
    np.testing.assert_allclose(quadratic_value(H, mu, 0.5, batch), [[11.5, 0.5]])


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


GOOD = dict(
    H_e=np.eye(2), mu_e=np.zeros(2), c_e=0.0, low=0.0, high=1.0, H_f=np.eye(2), mu_f=np.zeros(2), c_f=0.0,
    theta_star=np.zeros(2),
)


@pytest.mark.parametrize(
    "name, value, error",
    [
        ("H_e", np.array([[1.0, 0.5], [0.0, 1.0]]), ValueError),  # not symmetric
        ("H_e", np.diag([1.0, -0.5]), ValueError),  # indefinite
        ("H_e", np.ones(2), ValueError),  # not a matrix
        ("H_e", np.ones((2, 3)), ValueError),  # not square
        ("H_e", np.array([[1.0, np.nan], [np.nan, 1.0]]), ValueError),
        ("H_e", np.eye(2, dtype=int), TypeError),
        ("H_f", np.diag([-1.0, 1.0]), ValueError),
        ("H_f", np.eye(3), ValueError),
        ("H_f", np.array([[1.0, 0.0], [1e-3, 1.0]]), ValueError),
        ("mu_e", np.zeros(3), ValueError),
        ("mu_e", np.array([np.inf, 0.0]), ValueError),
        ("mu_f", np.zeros((2, 1)), ValueError),
        ("theta_star", np.zeros(1), ValueError),
        ("theta_star", np.array([0.0, np.nan]), ValueError),
        ("c_e", float("nan"), ValueError),
        ("c_f", "1.0", TypeError),
        ("low", float("-inf"), ValueError),
        ("high", None, TypeError),
        ("low", 2.0, ValueError),  # low > high
    ],
)
def test_band_extremes_bad_input_names_the_argument(name, value, error):
    kwargs = dict(GOOD, **{name: value})
    with pytest.raises(error, match=name):
        band_extremes(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(A=np.array([[1.0, 2.0], [0.0, 1.0]])), ValueError, "A"),
        (dict(A=np.ones((2, 3))), ValueError, "A"),
        (dict(A=np.zeros((0, 0)), g=np.zeros(0)), ValueError, "A"),
        (dict(A=np.array([[np.inf, 0.0], [0.0, 1.0]])), ValueError, "A"),
        (dict(A=[[1, 0], [0, 1]]), TypeError, "A"),
        (dict(g=np.zeros(3)), ValueError, "g"),
        (dict(g=np.array([np.nan, 0.0])), ValueError, "g"),
        (dict(radius=-1.0), ValueError, "radius"),
        (dict(radius=float("nan")), ValueError, "radius"),
        (dict(radius="1"), TypeError, "radius"),
        (dict(maximize=1), TypeError, "maximize"),
        (dict(boundary="yes"), TypeError, "boundary"),
    ],
)
def test_trs_bad_input_names_the_argument(kwargs, error, name):
    args = dict(A=np.eye(2), g=np.zeros(2), radius=1.0)
    args.update(kwargs)
    flags = {k: args.pop(k) for k in ("maximize", "boundary") if k in args}
    with pytest.raises(error, match=name):
        trs(args["A"], args["g"], args["radius"], **flags)


def test_quadratic_value_bad_input():
    with pytest.raises(ValueError, match="theta"):
        quadratic_value(np.eye(2), np.zeros(2), 0.0, np.zeros(3))
    with pytest.raises(ValueError, match="H"):
        quadratic_value(np.array([[1.0, 1.0], [0.0, 1.0]]), np.zeros(2), 0.0, np.zeros(2))
    with pytest.raises(TypeError, match="c"):
        quadratic_value(np.eye(2), np.zeros(2), None, np.zeros(2))
