"""The inconsistency score I^eps and the Invariant Learning Consistency (ILC) beyond the closed forms.

"Learning Explanations That Are Hard To Vary" (Parascandolo et al., ICLR 2021) defines, for a point theta*
reached by an algorithm A (paper §2.1, eqs. (1)-(2))::

    N^eps_{e,theta*}  = the path-connected component of { theta : |L_e(theta) - L_e(theta*)| <= eps }
                        that contains theta*
    I^eps(theta*)     = max_{(e, e') in E^2}  sup_{theta in N^eps_{e,theta*}}  |L_e'(theta) - L_e(theta*)|  (1)
    ILC(A, p(theta0)) = - E_{theta0 ~ p} [ I^eps( A^inf(theta0, E) ) ]                            (2)

Equation (1) is used as printed, not as the prose just before it (which compares with L_e at the moving theta):
ordered pairs, e = e' included, the loss of e at the *fixed* theta*. The closed forms for quadratics live in
``quadratic.py``; this module covers the rest:

- ``inconsistency_on_grid`` / ``inconsistency_1d_interval``: eq. (1) for any vectorised loss callables in
  P = 1 or 2 dimensions, by thresholding the band on a grid and labelling connected components
  (``scipy.ndimage.label``), a route for toy problems (the paper computes I^eps in no experiment);
- ``ilc_monte_carlo``: eq. (2) by Monte Carlo over initialisations, with a standard error;
- ``gradient_descent``: the algorithms A of eq. (2) on per-environment gradient oracles, full-batch GD with
  one of ``rules.aggregate``'s rules (mean, AND-mask, geometric mean);
- Proposition 1 (paper §2.3, App. A.3): ``prop1_check`` evaluates both sides of its checkable inequality;
- Proposition 2 (paper §2.3, App. A.4, Fig. 4): keep probabilities of the AND-mask on random gradients
  (``keep_probability_count``, ``keep_probability_threshold``, and the paper's printed eq. (4)
  ``keep_probability_eq4_printed``), the exact expectations ``expected_sq_norm_mean`` /
  ``expected_sq_norm_masked`` and the printed and corrected bounds ``prop2_bound_printed`` /
  ``prop2_bound_corrected`` (the printed factor K - t should be K - t + 1);
- the two-sigmoid toy of App. A.1: ``two_sigmoid_inconsistency_lower_bound`` (the appendix prints its
  inequalities reversed).

Bad input raises ``TypeError`` / ``ValueError`` naming the argument (see ``validate``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.stats import binom

from . import rules
from .data import (
    two_sigmoid_env_grid,
    two_sigmoid_env_losses,
    two_sigmoid_model,
    two_sigmoid_target,
    two_sigmoid_theta_star,
    two_sigmoid_theta_tilde,
)
from .validate import choice, finite, float_array, integer, positive, real_number

__all__ = [
    "GridBoundaryWarning",
    "GridInconsistency",
    "inconsistency_on_grid",
    "inconsistency_1d_interval",
    "ILCEstimate",
    "ilc_monte_carlo",
    "ConvergenceWarning",
    "GDTrajectory",
    "gradient_descent",
    "Prop1Check",
    "prop1_check",
    "keep_probability_count",
    "keep_probability_eq4_printed",
    "keep_probability_threshold",
    "expected_sq_norm_mean",
    "expected_sq_norm_masked",
    "prop2_bound_printed",
    "prop2_bound_corrected",
    "TwoSigmoidBound",
    "two_sigmoid_inconsistency_lower_bound",
]


class GridBoundaryWarning(UserWarning):
    """An environment's component N^eps reaches the edge of the grid: the grid value is only a lower bound."""


class ConvergenceWarning(UserWarning):
    """``gradient_descent`` used all its steps without the step norm falling to ``tol``."""


# ----------------------------------------------------------------------------------------------------------------
# I^eps on a grid  [paper §2.1, eq. (1)]
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridInconsistency:
    """Result of ``inconsistency_on_grid``.

    Attributes (K environments, P <= 2 parameters, grid shape ``S = (n,)`` or ``(n1, n2)``):
        value: the grid estimate of I^eps(theta*), ``pair_values.max()``.
        pair: the ordered pair ``(e, e')`` attaining ``value`` (the first one in row-major order on ties).
        argmax: float64 ``[P]``, the point of N_e where ``value`` is attained.
        pair_values: float64 ``[K, K]``; ``[e, e']`` = max over the grid component of N^eps_{e,theta*} (plus
            theta* itself) of ``|L_e'(theta) - L_e(theta*)|``.
        pair_argmax: float64 ``[K, K, P]``, where each pair value is attained.
        touches_boundary: bool ``[K]``; True where environment e's component contains a grid point on the edge
            of the grid. There the true N^eps_e may extend beyond the grid, and row e of ``pair_values`` is only
            a lower bound of the true sup.
        is_lower_bound: ``touches_boundary.any()``: ``value`` is then only a lower bound of I^eps(theta*).
        components: bool ``[K, *S]``, the grid component of each environment's band containing theta*.
        losses_at_theta_star: float64 ``[K]``, ``L_e(theta*)`` (evaluated at theta*, not at a grid point).
        nearest_index: the grid index nearest theta* (per axis), the seed of every component.
        eps: the eps used.
    """

    value: float
    pair: tuple[int, int]
    argmax: np.ndarray
    pair_values: np.ndarray
    pair_argmax: np.ndarray
    touches_boundary: np.ndarray
    is_lower_bound: bool
    components: np.ndarray
    losses_at_theta_star: np.ndarray
    nearest_index: tuple[int, ...]
    eps: float


