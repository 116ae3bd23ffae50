"""accel/rules.py against the NumPy oracle (reference/rules.py); the CUDA kernel sources compiled as C++ and run on
the CPU against their NumPy spec; CuPy-only checks skip with the reason CuPy is unusable."""

import contextlib
import ctypes
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hardtovary.accel import rules as A
from hardtovary.accel.backend import cupy_status
from hardtovary.conformance import tolerances
from hardtovary.reference import rules as R

ROOT = Path(__file__).resolve().parents[1]
CUPY_OK, CUPY_REASON = cupy_status()

CASES = [("mean", {}), ("and_mask", {"tau": 0.0}), ("and_mask", {"tau": 0.5}), ("and_mask", {"tau": 1.0}),
         ("geometric_mean", {}), ("geometric_mean", {"flavour": "original"}),
         ("geometric_mean", {"flavour": "original", "tau": 0.5}), ("sand_mask", {"tau": 0.3}),
         ("sand_mask", {"tau": 0.5, "k": 3.0})]
HARD_CASES = [case for case in CASES if case[0] != "sand_mask"]


def assert_matches_oracle(grads, rule, options, rescale):
    ref_values, ref_masks = R.aggregate(grads, rule=rule, rescale=rescale, **options)
    values, masks = A.aggregate(grads, rule=rule, rescale=rescale, **options)
    dtype = grads[0].dtype
    tol = tolerances.for_dtype(dtype)
    K = grads[0].shape[0]
    for G, v, m, rv, rm in zip(grads, values, masks, ref_values, ref_masks):
        assert v.dtype == dtype and v.shape == rv.shape
        if rm.dtype == bool:
            assert m.dtype == bool
            np.testing.assert_array_equal(m, rm)  # bit-exact masks
            assert np.all(v[~rm] == 0)  # masked components exactly 0
        else:
            assert m.dtype == dtype
            np.testing.assert_allclose(m.astype(np.float64), rm, rtol=8 * tol.rtol, atol=1e-6)
            assert np.all(v[rm == 0] == 0)
        scale = np.max(np.abs(G.astype(np.float64)), axis=0)
        if rescale and rv.size and rm.sum() > 0:
            scale = scale * rv.size / float(np.sum(rm))
        bound = tol.bound(rv, scale, K)
        assert np.all(np.abs(v.astype(np.float64) - rv) <= bound), (rule, options, rescale, v, rv)


@st.composite
def gradient_lists(draw):
    K = draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([np.float64, np.float32, np.float16]))
    shapes = draw(st.lists(hnp.array_shapes(min_dims=0, max_dims=3, max_side=5), min_size=1, max_size=3))
    grads = []
    for shape in shapes:
        values = draw(hnp.arrays(np.float64, (K, *shape),
                                 elements=st.sampled_from([0.0, 1.0, -1.0, 2.5, -0.5, 1e-3, -3e-4, 7.0])))
        grads.append(values.astype(dtype))
    return grads


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grads=gradient_lists(), case=st.sampled_from(CASES), rescale=st.booleans())
def test_aggregate_matches_oracle_on_drawn_inputs(grads, case, rescale):
    rule, options = case
    assert_matches_oracle(grads, rule, options, rescale)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), K=st.integers(1, 16), case=st.sampled_from(CASES), rescale=st.booleans(),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_wide_magnitudes_and_blocked_path_match_oracle(monkeypatch, seed, K, case, rescale, dtype):
    """Magnitudes over 12 decades, zeros and identical environments; small blocks force the multi-block path."""
    monkeypatch.setattr(A, "NUMPY_BLOCK_ELEMENTS", 64)
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((K, 300)) * np.exp(rng.uniform(-14, 14, (K, 300)))
    G[rng.random(G.shape) < 0.2] = 0.0
    G[:, :20] = G[0, :20]
    rule, options = case
    assert_matches_oracle([G.astype(dtype), G[:, :7].astype(dtype)], rule, options, rescale)


