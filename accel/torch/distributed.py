"""The rules of :mod:`.rules` over ``torch.distributed``: environments sharded across ranks, and a DDP comm hook.

One model trained on many processes (GPUs, nodes). Rank r holds ``K_r`` of the K environments (any split, ``K_r = 0``
included) and computes their gradient stacks ``G[K_r, *shape]`` with the existing engines
(:func:`.env_gradients.env_gradients`); the rule is then applied to all K environments as if they were on one
process.

Packed mode (the default). The rules of the paper are functions of per-component sums over environments, so each
rank sums its own environments and **one** ``all_reduce`` per step adds the partial sums, all parameters packed into
one buffer in the rules' compute dtype (float32 for float16/bfloat16/float32 gradients, float64 for float64 ones):

==========================  ==============================================  ============================
rule                        statistics per component (summed over envs)     float32 bytes per parameter
==========================  ==============================================  ============================
``mean``                    ``sum g``                                       4 (as plain DDP)
``and_mask``  (paper §2.3)  ``sum g``, ``S = sum sign g``                   8
``geometric_mean`` paper    ``sum log|g|``, ``S``  (paper §2.2, §2.3 (i))   8
``geometric_mean`` original ``sum g``, ``sum log(|g| + 1e-10)``, ``S``      12
==========================  ==============================================  ============================

Three numbers end the buffer: ``K_r`` (so K travels with the statistics), whether the rank's stacks hold a
non-finite entry, and the sum of the rank's per-environment losses. The sign sums and K are integers, exact in
float32 up to 2^24 (float64: 2^53), so **masks are bit-identical** to the single-process rule: the keep test is the
same function of the same integers (:func:`.rules._and_mask_from`, :func:`.rules._geometric_mean_from`, the keep
threshold of :class:`~hardtovary.reference.rules.RuleSpec`). Values are ``sum / K`` where the single-process rule
takes ``mean`` (on the CPU torch's mean is that same division): the float sums add the environments in another order
(within a rank, then across ranks), so values agree to rounding, ``|a - b| <= 1e-6 * (|b| + c * mean_e|g_e|)`` in
float32 (c the rescaling factor, 1 without), and are bit-identical for K = 2 (one addition, commutative). One
exception to the bound: the original geometric mean takes the sign of the arithmetic mean, which can differ where
that mean is within rounding of 0 (as it can between two orders of the environments on one process). Per-tensor
rescaling (paper App. B.3.1) needs no communication: the mask is identical on every rank.

Exact mode (``exact=True``; always for a rule without packed statistics: the SAND-mask needs the variance, and any
rule registered later). The shard sizes are all-gathered, then the stacks (padded to the largest shard), and the
single-process :func:`.rules.aggregate` runs on the K environments in rank order on every rank: bit-identical to one
process holding them, at ``K * itemsize`` bytes per parameter and two collectives.

DDP comm hook (:func:`and_mask_hook`, :func:`register_and_mask_hook`): for a DDP script with one environment per
rank (K = world size). Each bucket's gradients ``g`` become ``[g, sign g]`` (AND-mask; paper geometric mean:
``[log|g|, sign g]``; original: three blocks), one ``all_reduce`` per bucket, then the rule and per-tensor rescaling
on the boundaries of ``bucket.parameters()``. Its statistics are those of the packed mode, computed on the bucket as
one environment. This module does not use ``from __future__ import annotations``: DDP refuses a hook whose
annotations are strings.

BatchNorm. Per-environment statistics (``semantics="per_env"``, DomainBed) shard exactly: each environment's batch
is normalised by its own statistics wherever it lives; it is the default of :func:`and_mask_backward`, and what a
DDP forward does with one environment per rank. Pooled statistics over all environments across ranks (the authors'
``pooled``) are **not offered**: they need the statistics and their backward across ranks (SyncBatchNorm and a
per-environment cross-rank backward), so ``semantics="pooled"`` with training-mode BatchNorm on more than one rank
raises ValueError. Running statistics are each rank's own: every rank updates them with its own environments
(``per_env``: one no-grad forward per environment), not with all K as one process would; DDP's default
``broadcast_buffers=True`` overwrites them at every forward with rank 0's. Evaluate on one rank, knowing that its
running statistics are those of its own environments.

Errors. Arguments are checked locally before any collective (a rank that raises there leaves the others waiting in
the collective until the group's timeout, as any torch.distributed program). What depends on other ranks' data
(non-finite gradients anywhere, K = 0 in total) is decided after the collective, on every rank alike, so every
rank raises a ValueError (a rank with a non-finite entry names it; the others say how many ranks have one). The
comm hook cannot raise (an exception in a DDP hook leaves the process group unusable): components whose reduced
statistics are not finite come out NaN on every rank, as plain DDP propagates them.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from hardtovary.reference.rules import RuleSpec, aggregate_arguments, rule_options
from hardtovary.reference.validate import integer, positive

from . import rules as _rules
from .env_gradients import env_gradients, has_training_batch_norm
from .optim import write_grads

__all__ = ["all_reduce_aggregate", "and_mask_backward", "broadcast_parameters", "shard", "PACKED", "PackedRule",
           "AndMaskHookState", "and_mask_hook", "register_and_mask_hook"]


# ----------------------------------------------------------------------------------------------------------------
# The rules as sums over environments
# ----------------------------------------------------------------------------------------------------------------


class PackedRule(NamedTuple):
    """A rule that is a function of per-component sums over environments.

    - ``sums(G, spec)``: the sums over the environments of one stack ``G[K_r, *shape]`` (K_r >= 0), a list of
      tensors of shape ``[*shape]`` in the compute dtype; sums over disjoint sets of environments add.
    - ``finish(sums, K, spec)``: ``(value, mask)`` from the sums over all K environments, the same function of them
      as the single-process rule.
    """

    sums: Callable
    finish: Callable


def _sum(G: torch.Tensor) -> torch.Tensor:
    return G.to(_rules.compute_dtype(G.dtype)).sum(dim=0)


def _mean_finish(sums, K: int, spec: RuleSpec):
    mean = sums[0] / K
    return mean, torch.ones_like(mean, dtype=torch.bool)


def _and_mask_finish(sums, K: int, spec: RuleSpec):
    total, S = sums
    return _rules._and_mask_from(S, total / K, K, spec)


def _geometric_mean_sums(G: torch.Tensor, spec: RuleSpec):
    logs = _rules._log_magnitudes(G, spec.flavour).sum(dim=0)
    if spec.flavour == "paper":
        return [logs, _rules._sign_sum(G)]
    return [_sum(G), logs, _rules._sign_sum(G)]


def _geometric_mean_finish(sums, K: int, spec: RuleSpec):
    if spec.flavour == "paper":
        (logs, S), mean = sums, None
    else:
        total, logs, S = sums
        mean = total / K
    return _rules._geometric_mean_from(S, logs / K, mean, K, spec)


#: The rules with packed statistics (module docstring); any other rule takes the exact route.
PACKED = {
    "mean": PackedRule(lambda G, spec: [_sum(G)], _mean_finish),
    "and_mask": PackedRule(lambda G, spec: [_sum(G), _rules._sign_sum(G)], _and_mask_finish),
    "geometric_mean": PackedRule(_geometric_mean_sums, _geometric_mean_finish),
}


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def _group_size(group) -> int:
    """The number of ranks of ``group`` (None: the default group), after checking that torch.distributed is
    initialised and that this rank belongs to the group."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialised; call torch.distributed.init_process_group "
                         "first (under torchrun: init_process_group('nccl' or 'gloo') reads the environment)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    size = dist.get_world_size(group)
    if size < 1:
        raise ValueError(f"group: rank {dist.get_rank()} is not a member of the process group it was given")
    return size


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def shard(n_envs: int, rank: int, world_size: int) -> slice:
    """The environments of ``rank`` when ``n_envs`` are split over ``world_size`` ranks: contiguous blocks in rank
    order, the first ``n_envs % world_size`` ranks holding one more (a rank holds none when n_envs < world_size).
    Concatenating the shards in rank order gives ``range(n_envs)``, the order the exact mode gathers them in."""
    n_envs = integer(n_envs, "n_envs", low=0)
    world_size = integer(world_size, "world_size", low=1)
    rank = integer(rank, "rank", low=0, high=world_size - 1)
    base, extra = divmod(n_envs, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


# ----------------------------------------------------------------------------------------------------------------
# Combining the shards
# ----------------------------------------------------------------------------------------------------------------


def _no_environment() -> ValueError:
    return ValueError("grads: every rank of the group holds zero environments (K = 0 in total); at least one rank "
                      "must hold one")


def _raise_non_finite(stacks, n_bad: int) -> None:
    """Raise on every rank once the collective has told how many ranks hold non-finite gradients: the exact message
    (parameter, first index) where they are local, a pointer to the other ranks elsewhere."""
    for i, G in enumerate(stacks):
        _rules._finite(G, f"grads[{i}]")
    raise ValueError(f"grads must be finite on every rank, but {n_bad} other rank(s) of the group hold non-finite "
                     "entries (each of them names its first one)")


def _reduce(stacks, spec: RuleSpec, rescale: bool, group, losses):
    """Packed mode: one all_reduce of every parameter's sums and the tail ``[K_r, non-finite, sum of losses]``.
    Returns ``(aggregated, masks, mean loss)``."""
    packed = PACKED[spec.rule]
    sums = [packed.sums(G, spec) for G in stacks]
    dtype = sums[0][0].dtype
    # no host sync here: the flag travels in the buffer, and every rank reads all tails in one sync afterwards
    non_finite = torch.stack([~torch.isfinite(G).all() for G in stacks]).any()
    tail = torch.stack([torch.tensor(stacks[0].shape[0], dtype=dtype, device=non_finite.device),
                        non_finite.to(dtype), losses.to(dtype).sum()])
    buffer = torch.cat([s.reshape(-1) for per_parameter in sums for s in per_parameter] + [tail])
    dist.all_reduce(buffer, group=group)
    K, n_bad, loss_sum = buffer[-3:].tolist()
    K = int(K)
    if n_bad:
        _raise_non_finite(stacks, int(n_bad))
    if K == 0:
        raise _no_environment()
    if K > 2 / torch.finfo(dtype).eps:  # 2^24 (float32): beyond it sums of signs may round, masks would not be exact
        raise ValueError(f"grads: K = {K} environments exceed the integers {dtype} holds exactly (sign sums); use "
                         "exact=True or float64 gradients")

    aggregated, masks, offset = [], [], 0
    for G, per_parameter in zip(stacks, sums):
        n = per_parameter[0].numel()
        reduced = [buffer[offset + j * n:offset + (j + 1) * n].view(G.shape[1:]) for j in range(len(per_parameter))]
        offset += len(per_parameter) * n
        value, mask = packed.finish(reduced, K, spec)
        if rescale:
            value = _rules._rescale(value, mask)
        aggregated.append(value.to(G.dtype))
        masks.append(mask)
    return aggregated, masks, loss_sum / K


def _gather(stacks, group, size: int, losses):
    """Exact mode: the stacks of every rank, concatenated in rank order (``[K, *shape]`` each, the gradients'
    dtype), and the K losses. Two collectives: the shard sizes, then the shards padded to the largest."""
    K_r, device = stacks[0].shape[0], stacks[0].device
    sizes = [G.shape[1:].numel() for G in stacks]
    rows = torch.cat([G.reshape(K_r, n) for G, n in zip(stacks, sizes)]
                     + [losses.to(stacks[0].dtype).reshape(K_r, 1)], dim=1)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([K_r], dtype=torch.int64, device=device), group=group)
    counts = [int(c) for c in torch.cat(counts).tolist()]
    if sum(counts) == 0:
        raise _no_environment()
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[:K_r] = rows
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    rows = torch.cat([part[:count] for part, count in zip(parts, counts)])
    full, offset = [], 0
    for G, n in zip(stacks, sizes):
        full.append(rows[:, offset:offset + n].reshape(rows.shape[0], *G.shape[1:]))
        offset += n
    return full, rows[:, -1]


