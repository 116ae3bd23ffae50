"""accel/torch/rules.py against the NumPy oracle (reference/rules.py)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hardtovary.accel.torch import rules as T
from hardtovary.reference import rules as R

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def _np(x):
    return x.detach().to(torch.float64).numpy() if x.dtype != torch.bool else x.numpy()


def _stack(rng, K, shape=(5, 3), zeros=0.2, dtype=torch.float64):
    G = rng.standard_normal((K, *shape)) * np.exp(rng.uniform(-3, 3, (K, *shape)))
    G[rng.random(G.shape) < zeros] = 0.0
    return torch.tensor(G).to(dtype)


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.to(torch.float64), torch.as_tensor(expected, dtype=torch.float64),
                               **({} if dtype == torch.float64 else _tol(dtype)))


def _tol(dtype):
    return {torch.float32: dict(rtol=1.3e-6 * 8, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-5),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}.get(dtype, dict(rtol=1e-12, atol=1e-300))


CASES = [("mean", {}), ("and_mask", {"tau": 0.0}), ("and_mask", {"tau": 0.5}), ("and_mask", {"tau": 1.0}),
         ("geometric_mean", {}), ("geometric_mean", {"flavour": "original", "tau": 0.5}),
         ("geometric_mean", {"flavour": "original"}), ("sand_mask", {"tau": 0.3}),
         ("sand_mask", {"tau": 0.5, "k": 3.0})]


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("rule,options", CASES)
def test_aggregate_matches_oracle(rule, options, rescale, dtype):
    rng = np.random.default_rng(0)
    tdt = TORCH_DTYPES[dtype]
    for K in (1, 2, 4, 7):
        grads = [_stack(rng, K, s, dtype=tdt) for s in [(5, 3), (5,), (4, 2, 2)]]
        # the oracle sees exactly the rounded values
        ref_vals, ref_masks = R.aggregate([_np(g) for g in grads], rule=rule, rescale=rescale, **options)
        vals, masks = T.aggregate(grads, rule=rule, rescale=rescale, **options)
        for v, m, rv, rm in zip(vals, masks, ref_vals, ref_masks):
            assert v.dtype == tdt
            if rule == "sand_mask":
                assert m.dtype == tdt
                _close(m, rm, tdt)
            else:
                assert m.dtype == torch.bool
                np.testing.assert_array_equal(m.numpy(), rm)
            _close(v, rv, tdt)


@settings(max_examples=60, deadline=None)
@given(G=hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
                    elements=st.one_of(st.just(0.0), st.floats(-1e3, 1e3, allow_subnormal=False))),
       tau=st.sampled_from([0.0, 0.25, 0.5, 2 * 0.8 - 1, 2 / 3, 0.1 * 3, 1.0]))
def test_masks_and_counts_exact_hypothesis(G, tau):
    Gt = torch.tensor(G)
    np.testing.assert_array_equal(T.sign_agreement(Gt).numpy(), R.sign_agreement(G))
    assert T.sign_agreement(Gt).dtype == torch.int64
    np.testing.assert_array_equal(T.and_mask(Gt, tau).numpy(), R.and_mask(G, tau))
    np.testing.assert_array_equal(T.and_mask_count(Gt, G.shape[0] // 2).numpy(), R.and_mask_count(G, G.shape[0] // 2))
    _close(T.and_masked_mean(Gt, tau), R.and_masked_mean(G, tau), torch.float64)
    _close(T.geometric_mean(Gt), R.geometric_mean(G), torch.float64)
    _close(T.geometric_mean(Gt, flavour="original", tau=tau), R.geometric_mean(G, flavour="original", tau=tau),
           torch.float64)
    np.testing.assert_array_equal(T.geometric_mean_mask(Gt, flavour="original", tau=tau).numpy(),
                                  R.geometric_mean_mask(G, flavour="original", tau=tau))
    _close(T.sand_mask(Gt, tau, 10.0), R.sand_mask(G, tau, 10.0), torch.float64)
    _close(T.sand_masked_mean(Gt, tau), R.sand_masked_mean(G, tau), torch.float64)


@settings(max_examples=30, deadline=None)
@given(G=hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 6)),
                    elements=st.one_of(st.just(0.0), st.floats(-10, 10, width=32, allow_subnormal=False))),
       tau=st.sampled_from([0.0, 0.5, 1.0]), rescale=st.booleans())
def test_float32_aggregate_hypothesis(G, tau, rescale):
    vals, masks = T.aggregate([torch.tensor(G)], rule="and_mask", tau=tau, rescale=rescale)
    rv, rm = R.aggregate([G], rule="and_mask", tau=tau, rescale=rescale)
    np.testing.assert_array_equal(masks[0].numpy(), rm[0])
    torch.testing.assert_close(vals[0], torch.tensor(rv[0], dtype=torch.float32))


# ---------------------------------------------------------------- dtypes and bad input (the edge cases of the
# one table, hardtovary.reference.edge_cases, run on every backend in tests/test_edge_case_parity.py)


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_preserved_and_params_accept_grad(dtype):
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=dtype))
    G = torch.randn(5, 4, 3).to(dtype)
    for rule, opts in CASES:
        v, m = T.aggregate([G], rule=rule, rescale=True, **opts)
        assert v[0].dtype == dtype
        p.grad = v[0]  # the authors' float32 mask raises here
        assert (m[0] * v[0]).dtype == dtype


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("rule,options", CASES)
def test_packed_model_gives_the_masks_and_the_values_of_the_per_tensor_rule(rule, options, rescale, dtype):
    """aggregate(pack=True) (the CUDA default: one rule over all tensors packed) against pack=False, on tensors of
    many shapes, a fully masked one and an empty one: the same masks, the same values to rounding, and the
    oracle's values."""
    rng = np.random.default_rng(3)
    grads = [_stack(rng, 6, shape, dtype=TORCH_DTYPES[dtype]) for shape in [(40, 3), (7,), (), (0, 3), (5, 2, 2)]]
    grads.append(torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, -2.0]] * 3).to(TORCH_DTYPES[dtype]))  # masked at tau=1
    apart = T.aggregate(grads, rule=rule, rescale=rescale, pack=False, **options)
    packed = T.aggregate(grads, rule=rule, rescale=rescale, pack=True, **options)
    oracle = R.aggregate([_np(g) for g in grads], rule=rule, rescale=rescale, **options)
    for v_apart, v_packed, m_apart, m_packed, v_oracle in zip(apart[0], packed[0], apart[1], packed[1], oracle[0]):
        assert v_packed.shape == v_apart.shape and v_packed.dtype == v_apart.dtype
        assert m_packed.dtype == m_apart.dtype and m_packed.shape == m_apart.shape
        assert torch.equal(m_packed, m_apart)
        torch.testing.assert_close(v_packed, v_apart)
        _close(v_packed, v_oracle, TORCH_DTYPES[dtype])


