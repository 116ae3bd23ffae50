"""The aggregation rules of :mod:`hardtovary.reference.rules`, as single-pass computations over a ``[K, P]`` stack.

Same semantics and argument rules as the oracle (see its module docstring for the formulas, and
:mod:`hardtovary.reference.edge_cases` for the edge cases); written once against an array module ``xp`` (NumPy or
CuPy, :func:`hardtovary.accel.backend.array_module`), so the code CI runs on NumPy is the code a GPU runs, except
for the fused CUDA kernels below, which compute the same expressions in one pass and are checked against the NumPy
path by ``bench/gpu_check.py``.

How a stack is computed
-----------------------
A gradient stack ``G[K, *shape]`` is viewed as ``[K, P]`` (``P = prod(shape)``). One pass over the K rows gives,
per coordinate j, the statistics every rule needs:

- ``S_j = sum_e sign(G[e, j])`` (sign(0) = 0), an exact integer: the mask decisions are integer comparisons,
  ``|S| >= thr`` with the oracle's keep threshold ``thr = spec.threshold(K)`` (canonical AND-mask), ``|S| == K``
  (paper geometric mean), so masks are bit-equal with the oracle in every dtype;
- ``sum_e G[e, j]`` (the mean is ``sum / K``);
- ``sum_e log|G[e, j]|`` (paper geometric mean) or ``sum_e log(|G[e, j]| + 1e-10)`` (original flavour), one
  logarithm per pair of environments (:func:`_sumlog_by_pairs`);
- for the SAND-mask, the shifted sums ``sum_e d`` and ``sum_e d*d`` with ``d = G[e, j] - G[0, j]`` (the one-pass
  variance ``(sum d^2 - (sum d)^2 / K) / (K - 1)``; shifting by a sample bounds the cancellation: the relative
  error is at most about ``K (K + 1) eps``, since ``(G[0] - mean)^2`` is one term of the sum of squared deviations).
  ``var == 0`` (identical gradients, K = 1, or a spread below the dtype's range) takes the oracle's limit rule:
  1 where ``A > tau``, else 0; a sum of squares that overflows gives ``var = inf`` (mask 0, as the oracle's tiny
  value). ``A - tau`` and ``A > tau`` are evaluated in float64, exactly as the oracle.

and writes the rule's value and mask. On NumPy the pass runs over column blocks that stay in cache
(:data:`NUMPY_BLOCK_ELEMENTS`), so the stack is read from memory once. On CuPy a fused ``cupy.ElementwiseKernel``
(one thread per coordinate looping over K, coalesced reads; :data:`HARD_KERNEL_SOURCE`, :data:`SAND_KERNEL_SOURCE`)
computes the same thing; :func:`_block_spec_hard` / :func:`_block_spec_sand` are the NumPy expressions that
specify what the kernels compute, line for line. CuPy compiles with ``-ftz=true`` (float32 operations read
subnormals as 0); the kernels take signs from the bits and redo the rare columns a flushed subnormal changed
(:data:`_DEVICE_HELPERS`), so they agree with the oracle on subnormal gradients, which CuPy's own operations (the
expressions with ``use_kernel=False`` on CuPy) do not.

Precision: float64 input is computed in float64, float32 and float16 in float32 (:func:`compute_dtype`); values
(and the SAND soft mask) are returned in the input dtype, AND-masks as ``bool``. A float32 stack whose sum over
environments overflows float32 is recomputed in float64. Non-finite gradients raise ``ValueError`` naming the
stack and the first bad entry (detected from the non-finite sums, one host synchronisation per call).

Rescaling (paper App. B.3.1, footnote 14) is per tensor: the value is multiplied by ``n / n_kept`` on the device; a
fully masked tensor is exactly 0. On CuPy the hard rules' kernels count ``n_kept`` (and flag non-finite sums) in
their own pass, and the scaling is one more pass over the value, in place; elsewhere ``n_kept`` is a reduction of
the mask and the finiteness check a pass over the value.

The rule is a :class:`hardtovary.reference.rules.RuleSpec` (validated by the oracle); :data:`REGISTRY` says how
each rule is computed here (:class:`AccelRule`), and :func:`plan` resolves a spec for K environments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from hardtovary.reference import rules as _ref
from hardtovary.reference.rules import RuleSpec, aggregate_arguments
from hardtovary.reference.validate import consistent_stacks
from hardtovary.reference.validate import finite as _finite_or_raise

from .backend import array_module, to_numpy

RULES = _ref.RULES
FLAVOURS = _ref.FLAVOURS
ORIGINAL_LOG_EPSILON = _ref.ORIGINAL_LOG_EPSILON

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: Elements of a ``[K, block]`` slab processed at once on NumPy (about 1 MiB in float32: it and its temporaries
#: stay in L2, so the stack is streamed from memory once).
NUMPY_BLOCK_ELEMENTS = 1 << 18

__all__ = ["aggregate", "aggregate_stack", "compute_dtype", "AccelRule", "REGISTRY", "Plan", "plan", "stack_rule",
           "RULES", "FLAVOURS", "HARD_KERNEL_SOURCE", "SAND_KERNEL_SOURCE"]

# Kernel variants: the ids shared by the plans and the CUDA source (#defines in _KERNEL_PREAMBLE).
_MEAN, _AND, _GM_PAPER, _GM_ORIGINAL, _SAND = 0, 1, 2, 3, 4
_RESCALE = 5  # the in-place rescaling kernel of the counting (hard) rules


def compute_dtype(dtype) -> np.dtype:
    """The dtype the rules compute in for gradients of ``dtype``: float64 for float64, float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