def _grid_axis(axis, name: str) -> np.ndarray:
    """A grid axis: 1-D real floating, finite, at least 2 points, strictly increasing; returned as float64."""
    arr = finite(float_array(axis, name), name)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"{name} must be a 1-D array of at least 2 points, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.diff(arr) > 0):
        first = int(np.argmax(np.diff(arr) <= 0))
        raise ValueError(
            f"{name} must be strictly increasing, but {name}[{first}] = {arr[first]} >= "
            f"{name}[{first + 1}] = {arr[first + 1]}"
        )
    return arr


def _grid_axes(grid) -> list[np.ndarray]:
    """Split ``grid`` into its axes: a 1-D array (P = 1) or a tuple/list of 1-D arrays (one per parameter)."""
    if isinstance(grid, (tuple, list)) and len(grid) > 0 and all(np.ndim(a) == 1 for a in grid):
        axes = list(grid)
        if len(axes) > 2:
            raise ValueError(
                f"grid must describe P <= 2 parameters (a 1-D array, or a pair of 1-D axes), got {len(axes)} axes: "
                "the grid route is only practical in 1 or 2 dimensions"
            )
        return [_grid_axis(a, f"grid[{i}]") for i, a in enumerate(axes)]
    if isinstance(grid, (tuple, list)) and len(grid) == 0:
        raise ValueError("grid must be a 1-D array of points or a pair of 1-D axes, got an empty sequence")
    if np.ndim(grid) != 1:
        raise ValueError(
            f"grid must be a 1-D array of points (P = 1) or a pair of 1-D axes (P = 2), got an object with "
            f"{np.ndim(grid)} dimensions"
        )
    return [_grid_axis(grid, "grid")]


def _theta_point(theta, name: str, P: int) -> np.ndarray:
    """A point ``[P]`` (a scalar is accepted when P = 1), real floating and finite, as float64."""
    arr = finite(float_array(theta, name), name)
    if P == 1 and arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.shape != (P,):
        raise ValueError(f"{name} must have shape ({P},) to match the grid (P = {P}), got shape {arr.shape}")
    return arr.astype(np.float64)


def _call_losses(env_losses, theta: np.ndarray, what: str) -> np.ndarray:
    """Evaluate ``env_losses(theta[..., P]) -> [..., K]`` and validate the result."""
    out = env_losses(theta)
    arr = np.asarray(out)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == bool:
        raise TypeError(f"env_losses({what}) must return real numbers, got dtype {arr.dtype}")
    expected_prefix = theta.shape[:-1]
    if arr.ndim != len(expected_prefix) + 1 or arr.shape[:-1] != expected_prefix:
        raise ValueError(
            f"env_losses({what}) must return an array of shape {expected_prefix + ('K',)} for theta of shape "
            f"{theta.shape} (vectorised over the leading axes), got shape {arr.shape}"
        )
    if arr.shape[-1] == 0:
        raise ValueError(f"env_losses({what}) must return at least one environment (K >= 1), got K = 0")
    return finite(arr.astype(np.float64), f"env_losses({what})")


def _structure(P: int, connectivity) -> np.ndarray:
    if isinstance(connectivity, bool) or not isinstance(connectivity, numbers.Integral):
        raise TypeError(f"connectivity must be the integer 4 or 8, got {type(connectivity).__name__} {connectivity!r}")
    choice(int(connectivity), "connectivity", (4, 8))
    if P == 1:
        return np.ones(3, dtype=bool)  # neighbours in 1-D: the maximal run of consecutive points
    if connectivity == 8:
        return np.ones((3, 3), dtype=bool)
    return ndimage.generate_binary_structure(2, 1)


