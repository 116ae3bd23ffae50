"""Per-environment and per-example gradient engines (torch.func).

``env_gradients(model, X[K, B, ...], Y[K, B, ...], loss_fn, semantics=...)`` returns, for every parameter of
``model`` that requires grad (in ``model.parameters()`` order), the stack ``G[K, *param.shape]`` with
``G[e] = dL_e/dtheta``, ``L_e = loss_fn(model(X[e]), Y[e])`` (``loss_fn`` mean-reduces over a batch), and the
losses ``[K]``. The two semantics of :mod:`hardtovary.reference.mlp` (``docs/conventions.md``):

``"per_env"``
    BatchNorm statistics per environment (DomainBed). One ``vmap(grad)`` over the environment axis: the K
    gradients cost about one forward + backward of the stacked batch. Inside vmap BatchNorm runs in training mode
    *without* running-statistics updates (the modules' ``track_running_stats`` is switched off for the call, so
    ``F.batch_norm`` receives no running buffers); afterwards, when ``update_running_stats`` is true and the model
    has BatchNorm in training mode, the running statistics are updated separately by K no-grad forwards, one per
    environment in environment order (the same K updates as K separate torch forwards, and as
    ``reference.mlp.update_running_stats``; about a third of the step's cost, only with BatchNorm).

``"pooled"``
    One forward over the stacked batch ``[K*B, ...]`` (the authors' code); BatchNorm statistics over all K*B rows,
    running statistics updated once by that forward, as in the authors' training loop. ``G[e]`` is the gradient
    of ``L_e`` *through the shared statistics*, so every environment's gradient touches every row: K backward
    passes through the shared graph are unavoidable for an exact result (O(K^2 B) work: the statistics spread
    each cotangent densely over every row). ``pooled_method`` picks how: ``"loop"`` (K ``autograd.grad`` calls
    on the retained graph of the loss vector), ``"batched"`` (one ``autograd.grad(losses, params,
    grad_outputs=eye(K), is_grads_batched=True)``, in chunks of ``chunk_size`` rows to bound memory),
    ``"vjp_vmap"`` (``vmap`` over ``torch.func.vjp`` of the loss vector), or ``"auto"`` (the loop on CPU, where it
    measured fastest; batched elsewhere). All are exact and tested against the oracle. Without BatchNorm in
    training mode the environments do not interact, the
    two semantics coincide, and the cheap ``per_env`` path is used.

``example_gradients(model, X[N, ...], Y[N, ...], ...)`` treats every example as its own environment (K = N,
B = 1; the authors' CIFAR-10 setting, ``pooled`` BatchNorm statistics over the N examples).

Models with other row-coupling layers than BatchNorm are not detected: pass ``force_coupled=True`` to run the exact
pooled engine for them.

Engines for rows that do not interact (no training-mode BatchNorm), chosen by ``engine``:

``"vmap"``
    the ``vmap(grad)`` above, for any model.
``"linear"``
    for an ``nn.Sequential`` of ``nn.Linear`` and ReLU / LeakyReLU / Tanh modules (exactly those types, without
    hooks) and ``X[K, B, features]``: one forward over the stacked batch, the cotangent of each environment's
    logits (``vmap(grad(loss_fn))``), then a hand-written backward: ``d @ W`` down the layers, the per-environment
    weight gradients as one ``bmm`` of each layer's cotangents and inputs (``[K, out, B] @ [K, B, in]``), the bias
    gradients as sums over B. That is the work of one plain backward, with no autograd graph or vmap in the loop.
    The activations' backward kernels are those autograd runs, so the cotangents are autograd's; the stacks differ
    from the other engines' only by the order of the sums inside the matrix products. The intermediates live in a
    workspace kept per model (and thread) while the model lives, reused by the next call of the same shapes
    (fresh multi-megabyte buffers cost page faults on every step otherwise): one forward pass's activations and
    two cotangent buffers.
``"auto"``
    ``linear`` where it applies and ``chunk_size`` is None, else ``vmap``.

``compile`` (None, or a ``torch.compile`` mode) compiles the linear engine (its intermediates are then left to the
compiler, not the workspace). The first call compiles (seconds), and every new architecture, loss function, dtype
or shape compiles again, within torch.compile's limit of recompiles. On a GPU ``"reduce-overhead"`` replays the
step as a CUDA graph, which removes the kernel-launch latency that bounds a small step there
(``docs/benchmarks.md``); a call's results are then overwritten by the next call: clone what you keep. Where
``torch.compile`` is unavailable the engine runs eagerly, with a ``RuntimeWarning`` that says why.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vjp, vmap

SEMANTICS = ("pooled", "per_env")

__all__ = ["EnvGradients", "env_gradients", "example_gradients", "has_training_batch_norm", "linear_plan", "SEMANTICS",
           "POOLED_METHODS", "ENGINES", "COMPILE_MODES"]


class EnvGradients(NamedTuple):
    """``grads``: list of stacks ``[K, *param.shape]`` in parameter order (params that require grad);
    ``losses``: ``[K]`` per-environment mean losses (detached)."""

    grads: list
    losses: torch.Tensor


def _batch_norms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_training_batch_norm(model: nn.Module) -> bool:
    """Whether some BatchNorm module of ``model`` normalises with batch statistics (training mode, or no
    running statistics), i.e. whether the rows of a batch interact."""
    return any(m.training or m.running_mean is None for m in _batch_norms(model))


@contextlib.contextmanager
def _no_running_stat_updates(model: nn.Module):
    """Training-mode BatchNorm without running-statistics updates: ``F.batch_norm`` gets no running buffers."""
    modules = [m for m in _batch_norms(model) if m.training and m.track_running_stats]
    for m in modules:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in modules:
            m.track_running_stats = True


def _check(model, X, Y, loss_fn, semantics):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor):
        raise TypeError(f"X and Y must be torch.Tensor, got {type(X).__name__} and {type(Y).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (logits, targets) -> scalar, got {type(loss_fn).__name__}")
    if not isinstance(semantics, str) or semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {list(SEMANTICS)}, got {semantics!r}")
    if X.dim() < 2 or Y.dim() < 2:
        raise ValueError(
            f"X and Y must be environment batches [K, B, ...], got shapes {tuple(X.shape)} and {tuple(Y.shape)}"
        )
    if X.shape[:2] != Y.shape[:2]:
        raise ValueError(
            f"X and Y must share the leading [K, B] axes, got X {tuple(X.shape)} and Y {tuple(Y.shape)}"
        )
    K, B = X.shape[:2]
    if K < 1 or B < 1:
        raise ValueError(f"X must hold K >= 1 environments of B >= 1 examples, got shape {tuple(X.shape)}")
    if has_training_batch_norm(model) and X.ndim == 3:
        # one feature vector per example (BatchNorm1d): statistics need two rows. Images ([K, B, C, H, W]) have
        # H*W values per channel and example, and torch's BatchNorm2d judges them itself.
        if semantics == "per_env" and B < 2:
            raise ValueError(
                "semantics='per_env' with training-mode BatchNorm needs B >= 2 examples per environment, got B = 1"
            )
        if K * B < 2:
            raise ValueError(f"training-mode BatchNorm needs at least 2 rows (K * B >= 2), got K = {K}, B = {B}")


def _params(model: nn.Module):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter that requires grad")
    return named


def _per_env(model, X, Y, loss_fn, named, *, update_running_stats: bool, chunk_size) -> EnvGradients:
    names = [n for n, _ in named]
    params = {n: p.detach() for n, p in named}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def env_loss(p, x, y):
        out = functional_call(model, ({**p, **frozen}, buffers), (x,))
        return loss_fn(out, y)

    with _no_running_stat_updates(model):
        grads, losses = vmap(grad_and_value(env_loss), in_dims=(None, 0, 0), randomness="different",
                             chunk_size=chunk_size)(params, X, Y)
    if update_running_stats and any(m.training and m.track_running_stats for m in _batch_norms(model)):
        with torch.no_grad():
            for e in range(X.shape[0]):
                model(X[e])
    return EnvGradients([grads[n] for n in names], losses.detach())


POOLED_METHODS = ("auto", "batched", "vjp_vmap", "loop")


def _resolve_pooled_method(method: str, device: torch.device) -> str:
    """``"auto"``: the loop on CPU, where the vmapped backward of batched cotangents is slower for the BatchNorm
    MLP and FastResNet (``bench/bench_torch_env_gradients.py``); the batched ``is_grads_batched`` backward on
    accelerators, where one launch replaces K."""
    if method != "auto":
        return method
    return "loop" if device.type == "cpu" else "batched"


def _pooled(model, X, Y, loss_fn, named, *, chunk_size, method: str = "batched") -> EnvGradients:
    K, B = X.shape[:2]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    flat = X.reshape(K * B, *X.shape[2:])
    if method == "vjp_vmap":
        # functional forward without running-stat updates (in-place buffer updates are not allowed inside a
        # torch.func transform), then one no-grad forward to update them once, as the pooled forward would.
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        buffers = dict(model.named_buffers())

        def loss_vector(p):
            out = functional_call(model, ({**p, **frozen}, buffers), (flat,))
            return vmap(loss_fn)(out.reshape(K, B, *out.shape[1:]), Y)

        with _no_running_stat_updates(model):
            losses, vjp_fn = vjp(loss_vector, {n: p.detach() for n, p in named})
            eye = torch.eye(K, dtype=losses.dtype, device=losses.device)
            (grads,) = vmap(vjp_fn, chunk_size=chunk_size)(eye)
        if any(m.training and m.track_running_stats for m in _batch_norms(model)):
            with torch.no_grad():
                model(flat)
        return EnvGradients([grads[n] for n in names], losses.detach())

    with torch.enable_grad():
        out = model(flat)  # one forward over the stacked batch: shared statistics, running stats updated once
        losses = vmap(loss_fn)(out.reshape(K, B, *out.shape[1:]), Y)
    if method == "loop":
        rows = [torch.autograd.grad(losses[e], params, retain_graph=e < K - 1, allow_unused=True) for e in range(K)]
        stacks = [torch.stack([torch.zeros_like(p) if r[i] is None else r[i] for r in rows]) for i, p in
                  enumerate(params)]
        return EnvGradients(stacks, losses.detach())
    eye = torch.eye(K, dtype=losses.dtype, device=losses.device)
    stacks = []
    if chunk_size is None or chunk_size >= K:
        grads = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        stacks = [torch.zeros((K, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
                  for g, p in zip(grads, params)]
    else:
        parts = []
        for start in range(0, K, chunk_size):
            rows = eye[start:start + chunk_size]
            last = start + chunk_size >= K
            g = torch.autograd.grad(losses, params, grad_outputs=rows, is_grads_batched=True, allow_unused=True,
                                    retain_graph=not last)
            parts.append([torch.zeros((rows.shape[0], *p.shape), dtype=p.dtype, device=p.device) if x is None else x
                          for x, p in zip(g, params)])
        stacks = [torch.cat([part[i] for part in parts]) for i in range(len(params))]
    return EnvGradients(stacks, losses.detach())


ENGINES = ("auto", "linear", "vmap")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

_aten = torch.ops.aten


# The activations of the linear engine: forward ``(z, slope, out) -> a`` and backward ``(grad, x, slope,
# x_is_output, out) -> grad_z`` from the activation's output ``x = a`` or, where that does not determine the
# derivative (LeakyReLU with a negative slope), its input ``x = z``; each writes into ``out`` (which may be its
# first argument: elementwise, in place), a forward with ``out=None`` (the compiled engine) into a new tensor. The
# kernels are those autograd runs
# for these modules (torch's derivatives.yaml; ATen's relu is clamp_min(z, 0)), and from the output they give the
# same numbers as from the input (a > 0 exactly where z > 0 for a slope >= 0), so the engine's stacks are
# autograd's.
def _relu(z, slope, out):
    return torch.clamp_min(z, 0, out=out)


def _relu_backward(grad, x, slope, x_is_output, out):
    return _aten.threshold_backward.grad_input(grad, x, 0, grad_input=out)


def _leaky_relu(z, slope, out):
    return _aten.leaky_relu(z, slope) if out is None else _aten.leaky_relu.out(z, slope, out=out)


def _leaky_relu_backward(grad, x, slope, x_is_output, out):
    return _aten.leaky_relu_backward.grad_input(grad, x, slope, x_is_output, grad_input=out)


def _tanh(z, slope, out):
    return torch.tanh(z, out=out)


def _tanh_backward(grad, x, slope, x_is_output, out):
    return _aten.tanh_backward.grad_input(grad, x, grad_input=out)


_ACTIVATIONS = {"relu": (_relu, _relu_backward), "leaky_relu": (_leaky_relu, _leaky_relu_backward),
                "tanh": (_tanh, _tanh_backward)}
_ACTIVATION_KINDS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh"}


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def linear_plan(model: nn.Module):
    """The layers of ``model`` as the linear engine runs them, ``(kind, negative_slope)`` per module (kind
    ``"linear"``, ``"relu"``, ``"leaky_relu"`` or ``"tanh"``), or None where that engine does not apply: ``model``
    is not an ``nn.Sequential`` of exactly those module types, or a module hook would be bypassed (the engine calls
    no module, so subclasses, parametrizations and hooks are left to the vmap engine)."""
    global_hooks = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks,
                    nn.modules.module._global_backward_hooks, nn.modules.module._global_backward_pre_hooks)
    if type(model) is not nn.Sequential or _has_hooks(model) or any(global_hooks):
        return None
    plan = []
    for module in model:
        if _has_hooks(module):
            return None
        if type(module) is nn.Linear:
            plan.append(("linear", 0.0))
        elif type(module) in _ACTIVATION_KINDS:
            plan.append((_ACTIVATION_KINDS[type(module)], float(getattr(module, "negative_slope", 0.0))))
        else:
            return None
    return tuple(plan) if any(kind == "linear" for kind, _ in plan) else None


def _linear_engine(plan, weights, biases, trainable, X, Y, loss_fn, buffer, out):
    """Per-environment gradients of the ``nn.Sequential`` described by ``plan`` (module docstring, ``"linear"``):
    ``weights[l]``, ``biases[l]`` (or None) of its l-th Linear, ``trainable[l]`` = (weight, bias) requires grad.
    ``buffer(tag, shape)`` gives the tensor an intermediate is written into, or None for a new one; ``out`` the
    stacks to write into (parameter order), or None. Returns ``(stacks, losses)``, the stacks in parameter order.

    Memory: each Linear's output, overwritten by the activation that follows where the activation's backward
    needs only its output, and two cotangent buffers used in turn."""
    K, B = X.shape[:2]
    positions = [i for i, (kind, _) in enumerate(plan) if kind == "linear"]  # module index of each Linear
    h = X.reshape(K * B, X.shape[2])
    saved = []  # per module: its input (Linear), or what its backward reads and whether that is its output
    for i, (kind, slope) in enumerate(plan):
        if kind == "linear":
            saved.append(h)
            layer = positions.index(i)
            W, b = weights[layer], biases[layer]
            target = buffer(("forward", i), (K * B, W.shape[0]))
            h = torch.mm(h, W.t(), out=target) if b is None else torch.addmm(b, h, W.t(), out=target)
        else:
            from_output = kind != "leaky_relu" or slope >= 0
            # in place only over a Linear's output, which no backward reads; never over X, nor over another
            # activation's output, which that activation's backward may read
            in_place = from_output and i > 0 and plan[i - 1][0] == "linear"
            a = _ACTIVATIONS[kind][0](h, slope, h if in_place else buffer(("forward", i), h.shape))
            saved.append((a if from_output else h, from_output))
            h = a
    d, losses = vmap(grad_and_value(loss_fn))(h.reshape(K, B, *h.shape[1:]), Y)
    d = d.reshape(K * B, -1)
    n_stacks = sum(map(sum, trainable))
    stacks = []  # filled from the last parameter back
    lowest = positions[min(layer for layer, flags in enumerate(trainable) if any(flags))]  # no cotangent below it
    for i in range(len(plan) - 1, lowest - 1, -1):
        kind, slope = plan[i]
        if kind != "linear":
            x, from_output = saved[i]
            d = _ACTIVATIONS[kind][1](d, x, slope, from_output, d)  # in place: d is the engine's own
            continue
        layer = positions.index(i)
        per_env = d.view(K, B, d.shape[1])
        if trainable[layer][1]:
            target = None if out is None else out[n_stacks - 1 - len(stacks)]
            stacks.append(torch.sum(per_env, dim=1, out=target))
        if trainable[layer][0]:
            target = None if out is None else out[n_stacks - 1 - len(stacks)]
            x = saved[i]
            stacks.append(torch.bmm(per_env.transpose(1, 2), x.view(K, B, x.shape[1]), out=target))
        if i > lowest:
            d = torch.mm(d, weights[layer], out=buffer(("backward", layer % 2), (K * B, weights[layer].shape[1])))
    return stacks[::-1], losses


# Workspaces of the eager linear engine: per thread (two threads may run one model), per model while it lives, the
# buffers of the last call's shapes, dtype and device (another call signature replaces them).
_workspaces = threading.local()


def _workspace_buffers(model: nn.Module, X: torch.Tensor, dtype: torch.dtype):
    table = getattr(_workspaces, "table", None)
    if table is None:
        table = _workspaces.table = weakref.WeakKeyDictionary()
    # buffers made in inference mode cannot be written outside it (nor, in place, the other way round)
    signature = (tuple(X.shape), dtype, X.device, torch.is_inference_mode_enabled())
    entry = table.get(model)
    if entry is None or entry[0] != signature:
        entry = table[model] = (signature, {})
    buffers = entry[1]

    def buffer(tag, shape):
        key = (tag, tuple(shape))
        if key not in buffers:
            buffers[key] = torch.empty(shape, dtype=dtype, device=X.device)
        return buffers[key]

    return buffer


def _no_buffer(tag, shape):
    return None


# torch.compile'd linear engines by mode; False where compiling failed (the eager engine runs, once warned)
_compiled: dict = {}


def _compile_unavailable(mode: str, reason: str) -> None:
    _compiled[mode] = False
    warnings.warn(f"compile={mode!r} is unavailable here ({reason}); the linear engine runs eagerly",
                  RuntimeWarning, stacklevel=4)


def _run_compiled(mode: str, *args):
    """The compiled linear engine's result, or None where torch.compile is unavailable (warned once per mode)."""
    if mode not in _compiled:
        if not torch._dynamo.is_dynamo_supported():
            _compile_unavailable(mode, "torch.compile does not support this Python or platform")
        else:
            _compiled[mode] = torch.compile(_linear_engine, mode=mode)
    if _compiled[mode] is False:
        return None
    try:
        return _compiled[mode](*args)
    except torch._dynamo.exc.BackendCompilerFailed as error:  # no C++ compiler, no triton, ...
        inner = error.inner_exception
        _compile_unavailable(mode, f"{type(inner).__name__}: {next(iter(str(inner).splitlines()), '')}")
        return None


