"""The aggregation rules of :mod:`hardtovary.reference.rules` on torch tensors.

Same semantics, argument rules and edge cases (:mod:`hardtovary.reference.edge_cases`) as the NumPy oracle; see
its module docstring for the formulas. What differs is precision and dtype handling:

- **dtype preserved.** Values come back in the gradients' dtype (float16 in, float16 out; bfloat16 in,
  bfloat16 out). float16 / bfloat16 are computed internally in float32 (means, the log-domain geometric mean,
  the variance of the SAND-mask, the rescaling) and rounded once at the end; float32 and float64 are computed in
  their own dtype. Masks never promote: AND-masks are ``bool``, the SAND soft mask is in the gradients' dtype,
  so ``mask * grad`` keeps the parameter's dtype (the authors' float32 mask raises on half-precision params).
- **Masks and sign counts are exact** in every dtype: ``S`` is an int64 sum of signs and the canonical rule
  compares it with the oracle's integer keep threshold (``RuleSpec.threshold``). The SAND-mask's ``A > tau`` test
  is evaluated in float64 on the K + 1 possible values of ``|S|`` (a lookup table), so it agrees with the oracle
  bit for bit.
- Bad input raises ``TypeError`` / ``ValueError`` naming the argument, as the oracle does. Gradients must be
  ``torch.Tensor`` of a floating dtype (float16, bfloat16, float32, float64) and finite (one host sync per call).

The rule is a :class:`hardtovary.reference.rules.RuleSpec` (validated by the oracle); :data:`REGISTRY` says how
each rule is computed on tensors.
"""

from __future__ import annotations

import torch

from hardtovary.reference import rules as _ref
from hardtovary.reference.rules import RuleSpec, aggregate_arguments, agreement_threshold_count
from hardtovary.reference.validate import consistent_stacks, in_range, integer, non_finite_error, positive

RULES = _ref.RULES
FLAVOURS = _ref.FLAVOURS
ORIGINAL_LOG_EPSILON = _ref.ORIGINAL_LOG_EPSILON

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = [
    "sign_agreement", "agreement_threshold_count", "and_mask", "and_mask_count", "and_masked_mean",
    "mean_gradient", "geometric_mean_mask", "geometric_mean", "sand_mask", "sand_masked_mean",
    "rescale_inverse_sparsity", "aggregate", "compute_dtype", "REGISTRY",
]


# ----------------------------------------------------------------------------------------------------------------
# Validation and helpers
# ----------------------------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rules compute in for gradients of ``dtype``: float32 for float16/bfloat16, else itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _float_tensor(x, name: str, *, min_ndim: int = 0) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a tensor of a real floating dtype (float16/bfloat16/float32/float64), got dtype {x.dtype}"
        )
    if x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")
    return x