class AccelRule(NamedTuple):
    """How this module computes one rule of the oracle's registry (an entry of :data:`REGISTRY`).

    - ``block(g, p, cdt, xp) -> (value, mask)``: the rule on a ``[K, C]`` block ``g`` of the array module ``xp``
      (NumPy or CuPy) for the :class:`Plan` ``p``, in the compute dtype ``cdt``: value ``[C]`` in cdt, NaN where the
      sum over environments is not finite (:func:`aggregate` turns that into an error or a float64 recomputation);
      mask ``[C]``, bool, or in cdt for a ``soft_mask``.
    - ``kernel(spec)``: the variant of the fused CUDA kernel that computes the same as ``block`` (one of the
      ``_MEAN``.. ids; ``block`` is then its specification), or None: ``block`` runs on CuPy as well.
    - ``soft_mask``: the mask is soft, in the compute dtype (returned in the gradients' dtype), not bool.
    """

    block: Callable
    kernel: Callable[[RuleSpec], int] | None = None
    soft_mask: bool = False


class Plan(NamedTuple):
    """A rule resolved for stacks of K environments (:func:`plan`): the ``spec``, K, ``thr`` its keep threshold
    ``spec.threshold(K)`` (an integer; K for the paper geometric mean), the ``entry`` of :data:`REGISTRY` and
    ``kind``, the fused kernel's variant (None for a rule without one)."""

    spec: RuleSpec
    K: int
    thr: int
    entry: AccelRule
    kind: int | None


def plan(spec: RuleSpec, K: int) -> Plan:
    """Resolve a ``RuleSpec`` for stacks of K environments; NotImplementedError for a rule without an entry in
    :data:`REGISTRY`."""
    if not isinstance(spec, RuleSpec):
        raise TypeError(f"spec must be a RuleSpec, got {type(spec).__name__} {spec!r}")
    if spec.rule not in REGISTRY:
        raise NotImplementedError(f"rule {spec.rule!r} has no entry in hardtovary.accel.rules.REGISTRY; it has "
                                  f"{sorted(REGISTRY)}")
    entry = REGISTRY[spec.rule]
    return Plan(spec, K, spec.threshold(K), entry, None if entry.kernel is None else entry.kernel(spec))


# ----------------------------------------------------------------------------------------------------------------
# The spec: NumPy/CuPy expressions over a [K, C] block (what the CUDA kernels compute)
# ----------------------------------------------------------------------------------------------------------------


def _sumlog_by_pairs(a, needed, cdt: np.dtype, xp):
    """``sum_e log a[e]`` over axis 0 of the magnitudes ``a [K, C]``, one logarithm per pair of rows,
    ``log(a[0] a[1]) + log(a[2] a[3]) + ...`` (and ``log a[K-1]`` for an odd K), as the geometric-mean kernels: the
    product's rounding is below the logarithm's own, and half the logarithms are saved. A ``needed`` column (the
    others are masked) where some pair's product is not a normal number (overflow, underflow, a zero) is summed one
    row at a time."""
    K = a.shape[0]
    pairs = K // 2 * 2
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        products = a[0:pairs:2] * a[1:pairs:2]
        sumlog = xp.log(products).sum(axis=0)
        if K % 2:
            sumlog = sumlog + xp.log(a[K - 1])
        info = np.finfo(cdt)
        redo = xp.flatnonzero(needed & ((products < info.tiny) | ~(products <= info.max)).any(axis=0))
        if redo.size:
            sumlog[redo] = xp.log(a[:, redo]).sum(axis=0)
    return sumlog


