"""Tests of hardtovary.reference.losses against direct formulas and float64 central finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardtovary.reference.losses import loss_gradient, loss_per_example, predictions_correct

STEP = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Independent routes: naive textbook formulas (fine for moderate logits) and central differences
# ----------------------------------------------------------------------------------------------------------------


def naive_loss(kind, z, y):
    if kind == "bce_with_logits":
        # log s(z) = -log(1 + e^-z), log(1 - s(z)) = -log(1 + e^z): no cancellation for moderate |z|
        return y * np.log1p(np.exp(-z[..., 0])) + (1.0 - y) * np.log1p(np.exp(z[..., 0]))
    if kind == "mse":
        return ((z - y) ** 2).sum(axis=-1) / z.shape[-1]
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    if np.issubdtype(y.dtype, np.integer):
        y = np.eye(z.shape[-1])[y]
    return -(y * log_p).sum(axis=-1)


def central_difference(kind, z, y):
    """d loss_per_example / d z[..., c] for every c; each example's loss depends on its own logits only, so one
    perturbation of column c serves every example."""
    fd = np.empty_like(z)
    for c in range(z.shape[-1]):
        plus, minus = z.copy(), z.copy()
        plus[..., c] += STEP
        minus[..., c] -= STEP
        fd[..., c] = (loss_per_example(kind, plus, y) - loss_per_example(kind, minus, y)) / (2 * STEP)
    return fd


@st.composite
def problems(draw, kind):
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    n_logits = 1 if kind == "bce_with_logits" else draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    z = rng.standard_normal(batch + (n_logits,)) * scale
    if kind == "bce_with_logits":
        y = rng.random(batch)
    elif kind == "mse":
        y = rng.standard_normal(batch + (n_logits,))
    elif kind == "cross_entropy_hard":
        y = rng.integers(0, n_logits, size=batch)
    else:
        y = rng.dirichlet(np.ones(n_logits), size=batch) if batch else rng.dirichlet(np.ones(n_logits))
    return z, y


KINDS = ["bce_with_logits", "cross_entropy_hard", "cross_entropy_soft", "mse"]


def api_kind(kind):
    return "cross_entropy" if kind.startswith("cross_entropy") else kind


# ----------------------------------------------------------------------------------------------------------------
# Values and derivatives
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_loss_matches_the_textbook_formula(kind, data):
    z, y = data.draw(problems(kind))
    got = loss_per_example(api_kind(kind), z, y)
    assert got.shape == z.shape[:-1] and got.dtype == np.float64
    np.testing.assert_allclose(got, naive_loss(api_kind(kind), z, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_gradient_matches_central_differences(kind, data):
    z, y = data.draw(problems(kind))
    got = loss_gradient(api_kind(kind), z, y)
    assert got.shape == z.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, central_difference(api_kind(kind), z, y), rtol=1e-6, atol=1e-8)


def test_mse_is_the_mean_over_the_last_axis():
    z = np.array([[1.0, 2.0, 4.0]])
    y = np.array([[0.0, 0.0, 0.0]])
    np.testing.assert_allclose(loss_per_example("mse", z, y), [(1 + 4 + 16) / 3])
    np.testing.assert_allclose(loss_gradient("mse", z, y), [[2 / 3, 4 / 3, 8 / 3]])


def test_bce_is_stable_at_large_logits():
    z = np.array([[1000.0], [1000.0], [-1000.0], [-1000.0], [1000.0], [-1000.0]])
    y = np.array([0.0, 1.0, 0.0, 1.0, 0.5, 0.25])
    loss = loss_per_example("bce_with_logits", z, y)
    grad = loss_gradient("bce_with_logits", z, y)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    # l = -y log s(z) - (1 - y) log(1 - s(z)) with log s(1000) = 0, log(1 - s(1000)) = -1000 to float precision
    np.testing.assert_allclose(loss, [1000.0, 0.0, 0.0, 1000.0, 500.0, 250.0], atol=1e-12)
    np.testing.assert_allclose(grad[:, 0], [1.0, 0.0, 0.0, -1.0, 0.5, -0.25], atol=1e-12)


def test_cross_entropy_is_stable_at_large_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [1000.0, 1000.0, 0.0]])
    y = np.array([2, 0])
    np.testing.assert_allclose(loss_per_example("cross_entropy", z, y), [2000.0, np.log(2.0)], rtol=1e-12)
    np.testing.assert_allclose(loss_gradient("cross_entropy", z, y), [[1, 0, -1], [-0.5, 0.5, 0]], atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_cross_entropy_hard_equals_soft_with_one_hot_targets(data):
    z, classes = data.draw(problems("cross_entropy_hard"))
    one_hot = np.eye(z.shape[-1])[classes]
    np.testing.assert_allclose(
        loss_per_example("cross_entropy", z, classes), loss_per_example("cross_entropy", z, one_hot),
        rtol=1e-13, atol=1e-14,
    )
    np.testing.assert_allclose(
        loss_gradient("cross_entropy", z, classes), loss_gradient("cross_entropy", z, one_hot), rtol=1e-13, atol=1e-14
    )


def test_float32_inputs_are_computed_in_float64():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((5, 3))
    y = rng.integers(0, 3, size=5)
    got = loss_per_example("cross_entropy", z.astype(np.float32), y)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, naive_loss("cross_entropy", z.astype(np.float32).astype(np.float64), y), rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Correct predictions
# ----------------------------------------------------------------------------------------------------------------


def test_predictions_correct_bce():
    z = np.array([[2.0], [-1.0], [0.0], [0.0], [-3.0]])
    y = np.array([1.0, 1.0, 0.5, 0.0, 0.2])
    np.testing.assert_array_equal(predictions_correct("bce_with_logits", z, y), [True, False, True, False, True])


def test_predictions_correct_cross_entropy_hard_and_soft():
    z = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    np.testing.assert_array_equal(predictions_correct("cross_entropy", z, np.array([1, 2, 2])), [True, False, True])
    soft = np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    np.testing.assert_array_equal(predictions_correct("cross_entropy", z, soft), [True, False, True])


def test_predictions_correct_is_undefined_for_mse():
    with pytest.raises(ValueError, match="mse"):
        predictions_correct("mse", np.zeros((2, 1)), np.zeros((2, 1)))


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

Z2 = np.zeros((2, 3))
Z1 = np.zeros((2, 1))


@pytest.mark.parametrize(
    "kind, logits, targets, error, match",
    [
        ("hinge", Z2, np.array([0, 1]), ValueError, "loss kind"),
        (None, Z2, np.array([0, 1]), TypeError, "loss kind"),
        ("cross_entropy", np.zeros((2, 3), dtype=np.int64), np.array([0, 1]), TypeError, "logits"),
        ("cross_entropy", np.array([[0.0, np.nan, 0.0], [0, 0, 0]]), np.array([0, 1]), ValueError, "logits.*finite"),
        ("cross_entropy", np.zeros((2, 0)), np.zeros((2,), dtype=int), ValueError, "logits"),
        ("cross_entropy", Z2, np.array([0, 3]), ValueError, "targets.*class indices"),
        ("cross_entropy", Z2, np.array([-1, 0]), ValueError, "targets.*class indices"),
        ("cross_entropy", Z2, np.array([0, 1, 2]), ValueError, "targets.*shape"),
        ("cross_entropy", Z2, np.array([True, False]), TypeError, "targets"),
        ("cross_entropy", Z2, np.array([0.0, 1.0]), ValueError, "targets.*shape"),
        ("cross_entropy", Z2, np.array([[0.5, 0.5, 0.1], [1.0, 0.0, 0.0]]), ValueError, "targets.*sum"),
        ("cross_entropy", Z2, np.array([[1.5, -0.5, 0.0], [1.0, 0.0, 0.0]]), ValueError, "targets.*nonnegative"),
        ("cross_entropy", Z2, np.array([[np.inf, 0, 0], [1.0, 0, 0]]), ValueError, "targets.*finite"),
        ("bce_with_logits", Z2, np.array([0.0, 1.0]), ValueError, "one logit"),
        ("bce_with_logits", Z1, np.array([[0.0], [1.0]]), ValueError, "targets.*shape"),
        ("bce_with_logits", Z1, np.array([0.0, 1.5]), ValueError, r"targets.*\[0, 1\]"),
        ("bce_with_logits", Z1, np.array([0, 1]), TypeError, "targets"),
        ("bce_with_logits", Z1, np.array([0.0, np.nan]), ValueError, "targets.*finite"),
        ("mse", Z2, np.zeros((2,)), ValueError, "targets.*shape"),
        ("mse", Z2, np.zeros((2, 3), dtype=int), TypeError, "targets"),
    ],
)
def test_bad_input_raises_naming_the_argument(kind, logits, targets, error, match):
    for function in (loss_per_example, loss_gradient):
        with pytest.raises(error, match=match):
            function(kind, logits, targets)