def _raise_first_non_finite(x: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    index = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
    raise non_finite_error(name, int(bad.sum()), index, x[index].item())


def _finite(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.numel() and not bool(torch.isfinite(x).all()):
        _raise_first_non_finite(x, name)
    return x


def _stack(G, name: str = "G") -> torch.Tensor:
    """Validate a gradient stack ``G[K, *shape]``: floating tensor, K >= 1, finite."""
    G = _float_tensor(G, name, min_ndim=1)
    if G.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one environment (K >= 1) on axis 0, got shape {tuple(G.shape)}")
    return _finite(G, name)


def _tau(tau) -> float:
    return in_range(tau, "tau", 0.0, 1.0)


def _sign_sum(G: torch.Tensor) -> torch.Tensor:
    """``S = sum_e sign(G[e])`` (sign(0) = 0) as exact integers held in the compute dtype, or in float64 where K
    exceeds the integers that dtype holds exactly (2^24 for float32): no rounding enters; one pass, no int64
    stack."""
    dtype = compute_dtype(G.dtype)
    if G.shape[0] > 2 / torch.finfo(dtype).eps:
        dtype = torch.float64
    return torch.sign(G).sum(dim=0, dtype=dtype)


def _mean(G: torch.Tensor) -> torch.Tensor:
    """Arithmetic mean over environments in the compute dtype."""
    return G.to(compute_dtype(G.dtype)).mean(dim=0)


def _keep(S: torch.Tensor, K: int, tau: float) -> torch.Tensor:
    return S.abs() >= agreement_threshold_count(tau, K)


# ----------------------------------------------------------------------------------------------------------------
# Sign agreement and the AND-mask
# ----------------------------------------------------------------------------------------------------------------


def mean_gradient(G) -> torch.Tensor:
    """``mean_e G[e]`` in G's dtype (computed in float32 for half precision)."""
    G = _stack(G)
    return _mean(G).to(G.dtype)


def sign_agreement(G) -> torch.Tensor:
    """``S_j = sum_e sign(G[e, j])`` as int64 of shape ``G.shape[1:]`` (sign(0) = 0)."""
    return _sign_sum(_stack(G)).to(torch.int64)


def and_mask(G, tau) -> torch.Tensor:
    """AND-mask, threshold form, ``|S_j| >= agreement_threshold_count(tau, K)`` as a bool tensor (paper §2.3)."""
    tau = _tau(tau)
    G = _stack(G)
    return _keep(_sign_sum(G), G.shape[0], tau)


def and_mask_count(G, t) -> torch.Tensor:
    """AND-mask, count form: keep iff at least ``t`` environments agree, ``max(p_j, q_j) >= t`` (bool)."""
    G = _stack(G)
    t = integer(t, "t", low=0, high=G.shape[0])
    return torch.maximum((G > 0).sum(dim=0), (G < 0).sum(dim=0)) >= t


def and_masked_mean(G, tau) -> torch.Tensor:
    """``and_mask(G, tau) * mean_e G[e]`` in G's dtype; masked components exactly 0."""
    tau = _tau(tau)
    G = _stack(G)
    return _and_masked_mean(G, tau)[0].to(G.dtype)


def _and_masked_mean(G: torch.Tensor, tau: float):
    keep = _keep(_sign_sum(G), G.shape[0], tau)
    mean = _mean(G)
    return torch.where(keep, mean, torch.zeros((), dtype=mean.dtype, device=mean.device)), keep


# ----------------------------------------------------------------------------------------------------------------
# Geometric mean
# ----------------------------------------------------------------------------------------------------------------


def geometric_mean_mask(G, *, flavour: str = "paper", tau=None) -> torch.Tensor:
    """Components where the geometric mean is not forced to 0 (bool): paper ``|S| == K``; original
    ``and_mask(G, tau)`` with tau defaulting to 1 (``flavour`` and ``tau`` validated by ``RuleSpec``)."""
    spec = RuleSpec("geometric_mean", tau, flavour)
    G = _stack(G)
    S = _sign_sum(G)
    if spec.flavour == "paper":
        return S.abs() == G.shape[0]
    return _keep(S, G.shape[0], spec.tau)


def _log_magnitudes(G: torch.Tensor, flavour: str) -> torch.Tensor:
    """The per-environment terms ``[K, *shape]`` (compute dtype) whose mean over environments the geometric mean
    exponentiates: paper ``log|g|``, with 0 in place of ``log 0`` (a component with an exact zero is never kept,
    and its log would be -inf); original ``log(|g| + 1e-10)``. Elementwise, so sums over sharded environments
    combine (:mod:`.distributed`)."""
    Gc = G.to(compute_dtype(G.dtype)).abs()
    if flavour == "paper":
        return torch.log(torch.where(Gc != 0, Gc, torch.ones((), dtype=Gc.dtype, device=Gc.device)))
    return torch.log(Gc + ORIGINAL_LOG_EPSILON)


def _geometric_mean_from(S: torch.Tensor, log_mean: torch.Tensor, mean, K: int, spec: RuleSpec):
    """The geometric mean (paper §2.2, §2.3 (i)) from its statistics over K environments: the sign sum ``S``, the
    mean of :func:`_log_magnitudes` and, for the original flavour, the arithmetic mean (None for paper); all of
    shape ``[*shape]``. Returns ``(value, keep)``."""
    if spec.flavour == "paper":
        keep = S.abs() == K
        value = torch.sign(S) * torch.exp(log_mean)
    else:
        keep = _keep(S, K, spec.tau)
        value = torch.sign(mean) * torch.exp(log_mean)
    return torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device)), keep


def _geometric_mean(G: torch.Tensor, spec: RuleSpec):
    mean = _mean(G) if spec.flavour == "original" else None
    log_mean = _log_magnitudes(G, spec.flavour).mean(dim=0)
    return _geometric_mean_from(_sign_sum(G), log_mean, mean, G.shape[0], spec)


