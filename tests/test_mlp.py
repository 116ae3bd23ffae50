"""Tests of hardtovary.reference.mlp.

Expected values come from routes independent of the code under test: a plain forward pass written here
(einsum, explicit BatchNorm statistics, textbook losses), float64 central finite differences of it, direct
formulas for the running statistics, and sampling bounds for the initialisation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from hardtovary.reference import mlp
from hardtovary.reference.mlp import (
    MLPSpec,
    env_gradients,
    example_gradients,
    forward_envs,
    init_params,
    init_running_stats,
    param_names,
    param_shapes,
    pooled_gradient,
    predict,
    update_running_stats,
)

STEP = 1e-6
RTOL = 1e-6
ATOL = 1e-8  # absolute floor for gradients that are exactly zero (a Linear bias feeding BatchNorm)
MARGIN = 1e-3  # no pre-activation closer than this to the kink at 0

LOSSES = ["bce_with_logits", "cross_entropy_hard", "cross_entropy_soft", "mse"]
OUT_FEATURES = {"bce_with_logits": 1, "cross_entropy_hard": 3, "cross_entropy_soft": 3, "mse": 2}
ACTIVATIONS = [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("relu", 0.01), ("tanh", 0.01)]
BATCH_NORM = [(False, "pooled"), (True, "pooled"), (True, "per_env")]


def api_loss(loss):
    return "cross_entropy" if loss.startswith("cross_entropy") else loss


# ----------------------------------------------------------------------------------------------------------------
# The independent route
# ----------------------------------------------------------------------------------------------------------------


def ref_forward(spec, params, X, semantics="pooled", running=None):
    """Plain forward of X[K, B, in]: returns (logits [K, B, out], pre-BN Linear outputs, pre-activations)."""
    A, p, linear_outputs, pre_activations = X, 0, [], []
    for layer, _ in enumerate(spec.hidden):
        W, b = params[p], params[p + 1]
        Z = np.einsum("kbi,oi->kbo", A, W) + b
        linear_outputs.append(Z)
        p += 2
        if spec.batch_norm:
            gamma, beta = params[p], params[p + 1]
            p += 2
            if running is not None:
                mu, var = running[layer]
            elif semantics == "pooled":
                mu = Z.mean(axis=(0, 1))
                var = ((Z - mu) ** 2).mean(axis=(0, 1))
            else:
                mu = Z.mean(axis=1, keepdims=True)
                var = ((Z - mu) ** 2).mean(axis=1, keepdims=True)
            H = gamma * (Z - mu) / np.sqrt(var + spec.bn_eps) + beta
        else:
            H = Z
        pre_activations.append(H)
        if spec.activation == "leaky_relu":
            A = np.where(H > 0, H, spec.negative_slope * H)
        elif spec.activation == "relu":
            A = np.where(H > 0, H, 0.0)
        else:
            A = np.tanh(H)
    logits = np.einsum("kbi,oi->kbo", A, params[p]) + params[p + 1]
    return logits, linear_outputs, pre_activations


def ref_env_losses(loss, logits, Y):
    """Textbook per-environment mean losses [K] (the logits here are moderate, so the naive forms are exact)."""
    if loss == "bce_with_logits":
        z = logits[..., 0]  # -log s(z) = log(1 + e^-z), -log(1 - s(z)) = log(1 + e^z)
        per_example = Y * np.log1p(np.exp(-z)) + (1.0 - Y) * np.log1p(np.exp(z))
    elif loss == "mse":
        per_example = ((logits - Y) ** 2).mean(axis=-1)
    else:
        log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        if np.issubdtype(Y.dtype, np.integer):
            Y = np.eye(logits.shape[-1])[Y]
        per_example = -(Y * log_p).sum(axis=-1)
    return per_example.mean(axis=1)


def finite_difference_gradients(spec, params, X, Y, loss, semantics):
    """Central differences of the K losses L_e (one forward over ALL environments) w.r.t. every parameter entry."""
    grads = []
    for i, theta in enumerate(params):
        G = np.empty((X.shape[0],) + theta.shape)
        for j in np.ndindex(theta.shape):
            shifted = [q.copy() for q in params]
            shifted[i][j] = theta[j] + STEP
            plus = ref_env_losses(loss, ref_forward(spec, shifted, X, semantics)[0], Y)
            shifted[i][j] = theta[j] - STEP
            minus = ref_env_losses(loss, ref_forward(spec, shifted, X, semantics)[0], Y)
            G[(slice(None),) + j] = (plus - minus) / (2 * STEP)
        grads.append(G)
    return grads


def make_targets(rng, loss, K, B):
    out = OUT_FEATURES[loss]
    if loss == "bce_with_logits":
        return rng.random((K, B))
    if loss == "cross_entropy_hard":
        return rng.integers(0, out, size=(K, B))
    if loss == "cross_entropy_soft":
        return rng.dirichlet(np.ones(out), size=(K, B))
    return rng.standard_normal((K, B, out))


def make_problem(loss, *, activation="leaky_relu", slope=0.01, batch_norm=False, semantics="pooled",
                 hidden=(4, 5), K=3, B=4, seed=0):
    """A small net with perturbed parameters (so gamma, beta and the biases matter) and random data, redrawn
    until no pre-activation lies within MARGIN of 0."""
    spec = MLPSpec(3, hidden, OUT_FEATURES[loss], activation=activation, negative_slope=slope, batch_norm=batch_norm)
    for attempt in range(100):
        rng = np.random.default_rng([seed, attempt])
        params = [q + 0.3 * rng.standard_normal(q.shape) for q in init_params(spec, rng)]
        X = rng.standard_normal((K, B, 3))
        Y = make_targets(rng, loss, K, B)
        _, _, pre_activations = ref_forward(spec, params, X, semantics)
        if all(np.abs(H).min() > MARGIN for H in pre_activations):
            return spec, params, X, Y
    raise AssertionError("could not draw a problem away from the kinks")


def assert_grads_close(actual, expected, rtol=RTOL, atol=ATOL, names=None):
    """Per parameter tensor and per leading index: ||actual - expected|| <= rtol ||expected|| + atol."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, (i, a.shape, e.shape)
        a2, e2 = np.reshape(a, (a.shape[0], -1)), np.reshape(e, (e.shape[0], -1))
        error = np.linalg.norm(a2 - e2, axis=1)
        bound = rtol * np.linalg.norm(e2, axis=1) + atol
        assert np.all(error <= bound), f"parameter {i} ({names[i] if names else ''}): error {error} > bound {bound}"