def _linear(model, X, Y, loss_fn, plan, *, compile, out) -> EnvGradients:
    linears = [m for m in model if type(m) is nn.Linear]
    weights = [m.weight.detach() for m in linears]
    biases = [None if m.bias is None else m.bias.detach() for m in linears]
    trainable = [(m.weight.requires_grad, m.bias is not None and m.bias.requires_grad) for m in linears]
    args = (plan, weights, biases, trainable, X, Y, loss_fn)
    with torch.no_grad():
        result = None if compile is None else _run_compiled(compile, *args, _no_buffer, None)
        if result is None:
            stacks, losses = _linear_engine(*args, _workspace_buffers(model, X, weights[0].dtype), out)
        else:
            stacks, losses = result
            if out is not None:
                stacks = [target.copy_(g) for target, g in zip(out, stacks)]
    return EnvGradients(stacks, losses.detach())


def env_gradients(
    model: nn.Module,
    X: torch.Tensor,
    Y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    semantics: str = "pooled",
    update_running_stats: bool = True,
    chunk_size: int | None = None,
    force_coupled: bool = False,
    pooled_method: str = "auto",
    engine: str = "auto",
    compile: str | None = None,
    out: list | None = None,
) -> EnvGradients:
    """Per-environment gradients ``G[e] = dL_e/dtheta`` of environment batches ``X[K, B, ...]``, ``Y[K, B, ...]``
    (module docstring). ``loss_fn(logits, targets)`` must mean-reduce over the batch and be vmap-compatible (e.g.
    ``F.binary_cross_entropy_with_logits``, ``F.cross_entropy``). The model's mode (train / eval) is respected.

    ``chunk_size`` bounds how many environments one vmap call processes (memory); ``pooled_method`` chooses the
    exact engine for pooled BatchNorm (module docstring); ``update_running_stats``
    (per_env only) updates BatchNorm running statistics as K separate forwards would; ``force_coupled`` runs the
    exact pooled engine even without training-mode BatchNorm. ``engine`` (``"auto"``, ``"linear"``, ``"vmap"``)
    chooses the engine where rows do not interact, ``compile`` a ``torch.compile`` mode for the linear engine
    (module docstring). ``out``: preallocated stacks, one per parameter that requires grad, each ``[K,
    *param.shape]``, contiguous, in the parameter's dtype and device; the result is written into them (the linear
    engine writes there directly, the others copy) and they are the returned ``grads``.
    """
    _check(model, X, Y, loss_fn, semantics)
    named = _params(model)
    resolved = _resolve_engine(model, X, semantics, engine, compile, chunk_size, force_coupled)
    if out is not None:
        _check_out(out, named, X.shape[0])
    if resolved == "linear":
        return _linear(model, X, Y, loss_fn, linear_plan(model), compile=compile, out=out)
    if resolved == "pooled":
        if pooled_method not in POOLED_METHODS:
            raise ValueError(f"pooled_method must be one of {list(POOLED_METHODS)}, got {pooled_method!r}")
        method = _resolve_pooled_method(pooled_method, X.device)
        result = _pooled(model, X, Y, loss_fn, named, chunk_size=chunk_size, method=method)
    else:
        result = _per_env(model, X, Y, loss_fn, named, update_running_stats=update_running_stats,
                          chunk_size=chunk_size)
    if out is None:
        return result
    return EnvGradients([target.copy_(g) for target, g in zip(out, result.grads)], result.losses)


