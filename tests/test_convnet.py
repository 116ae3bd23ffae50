"""Tests of hardtovary.reference.convnet.

Expected values come from routes independent of the code under test:

- a plain forward pass written here (:func:`ref_forward`): convolution as a sum over kernel taps, BatchNorm with
  its statistics written out per group, max pooling as a maximum over the taps of a window, textbook losses;
- float64 central finite differences of that forward, on sampled coordinates of every parameter tensor, for every
  layer type and both networks, in both BatchNorm semantics and per example, with hard labels and soft targets;
- torch autograd (``hardtovary.accel.torch``, float64), where torch is installed;
- hand-computed gradients where finite differences cannot see the rule (ties between positive equal values),
  identities between routes (per-example gradients average to the batch gradient, per_env with one image per
  environment equals per-image statistics, pooled equals per_env without BatchNorm, eval mode equals BatchNorm folded
  into the convolutions), and torchvision's published parameter count of ResNet-18.

Finite differences are only meaningful where the network is smooth over the step. :func:`ref_forward` records the
pattern of every non-smooth choice (which ReLU inputs are positive, which tap wins each max-pooling window); a
coordinate whose +h and -h evaluations see different patterns straddles a kink and is replaced by another one of the
same tensor (a handful are, out of thousands of activations; their number is bounded).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import logsumexp

from hardtovary.reference import convnet as C
from hardtovary.reference.convnet import (
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    Linear,
    MaxPool2d,
    NetSpec,
    ReLU,
    Residual,
    RunningStats,
    Scale,
)

STEP = 1e-6
RTOL = 1e-6          # finite differences: relative agreement
ATOL = 1e-8          # ... with an absolute floor for gradients that are 0 (a conv bias feeding BatchNorm)
TORCH_RTOL = 1e-10   # torch autograd in float64: relative to the largest entry of the tensor
PER_TENSOR = 3       # finite-difference coordinates per parameter tensor


# ----------------------------------------------------------------------------------------------------------------
# The independent route: a plain forward pass
# ----------------------------------------------------------------------------------------------------------------


def ref_conv(x, W, b, stride, pad):
    """``out[n, o, y, x] = b[o] + sum_{c, i, j} W[o, c, i, j] xpad[n, c, stride*y + i, stride*x + j]``, as a sum over
    the k*k kernel taps."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = W.shape[-1]
    Ho = (xp.shape[2] - k) // stride + 1
    Wo = (xp.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], W.shape[0], Ho, Wo))
    for i in range(k):
        for j in range(k):
            tap = xp[:, :, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride]
            out += np.einsum("nchw,oc->nohw", tap, W[:, :, i, j])
    return out if b is None else out + b[None, :, None, None]


def ref_maxpool(x, k, stride, pad, pattern):
    """Maximum over the k*k taps of each window (padding is -inf); records the winning tap (first maximum) in
    ``pattern``."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    Ho = (xp.shape[2] - k) // stride + 1
    Wo = (xp.shape[3] - k) // stride + 1
    taps = np.stack([xp[:, :, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride]
                     for i in range(k) for j in range(k)])
    pattern.append(("maxpool", taps.argmax(axis=0)))
    return taps.max(axis=0)


def ref_forward(spec, params, X, semantics="pooled", running=None, pattern=None):
    """Logits ``[K, B, classes]`` of ``X[K, B, C, H, W]``. BatchNorm: statistics over all K*B images (``pooled``),
    over each environment's B images (``per_env``), or the running statistics (``running``, a list in order)."""
    K, B = X.shape[:2]
    pattern = [] if pattern is None else pattern
    params = iter(params)
    running = None if running is None else iter(running)

    def bn(layer, z):
        gamma, beta = next(params), next(params)
        if running is not None:
            mean, var = next(running)
            mean, var = mean[None, :, None, None], var[None, :, None, None]
        else:
            groups = z.reshape(*((1, K * B) if semantics == "pooled" else (K, B)), *z.shape[1:])
            mean = groups.mean(axis=(1, 3, 4), keepdims=True)
            var = ((groups - mean) ** 2).mean(axis=(1, 3, 4), keepdims=True)
            n_rows = groups.shape[1]
            mean = np.repeat(mean, n_rows, axis=1).reshape(K * B, z.shape[1], 1, 1)
            var = np.repeat(var, n_rows, axis=1).reshape(K * B, z.shape[1], 1, 1)
        return gamma[None, :, None, None] * (z - mean) / np.sqrt(var + layer.eps) + beta[None, :, None, None]

    def run(layers, x):
        for layer in layers:
            if isinstance(layer, Conv2d):
                W = next(params)
                x = ref_conv(x, W, next(params) if layer.bias else None, layer.stride, layer.padding)
            elif isinstance(layer, BatchNorm2d):
                x = bn(layer, x)
            elif isinstance(layer, ReLU):
                pattern.append(("relu", x > 0))
                x = np.where(x > 0, x, 0.0)
            elif isinstance(layer, MaxPool2d):
                x = ref_maxpool(x, layer.kernel_size, layer.stride or layer.kernel_size, layer.padding, pattern)
            elif isinstance(layer, GlobalMaxPool):
                flat = x.reshape(*x.shape[:2], -1)
                pattern.append(("globalmax", flat.argmax(axis=-1)))
                x = flat.max(axis=-1)
            elif isinstance(layer, GlobalAvgPool):
                x = x.sum(axis=(2, 3)) / (x.shape[2] * x.shape[3])
            elif isinstance(layer, Flatten):
                x = x.reshape(x.shape[0], -1)
            elif isinstance(layer, Linear):
                W = next(params)
                x = np.einsum("nf,of->no", x, W) + (next(params) if layer.bias else 0.0)
            elif isinstance(layer, Scale):
                x = x * layer.factor
            elif isinstance(layer, Residual):
                body = run(layer.body, x)
                x = body + (run(layer.shortcut, x) if layer.shortcut else x)
            else:
                raise AssertionError(layer)
        return x

    logits = run(spec.layers, X.reshape(K * B, *X.shape[2:]))
    assert next(params, None) is None, "parameters left over"
    return logits.reshape(K, B, -1)


def ref_env_losses(logits, Y):
    """``L_e``: textbook cross-entropy, ``-sum_c t_c log softmax(z)_c`` averaged over each environment's images."""
    log_p = logits - logsumexp(logits, axis=-1, keepdims=True)
    T = np.eye(logits.shape[-1])[Y] if np.issubdtype(np.asarray(Y).dtype, np.integer) else Y
    return -(T * log_p).sum(axis=-1).mean(axis=1)


def same_pattern(a, b) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and np.array_equal(x[1], y[1]) for x, y in zip(a, b))


