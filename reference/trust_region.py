"""Exact extremes of one quadratic over a level band of another: the trust-region subproblem.

The inconsistency score of eq. (1) (paper §2.1-2.2) asks, for environments e and e', for the supremum of
``|L_e'(theta) - L_e(theta*)|`` over ``N^eps_{e,theta*}``, the connected component containing ``theta*`` of the
eps-band ``{theta : |L_e(theta) - L_e(theta*)| <= eps}``. With quadratic losses whose minimizers differ (beyond the
paper's common minimizer) there is no closed form, but the two extremes of ``L_e'`` over the component are exactly
computable: after a change of variables the component is a ball, a spherical shell or a slab (times a free
subspace), and minimising or maximising a quadratic over a ball or a sphere is the trust-region subproblem (TRS),
which has no duality gap (S-lemma) and is solved to solver precision by an eigendecomposition and a one-dimensional
root search (the secular equation). This module provides:

- ``trs``: the TRS on a ball or a sphere, for a symmetric matrix of any inertia;
- ``band_extremes``: inf and sup of ``L_f`` over the component containing ``theta_star`` of
  ``{theta : low <= L_e(theta) <= high}``;
- ``quadratic_value``: ``L(theta) = c + 1/2 (theta - mu)^T H (theta - mu)``.

The trust-region subproblem (``trs``)
-------------------------------------
Minimise ``q(x) = 1/2 x^T A x + g^T x`` over ``||x|| <= r`` (ball) or ``||x|| = r`` (sphere); maximising ``q`` is
minimising ``-q``. Global optimality conditions (Gay 1981; Moré & Sorensen 1983; exact because of the S-lemma):
``x`` is a global minimiser on the sphere iff for some real ``sigma``

    (A + sigma I) x = -g,     A + sigma I  positive semidefinite,     ||x|| = r,

and on the ball iff additionally ``sigma >= 0`` and ``sigma (r - ||x||) = 0`` (then ``||x|| <= r`` suffices).
With ``A = Q diag(lam) Q^T`` (``lam`` ascending, ``lam_1`` the smallest) and ``gt = Q^T g``, for
``sigma > -lam_1`` the unique solution is ``x(sigma) = -sum_i gt_i / (lam_i + sigma) q_i`` and
``phi(sigma) = ||x(sigma)||`` decreases strictly from ``phi(-lam_1+)`` to 0. Let ``sigma_low = -lam_1`` (sphere) or
``max(0, -lam_1)`` (ball).

1. ``gt`` has a component along the eigenspace where ``lam_i + sigma_low = 0``: ``phi(sigma_low+) = inf``, so the
   secular equation ``phi(sigma) = r`` has exactly one root in ``(sigma_low, inf)``. It is found by
   ``scipy.optimize.brentq`` on ``1/phi(sigma) - 1/r`` (increasing, nearly linear: Reinsch / Hebden), bracketed
   by ``sigma_low`` (where ``1/phi = 0``) and ``2 ||g|| / r - lam_1`` (where ``phi <= r/2``).
2. Otherwise let ``x0`` be the minimum-norm solution at ``sigma_low`` (the eigenspace terms left out).
   - ``||x0|| > r``: a root of the secular equation in ``(sigma_low, inf)``, as in 1.
   - ``||x0|| <= r`` and ``sigma_low = 0`` on the ball (A positive semidefinite): ``x0`` is an unconstrained
     minimiser inside the ball (``-A^+ g``); it is returned.
   - ``||x0|| <= r`` otherwise: the **hard case** (``g`` orthogonal to the eigenspace of ``lam_1``, and the
     radius large): ``x = x0 + t v`` with ``v`` a unit eigenvector of ``lam_1`` and ``t = sqrt(r^2 - ||x0||^2)``.
3. ``r = 0``: ``x = 0``.

Numerical decisions (each is a perturbation of the data at the level of rounding, so the returned value is exact
to solver precision and ``x`` is always feasible):

- the problem is solved in ``u = x / r`` and divided by its scale ``s = max(max|lam| r^2, ||g|| r)``, so that
  ``max(max|lam|, ||g||) = 1`` there (no overflow or underflow for extreme but finite data; norms are computed
  without squaring overflow). The tolerances below are relative to ``s``;
- eigenvalues within ``EIGEN_RTOL`` of 0 are set to 0, and those within ``EIGEN_RTOL`` of ``lam_1`` are set to
  ``lam_1`` (one eigenspace, not a cluster of nearly equal ones): a change of ``q`` by at most ``EIGEN_RTOL s``;
- the component of ``gt`` on the eigenspace of step 1 is set to 0 when its norm is at most ``HARD_CASE_RTOL``
  (a change of ``q`` by at most ``HARD_CASE_RTOL s`` on the ball): the hard case is recognised when ``g`` is
  orthogonal to the eigenvector up to rounding, as when it is constructed so;
- at the root, the components on the bottom eigenspace (``-gt_J / (lam_1 + sigma)``, ill-conditioned when
  ``sigma`` is near the pole ``-lam_1``, i.e. near the hard case) are taken as ``-gt_J / ||gt_J||`` times
  ``sqrt(r^2 - ||x_rest||^2)``, which is what they equal at the exact root;
- a solution on the boundary is rescaled to norm exactly ``r``; the value is ``q(x)`` evaluated with the given
  ``A`` and ``g``.

Extremes over a level band (``band_extremes``)
----------------------------------------------
With ``theta = mu_e + d``, ``L_e(theta) = c_e + 1/2 d^T H_e d``. Write ``H_e = U diag(lam) U^T`` and split
``d = M y + N z`` with ``M = U_r diag(lam_r)^(-1/2)`` on ``range(H_e)`` (rank ``r``) and ``N`` an orthonormal
basis of ``null(H_e)`` (``k = P - r`` columns). Then ``L_e = c_e + 1/2 ||y||^2`` and the band is
``{rho_in^2 <= ||y||^2 <= rho_out^2} x R^k`` with ``rho_out^2 = 2 (high - c_e)`` and
``rho_in^2 = max(0, 2 (low - c_e))``. Its component containing ``theta_star``:

- ``low <= c_e`` (sublevel set): the ball ``||y|| <= rho_out`` times ``R^k``, an ellipsoid (``H_e`` positive
  definite) or an elliptic cylinder (``H_e`` singular). Connected.
- ``low > c_e``, ``r >= 2``: the shell ``rho_in <= ||y|| <= rho_out`` times ``R^k``, connected (an annulus in
  ``r >= 2`` dimensions is path-connected).
- ``low > c_e``, ``r = 1``: two slabs ``rho_in <= +-y <= rho_out``; only the one on ``theta_star``'s side counts
  (``P = 1``: the interval holding ``theta_star``).
- ``r = 0`` (``H_e = 0``): ``L_e`` is constant and the component is all of ``R^P``.

``L_f`` along the free coordinates ``z``: ``H_f`` is positive semidefinite, so ``n^T H_f n = 0`` implies
``H_f n = 0``; ``L_f`` is therefore either constant along ``null(H_e)`` (``G = N^T H_f N = 0``: then the linear term
``N^T H_f (theta - mu_f)`` vanishes too) or grows quadratically along some free direction:

- **supremum**: ``+inf`` iff ``G != 0`` (``argmax`` None); otherwise ``L_f`` depends on ``y`` only;
- **infimum**: always finite and attained (``L_f >= c_f``). Minimising over ``z`` exactly (a convex quadratic, its
  minimum attained because ``N^T H_f w`` lies in ``range(G)`` for PSD ``H_f``) gives
  ``z*(y) = -G^+ N^T H_f w(y)`` with ``w(y) = mu_e - mu_f + M y``, and leaves
  ``c_f + 1/2 w^T S w`` with the generalised Schur complement ``S = H_f - H_f N G^+ N^T H_f`` (PSD).

On ``y`` the reduced ``L_f`` is ``const + 1/2 y^T A y + b^T y`` with ``A = M^T S M``, ``b = M^T S (mu_e - mu_f)``,
``A`` positive semidefinite, so:

- max over the ball or the shell = max over the outer sphere (a convex function attains its maximum over a ball
  on the boundary): ``trs(..., maximize=True, boundary=True)`` with radius ``rho_out``;
- min over the ball: ``trs`` on the ball;
- min over the shell: if a minimiser over the outer ball has ``||y|| >= rho_in`` it is the minimum, otherwise the
  minimum lies on the inner sphere (a local minimiser of a convex function in the open shell is a global minimiser
  over the ball), an equality-constrained ``trs`` with radius ``rho_in``; both candidates are feasible and the
  smaller is taken;
- slab (``r = 1``): a 1-D quadratic on an interval (its endpoints and its vertex).

The returned values are ``L_f`` evaluated at the returned points (``quadratic_value``), which lie in the
component up to rounding.

Tolerances: matrices must be symmetric to ``SYMMETRY_RTOL * max|H|`` (then symmetrised) and positive semidefinite
to ``PSD_RTOL * ||H||_2``; eigenvalues of ``H_e`` at most ``RANK_RTOL * ||H_e||_2`` count as 0 (so a positive
definite ``H_e`` with condition number above ``1 / RANK_RTOL`` is treated as singular), and ``G`` counts as nonzero
when an eigenvalue exceeds ``RANK_RTOL * ||H_f||_2``. ``theta_star`` may lie outside ``[low, high]`` by
``BAND_RTOL * (|low| + |high| + |c_e| + |L_e(theta_star)|)`` (rounding in the caller's ``L_e(theta*) +- eps``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import linalg, optimize

from .validate import finite, float_array, positive, real_number

#: Largest ``max|H - H^T| / max|H|`` accepted as symmetric.
SYMMETRY_RTOL = 1e-10
#: Largest ``-lambda_min(H) / ||H||_2`` accepted as positive semidefinite.
PSD_RTOL = 1e-10
#: Eigenvalues of ``H_e`` (resp. of ``N^T H_f N``) at most this times ``||H_e||_2`` (``||H_f||_2``) count as 0.
RANK_RTOL = 1e-12
#: ``trs``: in the scaled problem (module docstring), eigenvalues this close to 0 or to the smallest one are
#: merged with it.
EIGEN_RTOL = 1e-13
#: ``trs``: in the scaled problem, the norm below which the gradient's component on the bottom eigenspace is 0.
HARD_CASE_RTOL = 1e-13
#: ``band_extremes``: relative slack on ``low <= L_e(theta_star) <= high``.
BAND_RTOL = 1e-12


class BandExtremes(NamedTuple):
    """Result of ``band_extremes``.

    ``min_value``/``max_value`` are floats (``max_value`` may be ``+inf``; ``min_value`` is always finite for PSD
    ``H_f``); ``argmin``/``argmax`` are float64 points of shape ``(P,)`` in the component where the value is
    attained, or ``None`` where it is infinite.
    """

    min_value: float
    argmin: np.ndarray | None
    max_value: float
    argmax: np.ndarray | None


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------------


def _symmetric_matrix(H, name: str, *, psd: bool = False, P: int | None = None) -> np.ndarray:
    """Validate a real symmetric ``(P, P)`` matrix (P >= 1), optionally PSD; return it symmetrised, float64."""
    arr = finite(float_array(H, name, min_ndim=2), name)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a square matrix of shape (P, P) with P >= 1, got shape {arr.shape}")
    if P is not None and arr.shape[0] != P:
        raise ValueError(f"{name} must have shape ({P}, {P}) like the other matrix, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    asymmetry = np.abs(arr - arr.T)
    scale = float(np.max(np.abs(arr)))
    if asymmetry.max() > SYMMETRY_RTOL * scale:
        i, j = np.unravel_index(int(np.argmax(asymmetry)), arr.shape)
        raise ValueError(
            f"{name} must be symmetric, but {name}[{i}, {j}] = {arr[i, j]!r} and {name}[{j}, {i}] = {arr[j, i]!r} "
            f"differ by {asymmetry[i, j]:.3g} > {SYMMETRY_RTOL} * max|{name}|"
        )
    arr = 0.5 * (arr + arr.T)
    if psd:
        eigenvalues = linalg.eigvalsh(arr)
        norm = float(np.max(np.abs(eigenvalues)))
        if eigenvalues[0] < -PSD_RTOL * norm:
            raise ValueError(
                f"{name} must be positive semidefinite (a Hessian of a convex quadratic loss), but its smallest "
                f"eigenvalue is {eigenvalues[0]:.6g} (largest magnitude {norm:.6g})"
            )
    return arr


def _vector(x, name: str, P: int) -> np.ndarray:
    """Validate a finite real floating vector of shape ``(P,)``; return it as float64."""
    arr = finite(float_array(x, name), name)
    if arr.shape != (P,):
        raise ValueError(f"{name} must have shape ({P},) to match the matrices, got shape {arr.shape}")
    return arr.astype(np.float64)


def _flag(x, name: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")
    return bool(x)


# ----------------------------------------------------------------------------------------------------------------
# Quadratics
# ----------------------------------------------------------------------------------------------------------------


def _quadratic(H: np.ndarray, mu: np.ndarray, c: float, theta: np.ndarray) -> float:
    d = theta - mu
    return float(c + 0.5 * (d @ H @ d))


def quadratic_value(H, mu, c, theta):
    """``L(theta) = c + 1/2 (theta - mu)^T H (theta - mu)`` (paper §2.2, with a minimizer mu and an offset c).

    ``H``: ``(P, P)`` real symmetric (any inertia; symmetric to ``SYMMETRY_RTOL``). ``mu``: ``(P,)``. ``c``: a real
    number. ``theta``: ``(P,)`` or a batch ``(..., P)``. All finite. Returns a float for ``(P,)`` input, a float64
    array of shape ``theta.shape[:-1]`` for a batch.
    """
    H = _symmetric_matrix(H, "H")
    P = H.shape[0]
    mu = _vector(mu, "mu", P)
    c = real_number(c, "c")
    theta = finite(float_array(theta, "theta", min_ndim=1), "theta")
    if theta.shape[-1] != P:
        raise ValueError(f"theta must have shape (P,) or (..., P) with P = {P}, got shape {theta.shape}")
    d = theta.astype(np.float64) - mu
    values = c + 0.5 * np.einsum("...i,ij,...j->...", d, H, d)
    return float(values) if theta.ndim == 1 else np.asarray(values, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# The trust-region subproblem
# ----------------------------------------------------------------------------------------------------------------


def _norm(v: np.ndarray) -> float:
    """Euclidean norm without overflow or underflow of the squares (entries scaled by the largest first)."""
    largest = float(np.max(np.abs(v))) if v.size else 0.0
    if largest == 0.0:
        return 0.0
    return largest * float(np.sqrt(np.sum((v / largest) ** 2)))


def _unit_scaled(lam: np.ndarray, gt: np.ndarray, radius: float):
    """Eigenvalues and rotated gradient of the problem in ``u = x / radius``, divided by its scale.

    ``q(radius u) = s (1/2 u^T diag(mu) u + ht^T u)`` with ``s = max(max|lam| radius^2, ||gt|| radius)``, so
    ``max(max|mu|, ||ht||) = 1``. The products are ordered so that nothing overflows for finite data.
    """
    lam_max, g_norm = float(np.max(np.abs(lam))), _norm(gt)
    if lam_max * radius >= g_norm:  # curvature dominates: s = lam_max radius^2 (g_norm / lam_max <= radius)
        return lam / lam_max, (gt / lam_max) / radius
    if radius >= 1.0:  # s = g_norm radius, |lam| / g_norm < 1 / radius <= 1
        return (lam / g_norm) * radius, gt / g_norm
    return (lam * radius) / g_norm, gt / g_norm


def _trs_minimiser(A: np.ndarray, g: np.ndarray, radius: float, boundary: bool) -> np.ndarray:
    """A global minimiser of ``1/2 x^T A x + g^T x`` on the ball (or sphere) of ``radius``; validated input.

    See the module docstring for the method. ``A``: ``(P, P)`` symmetric float64, ``g``: ``(P,)``.
    """
    P = g.shape[0]
    if radius == 0.0:
        return np.zeros(P)
    lam, Q = linalg.eigh(A)
    gt = Q.T @ g
    if not (np.any(lam != 0.0) or np.any(gt != 0.0)):  # q = 0 identically
        x = np.zeros(P)
        if boundary:
            x[0] = radius
        return x
    lam, gt = _unit_scaled(lam, gt, radius)  # now radius 1, max(max|lam|, ||gt||) = 1
    # Merge eigenvalues that differ from 0 or from the smallest only at the level of rounding.
    lam = np.where(np.abs(lam) <= EIGEN_RTOL, 0.0, lam)
    lam = np.where(lam - lam[0] <= EIGEN_RTOL, lam[0], lam)
    sigma_low = -lam[0] if boundary else max(0.0, -lam[0])
    shifted = lam + sigma_low  # >= 0; exactly 0 on the bottom eigenspace when sigma_low = -lam_1
    singular = shifted == 0.0
    if singular.any() and _norm(gt[singular]) <= HARD_CASE_RTOL:
        gt = np.where(singular, 0.0, gt)

    if not np.any(gt[singular] != 0.0):
        u0 = np.zeros(P)
        u0[~singular] = -gt[~singular] / shifted[~singular]  # minimum-norm solution at sigma_low
        norm0 = _norm(u0)
        if norm0 <= 1.0:
            if not boundary and sigma_low == 0.0:
                return radius * (Q @ u0)  # convex, unconstrained minimiser inside the ball
            # Hard case: complete u0 along the bottom eigenspace up to the unit sphere.
            u0[int(np.argmax(singular))] = np.sqrt(max(1.0 - norm0**2, 0.0))
            return _to_sphere(Q @ u0, radius)

    # Secular equation 1/||u(sigma)|| = 1 for the unique sigma in (sigma_low, inf), u(sigma) = -gt / (lam + sigma).
    def secular(sigma: float) -> float:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            w = gt / (lam + sigma)
        if not np.all(np.isfinite(w)):
            return -1.0  # sigma = sigma_low with a nonzero component on the singular eigenspace
        return 1.0 / _norm(w) - 1.0

    # Where lam_i + sigma >= 2 ||gt|| for every i, ||u(sigma)|| <= 1/2 < 1; widen in case of rounding.
    sigma_high = max(sigma_low, -lam[0] + 2.0 * _norm(gt))
    while secular(sigma_high) < 0.0:
        sigma_high = sigma_low + 2.0 * (sigma_high - sigma_low) + 1.0
    eps = np.finfo(float).eps
    sigma = optimize.brentq(secular, sigma_low, sigma_high, xtol=4 * eps, rtol=4 * eps, maxiter=500)
    # Near the pole (sigma close to -lam_1) the bottom components -gt_J / (lam_1 + sigma) are ill-conditioned in
    # sigma; at the root their norm is sqrt(1 - ||u_off||^2) and their direction that of -gt_J, which is exact.
    bottom = lam == lam[0]
    ut = np.zeros(P)
    ut[~bottom] = -gt[~bottom] / (lam[~bottom] + sigma)
    gt_bottom = gt[bottom]
    if np.any(gt_bottom != 0.0):
        ut[bottom] = -gt_bottom / _norm(gt_bottom) * np.sqrt(max(1.0 - _norm(ut[~bottom]) ** 2, 0.0))
    return _to_sphere(Q @ ut, radius)


def _to_sphere(u: np.ndarray, radius: float) -> np.ndarray:
    """``radius * u / ||u||`` (``u`` nonzero on every path that calls it)."""
    return (u / _norm(u)) * radius


def _q(A: np.ndarray, g: np.ndarray, x: np.ndarray) -> float:
    return float(0.5 * (x @ A @ x) + g @ x)


def trs(A, g, radius, *, maximize=False, boundary=False):
    """Trust-region subproblem: extremise ``q(x) = 1/2 x^T A x + g^T x`` over ``||x|| <= radius``.

    Exact to solver precision by the eigendecomposition of ``A`` and the secular equation (S-lemma: no duality
    gap), including the hard case (``g`` orthogonal to the eigenspace of the extreme eigenvalue); see the module
    docstring for the method and its numerical decisions.

    ``A``: ``(P, P)`` real symmetric, any inertia (definite, indefinite, singular, 0), P >= 1. ``g``: ``(P,)``.
    ``radius``: a real number ``>= 0``. ``maximize``: maximise instead of minimise. ``boundary``: constrain to the
    sphere ``||x|| == radius`` instead of the ball. All finite.

    Returns ``(value, x)``: ``value = q(x)`` (a float) and ``x`` a global extremiser, float64 ``(P,)``, with
    ``||x|| <= radius`` (``== radius`` up to rounding when ``boundary``). Extremisers need not be unique (e.g. the
    hard case, or ``A = 0, g = 0``); one of them is returned, on the ball the minimum-norm unconstrained one when
    ``A`` is PSD and it fits. ``radius = 0`` gives ``(0.0, zeros)``.

    Example (1-D, hand-solved): ``trs([[2.0]], [-1.0], 1.0)`` is ``(-0.25, [0.5])`` (vertex inside);
    ``trs([[2.0]], [-1.0], 1.0, maximize=True)`` is ``(2.0, [-1.0])`` (endpoint).
    """
    A = _symmetric_matrix(A, "A")
    g = _vector(g, "g", A.shape[0])
    radius = positive(radius, "radius", allow_zero=True)
    maximize = _flag(maximize, "maximize")
    boundary = _flag(boundary, "boundary")
    sign = -1.0 if maximize else 1.0
    x = _trs_minimiser(sign * A, sign * g, radius, boundary)
    return _q(A, g, x), x


# ----------------------------------------------------------------------------------------------------------------
# Extremes of L_f over the component of a level band of L_e
# ----------------------------------------------------------------------------------------------------------------


def _interval_extremes(a: float, b: float, lo: float, hi: float):
    """Minimiser and maximiser of ``1/2 a t^2 + b t`` (``a >= 0``) over ``[lo, hi]``."""
    candidates = [lo, hi]
    if a > 0.0 and lo < -b / a < hi:
        candidates.append(-b / a)
    values = [0.5 * a * t * t + b * t for t in candidates]
    t_min = candidates[int(np.argmin(values))]
    t_max = max((lo, hi), key=lambda t: 0.5 * a * t * t + b * t)
    return t_min, t_max


def band_extremes(H_e, mu_e, c_e, low, high, H_f, mu_f, c_f, theta_star) -> BandExtremes:
    """Infimum and supremum of ``L_f`` over the component containing ``theta_star`` of ``{low <= L_e <= high}``.

    ``L_e(theta) = c_e + 1/2 (theta - mu_e)^T H_e (theta - mu_e)`` and likewise ``L_f`` (paper §2.1-2.2,
    extended to different minimizers). With ``low = L_e(theta*) - eps`` and
    ``high = L_e(theta*) + eps`` the component is ``N^eps_{e,theta*}`` of eq. (1), and the inner sup of eq. (1) for
    the pair (e, f) is ``max(max_value - L_e(theta*), L_e(theta*) - min_value)``.

    Method (module docstring): eigendecomposition of ``H_e`` maps the band to a ball, a shell or (rank 1) two
    slabs in ``y = diag(lam_r)^(1/2) U_r^T (theta - mu_e)``, times the free null-space coordinates; ``L_f`` is
    minimised exactly over the free coordinates (generalised Schur complement) and the remaining problem is a
    trust-region subproblem (``trs``) or a 1-D quadratic on an interval.

    Arguments: ``H_e``, ``H_f``: ``(P, P)`` real symmetric positive semidefinite (P >= 1). ``mu_e``, ``mu_f``,
    ``theta_star``: ``(P,)``. ``c_e``, ``c_f``, ``low``, ``high``: real numbers with ``low <= high``. All finite
    (use any ``low <= c_e`` for a sublevel set). ``theta_star`` must lie in the band (``low <= L_e(theta_star) <=
    high`` up to ``BAND_RTOL``), else ValueError.

    Returns ``BandExtremes(min_value, argmin, max_value, argmax)``:

    - ``max_value = +inf`` (``argmax`` None) iff the component is unbounded along a direction where ``H_f`` curves,
      i.e. ``null(H_e)`` is not contained in ``null(H_f)`` (for PSD ``H_f`` a nonzero linear term along a free
      direction comes with nonzero curvature there); also when ``H_e = 0`` and ``H_f != 0``;
    - ``min_value`` is always finite and attained (``L_f >= c_f``);
    - when ``L_f`` is constant on the component, both arguments are the same point;
    - ``low == high``: the component is the level set itself (a sphere in ``y``, or one point per slab).
    """
    H_e = _symmetric_matrix(H_e, "H_e", psd=True)
    P = H_e.shape[0]
    mu_e = _vector(mu_e, "mu_e", P)
    c_e = real_number(c_e, "c_e")
    low = real_number(low, "low")
    high = real_number(high, "high")
    if low > high:
        raise ValueError(f"low must be <= high, got low={low!r} > high={high!r}")
    H_f = _symmetric_matrix(H_f, "H_f", psd=True, P=P)
    mu_f = _vector(mu_f, "mu_f", P)
    c_f = real_number(c_f, "c_f")
    theta_star = _vector(theta_star, "theta_star", P)
    value_star = _quadratic(H_e, mu_e, c_e, theta_star)
    slack = BAND_RTOL * (abs(low) + abs(high) + abs(c_e) + abs(value_star))
    if not low - slack <= value_star <= high + slack:
        raise ValueError(
            f"theta_star must lie in the band low <= L_e(theta_star) <= high, but L_e(theta_star) = {value_star!r} "
            f"is outside [{low!r}, {high!r}]"
        )

    # Range / null space of H_e; y-coordinates on the range, z on the null space.
    lam, U = linalg.eigh(H_e)
    in_range = lam > RANK_RTOL * max(float(lam[-1]), 0.0)
    M = U[:, in_range] / np.sqrt(lam[in_range])  # d = M y + N z
    N = U[:, ~in_range]
    rank = M.shape[1]
    outer2 = max(0.0, 2.0 * (high - c_e))
    rho_out = float(np.sqrt(outer2))
    rho_in = float(np.sqrt(min(max(0.0, 2.0 * (low - c_e)), outer2)))

    # Exact minimisation over the free coordinates z: z*(y) = Z (mu_e - mu_f + M y), Schur complement S.
    delta = mu_e - mu_f
    hf_norm = float(np.max(np.abs(linalg.eigvalsh(H_f))))
    C = N.T @ H_f  # (k, P)
    G = C @ N
    g_lam, g_vec = linalg.eigh(G) if N.shape[1] else (np.zeros(0), np.zeros((0, 0)))
    curved = g_lam > RANK_RTOL * hf_norm
    G_pinv = (g_vec[:, curved] / g_lam[curved]) @ g_vec[:, curved].T
    Z = -G_pinv @ C  # (k, P)
    S = H_f + C.T @ Z
    S = 0.5 * (S + S.T)
    unbounded_above = bool(curved.any())

    def theta_of(y: np.ndarray) -> np.ndarray:
        return mu_e + M @ y + N @ (Z @ (delta + M @ y))

    if rank == 0:
        y_min = y_max = np.zeros(0)
    else:
        A = M.T @ S @ M
        A = 0.5 * (A + A.T)
        b = M.T @ S @ delta
        y_max = _trs_minimiser(-A, -b, rho_out, boundary=True)
        if rho_in == 0.0:
            y_min = _trs_minimiser(A, b, rho_out, boundary=False)
        elif rank >= 2:
            candidates = [_trs_minimiser(A, b, rho_in, boundary=True)]
            y_ball = _trs_minimiser(A, b, rho_out, boundary=False)
            if np.linalg.norm(y_ball) >= rho_in:
                candidates.append(y_ball)
            y_min = min(candidates, key=lambda y: _q(A, b, y))
        else:
            y_star = float(np.sqrt(lam[in_range][0]) * (U[:, in_range][:, 0] @ (theta_star - mu_e)))
            side = 1.0 if y_star >= 0.0 else -1.0
            # t = side * y in [rho_in, rho_out]; q = 1/2 a t^2 + side b t.
            t_min, t_max = _interval_extremes(float(A[0, 0]), side * float(b[0]), rho_in, rho_out)
            y_min, y_max = np.array([side * t_min]), np.array([side * t_max])

    argmin = theta_of(y_min)
    min_value = _quadratic(H_f, mu_f, c_f, argmin)
    if unbounded_above:
        return BandExtremes(min_value, argmin, float("inf"), None)
    argmax = theta_of(y_max)
    return BandExtremes(min_value, argmin, _quadratic(H_f, mu_f, c_f, argmax), argmax)
