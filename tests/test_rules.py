"""Tests of hardtovary.reference.rules: AND-mask, geometric mean, SAND-mask, rescaling, temporal AND-mask Adam.

Expected values come from an independent route: numbers worked out by hand and written here, brute-force loops
over environments in plain Python (fractions, math.prod, statistics.variance), or scipy.stats.binom.
"""

from __future__ import annotations

import itertools
import math
import statistics
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.stats import binom

from hardtovary.reference import edge_cases
from hardtovary.reference.rules import (
    TemporalAndMaskAdam,
    aggregate,
    agreement_threshold_count,
    and_mask,
    and_mask_count,
    and_masked_mean,
    geometric_mean,
    geometric_mean_mask,
    mean_gradient,
    rescale_inverse_sparsity,
    sand_mask,
    sand_masked_mean,
    sign_agreement,
)

# A NaN or an overflow warning anywhere means a degenerate case was not defined.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

PROPERTY = settings(max_examples=100, deadline=None)


# ----------------------------------------------------------------------------------------------------------------
# Strategies and brute-force references
# ----------------------------------------------------------------------------------------------------------------


def _magnitudes(min_exp: int, max_exp: int):
    return st.builds(lambda m, e: m * 10.0**e, st.floats(1.0, 9.99), st.integers(min_exp, max_exp))


@st.composite
def stacks(draw, min_exp: int = -100, max_exp: int = 100, max_K: int = 8, min_K: int = 1):
    """A float64 stack G[K, *shape] with exact zeros, random or agreeing signs, magnitudes over many orders."""
    K = draw(st.integers(min_K, max_K))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4))
    full = (K, *shape)
    signs = draw(hnp.arrays(np.int64, full, elements=st.sampled_from([-1, 0, 1])))
    mode = draw(st.sampled_from(["random", "agreeing", "no_zeros"]))
    if mode == "agreeing":  # every nonzero entry of a column shares one sign
        column_sign = draw(hnp.arrays(np.int64, shape, elements=st.sampled_from([-1, 1])))
        signs = np.abs(signs) * column_sign
    elif mode == "no_zeros":
        signs = np.where(signs == 0, 1, signs)
    magnitudes = draw(hnp.arrays(np.float64, full, elements=_magnitudes(min_exp, max_exp)))
    return signs * magnitudes


@st.composite
def stacks_and_tau(draw, **kwargs):
    G = draw(stacks(**kwargs))
    K = G.shape[0]
    tau = draw(
        st.one_of(
            st.floats(0.0, 1.0),
            st.integers(0, K).map(lambda j: j / K),  # exact ties
            st.integers(0, K).map(lambda j: min(1.0, float(np.nextafter(j / K, 2.0)))),  # ties plus float noise
        )
    )
    return G, tau


def columns(G):
    """The K values of every component of G, as lists of Python floats, in C order."""
    flat = np.asarray(G, dtype=np.float64).reshape(G.shape[0], -1)
    return [[float(x) for x in flat[:, j]] for j in range(flat.shape[1])]


def brute_sign_counts(column):
    positives = sum(1 for x in column if x > 0)
    negatives = sum(1 for x in column if x < 0)
    return positives, negatives


def brute_and_mask(G, tau):
    """Keep iff |p - q| >= tau*K, with ties (within the documented 1e-9 float noise) kept; exact rationals."""
    K = G.shape[0]
    out = []
    for column in columns(G):
        p, q = brute_sign_counts(column)
        out.append(abs(p - q) >= Fraction(tau) * K - Fraction(1, 10**9))
    return np.array(out, dtype=bool).reshape(G.shape[1:])


def brute_mean(G):
    return np.array([math.fsum(c) / len(c) for c in columns(G)]).reshape(G.shape[1:])


def brute_geometric_mean_paper(G):
    K = G.shape[0]
    out = []
    for column in columns(G):
        if all(x > 0 for x in column) or all(x < 0 for x in column):
            sign = 1.0 if column[0] > 0 else -1.0
            out.append(sign * math.pow(math.prod(abs(x) for x in column), 1.0 / K))
        else:
            out.append(0.0)
    return np.array(out).reshape(G.shape[1:])


