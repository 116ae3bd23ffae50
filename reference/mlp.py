"""An analytic MLP with a hand-derived backward that keeps the environment axis.

The model is the authors' synthetic-task network (paper §3.1, App. B.3): a PyTorch
``nn.Sequential`` of, per hidden layer, ``Linear -> [BatchNorm1d] -> activation``, then a final ``Linear``.

Parameters
----------
A plain list of float64 arrays in ``nn.Sequential`` order, so that they map 1:1 onto a torch ``state_dict``
(``param_names`` gives the keys): per hidden layer ``W[out, in]``, ``b[out]``, then, with BatchNorm,
``gamma[out]`` (torch's ``weight``) and ``beta[out]`` (torch's ``bias``); finally ``W_out[out_features, last]`` and
``b_out[out_features]``. BatchNorm running statistics are buffers, not parameters: they are a separate list of
:class:`RunningStats`, one per BatchNorm layer.

Per-environment gradients
-------------------------
The data come as environment batches ``X[K, B, in]``, ``Y[K, B]`` or ``Y[K, B, out]``. Environment e's loss is
``L_e = (1/B) sum_b l(f(x_eb), y_eb)`` and its gradient is ``G[e] = dL_e/dtheta``; the pooled loss is
``L = (1/K) sum_e L_e`` (paper §2). BatchNorm in training mode couples the rows that share statistics, which
gives two semantics, both offered (``docs/conventions.md``):

``"per_env"``  statistics over each environment's B rows (DomainBed: one forward per environment);
``"pooled"``   statistics over all K*B rows (the authors: one forward over the stacked batch). ``G[e]`` is then
               the gradient of ``L_e`` *through the shared statistics*, so it has contributions from every row.

Without BatchNorm the two are identical.

How the backward keeps the environment axis
-------------------------------------------
Every array of activations has the shape ``[..., n, width]``: rows on axis -2, and BatchNorm statistics are
taken over axis -2 for each leading index. The forward runs in one of two *layouts*:

* block ``[K, B, width]`` (no BatchNorm, or ``per_env``): statistics, if any, are per environment. The
  per-environment cotangents are stored in the same block form ``[K, B, width]``: slice e holds cotangent e on
  environment e's rows, the only rows where it is not zero (nothing couples the environments). Each layer's
  weight gradient is then a batched product ``dZ[e]^T A[e]`` -> ``[K, out, in]``, and the K gradients cost about
  one forward + backward of the pooled batch.
* flat ``[K*B, width]`` (``pooled`` BatchNorm): statistics over all rows. Cotangent e is not block-local any
  more (the statistics spread it over every row), so the cotangents are stored *densely* as
  ``[K (cotangent), K*B (rows), width]``, cotangent e over all rows. This costs K times the work and memory of
  one backward, which is acceptable for an oracle; it is the one case that cannot stay block-local.

The same layer backward serves both: ``numpy.matmul`` broadcasts the activations ``[K*B, in]`` against the
dense cotangents ``[K, K*B, out]``, and BatchNorm's means over axis -2 are per environment in the block layout
and over all rows in the flat one. The gradient of the pooled loss (:func:`pooled_gradient`) runs one backward
with a single cotangent ``[K*B, out]`` in the flat layout (or ``[K, B, out]`` summed over environments for
``per_env`` BatchNorm).

Derivatives (training mode), written for one cotangent with ``dY`` the upstream gradient:

* Linear ``Z = A W^T + b``: ``dW = dZ^T A``, ``db = sum_rows dZ``, ``dA = dZ W``.
* activation ``A = phi(H)``: ``dH = dA * phi'(H)`` with torch's conventions at 0: leaky_relu'(0) =
  ``negative_slope``, relu'(0) = 0; tanh' = 1 - tanh^2.
* BatchNorm ``y = gamma * xhat + beta``, ``xhat = (x - mu) / sqrt(var + eps)`` (mu and the biased variance over
  the rows sharing the statistics)::

      dx     = gamma / sqrt(var + eps) * (dy - mean_rows(dy) - xhat * mean_rows(dy * xhat))
      dgamma = sum_rows(dy * xhat),   dbeta = sum_rows(dy)

Everything is computed in float64 whatever the (real floating) input dtypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import losses as _losses
from .validate import choice, finite, float_array, in_range, integer, parameter_arrays, positive, real_number

ACTIVATIONS = ("leaky_relu", "relu", "tanh")
SEMANTICS = ("pooled", "per_env")

#: Bias initialisation of every Linear layer in the authors' code.
BIAS_INIT = 0.01


# ----------------------------------------------------------------------------------------------------------------
# The architecture
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPSpec:
    """Architecture of ``nn.Sequential(Linear, [BatchNorm1d], activation, ..., Linear)``.

    in_features:    width of the input (>= 1).
    hidden:         widths of the hidden layers (each >= 1); may be empty (a single Linear). Stored as a tuple.
    out_features:   number of logits (>= 1); 1 for ``bce_with_logits``.
    activation:     ``"leaky_relu"`` (``negative_slope``), ``"relu"`` or ``"tanh"``.
    negative_slope: slope of leaky_relu for negative inputs (any finite real, as torch allows).
    batch_norm:     a ``BatchNorm1d(width, eps=bn_eps)`` after each hidden Linear.
    bn_eps:         BatchNorm's epsilon (> 0).
    """

    in_features: int
    hidden: tuple[int, ...] = ()
    out_features: int = 1
    activation: str = "leaky_relu"
    negative_slope: float = 0.01
    batch_norm: bool = False
    bn_eps: float = 1e-5

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("in_features", integer(self.in_features, "in_features", low=1))
        if isinstance(self.hidden, (str, bytes)) or not hasattr(self.hidden, "__iter__"):
            raise TypeError(f"hidden must be a tuple of layer widths, got {type(self.hidden).__name__} {self.hidden!r}")
        set_("hidden", tuple(integer(w, f"hidden[{i}]", low=1) for i, w in enumerate(self.hidden)))
        set_("out_features", integer(self.out_features, "out_features", low=1))
        if not isinstance(self.activation, str):
            raise TypeError(f"activation must be a string, one of {list(ACTIVATIONS)}, got {self.activation!r}")
        choice(self.activation, "activation", ACTIVATIONS)
        set_("negative_slope", real_number(self.negative_slope, "negative_slope"))
        if not isinstance(self.batch_norm, (bool, np.bool_)):
            raise TypeError(f"batch_norm must be a bool, got {type(self.batch_norm).__name__} {self.batch_norm!r}")
        set_("batch_norm", bool(self.batch_norm))
        set_("bn_eps", positive(self.bn_eps, "bn_eps"))


def _sequential(spec: MLPSpec) -> list[tuple[str, int, int]]:
    """The modules of the torch ``nn.Sequential``: ``(kind, sequential index, width)``.

    kind is ``"linear"`` (width = out width), ``"batch_norm"`` or ``"activation"``.
    """
    modules, index = [], 0
    for width in spec.hidden:
        modules.append(("linear", index, width))
        index += 1
        if spec.batch_norm:
            modules.append(("batch_norm", index, width))
            index += 1
        modules.append(("activation", index, width))
        index += 1
    modules.append(("linear", index, spec.out_features))
    return modules


def param_shapes(spec: MLPSpec) -> list[tuple[int, ...]]:
    """Shapes of the parameters, in order: per hidden layer W[out, in], b[out], [gamma[out], beta[out]]; then the
    output layer's W[out_features, last], b[out_features]."""
    _check_spec(spec)
    shapes, fan_in = [], spec.in_features
    for kind, _, width in _sequential(spec):
        if kind == "linear":
            shapes += [(width, fan_in), (width,)]
            fan_in = width
        elif kind == "batch_norm":
            shapes += [(width,), (width,)]
    return shapes


