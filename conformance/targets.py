"""Targets: what the conformance suite checks, how it is named, and the built-in ``reference`` target.

A *target* is any object (a module, a class instance, ...) named on the command line as ``module:attribute``
(``attribute`` may be dotted, e.g. ``pkg.mod:Impl.instance``; ``module`` alone means the module itself). It
offers any subset of the callables described in :data:`PROTOCOL`. A callable it lacks skips its checks (the
report says which); a call that raises ``NotImplementedError`` marks that option combination "unsupported"
instead of failed. Everything else a call raises is a failure, except in the checks that define raising as a
pass (``agg.special.nonfinite``).

The suite only talks to targets through :class:`Adapter`, which converts results with ``numpy.asarray`` (so torch
tensors on the CPU, CuPy arrays with ``__array__``... work as long as ``numpy.asarray`` accepts them; a torch
adapter converting CUDA tensors belongs to the torch target itself) and turns ``NotImplementedError`` into
:class:`Unsupported`.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np

from hardtovary.reference import data as _data
from hardtovary.reference import mlp as _mlp
from hardtovary.reference import optim as _optim
from hardtovary.reference import rules as _rules

CALLABLES = ("aggregate", "env_gradients", "step", "temporal", "spirals")

PROTOCOL = """\
Target protocol (hardtovary.conformance). A target offers any of these callables; all arrays are NumPy
arrays on input, and anything numpy.asarray accepts on output. Raise NotImplementedError for an option
combination you do not support (reported "unsupported", not failed).

aggregate(grads, *, rule, tau, rescale, flavour=None, k=None) -> list of arrays
    grads:   list of gradient stacks G_i[K, *shape_i], one per parameter tensor, all of one dtype
             (float64, float32 or float16) and one K >= 1.
    rule:    "mean" | "and_mask" | "geometric_mean" | "sand_mask".
    tau:     float in [0, 1] (0.0 for "mean"; 1.0 for geometric_mean flavour "paper").
    rescale: bool, per-tensor inverse-sparsity rescaling n / n_kept (a fully masked tensor stays 0).
    flavour: "paper" | "original", passed only with rule="geometric_mean".
    k:       SAND-mask sharpness (float > 0), passed only with rule="sand_mask".
    returns: one aggregated array of shape shape_i per tensor.
    Canonical mask: keep iff |sum_e sign(G[e, j])| >= ceil(tau*K - 1e-9), sign(0) = 0.