@pytest.mark.parametrize("rule,options", CASES)
def test_blocked_and_single_block_paths_are_bit_identical(monkeypatch, rule, options):
    rng = np.random.default_rng(3)
    G = rng.standard_normal((6, 1000)).astype(np.float32)
    whole = A.aggregate([G], rule=rule, **options)
    monkeypatch.setattr(A, "NUMPY_BLOCK_ELEMENTS", 100)
    blocked = A.aggregate([G], rule=rule, **options)
    for a, b in zip(whole[0] + whole[1], blocked[0] + blocked[1]):
        np.testing.assert_array_equal(a, b)


def test_float32_sum_overflow_is_recomputed_in_float64():
    G = np.array([[3e38, -3e38], [3e38, -3e38]], dtype=np.float32)
    values, _ = A.aggregate([G], rule="mean")
    np.testing.assert_allclose(values[0].astype(np.float64), [3e38, -3e38], rtol=1e-6)
    values, masks = A.aggregate([G * np.float32(1)], rule="sand_mask", tau=0.5)
    assert np.all(np.isfinite(values[0]))


def test_sand_variance_overflow_gives_mask_near_zero_not_nan():
    G = np.array([[3e37], [-3e37], [2e37]], dtype=np.float32)  # d*d overflows float32
    values, masks = A.aggregate([G], rule="sand_mask", tau=0.0)
    ref = R.aggregate([G], rule="sand_mask", tau=0.0)
    assert np.isfinite(values[0]).all() and np.isfinite(masks[0]).all()
    np.testing.assert_allclose(masks[0].astype(float), ref[1][0], atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradients_raise_naming_the_entry(bad):
    G = np.ones((3, 2, 2), dtype=np.float32)
    G[1, 0, 1] = bad
    with pytest.raises(ValueError, match=r"grads\[1\]\[1, 0, 1\]"):
        A.aggregate([np.ones((3, 4)), G.astype(np.float64)], rule="geometric_mean")


def test_bad_arguments_are_refused_like_the_oracle():
    G = np.ones((2, 3))
    with pytest.raises(TypeError, match="grads\\[0\\]"):
        A.aggregate([np.ones((2, 3), dtype=np.int64)], rule="mean")
    with pytest.raises(ValueError, match="same number of environments"):
        A.aggregate([G, np.ones((3, 3))], rule="mean")
    with pytest.raises(TypeError, match="same dtype"):
        A.aggregate([G, G.astype(np.float32)], rule="mean")
    with pytest.raises(ValueError, match="flavour applies only"):
        A.aggregate([G], rule="and_mask", flavour="paper")
    with pytest.raises(ValueError, match="tau must be None or 1"):
        A.aggregate([G], rule="geometric_mean", tau=0.5)
    with pytest.raises(ValueError, match="K >= 1"):
        A.aggregate([np.ones((0, 3))], rule="mean")
    with pytest.raises(TypeError):
        A.aggregate(G, rule="mean")
    with pytest.raises(ValueError, match="CuPy"):
        A.aggregate([G], rule="mean", use_kernel=True)


def test_empty_tensor_and_scalar_parameters():
    values, masks = A.aggregate([np.ones((3, 0, 2)), np.ones(3)], rule="and_mask", tau=1.0, rescale=True)
    assert values[0].shape == (0, 2) and values[1].shape == () and values[1] == 1.0


# ----------------------------------------------------------------------------------------------------------------
# The CUDA kernel sources, compiled as C++ and run on the CPU against their NumPy spec
# ----------------------------------------------------------------------------------------------------------------

HARNESS = r"""
#include <cmath>
#include <cstddef>
#include <cstring>
#include <xmmintrin.h>
using std::exp; using std::tanh; using std::fabs; using std::isfinite; using std::isinf;
static inline int __float_as_int(float x) { int b; std::memcpy(&b, &x, sizeof b); return b; }
/* CuPy compiles its kernels with -ftz=true: float32 arithmetic and comparisons read subnormal operands as zero and
   flush subnormal results. The SSE control bits DAZ and FTZ do the same on this CPU, for the float32 kernels. */
extern "C" void flush_subnormals(int on) {
    const unsigned int bits = 0x8040u;  /* FTZ | DAZ */
    _mm_setcsr(on ? (_mm_getcsr() | bits) : (_mm_getcsr() & ~bits));
}
/* The C library's logf reads the bits of its argument, which DAZ does not flush: flushed here, as CUDA's does. */
static inline bool flushing() { return (_mm_getcsr() & 0x0040u) != 0; }
static inline float log(float x) {
    const int m = __float_as_int(x) & 0x7fffffff;
    return std::log(flushing() && m != 0 && m < 0x00800000 ? 0.0f : x);
}
/* One block of one thread in a warp of one lane: the CUDA built-ins the counting code uses, for that case. */
#define __device__
#define __forceinline__ inline
#define __shared__
struct Index { unsigned int x; };
static const Index threadIdx = {0}, blockIdx = {0};
#define __CUDA_ARCH__ 900
static inline unsigned int __activemask() { return 1u; }
static inline unsigned int __reduce_add_sync(unsigned int mask, unsigned int v) { return mask & 1u ? v : 0u; }
static inline unsigned int __reduce_or_sync(unsigned int mask, unsigned int v) { return mask & 1u ? v : 0u; }
static inline int __ffs(unsigned int x) { return __builtin_ffs(x); }
static inline void __syncthreads() {}
template <typename V, typename W> static inline void atomicAdd(V* p, W v) { *p += v; }
static inline void atomicOr(int* p, int v) { *p |= v; }
%(preamble)s
#define RULE rule  /* a compile-time constant on the GPU (one kernel per rule), the run-time argument here */
template <typename T, typename C>
void hard(const T* G, int K, long long P, int rule, int thr, double log_eps, C* out_, bool* keep_,
          unsigned long long* kept, int n_slots, int* bad) {
    %(loop_prep)s
    for (ptrdiff_t i = 0; i < P; ++i) {
        C& out = out_[i]; bool& keep = keep_[i];
        %(hard)s
    }
    %(after_loop)s
}
template <typename T, typename C>
void sand(const T* G, int K, long long P, double tau, double sharp, C* out_, C* mask_) {
    for (ptrdiff_t i = 0; i < P; ++i) {
        C& out = out_[i]; C& mask = mask_[i];
        %(sand)s
    }
}
extern "C" {
void hard_f32(const float* G, int K, long long P, int r, int t, double e, float* o, bool* k,
              unsigned long long* kept, int n_slots, int* bad) {
    hard<float, float>(G, K, P, r, t, e, o, k, kept, n_slots, bad); }
void hard_f64(const double* G, int K, long long P, int r, int t, double e, double* o, bool* k,
              unsigned long long* kept, int n_slots, int* bad) {
    hard<double, double>(G, K, P, r, t, e, o, k, kept, n_slots, bad); }
void rescale_f32(const unsigned long long* n_kept, double n, float* v_, long long P) {
    for (ptrdiff_t i = 0; i < P; ++i) { typedef float C; float& v = v_[i]; %(rescale)s } }
void rescale_f64(const unsigned long long* n_kept, double n, double* v_, long long P) {
    for (ptrdiff_t i = 0; i < P; ++i) { typedef double C; double& v = v_[i]; %(rescale)s } }
void sand_f32(const float* G, int K, long long P, double t, double s, float* o, float* m) {
    sand<float, float>(G, K, P, t, s, o, m); }
void sand_f64(const double* G, int K, long long P, double t, double s, double* o, double* m) {
    sand<double, double>(G, K, P, t, s, o, m); }
}
"""


@pytest.fixture(scope="module")
def cpu_kernels(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("no C++ compiler (g++) to compile the CUDA kernel sources for the CPU")
    folder = tmp_path_factory.mktemp("kernels")
    source = folder / "kernels.cpp"
    source.write_text(HARNESS % {"preamble": A._KERNEL_PREAMBLE + A._COUNT_PREAMBLE, "hard": A.HARD_KERNEL_SOURCE,
                                 "sand": A.SAND_KERNEL_SOURCE, "loop_prep": A._COUNT_LOOP_PREP,
                                 "after_loop": A._COUNT_AFTER_LOOP, "rescale": A.RESCALE_KERNEL_SOURCE})
    library = folder / "kernels.so"
    subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-o", str(library), str(source)],
                   check=True, capture_output=True)
    return ctypes.CDLL(str(library))


def run_cpu_kernel(lib, G2, p, cdt, counters=None):
    """The kernel of ``p`` on the CPU: ``(value, mask)``; a hard rule's kept count and non-finite flag go into
    ``counters`` (a dict) when given."""
    with _flushing_subnormals(lib, cdt == np.float32):
        return _run_cpu_kernel(lib, G2, p, cdt, counters)


@contextlib.contextmanager
def _flushing_subnormals(lib, on):
    lib.flush_subnormals(int(on))
    try:
        yield
    finally:
        lib.flush_subnormals(0)


def _run_cpu_kernel(lib, G2, p, cdt, counters):
    K, P = G2.shape
    G2 = np.ascontiguousarray(G2.astype(cdt))
    out = np.empty(P, dtype=cdt)
    suffix = "f32" if cdt == np.float32 else "f64"
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    if p.kind == A._SAND:
        mask = np.empty(P, dtype=cdt)
        getattr(lib, f"sand_{suffix}")(ptr(G2), ctypes.c_int(K), ctypes.c_longlong(P), ctypes.c_double(p.spec.tau),
                                       ctypes.c_double(p.spec.k), ptr(out), ptr(mask))
    else:
        mask = np.empty(P, dtype=np.bool_)
        kept, bad = np.zeros(A.KEPT_SLOTS, dtype=np.uint64), np.zeros(1, dtype=np.int32)
        getattr(lib, f"hard_{suffix}")(ptr(G2), ctypes.c_int(K), ctypes.c_longlong(P), ctypes.c_int(p.kind),
                                       ctypes.c_int(p.thr), ctypes.c_double(A.ORIGINAL_LOG_EPSILON), ptr(out),
                                       ptr(mask), ptr(kept), ctypes.c_int(A.KEPT_SLOTS), ptr(bad))
        if counters is not None:
            counters.update(kept=int(kept.sum()), bad=int(bad[0]))
    return out, mask


def run_cpu_rescale(lib, value, n_kept):
    value = value.copy()
    total = np.array([n_kept], dtype=np.uint64)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    getattr(lib, "rescale_f32" if value.dtype == np.float32 else "rescale_f64")(
        ptr(total), ctypes.c_double(value.size), ptr(value), ctypes.c_longlong(value.size))
    return value


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), K=st.integers(1, 12), case=st.sampled_from(CASES),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_kernel_sources_compute_their_numpy_spec(cpu_kernels, seed, K, case, dtype):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((K, 200)) * np.exp(rng.uniform(-10, 10, (K, 200)))
    G[rng.random(G.shape) < 0.2] = 0.0
    G[:, :10] = G[0, :10]
    G[:, 10:20] = np.sign(G[:, 10:20])
    G[0, 20] = np.nan
    G[1 % K, 21] = np.inf
    G = G.astype(dtype)
    rule, options = case
    p = A.plan(R.RuleSpec(rule, **options), K)
    want_v, want_m = A.stack_rule(G, p)
    got_v, got_m = run_cpu_kernel(cpu_kernels, G, p, np.dtype(dtype))
    ok = np.isfinite(G).all(axis=0)  # masks of non-finite columns are unspecified: their value is NaN (raised)
    if want_m.dtype == bool:
        np.testing.assert_array_equal(got_m[ok], want_m[ok])
    else:
        np.testing.assert_allclose(got_m[ok], want_m[ok], rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-7)
    np.testing.assert_array_equal(np.isnan(got_v), np.isnan(want_v))
    np.testing.assert_allclose(got_v, want_v, rtol=2e-5 if dtype == np.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flavour", ["paper", "original"])
def test_geometric_mean_pairs_out_of_range_are_summed_one_by_one(cpu_kernels, dtype, flavour):
    """The geometric means take one logarithm per pair of environments; a pair whose product overflows or
    underflows must not change the value: the kernel and the NumPy path against the oracle."""
    big, small = (1e20, 1e-20) if dtype == np.float32 else (1e160, 1e-160)
    G = np.array([[big, small, 3.0, -2.0, big],
                  [2 * big, 2 * small, 5.0, -1.0, 1e-3],
                  [0.5, 1.0, 2.0, -4.0, 7.0],
                  [1.5, 0.25, 1.0, -3.0, 2.0],
                  [2.0, 3.0, 0.5, -0.5, 1.0]], dtype=dtype)
    options = {"flavour": flavour} if flavour == "paper" else {"flavour": flavour, "tau": 0.6}
    want = R.aggregate([G], rule="geometric_mean", **options)[0][0]
    p = A.plan(R.RuleSpec("geometric_mean", **options), G.shape[0])
    got_kernel, _ = run_cpu_kernel(cpu_kernels, G, p, np.dtype(dtype))
    got_numpy = A.stack_rule(G, p)[0]  # the NumPy path itself: aggregate's float64 redo would hide an overflow
    rtol = 2e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got_kernel, want, rtol=rtol)
    np.testing.assert_allclose(got_numpy, want, rtol=rtol)
    assert np.all(np.isfinite(got_kernel)) and np.all(got_kernel[:2] > 0)