def test_packed_model_names_the_tensor_with_a_non_finite_gradient():
    grads = [torch.ones(4, 3), torch.ones(4, 2, 2), torch.ones(4)]
    grads[1][2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        T.aggregate(grads, rule="and_mask", tau=1.0, pack=True)


def test_packing_is_the_default_on_cuda_only_and_needs_two_tensors():
    cpu = [torch.ones(3, 2), torch.ones(3)]
    assert not T._packs(cpu, None) and T._packs(cpu, True) and not T._packs(cpu[:1], True)
    assert not T._packs(cpu, False)
    if torch.cuda.is_available():
        assert T._packs([g.cuda() for g in cpu], None)


def test_bad_input():
    G = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"grads\[0\]\[1, 0\]"):
        T.aggregate([t([[1.0, 2.0], [float("nan"), 1.0]])], rule="mean")
    with pytest.raises(TypeError):
        T.and_mask(torch.ones(3, 2, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError):
        T.and_mask(G.numpy(), 0.5)
    with pytest.raises(TypeError):
        T.and_mask(G, True)
    with pytest.raises(ValueError):
        T.and_mask(G, 1.5)
    with pytest.raises(ValueError):
        T.and_mask(torch.zeros(0, 2), 0.5)
    with pytest.raises(ValueError):
        T.aggregate([G], rule="nope")
    with pytest.raises(ValueError):
        T.aggregate([G], rule="and_mask", flavour="paper")
    with pytest.raises(ValueError):
        T.aggregate([G], rule="and_mask", k=2.0)
    with pytest.raises(ValueError):
        T.aggregate([G], rule="mean", tau=0.5)
    with pytest.raises(ValueError):
        T.aggregate([G], rule="geometric_mean", tau=0.5)
    with pytest.raises(TypeError):
        T.aggregate([G, G.double()], rule="mean")
    with pytest.raises(ValueError):
        T.aggregate([G, torch.randn(2, 2)], rule="mean")
    with pytest.raises(TypeError):
        T.aggregate([G], rule="mean", rescale=1)
    with pytest.raises(ValueError):
        T.rescale_inverse_sparsity(G[0], torch.full((2,), 2.0))
    with pytest.raises(ValueError):
        T.rescale_inverse_sparsity(G[0], torch.ones(3, dtype=torch.bool))


def test_finite_large_values_that_overflow_the_mean_are_accepted():
    G = torch.full((4, 3), 3e38, dtype=torch.float32)
    v, m = T.aggregate([G], rule="and_mask", tau=1.0)
    assert m[0].all() and v[0].dtype == torch.float32


@pytest.mark.slow
def test_sign_sums_stay_exact_beyond_the_integers_of_float32():
    """K = 2^24 + 4 float32 environments, all +1 but one 0: the sign sum 2^24 + 3 rounds to 2^24 + 4 in float32, which
    would keep the coordinate at tau = 1 (the geometric mean too); the exact sum does not."""
    K = 2**24 + 4
    G = torch.ones((K, 1), dtype=torch.float32)
    G[7, 0] = 0.0
    assert int(T.sign_agreement(G)[0]) == K - 1
    assert not T.and_mask(G, 1.0)[0]
    assert not T.geometric_mean_mask(G)[0]
    v, m = T.aggregate([G], rule="and_mask", tau=1.0)
    assert not m[0][0] and v[0][0] == 0 and v[0].dtype == torch.float32
