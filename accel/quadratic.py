"""Exact inconsistency scores ``I^eps`` of many quadratic problems at once (common-minimizer closed forms).

The batched counterparts of :func:`hardtovary.reference.quadratic.inconsistency_score_diagonal` and of
:func:`hardtovary.reference.quadratic.inconsistency_score` for SPD Hessians with a common minimizer (paper eq. (1)
as printed, ordered pairs including e = e'; App. A.2's closed form extended to K environments and offsets).
Written against an array module ``xp`` (NumPy or CuPy, :func:`hardtovary.accel.backend.array_module`); everything
is computed in float64 and the results are ``[N]`` float64 arrays of the input's module.

- :func:`inconsistency_scores_diagonal`: ``lams[N, K, P]`` (diagonal Hessians), optional offsets ``c[N, K]``::

      kappa[n, e, f] = max_i lams[n, f, i] / lams[n, e, i]      (0/0 -> 0, x/0 -> inf for x > 0)
      I[n] = max_{e, f} max(|c_f - c_e|, |c_f - c_e + eps kappa[n, e, f]|)

  so the e = e' pairs give eps (0 when H_e = 0) with equal offsets. Fully vectorised over N, K^2 and P
  (processed in blocks of problems so that the ``[n, K, K, P]`` ratios stay within :data:`BLOCK_ELEMENTS`).
- :func:`inconsistency_scores`: ``H[N, K, P, P]`` symmetric positive definite, common minimizer, equal offsets::

      I[n] = eps * max(1, max_{e != f} lambda_max(L_e^-1 H_f L_e^-T)),     H_e = L_e L_e^T

  by a batched Cholesky factorisation of every H_e, a batched triangular solve ``L_e^-1`` (against the
  identity, once per environment, reused for its K partners), batched matmuls and a batched ``eigvalsh`` of the
  ``[N, K, K, P, P]`` whitened pencils. Singular or indefinite Hessians (an eigenvalue at most
  ``RANK_RTOL * max|eigenvalue|`` of the reference, so exactly where the reference switches to its null-space
  route) and asymmetric ones are refused with a ValueError pointing to the reference, which handles them.

Bad input raises TypeError (bool/complex/object arrays) or ValueError (shape, non-finite, negative curvature,
eps <= 0), naming the argument and the first offending problem.
"""

from __future__ import annotations

import numpy as np

from hardtovary.reference import quadratic as _ref
from hardtovary.reference.validate import non_finite_error, positive

from .backend import array_module, to_numpy

#: Largest ``[n, K, K, P]`` (diagonal) or ``[n, K, K, P, P]`` (full) block processed at once, in float64 elements.
BLOCK_ELEMENTS = 1 << 22

_REFER = ("use hardtovary.reference.quadratic.inconsistency_score(QuadraticProblem(H[n]), eps) for it (null-space "
          "and semi-definite routes)")


def _real(x, name: str, ndim: int, shape_text: str):
    xp = array_module(x)
    arr = xp.asarray(x)
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be an array of a real dtype (integer or floating), got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_text}, got shape {arr.shape}")
    bad = ~xp.isfinite(arr)
    if bool(bad.any()):
        index = tuple(int(i) for i in to_numpy(xp.argwhere(bad)[0]))
        raise non_finite_error(name, int(bad.sum()), index, float(arr[index]))
    return xp, arr