def _block_spec_hard(g, p: Plan, cdt: np.dtype, xp):
    """Mean, AND-mask and geometric mean of a ``[K, C]`` block: ``(value [C] in cdt, keep [C] bool)``.

    Specification of :data:`HARD_KERNEL_SOURCE`. Where the sum over environments is not finite (non-finite input,
    or float32 overflow) the value is NaN; :func:`aggregate` turns that into an error or a float64 recomputation.
    """
    g = g.astype(cdt, copy=False)
    K = p.K
    S = xp.sign(g).sum(axis=0)  # exact small integers (|S| <= K < 2**24) held in cdt
    with np.errstate(over="ignore", invalid="ignore"):  # overflow -> non-finite total -> handled by aggregate
        total = g.sum(axis=0)
    mean = total / cdt.type(K)
    absS = xp.abs(S)
    zero = cdt.type(0)
    if p.kind == _MEAN:
        keep = xp.ones(total.shape, dtype=bool)
        value = mean
    elif p.kind == _AND:
        keep = absS >= p.thr
        value = xp.where(keep, mean, zero)
    elif p.kind == _GM_PAPER:
        keep = absS == K
        sumlog = _sumlog_by_pairs(xp.abs(g), keep, cdt, xp)  # -inf where some |g| = 0; such a column has |S| < K
        value = xp.where(keep, xp.sign(S) * xp.exp(sumlog / cdt.type(K)), zero)
    else:  # _GM_ORIGINAL
        keep = absS >= p.thr
        sumlog = _sumlog_by_pairs(xp.abs(g) + cdt.type(ORIGINAL_LOG_EPSILON), keep, cdt, xp)
        value = xp.where(keep, xp.sign(mean) * xp.exp(sumlog / cdt.type(K)), zero)
    value = xp.where(xp.isfinite(total), value, cdt.type(np.nan))
    return value.astype(cdt, copy=False), keep