def brute_sand_mask(G, tau, k):
    K = G.shape[0]
    out = []
    for column in columns(G):
        p, q = brute_sign_counts(column)
        A = abs(p - q) / K
        var = 0.0 if K == 1 else statistics.variance(column)
        if var == 0.0:
            out.append(1.0 if A > tau else 0.0)
        else:
            out.append(max(math.tanh(k * (A - tau) / var), 0.0))
    return np.array(out).reshape(G.shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# Threshold vs count form, and ties under float noise in tau  [paper §2.3]
# ----------------------------------------------------------------------------------------------------------------


def test_threshold_and_count_forms_differ_with_zeros_paper_example():
    # K = 4, p = 2, q = 0, z = 2, tau = 0.5 (t = (K/2)(tau + 1) = 3)
    G = np.array([[1.0], [2.0], [0.0], [0.0]])
    assert sign_agreement(G).tolist() == [2]
    assert and_mask(G, 0.5).tolist() == [True]  # |S| = 2 >= 0.5 * 4
    assert and_mask_count(G, 3).tolist() == [False]  # max(p, q) = 2 < 3


def test_threshold_and_count_forms_agree_without_zeros():
    # p = 3, q = 1: |S| = 2 >= 2 and max(p, q) = 3 >= 3
    G = np.array([[1.0], [2.0], [0.5], [-1.0]])
    assert and_mask(G, 0.5).tolist() == [True]
    assert and_mask_count(G, 3).tolist() == [True]
    assert and_mask_count(G, 4).tolist() == [False]


def test_float_noise_in_tau_cannot_flip_a_tie_k10():
    tau = 2 * 0.8 - 1
    assert tau == 0.6000000000000001
    assert not 6 / 10 >= tau  # a plain float comparison would drop the 8-of-10 agreement
    G = np.array([[1.0]] * 8 + [[-1.0]] * 2)
    assert and_mask(G, tau).tolist() == [True]
    assert agreement_threshold_count(tau, 10) == 6


def test_float_noise_in_tau_cannot_flip_a_tie_k20():
    tau = 0.1 * 3
    assert tau == 0.30000000000000004
    G = np.array([[0.5]] * 13 + [[-0.25]] * 7)
    assert sign_agreement(G).tolist() == [6]
    assert and_mask(G, tau).tolist() == [True]
    assert agreement_threshold_count(tau, 20) == 6


@pytest.mark.parametrize(
    "tau, K, expected",
    [(0.0, 5, 0), (1.0, 5, 5), (0.5, 4, 2), (0.5, 5, 3), (0.6, 4, 3), (0.01, 10, 1), (1 / 3, 3, 1), (0.7, 10, 7)],
)
def test_agreement_threshold_count_hand_values(tau, K, expected):
    assert agreement_threshold_count(tau, K) == expected


# ----------------------------------------------------------------------------------------------------------------
# Edge cases (the rows of reference.edge_cases, derived here by hand)
# ----------------------------------------------------------------------------------------------------------------


def test_edge_case_all_gradients_zero_tau_0():
    G = np.zeros((3, 4))
    assert and_mask(G, 0.0).all()
    assert np.array_equal(and_masked_mean(G, 0.0), np.zeros(4))
    values, masks = aggregate([G], rule="and_mask", tau=0.0, rescale=True)
    assert np.array_equal(values[0], np.zeros(4)) and masks[0].all()
    assert np.array_equal(geometric_mean(G), np.zeros(4))
    assert np.array_equal(geometric_mean(G, flavour="original", tau=0.0), np.zeros(4))
    assert np.array_equal(sand_mask(G, 0.0), np.zeros(4))
    assert np.array_equal(sand_masked_mean(G, 0.0), np.zeros(4))
    values, _ = aggregate([G], rule="sand_mask", tau=0.0, rescale=True)
    assert np.array_equal(values[0], np.zeros(4))


K1 = np.array([[0.5, -2.0, 0.0, 3.0]])


def test_edge_case_k1_tau_0_is_identity():
    assert and_mask(K1, 0.0).tolist() == [True, True, True, True]
    assert np.array_equal(and_masked_mean(K1, 0.0), [0.5, -2.0, 0.0, 3.0])
    values, _ = aggregate([K1], rule="and_mask", tau=0.0, rescale=True)
    assert np.array_equal(values[0], [0.5, -2.0, 0.0, 3.0])


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_edge_case_k1_masks_exact_zeros_and_rescales_by_4_3(tau):
    assert and_mask(K1, tau).tolist() == [True, True, False, True]
    values, masks = aggregate([K1], rule="and_mask", tau=tau, rescale=True)
    assert masks[0].tolist() == [True, True, False, True]
    np.testing.assert_allclose(values[0], [0.5 * 4 / 3, -2.0 * 4 / 3, 0.0, 3.0 * 4 / 3], rtol=1e-15)


def test_edge_case_k1_paper_geometric_mean_is_identity():
    np.testing.assert_allclose(geometric_mean(K1), [0.5, -2.0, 0.0, 3.0], rtol=1e-15)
    assert geometric_mean_mask(K1).tolist() == [True, True, False, True]


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_edge_case_k1_sand_limit_keeps_nonzero_entries_below_tau_1(tau):
    assert sand_mask(K1, tau).tolist() == [1.0, 1.0, 0.0, 1.0]
    values, _ = aggregate([K1], rule="sand_mask", tau=tau, rescale=True)
    np.testing.assert_allclose(values[0], [0.5 * 4 / 3, -2.0 * 4 / 3, 0.0, 3.0 * 4 / 3], rtol=1e-15)


def test_edge_case_k1_sand_tau_1_drops_everything():
    assert sand_mask(K1, 1.0).tolist() == [0.0, 0.0, 0.0, 0.0]
    values, _ = aggregate([K1], rule="sand_mask", tau=1.0, rescale=True)
    assert np.array_equal(values[0], np.zeros(4))


def test_edge_case_tie_kept_by_and_mask_dropped_by_sand():
    G = np.array([[0.3], [0.7], [1.1], [-0.5]])  # signs + + + -, A = 0.5
    assert and_mask(G, 0.5).tolist() == [True]
    np.testing.assert_allclose(and_masked_mean(G, 0.5), [0.4], rtol=1e-15)
    assert sand_mask(G, 0.5).tolist() == [0.0]  # tanh(k * 0 / var) = 0
    assert sand_masked_mean(G, 0.5).tolist() == [0.0]


def test_edge_case_identical_gradients_tau_1():
    G = np.tile([0.25, -1.5], (3, 1))
    assert and_mask(G, 1.0).tolist() == [True, True]
    assert np.array_equal(and_masked_mean(G, 1.0), [0.25, -1.5])
    assert sand_mask(G, 1.0).tolist() == [0.0, 0.0]  # var = 0, A = 1 = tau
    assert sand_mask(G, 0.5).tolist() == [1.0, 1.0]  # var = 0, A = 1 > tau
    np.testing.assert_allclose(geometric_mean(G), [0.25, -1.5], rtol=1e-15)


def test_edge_case_identical_gradients_whose_float_mean_is_inexact():
    # mean(0.1, 0.1, 0.1) is not 0.1 in float64: the variance must still be exactly 0 (limit rule).
    G = np.full((3, 1), 0.1)
    assert np.var(G, axis=0, ddof=1)[0] > 0.0  # the float two-pass variance is 2.9e-34, not 0
    assert sand_mask(G, 1.0).tolist() == [0.0]
    assert sand_mask(G, 0.999).tolist() == [1.0]
    # A tiny k would turn that spurious variance into a visible tanh(1.7) = 0.94; the exact limit is 1.
    assert sand_mask(G, 0.5, k=1e-33).tolist() == [1.0]


@pytest.mark.parametrize("tau, kept", [(0.0, True), (0.5, True), (2 / 3, True), (0.67, False), (1.0, False)])
def test_edge_case_one_environment_has_zero(tau, kept):
    G = np.array([[1.0], [2.0], [0.0]])
    assert and_mask(G, tau).tolist() == [kept]
    assert geometric_mean_mask(G, flavour="original", tau=tau).tolist() == [kept]
    original = geometric_mean(G, flavour="original", tau=tau)
    if kept:
        assert original[0] == pytest.approx(5.848e-4, rel=1e-4)
        assert original[0] == pytest.approx((2e-10) ** (1 / 3), rel=1e-9)
    else:
        assert original.tolist() == [0.0]


def test_edge_case_one_environment_has_zero_paper_geometric_mean_is_zero():
    G = np.array([[1.0], [2.0], [0.0]])
    assert geometric_mean(G).tolist() == [0.0]
    assert geometric_mean_mask(G).tolist() == [False]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "call",
    [
        lambda G: sign_agreement(G),
        lambda G: and_mask(G, 0.5),
        lambda G: and_mask_count(G, 2),
        lambda G: and_masked_mean(G, 0.5),
        lambda G: geometric_mean(G),
        lambda G: geometric_mean(G, flavour="original", tau=0.5),
        lambda G: sand_mask(G, 0.5),
        lambda G: sand_masked_mean(G, 0.5),
        lambda G: mean_gradient(G),
    ],
    ids=["sign", "and_mask", "count", "masked_mean", "gm_paper", "gm_original", "sand", "sand_mean", "mean"],
)
def test_edge_case_non_finite_entry_is_refused_with_its_index(call, bad):
    G = np.ones((3, 2))
    G[1, 0] = bad
    with pytest.raises(ValueError, match=r"G\[1, 0\]"):
        call(G)