def geometric_mean(G, *, flavour: str = "paper", tau=None) -> torch.Tensor:
    """Elementwise signed geometric mean in the log domain, flavours ``"paper"`` / ``"original"`` exactly as
    :func:`hardtovary.reference.rules.geometric_mean`; result in G's dtype (computed in float32 for half
    precision, so the log-domain mean cannot underflow); ``flavour`` and ``tau`` validated by ``RuleSpec``."""
    spec = RuleSpec("geometric_mean", tau, flavour)
    G = _stack(G)
    return _geometric_mean(G, spec)[0].to(G.dtype)


# ----------------------------------------------------------------------------------------------------------------
# SAND-mask
# ----------------------------------------------------------------------------------------------------------------


def _sand_mask(G: torch.Tensor, tau: float, k: float) -> torch.Tensor:
    """Soft mask in the compute dtype; the limit rules of the oracle for var = 0 and K = 1."""
    K = G.shape[0]
    cdt = compute_dtype(G.dtype)
    absS = _sign_sum(G).abs().to(torch.int64)
    # A - tau and the test A > tau, evaluated in float64 (as the oracle) on the K + 1 possible values of |S|.
    diffs = [s / K - tau for s in range(K + 1)]
    diff = torch.tensor(diffs, dtype=torch.float64, device=G.device).to(cdt)[absS]
    above = torch.tensor([d > 0 for d in diffs], device=G.device)[absS]
    limit = above.to(cdt)
    if K == 1 or G[0].numel() == 0:  # one environment: spread 0; an empty tensor: nothing to spread (torch warns)
        return limit
    Gc = G.to(cdt)
    identical = (G == G[0:1]).all(dim=0)
    variance = torch.where(identical, torch.zeros((), dtype=cdt, device=G.device), Gc.var(dim=0, unbiased=True))
    degenerate = variance == 0
    safe = torch.where(degenerate, torch.ones((), dtype=cdt, device=G.device), variance)
    smooth = torch.clamp(torch.tanh(k * diff / safe), min=0.0)
    return torch.where(degenerate, limit, smooth)


def sand_mask(G, tau, k=10.0) -> torch.Tensor:
    """SAND-mask ``max(tanh(k (A - tau) / var), 0)`` with the oracle's limit rules (var = 0: 1 where A > tau,
    else 0; K = 1: spread 0). Returned in G's dtype (a soft mask that does not promote the gradients)."""
    tau = _tau(tau)
    k = positive(k, "k")
    G = _stack(G)
    return _sand_mask(G, tau, k).to(G.dtype)