def inconsistency_on_grid(env_losses, theta_star, eps, grid, *, connectivity=8, warn=True) -> GridInconsistency:
    """Grid estimate of the inconsistency score I^eps(theta*) of eq. (1) for P = 1 or 2 parameters.

    For each environment e (N^eps_{e,theta*} as defined in paper §2.1):

    1. threshold the band ``|L_e(theta) - L_e(theta*)| <= eps`` on the grid points;
    2. label its connected components (``scipy.ndimage.label``): in 1-D a component is a maximal run of
       consecutive grid points (an interval); in 2-D grid points are neighbours under 8-connectivity (default,
       diagonal neighbours too) or 4-connectivity (``connectivity=4``);
    3. keep the component that contains the grid point nearest theta* (per axis), as N^eps_{e,theta*};
    4. for each e', ``pair_values[e, e'] = max |L_e'(theta) - L_e(theta*)|`` over that component and theta*
       itself (theta* belongs to N^eps_e by definition; including it makes the e = e' pairs and the
       sup exact at theta* even when theta* is not a grid point).

    ``value = max_{e, e'} pair_values[e, e']`` (ordered pairs, e = e' included, as eq. (1) is printed).

    The grid approximation, and how it can be wrong:

    - The sup over a continuum becomes a max over grid points of the component, so away from the boundary
      flag the estimate is *below* the true sup by up to the loss variation over one grid cell near the
      maximiser: refine the grid to tighten it.
    - N^eps_e can extend beyond the grid (unbounded along a flat direction of L_e, for example). Then the
      component reaches the grid edge, ``touches_boundary[e]`` is True, row e of ``pair_values`` is only a lower
      bound, ``is_lower_bound`` is True, and (with ``warn=True``) a ``GridBoundaryWarning`` names the
      environments. Enlarge the grid to see whether the value keeps growing (closed forms return inf there).
    - Connectivity is decided between grid points: two parts of the band separated by a gap narrower than a grid
      cell are merged (an over-estimate; e.g. the inner hole of an eps-shell around another environment's
      minimizer), and a neck of the band narrower than a cell can split a component (an under-estimate).
      8-connectivity keeps diagonal necks such as the band of ``|x y|`` near the axes; 4-connectivity does not.
    - The nearest grid point to theta* must itself lie in every band, otherwise there is no grid component to
      start from: a ValueError asks for a finer grid (or a larger eps).

    Args:
        env_losses: callable ``env_losses(theta)`` with ``theta`` float64 ``[..., P]`` returning the per-environment
            losses ``[..., K]`` (vectorised over the leading axes; it is called once on the whole grid and once on
            ``theta_star`` of shape ``[P]``). Values must be finite on the grid.
        theta_star: float ``[P]`` (a scalar when P = 1), inside the grid's bounding box; normally a point reached
            by the algorithm (a local minimizer of the pooled loss), but any point is allowed.
        eps: real > 0, the band half-width.
        grid: for P = 1 a 1-D array of points; for P = 2 a pair ``(axis0, axis1)`` of 1-D arrays (the grid is
            their ``meshgrid(..., indexing="ij")``). Axes: real floating, finite, strictly increasing, >= 2 points
            (non-uniform spacing is fine; neighbours are neighbours in index space).
        connectivity: 8 (default) or 4, used when P = 2 (ignored for P = 1).
        warn: emit ``GridBoundaryWarning`` when a component touches the grid edge (the flag is always set).

    Returns:
        ``GridInconsistency``.

    Raises:
        ValueError for eps <= 0, more than 2 axes (P > 2), a theta_star shape that does not match, theta_star
        outside the grid, non-finite values, ``env_losses`` returning the wrong shape or K = 0, and a grid too
        coarse around theta_star; TypeError for non-floating arrays or a non-integer connectivity.
    """
    eps = positive(eps, "eps")
    axes = _grid_axes(grid)
    P = len(axes)
    theta_star = _theta_point(theta_star, "theta_star", P)
    structure = _structure(P, connectivity)
    if not isinstance(warn, (bool, np.bool_)):
        raise TypeError(f"warn must be a bool, got {type(warn).__name__} {warn!r}")
    for i, (axis, x) in enumerate(zip(axes, theta_star)):
        if not axis[0] <= x <= axis[-1]:
            raise ValueError(
                f"theta_star[{i}] = {x} lies outside the grid's axis {i}, [{axis[0]}, {axis[-1]}]: the grid must "
                "contain theta_star"
            )

    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # [*S, P]
    shape = mesh.shape[:-1]
    losses = _call_losses(env_losses, mesh, "grid points")  # [*S, K]
    at_star = _call_losses(env_losses, theta_star, "theta_star")  # [K]
    K = at_star.shape[0]
    if losses.shape[-1] != K:
        raise ValueError(
            f"env_losses returned K = {losses.shape[-1]} environments on the grid but K = {K} at theta_star"
        )
    nearest = tuple(int(np.argmin(np.abs(axis - x))) for axis, x in zip(axes, theta_star))

    pair_values = np.empty((K, K))
    pair_argmax = np.empty((K, K, P))
    touches = np.zeros(K, dtype=bool)
    components = np.zeros((K, *shape), dtype=bool)
    for e in range(K):
        band = np.abs(losses[..., e] - at_star[e]) <= eps
        if not band[nearest]:
            raise ValueError(
                f"the grid point nearest theta_star, {mesh[nearest].tolist()}, is outside environment {e}'s "
                f"eps-band (|L_e - L_e(theta*)| = {abs(losses[nearest + (e,)] - at_star[e]):.6g} > eps = {eps}): "
                "the grid is too coarse around theta_star; refine it or increase eps"
            )
        labels, _ = ndimage.label(band, structure=structure)
        component = labels == labels[nearest]
        components[e] = component
        touches[e] = any(
            np.take(component, 0, axis=d).any() or np.take(component, -1, axis=d).any() for d in range(P)
        )
        points = mesh[component]  # [n_e, P]
        for e2 in range(K):
            deviation = np.abs(losses[..., e2][component] - at_star[e])
            j = int(np.argmax(deviation))
            at_theta_star = abs(at_star[e2] - at_star[e])
            if at_theta_star > deviation[j]:
                pair_values[e, e2], pair_argmax[e, e2] = at_theta_star, theta_star
            else:
                pair_values[e, e2], pair_argmax[e, e2] = deviation[j], points[j]

    flat = int(np.argmax(pair_values))
    e, e2 = divmod(flat, K)
    if warn and touches.any():
        warnings.warn(
            f"the component N^eps of environment(s) {np.flatnonzero(touches).tolist()} reaches the edge of the grid: "
            "the true component may extend beyond it, so the grid value is only a lower bound of I^eps "
            "(enlarge the grid; is_lower_bound is set)",
            GridBoundaryWarning,
            stacklevel=2,
        )
    return GridInconsistency(
        value=float(pair_values[e, e2]),
        pair=(e, e2),
        argmax=pair_argmax[e, e2].copy(),
        pair_values=pair_values,
        pair_argmax=pair_argmax,
        touches_boundary=touches,
        is_lower_bound=bool(touches.any()),
        components=components,
        losses_at_theta_star=at_star,
        nearest_index=nearest,
        eps=eps,
    )