def test_edge_case_non_finite_entry_in_aggregate_names_the_stack_and_index():
    grads = [np.ones((3, 2)), np.ones((3, 4))]
    grads[1][2, 3] = np.nan
    with pytest.raises(ValueError, match=r"grads\[1\]\[2, 3\]"):
        aggregate(grads, rule="and_mask", tau=0.5)


def test_edge_case_float16_input_matches_float64_of_the_same_values():
    rng = np.random.default_rng(0)
    G16 = rng.normal(size=(5, 40)).astype(np.float16)
    G16[:, :5] = 0.0
    G16[2, 5:10] = 0.0
    G16[:, 10] = np.array([1, 1, 1, -1, 0], dtype=np.float16)  # a tie at tau = 0.4
    G64 = G16.astype(np.float64)
    for tau in (0.0, 0.4, 0.6, 1.0):
        assert np.array_equal(and_mask(G16, tau), and_mask(G64, tau))
        out16, out64 = and_masked_mean(G16, tau), and_masked_mean(G64, tau)
        assert out16.dtype == np.float64 and np.array_equal(out16, out64)
        assert np.array_equal(sand_mask(G16, tau), sand_mask(G64, tau))
        gm16 = geometric_mean(G16, flavour="original", tau=tau)
        assert gm16.dtype == np.float64 and np.array_equal(gm16, geometric_mean(G64, flavour="original", tau=tau))
    assert np.array_equal(geometric_mean(G16), geometric_mean(G64))
    assert np.array_equal(sign_agreement(G16), sign_agreement(G64))
    assert sign_agreement(G16).dtype == np.int64


def test_edge_case_k16_small_gradients_float32_no_underflow():
    G = np.full((16, 3), 1e-3, dtype=np.float32)
    G[:, 1] *= -1
    G[7, 2] *= -1
    out = geometric_mean(G)
    np.testing.assert_allclose(out, [1e-3, -1e-3, 0.0], rtol=1e-6)
    assert out[2] == 0.0
    # The notebook's exp(sum log)**(1/K) underflows to 0 in float32 on the same input.
    notebook = np.exp(np.sum(np.log(np.abs(G) + np.float32(1e-10)), axis=0)) ** np.float32(1 / 16)
    assert notebook.dtype == np.float32 and notebook[0] == 0.0


def test_edge_case_subnormal_float32_gradients_count_by_their_sign():
    tiny = float(np.finfo(np.float32).tiny)
    G = edge_cases.BY_NAME["subnormal"].inputs[0][1][0]
    assert G.dtype == np.float32 and 0 < abs(float(G[0, 0])) < tiny
    # Signs by hand: column 0 (+,+,+,+), column 1 (-,-,-,-), column 2 (+,+,-,+), column 3 all subnormal (+,+,+,+).
    kept_at_1, kept_at_half = [True, True, False, True], [True, True, True, True]
    values, masks = aggregate([G], rule="and_mask", tau=1.0)
    assert masks[0].tolist() == kept_at_1
    assert aggregate([G], rule="and_mask", tau=0.5)[1][0].tolist() == kept_at_half
    np.testing.assert_allclose(values[0][0], (tiny / 2 + 1e-3 + 2e-3 + 1e-3) / 4, rtol=1e-6)
    # The paper geometric mean of column 0 and of the subnormal column 3, from logarithms taken in float64.
    col0 = math.exp((math.log(tiny / 2) + math.log(1e-3) + math.log(2e-3) + math.log(1e-3)) / 4)
    col3 = math.exp((math.log(tiny / 4) + math.log(tiny / 2) + math.log(tiny / 8) + math.log(tiny / 4)) / 4)
    gm = geometric_mean(G)
    np.testing.assert_allclose(gm[[0, 3]], [col0, col3], rtol=1e-5)
    assert gm[2] == 0.0 and gm[1] < 0


def test_fully_masked_tensor_rescales_to_exactly_zero():
    g = np.array([[3.0, -1e300], [2.0, 5.0]])
    out = rescale_inverse_sparsity(g, np.zeros((2, 2), dtype=bool))
    assert np.array_equal(out, np.zeros((2, 2))) and out.dtype == np.float64
    out = rescale_inverse_sparsity(g, np.zeros((2, 2)))
    assert np.array_equal(out, np.zeros((2, 2)))