def subnormal_stack():
    """A float32 stack [7, 400] with subnormal entries: some columns agree in sign only if a subnormal counts, some
    (about one) are subnormal throughout, and some have normal pairs with a subnormal in the last environment, the
    one an odd K leaves out of the pairs."""
    rng = np.random.default_rng(5)
    K, P = 7, 400
    G = (rng.standard_normal((K, P)) * 1e-3).astype(np.float32)
    tiny = np.float32(np.finfo(np.float32).tiny)
    G[rng.random((K, P)) < 0.3] = tiny * np.float32(0.25)  # subnormal, positive
    G[:, :50] = np.abs(G[:, :50])
    G[0, :50] = tiny * np.float32(0.5)
    G[:, 50:60] = -np.abs(G[:, 50:60])
    G[1, 50:60] = -tiny * np.float32(0.125)
    G[:, 60:70] = np.abs(G[:, 60:70]) + np.float32(1e-4)
    G[K - 1, 60:70] = tiny * np.float32(0.5)
    G[:, 399] = tiny * np.float32(0.75)
    return G


@pytest.mark.parametrize("rule,options", CASES)
def test_kernels_count_subnormal_gradients_as_the_oracle(cpu_kernels, rule, options):
    """Under CuPy's -ftz=true a float32 comparison reads a subnormal as 0; the kernels must still count its sign,
    and the paper geometric mean take its logarithm, as the oracle does."""
    G = subnormal_stack()
    K = G.shape[0]
    p = A.plan(R.RuleSpec(rule, **options), K)
    want_v, want_m = A.stack_rule(G, p)
    got_v, got_m = run_cpu_kernel(cpu_kernels, G, p, np.dtype(np.float32))
    if want_m.dtype == bool:
        np.testing.assert_array_equal(got_m, want_m)
    else:
        np.testing.assert_allclose(got_m, want_m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_v, want_v, rtol=2e-5, atol=1e-30)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), K=st.integers(1, 9), case=st.sampled_from(HARD_CASES),
       dtype=st.sampled_from([np.float32, np.float64]), nonfinite=st.booleans())
