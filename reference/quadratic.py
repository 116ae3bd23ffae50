"""Quadratic environments, means of Hessians and the exact inconsistency score (paper §2.2, App. A.2).

The quadratic model of "Learning Explanations That Are Hard To Vary" (Parascandolo et al., ICLR 2021), extended
to K environments, unequal offsets and different minimizers (the paper treats two environments with a common
minimizer)::

    L_e(theta) = c_e + 1/2 (theta - mu_e)^T H_e (theta - mu_e),      e = 1..K,  theta in R^P,  H_e PSD,

with the pooled loss ``L = (1/K) sum_e L_e``, the unweighted mean over environments (paper §2). This module offers

- :class:`QuadraticProblem`: the K losses, their gradients, the pooled loss and its minimizer;
- means of Hessians (paper §2.2, App. A.2): the arithmetic mean ``H^+``, the elementwise geometric
  mean of diagonal or commuting Hessians ``H^∧``, the two-matrix geometric mean ``A # B``, the Karcher mean, and
  the determinant ratio ``det H^+ / det H^∧`` of Prop. 3 and Figs. 3 and 12;
- the exact inconsistency score ``I^eps(theta*)`` of eq. (1) (:func:`inconsistency_score`): closed forms for a
  common minimizer (App. A.2's proof, extended to K environments, full Hessians and unequal offsets) and the
  trust-region route of ``trust_region.band_extremes`` for different minimizers, which have no closed form;
- Prop. 3's bound as printed (2 eps, FALSE in general) and corrected (4 eps) (paper §2.2, App. A.2);
- closed-form trajectories of gradient descent on the pooled loss and of geometric-mean gradient descent
  (paper §2.2 "From Hessians to gradients", footnotes 7-8).

Eq. (1) is used as printed (paper §2.1)::

    I^eps(theta*) = max_{(e, e') in E^2}  sup_{theta in N^eps_{e,theta*}}  | L_e'(theta) - L_e(theta*) |

over ordered pairs including e = e', with ``N^eps_{e,theta*}`` the connected component containing theta* of the
band ``{theta : |L_e(theta) - L_e(theta*)| <= eps}``.

Tolerances
----------
Hessians given as full matrices ``[K, P, P]`` carry rounding, so three relative tolerances decide their structure
(``scale`` is ``max |H_e|`` entrywise for symmetry and the largest |eigenvalue| of ``H_e`` otherwise):

- ``SYMMETRY_RTOL``: ``max |H_e - H_e^T| <= SYMMETRY_RTOL * scale``, else ValueError; the matrix is then
  replaced by ``(H_e + H_e^T) / 2`` (exactly ``H_e`` when it is symmetric).
- ``PSD_RTOL``: an eigenvalue below ``-PSD_RTOL * scale`` makes ``H_e`` indefinite (ValueError reporting it).
- ``RANK_RTOL``: eigenvalues ``lam <= RANK_RTOL * scale`` (the small negative ones accepted above included) are
  *flat* directions, the null space of ``H_e``. So curvatures down to 1e-12 of an environment's largest one
  count as curvature (nearly singular Hessians keep finite, large scores), and smaller ones as exactly flat.
  The same tolerances as ``trust_region``, so that both modules agree on which pairs are infinite.

Diagonal Hessians given as ``[K, P]`` are their own eigenvalues, exactly: their entries must be >= 0 and the
closed forms treat only exact zeros as flat (the trust-region route for different minimizers applies
``RANK_RTOL`` to them too, as ``trust_region`` does). Matrices ``[K, P, P]`` whose off-diagonal entries are all
exactly 0 are treated the same way (``QuadraticProblem.diagonal``), with diagonal entries inside the tolerance
band below 0 set to 0.

Zero-curvature conventions (the paper only says lam >= 0)
--------------------------------------------------------
=============================================  ==============================================================
case                                           outcome
=============================================  ==============================================================
lam^e_i = 0 < lam^e'_i (diagonal)              pair (e, e') is +inf: N_e is unbounded along i (Remark 2)
lam^e_i = lam^e'_i = 0                         ratio 0/0 -> 0: the direction is flat for both
null(H_e) not inside null(H_e') (full)         pair (e, e') is +inf; direction: a null vector d of H_e with
                                               d^T H_e' d > 0
null(H_e) inside null(H_e')                    both restricted to range(H_e): finite
H_e = 0, pair (e, e)                           0 (L_e is constant), direction None
K = 1                                          eps (0 when H = 0)
Prop. 3 bound, one of lamA_i, lamB_i is 0      +inf
Prop. 3 bound, lamA_i = lamB_i = 0             None (0/0, undefined), or drop i with ``drop_flat=True``
determinant ratio, GM singular, AM not         +inf
determinant ratio, AM singular                 None (0/0, undefined: a direction flat in every environment)
=============================================  ==============================================================

Bad input raises ``TypeError`` (bool, complex, object or string arrays; non-real scalars) or ``ValueError``
(shape, range, non-finite entries, asymmetric or indefinite Hessians), naming the argument and the environment
(see ``validate``). Integer arrays are accepted and converted to float64; everything is computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.linalg

from .validate import finite, float_array, integer, positive

#: Largest accepted asymmetry of a Hessian, relative to its largest entry.
SYMMETRY_RTOL = 1e-10

#: Largest ``-lambda_min(H_e) / max|lambda(H_e)|`` accepted as positive semidefinite (rounding).
PSD_RTOL = 1e-10

#: Eigenvalues at most this times an environment's largest |eigenvalue| are flat (0): the null space of H_e.
RANK_RTOL = 1e-12

#: Largest accepted commutator ``||H_i H_j - H_j H_i||_F``, relative to ``||H_i||_F ||H_j||_F``, for matrices
#: treated as commuting (co-diagonalizable).
COMMUTE_RTOL = 1e-8


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------------


def _real_array(x, name: str) -> np.ndarray:
    """``x`` as a float64 array: integer and real floating dtypes are accepted, bool/complex/object are not."""
    arr = np.asarray(x)
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    return float_array(arr, name).astype(np.float64, copy=False)


def _finite_real_array(x, name: str, shape_text: str, ndims: tuple[int, ...]) -> np.ndarray:
    arr = _real_array(x, name)
    if arr.ndim not in ndims:
        raise ValueError(f"{name} must have shape {shape_text}, got shape {arr.shape}")
    return finite(arr, name)


def _flat(eigenvalues: np.ndarray) -> np.ndarray:
    """Mask of the eigenvalues of one PSD matrix that count as 0: ``lam <= RANK_RTOL * max |lam|``."""
    scale = np.max(np.abs(eigenvalues)) if eigenvalues.size else 0.0
    return eigenvalues <= RANK_RTOL * scale


def _check_symmetric(H_e: np.ndarray, label: str) -> None:
    asymmetry = float(np.max(np.abs(H_e - H_e.T)))
    scale = float(np.max(np.abs(H_e)))
    if asymmetry > SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{label} must be symmetric: max |H - H^T| = {asymmetry:.3g} exceeds {SYMMETRY_RTOL:g} * max |H| "
            f"= {SYMMETRY_RTOL * scale:.3g}"
        )


def _check_psd(eigenvalues: np.ndarray, label: str) -> None:
    scale = float(np.max(np.abs(eigenvalues)))
    smallest = float(eigenvalues[0])
    if smallest < -PSD_RTOL * scale:
        raise ValueError(
            f"{label} must be positive semidefinite, but its smallest eigenvalue is {smallest:.6g} "
            f"(below -{PSD_RTOL:g} * {scale:.6g}, the tolerance relative to its largest |eigenvalue|)"
        )


def _check_diagonal_entries(lams: np.ndarray, name: str, labels=None) -> None:
    if (lams < 0).any():
        e, i = (int(j) for j in np.argwhere(lams < 0)[0])
        entry = f"{name}[{e}, {i}]" if labels is None else f"{labels[e]}[{i}]"
        raise ValueError(f"{name} must hold diagonal Hessians with entries >= 0, but {entry} = {lams[e, i]}")


class _Hessians(NamedTuple):
    H: np.ndarray  # [K, P, P] float64, symmetric
    diagonal: bool  # all off-diagonal entries exactly 0
    eigenvalues: np.ndarray | None  # [K, P] ascending (None when diagonal)
    eigenvectors: np.ndarray | None  # [K, P, P], columns (None when diagonal)


def _hessian_stack(hessians, name: str = "hessians", labels=None) -> _Hessians:
    """Validate a stack of Hessians: ``[K, P, P]`` symmetric PSD or ``[K, P]`` nonnegative diagonals, K, P >= 1.

    Full matrices are symmetrised and eigendecomposed once (scipy.linalg.eigh); the decomposition is returned so
    that callers reuse it. Exactly diagonal matrices skip the decomposition: their diagonal is their spectrum.
    Errors name environment e as ``name[e]``, or ``labels[e]`` when given.
    """
    label = (lambda e: f"{name}[{e}]") if labels is None else (lambda e: labels[e])
    arr = _real_array(hessians, name)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[1] != arr.shape[2]):
        raise ValueError(f"{name} must have shape [K, P, P] (full) or [K, P] (diagonal Hessians), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one environment (K >= 1) on axis 0, got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one parameter (P >= 1), got shape {arr.shape}")
    finite(arr, name)
    K, P = arr.shape[:2]
    if arr.ndim == 2:
        _check_diagonal_entries(arr, name, labels)
        H = np.zeros((K, P, P))
        H[:, np.arange(P), np.arange(P)] = arr
        return _Hessians(H, True, None, None)

    off_diagonal = ~np.eye(P, dtype=bool)
    if not arr[:, off_diagonal].any():
        H = arr.copy()
        for e in range(K):
            lams = np.diagonal(H[e])
            _check_psd(np.sort(lams), label(e))
            H[e, np.arange(P), np.arange(P)] = np.maximum(lams, 0.0)  # rounding-level negatives are flat
        return _Hessians(H, True, None, None)

    H = np.empty_like(arr)
    eigenvalues, eigenvectors = np.empty((K, P)), np.empty((K, P, P))
    for e in range(K):
        _check_symmetric(arr[e], label(e))
        H[e] = (arr[e] + arr[e].T) / 2.0
        eigenvalues[e], eigenvectors[e] = scipy.linalg.eigh(H[e])
        _check_psd(eigenvalues[e], label(e))
    return _Hessians(H, False, eigenvalues, eigenvectors)


def _diagonal_stack(lams, name: str = "lams") -> np.ndarray:
    """Validate diagonal Hessians ``lams[K, P]``: real, finite, >= 0, K, P >= 1; return float64."""
    arr = _finite_real_array(lams, name, "[K, P] (one row of diagonal Hessian entries per environment)", (2,))
    if 0 in arr.shape:
        raise ValueError(f"{name} must have K >= 1 environments and P >= 1 parameters, got shape {arr.shape}")
    _check_diagonal_entries(arr, name)
    return arr


def _vector(x, name: str, P: int) -> np.ndarray:
    arr = _finite_real_array(x, name, f"[P] with P = {P}", (1,))
    if arr.shape != (P,):
        raise ValueError(f"{name} must have shape [P] with P = {P}, got shape {arr.shape}")
    return arr


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr = np.array(arr, dtype=np.float64)
    arr.flags.writeable = False
    return arr


# ----------------------------------------------------------------------------------------------------------------
# Functions of symmetric matrices (via scipy.linalg.eigh: exact symmetry, real results)
# ----------------------------------------------------------------------------------------------------------------


def _symmetric_function(A: np.ndarray, fn) -> np.ndarray:
    """``V fn(w) V^T`` for the eigendecomposition ``A = V diag(w) V^T`` of a symmetric matrix."""
    w, V = scipy.linalg.eigh(A)
    return (V * fn(w)) @ V.T


def _spd_power(A: np.ndarray, power: float) -> np.ndarray:
    return _symmetric_function(A, lambda w: w**power)


def _spd_log(A: np.ndarray) -> np.ndarray:
    return _symmetric_function(A, np.log)


def _symmetric_exp(A: np.ndarray) -> np.ndarray:
    return _symmetric_function(A, np.exp)


def _spd_matrix(A, name: str) -> np.ndarray:
    """Validate one symmetric positive definite matrix ``[P, P]``; return it symmetrised, float64."""
    arr = _real_array(A, name)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a square matrix [P, P] with P >= 1, got shape {arr.shape}")
    finite(arr, name)
    _check_symmetric(arr, name)
    sym = (arr + arr.T) / 2.0
    _require_definite(scipy.linalg.eigvalsh(sym), name)
    return sym


def _require_definite(eigenvalues: np.ndarray, label: str) -> None:
    _check_psd(eigenvalues, label)
    if _flat(eigenvalues).any():
        raise ValueError(
            f"{label} must be positive definite, but its smallest eigenvalue is {eigenvalues[0]:.6g} (singular "
            f"to the tolerance {RANK_RTOL:g} * {np.max(np.abs(eigenvalues)):.6g})"
        )


# ----------------------------------------------------------------------------------------------------------------
# Quadratic environments  [paper §2.2, App. A.2]
# ----------------------------------------------------------------------------------------------------------------


class QuadraticProblem:
    """K quadratic environments ``L_e(theta) = c_e + 1/2 (theta - mu_e)^T H_e (theta - mu_e)`` (paper §2.2).

    Arguments:

    - ``hessians``: ``[K, P, P]`` symmetric positive semidefinite matrices, or ``[K, P]`` meaning diagonal
      Hessians ``H_e = diag(hessians[e])`` with entries >= 0 (paper App. A.2's setting);
    - ``minimizers``: ``mu[K, P]``, default all 0 (a common minimizer at the origin, as App. A.2);
    - ``offsets``: ``c[K]``, the minimum values, default all 0 (App. A.2 has L_e(theta*) = 0).

    Asymmetry and indefiniteness are judged relative to each matrix's scale (module docstring, "Tolerances");
    errors name the argument and the environment index. K = 0, P = 0, mismatched shapes and non-finite entries
    raise ValueError; bool/complex/object arrays raise TypeError.

    Attributes (read-only float64 arrays): ``K``, ``P``, ``H`` ``[K, P, P]`` (symmetrised), ``mu`` ``[K, P]``,
    ``c`` ``[K]``, and ``diagonal``: True when the Hessians were given as ``[K, P]`` or all their off-diagonal
    entries are exactly 0.
    """

    def __init__(self, hessians, minimizers=None, offsets=None):
        stack = _hessian_stack(hessians, "hessians")
        K, P = stack.H.shape[:2]
        if minimizers is None:
            mu = np.zeros((K, P))
        else:
            mu = _finite_real_array(minimizers, "minimizers", f"[K, P] = [{K}, {P}]", (2,))
            if mu.shape != (K, P):
                raise ValueError(
                    f"minimizers must have shape [K, P] = [{K}, {P}] to match hessians, got shape {mu.shape}"
                )
        if offsets is None:
            c = np.zeros(K)
        else:
            c = _finite_real_array(offsets, "offsets", f"[K] = [{K}]", (1,))
            if c.shape != (K,):
                raise ValueError(f"offsets must have shape [K] = [{K}] to match hessians, got shape {c.shape}")
        self.K, self.P = K, P
        self.H = _readonly(stack.H)
        self.diagonal = stack.diagonal
        self.mu = _readonly(mu)
        self.c = _readonly(c)
        if stack.diagonal:  # the spectrum of a diagonal matrix is its diagonal, in coordinate order
            self._eigenvalues = np.diagonal(stack.H, axis1=1, axis2=2).copy()
            self._eigenvectors = np.broadcast_to(np.eye(P), (K, P, P))
        else:
            self._eigenvalues, self._eigenvectors = stack.eigenvalues, stack.eigenvectors

    def __repr__(self) -> str:
        kind = "diagonal" if self.diagonal else "full"
        return f"QuadraticProblem(K={self.K}, P={self.P}, {kind} Hessians)"

    # -- losses and gradients ------------------------------------------------------------------------------------

    def _theta(self, theta, name: str = "theta") -> np.ndarray:
        arr = _finite_real_array(theta, name, f"[P] or [N, P] with P = {self.P}", (1, 2))
        if arr.shape[-1] != self.P:
            raise ValueError(f"{name} must have shape [P] or [N, P] with P = {self.P}, got shape {arr.shape}")
        return arr

    def losses(self, theta) -> np.ndarray:
        """``L_e(theta)`` for every environment: theta ``[P]`` gives ``[K]``, theta ``[N, P]`` gives ``[N, K]``."""
        theta = self._theta(theta)
        d = theta[..., None, :] - self.mu  # [..., K, P]
        return self.c + 0.5 * np.einsum("...kp,kpq,...kq->...k", d, self.H, d)

    def gradients(self, theta) -> np.ndarray:
        """``grad L_e(theta) = H_e (theta - mu_e)``: theta ``[P]`` gives ``[K, P]``, ``[N, P]`` gives ``[N, K, P]``."""
        theta = self._theta(theta)
        return np.einsum("kpq,...kq->...kp", self.H, theta[..., None, :] - self.mu)

    def pooled_loss(self, theta):
        """``L(theta) = (1/K) sum_e L_e(theta)`` (paper §2): a float for theta ``[P]``, ``[N]`` for ``[N, P]``."""
        value = self.losses(theta).mean(axis=-1)
        return float(value) if np.ndim(value) == 0 else value

    def pooled_gradient(self, theta) -> np.ndarray:
        """``grad L(theta) = (1/K) sum_e H_e (theta - mu_e)``: ``[P]`` (or ``[N, P]`` for theta ``[N, P]``)."""
        return self.gradients(theta).mean(axis=-2)

    def pooled_hessian(self) -> np.ndarray:
        """``H^+ = (1/K) sum_e H_e`` ``[P, P]``, the Hessian of the pooled loss (paper §2.2, ``H_{A+B}``)."""
        return self.H.mean(axis=0)

    def pooled_minimizer(self) -> np.ndarray:
        """The minimizer of the pooled loss: the solution of ``H^+ theta = (1/K) sum_e H_e mu_e`` ``[P]``.

        The system always has a solution (each ``H_e mu_e`` lies in ``range(H_e)``, inside ``range(H^+)``); it is
        unique iff ``H^+`` is nonsingular. A singular ``H^+`` (an eigenvalue <= RANK_RTOL times its largest, i.e.
        a direction flat in every environment) raises ValueError: the minimizer is not unique.
        """
        H_plus = self.pooled_hessian()
        eigenvalues = scipy.linalg.eigvalsh(H_plus)
        if _flat(eigenvalues).any():
            raise ValueError(
                "the pooled Hessian H^+ = mean_e H_e is singular (smallest eigenvalue "
                f"{eigenvalues[0]:.6g}, largest {eigenvalues[-1]:.6g}): the pooled loss is flat along a direction "
                "shared by every environment and its minimizer is not unique"
            )
        rhs = np.einsum("kpq,kq->p", self.H, self.mu) / self.K
        return scipy.linalg.solve(H_plus, rhs, assume_a="pos")

    def common_minimizer(self) -> np.ndarray | None:
        """``mu[0]`` (a copy) when every environment has exactly the same minimizer ``mu_e``, else None."""
        if np.all(self.mu == self.mu[0]):
            return self.mu[0].copy()
        return None


# ----------------------------------------------------------------------------------------------------------------
# Means of Hessians  [paper §2.2, App. A.2]
# ----------------------------------------------------------------------------------------------------------------


def arithmetic_mean(H) -> np.ndarray:
    """Arithmetic mean of Hessians ``H^+ = (1/K) sum_e H_e`` (paper §2.2, ``H_{A+B}`` for K = 2).

    ``H``: ``[K, P, P]`` symmetric PSD (returns ``[P, P]``) or ``[K, P]`` diagonal entries >= 0 (returns ``[P]``).
    """
    arr = np.asarray(H)
    stack = _hessian_stack(H, "H")
    if arr.ndim == 2:
        return np.diagonal(stack.H, axis1=1, axis2=2).mean(axis=0)
    return stack.H.mean(axis=0)


def geometric_mean_diagonal(lams) -> np.ndarray:
    """Elementwise geometric mean of diagonal Hessians, ``H^∧_ii = (prod_e lam^e_i)^(1/K)`` (paper §2.2).

    Computed in the log domain, ``exp(mean_e log lam^e_i)``, so it neither underflows nor overflows; a
    coordinate with any exact 0 gets exactly 0. ``lams``: ``[K, P]`` real, finite, >= 0. Returns ``[P]``.
    """
    lams = _diagonal_stack(lams, "lams")
    return _elementwise_geometric_mean(lams)


def _elementwise_geometric_mean(lams: np.ndarray) -> np.ndarray:
    has_zero = (lams == 0).any(axis=0)
    logs = np.log(np.where(lams > 0, lams, 1.0))
    return np.where(has_zero, 0.0, np.exp(logs.mean(axis=0)))


def _joint_eigenbasis(stack: _Hessians, labels) -> tuple[np.ndarray, np.ndarray]:
    """A common eigenbasis V ``[P, P]`` of commuting symmetric matrices and their eigenvalues ``[K, P]`` in it.

    Checks ``||H_i H_j - H_j H_i||_F <= COMMUTE_RTOL ||H_i||_F ||H_j||_F`` for every pair (ValueError naming the
    pair by ``labels`` otherwise). A generic linear combination of commuting symmetric matrices has an eigenbasis
    that diagonalizes each of them; the combination's weights are fixed pseudo-random numbers (so the result is
    deterministic), and the basis is verified (off-diagonal residual of ``V^T H_e V``) and retried with other
    weights if a near-coincidence of eigenvalues spoiled it. Eigenvalues within the flat tolerance are set to 0.
    """
    H = stack.H
    K, P = H.shape[:2]
    if stack.diagonal:
        return np.eye(P), np.diagonal(H, axis1=1, axis2=2).copy()
    norms = np.linalg.norm(H, axis=(1, 2))
    for i in range(K):
        for j in range(i + 1, K):
            commutator = float(np.linalg.norm(H[i] @ H[j] - H[j] @ H[i]))
            if commutator > COMMUTE_RTOL * norms[i] * norms[j]:
                raise ValueError(
                    f"{labels[i]} and {labels[j]} must commute (be co-diagonalizable): ||H_i H_j - H_j H_i||_F = "
                    f"{commutator:.3g} exceeds {COMMUTE_RTOL:g} * ||H_i||_F * ||H_j||_F = "
                    f"{COMMUTE_RTOL * norms[i] * norms[j]:.3g}"
                )
    scaled = H / np.where(norms > 0, norms, 1.0)[:, None, None]
    rng = np.random.default_rng(0)
    for _ in range(5):
        _, V = scipy.linalg.eigh(np.tensordot(rng.uniform(1.0, 2.0, K), scaled, axes=1))
        rotated = np.einsum("pi,kpq,qj->kij", V, H, V)
        lams = np.diagonal(rotated, axis1=1, axis2=2).copy()
        residual = np.abs(rotated - lams[:, :, None] * np.eye(P)).max(axis=(1, 2))
        if np.all(residual <= COMMUTE_RTOL * np.maximum(norms, np.finfo(float).tiny)):
            for e in range(K):
                lams[e][_flat(lams[e])] = 0.0
            return V, lams
    raise ValueError(f"could not find a common eigenbasis of the (nearly) commuting matrices {', '.join(labels)}")


def geometric_mean_commuting(H) -> np.ndarray:
    """Geometric mean of commuting (co-diagonalizable) PSD matrices (paper §2.2: "or, more broadly,
    co-diagonalizable"): ``V diag((prod_e lam^e_i)^(1/K)) V^T`` in their common eigenbasis V.

    For commuting SPD matrices this is their Karcher mean (and ``A # B`` for two). ``H``: ``[K, P, P]``
    symmetric PSD, pairwise commuting within ``COMMUTE_RTOL`` (ValueError naming the first non-commuting pair).
    Returns ``[P, P]``; singular inputs are allowed (a common eigen-direction with any 0 eigenvalue gets 0).
    """
    if np.asarray(H).ndim != 3:
        raise ValueError(f"H must have shape [K, P, P], got shape {np.asarray(H).shape}")
    stack = _hessian_stack(H, "H")
    V, lams = _joint_eigenbasis(stack, [f"H[{e}]" for e in range(stack.H.shape[0])])
    return (V * _elementwise_geometric_mean(lams)) @ V.T


def two_matrix_geometric_mean(A, B) -> np.ndarray:
    """The matrix geometric mean ``A # B = A^(1/2) (A^(-1/2) B A^(-1/2))^(1/2) A^(1/2)``.

    The unique SPD solution X of ``X A^-1 X = B``; it equals ``B # A`` and the Karcher mean of {A, B}. The
    square roots are taken through scipy.linalg.eigh (symmetric, real). ``A``, ``B``: ``[P, P]`` symmetric
    positive definite (ValueError naming the argument otherwise). Returns ``[P, P]``, symmetric.
    """
    A = _spd_matrix(A, "A")
    B = _spd_matrix(B, "B")
    if A.shape != B.shape:
        raise ValueError(f"A and B must have the same shape, got {A.shape} and {B.shape}")
    root, inverse_root = _spd_power(A, 0.5), _spd_power(A, -0.5)
    inner = inverse_root @ B @ inverse_root
    X = root @ _spd_power((inner + inner.T) / 2.0, 0.5) @ root
    return (X + X.T) / 2.0


class KarcherMean(NamedTuple):
    """Result of :func:`karcher_mean`: the mean ``[P, P]`` and the number of fixed-point updates taken."""

    mean: np.ndarray
    iterations: int


def karcher_mean(H, tol=1e-12, max_iter=500) -> KarcherMean:
    """Karcher (Riemannian) mean of SPD matrices: the SPD solution X of ``sum_i log(A_i^-1 X) = 0`` (App. A.2).

    The standard fixed-point iteration, started from the arithmetic mean::

        S = (1/m) sum_i logm(X^(-1/2) A_i X^(-1/2))        (the mean log-step, symmetric)
        X <- X^(1/2) expm(S) X^(1/2)

    It stops as soon as ``||S||_F < tol``, before updating; ``S`` is affine invariant (dimensionless), so ``tol``
    is absolute. Returns ``KarcherMean(mean, iterations)``, ``iterations`` being the number of updates made (0 when
    all A_i are equal). RuntimeError if ``||S||_F >= tol`` after ``max_iter`` updates. The attainable accuracy is
    about machine epsilon times the condition number of X: pass a larger ``tol`` for ill-conditioned inputs.

    ``H``: ``[m, P, P]`` symmetric positive definite (ValueError naming the environment otherwise); ``tol > 0``;
    ``max_iter`` an integer >= 0. Matrix functions go through scipy.linalg.eigh (symmetric arguments).
    """
    tol = positive(tol, "tol")
    max_iter = integer(max_iter, "max_iter", low=0)
    if np.asarray(H).ndim != 3:
        raise ValueError(f"H must have shape [m, P, P], got shape {np.asarray(H).shape}")
    stack = _hessian_stack(H, "H")
    A = stack.H
    for e in range(A.shape[0]):
        _require_definite(scipy.linalg.eigvalsh(A[e]), f"H[{e}]")
    X = A.mean(axis=0)
    for iteration in range(max_iter + 1):
        root, inverse_root = _spd_power(X, 0.5), _spd_power(X, -0.5)
        step = np.mean([_spd_log(_symmetrize(inverse_root @ A_i @ inverse_root)) for A_i in A], axis=0)
        step_norm = float(np.linalg.norm(step))
        if step_norm < tol:
            return KarcherMean(X, iteration)
        if iteration == max_iter:
            break
        X = _symmetrize(root @ _symmetric_exp(step) @ root)
    raise RuntimeError(
        f"karcher_mean did not converge: after {max_iter} updates the mean log-step has Frobenius norm "
        f"{step_norm:.3g} >= tol = {tol:g} (raise max_iter, or tol for ill-conditioned matrices)"
    )


def _symmetrize(M: np.ndarray) -> np.ndarray:
    return (M + M.T) / 2.0


def determinant_ratio(H):
    """``det(H^+) / det(H^∧)``, arithmetic over geometric mean of Hessians (paper §2.2, Prop. 3, Figs. 3, 12).

    - ``H`` ``[K, P]`` (diagonal Hessians): ``prod_i AM_i / GM_i`` of the eigenvalues, in the log domain.
    - ``H`` ``[K, P, P]``: ``det(H^+)`` from the eigenvalues of the arithmetic mean and ``det(H^∧)`` as
      ``(prod_e det H_e)^(1/K)``. That is exactly the determinant of the Karcher mean (for commuting matrices, of
      the elementwise geometric mean of the eigenvalues), so no iteration is needed: the value equals
      ``det(arithmetic_mean(H)) / det(karcher_mean(H).mean)``.

    Returns a float >= 1, ``inf`` when the geometric mean is singular and the arithmetic mean is not (some
    environment is flat in a direction another one curves), and None when the arithmetic mean is singular
    (a direction flat in every environment: 0/0, undefined). Singular means an exact 0 for ``[K, P]`` input and
    an eigenvalue at most ``RANK_RTOL`` times the largest for matrices.
    """
    arr = np.asarray(H)
    stack = _hessian_stack(H, "H")
    if arr.ndim == 2 or stack.diagonal:
        lams = np.diagonal(stack.H, axis1=1, axis2=2)
        am, gm = lams.mean(axis=0), _elementwise_geometric_mean(lams)
        if (am == 0).any():
            return None
        if (gm == 0).any():
            return float("inf")
        return float(np.exp(np.sum(np.log(am) - np.log(gm))))
    am_eigenvalues = scipy.linalg.eigvalsh(stack.H.mean(axis=0))
    if _flat(am_eigenvalues).any():
        return None
    if any(_flat(w).any() for w in stack.eigenvalues):
        return float("inf")
    log_det_gm = np.mean([np.sum(np.log(w)) for w in stack.eigenvalues])
    return float(np.exp(np.sum(np.log(am_eigenvalues)) - log_det_gm))


# ----------------------------------------------------------------------------------------------------------------
# Exact inconsistency score  [paper eq. (1), App. A.2 proof]
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class InconsistencyScore:
    """The inconsistency score ``I^eps(theta*)`` of eq. (1) and where it is attained.

    - ``value``: ``max_{(e, e')} pair_values[e, e']``, a float >= 0, possibly ``inf``.
    - ``pair``: ``(e, e')`` attaining it (the first in row-major order among ties).
    - ``direction``: a unit vector ``d [P]`` pointing from theta* towards where the sup of that pair is attained
      or, for ``inf``, along which ``N^eps_{e,theta*}`` is unbounded and ``|L_e' - L_e(theta*)|`` grows without
      bound. With a common minimizer it is a top generalized eigenvector of the pencil (H_e', H_e) (a
      coordinate axis for diagonal Hessians): on the segment from theta* to the boundary along d, ``L_e'``
      covers the whole range ``c_e' + [0, eps kappa]``, so both ends of the sup are attained on it. None when
      ``L_e'`` is constant on ``N^eps_{e,theta*}`` (``H_e' = 0``; for e = e' that is the zero-Hessian case), and,
      on the trust-region route, when the sup is attained at theta* itself.
    - ``method``: ``"diagonal"`` (ratios of curvatures, as in App. A.2's proof), ``"generalized_eigenvalue"``
      (pencil eigenvalues: full Hessians, common minimizer) or ``"band_extremes"`` (trust-region subproblems:
      different minimizers).
    - ``pair_values``: ``[K, K]``, ``pair_values[e, e'] = sup_{theta in N^eps_{e,theta*}} |L_e'(theta) -
      L_e(theta*)|``.
    """

    value: float
    pair: tuple[int, int]
    direction: np.ndarray | None
    method: str
    pair_values: np.ndarray


def _score_from_pairs(pair_values: np.ndarray, direction_of, method: str) -> InconsistencyScore:
    """The score of the first pair attaining the maximum; ``direction_of(e, f)`` gives that pair's direction
    (called for the attaining pair only)."""
    flat_index = int(np.argmax(pair_values))
    e, f = divmod(flat_index, pair_values.shape[1])
    direction = direction_of(e, f)
    if direction is not None:
        direction = _readonly(direction / np.linalg.norm(direction))
    return InconsistencyScore(float(pair_values[e, f]), (e, f), direction, method, _readonly(pair_values))


def _offset_pair_value(delta: np.ndarray, eps: float, kappa: np.ndarray) -> np.ndarray:
    """``max(|delta|, |delta + eps kappa|)``: the sup of ``|delta + q|`` over ``q in [0, eps kappa]``, the value
    of a pair with unequal offsets."""
    with np.errstate(over="ignore"):
        top = np.where(np.isinf(kappa), np.inf, np.abs(delta + eps * kappa))
    return np.maximum(np.abs(delta), top)


def _offsets(offsets, K: int) -> np.ndarray:
    if offsets is None:
        return np.zeros(K)
    c = _finite_real_array(offsets, "offsets", f"[K] = [{K}]", (1,))
    if c.shape != (K,):
        raise ValueError(f"offsets must have shape [K] = [{K}] to match lams, got shape {c.shape}")
    return c


def inconsistency_score_diagonal(lams, eps, offsets=None) -> InconsistencyScore:
    """Exact ``I^eps`` for diagonal Hessians with a common minimizer at theta* (App. A.2's proof, K environments).

    With ``lams[K, P]`` the diagonals and ``c`` the offsets, the pair (e, e') has ``N_e = {1/2 sum_i lam^e_i d_i^2
    <= eps}`` (the band of a quadratic around its minimum) and, with ``kappa_{e,e'} = max_i lam^e'_i / lam^e_i``
    (0/0 -> 0, x/0 -> inf for x > 0) and ``delta = c_e' - c_e``::

        pair_values[e, e'] = max(|delta|, |delta + eps kappa_{e,e'}|)       (= eps kappa with equal offsets)

    since ``q = 1/2 d^T H_e' d`` covers ``[0, eps kappa]`` on N_e. So with equal offsets
    ``I = eps * max over ordered pairs e != e' and i of lam^e'_i / lam^e_i``, and the e = e' pairs give eps
    (0 when H_e = 0); K = 1 gives eps (or 0). Vectorized over all K^2 pairs and P coordinates at once.

    ``lams``: ``[K, P]`` real, finite, >= 0. ``eps``: a real > 0. ``offsets``: ``[K]`` or None (all 0). Method
    ``"diagonal"``; the direction is the coordinate axis i attaining kappa for the winning pair.
    """
    eps = positive(eps, "eps")
    lams = _diagonal_stack(lams, "lams")
    K = lams.shape[0]
    c = _offsets(offsets, K)
    numerator, denominator = lams[None, :, :], lams[:, None, :]  # [e, e', i]: lam^e'_i over lam^e_i
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratios = np.where(denominator > 0, numerator / denominator, np.where(numerator > 0, np.inf, 0.0))
    kappa = ratios.max(axis=2)
    pair_values = _offset_pair_value(c[None, :] - c[:, None], eps, kappa)
    directions = {}
    for e in range(K):
        for f in range(K):
            directions[e, f] = None if kappa[e, f] == 0 else np.eye(lams.shape[1])[int(np.argmax(ratios[e, f]))]
    return _score_from_pairs(pair_values, lambda e, f: directions[e, f], "diagonal")


def _top_eigenpair(M: np.ndarray, *, vector: bool = True):
    """Largest eigenvalue of a symmetric matrix and its eigenvector (scipy.linalg.eigh, one eigenpair only);
    the vector is None when ``vector=False`` (cheaper)."""
    n = M.shape[0]
    if not vector:
        return float(scipy.linalg.eigh(_symmetrize(M), eigvals_only=True, subset_by_index=[n - 1, n - 1])[0]), None
    w, V = scipy.linalg.eigh(_symmetrize(M), subset_by_index=[n - 1, n - 1])
    return float(w[0]), V[:, 0]


class _Whitening(NamedTuple):
    """One environment's factorisation, reused for all its pairs: null basis and whitening of its range."""

    null_basis: np.ndarray  # [P, P - r], orthonormal basis of null(H_e)
    whitening: np.ndarray  # [P, r], W with W^T H_e W = I_r and range(W) = range(H_e)
    top: np.ndarray | None  # top eigenvector of H_e (None when H_e = 0)
    cholesky: np.ndarray | None  # lower Cholesky factor of H_e when it is definite, else None


def _whitening(eigenvalues: np.ndarray, eigenvectors: np.ndarray, H_e: np.ndarray) -> _Whitening:
    flat = _flat(eigenvalues)
    whitening = eigenvectors[:, ~flat] / np.sqrt(eigenvalues[~flat])
    top = None if flat.all() else eigenvectors[:, int(np.argmax(eigenvalues))]
    cholesky = None
    if not flat.any():
        try:
            cholesky = scipy.linalg.cholesky(H_e, lower=True)
        except scipy.linalg.LinAlgError:  # numerically semi-definite: the whitening serves
            pass
    return _Whitening(eigenvectors[:, flat], whitening, top, cholesky)


def _whitened(factor: _Whitening, H_f: np.ndarray) -> np.ndarray:
    """``H_f`` in the coordinates where ``H_e`` is the identity on its range: ``L^-1 H_f L^-T`` by two triangular
    solves when H_e is definite (faster than the dense ``W^T H_f W``: ``bench/bench_inconsistency.py``),
    ``W^T H_f W`` on range(H_e) otherwise."""
    if factor.cholesky is not None:
        L = factor.cholesky
        return scipy.linalg.solve_triangular(L, scipy.linalg.solve_triangular(L, H_f, lower=True).T, lower=True)
    return factor.whitening.T @ H_f @ factor.whitening


def _unwhitened(factor: _Whitening, z: np.ndarray) -> np.ndarray:
    """Map an eigenvector of :func:`_whitened` back to a generalized eigenvector ``d`` of the pencil."""
    if factor.cholesky is not None:
        return scipy.linalg.solve_triangular(factor.cholesky, z, lower=True, trans="T")
    return factor.whitening @ z


def _unbounded_direction(factor: _Whitening, H_f: np.ndarray, scale_f: float) -> np.ndarray | None:
    """A null vector d of H_e with ``d^T H_f d > 0`` (the pair is +inf: N_e is unbounded along d), or None if
    null(H_e) lies in null(H_f) to the tolerance ``RANK_RTOL * scale_f``."""
    N = factor.null_basis
    if N.shape[1] == 0:
        return None
    curvature, z = _top_eigenpair(N.T @ H_f @ N)
    return N @ z if curvature > RANK_RTOL * scale_f else None


def _pencil_pair(factor: _Whitening, H_f: np.ndarray, scale_f: float, same: bool, *, vector: bool = True):
    """``(kappa, direction)`` for one pair: the largest generalized eigenvalue of (H_f, H_e) on range(H_e), or inf
    (the direction only when ``vector``; an unbounded pair always has its null direction)."""
    direction = _unbounded_direction(factor, H_f, scale_f)
    if direction is not None:
        return np.inf, direction
    r = factor.whitening.shape[1]
    if r == 0 or not H_f.any():  # L_f constant on N_e: nothing to attain but the offset difference
        return 0.0, None
    if same:  # W^T H_e W = I: kappa is 1 exactly, attained along any direction of range(H_e)
        return 1.0, factor.top
    kappa, z = _top_eigenpair(_whitened(factor, H_f), vector=vector)
    return max(kappa, 0.0), None if z is None else _unwhitened(factor, z)


def _pencil_score(problem: QuadraticProblem, eps: float) -> InconsistencyScore:
    """Closed form with a common minimizer and full (possibly singular) Hessians, offsets unequal or not.

    For each environment e, the eigendecomposition ``H_e = V diag(w) V^T`` computed once when the problem was
    validated (it is needed for the PSD check anyway) gives a null basis ``N_e`` and a whitening
    ``W_e = V_r diag(w_r^(-1/2))`` of ``range(H_e)``; a definite H_e also gets its Cholesky factor L_e, since
    two triangular solves ``L_e^-1 H_e' L_e^-T`` are the cheapest exact route measured. They serve all K partners
    e': the pair is +inf iff ``N_e^T H_e' N_e`` has a positive eigenvalue, and otherwise ``kappa =
    lambda_max(W_e^T H_e' W_e)`` (= ``lambda_max(L_e^-1 H_e' L_e^-T)``), the
    largest generalized eigenvalue of the pencil (H_e', H_e) restricted to range(H_e) (= ``lambda_max(H_e^-1
    H_e')`` when H_e is definite). Only that eigenvalue is computed (``eigh(..., subset_by_index)``), and its
    eigenvector only for the attaining pair. This costs
    one factorisation per environment plus one small symmetric eigenproblem per pair, instead of a generalized
    eigenproblem (a Cholesky factorisation of H_e and a full eigendecomposition) per pair, and it handles
    singular H_e without a second code path.
    """
    K = problem.K
    factors = [_whitening(problem._eigenvalues[e], problem._eigenvectors[e], problem.H[e]) for e in range(K)]
    scales = np.max(np.abs(problem._eigenvalues), axis=1)
    kappa = np.zeros((K, K))
    for e in range(K):
        for f in range(K):
            kappa[e, f], _ = _pencil_pair(factors[e], problem.H[f], scales[f], e == f, vector=False)
    pair_values = _offset_pair_value(problem.c[None, :] - problem.c[:, None], eps, kappa)
    return _score_from_pairs(pair_values, lambda e, f: _pencil_pair(factors[e], problem.H[f], scales[f], e == f)[1],
                             "generalized_eigenvalue")


def _band_pair(problem: QuadraticProblem, e: int, f: int, eps: float, theta_star: np.ndarray, level: float,
               factors, scales):
    """``(value, direction)`` of the pair (e, f) away from a common minimizer (no closed form); ``level`` is
    ``L_e(theta*)``."""
    from . import trust_region  # imported here: the closed forms do not need it

    H_e, H_f = problem.H[e], problem.H[f]
    if e == f:
        # The component reaches the upper edge L_e = level + eps along any curved direction d, oriented so that
        # L_e increases monotonically along the segment (it stays inside the band): the pair is eps exactly.
        if factors[e].top is None:
            return 0.0, None
        d = factors[e].top
        return eps, d if d @ (H_e @ (theta_star - problem.mu[e])) >= 0 else -d
    if not H_f.any():
        return abs(problem.c[f] - level), None
    # L_e is constant along null(H_e), so the component contains theta* + null(H_e); L_f is unbounded on it iff
    # some null vector of H_e is curved for H_f.
    direction = _unbounded_direction(factors[e], H_f, scales[f])
    if direction is not None:
        return np.inf, direction
    extremes = trust_region.band_extremes(
        H_e, problem.mu[e], problem.c[e], level - eps, level + eps, H_f, problem.mu[f], problem.c[f], theta_star
    )
    upper, lower = extremes.max_value - level, level - extremes.min_value
    value, point = (upper, extremes.argmax) if upper >= lower else (lower, extremes.argmin)
    if point is None:
        return float(value), None
    offset = np.asarray(point, dtype=np.float64) - theta_star
    return float(value), (offset if np.linalg.norm(offset) > 0 else None)


def _band_score(problem: QuadraticProblem, eps: float, theta_star: np.ndarray) -> InconsistencyScore:
    K = problem.K
    factors = [_whitening(problem._eigenvalues[e], problem._eigenvectors[e], problem.H[e]) for e in range(K)]
    scales = np.max(np.abs(problem._eigenvalues), axis=1)
    levels = problem.losses(theta_star)
    pair_values = np.zeros((K, K))
    directions = {}
    for e in range(K):
        for f in range(K):
            pair_values[e, f], directions[e, f] = _band_pair(
                problem, e, f, eps, theta_star, float(levels[e]), factors, scales
            )
    return _score_from_pairs(pair_values, lambda e, f: directions[e, f], "band_extremes")


def inconsistency_score(problem: QuadraticProblem, eps, theta_star=None) -> InconsistencyScore:
    """Exact inconsistency score ``I^eps(theta*)`` of eq. (1), as printed (paper §2.1).

    ``I^eps(theta*) = max_{(e,e')} sup_{theta in N^eps_{e,theta*}} |L_e'(theta) - L_e(theta*)|``, over ordered
    pairs including e = e', with ``N^eps_{e,theta*}`` the connected component containing theta* of the band
    ``{|L_e(theta) - L_e(theta*)| <= eps}``. ``theta_star`` defaults to the common minimizer when all ``mu_e``
    are equal, and to the pooled minimizer (the point GD converges to) otherwise (ValueError if that is not
    unique: pass ``theta_star``).

    Routes, by what the problem allows:

    - Common minimizer and theta* equal to it (exactly): N_e is the (cylinder over an) ellipsoid
      ``{1/2 d^T H_e d <= eps}``, and ``pair_values[e, e'] = max(|c_e' - c_e|, |c_e' - c_e + eps kappa|)`` with
      ``kappa`` the largest generalized eigenvalue of the pencil (H_e', H_e) on range(H_e), or +inf when
      null(H_e) is not inside null(H_e'). Diagonal Hessians use :func:`inconsistency_score_diagonal`
      (``method="diagonal"``), full ones one factorisation per environment (``"generalized_eigenvalue"``, see
      ``_pencil_score``). Equal offsets give ``eps * max_{e != e'} lambda_max(H_e^-1 H_e')`` (>= eps).
    - Otherwise (``"band_extremes"``): each pair (e, e' != e) is ``max(sup L_e' - L_e(theta*), L_e(theta*) -
      inf L_e')`` over the component, both extremes from ``trust_region.band_extremes`` (a trust-region
      subproblem solved exactly), except that +inf is decided here (null(H_e) not inside null(H_e')) and pairs
      with ``H_e' = 0`` give ``|c_e' - L_e(theta*)|``. The e = e' pairs give eps (0 when H_e = 0).

    ``eps``: a real > 0. ``theta_star``: ``[P]`` real, finite, or None. Returns :class:`InconsistencyScore`.
    """
    if not isinstance(problem, QuadraticProblem):
        raise TypeError(f"problem must be a QuadraticProblem, got {type(problem).__name__}")
    eps = positive(eps, "eps")
    common = problem.common_minimizer()
    if theta_star is None and common is None:
        try:
            theta_star = problem.pooled_minimizer()
        except ValueError as error:
            raise ValueError(f"theta_star defaults to the pooled minimizer, but {error}; pass theta_star") from None
    elif theta_star is None:
        theta_star = common
    else:
        theta_star = _vector(theta_star, "theta_star", problem.P)
    if common is not None and np.array_equal(theta_star, common):
        if problem.diagonal:
            return inconsistency_score_diagonal(np.diagonal(problem.H, axis1=1, axis2=2), eps, problem.c)
        return _pencil_score(problem, eps)
    return _band_score(problem, eps, theta_star)


# ----------------------------------------------------------------------------------------------------------------
# Proposition 3  [paper §2.2, App. A.2]
# ----------------------------------------------------------------------------------------------------------------


def _pair_eigenvalues(H_A, H_B) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues of two diagonal ([P] each) or commuting ([P, P] each) Hessians, paired in a common basis."""
    A, B = _real_array(H_A, "H_A"), _real_array(H_B, "H_B")
    if A.shape != B.shape or A.ndim not in (1, 2):
        raise ValueError(
            "H_A and H_B must both be diagonals [P] or both matrices [P, P] of one shape, got shapes "
            f"{A.shape} and {B.shape}"
        )
    stack = _hessian_stack(np.stack([A, B]), "(H_A, H_B)", labels=("H_A", "H_B"))
    if A.ndim == 1:
        lams = np.diagonal(stack.H, axis1=1, axis2=2)
    else:
        _, lams = _joint_eigenbasis(stack, ("H_A", "H_B"))
    return lams[0], lams[1]


def _prop3_product(H_A, H_B, eps, drop_flat: bool):
    """``(det H_{A+B} / det H_{A∧B})^2 = prod_i r_i^2``, ``r_i = ((a_i + b_i)/2) / sqrt(a_i b_i)``; inf or None."""
    eps = positive(eps, "eps")
    if not isinstance(drop_flat, (bool, np.bool_)):
        raise TypeError(f"drop_flat must be a bool, got {type(drop_flat).__name__} {drop_flat!r}")
    a, b = _pair_eigenvalues(H_A, H_B)
    both_flat = (a == 0) & (b == 0)
    if both_flat.any() and not drop_flat:
        return eps, None
    keep = ~both_flat
    a, b = a[keep], b[keep]
    if ((a == 0) | (b == 0)).any():
        return eps, np.inf
    log_ratio = np.sum(np.log((a + b) / 2.0) - 0.5 * (np.log(a) + np.log(b)))
    with np.errstate(over="ignore"):
        return eps, float(np.exp(2.0 * log_ratio))


def prop3_bound_printed(H_A, H_B, eps, *, drop_flat=False):
    """Prop. 3's bound AS PRINTED: ``2 eps (det H_{A+B} / det H_{A∧B})^2`` (paper §2.2, App. A.2).

    **This is NOT a valid upper bound on I^eps in general** ([ERRATUM] in App. A.2): squaring the proof's last
    line gives 4 eps, not 2 eps. Counterexample, P = 1, lamA = 1, lamB = 100: the exact score is 100 eps, the
    printed bound is ``2 eps (50.5 / 10)^2 = 51.005 eps``. In 1-D it fails exactly when the curvature ratio
    exceeds ``1 + sqrt(2)``. Use :func:`prop3_bound_corrected`; this function exists to evaluate the printed
    statement.

    ``H_A``, ``H_B``: two diagonal Hessians ``[P]`` (entries >= 0) or two commuting PSD matrices ``[P, P]``
    (their eigenvalues are paired in a common eigenbasis). ``eps > 0``. The determinant ratio is
    ``prod_i ((a_i + b_i)/2) / sqrt(a_i b_i)`` over the eigenvalue pairs (a_i, b_i). Returns a float, ``inf``
    when exactly one of a_i, b_i is 0 for some i (Remark 2), and None when some a_i = b_i = 0 (0/0: the bound is
    undefined although I^eps is finite) unless ``drop_flat=True``, which leaves such doubly flat directions out
    of the product (they contribute 0 to I^eps).
    """
    eps, product = _prop3_product(H_A, H_B, eps, drop_flat)
    return None if product is None else 2.0 * eps * product


def prop3_bound_corrected(H_A, H_B, eps, *, drop_flat=False):
    """Prop. 3 with the corrected constant: ``4 eps (det H_{A+B} / det H_{A∧B})^2``, a valid upper bound on
    I^eps for two diagonal (or commuting) Hessians with a common minimizer and equal offsets.

    Proof (derived; it replaces App. A.2's last step): with ``r_i = AM_i / GM_i >= 1``,
    ``max(a_i/b_i, b_i/a_i) = (r_i + sqrt(r_i^2 - 1))^2 <= 4 r_i^2 - 1``, so
    ``I^eps <= eps (4 max_i r_i^2 - 1) <= 4 eps prod_i r_i^2``. Same arguments, conventions and return values
    as :func:`prop3_bound_printed` (``inf``, None for 0/0, ``drop_flat``).
    """
    eps, product = _prop3_product(H_A, H_B, eps, drop_flat)
    return None if product is None else 4.0 * eps * product


# ----------------------------------------------------------------------------------------------------------------
# Trajectories: GD and geometric-mean GD  [paper §2.2 "From Hessians to gradients", footnotes 7-8]
# ----------------------------------------------------------------------------------------------------------------


def _power_trajectory(factors: np.ndarray, start: np.ndarray, n_steps: int) -> np.ndarray:
    """``factors^k * start`` for k = 0..n_steps, ``[n_steps + 1, P]``; ValueError on float64 overflow."""
    k = np.arange(n_steps + 1)[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        values = np.where(start == 0.0, 0.0, factors[None, :] ** k * start[None, :])
    if not np.isfinite(values).all():
        raise ValueError(
            f"the trajectory overflows float64: some contraction factor 1 - eta*lam has |.| > 1 (factors "
            f"{factors.tolist()}), so the iteration diverges; use a smaller eta (0 < eta*lam < 2) or fewer steps"
        )
    return values


def gd_contraction_factors(problem: QuadraticProblem, eta) -> np.ndarray:
    """Per-coordinate contraction of GD on the pooled loss: ``1 - eta * mean_e lam^e_i`` ``[P]`` (paper §2.2).

    ``theta^{k+1}_i - theta*_i = (1 - eta mean_e lam^e_i)(theta^k_i - theta*_i)``; for ``eta < 1/lam_max``
    (footnote 7) every factor lies in [0, 1). Needs diagonal Hessians (ValueError otherwise: the factors of
    full Hessians belong to the eigen-directions of ``problem.pooled_hessian()``). ``eta`` a real > 0.
    """
    eta = positive(eta, "eta")
    if not problem.diagonal:
        raise ValueError(
            "gd_contraction_factors needs diagonal Hessians (per-coordinate factors); for full Hessians use "
            "1 - eta * eigvalsh(problem.pooled_hessian())"
        )
    return 1.0 - eta * np.diagonal(problem.pooled_hessian())


def geometric_mean_contraction_factors(lams, eta) -> np.ndarray:
    """Per-coordinate contraction of geometric-mean GD: ``1 - eta * (prod_e lam^e_i)^(1/K)`` ``[P]`` (paper §2.2).

    ``lams``: ``[K, P]`` diagonal Hessians (>= 0); ``eta`` a real > 0. A coordinate with some lam^e_i = 0 has
    factor exactly 1: it never moves.
    """
    eta = positive(eta, "eta")
    return 1.0 - eta * geometric_mean_diagonal(lams)


def gd_trajectory(problem: QuadraticProblem, theta0, eta, n_steps) -> np.ndarray:
    """Closed-form GD on the pooled loss: ``theta^k - theta* = (I - eta H^+)^k (theta^0 - theta*)`` (paper §2.2).

    ``theta^{k+1} = theta^k - eta grad L(theta^k)`` with ``grad L(theta) = H^+ (theta - theta*)``: theta* is the
    common minimizer, or, when the minimizers differ, the pooled minimizer (the formula holds for any stationary
    point of L; ValueError if H^+ is singular and the minimizers differ). Diagonal Hessians are handled
    per coordinate (exact powers of ``1 - eta mean_e lam^e_i``), full ones in the eigenbasis of H^+.

    ``theta0``: ``[P]``; ``eta``: a real > 0; ``n_steps``: an integer >= 0. Returns ``[n_steps + 1, P]`` with row 0
    equal to theta0. ValueError if the iteration diverges so far that float64 overflows.
    """
    if not isinstance(problem, QuadraticProblem):
        raise TypeError(f"problem must be a QuadraticProblem, got {type(problem).__name__}")
    theta0 = _vector(theta0, "theta0", problem.P)
    eta = positive(eta, "eta")
    n_steps = integer(n_steps, "n_steps", low=0)
    theta_star = problem.common_minimizer()
    if theta_star is None:
        theta_star = problem.pooled_minimizer()
    if problem.diagonal:
        factors = 1.0 - eta * np.diagonal(problem.pooled_hessian())
        trajectory = theta_star + _power_trajectory(factors, theta0 - theta_star, n_steps)
    else:
        w, V = scipy.linalg.eigh(problem.pooled_hessian())
        trajectory = theta_star + _power_trajectory(1.0 - eta * w, V.T @ (theta0 - theta_star), n_steps) @ V.T
    trajectory[0] = theta0  # exactly, without the rounding of the round trip through theta*
    return trajectory


def geometric_mean_gd_trajectory(lams, theta_star, theta0, eta, n_steps) -> np.ndarray:
    """Closed-form geometric-mean GD on diagonal quadratics with a common minimizer (paper §2.2, footnotes 7-8)::

        theta^{k+1} = theta^k - eta grad L^∧(theta^k),   grad L^∧(theta) = H^∧ (theta - theta*)
        theta^k - theta* = (I - eta H^∧)^k (theta^0 - theta*),   H^∧ = diag((prod_e lam^e_i)^(1/K))

    ``grad L^∧`` is the elementwise signed geometric mean of the environment gradients
    ``g_{e,i} = lam^e_i (theta_i - theta*_i)``: ``(prod_e g_{e,i})^(1/K)`` with the common sign (footnote 8).
    A coordinate with some lam^e_i = 0 never moves. ``lams``: ``[K, P]`` (>= 0); ``theta_star``, ``theta0``: ``[P]``;
    ``eta`` > 0; ``n_steps`` an integer >= 0. Returns ``[n_steps + 1, P]`` (ValueError on float64 overflow).
    """
    lams = _diagonal_stack(lams, "lams")
    P = lams.shape[1]
    theta_star = _vector(theta_star, "theta_star", P)
    theta0 = _vector(theta0, "theta0", P)
    eta = positive(eta, "eta")
    n_steps = integer(n_steps, "n_steps", low=0)
    factors = 1.0 - eta * _elementwise_geometric_mean(lams)
    trajectory = theta_star + _power_trajectory(factors, theta0 - theta_star, n_steps)
    trajectory[0] = theta0
    return trajectory


__all__ = [
    "COMMUTE_RTOL",
    "PSD_RTOL",
    "RANK_RTOL",
    "SYMMETRY_RTOL",
    "InconsistencyScore",
    "KarcherMean",
    "QuadraticProblem",
    "arithmetic_mean",
    "determinant_ratio",
    "gd_contraction_factors",
    "gd_trajectory",
    "geometric_mean_commuting",
    "geometric_mean_contraction_factors",
    "geometric_mean_diagonal",
    "geometric_mean_gd_trajectory",
    "inconsistency_score",
    "inconsistency_score_diagonal",
    "karcher_mean",
    "prop3_bound_corrected",
    "prop3_bound_printed",
    "two_matrix_geometric_mean",
]