def _combine(local_stacks, spec: RuleSpec, rescale: bool, group, exact: bool, losses=None):
    size = _group_size(group)
    stacks = _rules._validate_gradient_list(local_stacks, allow_empty=True)
    if losses is None:
        losses = stacks[0].new_zeros(stacks[0].shape[0])
    if exact or spec.rule not in PACKED:
        full, all_losses = _gather(stacks, group, size, losses)
        aggregated, masks = _rules.aggregate(full, spec, rescale=rescale)
        return aggregated, masks, all_losses.mean()
    return _reduce(stacks, spec, rescale, group, losses)


def all_reduce_aggregate(local_stacks, spec=None, *, group=None, exact=False, rescale=False, rule=None, tau=None,
                         flavour=None, k=None):
    """:func:`.rules.aggregate` over the environments of every rank of ``group`` (None: the default group).

    ``local_stacks``: this rank's list of stacks ``G[K_r, *shape_i]``, one per parameter tensor, the same shapes and
    dtype on every rank; ``K_r`` may differ between ranks and may be 0 on some (not on all). The rule is ``spec``
    (a ``RuleSpec``) or ``rule``/``tau``/``flavour``/``k``, with ``rescale``, validated as the single-process
    ``aggregate`` does (:func:`hardtovary.reference.rules.aggregate_arguments`). ``exact=False``: one all_reduce of
    the packed statistics; ``exact=True`` (and always for the SAND-mask): all_gather and the single-process rule
    (module docstring). Every rank must make the same call.

    Returns ``(aggregated, masks)`` as :func:`.rules.aggregate` for the K environments (values in the gradients'
    dtype; masks bool, the SAND-mask's soft mask in the gradients' dtype), identical on every rank.
    """
    spec, rescale = aggregate_arguments(rule, tau, rescale, flavour, k, spec=spec)
    aggregated, masks, _ = _combine(local_stacks, spec, rescale, group, _flag(exact, "exact"))
    return aggregated, masks


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def and_mask_backward(model: nn.Module, X, Y, loss_fn, *, rule: str = "and_mask", tau=1.0, rescale=False,
                      flavour=None, k=None, spec: RuleSpec | None = None, semantics: str = "per_env", l1=0.0,
                      group=None, exact=False, **engine_options):
    """:func:`.optim.and_mask_backward` with the environments sharded over the ranks of ``group``: this rank's
    environment batches ``X[K_r, B, ...]``, ``Y[K_r, B, ...]`` (``K_r = 0`` allowed on some ranks), their gradients
    by :func:`.env_gradients.env_gradients`, the rule over all K environments (:func:`all_reduce_aggregate`, packed
    or ``exact``), ``l1 * sign(theta)`` added after masking, written into ``.grad`` on every rank alike. The model
    must hold the same parameters on every rank (:func:`broadcast_parameters` at start-up).

    ``semantics`` defaults to ``"per_env"``, which shards exactly; ``"pooled"`` with training-mode BatchNorm on more
    than one rank raises ValueError (module docstring). Returns ``(mean_loss, masks)``: the mean of the K
    environment losses (0-d tensor, the same on every rank) and one mask per parameter.
    """
    l1 = positive(l1, "l1", allow_zero=True)
    exact = _flag(exact, "exact")
    size = _group_size(group)
    spec = spec if spec is not None else RuleSpec(rule, **rule_options(rule, tau, flavour, k))
    if semantics == "pooled" and size > 1 and has_training_batch_norm(model):
        raise ValueError("semantics='pooled' with training-mode BatchNorm is not offered across ranks (the "
                         "statistics and their backward would span ranks); use semantics='per_env'")
    if isinstance(X, torch.Tensor) and isinstance(Y, torch.Tensor) and X.dim() >= 2 and X.shape[0] == 0:
        # a rank without environments takes part in the collective with empty stacks
        params = [p for p in model.parameters() if p.requires_grad]
        stacks = [p.new_zeros((0, *p.shape)) for p in params]
        losses = X.new_zeros(0)
    else:
        out = env_gradients(model, X, Y, loss_fn, semantics=semantics, **engine_options)
        stacks, losses = out.grads, out.losses
    aggregated, masks, loss = _combine(stacks, spec, rescale, group, exact, losses)
    write_grads(model, aggregated, l1)
    return torch.as_tensor(loss, dtype=losses.dtype), masks