env_gradients(spec, params, X, Y, *, loss, semantics) -> list of arrays
    spec:      dict with the fields of hardtovary.reference.mlp.MLPSpec: in_features, hidden (tuple),
               out_features, activation ("leaky_relu"|"relu"|"tanh"), negative_slope, batch_norm, bn_eps.
    params:    list of float64 arrays in nn.Sequential order (W[out, in], b[out], [gamma, beta], ..., W_out, b_out).
    X:         float64 [K, B, in_features];  Y: targets for logits [K, B, out] ([K, B] float for
               "bce_with_logits", [K, B] int64 for "cross_entropy", [K, B, out] float for "mse").
    loss:      "bce_with_logits" | "cross_entropy" | "mse";  L_e is the MEAN loss over environment e's B rows.
    semantics: "pooled" (BatchNorm statistics over all K*B rows) | "per_env" (over each environment's rows).
    returns:   one stack [K, *param_shape] per parameter, G[e] = dL_e/dtheta (training-mode BatchNorm).

step(params, grads, *, rule, tau, rescale, optimizer, lr, weight_decay, weight_decay_order, l1, momentum,
     state=None) -> (new_params, state)
    One AND-mask training step: aggregate the per-environment stacks `grads` (list of [K, *shape]) with
    `rule` ("mean" | "and_mask"), tau, rescale; then add l1 * sign(theta) (AFTER masking: never masked);
    then one optimizer step: optimizer "adam" (betas 0.9, 0.999, eps 1e-8) or "sgd" (momentum, dampening 0),
    with weight_decay applied "before" (coupled L2 added to the masked gradient, inside the optimizer) or
    "after" (decoupled, theta *= 1 - lr*weight_decay, as torch.optim.AdamW). `state` is opaque: None on the
    first call, then whatever the previous call returned.
  or, instead of step:
steps(params, grad_sequence, *, <the same keywords, without state>) -> list of params after each step

temporal(params, grad_sequence, *, lr, beta1, beta2, beta3, tau, eps, bias_correction) -> list of params
    Algorithm 1 (temporal AND-mask Adam) from zero state, one gradient list (one environment) per step:
    m, v, a EMAs (a of sign(g), sign(0) = 0), mask b = |a| >= tau on m only, theta -= lr*(m*b)/(sqrt(v)+eps);
    no bias correction unless asked. Returns the parameters after each step.

spirals(n_examples, n_revolutions, env, n_envs, n_dims, seed) -> (X, y)
    The spirals dataset, bit-identical to hardtovary.reference.data.spirals (float32 X [n, 2+n_dims], y [n]);
    env an int in [0, n_envs) or "test".
"""


class Unsupported(Exception):
    """A target raised NotImplementedError for this option combination."""


class TargetError(Exception):
    """A target could not be loaded."""


def load_target(name: str):
    """Resolve ``module:attribute`` (attribute may be dotted; ``module`` alone is the module)."""
    if not isinstance(name, str) or not name:
        raise TargetError(f"target must be a string 'module:attribute', got {name!r}")
    module_name, _, attr = name.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(f"cannot import module {module_name!r} of target {name!r}: {exc}") from exc
    for part in filter(None, attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise TargetError(f"target {name!r}: {type(obj).__name__} has no attribute {part!r}") from exc
    return obj


def _arrays(result, what: str) -> list[np.ndarray]:
    if isinstance(result, np.ndarray) or not hasattr(result, "__iter__"):
        raise TypeError(f"{what} must return a list of arrays, got {type(result).__name__}")
    return [np.asarray(r) for r in result]


class Adapter:
    """The one boundary between the suite and a target."""

    def __init__(self, target, name: str | None = None):
        self.target = target
        self.name = name or getattr(target, "__name__", type(target).__name__)

    def has(self, what: str) -> bool:
        if what == "step":
            return callable(getattr(self.target, "step", None)) or callable(getattr(self.target, "steps", None))
        return callable(getattr(self.target, what, None))

    def _call(self, what, *args, **kwargs):
        try:
            return getattr(self.target, what)(*args, **kwargs)
        except NotImplementedError as exc:
            raise Unsupported(f"{what}: {exc}" if str(exc) else what) from exc

    def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
        extra = {}
        if flavour is not None:
            extra["flavour"] = flavour
        if k is not None:
            extra["k"] = k
        out = self._call("aggregate", list(grads), rule=rule, tau=tau, rescale=rescale, **extra)
        return _arrays(out, "aggregate")

    def env_gradients(self, spec: dict, params, X, Y, *, loss, semantics):
        out = self._call("env_gradients", dict(spec), list(params), X, Y, loss=loss, semantics=semantics)
        return _arrays(out, "env_gradients")

    def steps(self, params, grad_sequence, **kw):
        """Parameters after each step (uses ``steps`` when offered, else loops ``step`` with its state)."""
        if callable(getattr(self.target, "steps", None)):
            out = self._call("steps", list(params), list(grad_sequence), **kw)
            return [_arrays(p, "steps") for p in out]
        state, out = None, []
        for grads in grad_sequence:
            params, state = self._call("step", list(params), list(grads), state=state, **kw)
            params = _arrays(params, "step")
            out.append(params)
        return out

    def temporal(self, params, grad_sequence, **kw):
        out = self._call("temporal", list(params), [list(g) for g in grad_sequence], **kw)
        return [_arrays(p, "temporal") for p in out]

    def spirals(self, *args):
        X, y = self._call("spirals", *args)
        return np.asarray(X), np.asarray(y)


# ----------------------------------------------------------------------------------------------------------------
# The built-in reference target: the oracle itself (must pass everything)
# ----------------------------------------------------------------------------------------------------------------


class ReferenceTarget:
    """The oracle behind the target protocol. Subclassed by :mod:`hardtovary.conformance.mutants`."""

    def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
        return _rules.aggregate(list(grads), rule=rule, rescale=bool(rescale),
                                **_rules.rule_options(rule, tau, flavour, k))[0]

    def env_gradients(self, spec, params, X, Y, *, loss, semantics):
        return _mlp.env_gradients(_mlp.MLPSpec(**spec), params, X, Y, loss=loss, semantics=semantics).grads

    # -- step ---------------------------------------------------------------------------------------------------
    def _make_optimizer(self, params, optimizer, weight_decay, weight_decay_order, momentum):
        if optimizer == "adam":
            return _optim.Adam(params, weight_decay=weight_decay, weight_decay_order=weight_decay_order)
        if optimizer == "sgd":
            return _optim.SGD(params, momentum=momentum, weight_decay=weight_decay,
                              weight_decay_order=weight_decay_order)
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")

    def _masked_update(self, params, grads, *, rule, tau, rescale, l1, weight_decay, weight_decay_order):
        update = self.aggregate(grads, rule=rule, tau=tau, rescale=rescale)
        if l1:
            update = [u + g for u, g in zip(update, _optim.l1_gradient(params, l1))]
        return update

    def step(self, params, grads, *, rule, tau, rescale, optimizer, lr, weight_decay, weight_decay_order,
             l1, momentum, state=None):
        if state is None:
            state = SimpleNamespace(opt=self._make_optimizer(params, optimizer, weight_decay, weight_decay_order,
                                                             momentum))
        update = self._masked_update(params, grads, rule=rule, tau=tau, rescale=rescale, l1=l1,
                                     weight_decay=weight_decay, weight_decay_order=weight_decay_order)
        return state.opt.step(params, update, lr), state

    # -- temporal -----------------------------------------------------------------------------------------------
    def temporal(self, params, grad_sequence, *, lr, beta1, beta2, beta3, tau, eps, bias_correction):
        opt = _rules.TemporalAndMaskAdam(params, lr, beta1=beta1, beta2=beta2, beta3=beta3, tau=tau, eps=eps,
                                         bias_correction=bias_correction)
        out = []
        for grads in grad_sequence:
            params, _ = opt.step(params, grads)
            out.append(params)
        return out

    def spirals(self, n_examples, n_revolutions, env, n_envs, n_dims, seed):
        return _data.spirals(n_examples, n_revolutions, env, n_envs, n_dims, seed)


#: ``--target hardtovary.conformance.targets:reference``
reference = ReferenceTarget()
