"""Tests of hardtovary.reference.optim (torch.optim semantics in NumPy). Expected values are hand-unrolled
recurrences, closed forms, or decimals computed by hand at 40 digits and written into the test."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardtovary.reference.optim import SGD, Adam, l1_gradient, multistep_lr

magnitudes = st.floats(1e-100, 1e100)
signed = st.builds(lambda m, s: m * s, magnitudes, st.sampled_from([-1.0, 1.0]))
grad_entries = st.one_of(st.just(0.0), signed)
learning_rates = st.floats(1e-6, 10.0)


# ---------------------------------------------------------------------------------------------------------------
# Adam
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(g=st.lists(grad_entries, min_size=1, max_size=6), lr=learning_rates, eps=st.sampled_from([0.0, 1e-8, 1e-3]))
def test_adam_first_step_is_lr_g_over_abs_g_plus_eps(g, lr, eps):
    g = np.array(g)
    opt = Adam([g.shape], eps=eps)
    (theta1,) = opt.step([np.zeros_like(g)], [g], lr)
    # bias correction: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps)
    expected = np.array([lr * gi / (abs(gi) + eps) if gi != 0 else 0.0 for gi in g])
    np.testing.assert_allclose(-theta1, expected, rtol=1e-12, atol=0)
    assert not np.any(np.isnan(theta1))
    big = (g != 0) & (np.abs(g) >= 1e5 * eps)
    np.testing.assert_allclose(np.abs(theta1[big]), lr, rtol=1e-5)  # ~ lr * sign(g) whatever |g| (>> eps)
    assert opt.t == 1


def test_adam_three_steps_hand_unrolled():
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.1
    opt = Adam([np.zeros(())], betas=(b1, b2), eps=eps)
    theta = [np.array(1.0)]
    for g in (1.0, -2.0, 0.5):
        theta = opt.step(theta, [np.array(g)], lr)
    # unrolled by hand in the bias-corrected-moment form
    m1, v1 = 0.1 * 1.0, 0.001 * 1.0
    t1 = 1.0 - lr * (m1 / 0.1) / (math.sqrt(v1 / 0.001) + eps)
    m2, v2 = 0.9 * m1 + 0.1 * -2.0, 0.999 * v1 + 0.001 * 4.0
    t2 = t1 - lr * (m2 / 0.19) / (math.sqrt(v2 / 0.001999) + eps)
    m3, v3 = 0.9 * m2 + 0.1 * 0.5, 0.999 * v2 + 0.001 * 0.25
    t3 = t2 - lr * (m3 / 0.271) / (math.sqrt(v3 / 0.002997001) + eps)
    assert (m1, round(m2, 15), round(m3, 15)) == (0.1, -0.11, -0.049)
    assert float(theta[0]) == pytest.approx(t3, rel=1e-13)
    # the same three steps at 40 decimal digits: theta = 0.90000000099999999, 0.93661035347207509, 0.95027941967382173
    assert float(theta[0]) == pytest.approx(0.9502794196738217256, rel=1e-14)
    assert float(opt.exp_avg[0]) == pytest.approx(-0.049, rel=1e-14)
    assert float(opt.exp_avg_sq[0]) == pytest.approx(0.005244001, rel=1e-14)
    assert opt.t == 3


@settings(max_examples=25, deadline=None)
@given(
    gs=st.lists(st.lists(st.floats(-5, 5), min_size=5, max_size=5), min_size=1, max_size=4),
    wd=st.sampled_from([0.0, 0.1]),
    order=st.sampled_from(["before", "after"]),
)
def test_adam_is_elementwise_and_per_tensor_independent(gs, wd, order):
    # A [2] and a [1, 3] tensor together equal five separate scalar optimisers.
    joint = Adam([(2,), (1, 3)], weight_decay=wd, weight_decay_order=order)
    singles = [Adam([()], weight_decay=wd, weight_decay_order=order) for _ in range(5)]
    params = [np.array([0.5, -1.0]), np.array([[2.0, 0.0, -0.3]])]
    scalars = [np.array(v) for v in (0.5, -1.0, 2.0, 0.0, -0.3)]
    for g in gs:
        params = joint.step(params, [np.array(g[:2]), np.array([g[2:]])], 0.05)
        scalars = [opt.step([s], [np.array(gi)], 0.05)[0] for opt, s, gi in zip(singles, scalars, g)]
    flat = np.concatenate([params[0], params[1].ravel()])
    np.testing.assert_array_equal(flat, np.array([float(s) for s in scalars]))


def test_adam_weight_decay_before_vs_after_hand_example():
    # theta = 2, g = 1, wd = 0.1, lr = 0.01, eps = 1e-8
    before = Adam([()], weight_decay=0.1, weight_decay_order="before").step([np.array(2.0)], [np.array(1.0)], 0.01)
    after = Adam([()], weight_decay=0.1, weight_decay_order="after").step([np.array(2.0)], [np.array(1.0)], 0.01)
    # before: g' = 1 + 0.1 * 2 = 1.2, step 0.01 * 1.2 / (1.2 + 1e-8)
    assert float(before[0]) == pytest.approx(1.990000000083333, rel=1e-15)
    # after: 2 * (1 - 0.01 * 0.1) = 1.998, then step 0.01 * 1 / (1 + 1e-8)
    assert float(after[0]) == pytest.approx(1.9880000001, rel=1e-15)


@pytest.mark.parametrize("lr,wd", [(0.01, 0.1), (0.3, 0.5), (1e-3, 1e-4)])
def test_zero_gradient_after_decay_shrinks_exactly_before_decay_moves_by_lr(lr, wd):
    theta0 = np.array([1.5, -0.25, 0.0, 3.0])
    zero = np.zeros(4)
    opt = Adam([theta0], weight_decay=wd, weight_decay_order="after")
    theta, expected = [theta0], theta0.copy()
    for _ in range(4):
        theta = opt.step(theta, [zero], lr)
        expected = expected * (1 - lr * wd)
        np.testing.assert_array_equal(theta[0], expected)
    # 'before': the decay gradient wd * theta goes through Adam's normalisation: ~ lr * sign(theta) on step 1
    (theta1,) = Adam([theta0], weight_decay=wd, weight_decay_order="before").step([theta0], [zero], lr)
    np.testing.assert_allclose(theta1, theta0 - lr * np.sign(theta0), rtol=0, atol=lr * 1e-3)
    assert theta1[2] == 0.0


def test_adam_eps_zero_with_zero_gradient_gives_no_nan():
    opt = Adam([(3,)], eps=0.0)
    (theta,) = opt.step([np.array([1.0, 2.0, 3.0])], [np.array([0.0, 1.0, -4.0])], 0.1)
    np.testing.assert_allclose(theta, [1.0, 1.9, 3.1], rtol=1e-15)


def test_adam_beta_zero_is_sign_descent():
    opt = Adam([(2,)], betas=(0.0, 0.0), eps=0.0)
    theta = [np.array([0.0, 0.0])]
    for g in ([3.0, -1e-5], [-2.0, 7.0]):
        theta = opt.step(theta, [np.array(g)], 0.5)
    np.testing.assert_allclose(theta[0], [0.0, 0.0], atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(mu=st.floats(0.0, 0.99), g=st.floats(-10, 10), lr=st.floats(1e-4, 1.0), T=st.integers(1, 20))
def test_sgd_momentum_constant_gradient_closed_form(mu, g, lr, T):
    opt = SGD([()], momentum=mu)
    theta = [np.array(0.7)]
    expected_theta = 0.7
    for t in range(1, T + 1):
        theta = opt.step(theta, [np.array(g)], lr)
        buf_t = g * sum(mu**i for i in range(t))  # buf_t = g * sum_{i < t} mu^i
        expected_theta -= lr * buf_t
        if mu > 0:
            assert float(opt.momentum_buffer[0]) == pytest.approx(buf_t, rel=1e-12, abs=1e-300)
    assert float(theta[0]) == pytest.approx(expected_theta, rel=1e-11, abs=1e-11)


def test_sgd_plain_step_and_no_buffer_without_momentum():
    opt = SGD([(2,), (1,)])
    out = opt.step([np.array([1.0, -2.0]), np.array([0.5])], [np.array([0.5, 0.25]), np.array([-4.0])], 0.5)
    np.testing.assert_array_equal(out[0], [0.75, -2.125])
    np.testing.assert_array_equal(out[1], [2.5])
    assert opt.momentum_buffer == [None, None] and opt.t == 1


def test_sgd_weight_decay_before_vs_after_with_momentum_hand_example():
    # theta0 = 1, zero gradient, wd = 0.1, lr = 0.1, momentum 0.9
    before = SGD([()], momentum=0.9, weight_decay=0.1, weight_decay_order="before")
    after = SGD([()], momentum=0.9, weight_decay=0.1, weight_decay_order="after")
    tb, ta = [np.array(1.0)], [np.array(1.0)]
    tb = before.step(tb, [np.array(0.0)], 0.1)  # d = 0.1; buf = 0.1; theta = 0.99
    ta = after.step(ta, [np.array(0.0)], 0.1)  # theta = 1 * (1 - 0.01) = 0.99
    assert float(tb[0]) == pytest.approx(0.99, rel=1e-15) and float(ta[0]) == pytest.approx(0.99, rel=1e-15)
    tb = before.step(tb, [np.array(0.0)], 0.1)  # d = 0.099; buf = 0.09 + 0.099 = 0.189; theta = 0.9711
    ta = after.step(ta, [np.array(0.0)], 0.1)  # theta = 0.99 * 0.99 = 0.9801
    assert float(tb[0]) == pytest.approx(0.9711, rel=1e-14)
    assert float(ta[0]) == pytest.approx(0.9801, rel=1e-14)


@settings(max_examples=30, deadline=None)
@given(theta=st.floats(-10, 10), g=st.floats(-10, 10), wd=st.floats(0, 1), lr=st.floats(1e-4, 1))
def test_sgd_without_momentum_before_equals_after(theta, g, wd, lr):
    b = SGD([()], weight_decay=wd, weight_decay_order="before").step([np.array(theta)], [np.array(g)], lr)
    a = SGD([()], weight_decay=wd, weight_decay_order="after").step([np.array(theta)], [np.array(g)], lr)
    expected = theta - lr * (g + wd * theta)
    assert float(b[0]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert float(a[0]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# L1 and schedule
# ---------------------------------------------------------------------------------------------------------------


def test_l1_gradient_by_hand():
    out = l1_gradient([np.array([2.0, -0.5, 0.0]), np.array([[-3.0]], dtype=np.float32)], 1e-4)
    np.testing.assert_array_equal(out[0], [1e-4, -1e-4, 0.0])
    np.testing.assert_array_equal(out[1], [[-1e-4]])
    assert out[1].dtype == np.float64
    np.testing.assert_array_equal(l1_gradient([np.array([1.0])], 0.0)[0], [0.0])


def test_multistep_lr_values():
    # the authors' synthetic default: 150 epochs, lr 1e-2, drop 10x at 3/4 (epoch 112); the paper: 1/2 and 3/4
    assert multistep_lr(1e-2, 0, [112]) == 1e-2
    assert multistep_lr(1e-2, 111, [112]) == 1e-2
    assert multistep_lr(1e-2, 112, [112]) == pytest.approx(1e-3, rel=1e-15)
    assert multistep_lr(1e-2, 149, [112]) == pytest.approx(1e-3, rel=1e-15)
    assert multistep_lr(1e-2, 74, [75, 112]) == 1e-2
    assert multistep_lr(1e-2, 75, [75, 112]) == pytest.approx(1e-3, rel=1e-15)
    assert multistep_lr(1e-2, 140, [112, 75]) == pytest.approx(1e-4, rel=1e-15)  # any order
    # torch's chained float: ((0.01 * 0.1) * 0.1)
    assert multistep_lr(0.01, 2, [1, 2]) == (0.01 * 0.1) * 0.1
    # powers of two are exact
    assert multistep_lr(1.0, 7, [2, 4, 6], gamma=0.5) == 0.125
    assert multistep_lr(1.0, 5, [2, 4, 6], gamma=0.5) == 0.25
    # milestone 0 applies at the start; a repeated milestone counts twice; no milestones keeps the base rate
    assert multistep_lr(1.0, 0, [0], gamma=0.5) == 0.5
    assert multistep_lr(1.0, 3, [3, 3], gamma=0.5) == 0.25
    assert multistep_lr(0.3, 1000, []) == 0.3


# ---------------------------------------------------------------------------------------------------------------
# Inputs are not mutated; bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda p: SGD(p, momentum=0.9, weight_decay=0.1, weight_decay_order="before"),
        lambda p: SGD(p, momentum=0.9, weight_decay=0.1, weight_decay_order="after"),
        lambda p: Adam(p, weight_decay=0.1, weight_decay_order="before"),
        lambda p: Adam(p, weight_decay=0.1, weight_decay_order="after"),
    ],
)
def test_inputs_not_mutated_and_outputs_fresh(make):
    params = [np.array([1.0, -2.0]), np.array([[0.5, 0.0], [3.0, -1.0]])]
    grads = [np.array([0.1, 0.2]), np.array([[-0.3, 0.0], [1.0, 2.0]])]
    p_copy, g_copy = copy.deepcopy(params), copy.deepcopy(grads)
    opt = make(params)
    out = opt.step(params, grads, 0.1)
    out2 = opt.step(out, grads, 0.1)
    for a, b in zip(params + grads, p_copy + g_copy):
        np.testing.assert_array_equal(a, b)
    assert all(o is not p and not np.shares_memory(o, p) for o, p in zip(out, params))
    snapshot = [o.copy() for o in out]
    out2[0][:] = 99.0  # writing into a result must not touch earlier results or the optimiser state
    np.testing.assert_array_equal(out[0], snapshot[0])
    l1_gradient(params, 0.1)
    np.testing.assert_array_equal(params[0], p_copy[0])


def test_float32_params_computed_in_float64():
    opt = SGD([np.zeros(2, dtype=np.float32)])
    (out,) = opt.step([np.array([1.0, 2.0], dtype=np.float32)], [np.array([0.1, 0.1], dtype=np.float32)], 1.0)
    assert out.dtype == np.float64


@pytest.mark.parametrize(
    "build,error,match",
    [
        (lambda: SGD([(2,)], momentum=1.0), ValueError, "momentum"),
        (lambda: SGD([(2,)], momentum=-0.1), ValueError, "momentum"),
        (lambda: SGD([(2,)], weight_decay=-1e-3), ValueError, "weight_decay"),
        (lambda: SGD([(2,)], weight_decay_order="middle"), ValueError, "weight_decay_order"),
        (lambda: SGD([]), ValueError, "params_or_shapes"),
        (lambda: SGD(np.zeros(3)), TypeError, "params_or_shapes"),
        (lambda: SGD([np.zeros(3, dtype=int)]), TypeError, r"params_or_shapes\[0\]"),
        (lambda: SGD([(2, -1)]), ValueError, r"params_or_shapes\[0\]\[1\]"),
        (lambda: Adam([(2,)], betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (lambda: Adam([(2,)], betas=(0.9, -0.5)), ValueError, r"betas\[1\]"),
        (lambda: Adam([(2,)], betas=(0.9,)), TypeError, "betas"),
        (lambda: Adam([(2,)], eps=-1e-8), ValueError, "eps"),
        (lambda: Adam([(2,)], eps=float("nan")), ValueError, "eps"),
        (lambda: Adam([(2,)], weight_decay="0.1"), TypeError, "weight_decay"),
        (lambda: l1_gradient([np.ones(2)], -1.0), ValueError, "l1"),
        (lambda: l1_gradient(np.ones(2), 1.0), TypeError, "params"),
        (lambda: multistep_lr(0.0, 1, [1]), ValueError, "base_lr"),
        (lambda: multistep_lr(0.1, -1, [1]), ValueError, "epoch"),
        (lambda: multistep_lr(0.1, 1.5, [1]), TypeError, "epoch"),
        (lambda: multistep_lr(0.1, 1, [2, -1]), ValueError, r"milestones\[1\]"),
        (lambda: multistep_lr(0.1, 1, "12"), TypeError, "milestones"),
        (lambda: multistep_lr(0.1, 1, [1], gamma=0.0), ValueError, "gamma"),
    ],
)
def test_constructor_and_function_bad_input(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("cls", [SGD, Adam])
@pytest.mark.parametrize(
    "params,grads,lr,error,match",
    [
        ([np.zeros(2), np.zeros((2, 3))], [np.zeros(2), np.zeros((2, 3))], 0.0, ValueError, "lr"),
        ([np.zeros(2), np.zeros((2, 3))], [np.zeros(2), np.zeros((2, 3))], -0.1, ValueError, "lr"),
        ([np.zeros(2), np.zeros((2, 3))], [np.zeros(2), np.zeros((2, 3))], float("nan"), ValueError, "lr"),
        ([np.zeros(2), np.zeros((2, 3))], [np.zeros(2), np.zeros((2, 3))], "0.1", TypeError, "lr"),
        ([np.zeros(2), np.zeros((2, 3))], [np.zeros(2)], 0.1, ValueError, "grads must hold 2"),
        ([np.zeros(2), np.zeros((2, 3))], [np.zeros(2), np.zeros((3, 2))], 0.1, ValueError,
         r"grads\[1\] must have shape \(2, 3\) \(parameter 1\), got shape \(3, 2\)"),
        ([np.zeros(2), np.zeros((3, 2))], [np.zeros(2), np.zeros((2, 3))], 0.1, ValueError, r"params\[1\].*\(3, 2\)"),
        ([np.zeros(2), np.zeros((2, 3))], [np.array([0.0, np.nan]), np.zeros((2, 3))], 0.1, ValueError,
         r"grads\[0\] must be finite"),
        ([np.array([np.inf, 0.0]), np.zeros((2, 3))], [np.zeros(2), np.zeros((2, 3))], 0.1, ValueError,
         r"params\[0\] must be finite"),
        ([np.zeros(2), np.zeros((2, 3))], [np.zeros(2, dtype=int), np.zeros((2, 3))], 0.1, TypeError, r"grads\[0\]"),
        ([np.zeros(2), np.zeros((2, 3))], np.zeros(2), 0.1, TypeError, "grads"),
    ],
)
def test_step_bad_input_leaves_state_unchanged(cls, params, grads, lr, error, match):
    opt = cls([(2,), (2, 3)])
    with pytest.raises(error, match=match):
        opt.step(params, grads, lr)
    assert opt.t == 0


def test_overflow_is_rejected_and_state_kept():
    opt = Adam([(1,)])
    with pytest.raises(ValueError, match="not finite"):
        opt.step([np.array([0.0])], [np.array([1e200])], 0.1)
    assert opt.t == 0 and opt.exp_avg_sq[0][0] == 0.0
    sgd = SGD([(1,)], momentum=0.5)
    with pytest.raises(ValueError, match="not finite"):
        sgd.step([np.array([1e308])], [np.array([-1e308])], 10.0)
    assert sgd.t == 0 and sgd.momentum_buffer == [None]