@torch.no_grad()
def broadcast_parameters(model: nn.Module, group=None, src: int = 0) -> nn.Module:
    """Copy the parameters and buffers of rank ``src`` (a global rank; default 0) into ``model`` on every rank of
    ``group``: the start-up step that makes every rank hold the same model. Returns ``model``."""
    _group_size(group)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor, src, group=group)
    return model


# ----------------------------------------------------------------------------------------------------------------
# DDP comm hook: one environment per rank
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AndMaskHookState:
    """What :func:`and_mask_hook` needs: the rule (a ``RuleSpec`` with packed statistics: mean, and_mask,
    geometric_mean), per-tensor ``rescale``, the process group (None: the default group) and its size K (one
    environment per rank). Build it with :meth:`create` or :func:`register_and_mask_hook`."""

    spec: RuleSpec
    rescale: bool
    group: object
    n_envs: int

    @classmethod
    def create(cls, spec=None, *, rule=None, tau=None, flavour=None, rescale=False, group=None):
        """Validate the rule as :func:`all_reduce_aggregate` does; the SAND-mask (it needs the variance, which no
        sum of a bucket carries) raises ValueError."""
        spec, rescale = aggregate_arguments(rule, tau, rescale, flavour, None, spec=spec)
        if spec.rule not in PACKED:
            raise ValueError(f"rule {spec.rule!r} has no packed statistics for the DDP hook (it takes "
                             f"{sorted(PACKED)}); use and_mask_backward(..., exact=True) instead")
        return cls(spec, rescale, group, _group_size(group))