def _block_spec_sand(g, p: Plan, cdt: np.dtype, xp):
    """SAND-mask of a ``[K, C]`` block: ``(value [C], mask [C])`` in cdt. Specification of
    :data:`SAND_KERNEL_SOURCE` (one-pass variance shifted by the first environment; limit rules)."""
    g = g.astype(cdt, copy=False)
    K = p.K
    S = xp.sign(g).sum(axis=0)
    with np.errstate(over="ignore", invalid="ignore"):  # overflows are handled below / by aggregate
        total = g.sum(axis=0)
        mean = total / cdt.type(K)
        d = g - g[0]
        sd = d.sum(axis=0)
        sdd = (d * d).sum(axis=0)
    diff = xp.abs(S).astype(np.float64) / K - p.spec.tau  # A - tau in float64, as the oracle
    above = diff > 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if K == 1:
            var = xp.zeros_like(total)
        else:
            var = (sdd - (sd / cdt.type(K)) * sd) / cdt.type(K - 1)
            var = xp.where(xp.isinf(sdd), cdt.type(np.inf), xp.maximum(var, cdt.type(0)))
            var = xp.where(sdd == 0, cdt.type(0), var)
        arg = (p.spec.k * diff).astype(cdt) / var  # k (A - tau) in float64, then in cdt (inf -> tanh = +-1)
        t = xp.tanh(arg)
        smooth = xp.where(t > 0, t, cdt.type(0))  # max(tanh, 0); inf/inf (k and var both beyond cdt) -> 0
    mask = xp.where(var == 0, above.astype(cdt), smooth).astype(cdt, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        value = xp.where(xp.isfinite(total), mask * mean, cdt.type(np.nan))
    return value.astype(cdt, copy=False), mask


#: How each rule of the oracle's registry is computed here (module docstring of
#: :mod:`hardtovary.reference.rules`, "How to add a rule").
REGISTRY: dict[str, AccelRule] = {
    "mean": AccelRule(_block_spec_hard, lambda spec: _MEAN),
    "and_mask": AccelRule(_block_spec_hard, lambda spec: _AND),
    "geometric_mean": AccelRule(_block_spec_hard,
                                lambda spec: _GM_PAPER if spec.flavour == "paper" else _GM_ORIGINAL),
    "sand_mask": AccelRule(_block_spec_sand, lambda spec: _SAND, soft_mask=True),
}


def _xp_stack_rule(G2, p: Plan, cdt: np.dtype, xp):
    """The rule's block applied to a whole ``[K, P]`` stack, in cache-sized column blocks on NumPy (one block on
    CuPy)."""
    K, P = G2.shape
    block = p.entry.block
    # Non-finite sums (bad input, float32 overflow) are marked NaN and resolved by aggregate: no warnings here.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if xp is not np or K * P <= NUMPY_BLOCK_ELEMENTS:
            return block(G2, p, cdt, xp)
        value = np.empty(P, dtype=cdt)
        mask = np.empty(P, dtype=cdt if p.entry.soft_mask else bool)
        step = max(1, NUMPY_BLOCK_ELEMENTS // K)
        for start in range(0, P, step):
            stop = min(P, start + step)
            value[start:stop], mask[start:stop] = block(G2[:, start:stop], p, cdt, xp)
        return value, mask


# ----------------------------------------------------------------------------------------------------------------
# The fused CUDA kernels (CuPy only)
# ----------------------------------------------------------------------------------------------------------------

#: Device functions of the rule kernels. CuPy compiles its kernels with ``-ftz=true``, under which float32
#: comparisons and arithmetic read a subnormal operand as 0. So that a subnormal float32 gradient counts as in the
#: oracle, its sign is taken from the bits (``htv_sign``), and where a float32 result that depends on it came out
#: wrong (the paper geometric mean's ``sum log|g|`` is -inf although no g is 0; the original flavour's sum of a
#: kept column is 0), the column is summed again from exact values, off the hot loop (a subnormal is
#: ``m * 2^-149``, exact in float64). ``htv_sumlog_one_by_one`` is also the fallback of the geometric means'
#: pairs (``htv_normal``: a product outside the normal range).
_DEVICE_HELPERS = r"""
__device__ __forceinline__ int htv_sign(float x) {
    const int b = __float_as_int(x);
    return (b > 0) - (b < 0 && b != (int)0x80000000);   // -0 has only the sign bit: sign 0
}
__device__ __forceinline__ int htv_sign(double x) {
    return (x > 0.0) - (x < 0.0);
}
__device__ __forceinline__ bool htv_subnormal(float x, int& m) {
    m = __float_as_int(x) & 0x7fffffff;
    return m != 0 && m < 0x00800000;
}
__device__ __forceinline__ double htv_exact(float x) {
    int m;
    if (!htv_subnormal(x, m)) return (double)x;
    const double v = (double)m * 1.4012984643248170709e-45;   // m * 2^-149
    return __float_as_int(x) < 0 ? -v : v;
}
__device__ __forceinline__ bool htv_normal(float a) { return a >= 1.17549435e-38f && a <= 3.40282347e+38f; }
__device__ __forceinline__ bool htv_normal(double a) {
    return a >= 2.2250738585072014e-308 && a <= 1.7976931348623157e+308;
}
// sum_e log|g_e| (paper) or sum_e log(|g_e| + eps) (original) of a column, one environment at a time, in the
// loop's order; the logarithm of a float32 subnormal is taken exactly (the pair loop's fallback).
template <typename T, typename C>
__device__ C htv_sumlog_one_by_one(const T* g, int K, long long P, bool original, C leps) {
    C s = 0;
    for (int e = 0; e < K; ++e, g += P) {
        const C x = (C)*g;
        int m;
        if (original) s += log(fabs(x) + leps);
        else if (sizeof(C) == 4 && htv_subnormal((float)x, m))
            s += (C)(log((double)m) - 149.0 * 0.69314718055994530942);   // |x| = m * 2^-149
        else s += log(fabs(x));
    }
    return s;
}
// The sign of a column's sum, from the exact values summed in float64.
template <typename T>
__device__ int htv_exact_sign_of_sum(const T* g, int K, long long P) {
    double s = 0;
    for (int e = 0; e < K; ++e, g += P) s += htv_exact((float)*g);
    return (s > 0.0) - (s < 0.0);
}
"""
_KERNEL_PREAMBLE = _DEVICE_HELPERS + r"""
#define HTV_MEAN 0
#define HTV_AND 1
#define HTV_GM_PAPER 2
#define HTV_GM_ORIGINAL 3
"""

#: ``cupy.ElementwiseKernel`` operation for mean / AND-mask / geometric mean. Parameters:
#: in ``raw T G`` (the C-contiguous ``[K, P]`` stack, passed flattened to 1-D), ``int32 K``, ``int64 P``,
#: ``int32 thr``, ``float64 log_eps``, ``int32 n_slots``; out ``C out`` (value in the compute dtype), ``bool keep``,
#: ``raw uint64 kept``, ``raw int32 bad`` (:data:`_COUNT_AFTER_LOOP`). One thread per coordinate i. ``RULE`` is a
#: compile-time constant (one of the ``HTV_*`` ids), one kernel per rule, so the branches on it vanish and the
#: mean / AND-mask kernels carry no logarithm: fewer registers, more loads in flight, which a memory-bound kernel
#: needs to reach copy bandwidth. The geometric means are bound by their logarithms' instructions, so they take
#: one per pair of environments (:func:`_sumlog_by_pairs` specifies it); a product kept normalised with ``frexp``
#: (one logarithm per coordinate) measured slower. Measurements and instruction counts: ``docs/benchmarks.md``.
HARD_KERNEL_SOURCE = r"""
// Coordinate i of the [K, P] stack: walk the K environments with stride P. Neighbouring threads read
// neighbouring addresses, so every load is coalesced. C (float or double) is the compute type, bound by `out`.
int S = 0;                   // sum of signs, sign(0) = 0: exact
C sum = 0;                   // sum over environments (mean = sum / K)
C sumlog = 0;                // sum of log|g| (paper) or log(|g| + 1e-10) (original)
const C leps = (C)log_eps;
const T* g = &G[i];
int e = 0;
bool pairs_normal = true;    // every product of a pair normal: no overflow, no underflow, no zero
if (RULE == HTV_GM_PAPER || RULE == HTV_GM_ORIGINAL) {
    // The geometric means take one logarithm per pair of environments, log(a0 * a1): the product's rounding
    // (2^-24 relative in float32) is below the logarithm's own. A pair whose product is not a normal number
    // sends the column to the one-by-one sum after the loop.
    #pragma unroll 2
    for (; e + 1 < K; e += 2, g += 2 * P) {
        const C x0 = (C)g[0];
        const C x1 = (C)g[P];
        S += htv_sign(x0) + htv_sign(x1);
        sum += x0;
        sum += x1;
        const C a = RULE == HTV_GM_PAPER ? fabs(x0) * fabs(x1) : (fabs(x0) + leps) * (fabs(x1) + leps);
        pairs_normal &= htv_normal(a);
        sumlog += log(a);
    }
}
#pragma unroll 4
for (; e < K; ++e, g += P) {  // every environment (mean, AND-mask), or the last of an odd K (geometric means)
    const C x = (C)*g;
    S += htv_sign(x);
    sum += x;
    if (RULE == HTV_GM_PAPER) {
        sumlog += log(fabs(x));          // -inf where x == 0: that coordinate has |S| < K and is masked
    } else if (RULE == HTV_GM_ORIGINAL) {
        sumlog += log(fabs(x) + leps);
    }
}
const int absS = S < 0 ? -S : S;
const C mean = sum / (C)K;
bool k;
C v;
if (RULE == HTV_MEAN) {
    k = true;
    v = mean;
} else if (RULE == HTV_AND) {
    k = absS >= thr;
    v = k ? mean : (C)0;
} else if (RULE == HTV_GM_PAPER) {
    k = absS == K;
    if (k && (!pairs_normal || (isinf(sumlog) && sumlog < 0)))   // a pair out of range, or a flushed subnormal
        sumlog = htv_sumlog_one_by_one(&G[i], K, P, false, leps);
    v = k ? (S > 0 ? (C)1 : (C)-1) * exp(sumlog / (C)K) : (C)0;
} else {  // HTV_GM_ORIGINAL: sign of the arithmetic mean, geometric mean of the magnitudes
    k = absS >= thr;
    if (k && !pairs_normal) sumlog = htv_sumlog_one_by_one(&G[i], K, P, true, leps);
    int sign = (mean > (C)0) - (mean < (C)0);
    if (sizeof(C) == 4 && k && sign == 0) sign = htv_exact_sign_of_sum(&G[i], K, P);  // subnormals
    v = k ? (C)sign * exp(sumlog / (C)K) : (C)0;
}
if (!isfinite(sum)) {
    v = sum - sum;           // NaN: non-finite input or overflow, resolved on the host
}
out = v;
keep = k;
htv_count(k, !isfinite(sum), htv_kept, htv_bad);
"""

#: The kept count and the non-finite flag of :data:`HARD_KERNEL_SOURCE`, accumulated in the same pass: per thread
#: in the loop (a 32-bit count and a flag: the kernel keeps the registers of the kernel without them, so the
#: occupancy a memory-bound kernel needs); after it, per warp (``__reduce_add_sync`` over whichever lanes are
#: converged, sm_80 and later; one shared-memory atomic per thread before), per block in shared memory, and one
#: 64-bit atomic per block into one of the ``n_slots`` slots of ``kept`` (spread, so that blocks rarely wait for
#: each other's atomics), summed on the device afterwards (:func:`_counted_rules`); ``bad[0]`` is raised when a
#: sum over environments was not finite.
_COUNT_PREAMBLE = r"""
__device__ __forceinline__ void htv_count(bool k, bool nonfinite, unsigned int& kept, int& bad) {
    kept += k;
    bad |= nonfinite;
}
"""
_COUNT_LOOP_PREP = r"""
unsigned int htv_kept = 0;
int htv_bad = 0;
__shared__ unsigned int htv_block_kept;
__shared__ int htv_block_bad;
if (threadIdx.x == 0) {
    htv_block_kept = 0;
    htv_block_bad = 0;
}
__syncthreads();
"""
_COUNT_AFTER_LOOP = r"""
#if __CUDA_ARCH__ >= 800
{
    const unsigned int active = __activemask();
    const unsigned int warp_kept = __reduce_add_sync(active, htv_kept);
    const unsigned int warp_bad = __reduce_or_sync(active, (unsigned int)htv_bad);
    if ((int)(threadIdx.x & 31) == __ffs(active) - 1) {
        if (warp_kept) atomicAdd(&htv_block_kept, warp_kept);
        if (warp_bad) atomicOr(&htv_block_bad, 1);
    }
}
#else
if (htv_kept) atomicAdd(&htv_block_kept, htv_kept);
if (htv_bad) atomicOr(&htv_block_bad, 1);
#endif
__syncthreads();
if (threadIdx.x == 0) {
    if (htv_block_kept) atomicAdd(&kept[blockIdx.x % n_slots], (unsigned long long)htv_block_kept);
    if (htv_block_bad) atomicOr(&bad[0], 1);
}
"""
#: Slots of a tensor's kept count (:data:`_COUNT_AFTER_LOOP`).
KEPT_SLOTS = 1024

#: ``cupy.ElementwiseKernel`` operation scaling a value in place by ``n / n_kept`` (0 when nothing is kept), the
#: factor computed in float64 and cast to the compute type, as :func:`_rescale`; ``n_kept`` on the device.
RESCALE_KERNEL_SOURCE = r"""
const double t = (double)n_kept[0];
v = v * (C)(t > 0 ? n / t : 0.0);
"""

#: ``cupy.ElementwiseKernel`` operation for the SAND-mask. in ``raw T G``, ``int32 K``, ``int64 P``,
#: ``float64 tau``, ``float64 sharp`` (k); out ``C out`` (value), ``C mask`` (soft mask).
SAND_KERNEL_SOURCE = r"""
// One pass: sign count, sum, and the sums of d and d*d with d = g - g[0] (shifted one-pass variance).
int S = 0;
C sum = 0, sd = 0, sdd = 0;
const C g0 = (C)G[i];
const T* g = &G[i];
#pragma unroll 4
for (int e = 0; e < K; ++e, g += P) {
    const C x = (C)*g;
    S += htv_sign(x);
    sum += x;
    const C d = x - g0;
    sd += d;
    sdd += d * d;
}
const int absS = S < 0 ? -S : S;
const double diff = (double)absS / (double)K - tau;     // A - tau in float64, exactly as the oracle
C var;
if (K == 1 || sdd == (C)0) {
    var = 0;                                            // identical gradients / K = 1: the limit rule
} else if (isinf(sdd)) {
    var = (C)1 / (C)0;                                  // +inf: spread beyond the dtype's range, mask ~ 0
} else {
    var = (sdd - (sd / (C)K) * sd) / (C)(K - 1);
    if (var < (C)0) var = 0;
}
C m;
if (var == (C)0) {
    m = diff > 0 ? (C)1 : (C)0;
} else {
    m = tanh((C)(sharp * diff) / var);                  // k (A - tau) in float64, then the compute type
    if (!(m > (C)0)) m = 0;                             // max(tanh, 0); inf/inf -> NaN -> 0, as the spec
}
C v = m * (sum / (C)K);
if (!isfinite(sum)) {
    v = sum - sum;
}
out = v;
mask = m;
"""

_KERNELS: dict = {}
#: Registers per thread of the float32 hard kernels: 32 keeps 64 warps per SM (the occupancy at which the AND-mask
#: kernel reaches copy bandwidth). Counting in the loop costs the geometric mean 6 more registers otherwise, and
#: it fits in 32 without spilling (NVRTC 12.9, sm_90; docs/benchmarks.md, "Counting in the same pass").
HARD_KERNEL_FLOAT32_REGISTERS = 32


def _kernel(kind: int, cdt=None):
    """The cached ``cupy.ElementwiseKernel`` of a rule id (created once per process, rule and, for the hard rules,
    compute dtype ``cdt``; CuPy compiles per dtype on first use)."""
    key = (kind, None if kind in (_SAND, _RESCALE) else np.dtype(cdt))
    if key not in _KERNELS:
        import cupy

        if kind == _SAND:
            _KERNELS[key] = cupy.ElementwiseKernel(
                "raw T G, int32 K, int64 P, float64 tau, float64 sharp", "C out, C mask",
                SAND_KERNEL_SOURCE, "htv_rules_sand", preamble=_DEVICE_HELPERS)
        elif kind == _RESCALE:
            _KERNELS[key] = cupy.ElementwiseKernel("raw uint64 n_kept, float64 n", "C v", RESCALE_KERNEL_SOURCE,
                                                   "htv_rules_rescale")
        else:
            registers = HARD_KERNEL_FLOAT32_REGISTERS if key[1] == np.float32 else None
            _KERNELS[key] = cupy.ElementwiseKernel(
                "raw T G, int32 K, int64 P, int32 thr, float64 log_eps, int32 n_slots",
                "C out, bool keep, raw uint64 kept, raw int32 bad",
                HARD_KERNEL_SOURCE, f"htv_rules_hard{kind}",
                preamble=_KERNEL_PREAMBLE + f"#define RULE {kind}\n" + _COUNT_PREAMBLE,
                loop_prep=_COUNT_LOOP_PREP, after_loop=_COUNT_AFTER_LOOP,
                options=(f"--maxrregcount={registers}",) if registers else ())
    return _KERNELS[key]


def _cupy_stack_rule(G2, p: Plan, cdt: np.dtype, xp, kept=None, bad=None):
    """The fused kernel of ``p`` over ``G2``: ``(value, mask)``. The hard rules' kernel also adds the stack's kept
    count into ``kept`` (``KEPT_SLOTS`` uint64 slots, summed afterwards) and sets ``bad[0]`` when a sum over
    environments is not finite; fresh counters are used when none are given."""
    K, P = G2.shape
    flat = xp.ascontiguousarray(G2).reshape(K * P)  # 1-D raw view: the kernels step a pointer by P, no div/mod
    out = xp.empty(P, dtype=cdt)
    if p.kind == _SAND:
        mask = xp.empty(P, dtype=cdt)
        _kernel(_SAND)(flat, np.int32(K), np.int64(P), np.float64(p.spec.tau), np.float64(p.spec.k), out, mask)
    else:
        mask = xp.empty(P, dtype=bool)
        if kept is None:
            kept, bad = xp.zeros(KEPT_SLOTS, dtype=np.uint64), xp.zeros(1, dtype=np.int32)
        _kernel(p.kind, cdt)(flat, np.int32(K), np.int64(P), np.int32(p.thr), np.float64(ORIGINAL_LOG_EPSILON),
                        np.int32(KEPT_SLOTS), out, mask, kept, bad)
    return out, mask


def stack_rule(G2, p: Plan, *, cdt=None, use_kernel=None):
    """One rule over a ``[K, P]`` stack of xp: ``(value [P] in the compute dtype, mask [P])``; values are NaN where
    the sum over environments is not finite.

    ``use_kernel``: None (default) uses the fused CUDA kernel for CuPy arrays when the rule has one, and the xp
    expression otherwise; True requires CuPy and a rule with a kernel; False forces the xp expression (on CuPy too,
    for comparisons).
    """
    xp = array_module(G2)
    cdt = compute_dtype(G2.dtype) if cdt is None else np.dtype(cdt)
    if _uses_kernel(xp, p, use_kernel):
        return _cupy_stack_rule(G2, p, cdt, xp)
    return _xp_stack_rule(G2, p, cdt, xp)


def _uses_kernel(xp, p: Plan, use_kernel) -> bool:
    """Whether a stack of ``xp`` goes through the fused CUDA kernel of ``p`` (``use_kernel`` as in
    :func:`stack_rule`); ValueError for ``use_kernel=True`` where there is none."""
    if use_kernel is None:
        return xp is not np and p.kind is not None
    if use_kernel:
        if xp is np:
            raise ValueError("use_kernel=True needs CuPy arrays: the fused kernels run on CUDA only")
        if p.kind is None:
            raise ValueError(f"use_kernel=True: rule {p.spec.rule!r} has no fused CUDA kernel")
    return bool(use_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Validation, rescaling and the model-level entry point
# ----------------------------------------------------------------------------------------------------------------


def _validate_gradient_list(grads):
    """``(xp, stacks)``: the arrays of one module, real floating (float16/32/64), K >= 1, one K, one dtype.
    Finiteness is checked later, from the sums (no extra pass over the stacks)."""
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads must be a list or tuple of gradient stacks G[K, *shape], got {type(grads).__name__}")
    if len(grads) == 0:
        raise ValueError("grads must hold at least one gradient stack, got an empty sequence")
    xp = array_module(*grads)
    if xp is not np and any(isinstance(G, np.ndarray) for G in grads):
        raise TypeError("grads must all be NumPy arrays or all CuPy arrays, got a mix of both")
    stacks = []
    for i, G in enumerate(grads):
        G = xp.asarray(G)
        if G.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"grads[{i}] must be an array of a real floating dtype (float16/32/64), got dtype {G.dtype}")
        if G.ndim < 1:
            raise ValueError(f"grads[{i}] must have at least 1 dimension(s), got shape {G.shape}")
        if G.shape[0] == 0:
            raise ValueError(f"grads[{i}] must hold at least one environment (K >= 1) on axis 0, got shape {G.shape}")
        stacks.append(G)
    consistent_stacks(stacks)
    return xp, stacks


def _as_2d(G):
    """``G[K, *shape]`` viewed as ``[K, P]`` (a view for contiguous input; P may be 0)."""
    return G.reshape(G.shape[0], int(np.prod(G.shape[1:], dtype=np.int64)))


def _kept_count(mask):
    """``n_kept`` of one tensor as a 0-d float64 device value: one reduction (a count for bool masks)."""
    return mask.sum(dtype=np.float64)


def _rescale(value, n_kept, xp, big: bool):
    """``value * n / n_kept`` (exactly 0 when nothing is kept), on the device. ``big``: the factor overflows the
    compute dtype (only possible for a soft mask with a tiny sum); then divide first, in float64, as the oracle."""
    n = value.size
    if n == 0:
        return value
    cdt = value.dtype
    if big:
        return (value.astype(np.float64) / n_kept * n).astype(cdt)
    positive = n_kept > 0
    factor = xp.where(positive, n / xp.where(positive, n_kept, 1.0), 0.0)
    return value * factor.astype(cdt)


def _factor_too_big(n_kept, n: int, cdt) -> bool:
    nk = float(n_kept)
    return nk > 0 and (n / nk) > float(np.finfo(cdt).max)


def _counted_in_kernel(xp, p: Plan, use_kernel) -> bool:
    """Whether :func:`aggregate` counts the kept coordinates and the non-finite sums inside the rule's kernel: a
    hard rule's fused kernel (the SAND-mask's soft mask is not counted)."""
    return _uses_kernel(xp, p, use_kernel) and p.kind != _SAND


def _counted_rules(xp, stacks, p: Plan):
    """Every stack through its fused kernel, which counts as it goes: ``(out, slots, finite)``, ``slots`` the kept
    counts ``[T, KEPT_SLOTS]`` (uint64, on the device; a tensor's count is the sum of its row) and ``finite``
    whether each tensor's sums were finite (on the host: the call's one synchronisation)."""
    slots = xp.zeros((len(stacks), KEPT_SLOTS), dtype=np.uint64)
    bad = xp.zeros(len(stacks), dtype=np.int32)
    out = [_cupy_stack_rule(_as_2d(G), p, compute_dtype(G.dtype), xp, slots[i], bad[i:i + 1])
           for i, G in enumerate(stacks)]
    return out, slots, to_numpy(bad) == 0


def _rescale_in_place(value, n_kept):
    """:func:`_rescale` of a hard rule's fresh value in one pass, in place, with ``n_kept`` a 1-element uint64
    device array; the same float64 factor cast to the value's dtype, so the same bits."""
    if value.size:
        _kernel(_RESCALE)(n_kept, np.float64(value.size), value)
    return value


def aggregate(grads, spec=None, *, rule=None, tau=None, rescale=False, flavour=None, k=None, use_kernel=None):
    """Apply one aggregation rule to every parameter tensor, as :func:`hardtovary.reference.rules.aggregate`.

    ``grads``: a non-empty list or tuple of NumPy or CuPy arrays ``G[K, *shape_i]``, one K >= 1 and one dtype
    (float16/32/64), finite. The rule: a ``RuleSpec`` (``spec``) or the keywords ``rule``, ``tau``, ``flavour``,
    ``k``, with ``rescale``, as the oracle (:func:`hardtovary.reference.rules.aggregate_arguments`; ``tau`` None
    means 0 for and_mask / sand_mask and 1 for geometric_mean; ``flavour`` only with geometric_mean, ``k`` only
    with sand_mask). ``use_kernel``: see :func:`stack_rule`.

    Returns ``(values, masks)``, lists of arrays of the input's module: values of shape ``shape_i`` in the input
    dtype (computed in float64 for float64 input, float32 otherwise); masks ``bool`` (mean, and_mask,
    geometric_mean; bit-equal with the oracle) or, for sand_mask, the soft mask in the input dtype.
    Non-finite gradients raise ValueError naming the stack and its first bad entry.

    With the hard rules' CUDA kernels, the kept count and the finiteness of the sums come out of the rule's own
    pass, and rescaling is one more pass over the value, in place: the factor ``n / n_kept`` needs every
    coordinate's decision, and the value (``4 P`` bytes in float32) is written before the count is complete.
    """
    xp, stacks = _validate_gradient_list(grads)
    spec, rescale = aggregate_arguments(rule, tau, rescale, flavour, k, spec=spec)
    p = plan(spec, stacks[0].shape[0])
    counted = _counted_in_kernel(xp, p, use_kernel)
    if counted:
        out, slots, flags = _counted_rules(xp, stacks, p)
    else:
        out = [stack_rule(_as_2d(G), p, use_kernel=use_kernel) for G in stacks]
        # One host synchronisation: which tensors have a non-finite value (non-finite input, or float32 overflow)?
        flags = to_numpy(xp.stack([xp.isfinite(v).all() for v, _ in out])) if out else np.ones(0, bool)
    for i in np.flatnonzero(~flags):
        G = stacks[i]
        _finite_or_raise(to_numpy(G), f"grads[{i}]")  # raises ValueError on a NaN/inf entry
        if compute_dtype(G.dtype) == np.float64:
            raise ValueError(f"grads[{i}]: the sum over the K environments overflows float64 (finite entries of "
                             "magnitude near the float64 maximum); rescale the gradients")
        # The masks depend on the signs only, so a recomputation keeps them, and the kept counts with them.
        out[i] = stack_rule(_as_2d(G), p, cdt=np.float64, use_kernel=use_kernel)

    values, masks = [], []
    if rescale and counted:
        kept = slots.sum(axis=1)
        out = [(_rescale_in_place(v, kept[i:i + 1]), m) for i, (v, m) in enumerate(out)]
    elif rescale:
        counts = [_kept_count(m) for _, m in out]
        bigs = [False] * len(out)
        if p.entry.soft_mask:  # a soft mask whose sum is tiny: one more synchronisation, soft masks only
            host = to_numpy(xp.stack(counts))
            bigs = [_factor_too_big(c, v.size, v.dtype) for c, (v, _) in zip(host, out)]
        out = [(_rescale(v, c, xp, big), m) for (v, m), c, big in zip(out, counts, bigs)]
    for G, (v, m) in zip(stacks, out):
        shape = G.shape[1:]
        values.append(v.astype(G.dtype, copy=False).reshape(shape))
        masks.append((m if m.dtype == bool else m.astype(G.dtype, copy=False)).reshape(shape))
    return values, masks


def aggregate_stack(G, spec=None, *, rule=None, tau=None, rescale=False, flavour=None, k=None, use_kernel=None):
    """One stack ``G[K, *shape]``: ``aggregate([G], ...)`` unpacked to ``(value, mask)``."""
    values, masks = aggregate([G], spec, rule=rule, tau=tau, rescale=rescale, flavour=flavour, k=k,
                              use_kernel=use_kernel)
    return values[0], masks[0]
