"""Per-dtype tolerance policy for comparing a target with the float64 oracle.

Starting point: ``torch.testing.assert_close``'s defaults (``_DTYPE_PRECISIONS`` in torch/testing/_comparison.py)::

    dtype      rtol     atol
    float16    1e-3     1e-5
    bfloat16   1.6e-2   1e-5
    float32    1.3e-6   1e-5
    float64    1e-7     1e-7

The dtype is the dtype of the *inputs* the target was given (gradient stacks) or, for checks whose inputs are
always float64 (env_gradients, step, temporal), the dtype of the arrays the target returns: a target that
computes in float32 is held to float32 tolerances.

A component passes when ``|t - o| <= rtol * |o| + atol_eff``. Documented widenings of torch's rule:

1. **atol is relative to the component's input scale.** Gradient magnitudes span many orders (1e-20 .. 1e20 in
   the strategies), so an absolute 1e-5 is meaningless: at 1e-12 it accepts anything, at 1e12 nothing. We use
   ``atol_eff = (atol + K * eps(dtype)) * scale`` with ``scale = max_e |G[e, j]|`` (times the tensor's rescale
   factor ``n / n_kept`` when rescaling is on: rescaling amplifies the error by that same factor).
2. **The ``K * eps(dtype)`` term** is the classical bound on the rounding error of a K-term sum computed in the
   target's dtype; without it a correct float16/float32 mean with cancellation (e.g. 1e8 + 1 - 1e8) fails.
3. **Half the smallest subnormal of the dtype is always allowed** (``2**-25`` for float16, ``2**-150`` for
   float32): a target that returns its dtype must round the exact value to it, and below the smallest normal
   number that rounding is absolute, not relative: a float16 mean of exactly 17.5 subnormal steps (1.0431e-6)
   correctly rounds to 18 steps (1.0729e-6), 2.9% above the oracle's float64 value.

4. **The sign of a cancelling mean.** The authors' geometric mean takes the sign of the arithmetic mean. Where the
   exact mean is within a float sum's rounding error of 0, ``|mean| <= K * eps(dtype) * max_e |G[e, j]|`` (Higham's
   bound on the error of a K-term sum, divided by K), a target computing in its dtype cannot decide that sign: 0 or
   either sign is accepted there, and reported as a divergence (``Tolerance.sign_undecidable``). The oracle's own
   mean is exact in sign.

Discrete decisions are **exact**: where the oracle masks a component (its output is exactly 0.0 because the mask
is 0), the target must return exactly 0.0, whatever the dtype. Sign counts are integers and never need a
tolerance. The only place where a discrete disagreement is reported instead of failed is the named check
``agg.ties.float_noise`` (tau carrying float noise, where the answer depends on the dtype the target compares in).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: torch.testing defaults, by dtype name.
DEFAULTS = {
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7),
}

_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
#: Half the smallest positive subnormal number of each dtype: the largest error of rounding to it near zero
#: (float64's, 2**-1075, is not a float64 number: 0 there).
_HALF_SUBNORMAL = {"float16": 2.0**-25, "bfloat16": 2.0**-134, "float32": 2.0**-150, "float64": 0.0}


@dataclass(frozen=True)
class Tolerance:
    dtype: str
    rtol: float
    atol: float
    eps: float
    half_subnormal: float = 0.0

    def bound(self, oracle, scale, K: int = 1):
        """Elementwise allowed |t - o|."""
        o = np.asarray(oracle, dtype=np.float64)
        return (self.rtol * np.abs(o) + (self.atol + K * self.eps) * np.asarray(scale, dtype=np.float64)
                + self.half_subnormal)


    def sign_undecidable(self, exact_mean, largest, K: int):
        """Where the sign of a mean of K terms, each at most ``largest`` in magnitude, is within the rounding error of
        a sum in this dtype (widening 4)."""
        return np.abs(np.asarray(exact_mean, dtype=np.float64)) <= K * self.eps * np.asarray(largest, dtype=np.float64)


def dtype_name(dtype) -> str:
    name = getattr(dtype, "name", None) or str(dtype)
    name = name.replace("torch.", "")
    return name if name in DEFAULTS else "float64"


def for_dtype(dtype) -> Tolerance:
    """The policy for one dtype (numpy dtype, dtype name, or anything whose str is e.g. 'torch.float32')."""
    name = dtype_name(dtype)
    rtol, atol = DEFAULTS[name]
    return Tolerance(name, rtol, atol, _EPS[name], _HALF_SUBNORMAL[name])


def within(target, oracle, bound) -> np.ndarray:
    """Elementwise pass mask; NaN in the target never passes."""
    t = np.asarray(target, dtype=np.float64)
    o = np.asarray(oracle, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.abs(t - o) <= bound
    return ok & np.isfinite(t)