def test_rescale_hand_values():
    g = np.array([2.0, 0.0, -1.0, 0.0])
    assert rescale_inverse_sparsity(g, np.array([True, False, True, False])).tolist() == [4.0, 0.0, -2.0, 0.0]
    assert rescale_inverse_sparsity(g, np.ones(4, dtype=bool)).tolist() == [2.0, 0.0, -1.0, 0.0]
    # soft mask summing to 0.5 over 4 entries: factor 8
    assert rescale_inverse_sparsity(g, np.array([0.25, 0.0, 0.25, 0.0])).tolist() == [16.0, 0.0, -8.0, 0.0]


def test_rescale_soft_mask_with_subnormal_sum_gives_no_nan():
    g = np.array([1e-320, 0.0])
    out = rescale_inverse_sparsity(g, np.array([1e-320, 0.0]))
    assert np.all(np.isfinite(out)) and out[1] == 0.0


def test_aggregate_rescales_per_tensor_not_per_model():
    # tensor 0: 1 of 2 kept (x2); tensor 1: everything kept (x1); tensor 2: nothing kept (0)
    w = np.array([[1.0, 1.0], [3.0, -1.0]])
    b = np.array([[2.0], [4.0]])
    c = np.array([[1.0, 2.0], [-1.0, 0.0]])
    values, masks = aggregate([w, b, c], rule="and_mask", tau=1.0, rescale=True)
    assert [m.tolist() for m in masks] == [[True, False], [True], [False, False]]
    assert values[0].tolist() == [4.0, 0.0]  # mean 2 times 2/1
    assert values[1].tolist() == [3.0]
    assert values[2].tolist() == [0.0, 0.0]
    plain, _ = aggregate([w, b, c], rule="and_mask", tau=1.0)
    assert plain[0].tolist() == [2.0, 0.0]


def test_aggregate_mean_rule_and_default_masks():
    G = np.array([[1.0, -2.0], [3.0, 4.0]])
    values, masks = aggregate((G,), rule="mean")
    assert values[0].tolist() == [2.0, 1.0] and masks[0].dtype == bool and masks[0].all()
    values, masks = aggregate([G], rule="geometric_mean")  # paper flavour by default
    assert masks[0].tolist() == [True, False]
    np.testing.assert_allclose(values[0], [math.sqrt(3.0), 0.0], rtol=1e-15)
    values, masks = aggregate([G], rule="geometric_mean", flavour="original", tau=0.0)
    assert masks[0].tolist() == [True, True]
    np.testing.assert_allclose(values[0], [math.sqrt(3.0), math.sqrt(8.0)], rtol=1e-9)
    values, masks = aggregate([G], rule="sand_mask", tau=0.5, k=2.0)
    assert masks[0].dtype == np.float64
    # column 0: A = 1, var = 2 -> tanh(2 * 0.5 / 2); column 1: A = 0 -> 0
    np.testing.assert_allclose(masks[0], [math.tanh(0.5), 0.0], rtol=1e-15)
    np.testing.assert_allclose(values[0], [2.0 * math.tanh(0.5), 0.0], rtol=1e-15)


def test_geometric_mean_original_partial_agreement_differences():
    # (a) partly agreeing signs kept with sign(mean) and the GM of magnitudes; (c) sign(mean) = 0 gives 0
    G = np.array([[4.0, 1.0], [1.0, -1.0], [-2.0, 0.5], [2.0, -0.5]])
    out = geometric_mean(G, flavour="original", tau=0.0)
    assert out[0] == pytest.approx(2.0, rel=1e-9)  # (4*1*2*2)^(1/4) = 2, mean 1.25 > 0
    assert out[1] == 0.0  # mean 0
    assert geometric_mean(G).tolist() == [0.0, 0.0]  # the paper zeroes both


# The mean over environments: exact in sign, whatever the order (rules.py, "The mean over environments")
COUNTEREXAMPLE = [1.0, 1.0, 1.0, -1e17, 1e17]  # float sums 0.0 in some orders, 3.0 in others; the exact sum is 3


def exact_mean(column):
    """The exact mean of a column, as a Fraction."""
    return sum(map(Fraction, column)) / len(column)


def test_mean_of_the_counterexample_is_identical_in_every_order():
    # the original geometric mean is sign(3/5) = +1 times (prod_e (|g_e| + 1e-10))^(1/5), about 6.3e6, in every
    # order (the float sum said 0 in some orders, which zeroed it); its magnitude is a float mean of logs
    expected = math.prod(abs(x) + 1e-10 for x in COUNTEREXAMPLE) ** (1 / 5)
    for order in itertools.permutations(range(5)):
        P = np.array(COUNTEREXAMPLE)[list(order)]
        assert mean_gradient(P) == 0.6  # 3/5 rounded, not 0.0 and not 0.2
        assert and_masked_mean(P[:, None], 0.0)[0] == 0.6
        assert geometric_mean_mask(P, flavour="original", tau=0.0)
        assert geometric_mean(P, flavour="original", tau=0.0) == pytest.approx(expected, rel=1e-12)


def test_mean_where_the_float_sum_has_the_wrong_sign_and_is_not_small():
    # 2^54 + 1.9 rounds back to 2^54 seven times: the row-by-row float sum is -12 (3 eps max|g|), the exact sum
    # 7 * 1.9 - 12 = +1.3; an error bound without a factor K (eps max|g|, 2 eps max|g|) would trust the -12
    column = [2.0**54] + [1.9] * 7 + [-(2.0**54 + 12)]
    G = np.tile(np.array(column)[:, None], (1, 3))
    assert G.sum(axis=0).tolist() == [-12.0] * 3  # NumPy's float sum, this layout: the wrong sign
    assert mean_gradient(G).tolist() == [float(exact_mean(column))] * 3


def test_mean_of_gradients_whose_float_sum_overflows_is_finite_and_exactly_rounded():
    # the float64 sum of these overflows; the mean of finite values is finite, rounded once from the exact value
    cases = [[1e308, 1e308], [1.7e308, 1.7e308, -1.7e308], [-1.5e308, -1.5e308, 1e300]]
    for column in cases:
        for order in itertools.permutations(column):
            assert mean_gradient(np.array(order)) == float(exact_mean(column))