def param_names(spec: MLPSpec) -> list[str]:
    """torch ``state_dict`` keys of the parameters, e.g. ``["0.weight", "0.bias", "1.weight", "1.bias", ...]``.

    Sequential indices count every module (Linear, BatchNorm1d, activation), as ``nn.Sequential`` does;
    BatchNorm's gamma and beta are its ``weight`` and ``bias``.
    """
    _check_spec(spec)
    return [
        f"{index}.{what}"
        for kind, index, _ in _sequential(spec)
        if kind != "activation"
        for what in ("weight", "bias")
    ]


def init_params(spec: MLPSpec, rng: np.random.Generator) -> list[np.ndarray]:
    """The authors' initialisation, as float64 arrays in parameter order.

    Every Linear weight (the output layer's included) is drawn as ``torch.nn.init.kaiming_normal_`` with its
    defaults (a = 0, mode = 'fan_in', nonlinearity = 'leaky_relu'): ``W ~ N(0, std^2)``, ``std = gain / sqrt(fan_in)``
    with ``gain = sqrt(2 / (1 + a^2)) = sqrt(2)``, i.e. ``std = sqrt(2 / fan_in)`` (fan_in = W.shape[1]).
    Every Linear bias is 0.01; BatchNorm gamma = 1, beta = 0. Weights are drawn in parameter order from ``rng``
    (the distribution is torch's; the random stream is NumPy's).
    """
    _check_spec(spec)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    params, fan_in = [], spec.in_features
    for kind, _, width in _sequential(spec):
        if kind == "linear":
            params.append(rng.standard_normal((width, fan_in)) * math.sqrt(2.0 / fan_in))
            params.append(np.full(width, BIAS_INIT))
            fan_in = width
        elif kind == "batch_norm":
            params += [np.ones(width), np.zeros(width)]
    return params