# ----------------------------------------------------------------------------------------------------------------
# Spec, shapes, names
# ----------------------------------------------------------------------------------------------------------------


def test_param_shapes_and_names_follow_torch_sequential():
    spec = MLPSpec(3, (4, 5), 2, batch_norm=True)
    assert param_shapes(spec) == [(4, 3), (4,), (4,), (4,), (5, 4), (5,), (5,), (5,), (2, 5), (2,)]
    # Sequential(Linear, BatchNorm1d, act, Linear, BatchNorm1d, act, Linear) -> indices 0, 1, 3, 4, 6
    assert param_names(spec) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "4.weight", "4.bias", "6.weight", "6.bias"
    ]
    plain = MLPSpec(3, (4, 5), 2)
    assert param_shapes(plain) == [(4, 3), (4,), (5, 4), (5,), (2, 5), (2,)]
    assert param_names(plain) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert param_shapes(MLPSpec(7, ())) == [(1, 7), (1,)]
    assert param_names(MLPSpec(7, ())) == ["0.weight", "0.bias"]


def test_spec_normalises_hidden_to_a_tuple():
    spec = MLPSpec(3, [4, np.int64(5)])
    assert spec.hidden == (4, 5) and all(type(w) is int for w in spec.hidden)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(in_features=0), ValueError, "in_features"),
        (dict(in_features=2.0), TypeError, "in_features"),
        (dict(in_features=2, hidden=(4, 0)), ValueError, r"hidden\[1\]"),
        (dict(in_features=2, hidden=4), TypeError, "hidden"),
        (dict(in_features=2, out_features=0), ValueError, "out_features"),
        (dict(in_features=2, activation="gelu"), ValueError, "activation"),
        (dict(in_features=2, negative_slope=float("nan")), ValueError, "negative_slope"),
        (dict(in_features=2, batch_norm=1), TypeError, "batch_norm"),
        (dict(in_features=2, bn_eps=0.0), ValueError, "bn_eps"),
    ],
)
def test_spec_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        MLPSpec(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------------------------


def test_kaiming_normal_init_matches_torch_defaults():
    spec = MLPSpec(400, (500, 300), 7, batch_norm=True)
    params = init_params(spec, np.random.default_rng(123))
    assert [p.shape for p in params] == param_shapes(spec)
    weights = [params[0], params[4], params[8]]
    for W in weights:
        n, fan_in = W.size, W.shape[1]
        sigma2 = 2.0 / fan_in  # kaiming_normal_(a=0, mode='fan_in', nonlinearity='leaky_relu')
        # sum(w^2)/sigma^2 ~ chi2(n) (known mean 0); two-sided bound at 1e-6
        statistic = np.sum(W**2) / sigma2
        assert stats.chi2.ppf(5e-7, n) < statistic < stats.chi2.ppf(1 - 5e-7, n), (W.shape, statistic, n)
        assert abs(W.mean()) < 5.0 * math.sqrt(sigma2 / n)
        # normal, not uniform with the same variance (kaiming_uniform_)
        assert stats.kstest(W.ravel(), "norm", args=(0.0, math.sqrt(sigma2))).pvalue > 1e-6
    for b in (params[1], params[5], params[9]):
        assert np.all(b == 0.01)
    for gamma, beta in ((params[2], params[3]), (params[6], params[7])):
        assert np.all(gamma == 1.0) and np.all(beta == 0.0)
    assert all(p.dtype == np.float64 for p in params)


def test_init_is_reproducible_and_needs_a_generator():
    spec = MLPSpec(3, (4,), 2)
    a, b = init_params(spec, np.random.default_rng(5)), init_params(spec, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(TypeError, match="rng"):
        init_params(spec, 5)


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm, semantics", BATCH_NORM + [(False, "per_env")])
@pytest.mark.parametrize("activation, slope", ACTIVATIONS)
def test_forward_envs_matches_plain_forward(batch_norm, semantics, activation, slope):
    spec, params, X, _ = make_problem("cross_entropy_hard", activation=activation, slope=slope,
                                      batch_norm=batch_norm, semantics=semantics)
    expected = ref_forward(spec, params, X, semantics)[0]
    np.testing.assert_allclose(forward_envs(spec, params, X, semantics=semantics), expected, rtol=1e-12, atol=1e-12)
    result = env_gradients(spec, params, X, np.zeros(X.shape[:2], dtype=int), loss="cross_entropy", semantics=semantics)
    np.testing.assert_allclose(result.logits, expected, rtol=1e-12, atol=1e-12)


def test_forward_semantics_differ_only_with_batch_norm():
    spec, params, X, _ = make_problem("mse", batch_norm=True)
    pooled = forward_envs(spec, params, X, semantics="pooled")
    per_env = forward_envs(spec, params, X, semantics="per_env")
    assert np.abs(pooled - per_env).max() > 1e-2
    spec, params, X, _ = make_problem("mse", batch_norm=False)
    np.testing.assert_allclose(forward_envs(spec, params, X, semantics="pooled"),
                               forward_envs(spec, params, X, semantics="per_env"), rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------------
# Gradients against finite differences
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm, semantics", BATCH_NORM)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation, slope", ACTIVATIONS)
def test_env_gradients_match_finite_differences(batch_norm, semantics, loss, activation, slope):
    seed = 10 * LOSSES.index(loss) + ACTIVATIONS.index((activation, slope))
    spec, params, X, Y = make_problem(loss, activation=activation, slope=slope, batch_norm=batch_norm,
                                      semantics=semantics, seed=seed)
    result = env_gradients(spec, params, X, Y, loss=api_loss(loss), semantics=semantics)
    expected = finite_difference_gradients(spec, params, X, Y, api_loss(loss), semantics)
    assert_grads_close(result.grads, expected, names=param_names(spec))
    expected_losses = ref_env_losses(api_loss(loss), ref_forward(spec, params, X, semantics)[0], Y)
    np.testing.assert_allclose(result.losses, expected_losses, rtol=1e-12)


@pytest.mark.parametrize("hidden", [(), (6,), (3, 4, 3)])
@pytest.mark.parametrize("batch_norm, semantics", BATCH_NORM)
def test_env_gradients_match_finite_differences_other_depths(hidden, batch_norm, semantics):
    spec, params, X, Y = make_problem("cross_entropy_soft", activation="leaky_relu", slope=0.1, hidden=hidden,
                                      batch_norm=batch_norm, semantics=semantics, K=4, B=3, seed=7)
    result = env_gradients(spec, params, X, Y, loss="cross_entropy", semantics=semantics)
    assert_grads_close(result.grads, finite_difference_gradients(spec, params, X, Y, "cross_entropy", semantics))


@pytest.mark.parametrize("activation, slope, derivative_at_zero", [("relu", 0.01, 0.0), ("leaky_relu", 0.2, 0.2)])
def test_activation_derivative_at_zero_follows_torch(activation, slope, derivative_at_zero):
    # hidden weights and bias 0 put every pre-activation exactly at the kink; torch's backward uses
    # relu'(0) = 0 (grad * (result > 0)) and leaky_relu'(0) = negative_slope (self > 0 ? grad : grad * slope)
    spec = MLPSpec(2, (1,), 1, activation=activation, negative_slope=slope)
    w_out, b_out = 1.5, 0.25
    params = [np.zeros((1, 2)), np.zeros(1), np.array([[w_out]]), np.array([b_out])]
    rng = np.random.default_rng(4)
    X, Y = rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 3, 1))
    G = env_gradients(spec, params, X, Y, loss="mse").grads
    dlogits = 2.0 * (b_out - Y[..., 0]) / 3  # [K, B]: logits are b_out since the hidden unit outputs 0
    expected_W = derivative_at_zero * w_out * np.einsum("kb,kbi->ki", dlogits, X)[:, None, :]
    np.testing.assert_allclose(G[0], expected_W, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(G[1], derivative_at_zero * w_out * dlogits.sum(axis=1)[:, None], rtol=1e-12, atol=1e-15)


def test_bias_feeding_batch_norm_has_zero_gradient():
    # y = BN(Wx + b) does not depend on b: the analytic gradient must be zero, not merely small
    spec, params, X, Y = make_problem("mse", batch_norm=True)
    for semantics in ("pooled", "per_env"):
        G = env_gradients(spec, params, X, Y, loss="mse", semantics=semantics).grads
        assert np.abs(G[1]).max() < 1e-14 and np.abs(G[5]).max() < 1e-14
        assert np.abs(G[0]).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Consistency between the engines
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm, semantics", BATCH_NORM + [(False, "per_env")])
@pytest.mark.parametrize("loss", LOSSES)
def test_mean_of_env_gradients_is_the_pooled_gradient(batch_norm, semantics, loss):
    spec, params, X, Y = make_problem(loss, batch_norm=batch_norm, semantics=semantics, K=4, B=5)
    result = env_gradients(spec, params, X, Y, loss=api_loss(loss), semantics=semantics)
    grads, pooled_loss = pooled_gradient(spec, params, X, Y, loss=api_loss(loss), semantics=semantics)
    assert [g.shape for g in grads] == param_shapes(spec)
    assert_grads_close([g[None] for g in grads], [G.mean(axis=0)[None] for G in result.grads], rtol=1e-12, atol=1e-15)
    assert pooled_loss == pytest.approx(result.losses.mean(), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    K=st.integers(1, 4), B=st.integers(2, 5), hidden=st.lists(st.integers(1, 5), max_size=3),
    activation=st.sampled_from(["leaky_relu", "relu", "tanh"]), loss=st.sampled_from(LOSSES),
    batch_norm=st.booleans(), semantics=st.sampled_from(["pooled", "per_env"]), seed=st.integers(0, 2**16),
)
def test_engines_agree_on_random_architectures(K, B, hidden, activation, loss, batch_norm, semantics, seed):
    rng = np.random.default_rng(seed)
    spec = MLPSpec(2, tuple(hidden), OUT_FEATURES[loss], activation=activation, batch_norm=batch_norm)
    params = [q + 0.3 * rng.standard_normal(q.shape) for q in init_params(spec, rng)]
    X, Y = rng.standard_normal((K, B, 2)), make_targets(rng, loss, K, B)
    result = env_gradients(spec, params, X, Y, loss=api_loss(loss), semantics=semantics)
    grads, _ = pooled_gradient(spec, params, X, Y, loss=api_loss(loss), semantics=semantics)
    assert_grads_close([g[None] for g in grads], [G.mean(axis=0)[None] for G in result.grads], rtol=1e-10, atol=1e-13)
    if not (batch_norm and semantics == "pooled"):  # block-local: G[e] is environment e's gradient alone
        for e in range(K):
            alone = env_gradients(spec, params, X[e:e + 1], Y[e:e + 1], loss=api_loss(loss), semantics=semantics)
            assert_grads_close([G[e:e + 1] for G in result.grads], alone.grads, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("batch_norm, semantics", [(False, "pooled"), (False, "per_env"), (True, "per_env")])
@pytest.mark.parametrize("loss", LOSSES)
def test_env_gradient_equals_environment_alone(batch_norm, semantics, loss):
    spec, params, X, Y = make_problem(loss, batch_norm=batch_norm, semantics=semantics, K=4, B=5)
    result = env_gradients(spec, params, X, Y, loss=api_loss(loss), semantics=semantics)
    for e in range(X.shape[0]):
        alone = env_gradients(spec, params, X[e:e + 1], Y[e:e + 1], loss=api_loss(loss), semantics=semantics)
        assert_grads_close([G[e:e + 1] for G in result.grads], alone.grads, rtol=1e-12, atol=1e-15)
        assert result.losses[e] == pytest.approx(alone.losses[0], rel=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_pooled_batch_norm_couples_environments(loss):
    spec, params, X, Y = make_problem(loss, batch_norm=True, semantics="pooled", K=4, B=5)
    pooled = env_gradients(spec, params, X, Y, loss=api_loss(loss), semantics="pooled")
    per_env = env_gradients(spec, params, X, Y, loss=api_loss(loss), semantics="per_env")
    for e in range(X.shape[0]):
        alone = env_gradients(spec, params, X[e:e + 1], Y[e:e + 1], loss=api_loss(loss), semantics="pooled")
        # environment e alone is per_env's G[e] ...
        assert_grads_close([G[e:e + 1] for G in per_env.grads], alone.grads, rtol=1e-12, atol=1e-15)
        # ... and not pooled's G[e], which goes through the statistics of every environment's rows
        difference = max(np.linalg.norm(G[e] - A[0]) / np.linalg.norm(A[0])
                         for G, A in zip(pooled.grads, alone.grads) if np.linalg.norm(A[0]) > 1e-8)
        assert difference > 1e-2


def test_env_gradient_of_pooled_batch_norm_depends_on_other_environments_rows():
    # move environment 1's inputs: environment 0's loss and gradient change through the shared statistics
    spec, params, X, Y = make_problem("bce_with_logits", batch_norm=True, semantics="pooled")
    moved = X.copy()
    moved[1] += 1.0
    a = env_gradients(spec, params, X, Y, loss="bce_with_logits", semantics="pooled")
    b = env_gradients(spec, params, moved, Y, loss="bce_with_logits", semantics="pooled")
    assert abs(a.losses[0] - b.losses[0]) > 1e-3
    assert np.abs(a.grads[0][0] - b.grads[0][0]).max() > 1e-3
    c = env_gradients(spec, params, moved, Y, loss="bce_with_logits", semantics="per_env")
    d = env_gradients(spec, params, X, Y, loss="bce_with_logits", semantics="per_env")
    assert c.losses[0] == d.losses[0] and np.array_equal(c.grads[0][0], d.grads[0][0])


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("loss", LOSSES)
def test_example_gradients_are_env_gradients_of_singletons(batch_norm, loss):
    spec, params, X, Y = make_problem(loss, batch_norm=batch_norm, semantics="pooled", K=1, B=6)
    X, Y = X[0], Y[0]
    result = example_gradients(spec, params, X, Y, loss=api_loss(loss))
    expected = env_gradients(spec, params, X.reshape(6, 1, 3), Y.reshape((6, 1) + Y.shape[1:]), loss=api_loss(loss))
    assert result.logits.shape == (6, 1, spec.out_features) and result.losses.shape == (6,)
    assert_grads_close(result.grads, expected.grads, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(result.losses, expected.losses, rtol=1e-13)
    assert [G.shape for G in result.grads] == [(6,) + s for s in param_shapes(spec)]
    if batch_norm:  # pooled statistics over the N examples: check one against finite differences
        fd = finite_difference_gradients(spec, params, X[:, None], Y[:, None], api_loss(loss), "pooled")
        assert_grads_close(result.grads, fd)


@pytest.mark.parametrize("loss", LOSSES)
def test_mean_of_example_gradients_is_the_env_gradient(loss):
    spec, params, X, Y = make_problem(loss, K=3, B=5)
    G = env_gradients(spec, params, X, Y, loss=api_loss(loss)).grads
    for e in range(3):
        examples = example_gradients(spec, params, X[e], Y[e], loss=api_loss(loss)).grads
        assert_grads_close([g.mean(axis=0)[None] for g in examples], [g[e:e + 1] for g in G], rtol=1e-12, atol=1e-15)


def test_float32_inputs_give_float64_results():
    spec, params, X, Y = make_problem("mse", batch_norm=True)
    params32 = [p.astype(np.float32) for p in params]
    X32 = X.astype(np.float32)
    a = env_gradients(spec, params32, X32, Y.astype(np.float32), loss="mse")
    b = env_gradients(spec, [p.astype(np.float64) for p in params32], X32.astype(np.float64),
                      Y.astype(np.float32).astype(np.float64), loss="mse")
    assert all(G.dtype == np.float64 for G in a.grads) and a.losses.dtype == np.float64
    assert_grads_close(a.grads, b.grads, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm statistics: training-mode stats, running stats, eval mode
# ----------------------------------------------------------------------------------------------------------------


def test_bn_stats_are_the_batch_mean_and_biased_variance():
    spec, params, X, Y = make_problem("mse", batch_norm=True, K=3, B=4)
    _, linear_outputs, _ = ref_forward(spec, params, X, "pooled")
    pooled = env_gradients(spec, params, X, Y, loss="mse", semantics="pooled").bn_stats
    for stat, Z in zip(pooled, linear_outputs):
        rows = Z.reshape(-1, Z.shape[-1])
        np.testing.assert_allclose(stat.mean, rows.sum(axis=0) / 12, rtol=1e-12)
        np.testing.assert_allclose(stat.var, ((rows - rows.sum(axis=0) / 12) ** 2).sum(axis=0) / 12, rtol=1e-12)
        assert stat.count == 12
    _, linear_outputs, _ = ref_forward(spec, params, X, "per_env")
    per_env = env_gradients(spec, params, X, Y, loss="mse", semantics="per_env").bn_stats
    for stat, Z in zip(per_env, linear_outputs):
        assert stat.mean.shape == (3, Z.shape[-1]) and stat.count == 4
        for e in range(3):
            np.testing.assert_allclose(stat.mean[e], Z[e].sum(axis=0) / 4, rtol=1e-12)
            np.testing.assert_allclose(stat.var[e], ((Z[e] - Z[e].sum(axis=0) / 4) ** 2).sum(axis=0) / 4, rtol=1e-12)
    assert env_gradients(*make_problem("mse")[:4], loss="mse").bn_stats == []


@pytest.mark.parametrize("semantics", ["pooled", "per_env"])
def test_running_stats_follow_torch_recurrence_over_two_steps(semantics):
    spec, params, X1, Y1 = make_problem("mse", batch_norm=True, K=3, B=4, seed=1)
    _, _, X2, Y2 = make_problem("mse", batch_norm=True, K=3, B=4, seed=2)
    m = 0.2
    running = init_running_stats(spec)
    for X, Y in ((X1, Y1), (X2, Y2)):
        batch = env_gradients(spec, params, X, Y, loss="mse", semantics=semantics).bn_stats
        running = update_running_stats(running, batch, momentum=m)

    # hand-written recurrence, from running mean 0 and var 1, with torch's unbiased batch variance
    for layer, width in enumerate(spec.hidden):
        mean, var = np.zeros(width), np.ones(width)
        for X in (X1, X2):
            Z = ref_forward(spec, params, X, semantics)[1][layer]
            batches = [Z.reshape(-1, width)] if semantics == "pooled" else [Z[e] for e in range(3)]
            for rows in batches:  # per_env: K updates in environment order
                n = rows.shape[0]
                mean = (1 - m) * mean + m * rows.sum(axis=0) / n
                var = (1 - m) * var + m * ((rows - rows.sum(axis=0) / n) ** 2).sum(axis=0) / (n - 1)
        np.testing.assert_allclose(running[layer].mean, mean, rtol=1e-12)
        np.testing.assert_allclose(running[layer].var, var, rtol=1e-12)


def test_init_running_stats():
    running = init_running_stats(MLPSpec(3, (4, 5), batch_norm=True))
    assert [r.mean.tolist() for r in running] == [[0.0] * 4, [0.0] * 5]
    assert [r.var.tolist() for r in running] == [[1.0] * 4, [1.0] * 5]
    assert init_running_stats(MLPSpec(3, (4, 5))) == []


def test_predict_uses_running_statistics():
    spec, params, X, Y = make_problem("cross_entropy_hard", batch_norm=True, K=2, B=5)
    flat = X.reshape(10, 3)
    # running statistics equal to the pooled batch statistics reproduce the training-mode forward
    batch = env_gradients(spec, params, X, Y, loss="cross_entropy").bn_stats
    as_running = [mlp.RunningStats(s.mean, s.var) for s in batch]
    np.testing.assert_allclose(predict(spec, params, flat, as_running), forward_envs(spec, params, X).reshape(10, -1),
                               rtol=1e-12, atol=1e-12)
    # arbitrary running statistics: eval-mode plain forward
    rng = np.random.default_rng(3)
    running = [mlp.RunningStats(rng.standard_normal(w), rng.random(w) + 0.5) for w in spec.hidden]
    expected = ref_forward(spec, params, flat[None], running=[(r.mean, r.var) for r in running])[0][0]
    np.testing.assert_allclose(predict(spec, params, flat, running), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="running_stats"):
        predict(spec, params, flat)
    with pytest.raises(ValueError, match=r"running_stats\[1\].mean"):
        predict(spec, params, flat, [running[0], mlp.RunningStats(np.zeros(4), np.ones(5))])


def test_predict_without_batch_norm_is_the_forward():
    spec, params, X, _ = make_problem("mse", activation="tanh")
    np.testing.assert_allclose(predict(spec, params, X.reshape(-1, 3)), ref_forward(spec, params, X)[0].reshape(-1, 2),
                               rtol=1e-12, atol=1e-12)


def test_update_running_stats_validation():
    spec = MLPSpec(3, (4,), batch_norm=True)
    running = init_running_stats(spec)
    good = [mlp.BatchStats(np.zeros(4), np.ones(4), 8)]
    with pytest.raises(ValueError, match="momentum"):
        update_running_stats(running, good, momentum=1.5)
    with pytest.raises(ValueError, match="one entry per BatchNorm layer"):
        update_running_stats(running, good * 2)
    with pytest.raises(ValueError, match="count"):
        update_running_stats(running, [mlp.BatchStats(np.zeros(4), np.ones(4), 1)])
    with pytest.raises(ValueError, match=r"batch_stats\[0\]"):
        update_running_stats(running, [mlp.BatchStats(np.zeros(5), np.ones(5), 8)])


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_batch_norm_over_a_single_row_raises():
    spec, params, X, Y = make_problem("mse", batch_norm=True, K=3, B=1)
    with pytest.raises(ValueError, match="per_env.*B >= 2"):
        env_gradients(spec, params, X, Y, loss="mse", semantics="per_env")
    with pytest.raises(ValueError, match="per_env.*B >= 2"):
        forward_envs(spec, params, X, semantics="per_env")
    with pytest.raises(ValueError, match="per_env"):
        example_gradients(spec, params, X[:, 0], Y[:, 0], loss="mse", semantics="per_env")
    with pytest.raises(ValueError, match="K \\* B >= 2"):
        pooled_gradient(spec, params, X[:1], Y[:1], loss="mse", semantics="pooled")
    # without BatchNorm one row is fine
    spec, params, X, Y = make_problem("mse", K=3, B=1)
    env_gradients(spec, params, X, Y, loss="mse", semantics="per_env")


def _bad(problem, **change):
    spec, params, X, Y = problem
    arguments = dict(spec=spec, params=params, X=X, Y=Y, loss="cross_entropy", semantics="pooled")
    arguments.update(change)
    return arguments


@pytest.fixture(scope="module")
def problem():
    return make_problem("cross_entropy_hard", K=2, B=3)


@pytest.mark.parametrize("function", [env_gradients, pooled_gradient])
def test_bad_input_raises_naming_the_argument(problem, function):
    spec, params, X, Y = problem

    def call(**change):
        a = _bad(problem, **change)
        return function(a["spec"], a["params"], a["X"], a["Y"], loss=a["loss"], semantics=a["semantics"])

    cases = [
        (dict(spec="mlp"), TypeError, "spec"),
        (dict(params=params[:-1]), ValueError, "params must hold 6 arrays"),
        (dict(params=tuple(params[:2]) + (params[2].T,) + tuple(params[3:])), ValueError,
         r"params\[2\] \(2.weight\) must have shape \(5, 4\), got \(4, 5\)"),
        (dict(params=params[:1] + [params[1].astype(int)] + params[2:]), TypeError, r"params\[1\]"),
        (dict(params=params[:3] + [np.full(5, np.nan)] + params[4:]), ValueError, r"params\[3\].*finite"),
        (dict(params="weights"), TypeError, "params"),
        (dict(X=X.astype(int)), TypeError, "X"),
        (dict(X=X[0]), ValueError, r"X must have shape \[K, B, in_features\]"),
        (dict(X=X[..., :2]), ValueError, "in_features = 3"),
        (dict(X=np.where(X > 1, np.inf, X)), ValueError, "X must be finite"),
        (dict(X=X[:, :0], Y=Y[:, :0]), ValueError, "X must hold at least one row"),
        (dict(Y=Y[:, :2]), ValueError, "Y must have shape"),
        (dict(Y=Y + 3), ValueError, "Y.*class indices"),
        (dict(Y=Y.astype(bool)), TypeError, "Y"),
        (dict(loss="hinge"), ValueError, "loss"),
        (dict(loss="bce_with_logits", Y=Y.astype(float)), ValueError, "out_features == 1"),
        (dict(semantics="domainbed"), ValueError, "semantics"),
        (dict(semantics=None), TypeError, "semantics"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            call(**change)


def test_example_gradients_and_forward_validation(problem):
    spec, params, X, Y = problem
    with pytest.raises(ValueError, match="Y must have one target"):
        example_gradients(spec, params, X[0], Y[0][:2], loss="cross_entropy")
    with pytest.raises(ValueError, match=r"X must have shape \[N, in_features\]"):
        example_gradients(spec, params, X, Y, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"X must have shape \[N, in_features\]"):
        predict(spec, params, X)
    with pytest.raises(ValueError, match="semantics"):
        forward_envs(spec, params, X, semantics="both")
    with pytest.raises(ValueError, match="running_stats must be None"):
        predict(spec, params, X[0], init_running_stats(MLPSpec(3, (4, 5), batch_norm=True)))