def inconsistency_1d_interval(env_losses, theta_star, eps, lo, hi, n, *, warn=True) -> GridInconsistency:
    """``inconsistency_on_grid`` for P = 1 on the uniform grid ``numpy.linspace(lo, hi, n)``.

    In 1-D, N^eps_{e,theta*} is the largest interval around theta* inside the band; on the grid it
    is the maximal run of consecutive band points through the point nearest theta*. ``lo < hi`` finite reals,
    ``n >= 2`` an integer; ``theta_star`` a scalar or ``[1]`` in [lo, hi]. See ``inconsistency_on_grid``.
    """
    lo = real_number(lo, "lo")
    hi = real_number(hi, "hi")
    if not lo < hi:
        raise ValueError(f"lo must be < hi, got lo = {lo}, hi = {hi}")
    n = integer(n, "n", low=2)
    return inconsistency_on_grid(env_losses, theta_star, eps, np.linspace(lo, hi, n), warn=warn)


# ----------------------------------------------------------------------------------------------------------------
# ILC by Monte Carlo  [paper §2.1, eq. (2)]
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ILCEstimate:
    """Result of ``ilc_monte_carlo``.

    Attributes:
        value: ``-mean(scores)``, the Monte-Carlo estimate of ILC(A, p(theta0)); ``-inf`` if any score is inf.
        stderr: ``std(scores, ddof=1) / sqrt(n)``; ``inf`` when n = 1 (no spread can be estimated) or when a
            score is inf; exactly 0 when all scores are identical.
        n: number of samples.
        scores: float64 ``[n]``, the I^eps of each run's limit point, in sampling order.
    """

    value: float
    stderr: float
    n: int
    scores: np.ndarray

    def confidence_interval(self, z: float = 1.96) -> tuple[float, float]:
        """``(value - z stderr, value + z stderr)``, the normal-approximation interval."""
        z = positive(z, "z")
        return (self.value - z * self.stderr, self.value + z * self.stderr)


def _score(result, i: int) -> float:
    value = result.value if hasattr(result, "value") else result
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray)):
        raise TypeError(
            f"inconsistency must return a real number (or an object with a .value such as GridInconsistency); "
            f"run {i} returned {type(result).__name__}"
        )
    value = float(np.asarray(value, dtype=np.float64).reshape(()))  # ValueError for non-scalars
    if math.isnan(value):
        raise ValueError(f"inconsistency returned NaN for run {i}")
    if value < 0:
        raise ValueError(f"inconsistency must be >= 0 (eq. (1) is a max of absolute values), run {i} gave {value}")
    return value


def ilc_monte_carlo(algorithm, sample_init, inconsistency, n_samples, rng) -> ILCEstimate:
    """Monte-Carlo estimate of the Invariant Learning Consistency, eq. (2)::

        ILC(A, p(theta0)) = - E_{theta0 ~ p} [ I^eps( A^inf(theta0, E) ) ]

    For ``i = 1..n_samples``: ``theta0 = sample_init(rng)``, ``limit = algorithm(theta0)``,
    ``score_i = inconsistency(limit)``. Returns ``value = -mean(score)`` and ``stderr = std(score, ddof=1) /
    sqrt(n)``. The mean and standard deviation are computed after subtracting ``score_1`` (a shifted, exact
    algorithm for identical scores): when A^inf does not depend on theta0 (GD on a strictly convex quadratic
    reaches its unique minimizer from every theta0), ILC = -I^eps(theta*) exactly and stderr is exactly 0.

    An infinite score (an unbounded component, Remark 2) makes the estimate ``-inf`` and ``stderr`` inf: the
    expectation is then -inf whenever such limits have positive probability; the finite scores stay readable in
    ``scores``. With ``n_samples = 1`` stderr is inf.

    Args:
        algorithm: callable ``theta0 -> theta_limit`` (e.g. ``lambda t: gradient_descent(oracle, t, eta, n)``).
        sample_init: callable ``rng -> theta0``, a draw from p(theta0).
        inconsistency: callable ``theta -> I^eps(theta)`` returning a real >= 0, or an object with a ``value``
            attribute (such as ``GridInconsistency``), e.g. ``lambda t: inconsistency_on_grid(f, t, eps, grid)``.
        n_samples: integer >= 1.
        rng: ``numpy.random.Generator`` (or an integer seed for ``numpy.random.default_rng``), passed to
            ``sample_init``.

    Raises:
        TypeError for non-callables, a bad rng or non-numeric scores; ValueError for n_samples < 1, NaN or
        negative scores.
    """
    for name, f in (("algorithm", algorithm), ("sample_init", sample_init), ("inconsistency", inconsistency)):
        if not callable(f):
            raise TypeError(f"{name} must be callable, got {type(f).__name__}")
    n = integer(n_samples, "n_samples", low=1)
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        rng = np.random.default_rng(int(rng))
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or an integer seed, got {type(rng).__name__}")

    scores = np.array([_score(inconsistency(algorithm(sample_init(rng))), i) for i in range(n)], dtype=np.float64)
    if np.isinf(scores).any():
        return ILCEstimate(value=-math.inf, stderr=math.inf, n=n, scores=scores)
    shifted = scores - scores[0]
    mean_shift = float(shifted.mean())
    value = -(float(scores[0]) + mean_shift)
    if n == 1:
        return ILCEstimate(value=value, stderr=math.inf, n=n, scores=scores)
    spread = float(np.sqrt(np.sum((shifted - mean_shift) ** 2) / (n - 1)))
    return ILCEstimate(value=value, stderr=spread / math.sqrt(n), n=n, scores=scores)