def _resolve_engine(model, X, semantics, engine, compile, chunk_size, force_coupled) -> str:
    """The engine a call runs: ``"pooled"`` (training-mode BatchNorm pooled, or ``force_coupled``), ``"linear"``
    or ``"vmap"``; validates ``engine`` and ``compile`` (the one place that does)."""
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if compile is not None and (not isinstance(compile, str) or compile not in COMPILE_MODES):
        raise ValueError(f"compile must be None or one of {list(COMPILE_MODES)}, got {compile!r}")
    if semantics == "pooled" and (force_coupled or has_training_batch_norm(model)):
        coupled = "force_coupled=True" if force_coupled else "training-mode BatchNorm (pooled)"
        if engine != "auto" or compile is not None:
            option = f"engine={engine!r}" if engine != "auto" else f"compile={compile!r}"
            raise ValueError(f"{option} applies to rows that do not interact, but this call has {coupled}; its "
                             "engine is chosen by pooled_method")
        return "pooled"
    linear = linear_plan(model) is not None and X.ndim == 3
    if engine == "linear" or compile is not None:
        option = f"engine={engine!r}" if engine == "linear" else f"compile={compile!r}"
        if not linear:
            raise ValueError(f"{option} needs an nn.Sequential of nn.Linear, ReLU, LeakyReLU and Tanh modules "
                             f"without hooks and X of shape [K, B, features], got {type(model).__name__} and X of "
                             f"shape {tuple(X.shape)}")
        if engine == "vmap":
            raise ValueError(f"compile={compile!r} compiles the linear engine, but engine='vmap' was asked")
        if chunk_size is not None:
            raise ValueError(f"chunk_size bounds the vmap engines' memory; {option} runs the linear engine, which "
                             f"has no chunks (got chunk_size={chunk_size!r})")
        return "linear"
    return "linear" if engine == "auto" and linear and chunk_size is None else "vmap"