@st.composite
def cancelling_stacks(draw):
    """Stacks G[K, n] whose columns hold big +x and -x (the same x, or nearly) and small terms, so that float
    sums lose the small terms in some orders; the small terms often cancel exactly too (exact mean 0)."""
    n = draw(st.integers(1, 4))
    cols = []
    for _ in range(n):
        big = draw(st.lists(st.floats(1e12, 1e20), min_size=1, max_size=2))
        nudge = draw(st.sampled_from([0.0, 1.0, -1.0, 0.5]))
        pairs = [x for b in big for x in (b, -(b + nudge))]
        small = draw(st.lists(st.sampled_from([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 0.0, 1e-300, -3e-310]),
                              min_size=1, max_size=3))
        cols.append(pairs + small)
    K = max(len(c) for c in cols)
    cols = [c + [0.0] * (K - len(c)) for c in cols]
    return np.array(cols).T


def exact_sign(column) -> int:
    total = sum(map(Fraction, column))
    return (total > 0) - (total < 0)


@pytest.mark.slow
@PROPERTY
@given(cancelling_stacks(), st.data())
def test_sign_of_the_mean_is_exact_in_every_order(G, data):
    signs = np.array([exact_sign(c) for c in columns(G)]).reshape(G.shape[1:])
    orders = itertools.permutations(range(G.shape[0])) if G.shape[0] <= 5 else [
        data.draw(st.permutations(range(G.shape[0]))) for _ in range(20)]
    for order in orders:
        P = G[list(order)]
        mean = mean_gradient(P)
        assert np.array_equal(np.sign(mean), signs)
        # accuracy: within the documented K eps max|g| of the exact mean
        for m, column in zip(mean.reshape(-1), columns(P)):
            error = abs(Fraction(m) - exact_mean(column))
            assert error <= len(column) * Fraction(np.finfo(np.float64).eps) * max(abs(Fraction(x)) for x in column)
        original = geometric_mean(P, flavour="original", tau=0.0)
        assert np.array_equal(np.sign(original), signs)


def test_sign_agreement_shapes_and_scalar_component():
    G = np.array([1.0, -2.0, 0.0, 3.0])
    S = sign_agreement(G)
    assert isinstance(S, np.ndarray) and S.shape == () and S.dtype == np.int64 and int(S) == 1
    assert isinstance(and_mask(G, 0.25), np.ndarray) and bool(and_mask(G, 0.25))
    assert not bool(and_mask(G, 0.5))


# ----------------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------------


@PROPERTY
@given(stacks_and_tau())
def test_and_mask_matches_brute_force_sign_counting(case):
    G, tau = case
    K = G.shape[0]
    expected_S = np.array([p - q for p, q in map(brute_sign_counts, columns(G))]).reshape(G.shape[1:])
    assert np.array_equal(sign_agreement(G), expected_S)
    assert np.array_equal(and_mask(G, tau), brute_and_mask(G, tau))
    for t in range(K + 1):
        expected = np.array([max(brute_sign_counts(c)) >= t for c in columns(G)]).reshape(G.shape[1:])
        assert np.array_equal(and_mask_count(G, t), expected)


@pytest.mark.slow
@PROPERTY
@given(stacks_and_tau(), st.data())
def test_permuting_environments_changes_nothing(case, data):
    G, tau = case
    order = data.draw(st.permutations(range(G.shape[0])))
    P = G[list(order)]
    scale = 1e-13 * np.max(np.abs(G), initial=0.0)
    assert np.array_equal(and_mask(P, tau), and_mask(G, tau))
    np.testing.assert_allclose(and_masked_mean(P, tau), and_masked_mean(G, tau), rtol=1e-12, atol=scale)
    assert np.array_equal(geometric_mean_mask(P), geometric_mean_mask(G))
    np.testing.assert_allclose(geometric_mean(P), geometric_mean(G), rtol=1e-12)
    assert np.array_equal(
        geometric_mean_mask(P, flavour="original", tau=tau), geometric_mean_mask(G, flavour="original", tau=tau)
    )
    # its sign(mean) is exact in every order (rules.py, "The mean over environments"); a float sum's sign is not
    np.testing.assert_allclose(
        geometric_mean(P, flavour="original", tau=tau), geometric_mean(G, flavour="original", tau=tau), rtol=1e-12
    )
    np.testing.assert_allclose(sand_mask(P, tau), sand_mask(G, tau), rtol=1e-9, atol=1e-12)
    for t in range(G.shape[0] + 1):
        assert np.array_equal(and_mask_count(P, t), and_mask_count(G, t))


@PROPERTY
@given(stacks_and_tau())
def test_flipping_all_signs_flips_the_output(case):
    G, tau = case
    assert np.array_equal(sign_agreement(-G), -sign_agreement(G))
    assert np.array_equal(and_mask(-G, tau), and_mask(G, tau))
    assert np.array_equal(and_masked_mean(-G, tau), -and_masked_mean(G, tau))
    assert np.array_equal(geometric_mean(-G), -geometric_mean(G))
    original = geometric_mean(G, flavour="original", tau=tau)
    assert np.array_equal(geometric_mean(-G, flavour="original", tau=tau), -original)
    assert np.array_equal(sand_mask(-G, tau), sand_mask(G, tau))
    assert np.array_equal(sand_masked_mean(-G, tau), -sand_masked_mean(G, tau))


@PROPERTY
@given(stacks())
def test_tau_0_and_mask_is_the_mean(G):
    assert and_mask(G, 0.0).all()
    scale = 1e-13 * np.max(np.abs(G), initial=0.0)
    np.testing.assert_allclose(and_masked_mean(G, 0.0), brute_mean(G), rtol=1e-12, atol=scale)
    masked, _ = aggregate([G], rule="and_mask", tau=0.0, rescale=True)
    plain, _ = aggregate([G], rule="mean")
    assert np.array_equal(masked[0], plain[0])


@PROPERTY
@given(stacks(min_K=2), st.sampled_from(["and_mask", "geometric_mean", "sand_mask"]))
def test_fully_masked_tensor_rescales_to_exactly_zero_property(G, rule):
    G = G.copy()
    G[1] = -G[0]  # no component is unanimous, so tau = 1 masks everything
    values, masks = aggregate([G], rule=rule, tau=1.0, rescale=True)
    assert not np.any(masks[0])
    assert np.array_equal(values[0], np.zeros(G.shape[1:]))