def test_kernel_counts_and_rescales_as_aggregate_specifies(cpu_kernels, seed, K, case, dtype, nonfinite):
    """The hard kernels' own kept count and non-finite flag (what aggregate rescales with and raises on, on a
    GPU) against the mask and the sums the NumPy path computes, and the in-place rescaling kernel against
    :func:`_rescale` bit for bit."""
    rng = np.random.default_rng(seed)
    G = (rng.standard_normal((K, 300)) * (rng.random((K, 300)) > 0.3)).astype(dtype)
    if nonfinite:
        G[rng.integers(K), rng.integers(300)] = np.inf
    rule, options = case
    p = A.plan(R.RuleSpec(rule, **options), K)
    want_v, want_m = A.stack_rule(G, p)
    counters = {}
    got_v, got_m = run_cpu_kernel(cpu_kernels, G, p, np.dtype(dtype), counters)
    assert counters["bad"] == int(not np.isfinite(G.sum(axis=0, dtype=np.float64)).all())
    if not nonfinite:
        assert counters["kept"] == int(want_m.sum())
        want = A._rescale(want_v, want_m.sum(dtype=np.float64), np, False)
        np.testing.assert_array_equal(run_cpu_rescale(cpu_kernels, want_v, counters["kept"]), want)
    np.testing.assert_array_equal(run_cpu_rescale(cpu_kernels, np.ones(4, dtype), 0), np.zeros(4, dtype))