def _check_out(out, named, K: int) -> None:
    if not isinstance(out, (list, tuple)) or len(out) != len(named):
        raise ValueError(f"out must be a list of {len(named)} tensors (one per parameter that requires grad), got "
                         f"{type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, (list, tuple)) else ""))
    for i, (target, (name, p)) in enumerate(zip(out, named)):
        shape = (K, *p.shape)
        if (not isinstance(target, torch.Tensor) or tuple(target.shape) != shape or target.dtype != p.dtype
                or target.device != p.device or not target.is_contiguous()):
            got = (f"{tuple(target.shape)} {target.dtype} on {target.device}"
                   f"{'' if target.is_contiguous() else ', not contiguous'}" if isinstance(target, torch.Tensor)
                   else type(target).__name__)
            raise ValueError(f"out[{i}] ({name}) must be a contiguous tensor {shape} {p.dtype} on {p.device}, "
                             f"got {got}")


def example_gradients(
    model: nn.Module,
    X: torch.Tensor,
    Y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    semantics: str = "pooled",
    chunk_size: int | None = None,
    pooled_method: str = "auto",
) -> EnvGradients:
    """Per-example gradients: every example of ``X[N, ...]``, ``Y[N, ...]`` is its own environment (K = N,
    B = 1). Equivalent to ``env_gradients(model, X[:, None], Y[:, None], ...)``; with training-mode BatchNorm
    ``pooled`` normalises over the N examples (the authors' CIFAR-10 setting) and ``per_env`` raises."""
    if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor):
        raise TypeError(f"X and Y must be torch.Tensor, got {type(X).__name__} and {type(Y).__name__}")
    if X.dim() < 1 or Y.dim() < 1 or X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have one row per example on axis 0, got shapes {tuple(X.shape)} and {tuple(Y.shape)}"
        )
    return env_gradients(model, X[:, None], Y[:, None], loss_fn, semantics=semantics, chunk_size=chunk_size,
                         pooled_method=pooled_method)