def assert_fd_matches(spec, params, X, Y, grads, semantics, *, seed=0, per_tensor=PER_TENSOR, names=None):
    """Central differences of every ``L_e`` (one forward of all environments per evaluation) at ``per_tensor``
    sampled coordinates of every tensor against ``grads[i][e]``; coordinates whose step crosses a kink are
    replaced. Returns the number of coordinates compared."""
    rng = np.random.default_rng(seed)
    names = names or C.param_names(spec)
    compared = skipped = 0
    for i, theta in enumerate(params):
        order = rng.permutation(theta.size)
        taken = 0
        for flat in order:
            if taken == per_tensor:
                break
            patterns, losses = [], []
            for sign in (1.0, -1.0):
                shifted = list(params)
                shifted[i] = theta.copy()
                shifted[i].flat[flat] += sign * STEP
                pattern = []
                losses.append(ref_env_losses(ref_forward(spec, shifted, X, semantics, pattern=pattern), Y))
                patterns.append(pattern)
            if not same_pattern(*patterns):
                skipped += 1
                continue
            fd = (losses[0] - losses[1]) / (2 * STEP)
            analytic = grads[i].reshape(grads[i].shape[0], -1)[:, flat]
            np.testing.assert_allclose(analytic, fd, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{names[i]} flat index {flat}, {semantics}")
            taken += 1
            compared += 1
        assert taken == min(per_tensor, theta.size), f"{names[i]}: too many coordinates at kinks"
    assert skipped <= max(2, compared // 10), f"{skipped} coordinates straddled a kink (compared {compared})"
    return compared


def assert_close(actual, expected, rtol=TORCH_RTOL, what=""):
    """Elementwise ``|a - e| <= rtol (|e| + max|e|) + 1e-15``: relative agreement, with the tensor's scale as the
    floor, and float64 rounding as the floor of a tensor that is 0 in exact arithmetic (a conv bias feeding
    BatchNorm: about 1e-17 either way)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale + 1e-15, err_msg=what)


def make_problem(spec, *, K, B, hw, soft=False, seed=0, perturb=0.3):
    """Parameters (torch's initialisation, then perturbed so that gamma, beta and biases matter), images and
    targets (class indices, or Dirichlet probability rows)."""
    rng = np.random.default_rng(seed)
    params = [p + perturb * rng.standard_normal(p.shape) for p in C.init_params(spec, rng)]
    X = rng.standard_normal((K, B, spec.in_channels, hw, hw))
    n = spec.num_classes
    Y = rng.dirichlet(np.ones(n), size=(K, B)) if soft else rng.integers(0, n, size=(K, B))
    return params, X, Y


def fold_batch_norm(spec, params, running):
    """The network with every BatchNorm2d (each directly after a Conv2d) folded into that convolution: weights times
    ``s = gamma / sqrt(running_var + eps)``, bias ``(b - running_mean) s + beta``. Returns ``(spec, params)``."""
    params, running = iter(params), iter(running)
    new_params = []

    def fold(layers):
        out, layers = [], list(layers)
        for n, layer in enumerate(layers):
            if isinstance(layer, Conv2d):
                W = next(params)
                b = next(params) if layer.bias else np.zeros(layer.out_channels)
                follower = layers[n + 1] if n + 1 < len(layers) else None
                if isinstance(follower, BatchNorm2d):
                    gamma, beta = next(params), next(params)
                    mean, var = next(running)
                    s = gamma / np.sqrt(var + follower.eps)
                    W, b = W * s[:, None, None, None], (b - mean) * s + beta
                out.append(Conv2d(layer.name, layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                  layer.padding, bias=True))
                new_params.extend([W, b])
            elif isinstance(layer, BatchNorm2d):
                assert isinstance(layers[n - 1], Conv2d), "a BatchNorm2d must follow a Conv2d to be folded"
            elif isinstance(layer, Linear):
                new_params.extend([next(params)] + ([next(params)] if layer.bias else []))
                out.append(layer)
            elif isinstance(layer, Residual):
                out.append(Residual(tuple(fold(layer.body)), tuple(fold(layer.shortcut))))
            else:
                out.append(layer)
        return out

    layers = fold(spec.layers)
    assert next(params, None) is None and next(running, None) is None
    return NetSpec(tuple(layers), spec.in_channels), new_params


# ----------------------------------------------------------------------------------------------------------------
# The reference forward itself agrees with the oracle's forward (so that FD of it tests the oracle's backward)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("semantics", C.SEMANTICS)
def test_oracle_forward_equals_plain_forward(semantics):
    for spec, hw in ((C.fast_resnet(1 / 16), 16), (C.resnet18(1 / 16), 32)):
        params, X, _ = make_problem(spec, K=2, B=2, hw=hw)
        np.testing.assert_allclose(C.forward(spec, params, X, semantics=semantics),
                                   ref_forward(spec, params, X, semantics), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Finite differences, layer by layer
# ----------------------------------------------------------------------------------------------------------------


CONV_CASES = [  # kernel, stride, padding, bias
    (1, 1, 0, True), (1, 2, 0, False), (3, 1, 1, False), (3, 2, 1, True), (3, 2, 0, True), (7, 1, 3, False),
    (7, 2, 3, True), (3, 1, 0, False)]


@pytest.mark.parametrize("k, s, p, bias", CONV_CASES)
def test_fd_conv2d(k, s, p, bias):
    """Conv2d on 7x7 images (odd: with stride 2 and no padding the last row and column are read or not)."""
    hw = 7
    ho = (hw + 2 * p - k) // s + 1
    spec = NetSpec((Conv2d("conv", 2, 3, k, s, p, bias), Flatten(), Linear("fc", 3 * ho * ho, 3)), 2)
    params, X, Y = make_problem(spec, K=2, B=2, hw=hw)
    out = C.env_gradients(spec, params, X, Y)
    assert assert_fd_matches(spec, params, X, Y, out.grads, "pooled", per_tensor=5) > 0


def bn_net():
    return NetSpec((Conv2d("conv", 2, 3, 3, 1, 1, bias=True), BatchNorm2d("bn", 3), ReLU(), GlobalAvgPool(),
                    Linear("fc", 3, 3)), 2)


@pytest.mark.parametrize("semantics", C.SEMANTICS)
@pytest.mark.parametrize("soft", [False, True])
def test_fd_batchnorm_training(semantics, soft):
    spec = bn_net()
    params, X, Y = make_problem(spec, K=3, B=2, hw=5, soft=soft)
    out = C.env_gradients(spec, params, X, Y, semantics=semantics)
    assert_fd_matches(spec, params, X, Y, out.grads, semantics, per_tensor=5)
    # the conv bias feeds BatchNorm, so its gradient is exactly cancelled by the mean subtraction
    assert np.abs(out.grads[1]).max() < 1e-12


def test_fd_batchnorm_per_example():
    """K = N, B = 1, statistics over the N images: each image's loss through the shared statistics."""
    spec = bn_net()
    params, X, Y = make_problem(spec, K=4, B=1, hw=4)
    out = C.example_gradients(spec, params, X[:, 0], Y[:, 0])
    assert out.grads[0].shape == (4, 3, 2, 3, 3)
    assert_fd_matches(spec, params, X, Y, out.grads, "pooled", per_tensor=5)


def test_fd_batchnorm_eval_mode_through_predict():
    """Eval-mode BatchNorm is a fixed affine map: the loss of ``predict``'s logits, differentiated by central
    differences in the convolution's weights, equals the chain rule through the folded network (BatchNorm's scale
    and shift moved into the convolution), whose gradient the oracle computes without BatchNorm."""
    spec = bn_net()
    params, X, Y = make_problem(spec, K=1, B=4, hw=4)
    rng = np.random.default_rng(1)
    running = [RunningStats(rng.standard_normal(3), rng.uniform(0.5, 2.0, 3))]
    folded_spec, folded = fold_batch_norm(spec, params, running)
    grads = C.env_gradients(folded_spec, folded, X, Y).grads
    # d/dW of the eval-mode loss = d/dW_folded * scale (chain rule through W_folded = W * scale)
    scale = params[2] / np.sqrt(running[0].var + spec.layers[1].eps)
    for (o, c, i, j) in [(0, 0, 0, 0), (1, 1, 2, 1), (2, 0, 1, 2)]:
        def loss(delta, o=o, c=c, i=i, j=j):
            shifted = [q.copy() for q in params]
            shifted[0][o, c, i, j] += delta
            return ref_env_losses(C.predict(spec, shifted, X[0], running)[None], Y)[0]
        fd = (loss(STEP) - loss(-STEP)) / (2 * STEP)
        np.testing.assert_allclose(grads[0][0, o, c, i, j] * scale[o], fd, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k, s, p", [(2, 2, 0), (3, 2, 1)])
def test_fd_maxpool(k, s, p):
    ho = (7 + 2 * p - k) // s + 1
    spec = NetSpec((Conv2d("conv", 2, 3, 3, 1, 1), MaxPool2d(k, s, p), Flatten(), Linear("fc", 3 * ho * ho, 3)), 2)
    params, X, Y = make_problem(spec, K=2, B=2, hw=7)
    out = C.env_gradients(spec, params, X, Y)
    assert_fd_matches(spec, params, X, Y, out.grads, "pooled", per_tensor=5)


@pytest.mark.parametrize("pool", [GlobalMaxPool(), GlobalAvgPool()], ids=["max", "avg"])
def test_fd_global_pooling(pool):
    spec = NetSpec((Conv2d("conv", 2, 3, 3, 1, 1, bias=True), ReLU(), pool, Linear("fc", 3, 4, bias=False)), 2)
    params, X, Y = make_problem(spec, K=2, B=3, hw=5, soft=True)
    out = C.env_gradients(spec, params, X, Y)
    assert_fd_matches(spec, params, X, Y, out.grads, "pooled", per_tensor=5)


def test_fd_flatten_linear_scale():
    spec = NetSpec((Conv2d("conv", 2, 2, 1), ReLU(), Flatten(), Linear("hidden", 2 * 9, 5), Linear("fc", 5, 3,
                                                                                                     bias=False),
                    Scale(0.125)), 2)
    params, X, Y = make_problem(spec, K=2, B=2, hw=3)
    out = C.env_gradients(spec, params, X, Y)
    assert_fd_matches(spec, params, X, Y, out.grads, "pooled", per_tensor=5)


def identity_residual_net():
    return NetSpec((Conv2d("stem", 2, 3, 3, 1, 1), BatchNorm2d("stem_bn", 3), ReLU(),
                    Residual((Conv2d("res.conv1", 3, 3, 3, 1, 1), BatchNorm2d("res.bn1", 3), ReLU(),
                              Conv2d("res.conv2", 3, 3, 3, 1, 1, bias=True))),
                    ReLU(), GlobalAvgPool(), Linear("fc", 3, 3)), 2)


def projection_residual_net():
    body = (Conv2d("block.conv1", 3, 4, 3, 2, 1), BatchNorm2d("block.bn1", 4), ReLU(),
            Conv2d("block.conv2", 4, 4, 3, 1, 1), BatchNorm2d("block.bn2", 4))
    shortcut = (Conv2d("block.downsample.0", 3, 4, 1, 2, 0), BatchNorm2d("block.downsample.1", 4))
    return NetSpec((Conv2d("stem", 2, 3, 3, 1, 1), ReLU(), Residual(body, shortcut), ReLU(), GlobalMaxPool(),
                    Linear("fc", 4, 3)), 2)


@pytest.mark.parametrize("make", [identity_residual_net, projection_residual_net], ids=["identity", "projection"])
@pytest.mark.parametrize("semantics", C.SEMANTICS)
def test_fd_residual(make, semantics):
    spec = make()
    params, X, Y = make_problem(spec, K=2, B=2, hw=6, soft=semantics == "per_env")
    out = C.env_gradients(spec, params, X, Y, semantics=semantics)
    assert_fd_matches(spec, params, X, Y, out.grads, semantics)


# ----------------------------------------------------------------------------------------------------------------
# Ties, on purpose
# ----------------------------------------------------------------------------------------------------------------


def test_fd_maxpool_window_of_zeros_after_relu():
    """A 2x2 window that is all zeros after the ReLU (the image is 0 there and the conv bias negative): its max is a
    tie of four zeros, the gradient is 0 there either way, and finite differences agree at every coordinate."""
    spec = NetSpec((Conv2d("conv", 2, 3, 1, bias=True), ReLU(), MaxPool2d(2), Flatten(), Linear("fc", 3 * 4, 3)), 2)
    params, X, Y = make_problem(spec, K=2, B=2, hw=4)
    params[1] = np.full(3, -0.5)
    X[:, :, :, :2, :2] = 0.0  # the top-left window of every image and channel
    X[:, :, :, 2:, :] += 3.0 * np.sign(X[:, :, :, 2:, :])  # far from the kinks elsewhere
    pattern = []
    ref_forward(spec, params, X, pattern=pattern)
    relu_positive = pattern[0][1]
    assert not relu_positive[:, :, :2, :2].any()  # the window is all zeros after the ReLU: a four-way tie
    out = C.env_gradients(spec, params, X, Y)
    assert_fd_matches(spec, params, X, Y, out.grads, "pooled", per_tensor=8)
    # the tie window's pooled value (flat index 0, 4, 8: window (0, 0) of each channel) is exactly 0, and so is the
    # gradient of every fc weight that reads it
    assert np.all(out.grads[2][:, :, [0, 4, 8]] == 0.0)


def positive_tie_problem():
    """A 1x1 conv with weight (1, 1) on two channels whose pixels (0, 0) and (0, 1) hold (1, 0) and (0, 1): both
    give 1, a tie at the window's maximum between its first and second element (row-major); the other two pixels
    give less. MaxPool(2) over the 2x2 image, then Linear(1, 2) and cross-entropy with class 0."""
    spec = NetSpec((Conv2d("conv", 2, 1, 1), MaxPool2d(2), Flatten(), Linear("fc", 1, 2, bias=False)), 2)
    W = np.ones((1, 2, 1, 1))
    V = np.array([[0.7], [-0.4]])
    X = np.zeros((1, 1, 2, 2, 2))
    X[0, 0, 0] = [[1.0, 0.0], [0.2, 0.1]]
    X[0, 0, 1] = [[0.0, 1.0], [0.3, 0.2]]
    Y = np.array([[0]])
    return spec, [W, V], X, Y


def positive_tie_expected(V):
    """By hand: the pooled value is m = 1, logits z = V m = (0.7, -0.4), dL/dz = softmax(z) - e_0, dL/dm = V^T dL/dz.
    The whole of dL/dm goes to pixel (0, 0), whose input is (1, 0): dW = (dL/dm, 0)."""
    z = V[:, 0] * 1.0
    p = np.exp(z) / np.exp(z).sum()
    dm = float(V[:, 0] @ (p - np.array([1.0, 0.0])))
    return np.array([dm, 0.0]).reshape(1, 2, 1, 1), (p - np.array([1.0, 0.0])).reshape(2, 1) * 1.0


def test_maxpool_positive_tie_goes_to_first_maximum():
    spec, params, X, Y = positive_tie_problem()
    dW, dV = positive_tie_expected(params[1])
    out = C.env_gradients(spec, params, X, Y)
    np.testing.assert_allclose(out.grads[0][0], dW, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(out.grads[1][0], dV, rtol=1e-14, atol=1e-15)
    assert dW[0, 0, 0, 0] != 0.0  # not split: a split would give (dm/2, dm/2); the last maximum (0, dm)


def test_global_maxpool_positive_tie_goes_to_first_maximum():
    spec, params, X, Y = positive_tie_problem()
    spec = NetSpec((Conv2d("conv", 2, 1, 1), GlobalMaxPool(), Linear("fc", 1, 2, bias=False)), 2)
    dW, _ = positive_tie_expected(params[1])
    np.testing.assert_allclose(C.env_gradients(spec, params, X, Y).grads[0][0], dW, rtol=1e-14, atol=1e-15)


def test_relu_derivative_at_zero_is_zero():
    """A 1x1 conv with bias 0 on an image whose pixel (0, 0) is 0: the ReLU input there is exactly 0, and the
    bias's gradient counts only the three positive pixels."""
    spec = NetSpec((Conv2d("conv", 1, 1, 1, bias=True), ReLU(), GlobalAvgPool(), Linear("fc", 1, 2, bias=False)), 1)
    X = np.array([[[[[0.0, 1.0], [2.0, 3.0]]]]])
    V = np.array([[0.5], [-0.5]])
    params = [np.ones((1, 1, 1, 1)), np.zeros(1), V]
    m = (1.0 + 2.0 + 3.0) / 4
    p = np.exp(V[:, 0] * m) / np.exp(V[:, 0] * m).sum()
    dm = float(V[:, 0] @ (p - np.array([1.0, 0.0])))
    out = C.env_gradients(spec, params, X, np.array([[0]]))
    np.testing.assert_allclose(out.grads[1][0], [dm * 3 / 4], rtol=1e-14)   # not dm * 4/4 (derivative 1 at 0)
    np.testing.assert_allclose(out.grads[0][0, 0, 0, 0, 0], dm * (1.0 + 2.0 + 3.0) / 4, rtol=1e-14)


# ----------------------------------------------------------------------------------------------------------------
# Finite differences, the two networks
# ----------------------------------------------------------------------------------------------------------------


NETWORKS = {"fast_resnet": (lambda: C.fast_resnet(1 / 16), 16), "resnet18": (lambda: C.resnet18(1 / 16), 32)}
MODES = ["pooled", "per_env", "example"]


def network_problem(net, mode, soft, seed=0):
    make, hw = NETWORKS[net]
    spec = make()
    K, B = {"example": (4, 1), "pooled": (2, 2), "per_env": (2, 4)}[mode]
    params, X, Y = make_problem(spec, K=K, B=B, hw=hw, soft=soft, seed=seed, perturb=0.1)
    # Conditioning, not correctness: ResNet-18's last stage is 1x1 on 32x32 images, so per_env statistics of B = 2
    # images are over 2 values, whose variance can fall far below eps (5e-7 seen); the loss is then so curved that
    # central differences with a step of 1e-6 are off by 1e-3 (they converge to the oracle as the step shrinks).
    # With 4 values per group the smallest variance is about 1e-3.
    out = oracle_grads(spec, params, X, Y, mode)
    assert min(float(np.min(s.var)) for s in out.bn_stats) > 1e-4
    return spec, params, X, Y


def oracle_grads(spec, params, X, Y, mode):
    if mode == "example":
        return C.example_gradients(spec, params, X[:, 0], Y[:, 0])
    return C.env_gradients(spec, params, X, Y, semantics=mode)


# one quick case per network and mode (hard and soft alternate); the others are marked slow
FAST_NETWORK_CASES = {("fast_resnet", "pooled", False), ("fast_resnet", "per_env", True),
                      ("fast_resnet", "example", True), ("resnet18", "pooled", True), ("resnet18", "per_env", False),
                      ("resnet18", "example", False)}
NETWORK_CASES = [pytest.param(net, mode, soft, id=f"{net}-{mode}-{'soft' if soft else 'hard'}",
                              marks=() if (net, mode, soft) in FAST_NETWORK_CASES else pytest.mark.slow)
                 for net in NETWORKS for mode in MODES for soft in (False, True)]


@pytest.mark.parametrize("net, mode, soft", NETWORK_CASES)
def test_fd_networks(net, mode, soft):
    """Every parameter tensor of both networks, per environment in both semantics and per example: the quick cases
    sample 1-2 coordinates per tensor, the slow ones 5."""
    spec, params, X, Y = network_problem(net, mode, soft)
    semantics = "pooled" if mode == "example" else mode
    out = oracle_grads(spec, params, X, Y, mode)
    np.testing.assert_allclose(out.losses, ref_env_losses(ref_forward(spec, params, X, semantics), Y), rtol=1e-12)
    fast = {"fast_resnet": 2, "resnet18": 1}[net]
    assert_fd_matches(spec, params, X, Y, out.grads, semantics,
                      per_tensor=fast if (net, mode, soft) in FAST_NETWORK_CASES else 5)


# ----------------------------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------------------------


def test_example_gradients_average_to_the_batch_gradient():
    """K = N, B = 1, pooled statistics: the N per-example gradients average to the gradient of the batch's mean
    loss (one backward, ``pooled_gradient``)."""
    spec = C.fast_resnet(1 / 16)
    params, X, Y = make_problem(spec, K=5, B=1, hw=16, soft=True)
    per_example = C.example_gradients(spec, params, X[:, 0], Y[:, 0])
    batch, loss = C.pooled_gradient(spec, params, X, Y)
    assert loss == pytest.approx(per_example.losses.mean(), rel=1e-13)
    for g, b in zip(per_example.grads, batch):
        assert_close(g.mean(axis=0), b, rtol=1e-12)


@pytest.mark.parametrize("semantics", C.SEMANTICS)
def test_env_gradients_average_to_pooled_gradient(semantics):
    spec = projection_residual_net()
    params, X, Y = make_problem(spec, K=3, B=2, hw=6)
    out = C.env_gradients(spec, params, X, Y, semantics=semantics)
    grads, loss = C.pooled_gradient(spec, params, X, Y, semantics=semantics)
    assert loss == pytest.approx(out.losses.mean(), rel=1e-13)
    for g, b in zip(out.grads, grads):
        assert_close(g.mean(axis=0), b, rtol=1e-12)


def test_per_env_with_one_image_per_environment_is_per_image_statistics():
    """per_env with K = N, B = 1: every image is normalised by its own statistics (over its pixels; BatchNorm needs
    H*W > 1 there), so environment n's gradient is the gradient of image n alone in a batch of one."""
    spec = C.fast_resnet(1 / 16)
    params, X, Y = make_problem(spec, K=3, B=1, hw=16, soft=True)
    out = C.env_gradients(spec, params, X, Y, semantics="per_env")
    assert [s.count for s in out.bn_stats] == [256, 256, 64, 64, 64, 16, 4, 4]  # pixels of one image
    for n in range(3):
        alone = C.env_gradients(spec, params, X[n:n + 1], Y[n:n + 1], semantics="pooled")
        assert out.losses[n] == pytest.approx(alone.losses[0], rel=1e-13)
        for g, a in zip(out.grads, alone.grads):
            assert_close(g[n], a[0], rtol=1e-12)
    # and not the pooled per-example gradients (the statistics differ)
    pooled = C.example_gradients(spec, params, X[:, 0], Y[:, 0])
    assert not np.allclose(pooled.grads[0], out.grads[0], rtol=1e-3)


def no_batch_norm_net():
    return NetSpec((Conv2d("stem", 2, 3, 3, 2, 1, bias=True), ReLU(), MaxPool2d(3, 2, 1),
                    Residual((Conv2d("res.conv", 3, 4, 3, 1, 1), ReLU()), (Conv2d("res.proj", 3, 4, 1),)),
                    GlobalMaxPool(), Linear("fc", 4, 3), Scale(0.5)), 2)


def test_pooled_and_per_env_coincide_without_batch_norm():
    spec = no_batch_norm_net()
    params, X, Y = make_problem(spec, K=3, B=2, hw=8, soft=True)
    pooled = C.env_gradients(spec, params, X, Y, semantics="pooled")
    per_env = C.env_gradients(spec, params, X, Y, semantics="per_env")
    np.testing.assert_allclose(pooled.losses, per_env.losses, rtol=1e-14)
    for a, b in zip(pooled.grads, per_env.grads):
        assert_close(a, b, rtol=1e-13)
    assert pooled.bn_stats == [] and per_env.bn_stats == []
    assert_fd_matches(spec, params, X, Y, pooled.grads, "pooled")


def random_running_stats(spec, rng):
    return [RunningStats(rng.standard_normal(s.mean.shape), rng.uniform(0.3, 3.0, s.var.shape))
            for s in C.init_running_stats(spec)]


@pytest.mark.parametrize("net", list(NETWORKS))
def test_eval_mode_is_batch_norm_folded_into_the_convolutions(net):
    """predict (eval mode) equals the network with every BatchNorm2d replaced by the affine map of its running
    statistics, folded into the preceding convolution: weights times gamma / sqrt(var + eps), bias beta - mean *
    scale. The folded network has no BatchNorm, so its training-mode forward is that fixed map."""
    make, hw = NETWORKS[net]
    spec = make()
    rng = np.random.default_rng(3)
    params, X, _ = make_problem(spec, K=1, B=3, hw=hw)
    running = random_running_stats(spec, rng)
    folded_spec, folded = fold_batch_norm(spec, params, running)
    assert not any(isinstance(layer, BatchNorm2d) for layer in C.iter_layers(folded_spec))
    expected = C.forward(folded_spec, folded, X)[0]
    np.testing.assert_allclose(C.predict(spec, params, X[0], running), expected, rtol=1e-11, atol=1e-12)
    # eval mode does not couple the images: one image at a time gives the same logits
    np.testing.assert_allclose(C.predict(spec, params, X[0, 1:2], running), expected[1:2], rtol=1e-11, atol=1e-12)


def test_batch_statistics_and_running_update():
    """bn_stats are the mean and biased variance of BatchNorm's input (the conv's output, computed here) over all
    images (pooled) or each environment's (per_env), with their count; update_running_stats applies torch's momentum
    rule with the unbiased variance, once (pooled) or once per environment in order (per_env)."""
    spec = bn_net()
    params, X, Y = make_problem(spec, K=3, B=2, hw=5)
    z = ref_conv(X.reshape(6, 2, 5, 5), params[0], params[1], 1, 1).reshape(3, 2, 3, 5, 5)
    pooled = C.env_gradients(spec, params, X, Y, semantics="pooled").bn_stats[0]
    np.testing.assert_allclose(pooled.mean, z.mean(axis=(0, 1, 3, 4)), rtol=1e-13)
    np.testing.assert_allclose(pooled.var, z.var(axis=(0, 1, 3, 4)), rtol=1e-13)
    assert pooled.count == 3 * 2 * 25
    per_env = C.env_gradients(spec, params, X, Y, semantics="per_env").bn_stats[0]
    np.testing.assert_allclose(per_env.mean, z.mean(axis=(1, 3, 4)), rtol=1e-13)
    np.testing.assert_allclose(per_env.var, z.var(axis=(1, 3, 4)), rtol=1e-13)
    assert per_env.count == 2 * 25

    start = random_running_stats(spec, np.random.default_rng(1))
    (after,) = C.update_running_stats(start, [pooled], momentum=0.1)
    np.testing.assert_allclose(after.mean, 0.9 * start[0].mean + 0.1 * z.mean(axis=(0, 1, 3, 4)), rtol=1e-13)
    np.testing.assert_allclose(after.var, 0.9 * start[0].var + 0.1 * z.var(axis=(0, 1, 3, 4), ddof=1), rtol=1e-13)
    (after,) = C.update_running_stats(start, [per_env], momentum=0.25)
    mean, var = start[0]
    for e in range(3):
        mean = 0.75 * mean + 0.25 * z[e].mean(axis=(0, 2, 3))
        var = 0.75 * var + 0.25 * z[e].var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(after.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(after.var, var, rtol=1e-13)


# ----------------------------------------------------------------------------------------------------------------
# Specs, names, initialisation
# ----------------------------------------------------------------------------------------------------------------


def test_resnet18_has_torchvisions_parameter_count_and_names():
    """torchvision's resnet18 (1000 classes) has 11,689,512 parameters in 62 tensors (its published model card),
    named conv1, bn1, layer{1-4}.{0,1}.{conv,bn}{1,2}, layer{2-4}.0.downsample.{0,1}, fc."""
    spec = C.resnet18(1.0, num_classes=1000)
    shapes = C.param_shapes(spec)
    assert sum(int(np.prod(s)) for s in shapes) == 11_689_512
    names = C.param_names(spec)
    assert len(names) == 62
    expected = ["conv1.weight", "bn1.weight", "bn1.bias"]
    for stage in range(1, 5):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            expected += [f"{prefix}.conv1.weight", f"{prefix}.bn1.weight", f"{prefix}.bn1.bias",
                         f"{prefix}.conv2.weight", f"{prefix}.bn2.weight", f"{prefix}.bn2.bias"]
            if stage > 1 and block == 0:
                expected += [f"{prefix}.downsample.0.weight", f"{prefix}.downsample.1.weight",
                             f"{prefix}.downsample.1.bias"]
    assert names == expected + ["fc.weight", "fc.bias"]
    assert shapes[0] == (64, 3, 7, 7) and shapes[names.index("layer2.0.downsample.0.weight")] == (128, 64, 1, 1)


def test_fast_resnet_shapes():
    spec = C.fast_resnet(1.0)
    shapes = dict(zip(C.param_names(spec), C.param_shapes(spec)))
    assert shapes["prep.0.weight"] == (64, 3, 3, 3)
    assert shapes["layer1.2.res1.0.weight"] == (128, 128, 3, 3)
    assert shapes["layer3.2.res2.1.bias"] == (512,)
    assert shapes["linear.weight"] == (10, 512) and "linear.bias" not in shapes
    assert [c.out_channels for c in C.iter_layers(C.fast_resnet(1 / 16)) if isinstance(c, Conv2d)] == \
        [4, 8, 8, 8, 16, 32, 32, 32]


@pytest.mark.parametrize("spec", [C.fast_resnet(1 / 16), C.resnet18(1 / 8, num_classes=7, in_channels=1),
                                  projection_residual_net(), no_batch_norm_net()],
                         ids=["fast_resnet", "resnet18", "projection", "no_bn"])
def test_to_dict_from_dict_round_trip(spec):
    data = spec.to_dict()
    assert data["kind"] == "convnet"
    assert NetSpec.from_dict(data) == spec
    assert NetSpec.from_dict(json.loads(json.dumps(data))) == spec  # through JSON: lists for tuples
    params, X, Y = make_problem(spec, K=2, B=2, hw=16)
    a = C.env_gradients(data, params, X, Y)  # the dict form is accepted wherever a spec is
    b = C.env_gradients(spec, params, X, Y)
    for x, y in zip(a.grads, b.grads):
        np.testing.assert_array_equal(x, y)


def test_init_params_follow_torch_defaults():
    spec = projection_residual_net()
    params = C.init_params(spec, np.random.default_rng(0))
    for name, shape, p in zip(C.param_names(spec), C.param_shapes(spec), params):
        assert p.shape == shape and p.dtype == np.float64
        if ".bn" in name or "downsample.1" in name:
            np.testing.assert_array_equal(p, 1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("weight"):
            bound = 1.0 / np.sqrt(np.prod(shape[1:]))
            assert np.abs(p).max() <= bound and np.abs(p).max() > 0.5 * bound
    fc_bias = params[C.param_names(spec).index("fc.bias")]
    assert np.abs(fc_bias).max() <= 1.0 / np.sqrt(4)
    running = C.init_running_stats(spec)
    assert len(running) == 3
    assert all(np.array_equal(r.mean, np.zeros(4)) and np.array_equal(r.var, np.ones(4)) for r in running)


# ----------------------------------------------------------------------------------------------------------------
# Torch autograd as a second route (float64)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tm():
    """torch, F, the accel engines and models (the test skips without torch)."""
    from types import SimpleNamespace

    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from hardtovary.accel.torch import env_gradients as EG
    from hardtovary.accel.torch import models as M
    return SimpleNamespace(torch=torch, F=F, EG=EG, M=M)


def torch_model(tm, spec, params):
    return tm.M.load_reference_params(tm.M.from_spec(spec, dtype=tm.torch.float64), params)


def torch_targets(tm, Y):
    return tm.torch.tensor(Y, dtype=tm.torch.long if np.issubdtype(Y.dtype, np.integer) else tm.torch.float64)


def plain_autograd(tm, model, X, Y, semantics):
    """Per-environment gradients by plain autograd, written here: pooled, one forward of all K*B images and one
    ``autograd.grad`` per environment's loss; per_env, one forward per environment."""
    torch, F = tm.torch, tm.F
    K, B = X.shape[:2]
    params = list(model.parameters())
    Xt, Yt = torch.tensor(X), torch_targets(tm, Y)
    if semantics == "pooled":
        out = model(Xt.reshape(K * B, *X.shape[2:]))
        rows = [torch.autograd.grad(F.cross_entropy(out[e * B:(e + 1) * B], Yt[e]), params, retain_graph=True)
                for e in range(K)]
    else:
        rows = [torch.autograd.grad(F.cross_entropy(model(Xt[e]), Yt[e]), params) for e in range(K)]
    return [np.stack([r[i].numpy() for r in rows]) for i in range(len(params))]


LAYER_NETS = {  # name: (spec, image size, soft targets)
    **{f"conv_k{k}_s{s}_p{p}{'_bias' if b else ''}":
       (NetSpec((Conv2d("conv", 2, 3, k, s, p, b), Flatten(),
                 Linear("fc", 3 * ((7 + 2 * p - k) // s + 1) ** 2, 3)), 2), 7, False)
       for k, s, p, b in CONV_CASES},
    "batchnorm": (bn_net(), 5, True),
    "maxpool_2": (NetSpec((Conv2d("conv", 2, 3, 3, 1, 1), MaxPool2d(2), Flatten(), Linear("fc", 27, 3)), 2), 7, False),
    "maxpool_3_2_1": (NetSpec((Conv2d("conv", 2, 3, 3, 1, 1), MaxPool2d(3, 2, 1), Flatten(), Linear("fc", 48, 3)), 2),
                      7, True),
    "global_max": (NetSpec((Conv2d("conv", 2, 3, 3), ReLU(), GlobalMaxPool(), Linear("fc", 3, 3)), 2), 5, False),
    "global_avg_scale": (NetSpec((Conv2d("conv", 2, 3, 3), ReLU(), GlobalAvgPool(), Linear("fc", 3, 3, bias=False),
                                  Scale(0.125)), 2), 5, True),
    "identity_residual": (identity_residual_net(), 6, False),
    "projection_residual": (projection_residual_net(), 6, True),
    "no_batchnorm": (no_batch_norm_net(), 8, False),
}


@pytest.mark.parametrize("semantics", C.SEMANTICS)
@pytest.mark.parametrize("name", list(LAYER_NETS))
def test_torch_layer_nets(tm, name, semantics):
    spec, hw, soft = LAYER_NETS[name]
    params, X, Y = make_problem(spec, K=3, B=2, hw=hw, soft=soft)
    ours = C.env_gradients(spec, params, X, Y, semantics=semantics)
    model = torch_model(tm, spec, params)
    theirs = tm.EG.env_gradients(model, tm.torch.tensor(X), torch_targets(tm, Y), tm.F.cross_entropy,
                                 semantics=semantics)
    assert_close(ours.losses, theirs.losses.numpy(), what="losses")
    for n, a, b in zip(C.param_names(spec), ours.grads, theirs.grads):
        assert_close(a, b.numpy(), what=n)
    for n, a, b in zip(C.param_names(spec), ours.grads, plain_autograd(tm, model, X, Y, semantics)):
        assert_close(a, b, what=n)


@pytest.mark.parametrize("net", list(NETWORKS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_torch_networks(tm, net, mode, soft):
    """Both networks through ``from_spec`` + ``load_reference_params``: per example (pooled statistics over the
    batch, ``example_gradients``) and per environment in both semantics (``env_gradients``), and plain autograd."""
    spec, params, X, Y = network_problem(net, mode, soft, seed=1)
    ours = oracle_grads(spec, params, X, Y, mode)
    model = torch_model(tm, spec, params)
    if mode == "example":
        theirs = tm.EG.example_gradients(model, tm.torch.tensor(X[:, 0]), torch_targets(tm, Y[:, 0]),
                                         tm.F.cross_entropy)
    else:
        theirs = tm.EG.env_gradients(model, tm.torch.tensor(X), torch_targets(tm, Y), tm.F.cross_entropy,
                                     semantics=mode)
    names = C.param_names(spec)
    assert_close(ours.losses, theirs.losses.numpy(), what="losses")
    for n, a, b in zip(names, ours.grads, theirs.grads):
        assert_close(a, b.numpy(), what=n)
    for n, a, b in zip(names, ours.grads, plain_autograd(tm, model, X, Y, "pooled" if mode == "example" else mode)):
        assert_close(a, b, what=n)


@pytest.mark.parametrize("net", list(NETWORKS) + ["projection_residual"])
@pytest.mark.parametrize("semantics", C.SEMANTICS)
def test_torch_running_stats_and_eval_mode(tm, net, semantics):
    """Two training steps' forwards (pooled: one forward of all images; per_env: one per environment, in order),
    then eval mode: the oracle's running statistics (``update_running_stats`` of ``bn_stats``) equal torch's buffers,
    and ``predict`` equals ``model.eval()``'s logits on new images."""
    torch = tm.torch
    if net in NETWORKS:
        make, hw = NETWORKS[net]
        spec = make()
    else:
        spec, hw = projection_residual_net(), 6
    params, _, _ = make_problem(spec, K=2, B=4, hw=hw, perturb=0.1)
    model = torch_model(tm, spec, params).train()
    running = C.init_running_stats(spec)
    rng = np.random.default_rng(7)
    for _ in range(2):
        X = rng.standard_normal((2, 4, spec.in_channels, hw, hw)) * 2.0 + 0.5
        Y = rng.integers(0, spec.num_classes, (2, 4))
        running = C.update_running_stats(running, C.env_gradients(spec, params, X, Y, semantics=semantics).bn_stats)
        with torch.no_grad():
            if semantics == "pooled":
                model(torch.tensor(X.reshape(8, *X.shape[2:])))
            else:
                for e in range(2):
                    model(torch.tensor(X[e]))
    bns = [layer for layer in C.iter_layers(spec) if isinstance(layer, BatchNorm2d)]
    assert len(bns) == len(running)
    for layer, r in zip(bns, running):
        module = model.get_submodule(layer.name)
        assert_close(r.mean, module.running_mean.numpy(), what=f"{layer.name} running_mean")
        assert_close(r.var, module.running_var.numpy(), what=f"{layer.name} running_var")
    X_test = rng.standard_normal((3, spec.in_channels, hw, hw))
    with torch.no_grad():
        expected = model.eval()(torch.tensor(X_test)).numpy()
    assert_close(C.predict(spec, params, X_test, running), expected, what="eval logits")


@pytest.mark.parametrize("pool", ["maxpool", "global"])
def test_torch_positive_tie_goes_to_first_maximum(tm, pool):
    """The oracle's tie rule is torch's: with two positive equal values in a window, torch's max-pooling kernels
    (``max_pool2d``, ``adaptive_max_pool2d``) send the whole gradient to the first in row-major order too."""
    spec, params, X, Y = positive_tie_problem()
    if pool == "global":
        spec = NetSpec((Conv2d("conv", 2, 1, 1), GlobalMaxPool(), Linear("fc", 1, 2, bias=False)), 2)
    theirs = plain_autograd(tm, torch_model(tm, spec, params), X, Y, "pooled")
    dW, _ = positive_tie_expected(params[1])
    np.testing.assert_allclose(theirs[0][0], dW, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(C.env_gradients(spec, params, X, Y).grads[0], theirs[0], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("width", [1 / 16, 1 / 8, 0.3, 1.0])
def test_param_names_equal_torch_models(tm, width):
    """``fast_resnet(w)``'s names and shapes are those of ``FastResNet(width=w)`` and of ``from_spec``."""
    spec = C.fast_resnet(width)
    fast = [(n, tuple(p.shape)) for n, p in tm.M.FastResNet(width=width).named_parameters()]
    assert fast == list(zip(C.param_names(spec), C.param_shapes(spec)))
    for s in (spec, C.resnet18(width), projection_residual_net()):
        built = [(n, tuple(p.shape)) for n, p in tm.M.from_spec(s).named_parameters()]
        assert built == list(zip(C.param_names(s), C.param_shapes(s)))


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def _bad_calls():
    spec = bn_net()
    params, X, Y = make_problem(spec, K=2, B=2, hw=4)
    soft = np.full((2, 2, 3), 0.5)
    nan_params = [p.copy() for p in params]
    nan_params[2][1] = np.nan
    nan_X = X.copy()
    nan_X[1, 0, 1, 2, 3] = np.inf
    eg = C.env_gradients
    return [
        ("spec type", lambda: eg("bn_net", params, X, Y), TypeError, "spec"),
        ("spec dict kind", lambda: eg({"kind": "mlp"}, params, X, Y), ValueError, "spec"),
        ("params type", lambda: eg(spec, tuple(params)[0], X, Y), TypeError, "params"),
        ("params count", lambda: eg(spec, params[:-1], X, Y), ValueError, "params must hold 6"),
        ("params shape", lambda: eg(spec, [params[0][:, :1]] + params[1:], X, Y), ValueError,
         r"params\[0\] \(conv.weight\)"),
        ("params non-finite", lambda: eg(spec, nan_params, X, Y), ValueError, r"params\[2\] \(bn.weight\)"),
        ("params integer", lambda: eg(spec, [params[0].astype(int)] + params[1:], X, Y), TypeError, r"params\[0\]"),
        ("X ndim", lambda: eg(spec, params, X[0], Y), ValueError, "X must have shape"),
        ("X channels", lambda: eg(spec, params, X[:, :, :1], Y), ValueError, "C = 2"),
        ("X empty", lambda: eg(spec, params, X[:, :0], Y[:, :0]), ValueError, "X must hold"),
        ("X non-finite", lambda: eg(spec, params, nan_X, Y), ValueError, "X"),
        ("X integer", lambda: eg(spec, params, X.astype(int), Y), TypeError, "X"),
        ("Y class", lambda: eg(spec, params, X, Y + 3), ValueError, "Y"),
        ("Y shape", lambda: eg(spec, params, X, Y[:, :1]), ValueError, "Y"),
        ("Y soft rows", lambda: eg(spec, params, X, soft), ValueError, "Y"),
        ("Y bool", lambda: eg(spec, params, X, Y > 0), TypeError, "Y"),
        ("semantics value", lambda: eg(spec, params, X, Y, semantics="both"), ValueError, "semantics"),
        ("semantics type", lambda: eg(spec, params, X, Y, semantics=1), TypeError, "semantics"),
        ("loss value", lambda: eg(spec, params, X, Y, loss="mse"), ValueError, "loss"),
        ("loss type", lambda: eg(spec, params, X, Y, loss=None), TypeError, "loss"),
        ("pooled_gradient semantics", lambda: C.pooled_gradient(spec, params, X, Y, semantics="x"), ValueError,
         "semantics"),
        ("forward semantics", lambda: C.forward(spec, params, X, semantics="x"), ValueError, "semantics"),
        ("example Y rows", lambda: C.example_gradients(spec, params, X[0], Y[0, :1]), ValueError, "Y"),
        ("example X ndim", lambda: C.example_gradients(spec, params, X, Y), ValueError, "X"),
        ("BatchNorm one value", lambda: eg(spec, params, X[:1, :1, :, :1, :1], Y[:1, :1]), ValueError,
         "BatchNorm2d 'bn'"),
        ("per_env one value", lambda: eg(spec, params, X[:, :1, :, :1, :1], Y[:, :1], semantics="per_env"),
         ValueError, "BatchNorm2d 'bn'"),
        ("predict running count", lambda: C.predict(spec, params, X[0], []), ValueError, "running_stats"),
        ("predict X ndim", lambda: C.predict(spec, params, X, C.init_running_stats(spec)), ValueError, "X"),
        ("no logits", lambda: eg(NetSpec((Conv2d("c", 2, 3, 1), Flatten()), 2), [params[0][:, :, :1, :1]], X, Y),
         ValueError, "Linear"),
        ("width value", lambda: C.fast_resnet(0.0), ValueError, "width"),
        ("width type", lambda: C.resnet18("1"), TypeError, "width"),
        ("num_classes", lambda: C.fast_resnet(num_classes=0), ValueError, "num_classes"),
        ("in_channels", lambda: C.resnet18(in_channels=0), ValueError, "in_channels"),
        ("NetSpec in_channels", lambda: NetSpec((ReLU(),), 0), ValueError, "in_channels"),
        ("NetSpec layer", lambda: NetSpec((ReLU(), "relu"), 2), TypeError, r"layers\[1\]"),
        ("NetSpec nested layer", lambda: NetSpec((Residual((ReLU(), 3)),), 2), TypeError, r"layers\[0\]\.body\[1\]"),
        ("from_dict layer type", lambda: NetSpec.from_dict({"kind": "convnet", "layers": [{"type": "GELU"}]}),
         ValueError, "type"),
        ("init rng", lambda: C.init_params(spec, 0), TypeError, "rng"),
        ("momentum", lambda: C.update_running_stats(C.init_running_stats(spec),
                                                    eg(spec, params, X, Y).bn_stats, momentum=1.5),
         ValueError, "momentum"),
        # a window of padding only would give max -inf, then NaN logits from finite input (torch refuses it too)
        ("maxpool padding > kernel/2", lambda: MaxPool2d(2, 2, 2), ValueError, "padding"),
        ("maxpool stride 0", lambda: MaxPool2d(2, 0), ValueError, "stride"),
        ("predict running shape", lambda: C.predict(spec, params, X[0], [RunningStats(np.zeros(1), np.ones(1))]),
         ValueError, r"running_stats\[0\]\.mean"),
        ("predict running var < 0", lambda: C.predict(spec, params, X[0], [RunningStats(np.zeros(3), -np.ones(3))]),
         ValueError, r"running_stats\[0\]\.var"),
        ("predict running nan", lambda: C.predict(spec, params, X[0], [RunningStats(np.full(3, np.nan), np.ones(3))]),
         ValueError, r"running_stats\[0\]\.mean"),
        ("running_stats_after shape", lambda: C.running_stats_after(spec, params, X,
                                                                    running_stats=[RunningStats(np.zeros(2),
                                                                                                np.ones(2))]),
         ValueError, r"running_stats\[0\]"),
        ("conv kernel 0", lambda: Conv2d("c", 2, 3, 0), ValueError, "kernel_size"),
        ("conv padding < 0", lambda: Conv2d("c", 2, 3, 1, padding=-1), ValueError, "padding"),
        ("conv channels 0", lambda: Conv2d("c", 0, 3, 1), ValueError, "in_channels"),
        ("conv name", lambda: Conv2d("", 2, 3, 1), TypeError, "name"),
        ("conv bias", lambda: Conv2d("c", 2, 3, 1, bias=1), TypeError, "bias"),
        ("batchnorm eps 0", lambda: BatchNorm2d("b", 3, eps=0.0), ValueError, "eps"),
        ("batchnorm channels", lambda: BatchNorm2d("b", 0), ValueError, "channels"),
        ("linear features", lambda: Linear("fc", 0, 2), ValueError, "in_features"),
        ("scale nan", lambda: Scale(float("nan")), ValueError, "factor"),
        ("channels do not chain", lambda: NetSpec((Conv2d("a", 2, 3, 1), Conv2d("b", 4, 3, 1)), 2), ValueError,
         r"layers\[1\] \(Conv2d 'b'\) in_channels"),
        ("batchnorm channels do not chain", lambda: NetSpec((Conv2d("a", 2, 3, 1), BatchNorm2d("b", 4)), 2),
         ValueError, r"layers\[1\] \(BatchNorm2d 'b'\) channels"),
        ("linear features do not chain", lambda: NetSpec((GlobalAvgPool(), Linear("fc", 3, 2)), 2), ValueError,
         "in_features"),
        ("linear on images", lambda: NetSpec((Linear("fc", 2, 2),), 2), ValueError, "Flatten"),
        ("conv on features", lambda: NetSpec((GlobalAvgPool(), Conv2d("c", 2, 2, 1)), 2), ValueError,
         "needs images"),
        ("residual ends differ", lambda: NetSpec((Residual((Conv2d("c", 2, 3, 1),)),), 2), ValueError,
         r"layers\[0\] \(Residual\)"),
        ("duplicate names", lambda: NetSpec((Conv2d("c", 2, 2, 1), Conv2d("c", 2, 2, 1)), 2), ValueError,
         "'c' is used by two"),
        ("images too small", lambda: C.forward(C.fast_resnet(1 / 16), C.init_params(C.fast_resnet(1 / 16),
                                                                                   np.random.default_rng(0)),
                                               np.zeros((1, 2, 3, 4, 4))), ValueError, "X: images of 4x4"),
        ("flatten features do not match", lambda: C.forward(
            NetSpec((Flatten(), Linear("fc", 8, 2)), 2), [np.zeros((2, 8)), np.zeros(2)], np.zeros((1, 2, 2, 3, 3))),
         ValueError, "X: images of 3x3 pixels give 18 features"),
        ("from_dict no layers", lambda: NetSpec.from_dict({"kind": "convnet"}), ValueError, "layers"),
        ("from_dict unknown field", lambda: NetSpec.from_dict({"kind": "convnet", "layers": [{"type": "ReLU",
                                                                                              "inplace": True}]}),
         ValueError, "inplace"),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("call, error, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_torch_relu_derivative_at_zero_is_zero(tm):
    """torch's ReLU has derivative 0 at exactly 0, as the oracle's (a measure-zero case no random draw reaches)."""
    spec = NetSpec((Conv2d("conv", 1, 1, 1, bias=True), ReLU(), GlobalAvgPool(), Linear("fc", 1, 2, bias=False)), 1)
    X = np.array([[[[[0.0, 1.0], [2.0, 3.0]]]]])
    params = [np.ones((1, 1, 1, 1)), np.zeros(1), np.array([[0.5], [-0.5]])]
    Y = np.array([[0]])
    theirs = plain_autograd(tm, torch_model(tm, spec, params), X, Y, "pooled")
    for a, b in zip(C.env_gradients(spec, params, X, Y).grads, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-16)
