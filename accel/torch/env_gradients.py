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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vjp, vmap

SEMANTICS = ("pooled", "per_env")

__all__ = ["EnvGradients", "env_gradients", "example_gradients", "has_training_batch_norm", "SEMANTICS",
           "POOLED_METHODS"]


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
) -> EnvGradients:
    """Per-environment gradients ``G[e] = dL_e/dtheta`` of environment batches ``X[K, B, ...]``, ``Y[K, B, ...]``
    (module docstring). ``loss_fn(logits, targets)`` must mean-reduce over the batch and be vmap-compatible (e.g.
    ``F.binary_cross_entropy_with_logits``, ``F.cross_entropy``). The model's mode (train / eval) is respected.

    ``chunk_size`` bounds how many environments one vmap call processes (memory); ``pooled_method`` chooses the
    exact engine for pooled BatchNorm (module docstring); ``update_running_stats``
    (per_env only) updates BatchNorm running statistics as K separate forwards would; ``force_coupled`` runs the
    exact pooled engine even without training-mode BatchNorm.
    """
    _check(model, X, Y, loss_fn, semantics)
    named = _params(model)
    if semantics == "pooled" and (force_coupled or has_training_batch_norm(model)):
        if pooled_method not in POOLED_METHODS:
            raise ValueError(f"pooled_method must be one of {list(POOLED_METHODS)}, got {pooled_method!r}")
        method = _resolve_pooled_method(pooled_method, X.device)
        return _pooled(model, X, Y, loss_fn, named, chunk_size=chunk_size, method=method)
    return _per_env(model, X, Y, loss_fn, named, update_running_stats=update_running_stats, chunk_size=chunk_size)


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
