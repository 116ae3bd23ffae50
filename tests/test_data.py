"""Tests of hardtovary.reference.data: spirals (paper App. B.2), patchwork regression (notebook), two-sigmoid toy
(App. A.1). Expected values come from the paper, from the authors' code, from hand computation, or from an independent
re-derivation of the authors' RandomState call sequence written below in a different style."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from hardtovary.reference import data
from hardtovary.reference.data import (
    PAPER_SHORTCUT_SCALE,
    SpiralsConfig,
    make_spirals_task,
    patchwork_env_gradients,
    patchwork_env_losses,
    patchwork_regression,
    spirals,
    two_sigmoid_env_grid,
    two_sigmoid_env_losses,
    two_sigmoid_model,
    two_sigmoid_target,
)

# ---------------------------------------------------------------------------------------------------------------
# An independent re-derivation of the authors' generator: all random draws first, assembly afterwards. It uses
# RandomState.standard_normal for randn and random_sample + affine map for uniform (the legacy uniform is
# low + (high - low) * random_sample), and np.outer / column_stack / concatenate for the assembly.
# ---------------------------------------------------------------------------------------------------------------


def _draws(n, env, n_envs, d, seed):
    rs = np.random.RandomState(seed)
    out = {}
    out["signature_rows"] = rs.standard_normal(size=(n_envs, d))
    out["radius0"] = 0.08 + (1.0 - 0.08) * rs.random_sample(n)
    out["label"] = rs.randint(0, 2, n)
    out["radius_noise"] = -0.02 + (0.02 - (-0.02)) * rs.random_sample(n)
    out["test_signatures"] = rs.standard_normal(size=(n, d)) if env == "test" else None
    return out


def _authors_spirals(n, n_rot, env, n_envs, d, seed):
    r = _draws(n, env, n_envs, d, seed)
    angle = (2 * n_rot * math.pi) * r["radius0"] + math.pi * r["label"].astype(np.float64)
    radius = r["radius0"] + r["radius_noise"]
    points = np.column_stack([np.cos(angle) * radius, np.sin(angle) * radius])
    points = points / points.std(axis=0)
    if env == "test":
        shortcut = r["test_signatures"]
    else:
        shortcut = np.outer(2 * r["label"] - 1, r["signature_rows"][env])
    X = np.concatenate([points, shortcut], axis=1).astype(np.float32)
    return X, r["label"].astype(np.float32)


@pytest.mark.parametrize(
    "args",
    [
        (1024, 3, 0, 16, 8, 0),
        (1024, 3, 15, 16, 8, 15),
        (2000, 3, "test", 16, 8, 2**32 - 1),
        (257, 2, "test", 3, 5, 7),  # odd number of normals in the signature matrix (legacy gauss cache)
        (33, 1.5, 2, 3, 5, 123456),
        (10, 4, 0, 1, 0, 3),  # no shortcut columns
    ],
)
def test_spirals_bit_identical_to_rederivation(args):
    X, y = spirals(*args)
    X_ref, y_ref = _authors_spirals(*args)
    assert X.dtype == np.float32 and y.dtype == np.float32
    assert X.tobytes() == X_ref.tobytes()
    assert y.tobytes() == y_ref.tobytes()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 60),
    n_rot=st.integers(1, 5),
    n_envs=st.integers(1, 5),
    d=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
    env_pick=st.one_of(st.just("test"), st.integers(0, 4)),
)
def test_spirals_bit_identical_hypothesis(n, n_rot, n_envs, d, seed, env_pick):
    env = env_pick if env_pick == "test" else env_pick % n_envs
    X, y = spirals(n, n_rot, env, n_envs, d, seed)
    X_ref, y_ref = _authors_spirals(n, n_rot, env, n_envs, d, seed)
    assert X.tobytes() == X_ref.tobytes() and y.tobytes() == y_ref.tobytes()


# ---------------------------------------------------------------------------------------------------------------
# Spirals: shapes, balance, standardisation, shortcut structure
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env,n_dims", [(0, 8), (3, 5), ("test", 8), ("test", 0), (1, 0)])
def test_spirals_shapes_and_dtypes(env, n_dims):
    X, y = spirals(300, 3, env, 4, n_dims, 1)
    assert X.shape == (300, 2 + n_dims) and X.dtype == np.float32
    assert y.shape == (300,) and y.dtype == np.float32
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert np.all(np.isfinite(X))


@pytest.mark.parametrize("seed", range(5))
def test_spirals_class_balance(seed):
    n = 4000
    _, y = spirals(n, 3, 0, 2, 4, seed)
    # Binomial(n, 1/2): 4.5 standard deviations
    assert abs(y.sum() - n / 2) <= 4.5 * math.sqrt(n / 4)
    assert 0 < y.sum() < n


@pytest.mark.parametrize("env", [0, "test"])
def test_mechanism_columns_standardised(env):
    X, _ = spirals(1500, 3, env, 4, 3, 11)
    std = X[:, :2].astype(np.float64).std(axis=0)
    np.testing.assert_allclose(std, [1.0, 1.0], rtol=0, atol=2e-6)


def test_train_shortcut_identical_per_class_and_negated():
    X, y = spirals(500, 3, 2, 4, 6, 5)
    sig = X[:, 2:]
    v = sig[y == 1][0]
    assert np.all(sig[y == 1] == v)
    assert np.all(sig[y == 0] == -v)
    assert np.any(v != 0)
    # the shortcut alone classifies every training example: sign(v . s) = 2y - 1
    margin = (2 * y - 1) * (sig.astype(np.float64) @ v.astype(np.float64))
    assert np.all(margin > 0)


def test_train_environments_have_different_shortcut_vectors():
    task = make_spirals_task(SpiralsConfig(n_train_envs=6, examples_per_env=64, n_test=10, n_dims=4))
    vectors = []
    for e in range(6):
        X, y = task.X_train[e], task.y_train[e]
        vectors.append(X[y == 1][0, 2:] if (y == 1).any() else -X[y == 0][0, 2:])
    vectors = np.array(vectors)
    for a in range(6):
        for b in range(a + 1, 6):
            assert np.abs(vectors[a] - vectors[b]).max() > 1e-3
            assert np.abs(vectors[a] + vectors[b]).max() > 1e-3


def test_same_seed_different_env_shares_spirals_not_shortcut():
    X0, y0 = spirals(200, 3, 0, 4, 3, 9)
    X3, y3 = spirals(200, 3, 3, 4, 3, 9)
    assert np.array_equal(X0[:, :2], X3[:, :2]) and np.array_equal(y0, y3)
    assert not np.array_equal(X0[:, 2:], X3[:, 2:])


def test_test_signatures_are_label_independent():
    n = 2000
    X, y = spirals(n, 3, "test", 16, 8, 2**32 - 1)
    sig = X[:, 2:].astype(np.float64)
    yc = y - y.mean()
    for j in range(sig.shape[1]):
        corr = np.corrcoef(sig[:, j], yc)[0, 1]
        assert abs(corr) < 4.5 / math.sqrt(n)
    # standard normal components (the code's N(0, 1)), each example its own vector
    assert np.all(np.abs(sig.mean(axis=0)) < 4.5 / math.sqrt(n))
    assert np.all(np.abs(sig.std(axis=0) - 1) < 0.08)
    assert len(np.unique(sig, axis=0)) == n
    # a training environment's shortcut rule is at chance on the test set
    Xtr, ytr = spirals(100, 3, 0, 16, 8, 0)
    v = Xtr[ytr == 1][0, 2:].astype(np.float64) if (ytr == 1).any() else -Xtr[ytr == 0][0, 2:].astype(np.float64)
    accuracy = np.mean((sig @ v > 0) == (y == 1))
    assert abs(accuracy - 0.5) < 4.5 * math.sqrt(0.25 / n)


def test_spirals_deterministic_per_seed_and_different_across_seeds():
    a = spirals(100, 3, 1, 3, 4, 42)
    b = spirals(100, 3, 1, 3, 4, 42)
    c = spirals(100, 3, 1, 3, 4, 43)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert not np.array_equal(a[0], c[0])
    t1 = spirals(100, 3, "test", 3, 4, 42)
    t2 = spirals(100, 3, "test", 3, 4, 43)
    assert not np.array_equal(t1[0], t2[0])


# ---------------------------------------------------------------------------------------------------------------
# Spirals geometry recovered from X alone: fit the two standardisation scales so that the points lie on the
# spirals angle = 2 pi n_rev r + pi y (mod 2 pi), up to the radius noise of +-0.02.
# ---------------------------------------------------------------------------------------------------------------


def _recover_radius(X, y, n_rev):
    u, v, lab = X[:, 0].astype(np.float64), X[:, 1].astype(np.float64), y.astype(np.float64)

    def radius_and_residual(scales):
        xs, ys = scales[0] * u, scales[1] * v
        radius = np.hypot(xs, ys)
        residual = np.angle(np.exp(1j * (np.arctan2(ys, xs) - 2 * np.pi * n_rev * radius - np.pi * lab)))
        return radius, residual

    def cost(scales):
        return np.mean(1 - np.cos(radius_and_residual(scales)[1]))

    grid = np.linspace(0.05, 5.0, 500)
    start = min(grid, key=lambda s: cost((s, s)))
    fit = minimize(cost, [start, start], method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-12})
    return radius_and_residual(fit.x)


@pytest.mark.parametrize("n_rev,seed", [(3, 0), (3, 1), (2, 2)])
def test_spiral_radius_in_range_before_standardisation(n_rev, seed):
    X, y = spirals(1000, n_rev, 0, 4, 2, seed)
    radius, residual = _recover_radius(X, y, n_rev)
    # radius U(0.08, 1) + U(-0.02, 0.02): inside [0.06, 1.02] and spanning it (fit precision ~0.01)
    assert radius.min() >= 0.06 - 0.01 and radius.max() <= 1.02 + 0.01
    assert radius.min() <= 0.09 and radius.max() >= 0.99
    # the angle misses the noise-free spiral by at most 2 pi n_rev * 0.02 (noise added after the angle)
    assert np.abs(residual).max() <= 1.15 * 2 * np.pi * n_rev * 0.02


@pytest.mark.parametrize("n_rev", [1, 2, 4])
def test_n_revolutions_sets_the_winding(n_rev):
    # Fitting with one revolution, the apparent maximal radius is n_rev times the true one (~1).
    X, y = spirals(1000, n_rev, 0, 4, 2, 0)
    radius, _ = _recover_radius(X, y, 1)
    assert 0.97 * n_rev <= radius.max() <= 1.05 * n_rev
    if n_rev != 1:
        X1, _ = spirals(1000, 1, 0, 4, 2, 0)
        assert not np.allclose(X[:, :2], X1[:, :2], atol=0.1)


# ---------------------------------------------------------------------------------------------------------------
# shortcut_scale
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", [1, "test"])
@pytest.mark.parametrize("scale", [0.0, 0.1, PAPER_SHORTCUT_SCALE, 2.5])
def test_shortcut_scale_multiplies_only_shortcut_columns(env, scale):
    X1, y1 = spirals(300, 3, env, 4, 5, 8)
    Xs, ys = spirals(300, 3, env, 4, 5, 8, shortcut_scale=scale)
    assert np.array_equal(Xs[:, :2], X1[:, :2]) and np.array_equal(ys, y1)
    np.testing.assert_allclose(Xs[:, 2:], X1[:, 2:].astype(np.float64) * scale, rtol=2e-7, atol=0)
    if scale == 0.0:
        assert np.all(Xs[:, 2:] == 0)


def test_shortcut_scale_one_is_default_and_paper_scale_is_variance_0p1():
    assert spirals(50, 3, 0, 2, 3, 1)[0].tobytes() == spirals(50, 3, 0, 2, 3, 1, shortcut_scale=1.0)[0].tobytes()
    assert PAPER_SHORTCUT_SCALE**2 == pytest.approx(0.1, rel=1e-15)
    X, _ = spirals(20000, 3, "test", 2, 4, 0, shortcut_scale=PAPER_SHORTCUT_SCALE)
    np.testing.assert_allclose(X[:, 2:].astype(np.float64).var(axis=0), 0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# Spirals: bad input
# ---------------------------------------------------------------------------------------------------------------

GOOD = dict(n_examples=10, n_revolutions=3, env=0, n_envs=2, n_dims=3, seed=0, shortcut_scale=1.0)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"n_examples": 1}, ValueError, "n_examples"),
        ({"n_examples": 10.0}, TypeError, "n_examples"),
        ({"n_examples": True}, TypeError, "n_examples"),
        ({"n_revolutions": 0}, ValueError, "n_revolutions"),
        ({"n_revolutions": -2}, ValueError, "n_revolutions"),
        ({"n_revolutions": float("nan")}, ValueError, "n_revolutions"),
        ({"n_revolutions": "3"}, TypeError, "n_revolutions"),
        ({"env": 2}, ValueError, "env"),
        ({"env": -1}, ValueError, "env"),
        ({"env": "train"}, ValueError, "env"),
        ({"env": 1.0}, TypeError, "env"),
        ({"n_envs": 0}, ValueError, "n_envs"),
        ({"n_dims": -1}, ValueError, "n_dims"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**32}, ValueError, "seed"),
        ({"seed": None}, TypeError, "seed"),
        ({"shortcut_scale": -0.5}, ValueError, "shortcut_scale"),
        ({"shortcut_scale": float("inf")}, ValueError, "shortcut_scale"),
    ],
)
def test_spirals_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        spirals(**{**GOOD, **change})


# ---------------------------------------------------------------------------------------------------------------
# Task builder
# ---------------------------------------------------------------------------------------------------------------


def test_make_spirals_task_defaults_shapes_and_seeds():
    task = make_spirals_task()
    c = task.config
    assert (c.n_train_envs, c.examples_per_env, c.n_test, c.n_revolutions, c.n_dims, c.seed, c.shortcut_scale) == (
        16, 1024, 2000, 3, 8, 0, 1.0)
    assert task.X_train.shape == (16, 1024, 10) and task.X_train.dtype == np.float32
    assert task.y_train.shape == (16, 1024) and task.y_train.dtype == np.float32
    assert task.X_test.shape == (2000, 10) and task.X_test.dtype == np.float32
    assert task.y_test.shape == (2000,) and task.y_test.dtype == np.float32
    for e in (0, 7, 15):  # environment e: seed 0 + e, row e of a 16-row signature matrix
        X, y = _authors_spirals(1024, 3, e, 16, 8, e)
        assert task.X_train[e].tobytes() == X.tobytes() and task.y_train[e].tobytes() == y.tobytes()
    X, y = _authors_spirals(2000, 3, "test", 16, 8, 4294967295)
    assert task.X_test.tobytes() == X.tobytes() and task.y_test.tobytes() == y.tobytes()


def test_make_spirals_task_custom_config():
    config = SpiralsConfig(n_train_envs=3, examples_per_env=20, n_test=30, n_revolutions=2, n_dims=4, seed=100,
                           shortcut_scale=0.5)
    task = make_spirals_task(config)
    assert task.X_train.shape == (3, 20, 6) and task.X_test.shape == (30, 6)
    X2, _ = _authors_spirals(20, 2, 2, 3, 4, 102)
    np.testing.assert_allclose(task.X_train[2, :, 2:], X2[:, 2:].astype(np.float64) * 0.5, rtol=2e-7)
    assert np.array_equal(task.X_train[2, :, :2], X2[:, :2])
    # the test set does not depend on the base seed
    other = make_spirals_task(SpiralsConfig(n_train_envs=3, examples_per_env=20, n_test=30, n_revolutions=2,
                                            n_dims=4, seed=5, shortcut_scale=0.5))
    assert np.array_equal(task.X_test, other.X_test)
    assert not np.array_equal(task.X_train, other.X_train)


def test_spirals_config_paper_and_validation():
    p = SpiralsConfig.paper()
    assert (p.n_train_envs, p.examples_per_env, p.n_test, p.n_dims) == (32, 1280, 2000, 32)
    assert p.shortcut_scale == pytest.approx(math.sqrt(0.1))
    with pytest.raises(ValueError, match="n_train_envs"):
        SpiralsConfig(n_train_envs=0)
    with pytest.raises(ValueError, match="examples_per_env"):
        SpiralsConfig(examples_per_env=1)
    with pytest.raises(ValueError, match="seed"):
        SpiralsConfig(seed=2**32 - 2, n_train_envs=4)  # seed + 3 would exceed 2**32 - 1
    with pytest.raises(TypeError, match="n_dims"):
        SpiralsConfig(n_dims=2.0)
    with pytest.raises(TypeError, match="config"):
        make_spirals_task({"n_train_envs": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        SpiralsConfig().seed = 3


# ---------------------------------------------------------------------------------------------------------------
# Patchwork linear regression
# ---------------------------------------------------------------------------------------------------------------


def test_patchwork_data_exactly_as_specified():
    X, y = patchwork_regression()
    assert X.dtype == np.float64 and y.dtype == np.float64
    expected = np.array([
        [3.0, 0.0, 0.0, 0.0, 3 * 0.1],
        [0.0, 3.0, 0.0, 0.0, 3 * 0.1],
        [0.0, 0.0, 3.0, 0.0, 3 * 0.1],
        [0.0, 0.0, 0.0, 3.0, 3 * 0.1],
    ])
    assert X.shape == (4, 5) and np.array_equal(X, expected)
    assert X[0, 4] == 0.30000000000000004
    assert np.array_equal(y, [1.0, 1.0, 1.0, 1.0])


def test_patchwork_losses_and_gradients_by_hand():
    X, y = patchwork_regression()
    # theta = 0: every residual is -1, loss 0.5, gradient -X[k]
    np.testing.assert_array_equal(patchwork_env_losses(np.zeros(5), X, y), [0.5] * 4)
    np.testing.assert_array_equal(patchwork_env_gradients(np.zeros(5), X, y), -X)
    # theta = (1/3, 0, 0, 0, 0): environment 0 is fitted, the others are not
    theta = np.array([1 / 3, 0, 0, 0, 0])
    np.testing.assert_allclose(patchwork_env_losses(theta, X, y), [0.0, 0.5, 0.5, 0.5], atol=1e-15)
    # theta = (0, 0, 0, 0, 2): residual 0.6 - 1 = -0.4 everywhere; loss 0.08; gradient -0.4 * X[k]
    theta = np.array([0, 0, 0, 0, 2.0])
    np.testing.assert_allclose(patchwork_env_losses(theta, X, y), [0.08] * 4, rtol=1e-14)
    np.testing.assert_allclose(patchwork_env_gradients(theta, X, y)[2], [0, 0, -1.2, 0, -0.12], rtol=1e-14)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-2, 2), min_size=5, max_size=5))
def test_patchwork_gradients_match_finite_differences(theta):
    X, y = patchwork_regression()
    theta = np.array(theta)

    def losses(t):  # written independently of the module: 0.5 (x . t - y)^2 per row
        return np.array([0.5 * (sum(X[k, j] * t[j] for j in range(5)) - y[k]) ** 2 for k in range(4)])

    h = 1e-6
    fd = np.empty((4, 5))
    for j in range(5):
        step = np.zeros(5)
        step[j] = h
        fd[:, j] = (losses(theta + step) - losses(theta - step)) / (2 * h)
    G = patchwork_env_gradients(theta, X, y)
    assert G.shape == (4, 5)
    np.testing.assert_allclose(G, fd, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(patchwork_env_losses(theta, X, y), losses(theta), rtol=1e-12, atol=1e-14)


def test_patchwork_bad_input():
    X, y = patchwork_regression()
    with pytest.raises(ValueError, match="theta"):
        patchwork_env_gradients(np.zeros(4), X, y)
    with pytest.raises(ValueError, match="y"):
        patchwork_env_gradients(np.zeros(5), X, np.ones(3))
    with pytest.raises(ValueError, match="X"):
        patchwork_env_losses(np.zeros(5), np.ones(5), y)
    with pytest.raises(ValueError, match="theta"):
        patchwork_env_losses(np.array([0, 0, np.nan, 0, 0]), X, y)
    with pytest.raises(TypeError, match="theta"):
        patchwork_env_gradients(np.zeros(5, dtype=int), X, y)


# ---------------------------------------------------------------------------------------------------------------
# Two-sigmoid toy (App. A.1)
# ---------------------------------------------------------------------------------------------------------------


def test_two_sigmoid_target_by_hand():
    x = np.array([0.0, 0.2, 0.4, 0.45, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0])
    expected = np.array([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0])
    np.testing.assert_allclose(two_sigmoid_target(x), expected, atol=1e-14)
    with pytest.raises(ValueError, match="x"):
        two_sigmoid_target(np.array([0.5, 1.1]))


def test_two_sigmoid_model_by_hand():
    # sigmoid(0) = 1/2, sigmoid(log 3) = 3/4
    theta = np.array([1.0, 0.0, 1.0, 0.0, 2.0, -3.0])
    assert two_sigmoid_model(theta, np.array(0.0)) == pytest.approx(2 * 0.5 - 3 * 0.5)
    theta = np.array([0.0, math.log(3), 2.0, 0.0, 4.0, 1.0])
    out = two_sigmoid_model(theta, np.array([0.0, 0.5 * math.log(3)]))
    np.testing.assert_allclose(out, [4 * 0.75 + 0.5, 4 * 0.75 + 0.75], rtol=1e-14)
    # saturation: no overflow, exact limits
    theta = np.array([100.0, -50.0, 100.0, -75.0, 1.0, 1.0])
    np.testing.assert_allclose(two_sigmoid_model(theta, np.array([-20.0, 20.0])), [0.0, 2.0], atol=1e-300)
    with pytest.raises(ValueError, match="theta"):
        two_sigmoid_model(np.ones(5), np.array([0.1]))


@pytest.mark.parametrize(
    "theta2,LA,LB,LB_tilde",
    [(-50.0, 4.609e-2, 7.06e-3, 1.0623), (-45.0, 3.192e-3, 3.193e-3, 1.0584)],
)
def test_two_sigmoid_reference_values(theta2, LA, LB, LB_tilde):
    theta_star = np.array([100.0, theta2, 100.0, -75.0, 1.0, 1.0])
    theta_tilde = np.array([100.0, theta2, 100.0, -75.0, 1.0, -0.5])
    LA_star, LB_star = two_sigmoid_env_losses(theta_star)
    LA_tilde, LB_t = two_sigmoid_env_losses(theta_tilde)
    assert LA_star == pytest.approx(LA, rel=1e-3)
    assert LB_star == pytest.approx(LB, rel=1e-3)
    assert LB_t == pytest.approx(LB_tilde, rel=1e-3)
    # A is blind to theta6: sigmoid(100 x - 75) < e^-25 on [0, 0.5)
    assert abs(LA_tilde - LA_star) < 1e-11
    np.testing.assert_array_equal(data.two_sigmoid_theta_star(theta2), theta_star)
    np.testing.assert_array_equal(data.two_sigmoid_theta_tilde(theta2), theta_tilde)


def test_two_sigmoid_grids_and_exact_mean():
    xa = two_sigmoid_env_grid("A", 4)
    np.testing.assert_allclose(xa, [0.0625, 0.1875, 0.3125, 0.4375], rtol=1e-15)
    xb = two_sigmoid_env_grid("B", 2)
    np.testing.assert_allclose(xb, [0.625, 0.875], rtol=1e-15)
    xa = two_sigmoid_env_grid("A", 1000)
    assert xa.min() > 0 and xa.max() < 0.5 and np.all(np.diff(xa) > 0)
    # A constant model f = 1 (theta5 = 1, theta6 = 0, sigmoid saturated at 1): on B the error is f* - 1 and
    # (1/0.5) * integral_{0.5}^{1} (f* - 1)^2 = 2 * (0 + integral_0^{0.1} (10 s)^2 ds + 0.2) = 2 * (1/30 + 0.2)
    theta = np.array([0.0, 800.0, 0.0, 0.0, 1.0, 0.0])
    LA, LB = two_sigmoid_env_losses(theta)
    assert LB == pytest.approx(2 * (1 / 30 + 0.2), rel=1e-6)
    # on A: (1/0.5) * (0.4 * 1 + integral_0^{0.1} (1 - 10 s)^2 ds) = 2 * (0.4 + 1/30)
    assert LA == pytest.approx(2 * (0.4 + 1 / 30), rel=1e-6)
    with pytest.raises(ValueError, match="env"):
        two_sigmoid_env_grid("C", 10)
    with pytest.raises(ValueError, match="n_grid"):
        two_sigmoid_env_losses(theta, n_grid=0)