# ----------------------------------------------------------------------------------------------------------------
# CuPy (GPU) only
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUPY_OK, reason=CUPY_REASON)
@pytest.mark.parametrize("rule,options", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_cupy_kernels_match_the_oracle(rule, options, dtype):
    import cupy

    rng = np.random.default_rng(7)
    grads = [(rng.standard_normal((5, *s)) * (rng.random((5, *s)) > 0.2)).astype(dtype) for s in [(40, 3), (7,)]]
    for rescale in (False, True):
        ref_values, ref_masks = R.aggregate(grads, rule=rule, rescale=rescale, **options)
        values, masks = A.aggregate([cupy.asarray(g) for g in grads], rule=rule, rescale=rescale, **options)
        for v, m, rv, rm in zip(values, masks, ref_values, ref_masks):
            assert isinstance(v, cupy.ndarray) and v.dtype == dtype
            if rm.dtype == bool:
                np.testing.assert_array_equal(cupy.asnumpy(m), rm)
            np.testing.assert_allclose(cupy.asnumpy(v).astype(np.float64), rv,
                                       rtol=1e-3 if dtype == np.float16 else 1e-5, atol=1e-6)


@pytest.mark.skipif(not CUPY_OK, reason=CUPY_REASON)
@pytest.mark.parametrize("rule,options", HARD_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_cupy_counting_kernels_give_the_bits_of_the_separate_passes(rule, options, dtype):
    """aggregate with the hard kernels counting as they go (many blocks, partial warps, empty and scalar tensors)
    against the same kernels followed by separate count, finiteness and rescaling passes: equal bits."""
    import cupy

    rng = np.random.default_rng(11)
    shapes = [(1_000_003,), (37, 5), (0, 3), ()]
    grads = [cupy.asarray((rng.standard_normal((6, *s)) * (rng.random((6, *s)) > 0.3)).astype(dtype))
             for s in shapes]
    p = A.plan(R.RuleSpec(rule, **options), 6)
    for rescale in (False, True):
        values, masks = A.aggregate(grads, rule=rule, rescale=rescale, **options)
        for G, v, m in zip(grads, values, masks):
            want_v, want_m = A._cupy_stack_rule(A._as_2d(G), p, A.compute_dtype(G.dtype), cupy)
            if rescale:
                want_v = A._rescale(want_v, A._kept_count(want_m), cupy, False)
            np.testing.assert_array_equal(cupy.asnumpy(m).reshape(-1), cupy.asnumpy(want_m))
            np.testing.assert_array_equal(cupy.asnumpy(v).reshape(-1), cupy.asnumpy(want_v.astype(dtype)))
    bad = [g.copy() for g in grads]
    bad[0][3, 777_777] = np.nan
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        A.aggregate(bad, rule=rule, rescale=True, **options)


@pytest.mark.skipif(not CUPY_OK, reason=CUPY_REASON)
@pytest.mark.parametrize("rule,options", CASES)
def test_cupy_kernels_count_subnormal_gradients_as_the_oracle(rule, options):
    import cupy

    G = subnormal_stack()
    for rescale in (False, True):
        ref_values, ref_masks = R.aggregate([G], rule=rule, rescale=rescale, **options)
        values, masks = A.aggregate([cupy.asarray(G)], rule=rule, rescale=rescale, **options)
        if ref_masks[0].dtype == bool:
            np.testing.assert_array_equal(cupy.asnumpy(masks[0]), ref_masks[0])
        np.testing.assert_allclose(cupy.asnumpy(values[0]).astype(np.float64), ref_values[0], rtol=2e-5, atol=1e-30)


@pytest.mark.skipif(not CUPY_OK, reason=CUPY_REASON)
def test_cupy_float32_overflow_is_recomputed_and_rescaled_with_the_kernel_count():
    import cupy

    G = np.full((4, 1000), 3e38, dtype=np.float32)
    G[:2, :100] *= -1  # 100 columns of mixed signs: masked at tau = 1; the others scaled to 3.3e38
    want_v, want_m = R.aggregate([G], rule="and_mask", tau=1.0, rescale=True)
    values, masks = A.aggregate([cupy.asarray(G)], rule="and_mask", tau=1.0, rescale=True)
    np.testing.assert_array_equal(cupy.asnumpy(masks[0]), want_m[0])
    np.testing.assert_allclose(cupy.asnumpy(values[0]).astype(np.float64), want_v[0], rtol=1e-6)


def _bench_module(name):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_gpu_check_numpy_dry_run_passes(capsys):
    gpu_check = _bench_module("gpu_check")
    assert gpu_check.main(["--numpy-dry-run"]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"^FAIL ", out, re.M) and len(re.findall(r"^PASS ", out, re.M)) > 50
    assert "problems/s" in out and ("runs/s" in out or "sweep not available" in out)


def test_gpu_check_without_cupy_exits_2(capsys):
    if CUPY_OK:
        pytest.skip("CuPy is usable here: the exit-2 path is for machines without it")
    gpu_check = _bench_module("gpu_check")
    assert gpu_check.main(["--no-timings"]) == 2
    assert "CuPy is not usable" in capsys.readouterr().out


def test_kernel_sass_roofline_arithmetic_and_the_measured_log():
    ks = _bench_module("kernel_sass")
    f32 = np.dtype(np.float32)
    # K rows of 4 bytes read, a 4-byte value and a 1-byte mask written (the SAND-mask: a 4-byte soft mask).
    assert ks.bytes_moved("and_mask", 16, 1000, f32, f32) == 16 * 1000 * 4 + 1000 * 5
    assert ks.bytes_moved("sand_mask", 16, 1000, f32, f32) == 16 * 1000 * 4 + 1000 * 8
    assert ks.bytes_moved("rescale", 16, 1000, f32, f32) == 2 * 1000 * 4
    counts = ks.Counts(32, 0, 10.0, {}, 0, 100, 200, {})
    r = ks.roofline(counts, 3_450_000_000, 16, 50_000_000)
    assert r.memory_s == pytest.approx(3.45e9 / 4304e9)
    assert r.issue_s == pytest.approx((10 * 16 + 100) * 5e7 / (32 * 4 * 132 * 1.98e9))
    assert r.bound_s == r.memory_s and r.of_copy == 1.0
    setting, measured = ks.measured_times(ks.MEASURED_LOG)
    assert setting == (16, 50_000_000, "float32")
    assert measured["and_mask"] == 0.795 and measured["geometric_mean paper"] == 1.155
    assert measured["geometric_mean original"] == 1.183 and measured["sand_mask"] == 1.058


def test_kernel_sass_without_its_tools_says_what_to_install(monkeypatch, capsys):
    ks = _bench_module("kernel_sass")
    for variable in ("HTV_NVRTC", "HTV_NVDISASM", "HTV_CUDA_INCLUDE", "HTV_CUPY_INCLUDE"):
        monkeypatch.setenv(variable, "/nonexistent")
    assert ks.main([]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install nvidia-cuda-nvrtc-cu12" in err


# ----------------------------------------------------------------------------------------------------------------
# The built-in conformance target
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_accel_target_passes_every_aggregate_check(tmp_path):
    from hardtovary.conformance import cli

    report_path = tmp_path / "report.json"
    status = cli.main(["--target", "hardtovary.conformance.accel_target:target", "--checks", "agg",
                       "--max-examples", "10", "--report", str(report_path)])
    text = report_path.read_text()
    verdicts = re.findall(r'"verdict": "(\w+)"', text)
    assert status == 0
    assert verdicts and set(verdicts) == {"pass"} and len(verdicts) >= 25