def _blocks(N: int, per_problem: int):
    step = max(1, BLOCK_ELEMENTS // max(1, per_problem))
    for start in range(0, N, step):
        yield slice(start, min(N, start + step))


def inconsistency_scores_diagonal(lams, eps, offsets=None):
    """Exact ``I^eps`` of N problems with diagonal Hessians and a common minimizer (as the reference's).

    ``lams``: ``[N, K, P]`` real, finite, >= 0 (N, K, P >= 1). ``eps``: a real > 0. ``offsets``: ``[N, K]`` minimum
    values ``c_e`` or None (all 0). Returns ``[N]`` float64 (``inf`` where some level set is unbounded along a
    direction curved for another environment); equal to ``reference.quadratic.inconsistency_score_diagonal(lams[n],
    eps, offsets[n]).value`` for every n.
    """
    eps = positive(eps, "eps")
    xp, lams = _real(lams, "lams", 3, "[N, K, P] (diagonal Hessians of N problems)")
    N, K, P = lams.shape
    if 0 in lams.shape:
        raise ValueError(f"lams must have N, K, P >= 1, got shape {lams.shape}")
    if bool((lams < 0).any()):
        n, e, i = (int(j) for j in to_numpy(xp.argwhere(lams < 0)[0]))
        raise ValueError(f"lams must hold diagonal Hessians with entries >= 0, but lams[{n}, {e}, {i}] = "
                         f"{float(lams[n, e, i])}")
    if offsets is None:
        c = xp.zeros((N, K))
    else:
        _, c = _real(xp.asarray(offsets) if xp is not np else offsets, "offsets", 2, f"[N, K] = [{N}, {K}]")
        if c.shape != (N, K):
            raise ValueError(f"offsets must have shape [N, K] = [{N}, {K}] to match lams, got shape {c.shape}")
    scores = xp.empty(N)
    for block in _blocks(N, K * K * P):
        lam = lams[block]
        numerator, denominator = lam[:, None, :, :], lam[:, :, None, :]  # [n, e, f, i]: lam^f_i over lam^e_i
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratios = xp.where(denominator > 0, numerator / xp.where(denominator > 0, denominator, 1.0),
                              xp.where(numerator > 0, np.inf, 0.0))
            kappa = ratios.max(axis=3)  # [n, e, f]
            delta = c[block][:, None, :] - c[block][:, :, None]  # c_f - c_e
            top = xp.where(xp.isinf(kappa), np.inf, xp.abs(delta + eps * kappa))
        scores[block] = xp.maximum(xp.abs(delta), top).max(axis=(1, 2))
    return scores


def inconsistency_scores(H, eps):
    """Exact ``I^eps`` of N problems with K SPD Hessians each, a common minimizer and equal offsets.

    ``H``: ``[N, K, P, P]`` real, finite, symmetric (to ``reference.quadratic.SYMMETRY_RTOL``; symmetrised) and
    positive definite: every eigenvalue above ``RANK_RTOL * max|eigenvalue|`` of its matrix. ``eps``: a real > 0.
    Returns ``[N]`` float64, ``eps * max(1, max_{e != f} lambda_max(H_e^-1 H_f))``, equal to
    ``reference.quadratic.inconsistency_score(QuadraticProblem(H[n]), eps).value`` for every n.

    Singular, semi-definite or indefinite Hessians raise ValueError naming the first such ``H[n, e]``; the
    reference handles them (null-space route, possibly ``inf``).
    """
    eps = positive(eps, "eps")
    xp, H = _real(H, "H", 4, "[N, K, P, P] (N problems of K Hessians)")
    N, K, P, P2 = H.shape
    if P != P2 or 0 in H.shape:
        raise ValueError(f"H must have shape [N, K, P, P] with N, K, P >= 1, got shape {H.shape}")
    asym = xp.abs(H - xp.swapaxes(H, -1, -2)).max(axis=(2, 3))
    scale = xp.abs(H).max(axis=(2, 3))
    bad = asym > _ref.SYMMETRY_RTOL * scale
    if bool(bad.any()):
        n, e = (int(j) for j in to_numpy(xp.argwhere(bad)[0]))
        raise ValueError(f"H[{n}, {e}] must be symmetric: max |H - H^T| = {float(asym[n, e]):.3g} exceeds "
                         f"{_ref.SYMMETRY_RTOL:g} * max |H| = {_ref.SYMMETRY_RTOL * float(scale[n, e]):.3g}")
    H = (H + xp.swapaxes(H, -1, -2)) / 2.0

    scores = xp.empty(N)
    eye = xp.eye(P)
    for block in _blocks(N, K * K * P * P):
        Hb = H[block]
        n0 = block.start
        w = xp.linalg.eigvalsh(Hb)  # [n, K, P] ascending
        top = xp.abs(w).max(axis=2)
        flat = w[..., 0] <= _ref.RANK_RTOL * top
        if bool(flat.any()):
            n, e = (int(j) for j in to_numpy(xp.argwhere(flat)[0]))
            kind = "indefinite" if float(w[n, e, 0]) < 0 else "singular (or semi-definite)"
            raise ValueError(
                f"H[{n0 + n}, {e}] is {kind}: smallest eigenvalue {float(w[n, e, 0]):.6g} is not above "
                f"RANK_RTOL = {_ref.RANK_RTOL:g} times its largest |eigenvalue| {float(top[n, e]):.6g}; the batched "
                f"closed form needs positive definite Hessians: {_REFER}")
        try:
            L = xp.linalg.cholesky(Hb)  # [n, K, P, P] lower
        except np.linalg.LinAlgError as error:
            raise ValueError(f"a Cholesky factorisation failed in problems {n0}..{block.stop - 1} although every "
                             f"eigenvalue is positive (ill-conditioned: {error}); {_REFER}") from None
        if not bool(xp.isfinite(L).all()):  # CuPy may return NaN instead of raising
            raise ValueError(f"a Cholesky factorisation failed in problems {n0}..{block.stop - 1} although every "
                             f"eigenvalue is positive (ill-conditioned); {_REFER}")
        # L_e^-1, one triangular solve per environment
        Linv = xp.linalg.solve(L, xp.ascontiguousarray(xp.broadcast_to(eye, L.shape)))
        # M[n, e, f] = L_e^-1 H_f L_e^-T, the pencil (H_f, H_e) whitened by H_e
        M = xp.matmul(xp.matmul(Linv[:, :, None], Hb[:, None, :]), xp.swapaxes(Linv, -1, -2)[:, :, None])
        M = (M + xp.swapaxes(M, -1, -2)) / 2.0
        kappa = xp.linalg.eigvalsh(M)[..., -1]  # [n, e, f]
        kappa = xp.maximum(kappa, 0.0)
        diag = xp.arange(K)
        kappa[:, diag, diag] = 1.0  # W^T H_e W = I: kappa is 1 exactly for e = e'
        scores[block] = eps * kappa.max(axis=(1, 2))
    return scores