# ----------------------------------------------------------------------------------------------------------------
# Algorithms on per-environment gradient oracles: the "A" of eq. (2)  [paper §2.2-2.3]
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GDTrajectory:
    """Trajectory of ``gradient_descent(..., return_trajectory=True)`` (n = steps taken, P parameters).

    Attributes:
        theta: float64 ``[P]``, the final point ``thetas[-1]``.
        thetas: float64 ``[n + 1, P]``, ``theta^0 .. theta^n``.
        directions: float64 ``[n, P]``, the aggregated gradient used at each step (for the AND-mask this is
            ``m ⊙ grad L(theta^i)``, the quantity of Proposition 1).
        masks: ``[n, P]``, the rule's mask at each step (bool; float64 for the SAND-mask).
        converged: whether a step norm fell to ``tol`` or below.
        n_steps: n.
    """

    theta: np.ndarray
    thetas: np.ndarray
    directions: np.ndarray
    masks: np.ndarray
    converged: bool
    n_steps: int


def _gradient_stack_at(env_gradients, theta: np.ndarray, step: int) -> np.ndarray:
    G = np.asarray(env_gradients(theta))
    if not np.issubdtype(G.dtype, np.floating):
        raise TypeError(f"env_gradients must return a real floating array G[K, P], got dtype {G.dtype} at step {step}")
    if G.ndim != 2 or G.shape[1] != theta.shape[0] or G.shape[0] == 0:
        raise ValueError(
            f"env_gradients must return G[K, P] with K >= 1 and P = {theta.shape[0]}, got shape {G.shape} at step "
            f"{step}"
        )
    if not np.isfinite(G).all():
        raise ValueError(
            f"env_gradients returned non-finite gradients at step {step} (theta = {theta.tolist()}): the iteration "
            "diverged or the oracle is undefined there; lower eta"
        )
    return G.astype(np.float64)


def _l2_norm(v: np.ndarray) -> float:
    """Euclidean norm, scaled by max|v| so that it neither underflows (tiny steps read as 0 would end GD too
    early with tol = 0) nor overflows."""
    scale = float(np.abs(v).max()) if v.size else 0.0
    if scale == 0.0:
        return 0.0
    return scale * float(np.sqrt(np.sum((v / scale) ** 2)))


def gradient_descent(
    env_gradients,
    theta0,
    eta,
    n_steps,
    rule="mean",
    tau=None,
    tol=1e-12,
    *,
    flavour=None,
    return_trajectory=False,
):
    """Full-batch gradient descent with an aggregation rule on a per-environment gradient oracle (paper §2.3)::

        (d^i,), (m^i,) = rules.aggregate([env_gradients(theta^i)], rules.RuleSpec(rule, tau, flavour))
        theta^{i+1}     = theta^i - eta * d^i

    - ``rule="mean"``: plain GD on the pooled loss L = mean_e L_e (d = grad L);
    - ``rule="and_mask"``: AND-masked GD, d = m_tau ⊙ grad L with the canonical threshold rule (``tau`` None
      means 0), the update of Proposition 1;
    - ``rule="geometric_mean"``: GD on the elementwise signed geometric mean of the gradients (paper §2.2-2.3,
      ``flavour="paper"`` by default: 0 unless all K signs agree).
    - ``rule="sand_mask"`` is accepted too (``rules.sand_masked_mean``). No rescaling.

    Convergence: stops after the first step with ``||eta d^i||_2 <= tol`` (that step is applied; ``tol = 0``
    stops only on an exactly zero step, e.g. a coordinate frozen by the AND-mask), or after ``n_steps`` steps.
    These are the algorithms A of eq. (2): ``A^inf(theta0)`` is approximated by the returned point.

    Args:
        env_gradients: callable ``theta[P] -> G[K, P]`` (float64 in, real floating out, finite).
        theta0: float ``[P]``, finite, P >= 1.
        eta: learning rate, real > 0.
        n_steps: maximum number of steps, integer >= 0.
        rule, tau, flavour: a ``rules.RuleSpec`` (validated before the first step).
        tol: real >= 0.
        return_trajectory: False (default) returns the final theta; True returns a ``GDTrajectory``.

    Returns:
        float64 ``[P]`` (the final theta), or ``GDTrajectory``. When only theta is returned and the step budget
        ran out before convergence, a ``ConvergenceWarning`` says so (with the trajectory, read ``converged``).

    Raises:
        TypeError / ValueError for bad arguments (named), a malformed oracle output, or a divergent iteration
        (non-finite theta or gradients).
    """
    if not callable(env_gradients):
        raise TypeError(f"env_gradients must be callable, got {type(env_gradients).__name__}")
    theta = finite(float_array(theta0, "theta0"), "theta0")
    if theta.ndim != 1 or theta.size == 0:
        raise ValueError(f"theta0 must have shape [P] with P >= 1, got shape {theta.shape}")
    theta = theta.astype(np.float64)
    eta = positive(eta, "eta")
    n_steps = integer(n_steps, "n_steps", low=0)
    spec = rules.RuleSpec(rule, tau, flavour)
    tol = positive(tol, "tol", allow_zero=True)
    if not isinstance(return_trajectory, (bool, np.bool_)):
        raise TypeError(f"return_trajectory must be a bool, got {type(return_trajectory).__name__}")

    thetas, directions, masks = [theta], [], []
    converged = False
    for i in range(n_steps):
        G = _gradient_stack_at(env_gradients, theta, i)
        (d,), (m,) = rules.aggregate([G], spec)
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below, not as a warning
            step = eta * d
            theta = theta - step
        if not np.isfinite(theta).all():
            raise ValueError(f"gradient descent diverged at step {i} (theta is no longer finite); lower eta")
        thetas.append(theta)
        directions.append(d)
        masks.append(m)
        if _l2_norm(step) <= tol:
            converged = True
            break

    if not return_trajectory:
        if not converged:
            warnings.warn(
                f"gradient_descent stopped after n_steps = {n_steps} steps without a step norm <= tol = {tol}; the "
                "returned point approximates A^inf only roughly (raise n_steps or tol)",
                ConvergenceWarning,
                stacklevel=2,
            )
        return theta
    P = theta.shape[0]
    return GDTrajectory(
        theta=theta,
        thetas=np.array(thetas),
        directions=np.array(directions).reshape(-1, P),
        masks=np.array(masks).reshape(-1, P),
        converged=converged,
        n_steps=len(directions),
    )