# ----------------------------------------------------------------------------------------------------------------
# Result types
# ----------------------------------------------------------------------------------------------------------------


class BatchStats(NamedTuple):
    """Training-mode statistics of one BatchNorm layer: ``mean`` and biased ``var`` (ddof 0) of its input, over
    ``count`` rows each. Shapes ``[K, width]`` (``per_env``: one row per environment, count = B) or ``[width]``
    (``pooled``: count = K*B)."""

    mean: np.ndarray
    var: np.ndarray
    count: int


class RunningStats(NamedTuple):
    """Eval-mode statistics of one BatchNorm layer (torch's ``running_mean``, ``running_var`` buffers)."""

    mean: np.ndarray
    var: np.ndarray


class EnvGradients(NamedTuple):
    """Per-environment gradients and what the forward pass saw.

    grads:    list, in parameter order, of float64 stacks ``G[K, *param_shape]``, ``G[e] = dL_e/dtheta``.
    losses:   float64 ``[K]``, ``L_e`` = mean per-example loss of environment e.
    logits:   float64 ``[K, B, out_features]`` (training mode).
    bn_stats: one :class:`BatchStats` per BatchNorm layer (empty without BatchNorm).
    """

    grads: list
    losses: np.ndarray
    logits: np.ndarray
    bn_stats: list


class _HiddenTape(NamedTuple):
    """What the backward needs from one hidden layer; arrays ``[..., n, width]`` in the forward's layout."""

    inputs: np.ndarray          # A, the Linear's input
    pre_activation: np.ndarray  # H, the activation's input (BatchNorm output, or the Linear output)
    xhat: np.ndarray | None     # normalised Linear output (BatchNorm only)
    inv_std: np.ndarray | None  # 1 / sqrt(var + eps), [..., 1, width] (BatchNorm only)
    stats: BatchStats | None


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


