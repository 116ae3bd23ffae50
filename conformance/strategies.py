"""Hypothesis strategies for the conformance suite, exported for reuse in other test suites.

Draw them with labels (``data.draw(strategy, label="grads[0]")``) so that a counterexample names its pieces.
All strategies shrink towards small K, small shapes, magnitude 1 and unanimous positive signs.

- :func:`env_counts`            K in 1..16
- :func:`float_dtypes`          float64 / float32 / float16
- :func:`param_shapes`          () to 2-D shapes with sides 1..5
- :func:`taus`                  tau values, including the exact tie values j/K and the usual 0, 0.5, 1
- :func:`gradient_stack`        one stack G[K, *shape] of a dtype: magnitudes spanning many orders (per dtype,
                                kept inside its normal range), exact zeros, sign patterns steered towards or
                                away from the tie |S| = ceil(tau*K), and special values (1, powers of 2, the
                                smallest normal of the dtype)
- :func:`gradient_lists`        a model's list of stacks (1..3 tensors) sharing K and dtype
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hardtovary.reference.rules import agreement_threshold_count

DTYPES = ("float64", "float32", "float16")

#: decimal exponent range of the magnitudes per dtype: wide, but far from overflow of a K = 16 sum and from
#: subnormals (out of scope, as in array-api-tests).
EXPONENTS = {"float64": (-20, 20), "float32": (-12, 12), "float16": (-4, 2)}

SIGN_MODES = ("random", "ties", "away_from_ties", "unanimous", "zeros")


def env_counts(max_k: int = 16) -> st.SearchStrategy[int]:
    return st.integers(1, max_k)


def float_dtypes(dtypes=DTYPES) -> st.SearchStrategy[str]:
    return st.sampled_from(tuple(dtypes))


def param_shapes(max_dims: int = 2, max_side: int = 5) -> st.SearchStrategy[tuple]:
    return hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=1, max_side=max_side)


def taus(K: int) -> st.SearchStrategy[float]:
    """Common values and the tie values j/K (computed as j/K in float64)."""
    return st.one_of(st.sampled_from((0.0, 0.5, 1.0, 0.25, 0.7, 0.9)), st.integers(0, K).map(lambda j: j / K))


def threshold(tau: float, K: int) -> int:
    """The canonical keep threshold (:func:`hardtovary.reference.rules.agreement_threshold_count`)."""
    return agreement_threshold_count(tau, K)


@st.composite
def _magnitudes(draw, n: int, dtype: str):
    lo, hi = EXPONENTS[dtype]
    exps = draw(hnp.arrays(np.int64, n, elements=st.integers(lo, hi)))
    mant = draw(hnp.arrays(np.float64, n, elements=st.floats(1.0, 9.99, allow_nan=False)))
    values = mant * 10.0 ** exps
    specials = np.array([1.0, 0.5, 2.0**-7, 3.0, float(np.finfo(dtype).tiny) * 4])
    use_special = draw(hnp.arrays(np.int64, n, elements=st.integers(-1, len(specials) - 1)))
    # -1 (the shrink target is 0, so index 0 = 1.0) means "no special value"
    return np.where(use_special >= 0, specials[np.clip(use_special, 0, None)], values)


@st.composite
def sign_patterns(draw, K: int, n: int, tau: float | None = None, mode: str | None = None):
    """Signs [K, n] in {-1, 0, +1}; ``mode`` steers the per-component sign sums (see SIGN_MODES)."""
    if mode is None:
        mode = draw(st.sampled_from(SIGN_MODES))
    if mode == "unanimous":
        col = draw(hnp.arrays(np.int64, n, elements=st.sampled_from((1, -1))))
        return np.broadcast_to(col, (K, n)).copy()
    if mode == "random" or (mode in ("ties", "away_from_ties") and tau is None):
        return draw(hnp.arrays(np.int64, (K, n), elements=st.sampled_from((1, -1, 0))))
    if mode == "zeros":
        return draw(hnp.arrays(np.int64, (K, n), elements=st.sampled_from((0, 1, -1, 0))))
    T = threshold(tau, K)
    offsets = (0,) if mode == "ties" else (-2, -1, 1, 2)
    off = draw(hnp.arrays(np.int64, n, elements=st.sampled_from(offsets + (0,) if mode == "ties" else offsets)))
    zeros = draw(hnp.arrays(np.int64, n, elements=st.integers(0, K)))
    neg = draw(hnp.arrays(np.bool_, n))
    s = np.clip(T + off, 0, K)
    z = np.minimum(zeros, K - s)
    z = np.where((K - z - s) % 2 == 1, np.where(z > 0, z - 1, z + 1), z)  # parity of p - q is that of K - z
    s = np.minimum(s, K - z)
    s = np.where((K - z - s) % 2 == 1, s - 1, s)
    p = (K - z + s) // 2
    q = K - z - p
    plus, minus = np.where(neg, q, p), np.where(neg, p, q)
    rows = np.arange(K)[:, None]
    signs = np.where(rows < plus, 1, np.where(rows < plus + minus, -1, 0))
    perm = draw(st.permutations(range(K)))
    return signs[np.asarray(perm, dtype=np.int64)]


@st.composite
def gradient_stack(draw, K: int, shape: tuple, dtype: str, tau: float | None = None, mode: str | None = None):
    """One stack G[K, *shape] of ``dtype`` (sign(G) is exactly the drawn pattern: magnitudes stay normal)."""
    n = int(np.prod(shape, dtype=np.int64))
    signs = draw(sign_patterns(K, n, tau=tau, mode=mode))
    mags = draw(_magnitudes(K * n, dtype)).reshape(K, n)
    return (signs * mags).astype(dtype).reshape((K,) + tuple(shape))


@st.composite
def gradient_lists(draw, K: int, dtype: str, tau: float | None = None, max_tensors: int = 3):
    n_tensors = draw(st.integers(1, max_tensors))
    return [draw(gradient_stack(K, draw(param_shapes()), dtype, tau)) for _ in range(n_tensors)]
