"""Exact inconsistency score I^eps of K full SPD Hessians, against one dense symmetric eigendecomposition.

K = 16 environments with SPD Hessians of size P = 512 and a common minimizer: I^eps = eps * max over the
K (K - 1) ordered pairs of lambda_max(H_e^{-1} H_e'). Printed side by side (best of N):

- one ``scipy.linalg.eigh`` of a P x P matrix (the unit of cost);
- ``quadratic.inconsistency_score`` (the library's choice);
- formulations of the same number: a generalized ``eigh(H_e', H_e)`` per pair (all eigenvalues); one Cholesky
  factor per environment reused across pairs with either all eigenvalues or only the largest of
  ``L_e^{-1} H_e' L_e^{-T}`` (two triangular solves); one eigendecomposition per environment with the dense
  whitened ``W^T H_e' W``, largest eigenvalue only.

Run: ``python bench/bench_inconsistency.py [--K 16] [--P 512] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg as sla

from hardtovary.reference import quadratic


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def random_spd(K, P, rng):
    A = rng.standard_normal((K, P, P)) / np.sqrt(P)
    return np.einsum("kij,klj->kil", A, A) + 0.1 * np.eye(P)


def per_pair_generalized(H):
    K = len(H)
    return max(sla.eigh(H[f], H[e], eigvals_only=True)[-1] for e in range(K) for f in range(K) if e != f)


def cholesky_reused(H, largest_only):
    K, P = len(H), H.shape[1]
    best = -np.inf
    for e in range(K):
        L = sla.cholesky(H[e], lower=True)
        for f in range(K):
            if f == e:
                continue
            M = sla.solve_triangular(L, sla.solve_triangular(L, H[f], lower=True).T, lower=True)
            M = (M + M.T) / 2
            if largest_only:
                top = sla.eigh(M, eigvals_only=True, subset_by_index=[P - 1, P - 1])[0]
            else:
                top = sla.eigh(M, eigvals_only=True)[-1]
            best = max(best, top)
    return best


def eigen_whitening(H):
    """One eigendecomposition per environment, whitening ``W = V diag(w^-1/2)``, largest eigenvalue of the dense
    ``W^T H_e' W`` (the library's route for singular H_e)."""
    K, P = len(H), H.shape[1]
    best = -np.inf
    for e in range(K):
        w, V = sla.eigh(H[e])
        W = V / np.sqrt(w)
        for f in range(K):
            if f != e:
                M = W.T @ H[f] @ W
                best = max(best, sla.eigh((M + M.T) / 2, eigvals_only=True, subset_by_index=[P - 1, P - 1])[0])
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--K", type=int, default=16)
    parser.add_argument("--P", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    H = random_spd(args.K, args.P, np.random.default_rng(0))
    problem = quadratic.QuadraticProblem(H)
    t_eig, _ = best_time(lambda: sla.eigh(H[0]), args.repeats)
    rows = [("one dense eigh (P x P)", t_eig, None)]
    t, score = best_time(lambda: quadratic.inconsistency_score(problem, 1.0), args.repeats)
    rows.append(("quadratic.inconsistency_score", t, score.value))
    for name, fn in [("generalized eigh per pair", lambda: per_pair_generalized(H)),
                     ("Cholesky per env, full eigh", lambda: cholesky_reused(H, False)),
                     ("Cholesky per env, largest only", lambda: cholesky_reused(H, True)),
                     ("eigh per env, dense W^T H W", lambda: eigen_whitening(H))]:
        t, value = best_time(fn, max(1, args.repeats - 2))
        rows.append((name, t, value))
    print(f"K = {args.K}, P = {args.P}, {args.K * (args.K - 1)} ordered pairs")
    print(f"{'formulation':<34}{'seconds':>10}{'x one eigh':>12}{'I/eps':>14}")
    for name, t, value in rows:
        shown = "" if value is None else f"{value:.10g}"
        print(f"{name:<34}{t:>10.3f}{t / t_eig:>12.1f}{shown:>14}")


if __name__ == "__main__":
    main()