@PROPERTY
@given(stacks(), st.data())
def test_rescale_matches_brute_force(G, data):
    g = mean_gradient(G)
    mask = data.draw(hnp.arrays(bool, g.shape))
    n_kept = sum(bool(x) for x in mask.reshape(-1))
    expected = [0.0 if n_kept == 0 else x * (mask.size / n_kept) for x in g.reshape(-1)]
    assert np.array_equal(rescale_inverse_sparsity(g, mask), np.array(expected).reshape(g.shape))


@PROPERTY
@given(stacks(min_exp=-5, max_exp=5))
def test_paper_geometric_mean_matches_brute_force_product(G):
    np.testing.assert_allclose(geometric_mean(G), brute_geometric_mean_paper(G), rtol=1e-12, atol=0.0)
    np.testing.assert_allclose(geometric_mean(G, tau=1.0), brute_geometric_mean_paper(G), rtol=1e-12, atol=0.0)


@PROPERTY
@given(stacks_and_tau(min_exp=-30, max_exp=30), st.sampled_from([0.5, 1.0, 10.0, 1000.0]))
def test_sand_mask_matches_brute_force_and_lies_in_unit_interval(case, k):
    G, tau = case
    mask = sand_mask(G, tau, k)
    assert mask.dtype == np.float64 and np.all(mask >= 0.0) and np.all(mask <= 1.0)
    np.testing.assert_allclose(mask, brute_sand_mask(G, tau, k), rtol=1e-9, atol=1e-12)
    scale = 1e-13 * np.max(np.abs(G), initial=0.0)
    np.testing.assert_allclose(sand_masked_mean(G, tau, k), mask * brute_mean(G), rtol=1e-9, atol=scale)


@PROPERTY
@given(stacks_and_tau(min_K=2, max_K=8))
def test_aggregate_applies_the_rule_to_each_tensor(case):
    G, tau = case
    H = -2.0 * G[:, ..., None]
    values, masks = aggregate([G, H], rule="and_mask", tau=tau)
    assert np.array_equal(masks[0], brute_and_mask(G, tau))
    assert np.array_equal(masks[1], brute_and_mask(H, tau))
    assert np.array_equal(values[1], -2.0 * values[0][..., None])


# ----------------------------------------------------------------------------------------------------------------
# Prop. 2 / eq. (4): keep rate on i.i.d. Gaussian gradients
# ----------------------------------------------------------------------------------------------------------------

# (K, tau, T = ceil(tau*K) worked out by hand, t = smallest count with 2t - K >= T)
PROP2_CASES = [
    (4, 0.5, 2, 3),
    (4, 0.6, 3, 4),
    (4, 1.0, 4, 4),
    (5, 0.5, 3, 4),
    (5, 0.6, 3, 4),
    (5, 1.0, 5, 5),
    (10, 0.5, 5, 8),
    (10, 0.6, 6, 8),
    (10, 1.0, 10, 10),
]


@pytest.mark.parametrize("K, tau, T, t", PROP2_CASES)
def test_prop2_keep_rate_on_gaussian_gradients(K, tau, T, t):
    P = 200_000
    G = np.random.default_rng(1000 * K + int(10 * tau)).normal(size=(K, P))
    expected = sum(binom.pmf(p, K, 0.5) for p in range(K + 1) if abs(2 * p - K) >= T)
    kept = and_mask(G, tau)
    sigma = math.sqrt(expected * (1 - expected) / P)
    assert abs(kept.mean() - expected) <= 5 * sigma
    # eq. (4) as printed, valid for t > K/2: 2 * 2^-K * sum_{k >= t} C(K, k)
    assert t > K / 2
    eq4 = 2.0 ** (1 - K) * sum(math.comb(K, k) for k in range(t, K + 1))
    assert eq4 == pytest.approx(expected, rel=1e-12)
    # No exact zeros in Gaussian draws, so the count form with t agrees with the threshold form exactly.
    assert np.array_equal(and_mask_count(G, t), kept)


# ----------------------------------------------------------------------------------------------------------------
# Temporal AND-mask Adam (Algorithm 1)
# ----------------------------------------------------------------------------------------------------------------

GRADIENT_SEQUENCE = [np.array([1.0, -2.0, 0.0]), np.array([1.0, 2.0, 4.0]), np.array([1.0, -2.0, -4.0])]
THETA0 = np.array([0.1, 0.2, 0.3])
# Hand-unrolled with beta1 = 0.5, beta2 = 0.75, beta3 = 0.5 (all exact in binary), uncorrected state:
HAND_M = [[0.5, -1.0, 0.0], [0.75, 0.5, 2.0], [0.875, -0.75, -1.0]]
HAND_V = [[0.25, 1.0, 0.0], [0.4375, 1.75, 4.0], [0.578125, 2.3125, 7.0]]
HAND_A = [[0.5, -0.5, 0.0], [0.75, 0.25, 0.5], [0.875, -0.375, -0.25]]


def _run_three_steps(bias_correction):
    opt = TemporalAndMaskAdam(
        [(3,)], 0.01, beta1=0.5, beta2=0.75, beta3=0.5, tau=0.6, eps=1e-8, bias_correction=bias_correction
    )
    theta = [THETA0.copy()]
    history = []
    for step, g in enumerate(GRADIENT_SEQUENCE):
        theta, masks = opt.step(theta, [g])
        np.testing.assert_array_equal(opt.m[0], HAND_M[step])
        np.testing.assert_array_equal(opt.v[0], HAND_V[step])
        np.testing.assert_array_equal(opt.a[0], HAND_A[step])
        assert opt.t == step + 1
        history.append((theta[0].copy(), masks[0].tolist()))
    return history


