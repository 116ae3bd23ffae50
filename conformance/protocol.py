"""The target protocol: what the conformance suite calls on an implementation.

A target offers any subset of the callables below; each is a :class:`typing.Protocol`, so a type checker can verify
an adapter (``def make() -> AggregateTarget``), and :data:`PROTOCOL`, the text the conformance guide
(``docs/conformance.md``) points to, is assembled from these docstrings: there is one text.

All arrays are NumPy arrays on input, and anything ``numpy.asarray`` accepts on output. Raise
``NotImplementedError`` for an option combination you do not support (reported "unsupported", not failed).
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any, Protocol, runtime_checkable

#: The exceptions by which a target deliberately refuses non-finite input (see :class:`AggregateTarget`). Anything
#: else it raises on such input (a TypeError from a wrong signature, an IndexError...) is a failure.
REFUSALS = (ValueError, FloatingPointError)


@runtime_checkable
class AggregateTarget(Protocol):
    def aggregate(self, grads: list, *, rule: str, tau: float, rescale: bool, flavour: str | None = None,
                  k: float | None = None) -> list:
        """aggregate(grads, *, rule, tau, rescale, flavour=None, k=None) -> list of arrays
            grads:   list of gradient stacks G_i[K, *shape_i], one per parameter tensor, all of one dtype
                     (float64, float32 or float16) and one K >= 1.
            rule:    "mean" | "and_mask" | "geometric_mean" | "sand_mask".
            tau:     float in [0, 1] (0.0 for "mean"; 1.0 for geometric_mean flavour "paper").
            rescale: bool, per-tensor inverse-sparsity rescaling n / n_kept (a fully masked tensor stays 0).
            flavour: "paper" | "original", passed only with rule="geometric_mean".
            k:       SAND-mask sharpness (float > 0), passed only with rule="sand_mask".
            returns: one aggregated array of shape shape_i per tensor.
            Canonical mask: keep iff |sum_e sign(G[e, j])| >= ceil(tau*K - 1e-9), sign(0) = 0.
            Non-finite input (NaN or inf in one environment): either refuse it by raising ValueError or
            FloatingPointError (the suite checks that the same call with finite values succeeds), or return a
            non-finite value at each affected component. Any other exception, or a finite value there, fails.
        """


@runtime_checkable
class EnvGradientsTarget(Protocol):
    def env_gradients(self, spec: dict, params: list, X: Any, Y: Any, *, loss: str, semantics: str) -> list:
        """env_gradients(spec, params, X, Y, *, loss, semantics) -> list of arrays
            spec:      an MLP: a dict with the fields of hardtovary.reference.mlp.MLPSpec (in_features, hidden
                       (tuple), out_features, activation ("leaky_relu"|"relu"|"tanh"), negative_slope, batch_norm,
                       bn_eps); or a convolutional network: {"kind": "convnet", "in_channels": C, "layers": [...]},
                       hardtovary.reference.convnet.NetSpec.to_dict() (Conv2d, BatchNorm2d, ReLU, MaxPool2d,
                       global max/avg pooling, Flatten, Linear, Scale, Residual; each parameterised layer named by
                       its torch module path; NetSpec.from_dict reads it back, accel.torch.models.from_spec builds
                       it in torch).
            params:    list of float64 arrays in the model's parameter order (MLP: nn.Sequential order, W[out, in],
                       b[out], [gamma, beta], ..., W_out, b_out; convnet: convnet.param_names(spec), conv weights
                       [out, in, kh, kw]).
            X:         float64 [K, B, in_features] (MLP) or [K, B, C, H, W] (convnet).
            Y:         targets for logits [K, B, out]: [K, B] float for "bce_with_logits"; [K, B] int64 class
                       indices or [K, B, out] float probability rows (soft targets) for "cross_entropy";
                       [K, B, out] float for "mse". A convnet takes "cross_entropy".
            loss:      "bce_with_logits" | "cross_entropy" | "mse";  L_e is the MEAN loss over environment e's B rows.
            semantics: "pooled" (BatchNorm statistics over all K*B rows) | "per_env" (over each environment's rows).
                       Per-example gradients are K = N environments of B = 1 image, pooled.
            returns:   one stack [K, *param_shape] per parameter, G[e] = dL_e/dtheta (training-mode BatchNorm;
                       ReLU'(0) = 0; a max-pool window's gradient goes to its first maximum in row-major order).
        """


@runtime_checkable
class EvalLogitsTarget(Protocol):
    def eval_logits(self, spec: dict, params: list, X_train: Any, X_eval: Any, *, semantics: str) -> Any:
        """eval_logits(spec, params, X_train, X_eval, *, semantics) -> array [N, classes]
            spec, params as for env_gradients, a convolutional network. One training-mode forward of
            X_train [K, B, C, H, W] updates every BatchNorm2d's running statistics from torch's initial ones (mean
            0, variance 1) with momentum 0.1 (running <- 0.9 running + 0.1 batch, the unbiased batch variance for
            the variance): "pooled", one forward of all K*B images; "per_env", one forward per environment, in
            order. Then the eval-mode logits of X_eval [N, C, H, W].
        """


@runtime_checkable
class StepTarget(Protocol):
    def step(self, params: list, grads: list, *, rule: str, tau: float, rescale: bool, optimizer: str, lr: float,
             weight_decay: float, weight_decay_order: str, l1: float, momentum: float, state: Any = None) -> tuple:
        """step(params, grads, *, rule, tau, rescale, optimizer, lr, weight_decay, weight_decay_order, l1, momentum,
             state=None) -> (new_params, state)
            One AND-mask training step: aggregate the per-environment stacks `grads` (list of [K, *shape]) with
            `rule` ("mean" | "and_mask"), tau, rescale; then add l1 * sign(theta) (AFTER masking: never masked);
            then one optimizer step: optimizer "adam" (betas 0.9, 0.999, eps 1e-8) or "sgd" (momentum, dampening
            0), with weight_decay applied "before" (coupled L2 added to the masked gradient, inside the optimizer)
            or "after" (decoupled, theta *= 1 - lr*weight_decay, as torch.optim.AdamW). `state` is opaque: None on
            the first call, then whatever the previous call returned.
        """


@runtime_checkable
class StepsTarget(Protocol):
    def steps(self, params: list, grad_sequence: list, **options: Any) -> list:
        """steps(params, grad_sequence, *, <the keywords of step, without state>) -> list of params after each step
            Offered instead of step: the whole sequence of steps in one call.
        """


@runtime_checkable
class TemporalTarget(Protocol):
    def temporal(self, params: list, grad_sequence: list, *, lr: float, beta1: float, beta2: float, beta3: float,
                 tau: float, eps: float, bias_correction: bool) -> list:
        """temporal(params, grad_sequence, *, lr, beta1, beta2, beta3, tau, eps, bias_correction) -> list of params
            Algorithm 1 (temporal AND-mask Adam) from zero state, one gradient list (one environment) per step:
            m, v, a EMAs (a of sign(g), sign(0) = 0), mask b = |a| >= tau on m only,
            theta -= lr*(m*b)/(sqrt(v)+eps); no bias correction unless asked. Returns the parameters after each
            step.
        """


@runtime_checkable
class SpiralsTarget(Protocol):
    def spirals(self, n_examples: int, n_revolutions: float, env: int | str, n_envs: int, n_dims: int,
                seed: int) -> tuple:
        """spirals(n_examples, n_revolutions, env, n_envs, n_dims, seed) -> (X, y)
            The spirals dataset, bit-identical to hardtovary.reference.data.spirals (float32 X [n, 2+n_dims],
            y [n]); env an int in [0, n_envs) or "test".
        """


#: The callables a target may offer, each with the protocols that provide it (``step`` or ``steps``).
CALLABLES: dict[str, tuple[type, ...]] = {
    "aggregate": (AggregateTarget,),
    "env_gradients": (EnvGradientsTarget,),
    "eval_logits": (EvalLogitsTarget,),
    "step": (StepTarget, StepsTarget),
    "temporal": (TemporalTarget,),
    "spirals": (SpiralsTarget,),
}


def _method_text(protocol: type) -> str:
    """The method's docstring: its signature line, then the rest indented by four spaces."""
    (name,) = [n for n in vars(protocol) if not n.startswith("_")]
    first, _, rest = inspect.cleandoc(getattr(protocol, name).__doc__).partition("\n")
    return first + "\n" + "\n".join("    " + line for line in rest.splitlines())


PROTOCOL = "\n\n".join(
    [textwrap.fill("Target protocol (hardtovary.conformance). " + " ".join(__doc__.split("\n\n", 2)[2].split()),
                   width=110)]
    + ["\nor, instead of step:\n".join(_method_text(p) for p in protocols) for protocols in CALLABLES.values()])


def offered(target) -> dict[str, bool]:
    """Which protocol callables the target offers (``step`` counts when ``steps`` is offered)."""
    return {name: any(callable(getattr(target, method, None)) for p in protocols
                      for method in vars(p) if not method.startswith("_"))
            for name, protocols in CALLABLES.items()}


def method_names() -> list[str]:
    """Every method name of the protocol (``steps`` included)."""
    return sorted({m for protocols in CALLABLES.values() for p in protocols for m in vars(p) if not m.startswith("_")})