def _linear(A: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``A W^T + b`` for ``A[..., n, in]``, as one matrix product over all rows."""
    return _rows_matmul(A, W.T) + b


def _rows_matmul(x: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``x @ M`` for ``x[..., w]`` and a matrix ``M[w, v]``, as one 2-D product (one BLAS call)."""
    return (x.reshape(-1, x.shape[-1]) @ M).reshape(*x.shape[:-1], M.shape[1])


def _activation(spec: MLPSpec, H: np.ndarray) -> np.ndarray:
    if spec.activation == "leaky_relu":
        return np.where(H > 0, H, spec.negative_slope * H)
    if spec.activation == "relu":
        return np.maximum(H, 0.0)
    return np.tanh(H)


def _activation_derivative(spec: MLPSpec, H: np.ndarray) -> np.ndarray:
    """phi'(H), with torch's values at 0 (leaky_relu: negative_slope; relu: 0)."""
    if spec.activation == "leaky_relu":
        return np.where(H > 0, 1.0, spec.negative_slope)
    if spec.activation == "relu":
        return (H > 0).astype(np.float64)
    return 1.0 - np.tanh(H) ** 2


def _batch_norm_train(Z: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float):
    """Training-mode BatchNorm1d over axis -2 of ``Z[..., n, w]``: returns (y, xhat, inv_std, mean, var)."""
    mean = Z.mean(axis=-2, keepdims=True)
    var = Z.var(axis=-2, keepdims=True)  # biased (ddof 0), as torch normalises
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = (Z - mean) * inv_std
    return gamma * xhat + beta, xhat, inv_std, mean, var


def _forward(spec: MLPSpec, params: list, A: np.ndarray, running_stats=None):
    """Run the network on ``A[..., n, in]`` (rows on axis -2; BatchNorm statistics over axis -2 per leading index).

    Training mode when ``running_stats`` is None, eval mode (BatchNorm with the running statistics) otherwise.
    Returns ``(logits[..., n, out], tape, last_hidden)``: one :class:`_HiddenTape` per hidden layer, and the
    output Linear's input.
    """
    tape, p = [], 0
    for layer, _ in enumerate(spec.hidden):
        W, b = params[p], params[p + 1]
        Z = _linear(A, W, b)
        xhat = inv_std = stats = None
        if spec.batch_norm:
            gamma, beta = params[p + 2], params[p + 3]
            if running_stats is None:
                H, xhat, inv_std, mean, var = _batch_norm_train(Z, gamma, beta, spec.bn_eps)
                stats = BatchStats(mean.squeeze(-2), var.squeeze(-2), Z.shape[-2])
            else:
                running = running_stats[layer]
                H = gamma * (Z - running.mean) / np.sqrt(running.var + spec.bn_eps) + beta
            p += 4
        else:
            H = Z
            p += 2
        tape.append(_HiddenTape(A, H, xhat, inv_std, stats))
        A = _activation(spec, H)
    return _linear(A, params[p], params[p + 1]), tape, A


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------


def _linear_param_gradients(dZ: np.ndarray, A: np.ndarray):
    """``(dW, db)`` of ``Z = A W^T + b``, summed over the rows (axis -2).

    ``dZ[..., n, out]`` and ``A[..., n, in]`` broadcast over their leading axes: block ``[K, B, .]`` with
    ``[K, B, .]`` gives ``[K, out, in]``; dense ``[K, n, .]`` with ``[n, .]`` gives ``[K, out, in]``; a single
    cotangent ``[n, .]`` gives ``[out, in]``.
    """
    return np.matmul(np.swapaxes(dZ, -1, -2), A), dZ.sum(axis=-2)


def _batch_norm_backward(dY, xhat, inv_std, gamma):
    """``(dX, dgamma, dbeta)`` of training-mode BatchNorm, means and sums over the rows (axis -2)."""
    dgamma = np.sum(dY * xhat, axis=-2)
    dbeta = dY.sum(axis=-2)
    dX = (gamma * inv_std) * (
        dY - dY.mean(axis=-2, keepdims=True) - xhat * np.mean(dY * xhat, axis=-2, keepdims=True)
    )
    return dX, dgamma, dbeta


def _backward(spec: MLPSpec, params: list, tape: list, last_hidden: np.ndarray, dlogits: np.ndarray) -> list:
    """Parameter gradients for the cotangent(s) ``dlogits`` on the logits, in parameter order.

    ``dlogits`` is ``[..., n, out]`` in the forward's layout, possibly with one more leading axis (the dense
    cotangent axis); each gradient has the cotangents' leading axes followed by the parameter's shape.
    """
    grads = [None] * len(params)
    p = len(params) - 2
    grads[p], grads[p + 1] = _linear_param_gradients(dlogits, last_hidden)
    dA = _rows_matmul(dlogits, params[p])
    for layer in reversed(range(len(spec.hidden))):
        t = tape[layer]
        dH = dA * _activation_derivative(spec, t.pre_activation)
        if spec.batch_norm:
            p -= 4
            dZ, grads[p + 2], grads[p + 3] = _batch_norm_backward(dH, t.xhat, t.inv_std, params[p + 2])
        else:
            p -= 2
            dZ = dH
        grads[p], grads[p + 1] = _linear_param_gradients(dZ, t.inputs)
        if layer > 0:  # the input's gradient is not needed
            dA = _rows_matmul(dZ, params[p])
    return grads


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _check_spec(spec) -> MLPSpec:
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be an MLPSpec, got {type(spec).__name__}")
    return spec


def _check_params(spec: MLPSpec, params) -> list[np.ndarray]:
    """Check count, dtype, shape and finiteness of ``params``; return them as float64 arrays."""
    names = param_names(spec)
    return parameter_arrays(params, param_shapes(spec), names, ', '.join(names))


def _check_inputs(spec: MLPSpec, X, *, ndim: int) -> np.ndarray:
    """X as float64: ``[K, B, in]`` (ndim 3) or ``[N, in]`` (ndim 2), nonempty and finite."""
    arr = float_array(X, "X")
    layout = "[K, B, in_features]" if ndim == 3 else "[N, in_features]"
    if arr.ndim != ndim or arr.shape[-1] != spec.in_features:
        raise ValueError(f"X must have shape {layout} with in_features = {spec.in_features}, got {arr.shape}")
    if 0 in arr.shape[:-1]:
        raise ValueError(f"X must hold at least one row ({layout} with each axis >= 1), got {arr.shape}")
    return finite(arr, "X").astype(np.float64, copy=False)


def _check_semantics(semantics) -> str:
    if not isinstance(semantics, str):
        raise TypeError(f"semantics must be a string, one of {list(SEMANTICS)}, got {semantics!r}")
    return choice(semantics, "semantics", SEMANTICS)


def _check_loss(spec: MLPSpec, loss) -> str:
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a string, one of {list(_losses.LOSS_KINDS)}, got {loss!r}")
    choice(loss, "loss", _losses.LOSS_KINDS)
    if loss == "bce_with_logits" and spec.out_features != 1:
        raise ValueError(f"loss 'bce_with_logits' needs spec.out_features == 1 (one logit), got {spec.out_features}")
    return loss


def _check_targets(spec: MLPSpec, loss: str, Y, K: int, B: int) -> None:
    """Validate Y against the logits' shape [K, B, out_features] (messages name Y)."""
    _losses._validated(loss, np.zeros((K, B, spec.out_features)), Y, logits_name="logits", targets_name="Y")


def _check_batch_norm_rows(spec: MLPSpec, semantics: str, K: int, B: int) -> None:
    """torch refuses training-mode BatchNorm over a single row ("Expected more than 1 value per channel")."""
    if not (spec.batch_norm and spec.hidden):
        return
    if semantics == "per_env" and B < 2:
        raise ValueError(
            "semantics='per_env' with batch_norm needs B >= 2 examples per environment (training-mode "
            f"BatchNorm1d cannot normalise a single row), got X with B = {B}"
        )
    if semantics == "pooled" and K * B < 2:
        raise ValueError(f"batch_norm needs at least 2 rows in the batch (K * B >= 2), got K = {K}, B = {B}")


def _flat_layout(spec: MLPSpec, semantics: str) -> bool:
    """Whether environment batches must be run as one flat batch of K*B rows (pooled BatchNorm statistics)."""
    return spec.batch_norm and semantics == "pooled"


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def forward_envs(spec: MLPSpec, params, X, *, semantics: str = "pooled") -> np.ndarray:
    """Training-mode logits ``[K, B, out_features]`` of environment batches ``X[K, B, in_features]``.

    BatchNorm normalises with the batch mean and biased variance (+ bn_eps) over all K*B rows (``pooled``) or
    over each environment's B rows (``per_env``); see the module docstring.
    """
    _check_spec(spec)
    semantics = _check_semantics(semantics)
    params = _check_params(spec, params)
    X = _check_inputs(spec, X, ndim=3)
    K, B, _ = X.shape
    _check_batch_norm_rows(spec, semantics, K, B)
    A = X.reshape(K * B, -1) if _flat_layout(spec, semantics) else X
    logits, _, _ = _forward(spec, params, A)
    return logits.reshape(K, B, spec.out_features)


def predict(spec: MLPSpec, params, X, running_stats=None) -> np.ndarray:
    """Eval-mode logits ``[N, out_features]`` of ``X[N, in_features]``.

    BatchNorm uses the running statistics, ``gamma * (x - running_mean) / sqrt(running_var + eps) + beta``;
    ``running_stats`` (one :class:`RunningStats` per BatchNorm layer) is required when ``spec.batch_norm`` and
    must be None or empty otherwise.
    """
    _check_spec(spec)
    params = _check_params(spec, params)
    X = _check_inputs(spec, X, ndim=2)
    if spec.batch_norm and spec.hidden:
        if running_stats is None:
            raise ValueError(
                "running_stats is required when spec.batch_norm (eval-mode BatchNorm); use init_running_stats(spec)"
            )
        running_stats = _check_running(spec, running_stats, "running_stats")
    elif running_stats:
        raise ValueError(
            f"running_stats must be None or empty for a spec without BatchNorm, got {len(running_stats)} entries"
        )
    logits, _, _ = _forward(spec, params, X, running_stats=running_stats)
    return logits


def init_running_stats(spec: MLPSpec) -> list[RunningStats]:
    """torch's initial running statistics: mean 0, var 1 for each BatchNorm layer (empty list without BatchNorm)."""
    _check_spec(spec)
    if not spec.batch_norm:
        return []
    return [RunningStats(np.zeros(width), np.ones(width)) for width in spec.hidden]


def _check_running(spec: MLPSpec, running, name: str) -> list[RunningStats]:
    return check_running_stats(running, spec.hidden if spec.batch_norm else (), name)


def check_running_stats(running, widths, name: str = "running_stats") -> list[RunningStats]:
    """``running`` as float64 RunningStats, one per BatchNorm layer of ``widths`` features (channels): finite
    means and nonnegative variances of shape ``(width,)``; errors name ``name[i]``."""
    if not isinstance(running, (list, tuple)) or len(running) != len(widths):
        got = f"{len(running)} entries" if isinstance(running, (list, tuple)) else type(running).__name__
        raise ValueError(f"{name} must be a list of {len(widths)} RunningStats (one per BatchNorm layer), got {got}")
    checked = []
    for i, (entry, width) in enumerate(zip(running, widths)):
        mean, var = entry
        mean = finite(float_array(mean, f"{name}[{i}].mean"), f"{name}[{i}].mean")
        var = finite(float_array(var, f"{name}[{i}].var"), f"{name}[{i}].var")
        for arr, what in ((mean, "mean"), (var, "var")):
            if arr.shape != (width,):
                raise ValueError(f"{name}[{i}].{what} must have shape {(width,)}, got {arr.shape}")
        if var.min() < 0:
            raise ValueError(f"{name}[{i}].var must be nonnegative, got minimum {var.min()}")
        checked.append(RunningStats(mean.astype(np.float64), var.astype(np.float64)))
    return checked


def update_running_stats(running, batch_stats, momentum: float = 0.1) -> list[RunningStats]:
    """torch's training-mode update of the running statistics, returning a new list.

    For each BatchNorm layer, with m = momentum, n = rows of the batch statistic and ``var`` its biased variance::

        running_mean <- (1 - m) running_mean + m mean
        running_var  <- (1 - m) running_var  + m var * n / (n - 1)      (unbiased batch variance)

    ``batch_stats`` is :attr:`EnvGradients.bn_stats`. ``pooled`` statistics ``[width]`` give one update;
    ``per_env`` statistics ``[K, width]`` give K updates applied in environment order, as K separate torch forwards
    would. (torch's ``momentum=None`` cumulative average and ``num_batches_tracked`` are not modelled.)
    """
    momentum = in_range(momentum, "momentum", 0.0, 1.0)
    if not isinstance(running, (list, tuple)) or not isinstance(batch_stats, (list, tuple)):
        raise TypeError("running and batch_stats must be lists with one entry per BatchNorm layer")
    if len(running) != len(batch_stats):
        raise ValueError(
            "running and batch_stats must have one entry per BatchNorm layer each, "
            f"got {len(running)} and {len(batch_stats)}"
        )
    updated = []
    for i, ((mean, var), (batch_mean, batch_var, count)) in enumerate(zip(running, batch_stats)):
        mean = float_array(mean, f"running[{i}].mean").astype(np.float64)
        var = float_array(var, f"running[{i}].var").astype(np.float64)
        batch_mean = float_array(batch_mean, f"batch_stats[{i}].mean")
        batch_var = float_array(batch_var, f"batch_stats[{i}].var")
        count = integer(count, f"batch_stats[{i}].count", low=2)
        if mean.ndim != 1 or var.shape != mean.shape:
            raise ValueError(
                f"running[{i}] must hold mean and var of one shape [width], got {mean.shape} and {var.shape}"
            )
        if batch_mean.shape != batch_var.shape or batch_mean.shape[-1:] != mean.shape or batch_mean.ndim not in (1, 2):
            raise ValueError(
                f"batch_stats[{i}] must hold mean and var of shape {mean.shape} (pooled) or [K, {mean.shape[0]}] "
                f"(per_env), got {batch_mean.shape} and {batch_var.shape}"
            )
        for batch_mean_e, batch_var_e in zip(np.atleast_2d(batch_mean), np.atleast_2d(batch_var)):
            mean = (1.0 - momentum) * mean + momentum * batch_mean_e
            var = (1.0 - momentum) * var + momentum * batch_var_e * count / (count - 1)
        updated.append(RunningStats(mean, var))
    return updated


def _check_gradient_call(spec: MLPSpec, params, X, Y, loss, semantics):
    """Validate the arguments of a gradient computation on environment batches ``X[K, B, in]``; return the
    checked ``(semantics, loss, params, X)``."""
    _check_spec(spec)
    semantics = _check_semantics(semantics)
    loss = _check_loss(spec, loss)
    params = _check_params(spec, params)
    X = _check_inputs(spec, X, ndim=3)
    K, B, _ = X.shape
    _check_targets(spec, loss, Y, K, B)
    _check_batch_norm_rows(spec, semantics, K, B)
    return semantics, loss, params, X


def env_gradients(spec: MLPSpec, params, X, Y, *, loss: str, semantics: str = "pooled") -> EnvGradients:
    """Per-environment gradients ``G[e] = dL_e/dtheta`` of environment batches, in training mode.

    X: real floating ``[K, B, in_features]``. Y: the targets of ``loss`` for logits ``[K, B, out_features]``
    (``bce_with_logits``: ``[K, B]`` in [0, 1]; ``cross_entropy``: integer ``[K, B]`` or probability rows
    ``[K, B, out]``; ``mse``: ``[K, B, out]``). ``L_e`` is the mean per-example loss of environment e.

    Without BatchNorm, and with ``per_env`` BatchNorm, ``G[e]`` depends on environment e's rows only and all K
    gradients come from one batched backward (block layout). With ``pooled`` BatchNorm, ``G[e]`` is the
    gradient of ``L_e`` through the statistics shared by all K*B rows; it is computed with dense cotangents
    ``[K, K*B, width]`` at K times the cost (module docstring). ``semantics='per_env'`` with BatchNorm and
    B = 1 raises ValueError, as torch does.
    """
    semantics, loss, params, X = _check_gradient_call(spec, params, X, Y, loss, semantics)
    K, B, _ = X.shape

    flat = _flat_layout(spec, semantics)
    logits, tape, last_hidden = _forward(spec, params, X.reshape(K * B, -1) if flat else X)
    logits = logits.reshape(K, B, spec.out_features)
    per_example_loss = _losses.loss_per_example(loss, logits, Y)       # [K, B]
    dlogits = _losses.loss_gradient(loss, logits, Y) / B               # d L_e / d logits, [K, B, out]
    if flat:
        # Dense cotangents: cotangent e is dlogits[e] on environment e's rows and 0 on the others.
        dense = np.zeros((K, K, B, spec.out_features))
        dense[np.arange(K), np.arange(K)] = dlogits
        dlogits = dense.reshape(K, K * B, spec.out_features)
    grads = _backward(spec, params, tape, last_hidden, dlogits)
    bn_stats = [t.stats for t in tape] if spec.batch_norm else []
    return EnvGradients(grads, per_example_loss.mean(axis=1), logits, bn_stats)


def pooled_gradient(spec: MLPSpec, params, X, Y, *, loss: str, semantics: str = "pooled") -> tuple[list, float]:
    """Gradient of the pooled loss ``L = (1/K) sum_e L_e`` (= the mean over all K*B examples), one backward pass.

    Same inputs as :func:`env_gradients`; returns ``(grads, L)`` with ``grads`` a list of float64 arrays of the
    parameter shapes. The forward runs over all K*B rows at once (``per_env`` BatchNorm: per-environment
    statistics, and the per-environment parameter gradients are summed).
    """
    semantics, loss, params, X = _check_gradient_call(spec, params, X, Y, loss, semantics)
    K, B, _ = X.shape

    per_env_statistics = spec.batch_norm and semantics == "per_env"
    logits, tape, last_hidden = _forward(spec, params, X if per_env_statistics else X.reshape(K * B, -1))
    logits = logits.reshape(K, B, spec.out_features)
    pooled_loss = float(_losses.loss_per_example(loss, logits, Y).mean())
    dlogits = _losses.loss_gradient(loss, logits, Y) / (K * B)
    if not per_env_statistics:
        dlogits = dlogits.reshape(K * B, spec.out_features)
    grads = _backward(spec, params, tape, last_hidden, dlogits)
    if per_env_statistics:
        grads = [g.sum(axis=0) for g in grads]
    return grads, pooled_loss


def example_gradients(spec: MLPSpec, params, X, Y, *, loss: str, semantics: str = "pooled") -> EnvGradients:
    """Per-example gradients: every example is its own environment (paper §3.2: CIFAR-10 with K = batch size).

    X: ``[N, in_features]``; Y: ``[N]`` or ``[N, out_features]``. Equivalent to :func:`env_gradients` on
    ``X[:, None]`` and ``Y[:, None]`` (K = N, B = 1), and returns exactly that: grads ``[N, *shape]``, losses
    ``[N]``, logits ``[N, 1, out_features]``. With BatchNorm, ``pooled`` statistics are over the N examples
    (the authors' CIFAR setting) and ``per_env`` raises (one row per environment).
    """
    _check_spec(spec)
    X = _check_inputs(spec, X, ndim=2)
    Y = np.asarray(Y)
    if Y.ndim < 1 or Y.shape[0] != X.shape[0]:
        raise ValueError(
            f"Y must have one target (row) per example of X, i.e. leading axis {X.shape[0]}, got shape {Y.shape}"
        )
    return env_gradients(spec, params, X[:, None], Y[:, None], loss=loss, semantics=semantics)