def test_temporal_adam_three_steps_without_bias_correction():
    lr, eps = 0.01, 1e-8
    history = _run_three_steps(False)
    # masks: |a| >= 0.6
    assert [masks for _, masks in history] == [[False, False, False], [True, False, False], [True, False, False]]
    np.testing.assert_array_equal(history[0][0], THETA0)  # nothing passes the mask at step 1
    theta2 = 0.1 - lr * 0.75 / (math.sqrt(0.4375) + eps)
    theta3 = theta2 - lr * 0.875 / (math.sqrt(0.578125) + eps)
    np.testing.assert_allclose(history[1][0], [theta2, 0.2, 0.3], rtol=1e-15)
    np.testing.assert_allclose(history[2][0], [theta3, 0.2, 0.3], rtol=1e-15)


def test_temporal_adam_three_steps_with_bias_correction():
    lr, eps = 0.01, 1e-8
    history = _run_three_steps(True)
    # corrected a: step 1 [1, -1, 0]; step 2 [1, 1/3, 2/3]; step 3 [1, -3/7, -2/7]
    assert [masks for _, masks in history] == [[True, True, False], [True, False, True], [True, False, False]]
    # corrected m, v: step 1 m [1, -2, 0], v [1, 4, 0]; step 2 m [1, 2/3, 8/3], v [1, 4, 64/7]; step 3 m0 = v0 = 1
    step1 = [0.1 - lr * 1 / (1 + eps), 0.2 - lr * (-2) / (2 + eps), 0.3]
    step2 = [step1[0] - lr * 1 / (1 + eps), step1[1], 0.3 - lr * (8 / 3) / (math.sqrt(64 / 7) + eps)]
    step3 = [step2[0] - lr * 1 / (1 + eps), step2[1], step2[2]]
    np.testing.assert_allclose(history[0][0], step1, rtol=1e-14)
    np.testing.assert_allclose(history[1][0], step2, rtol=1e-14)
    np.testing.assert_allclose(history[2][0], step3, rtol=1e-14)


def test_temporal_adam_zero_initial_state_first_step_moves_nothing():
    opt = TemporalAndMaskAdam([(2,)], 0.1, beta3=0.8, tau=0.5)
    assert opt.t == 0 and not opt.m[0].any() and not opt.v[0].any() and not opt.a[0].any()
    params, masks = opt.step([np.array([1.0, -2.0])], [np.array([3.0, -0.5])])
    assert masks[0].tolist() == [False, False]  # |a| = 0.2 < 0.5
    assert params[0].tolist() == [1.0, -2.0]
    np.testing.assert_allclose(opt.a[0], [0.2, -0.2], rtol=1e-15)
    np.testing.assert_allclose(opt.m[0], [0.3, -0.05], rtol=1e-15)
    # With bias correction the first step's a is sign(g) and the step moves.
    opt = TemporalAndMaskAdam([(2,)], 0.1, beta3=0.8, tau=0.5, bias_correction=True)
    params, masks = opt.step([np.array([1.0, -2.0])], [np.array([3.0, -0.5])])
    assert masks[0].tolist() == [True, True]
    np.testing.assert_allclose(params[0], [1.0 - 0.1 * 3 / (3 + 1e-8), -2.0 + 0.1 * 0.5 / (0.5 + 1e-8)], rtol=1e-14)


def test_temporal_adam_does_not_mutate_inputs_and_accepts_arrays_as_shapes():
    theta = [np.array([[1.0, 2.0]], dtype=np.float32), np.array([0.5])]
    grads = [np.array([[0.1, -0.2]], dtype=np.float32), np.array([1.0])]
    theta_copy = [x.copy() for x in theta]
    grads_copy = [x.copy() for x in grads]
    opt = TemporalAndMaskAdam(theta, 0.1, beta3=0.0, tau=1.0)
    new, masks = opt.step(theta, grads)
    for before, after in zip(theta_copy + grads_copy, theta + grads):
        assert np.array_equal(before, after) and before.dtype == after.dtype
    assert all(x.dtype == np.float64 for x in new)
    assert not any(np.shares_memory(a, b) for a, b in zip(new, theta))
    assert [m.tolist() for m in masks] == [[[True, True]], [True]]


def test_temporal_adam_eps_0_with_zero_gradient_gives_zero_update():
    opt = TemporalAndMaskAdam([(2,)], 0.1, beta3=0.0, tau=0.0, eps=0.0)
    params, masks = opt.step([np.array([1.0, 1.0])], [np.array([0.0, 2.0])])
    assert masks[0].tolist() == [True, True]
    np.testing.assert_allclose(params[0], [1.0, 1.0 - 0.1 * 0.2 / math.sqrt(0.004)], rtol=1e-14)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

G_OK = np.array([[1.0, -1.0], [2.0, 0.5], [0.5, 0.0]])

TAU_CALLS = [
    lambda tau: and_mask(G_OK, tau),
    lambda tau: and_masked_mean(G_OK, tau),
    lambda tau: sand_mask(G_OK, tau),
    lambda tau: geometric_mean(G_OK, flavour="original", tau=tau),
    lambda tau: agreement_threshold_count(tau, 3),
    lambda tau: aggregate([G_OK], rule="and_mask", tau=tau),
    lambda tau: TemporalAndMaskAdam([(2,)], 0.1, beta3=0.5, tau=tau),
]
TAU_IDS = ["and_mask", "masked_mean", "sand", "gm_original", "threshold_count", "aggregate", "temporal"]


@pytest.mark.parametrize("call", TAU_CALLS, ids=TAU_IDS)
@pytest.mark.parametrize("tau", [-0.1, 1.1, float("nan"), float("inf")])
def test_tau_out_of_range_is_a_value_error(call, tau):
    with pytest.raises(ValueError, match="tau"):
        call(tau)


@pytest.mark.parametrize("call", TAU_CALLS, ids=TAU_IDS)
@pytest.mark.parametrize("tau", [True, "0.5", 1j])
def test_tau_not_a_real_number_is_a_type_error(call, tau):
    with pytest.raises(TypeError, match="tau"):
        call(tau)


@pytest.mark.parametrize("index", [0, 1, 2, 4, 6], ids=[TAU_IDS[i] for i in (0, 1, 2, 4, 6)])
def test_tau_none_is_a_type_error_where_tau_has_no_default(index):
    # (geometric_mean and aggregate take None as "the default tau")
    with pytest.raises(TypeError, match="tau"):
        TAU_CALLS[index](None)