def sand_masked_mean(G, tau, k=10.0) -> torch.Tensor:
    """``sand_mask(G, tau, k) * mean_e G[e]`` in G's dtype (not rescaled)."""
    tau = _tau(tau)
    k = positive(k, "k")
    G = _stack(G)
    return (_sand_mask(G, tau, k) * _mean(G)).to(G.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Rescaling
# ----------------------------------------------------------------------------------------------------------------


def _rescale(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``value * n / n_kept``; exactly 0 where nothing is kept. No host sync."""
    if mask.dtype == torch.bool:
        n_kept = mask.sum().to(torch.float64)
    else:
        n_kept = mask.to(torch.float64).sum()
    return _scaled_by_kept(value, value.numel(), n_kept)


def _scaled_by_kept(value: torch.Tensor, n, n_kept: torch.Tensor) -> torch.Tensor:
    """``value * n / n_kept`` with the factor in float64 cast to the value's dtype; exactly 0 where ``n_kept`` is
    0. ``n`` (an int or a float64 tensor) and ``n_kept`` (float64) broadcast against ``value``: one tensor's counts,
    or every coordinate's tensor's (:func:`_rescale_segments`)."""
    nothing = n_kept == 0
    factor = n / torch.where(nothing, torch.ones_like(n_kept), n_kept)
    if value.dtype != torch.float64:
        # a soft-mask sum so small that n / n_kept overflows the compute dtype: divide first (as the oracle)
        overflow = factor > torch.finfo(value.dtype).max
        n_value = n.to(value.dtype) if isinstance(n, torch.Tensor) else n
        scaled = torch.where(overflow, value / n_kept.to(value.dtype) * n_value, value * factor.to(value.dtype))
    else:
        scaled = torch.where(torch.isinf(factor), value / n_kept * n, value * factor)
    return torch.where(nothing, torch.zeros((), dtype=value.dtype, device=value.device), scaled)


def rescale_inverse_sparsity(g, mask) -> torch.Tensor:
    """Per-tensor "inverse sparsity" rescaling ``g * n / n_kept`` (paper App. B.3.1); exactly 0 when nothing is
    kept (footnote 14). ``mask`` is bool or floating in [0, 1] of g's shape. Returns g's dtype."""
    g = _finite(_float_tensor(g, "g"), "g")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        mask = _finite(_float_tensor(mask, "mask"), "mask")
        if mask.numel() and (bool(mask.min() < 0) or bool(mask.max() > 1)):
            raise ValueError(
                f"mask must hold values in [0, 1], got min {mask.min().item()} and max {mask.max().item()}"
            )
    if tuple(mask.shape) != tuple(g.shape):
        raise ValueError(f"mask must have the shape of g {tuple(g.shape)}, got shape {tuple(mask.shape)}")
    return _rescale(g.to(compute_dtype(g.dtype)), mask).to(g.dtype)


# ----------------------------------------------------------------------------------------------------------------
# A rule applied to a whole model
# ----------------------------------------------------------------------------------------------------------------


def _validate_gradient_list(grads, *, allow_empty: bool = False) -> list[torch.Tensor]:
    """Validate a model's list of stacks ``G[K, *shape_i]`` (one K >= 1, one floating dtype); the finiteness check
    is separate (:func:`_check_finite_stacks`). ``allow_empty`` accepts K = 0: a rank's shard of the environments
    (:mod:`.distributed`) may hold none."""
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads must be a list or tuple of gradient stacks G[K, *shape], got {type(grads).__name__}")
    if len(grads) == 0:
        raise ValueError("grads must hold at least one gradient stack, got an empty sequence")
    stacks = []
    for i, G in enumerate(grads):
        G = _float_tensor(G, f"grads[{i}]", min_ndim=1)
        if G.shape[0] == 0 and not allow_empty:
            raise ValueError(
                f"grads[{i}] must hold at least one environment (K >= 1) on axis 0, got shape {tuple(G.shape)}"
            )
        stacks.append(G)
    consistent_stacks(stacks)
    return stacks


def _check_finite_stacks(stacks, means) -> None:
    """One host sync for the whole model: the environment means are finite iff the stacks are, except where a
    finite sum overflows; only then is the exact (slower) check run on the full stacks."""
    flags = torch.stack([torch.isfinite(m).all() for m in means])
    if bool(flags.all()):
        return
    for i, G in enumerate(stacks):
        if not bool(flags[i]):
            _finite(G, f"grads[{i}]")


def _mean_rule(G: torch.Tensor, mean: torch.Tensor, spec: RuleSpec):
    return mean, torch.ones(G.shape[1:], dtype=torch.bool, device=G.device)


def _and_mask_from(S: torch.Tensor, mean: torch.Tensor, K: int, spec: RuleSpec):
    """The AND-masked mean (paper §2.3) from its statistics over K environments: the sign sum ``S`` and the mean,
    both of shape ``[*shape]``. Returns ``(value, mask)``."""
    mask = S.abs() >= spec.threshold(K)
    return torch.where(mask, mean, torch.zeros((), dtype=mean.dtype, device=mean.device)), mask


def _and_mask_rule(G: torch.Tensor, mean: torch.Tensor, spec: RuleSpec):
    return _and_mask_from(_sign_sum(G), mean, G.shape[0], spec)


def _geometric_mean_rule(G: torch.Tensor, mean: torch.Tensor, spec: RuleSpec):
    return _geometric_mean(G, spec)


def _sand_mask_rule(G: torch.Tensor, mean: torch.Tensor, spec: RuleSpec):
    mask = _sand_mask(G, spec.tau, spec.k)
    return mask * mean, mask


#: How each rule of the oracle's registry is computed on tensors (module docstring of
#: :mod:`hardtovary.reference.rules`, "How to add a rule"): ``compute(G, mean, spec) -> (value, mask)`` with ``G``
#: a validated finite stack ``[K, *shape]``, ``mean`` its mean over environments in the compute dtype; value in the
#: compute dtype, mask bool or a soft mask in the compute dtype.
REGISTRY = {
    "mean": _mean_rule,
    "and_mask": _and_mask_rule,
    "geometric_mean": _geometric_mean_rule,
    "sand_mask": _sand_mask_rule,
}


def _packs(stacks, pack) -> bool:
    """Whether :func:`aggregate` packs the model's stacks into one ``[K, P]`` stack and applies the rule once. By
    default on CUDA, where a step is bound by its kernel launches: the rule's dozen kernels per tensor become about
    fifteen for the whole model, for one copy of the gradients (on a CPU, where launches are cheap, the packed
    stack's passes leave the cache: 4x slower for the synthetic MLP). Never for one tensor, or for stacks on
    different devices."""
    if pack is None:
        pack = stacks[0].device.type == "cuda"
    return bool(pack) and len(stacks) > 1 and len({G.device for G in stacks}) == 1


def _rescale_segments(value: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """:func:`_rescale` of every segment of a packed ``value`` (the tensors of a model, of ``lengths`` elements,
    an int64 tensor on value's device, one after another): each segment's ``n`` and ``n_kept`` (a running sum of
    the mask in float64, exact for a bool mask) spread over its coordinates, then the same arithmetic. No host
    sync."""
    ends = lengths.cumsum(0)
    running = torch.cat([torch.zeros(1, dtype=torch.float64, device=value.device), mask.to(torch.float64).cumsum(0)])

    def spread(per_segment):
        return torch.repeat_interleave(per_segment, lengths, output_size=value.numel())

    n_kept = spread(running[ends] - running[ends - lengths])
    return _scaled_by_kept(value, spread(lengths.to(torch.float64)), n_kept)


def _aggregate_packed(stacks, compute, spec: RuleSpec, rescale: bool):
    """The rule once over the model's stacks packed into one ``[K, P]`` stack (one dtype, as validated); values
    and masks are views of the packed results, in each tensor's shape."""
    K, dtype = stacks[0].shape[0], stacks[0].dtype
    sizes = [G[0].numel() for G in stacks]
    G = torch.cat([S.reshape(K, -1) for S in stacks], dim=1)
    lengths = torch.tensor(sizes, device=G.device) if rescale else None  # its copy waits at the sync below anyway
    mean = _mean(G)
    if not bool(torch.isfinite(mean).all()):  # the host sync; which tensor, only when one is not finite
        _check_finite_stacks(stacks, mean.split(sizes))
    value, mask = compute(G, mean, spec)
    if rescale:
        value = _rescale_segments(value, mask, lengths)
    value = value.to(dtype)
    if mask.dtype != torch.bool:
        mask = mask.to(dtype)
    return ([v.view(S.shape[1:]) for v, S in zip(value.split(sizes), stacks)],
            [m.view(S.shape[1:]) for m, S in zip(mask.split(sizes), stacks)])


def aggregate(grads, spec=None, *, rule=None, tau=None, rescale=False, flavour=None, k=None, pack=None):
    """Apply one rule to every parameter tensor, as :func:`hardtovary.reference.rules.aggregate`: a ``RuleSpec``
    (``spec``) or the keywords ``rule``, ``tau``, ``flavour``, ``k``, with ``rescale``, validated as the oracle
    does (:func:`hardtovary.reference.rules.aggregate_arguments`: ``tau`` None means 0 for and_mask / sand_mask and
    1 for geometric_mean; ``flavour`` only with geometric_mean, ``k`` only with sand_mask; ``rule='mean'`` accepts
    tau None or 0). NotImplementedError for a rule without an entry in :data:`REGISTRY`.

    ``grads``: list of tensors ``G[K, *shape_i]`` with one K and one floating dtype. Returns ``(aggregated,
    masks)``: values in the gradients' dtype; masks bool (mean, and_mask, geometric_mean) or, for sand_mask, the
    soft mask in the gradients' dtype.

    ``pack``: apply the rule once to all tensors packed into one stack (None: on CUDA; see :func:`_packs`). The
    masks are the same either way and the values equal to rounding; packed, they are views of one buffer.
    """
    spec, rescale = aggregate_arguments(rule, tau, rescale, flavour, k, spec=spec)
    if spec.rule not in REGISTRY:
        raise NotImplementedError(f"rule {spec.rule!r} has no entry in hardtovary.accel.torch.rules.REGISTRY; it "
                                  f"has {sorted(REGISTRY)}")
    compute = REGISTRY[spec.rule]
    stacks = _validate_gradient_list(grads)
    if _packs(stacks, pack):
        return _aggregate_packed(stacks, compute, spec, rescale)
    means = [_mean(G) for G in stacks]
    _check_finite_stacks(stacks, means)

    aggregated, masks = [], []
    for G, mean in zip(stacks, means):
        value, mask = compute(G, mean, spec)
        if rescale:
            value = _rescale(value, mask)
        aggregated.append(value.to(G.dtype))
        masks.append(mask if mask.dtype == torch.bool else mask.to(G.dtype))
    return aggregated, masks