# ----------------------------------------------------------------------------------------------------------------
# Proposition 1  [paper §2.3, App. A.3]
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prop1Check:
    """Both sides of Proposition 1's checkable inequality ``lhs <= rhs`` and whether it holds."""

    lhs: float
    rhs: float
    holds: bool


def prop1_check(masked_grad_sq_norms, L0, L_inf, eta, k) -> Prop1Check:
    """Proposition 1 (AND-masked GD converges; paper §2.3, App. A.3) in a checkable form (inf L for the proof's 0)::

        min_{i < k} ||m(theta^i) ⊙ grad L(theta^i)||^2  <=  2 (L(theta^0) - inf L) / (eta k)

    valid for any binary mask when grad L is Lip-Lipschitz and ``eta <= 1/Lip`` (the descent lemma gives
    ``L(theta^{i+1}) <= L(theta^i) - (eta/2) ||m ⊙ grad L(theta^i)||^2``; telescoping over k steps). The paper
    prints ``2 L(theta^0) / (eta k)`` using L >= 0; ``L(theta^0) - inf L`` is the sharper form.

    Args:
        masked_grad_sq_norms: float ``[n]``, ``||m ⊙ grad L(theta^i)||^2`` for i = 0..n-1 (e.g. the squared row
            norms of ``GDTrajectory.directions`` with ``rule="and_mask"``), finite, >= 0, n >= k.
        L0: ``L(theta^0)``; L_inf: ``inf L`` (or any lower bound of it, e.g. 0), finite, ``L_inf <= L0``.
        eta: the step size, > 0. k: number of iterations, integer >= 1.

    Returns:
        ``Prop1Check(lhs, rhs, holds)`` with ``holds = lhs <= rhs``.
    """
    norms = finite(float_array(masked_grad_sq_norms, "masked_grad_sq_norms"), "masked_grad_sq_norms")
    if norms.ndim != 1:
        raise ValueError(f"masked_grad_sq_norms must be 1-D [n], got shape {norms.shape}")
    if (norms < 0).any():
        raise ValueError(f"masked_grad_sq_norms must be >= 0 (squared norms), got min {norms.min()}")
    L0 = real_number(L0, "L0")
    L_inf = real_number(L_inf, "L_inf")
    if L_inf > L0:
        raise ValueError(f"L_inf must be <= L0 (a lower bound of the loss), got L_inf = {L_inf} > L0 = {L0}")
    eta = positive(eta, "eta")
    k = integer(k, "k", low=1)
    if norms.shape[0] < k:
        raise ValueError(f"k must be <= len(masked_grad_sq_norms) = {norms.shape[0]}, got k = {k}")
    lhs = float(norms[:k].min())
    rhs = 2.0 * (L0 - L_inf) / (eta * k)
    return Prop1Check(lhs=lhs, rhs=rhs, holds=lhs <= rhs)


# ----------------------------------------------------------------------------------------------------------------
# Proposition 2: the AND-mask on random gradients  [paper §2.3, App. A.4, eq. (4), Fig. 4]
# ----------------------------------------------------------------------------------------------------------------


def _binomial_half_pmf(K: int) -> np.ndarray:
    """``P[p = u]`` for ``p ~ Binomial(K, 1/2)``, u = 0..K (float64 ``[K + 1]``)."""
    return binom.pmf(np.arange(K + 1), K, 0.5)


def _kept_mass(K: int, kept: np.ndarray) -> float:
    """``sum_u 1[kept_u] P[p = u]`` for p ~ Binomial(K, 1/2): exactly 1.0 when every u is kept, never above 1."""
    if kept.all():
        return 1.0
    return min(1.0, float(_binomial_half_pmf(K)[kept].sum()))


def _count_t(t, K: int, *, low: int = 0) -> int:
    return integer(t, "t", low=low, high=K)


def keep_probability_count(K, t) -> float:
    """Probability that the count-form AND-mask keeps a component of random gradients (paper eq. (4), corrected).

    With i.i.d. symmetric continuous gradients (no exact zeros) the number p of positive signs among K
    environments is Binomial(K, 1/2), and the count form keeps iff ``max(p, K - p) >= t``::

        P[m_t = 1] = sum_{u=0}^{K} 1[max(u, K - u) >= t] C(K, u) 2^{-K}

    Each u is counted once, so this is right for every t, including t = K/2 (where the printed eq. (4)
    double-counts u = K/2, see ``keep_probability_eq4_printed``) and t <= K/2 (probability 1). For t > K/2 it
    equals ``2^{1-K} sum_{k=t}^{K} C(K, k)``.

    ``K``: integer >= 1; ``t``: integer in [0, K]. Returns a float in [0, 1].
    """
    K = integer(K, "K", low=1)
    t = _count_t(t, K)
    u = np.arange(K + 1)
    return _kept_mass(K, np.maximum(u, K - u) >= t)