def and_mask_hook(state: AndMaskHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the rule of ``state`` over one environment per rank.

    The bucket's flat gradient ``g[n]`` (this rank's environment) becomes the packed statistics (``[g, sign g]`` for
    the AND-mask, ``[log|g|, sign g]`` for the paper's geometric mean; module docstring), one asynchronous
    all_reduce, then the rule with K = ``state.n_envs`` and, with ``state.rescale``, per-tensor rescaling on the
    boundaries of ``bucket.parameters()`` (which lie back to back in the bucket, in that order, whatever buckets DDP
    rebuilds). Non-finite statistics give NaN in those components on every rank (a hook cannot raise).
    """
    flat = bucket.buffer()
    packed = PACKED[state.spec.rule]
    sums = packed.sums(flat[None], state.spec)
    n, n_stats = flat.numel(), len(sums)
    future = dist.all_reduce(torch.cat(sums), group=state.group, async_op=True).get_future()

    def finish(done) -> torch.Tensor:
        reduced = done.value()[0].view(n_stats, n)
        value, mask = packed.finish(list(reduced), state.n_envs, state.spec)
        if state.rescale:
            sizes = [p.numel() for p in bucket.parameters()]
            value = torch.cat([_rules._rescale(v, m) for v, m in zip(value.split(sizes), mask.split(sizes))])
        value = torch.where(torch.isfinite(reduced).all(dim=0), value, torch.nan)
        return value.to(flat.dtype)

    return future.then(finish)


def register_and_mask_hook(ddp_model, spec=None, *, rule=None, tau=None, flavour=None, rescale=False):
    """Register :func:`and_mask_hook` on ``ddp_model`` (a ``DistributedDataParallel``) over its process group, once,
    before the first backward (DDP's rule). Returns the :class:`AndMaskHookState`."""
    if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got "
                        f"{type(ddp_model).__name__}")
    state = AndMaskHookState.create(spec, rule=rule, tau=tau, flavour=flavour, rescale=rescale,
                                    group=ddp_model.process_group)
    ddp_model.register_comm_hook(state, and_mask_hook)
    return state