@pytest.mark.parametrize(
    "call",
    [
        lambda G: sign_agreement(G),
        lambda G: and_mask(G, 0.5),
        lambda G: and_mask_count(G, 0),
        lambda G: geometric_mean(G),
        lambda G: sand_mask(G, 0.5),
        lambda G: mean_gradient(G),
        lambda G: aggregate([G], rule="mean"),
    ],
)
def test_no_environments_is_a_value_error(call):
    with pytest.raises(ValueError, match=r"K >= 1"):
        call(np.zeros((0, 3)))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, bool, np.complex128, object])
def test_non_real_floating_gradients_are_a_type_error(dtype):
    G = np.ones((2, 3), dtype=dtype)
    for call in (lambda: and_mask(G, 0.5), lambda: geometric_mean(G), lambda: sand_mask(G, 0.5)):
        with pytest.raises(TypeError, match="dtype"):
            call()
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        aggregate([G_OK, G], rule="and_mask", tau=0.5)


def test_mismatched_k_between_stacks_names_index_and_both_ks():
    with pytest.raises(ValueError, match=r"grads\[0\] has K=3.*grads\[2\] has K=2"):
        aggregate([G_OK, G_OK, np.ones((2, 4))], rule="and_mask", tau=0.5)


def test_mixed_dtypes_between_stacks_are_a_type_error():
    with pytest.raises(TypeError, match=r"grads\[1\] is float32"):
        aggregate([G_OK, G_OK.astype(np.float32)], rule="mean")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rule="median"), ValueError, "rule"),
        (dict(rule="geometric_mean", flavour="notebook"), ValueError, "flavour"),
        (dict(rule="and_mask", flavour="paper"), ValueError, "flavour"),
        (dict(rule="geometric_mean", k=10.0), ValueError, "k applies only"),
        (dict(rule="and_mask", rescale=1), TypeError, "rescale"),
        (dict(rule="mean", tau=0.5), ValueError, "tau"),
        (dict(rule="geometric_mean", tau=0.5), ValueError, "flavour='original'"),
        (dict(rule="sand_mask", k=0.0), ValueError, "k"),
    ],
)
def test_aggregate_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        aggregate([G_OK], **kwargs)


def test_aggregate_bad_container():
    with pytest.raises(TypeError, match="grads"):
        aggregate(G_OK, rule="mean")
    with pytest.raises(ValueError, match="grads"):
        aggregate([], rule="mean")


def test_unknown_flavour_and_paper_flavour_with_partial_tau():
    with pytest.raises(ValueError, match="flavour"):
        geometric_mean(G_OK, flavour="notebook")
    with pytest.raises(ValueError, match="flavour"):
        geometric_mean_mask(G_OK, flavour="Paper")
    with pytest.raises(ValueError, match="flavour='original'"):
        geometric_mean(G_OK, tau=0.5)
    with pytest.raises(TypeError, match="tau"):
        geometric_mean(G_OK, tau=True)


@pytest.mark.parametrize(
    "t, error", [(-1, ValueError), (4, ValueError), (1.5, TypeError), (True, TypeError), (2.0, TypeError)]
)
def test_count_form_t_out_of_range(t, error):
    with pytest.raises(error, match="t"):
        and_mask_count(G_OK, t)


@pytest.mark.parametrize(
    "k, error",
    [
        (0.0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (True, TypeError),
        ("10", TypeError),
    ],
)
def test_sand_k_must_be_positive_real(k, error):
    with pytest.raises(error, match="k"):
        sand_mask(G_OK, 0.5, k)
    with pytest.raises(error, match="k"):
        sand_masked_mean(G_OK, 0.5, k)


def test_rescale_bad_input():
    g = np.array([1.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        rescale_inverse_sparsity(g, np.array([True, False, True]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rescale_inverse_sparsity(g, np.array([0.5, 1.5]))
    with pytest.raises(TypeError, match="mask"):
        rescale_inverse_sparsity(g, np.array([1, 0]))
    with pytest.raises(ValueError, match=r"g\[1\]"):
        rescale_inverse_sparsity(np.array([1.0, np.nan]), np.array([True, True]))
    with pytest.raises(TypeError, match="g"):
        rescale_inverse_sparsity(np.array([1, 2]), np.array([True, True]))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(beta1=1.0), ValueError, "beta1"),
        (dict(beta2=-0.1), ValueError, "beta2"),
        (dict(beta3=1.0), ValueError, "beta3"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(bias_correction=1), TypeError, "bias_correction"),
        (dict(params_or_shapes=[]), ValueError, "params_or_shapes"),
        (dict(params_or_shapes=[(2, -1)]), ValueError, r"params_or_shapes\[0\]\[1\]"),
        (dict(params_or_shapes=[np.ones(2, dtype=int)]), TypeError, r"params_or_shapes\[0\]"),
    ],
)
def test_temporal_adam_bad_construction(kwargs, error, match):
    arguments = dict(params_or_shapes=[(2,)], lr=0.1, beta3=0.5, tau=0.5)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        TemporalAndMaskAdam(arguments.pop("params_or_shapes"), arguments.pop("lr"), **arguments)


def test_temporal_adam_bad_step():
    opt = TemporalAndMaskAdam([(2,), (3,)], 0.1, beta3=0.5, tau=0.5)
    ok = [np.zeros(2), np.zeros(3)]
    with pytest.raises(ValueError, match=r"params\[1\] must have shape \(3,\)"):
        opt.step([np.zeros(2), np.zeros(4)], ok)
    with pytest.raises(ValueError, match="grads must hold 2"):
        opt.step(ok, [np.zeros(2)])
    with pytest.raises(ValueError, match=r"grads\[0\]\[1\]"):
        opt.step(ok, [np.array([0.0, np.inf]), np.zeros(3)])
    with pytest.raises(TypeError, match="grads"):
        opt.step(ok, np.zeros(2))
    assert opt.t == 0  # failed steps leave the state untouched