def keep_probability_eq4_printed(K, t) -> float:
    """Eq. (4) exactly as printed in App. A.4: ``P[m_t = 1] = 2 * 2^{-K} sum_{k=t}^{K} C(K, k)``.

    It adds ``P[p >= t]`` and ``P[p <= K - t]``, which are disjoint only when t > K/2. For t > K/2 it equals
    ``keep_probability_count``; at t = K/2 (even K, the lower end of §2.3's range of t) the two sums both hold
    u = K/2, so it exceeds the true keep probability by ``C(K, K/2) 2^{-K}`` (and is > 1 for K = 2). [ERRATUM in
    App. A.4.]

    ``K``: integer >= 1; ``t``: integer with K/2 <= t <= K (the paper's range). Returns a float.
    """
    K = integer(K, "K", low=1)
    t = _count_t(t, K, low=(K + 1) // 2)
    return float(2.0 * _binomial_half_pmf(K)[t:].sum())


def keep_probability_threshold(K, tau) -> float:
    """Probability that the canonical threshold AND-mask keeps a component of random gradients.

    The canonical rule (``rules.agreement_threshold_count``) keeps iff ``|S| >= ceil(tau K - 1e-9)``; without
    exact zeros ``S = 2p - K`` with p ~ Binomial(K, 1/2)::

        P[m_tau = 1] = sum_{p=0}^{K} 1[|2p - K| >= ceil(tau K - 1e-9)] C(K, p) 2^{-K}

    ``K``: integer >= 1; ``tau``: real in [0, 1]. Returns a float in [0, 1] (1 at tau = 0).
    """
    K = integer(K, "K", low=1)
    T = rules.agreement_threshold_count(tau, K)
    p = np.arange(K + 1)
    return _kept_mass(K, np.abs(2 * p - K) >= T)


def _prop2_args(P, K, sigma) -> tuple[int, int, float]:
    return integer(P, "P", low=1), integer(K, "K", low=1), positive(sigma, "sigma")


def expected_sq_norm_mean(P, K, sigma) -> float:
    """``E ||gbar||^2 = P sigma^2 / K`` for K i.i.d. gradients g_e ~ N(0, sigma^2 I_P) (Prop. 2, App. A.4).

    ``P, K``: integers >= 1; ``sigma``: real > 0.
    """
    P, K, sigma = _prop2_args(P, K, sigma)
    return P * sigma**2 / K


def expected_sq_norm_masked(P, K, sigma, tau) -> float:
    """Exact ``E ||m_tau ⊙ gbar||^2`` for K i.i.d. gradients g_e ~ N(0, sigma^2 I_P) (derived; the paper bounds it).

    Given p positive signs, the magnitudes are i.i.d. half-normal and independent of the signs
    (E|g| = sigma sqrt(2/pi), E g^2 = sigma^2), so with ``gbar = (1/K) sum_e g_e``::

        E[gbar_j^2 | p] = sigma^2 [ (1 - 2/pi)/K + (2/pi) (2p - K)^2 / K^2 ]
        E||m_tau ⊙ gbar||^2 = P sum_{p=0}^{K} 1[|2p - K| >= ceil(tau K - 1e-9)] C(K, p) 2^{-K} E[gbar_j^2 | p]

    with the canonical threshold rule. tau = 0 gives ``P sigma^2 / K``. Paper.md's table (P = 3000, sigma = 1,
    t = 0.8 K i.e. tau = 0.6): 99.96 (K = 10), 9.54 (K = 20), 0.137 (K = 40), 7.96e-7 (K = 100).

    ``P, K``: integers >= 1; ``sigma``: real > 0; ``tau``: real in [0, 1].
    """
    P, K, sigma = _prop2_args(P, K, sigma)
    T = rules.agreement_threshold_count(tau, K)
    p = np.arange(K + 1)
    conditional = sigma**2 * ((1 - 2 / math.pi) / K + (2 / math.pi) * (2 * p - K) ** 2 / K**2)
    kept = np.abs(2 * p - K) >= T
    return float(P * np.sum(_binomial_half_pmf(K)[kept] * conditional[kept]))


def _prop2_bound(P, K, sigma, t, n_terms) -> float:
    """``sigma^2 P n_terms(K, t) C(K, t) 2^{-(K-1)}`` with ``C(K, t) 2^{1-K} = 2 * Binomial(K, 1/2).pmf(t)``."""
    return float(sigma**2 * P * n_terms * 2.0 * binom.pmf(t, K, 0.5))


def prop2_bound_printed(P, K, sigma, t) -> float:
    """Proposition 2's bound as printed (App. A.4): ``E||m_t ⊙ gbar||^2 <= sigma^2 P (K - t) C(K, t) 2^{-(K-1)}``.

    [ERRATUM] The proof sums from p = t to K, which has K - t + 1 terms, not K - t: the printed
    bound is 0 at t = K while the true value is positive (K = 10, P = 3000, sigma = 1: exact 3.94). It is also
    smaller than the truth elsewhere whenever the lost term matters. Use ``prop2_bound_corrected``.

    ``P, K``: integers >= 1; ``sigma`` > 0; ``t``: integer with K/2 <= t <= K.
    """
    P, K, sigma = _prop2_args(P, K, sigma)
    t = _count_t(t, K, low=(K + 1) // 2)
    return _prop2_bound(P, K, sigma, t, K - t)


def prop2_bound_corrected(P, K, sigma, t) -> float:
    """Proposition 2's bound with the term count corrected: ``sigma^2 P (K - t + 1) C(K, t) 2^{-(K-1)}``.

    Valid for the count-form mask m_t with K/2 <= t <= K: ``E[gbar_j^2 | p] <= sigma^2`` and ``C(K, p) <= C(K, t)``
    for p >= t >= K/2 (at t = K/2 the two-sided sum double-counts p = K/2, which only loosens the bound).
    Decays like ``P (q/2)^K`` up to polynomial factors for fixed t/K > 1/2 (Prop. 2's c = 2/q; App. A.4 prints
    the rate as O(n/(2-q)^d)).

    ``P, K``: integers >= 1; ``sigma`` > 0; ``t``: integer with K/2 <= t <= K.
    """
    P, K, sigma = _prop2_args(P, K, sigma)
    t = _count_t(t, K, low=(K + 1) // 2)
    return _prop2_bound(P, K, sigma, t, K - t + 1)


# ----------------------------------------------------------------------------------------------------------------
# The two-sigmoid toy  [paper §2.1, App. A.1, Fig. 10]
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwoSigmoidBound:
    """Result of ``two_sigmoid_inconsistency_lower_bound``.

    Attributes:
        lower_bound: ``|L_B(theta~*) - L_A(theta*)|``, a lower bound of I^eps(theta*).
        max_abs_delta_L_A: ``max over the segment of |L_A(theta) - L_A(theta*)|`` (exact for the quadratic in
            theta6, see the function), which is <= eps.
        theta6_vertex: the unconstrained minimiser of L_A along theta6 (inf if L_A does not depend on it).
        L_A_star, L_B_star, L_A_tilde, L_B_tilde: the losses at theta* and theta~*.
        theta2, eps: the inputs.
    """

    lower_bound: float
    max_abs_delta_L_A: float
    L_A_star: float
    L_B_star: float
    L_A_tilde: float
    L_B_tilde: float
    theta6_vertex: float
    theta2: float
    eps: float


def two_sigmoid_inconsistency_lower_bound(theta2=-50.0, eps=1e-6, n_grid=10_000) -> TwoSigmoidBound:
    """The App. A.1 argument that the patchwork fit theta* is very inconsistent, as a checked lower bound.

    theta* = (100, theta2, 100, -75, 1, 1), theta~* = theta* with theta6 = -0.5 (``data.two_sigmoid_theta_*``).
    The segment S = {theta*(theta6) : theta6 in [-0.5, 1]} is connected and contains theta*; if
    ``|L_A(theta) - L_A(theta*)| <= eps`` on all of S, then S lies in N^eps_{A,theta*}, and eq. (1) with the pair
    (A, B) gives (corrected: App. A.1 prints it reversed)::

        I^eps(theta*) >= |L_B(theta~*) - L_A(theta*)|      (~ 1.0623 - 0.04609 = 1.0162 for theta2 = -50)

    Checking S in the band exactly: f_theta is affine in theta6, so L_A restricted to S is a convex quadratic
    ``q(theta6)``. Its largest deviation from ``q(1) = L_A(theta*)`` on [-0.5, 1] is at the endpoint -0.5 (the
    max of q) or at q's minimiser on the segment, the vertex ``theta6_v = -mean(r s) / mean(s^2)`` clipped to
    [-0.5, 1] (on A's grid, ``s = sigmoid(theta3 x + theta4)`` and ``r = f_theta(x)|_{theta6=0} - f*(x)``, both
    from ``data.two_sigmoid_model``). For theta2 = -50 or -45 the vertex lies far outside (|theta6_v| ~ 1e10:
    s ~ 1e-11 on A), so the maximum is the endpoint's 4.9e-13. All losses are
    ``data.two_sigmoid_env_losses`` (midpoint grids of ``n_grid`` points per environment).

    Args:
        theta2: the text's -50 (default) or Fig. 10's -45 (the two disagree), a finite real.
        eps: band half-width, real > 0.
        n_grid: grid points per environment, integer >= 1.

    Returns:
        ``TwoSigmoidBound``.

    Raises:
        ValueError if L_A leaves the eps-band on the segment (then the segment is not inside N_A and the
        argument gives nothing; the message states the smallest eps for which it works).
    """
    theta2 = real_number(theta2, "theta2")
    eps = positive(eps, "eps")
    n_grid = integer(n_grid, "n_grid", low=1)
    theta_star = two_sigmoid_theta_star(theta2)
    theta_tilde = two_sigmoid_theta_tilde(theta2)
    L_A_star, L_B_star = two_sigmoid_env_losses(theta_star, n_grid)
    L_A_tilde, L_B_tilde = two_sigmoid_env_losses(theta_tilde, n_grid)

    x = two_sigmoid_env_grid("A", n_grid)
    theta0, theta1 = theta_star.copy(), theta_star.copy()
    theta0[5], theta1[5] = 0.0, 1.0
    f0 = two_sigmoid_model(theta0, x)
    s = two_sigmoid_model(theta1, x) - f0  # the coefficient of theta6: sigmoid(theta3 x + theta4)
    r = f0 - two_sigmoid_target(x)
    curvature = float(np.mean(s * s))
    vertex = -float(np.mean(r * s)) / curvature if curvature > 0 else math.inf
    theta_v = theta_star.copy()
    theta_v[5] = min(max(vertex, -0.5), 1.0)  # the minimiser of L_A on the segment
    L_A_min = two_sigmoid_env_losses(theta_v, n_grid)[0]
    max_delta = max(abs(L_A_tilde - L_A_star), abs(L_A_min - L_A_star))
    if max_delta > eps:
        raise ValueError(
            f"eps = {eps} is too small for the App. A.1 argument: L_A moves by up to {max_delta:.3g} on the segment "
            f"theta6 in [-0.5, 1], so the segment is not inside N^eps_A; use eps >= {max_delta:.3g}"
        )
    return TwoSigmoidBound(
        lower_bound=abs(L_B_tilde - L_A_star),
        max_abs_delta_L_A=max_delta,
        L_A_star=L_A_star,
        L_B_star=L_B_star,
        L_A_tilde=L_A_tilde,
        L_B_tilde=L_B_tilde,
        theta6_vertex=vertex,
        theta2=theta2,
        eps=eps,
    )
