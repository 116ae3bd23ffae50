"""Aggregation rules on per-environment gradient stacks, and temporal AND-mask Adam.

The rules of "Learning Explanations That Are Hard To Vary" (Parascandolo et al., ICLR 2021) and one follow-up:

- the arithmetic mean of the environment gradients (plain averaging; the AND-mask at tau = 0);
- the AND-mask (paper §2.3) in its threshold form (``and_mask``, the canonical rule: integer sign sums, ties
  kept) and in its count form (``and_mask_count``), and the AND-masked mean (``and_masked_mean``);
- the geometric mean of gradients (paper §2.2, §2.3(i)) in two flavours: ``"paper"`` and ``"original"`` (the
  authors' ``and_mask_utils.get_grads``, method ``'geom_mean'``);
- the SAND-mask (Shahtalebi et al., arXiv 2106.02266, as DomainBed's ``SANDMask`` computes it), with its
  degenerate cases defined by their mathematical limits;
- layer-wise "inverse sparsity" rescaling (paper App. B.3.1, footnote 14);
- ``RuleSpec``, one rule with its options validated and resolved, and ``REGISTRY``, the rules it may name;
- ``aggregate``, which applies one rule to every parameter tensor of a model;
- ``TemporalAndMaskAdam``, Algorithm 1 of the paper (App. B.6).

The rule specification
----------------------
Which rule, which ``tau``, which flavour and which sharpness ``k``, and what is valid for each, is decided in one
place: ``RuleSpec(rule, tau=None, flavour=None, k=None)`` validates the options against the rule's entry in
``REGISTRY`` and fills in the defaults; ``RuleSpec.threshold(K)`` is the keep threshold of its agreement mask
(``agreement_threshold_count``, the only place the threshold is computed). Every backend's ``aggregate`` (this
module, ``hardtovary.accel.rules``, ``hardtovary.accel.torch.rules``) takes a ``RuleSpec`` or the same keywords
(``aggregate_arguments``), and the training loops hold one (``TrainConfig.rule_spec``).

How to add a rule
-----------------
1. The oracle: write ``compute(G, spec) -> (value, mask)`` for one validated float64 stack ``G[K, *shape]`` (value
   float64 of shape ``G.shape[1:]``, mask bool or a soft mask in [0, 1] of that shape) and add
   ``REGISTRY[name] = Rule(compute, tau=..., flavours=..., k=...)``, which says which options the rule takes and
   their defaults. ``RuleSpec`` then accepts the name and validates its options, and ``aggregate`` computes it,
   rescaled per tensor when asked.
2. One entry per backend: ``hardtovary.accel.rules.REGISTRY[name] = AccelRule(block, ...)`` (array-module
   expressions over a ``[K, C]`` block, NumPy or CuPy; a fused CUDA kernel is optional) and
   ``hardtovary.accel.torch.rules.REGISTRY[name] = compute`` (torch tensors). A backend without an entry
   refuses the rule with ``NotImplementedError``.
3. One conformance entry: ``hardtovary.conformance.checks.register_rule(name)`` adds the rule's own checks
   (``agg.oracle.<name>.*`` and the properties ``agg.prop.*.<name>.*``); the named edge cases (``agg.special.*``)
   run every registered rule already.

``tests/test_rule_registry.py`` adds "sign of the mean" through exactly these entry points.

Shapes and dtypes
-----------------
A gradient stack for one parameter tensor is ``G[K, *shape]``: environments on axis 0, K >= 1. A model's
gradients are a list of such stacks, one per parameter tensor, in parameter order. Every function accepts
float16/float32/float64 input, computes in float64 and returns float64 values; masks are ``bool`` (except the
SAND-mask, a float64 soft mask) and sign counts are ``int64``. Results have shape ``G.shape[1:]`` (a 0-d array
when ``G`` is 1-D).

Notation: ``S_j = sum_e sign(G[e, j])`` with sign(0) = 0, ``p``/``q``/``z`` the numbers of positive, negative and
zero entries of component j (p + q + z = K), ``A_j = |S_j| / K`` the agreement.

The mean over environments
--------------------------
``mean_e G[e, j]`` (``mean_gradient``, the masked means, and the sign that the original geometric mean takes) is
the float64 mean, within ``K eps max_e |G[e, j]|`` of the exact mean, and **exact in sign**: its sign is that of
the exact mean rounded to float64, whatever the order of the environments. A float sum can get the sign wrong
under cancellation (``[1, 1, 1, -1e17, 1e17]`` sums to 0.0 in this order and to 3 in others; the original
geometric mean then gives 0 or 6.3e6). Where the float64 sum cannot prove its sign, ``|sum| < K^2 eps max|g|``
(over twice Higham's bound on the error of a float sum in any order), or overflows (``[1e308, 1e308]``), the
component is the exact mean rounded once to float64 (integer arithmetic), which no order changes. Elsewhere
values may differ between orders by rounding only. The check costs a max and a min next to the sum (about 3 times
NumPy's mean; lost in the noise of a training step, ``bench/bench_oracle_mean.py``); an exactly rounded mean of
every component (two levels of error-free sums) would cost about 35 times.

Edge cases
----------
Where public implementations disagree (all gradients zero, one environment, ties, exact zeros, one environment at
zero, a fully masked tensor, underflow, float16, NaN/inf), the outcome this oracle defines for each is written
once, as data, in :mod:`hardtovary.reference.edge_cases` (shown in ``docs/conventions.md``); ``tests/test_rules.py``
checks each outcome by hand-derived values, and every backend is held to it.

Bad input raises ``TypeError`` (wrong kind of object or dtype: integer/bool/complex gradients, bool or string
tau, mixed dtypes between stacks) or ``ValueError`` (shape, range, non-finite entries, unknown names), with a
message naming the argument (see ``validate``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .validate import choice, consistent_stacks, finite, float_array, gradient_stack, in_range, integer, positive

#: The flavours of the geometric mean, the default first (``geometric_mean``).
FLAVOURS = ("paper", "original")

#: Tolerance of the canonical mask rule, ``ceil(tau*K - TIE_TOLERANCE)`` (``agreement_threshold_count``).
TIE_TOLERANCE = 1e-9

#: The constant added inside the log by the authors' ``geom_mean`` (``and_mask_utils.get_grads``).
ORIGINAL_LOG_EPSILON = 1e-10


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def _stack64(G, name: str = "G") -> np.ndarray:
    """Validate a gradient stack ``G[K, *shape]`` and return it as float64 (an exact conversion)."""
    return gradient_stack(G, name).astype(np.float64)


def _signs(G64: np.ndarray) -> np.ndarray:
    """Elementwise sign as int64, with sign(0) = 0."""
    return np.sign(G64).astype(np.int64)


def _exact_column_mean(column: list[float]) -> float:
    """The exact mean of a list of floats, rounded once to float64: integer arithmetic in units of 2^-1074 (every
    finite float64 is a whole number of them), then one correctly rounded int/int division. Unlike ``math.fsum``,
    never overflows on the way (``[1e308, 1e308, -1e308]``)."""
    total = 0
    for x in column:
        numerator, denominator = x.as_integer_ratio()  # denominator = 2^k, k <= 1074
        total += numerator << (1075 - denominator.bit_length())
    return total / (len(column) << 1074)


def _mean(G64: np.ndarray) -> np.ndarray:
    """Arithmetic mean over environments (axis 0), float64, always an ndarray; exact in sign (module docstring,
    "The mean over environments").

    A float64 sum of K terms, in any order, is within gamma_{K-1} sum|g| <= (K - 1) u K max|g| (1 + O(Ku)) of the
    exact sum (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., §4.2; underflow cannot break it,
    as additions that underflow are exact), so where ``|sum| >= K^2 eps max|g|`` (more than twice that bound,
    eps = 2u, which also covers the rounding of the product) the float sum has the exact sign. ``max|g|`` rather
    than ``sum|g|``: NumPy's max and min need no [K, ...] temporary. Elsewhere (cancellation, or a sum beyond the
    float64 range) the component is the exactly rounded mean, the same in every order.
    """
    K = G64.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        total = G64.sum(axis=0)
        largest = np.maximum(G64.max(axis=0), -G64.min(axis=0))
        doubtful = (np.abs(total) < (K * K * np.finfo(np.float64).eps) * largest) | ~np.isfinite(total)
    mean = np.asarray(total / K, dtype=np.float64)
    if doubtful.any():
        flat, stack = mean.reshape(-1), G64.reshape(K, -1)
        for j in np.flatnonzero(doubtful):
            flat[j] = _exact_column_mean(stack[:, j].tolist())
    return mean


def _threshold_keep(S: np.ndarray, K: int, tau: float) -> np.ndarray:
    """The canonical rule on validated inputs: ``|S| >= agreement_threshold_count(tau, K)``."""
    return np.asarray(np.abs(S) >= agreement_threshold_count(tau, K), dtype=bool)


def _validate_tau(tau) -> float:
    return in_range(tau, "tau", 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Sign agreement and the AND-mask  [paper §2.3]
# ----------------------------------------------------------------------------------------------------------------


def mean_gradient(G) -> np.ndarray:
    """Arithmetic mean of the environment gradients, ``mean_e G[e]`` (paper §2.3, grad L = (1/K) sum_e grad L_e).

    ``G``: ``[K, *shape]`` real floating, finite. Returns float64 of shape ``G.shape[1:]``, exact in sign in every
    order of the environments (module docstring, "The mean over environments").
    """
    return _mean(_stack64(G))


def sign_agreement(G) -> np.ndarray:
    """Sum of the signs over environments, ``S_j = sum_e sign(G[e, j])`` (paper §2.3), sign(0) = 0.

    ``G``: ``[K, *shape]`` real floating, finite, K >= 1. Returns int64 of shape ``G.shape[1:]``, values in
    ``[-K, K]`` with the parity of ``K - z`` (z = number of exact zeros of the component).
    """
    G64 = _stack64(G)
    return np.asarray(_signs(G64).sum(axis=0), dtype=np.int64)


def agreement_threshold_count(tau, K) -> int:
    """Smallest ``|S|`` the AND-mask keeps: ``ceil(tau*K - 1e-9)`` (the canonical mask rule).

    The paper's test ``tau*K <= |S|`` on the integer ``|S|`` is ``|S| >= ceil(tau*K)``. The ``- 1e-9`` keeps ties
    when ``tau`` carries float noise: ``tau = 2*0.8 - 1 = 0.6000000000000001`` with ``K = 10`` gives 6, not 7, so an
    8-of-10 agreement (``|S| = 6``) is kept as the paper's ``>=`` intends. The tolerance absorbs rounding noise
    in ``tau*K`` as long as ``K`` is far below 1e6. ``tau`` in [0, 1], ``K`` an integer >= 1; returns an int in
    ``[0, K]``. The only place the keep threshold is computed (``RuleSpec.threshold`` and every backend use it).
    """
    tau = _validate_tau(tau)
    K = integer(K, "K", low=1)
    return math.ceil(tau * K - TIE_TOLERANCE)


def and_mask(G, tau) -> np.ndarray:
    """AND-mask, threshold form: ``[m_tau]_j = 1[ tau*K <= |sum_e sign(G[e, j])| ]`` (paper §2.3).

    Computed on the integer sign sum as ``|S_j| >= ceil(tau*K - 1e-9)`` (``agreement_threshold_count``): ties are
    kept (the paper's ``>=``), and float noise in ``tau*K`` cannot flip a tie. Exact zeros count as sign 0, so
    they dilute the agreement: with p positive, q negative and z zero signs the component is kept iff
    ``|p - q| >= tau*K``.

    - ``tau = 0`` keeps every component (plain averaging);
    - ``tau = 1`` keeps only unanimous nonzero signs.

    ``G``: ``[K, *shape]`` real floating, finite, K >= 1. ``tau``: a real number in [0, 1] (TypeError for bools
    and non-reals, ValueError outside the range or NaN). Returns bool of shape ``G.shape[1:]``.
    """
    tau = _validate_tau(tau)
    G64 = _stack64(G)
    return _threshold_keep(_signs(G64).sum(axis=0), G64.shape[0], tau)


def and_mask_count(G, t) -> np.ndarray:
    """AND-mask, count form: keep component j iff at least ``t`` environments agree on its sign (paper §2.3).

    ``[m_t]_j = 1[ max(p_j, q_j) >= t ]`` with p_j / q_j the numbers of strictly positive / negative entries.
    The paper relates it to the threshold form by ``t = (K/2)(tau + 1)``; the paper gives ``t`` in
    ``{K/2, ..., K}`` (§2.3) or ``{K/2 + 1, ..., K}`` (App. A.3, A.4); this function accepts any integer
    ``t`` in ``[0, K]``.

    It differs from the threshold form (``and_mask``) only when some entries are exactly 0: the threshold form
    compares ``|p - q|``, the count form ``max(p, q)``. Example: K = 4, p = 2, q = 0, z = 2,
    tau = 0.5 (t = 3): the threshold form keeps (|S| = 2 >= 2), the count form drops (max(p, q) = 2 < 3). Without
    zeros, q = K - p and ``max(p, q) >= t`` iff ``|p - q| >= 2t - K``.

    ``G``: ``[K, *shape]`` real floating, finite. ``t``: an integer in ``[0, K]`` (TypeError for bools and
    non-integers). Returns bool of shape ``G.shape[1:]``.
    """
    G64 = _stack64(G)
    t = integer(t, "t", low=0, high=G64.shape[0])
    positives = (G64 > 0).sum(axis=0)
    negatives = (G64 < 0).sum(axis=0)
    return np.asarray(np.maximum(positives, negatives) >= t, dtype=bool)


def and_masked_mean(G, tau) -> np.ndarray:
    """The AND-masked gradient ``m_tau ⊙ mean_e G[e]`` (paper §2.3; the authors' ``and_mask`` method).

    ``G``: ``[K, *shape]`` real floating, finite; ``tau`` in [0, 1]. Returns float64 of shape ``G.shape[1:]``;
    masked components are exactly 0.0. Not rescaled (see ``rescale_inverse_sparsity``).
    """
    tau = _validate_tau(tau)
    G64 = _stack64(G)
    keep = _threshold_keep(_signs(G64).sum(axis=0), G64.shape[0], tau)
    return np.asarray(np.where(keep, _mean(G64), 0.0), dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Geometric mean of gradients  [paper §2.2, §2.3(i); the authors' and_mask_utils.get_grads]
# ----------------------------------------------------------------------------------------------------------------


def _paper_flavour_needs_unanimity(spec: RuleSpec) -> None:
    """The paper defines the geometric mean of gradients only when all K signs agree (paper §2.3 (i))."""
    if spec.flavour == "paper" and spec.tau != 1.0:
        raise ValueError(
            "tau must be None or 1 for flavour='paper': the paper defines the geometric mean of gradients only "
            f"when all K signs agree (paper §2.3 (i)); got tau={spec.tau}. Use flavour='original' for the authors' "
            "partial-agreement variant"
        )


def geometric_mean_mask(G, *, flavour: str = "paper", tau=None) -> np.ndarray:
    """Components where the geometric mean of gradients is not forced to 0.

    - ``flavour="paper"``: all K signs equal and nonzero (``|S_j| == K``); ``tau`` must be None or 1.
    - ``flavour="original"``: the AND-mask ``and_mask(G, tau)``, ``tau`` defaulting to 1 when None.

    Returns bool of shape ``G.shape[1:]``. With ``flavour="original"`` and tau < 1 a kept component can still be
    0 (difference (c) in ``geometric_mean``). ``flavour`` and ``tau`` are validated as ``RuleSpec`` does.
    """
    spec = RuleSpec("geometric_mean", tau, flavour)
    G64 = _stack64(G)
    S = _signs(G64).sum(axis=0)
    if spec.flavour == "paper":
        return np.asarray(np.abs(S) == G64.shape[0], dtype=bool)
    return _threshold_keep(S, G64.shape[0], spec.tau)


def geometric_mean(G, *, flavour: str = "paper", tau=None) -> np.ndarray:
    """Elementwise signed geometric mean of the environment gradients.

    ``flavour="paper"`` (paper §2.2, §2.3 (i), computed in the log domain as §2.3 (iii) asks)::

        g_j = s * exp( (1/K) sum_e log|G[e, j]| )    if all K signs of component j equal s != 0
        g_j = 0                                       otherwise (a disagreement or an exact zero)

    No epsilon: the log is only taken where every magnitude is nonzero. The log-domain mean lies between the
    smallest and largest magnitude, so it neither underflows nor overflows (K = 16, |g| = 1e-3 gives 1e-3).
    ``tau`` must be None or 1 (ValueError otherwise).

    ``flavour="original"`` (the authors' ``and_mask_utils.get_grads``, method ``'geom_mean'``)::

        g_j = m_tau,j * sign(mean_e G[e, j]) * exp( mean_e log(|G[e, j]| + 1e-10) )

    with ``m_tau = and_mask(G, tau)`` (the canonical integer rule; ``tau`` defaults to 1 when None). It differs
    from the paper (§2.2, §2.3 (i)):

    (a) with tau < 1, components whose signs only partly agree are kept, with the geometric mean of the
        *magnitudes* and the sign of the *arithmetic* mean; the paper sets them to 0;
    (b) an exact zero in one environment gives the magnitude ``(1e-10 * prod_others (|g| + 1e-10))^(1/K) > 0``
        instead of 0, and survives when tau <= (K - 1)/K (e.g. (1, 2, 0): ~5.848e-4 for tau <= 2/3);
    (c) ``sign(mean)`` can be 0 for a nonzero, partly agreeing set (e.g. +1 and -1 at tau = 0), giving 0;
    (d) with tau = 1 and no zeros it matches the paper except for the ``+1e-10`` inside the log (a relative
        change of about ``1e-10 / |g|``).

    Computed in float64 (the authors' code runs in the parameters' dtype, float32, where ``|g| + 1e-10`` rounds
    to ``|g|`` for ``|g|`` above about 1e-3).

    ``G``: ``[K, *shape]`` real floating, finite; ``flavour`` and ``tau`` are validated as ``RuleSpec`` does.
    Returns float64 of shape ``G.shape[1:]``; components outside ``geometric_mean_mask`` are exactly 0.0.
    """
    spec = RuleSpec("geometric_mean", tau, flavour)
    G64 = _stack64(G)
    K = G64.shape[0]
    S = _signs(G64).sum(axis=0)
    if spec.flavour == "paper":
        keep = np.abs(S) == K
        magnitudes = np.where(keep, np.abs(G64), 1.0)  # log only where every magnitude is nonzero
        value = np.sign(S) * np.exp(np.log(magnitudes).mean(axis=0))
    else:
        keep = _threshold_keep(S, K, spec.tau)
        value = np.sign(_mean(G64)) * np.exp(np.log(np.abs(G64) + ORIGINAL_LOG_EPSILON).mean(axis=0))
    return np.asarray(np.where(keep, value, 0.0), dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# SAND-mask  [arXiv 2106.02266; DomainBed's SANDMask.mask_grads in domainbed/algorithms.py]
# ----------------------------------------------------------------------------------------------------------------


def sand_mask(G, tau, k=10.0) -> np.ndarray:
    """Smoothed AND-mask (SAND-mask) with gamma = 1, as DomainBed's ``SANDMask`` defines it::

        mask_j = max( tanh( k * (A_j - tau) / var_j ), 0 ),   A_j = |S_j| / K,
        var_j  = unbiased (ddof = 1) variance of G[:, j] over the K environments.

    Degenerate cases are defined by their mathematical limits (DomainBed instead substitutes 1e-17 for NaN):

    - ``var_j == 0`` (identical gradients in every environment, or a variance that underflows float64):
      the limit var -> 0+ gives 1 if ``A_j > tau`` and 0 if ``A_j <= tau``. At ``A_j == tau`` the argument is
      ``0 / var = 0`` for every var > 0, so the limit is tanh(0) = 0: ties are dropped, unlike the AND-mask.
    - ``K == 1``: the unbiased variance of one sample is 0/0; the spread of a single sample is taken as 0 and
      the rule above applies (nonzero entries get 1 when tau < 1; everything gets 0 when tau = 1).

    ``A_j`` is compared with ``tau`` in float64. Where ``k (A - tau) / var`` overflows it is +-inf and tanh gives
    +-1. The mask lies in [0, 1]: values below 1 whenever var > 0 mathematically, but ``tanh(x)`` rounds to
    1.0 in float64 for x above about 19, and the var = 0 limit is exactly 1.

    ``G``: ``[K, *shape]`` real floating, finite. ``tau`` in [0, 1]; ``k`` a finite real > 0. Returns float64 of
    shape ``G.shape[1:]``.
    """
    tau = _validate_tau(tau)
    k = positive(k, "k")
    G64 = _stack64(G)
    K = G64.shape[0]
    agreement = np.abs(_signs(G64).sum(axis=0)) / K
    if K == 1:
        variance = np.zeros(G64.shape[1:])
    else:
        identical = np.all(G64 == G64[0], axis=0)
        variance = np.where(identical, 0.0, G64.var(axis=0, ddof=1))
    degenerate = variance == 0.0
    limit = np.where(agreement > tau, 1.0, 0.0)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        smooth = np.maximum(np.tanh(k * (agreement - tau) / variance), 0.0)
    return np.asarray(np.where(degenerate, limit, smooth), dtype=np.float64)


def sand_masked_mean(G, tau, k=10.0) -> np.ndarray:
    """The SAND-masked gradient ``sand_mask(G, tau, k) ⊙ mean_e G[e]`` (not rescaled).

    DomainBed always rescales it afterwards; use ``rescale_inverse_sparsity`` (or ``aggregate(...,
    rescale=True)``) for that. Returns float64 of shape ``G.shape[1:]``.
    """
    mask = sand_mask(G, tau, k)
    return np.asarray(mask * _mean(_stack64(G)), dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Rescaling  [paper App. B.3.1, footnote 14; per parameter tensor, as the authors' get_grads]
# ----------------------------------------------------------------------------------------------------------------


def rescale_inverse_sparsity(g, mask) -> np.ndarray:
    """Layer-wise "inverse sparsity" rescaling of one parameter tensor's masked gradient (paper App. B.3.1).

    Returns ``g * n / n_kept`` with ``n = g.size`` and ``n_kept = mask.sum()``: c = 1 when nothing is masked;
    when nothing is kept (``n_kept == 0``) the result is exactly 0, as footnote 14 says ("infinite if all
    components are masked out (which we then keep as 0)"). ``g`` is expected to be already masked; this function
    only scales it. Soft masks (e.g. the SAND-mask) work too: ``n_kept`` is then the sum of the soft values.

    The authors' code multiplies by ``1 / (1e-10 + n_kept / n)``; that differs from ``n / n_kept`` by a relative
    ``1e-10 * n / n_kept`` at most (1e-10 when everything is kept) and gives the same exact 0 when nothing is.

    ``g``: real floating, finite, any shape. ``mask``: bool or real floating of the same shape, values in
    [0, 1]. Returns float64 of ``g``'s shape.
    """
    g64 = finite(float_array(g, "g"), "g").astype(np.float64)
    mask_arr = np.asarray(mask)
    if mask_arr.dtype != np.bool_:
        mask_arr = finite(float_array(mask, "mask"), "mask")
        if mask_arr.size and (mask_arr.min() < 0 or mask_arr.max() > 1):
            raise ValueError(
                f"mask must hold values in [0, 1], got min {mask_arr.min()} and max {mask_arr.max()}"
            )
    if mask_arr.shape != g64.shape:
        raise ValueError(f"mask must have the shape of g {g64.shape}, got shape {mask_arr.shape}")
    n_kept = float(mask_arr.astype(np.float64).sum())
    if n_kept == 0.0:
        return np.zeros(g64.shape, dtype=np.float64)
    factor = g64.size / n_kept  # exactly 1.0 when everything is kept
    if not math.isfinite(factor):  # a soft mask whose sum is subnormal: divide first
        return np.asarray(g64 / n_kept * g64.size, dtype=np.float64)
    return np.asarray(g64 * factor, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# A rule applied to a whole model
# ----------------------------------------------------------------------------------------------------------------


def _validate_gradient_list(grads) -> list[np.ndarray]:
    """Validate a model's list of gradient stacks; return them as float64 arrays."""
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads must be a list or tuple of gradient stacks G[K, *shape], got {type(grads).__name__}")
    if len(grads) == 0:
        raise ValueError("grads must hold at least one gradient stack, got an empty sequence")
    stacks = [gradient_stack(G, f"grads[{i}]") for i, G in enumerate(grads)]
    consistent_stacks(stacks)
    return [G.astype(np.float64) for G in stacks]


@dataclass(frozen=True)
class Rule:
    """One entry of :data:`REGISTRY`: how the oracle computes a rule, and which options the rule takes.

    - ``compute(G, spec) -> (value, mask)``: the rule on one validated float64 stack ``G[K, *shape]`` (finite,
      K >= 1) with the options of ``spec``; value float64 of shape ``G.shape[1:]``, mask bool or a soft mask in
      [0, 1] of that shape, on which ``aggregate`` rescales.
    - ``tau``: the default agreement threshold, or None for a rule that takes none; such a rule accepts tau None
      or 0 (it keeps every component, as the AND-mask at tau = 0) and resolves it to 0.
    - ``flavours``: the flavours the rule accepts, the default first; ``()`` for none.
    - ``k``: the default sharpness, or None for a rule that takes none.
    - ``check(spec)``: raises ValueError for a combination of resolved options the fields above cannot express,
      or None.
    """

    compute: Callable[[np.ndarray, RuleSpec], tuple[np.ndarray, np.ndarray]]
    tau: float | None = None
    flavours: tuple[str, ...] = ()
    k: float | None = None
    check: Callable[[RuleSpec], None] | None = None


@dataclass(frozen=True)
class RuleSpec:
    """One aggregation rule with its options validated and the defaults filled in: the one place that decides what
    is valid. Frozen and hashable; equal options give equal specs (``RuleSpec("geometric_mean") ==
    RuleSpec("geometric_mean", 1.0, "paper")``).

    ``RuleSpec(rule, tau=None, flavour=None, k=None)`` (also through ``dataclasses.replace``) checks, in order:

    - ``rule``: a name in :data:`REGISTRY` (``mean``, ``and_mask``, ``geometric_mean``, ``sand_mask`` and any
      registered later);
    - ``flavour`` only for a rule with flavours (``geometric_mean``: ``"paper"`` by default, or ``"original"``),
      ``k`` only for a rule with a sharpness (``sand_mask``: a real > 0, default 10);
    - ``tau`` a real in [0, 1]: default 0 for ``and_mask`` and ``sand_mask``, 1 for ``geometric_mean``; None or 0
      for ``mean`` (use ``and_mask`` for tau > 0), resolved to 0.0;
    - the paper's geometric mean needs tau = 1 (paper §2.3 (i)); ``flavour="original"`` takes any tau.

    ``TypeError`` for bools and non-reals, ``ValueError`` for anything else refused, each naming the option.
    """

    rule: str
    tau: float | None = None
    flavour: str | None = None
    k: float | None = None

    def __post_init__(self):
        entry = REGISTRY[choice(self.rule, "rule", tuple(REGISTRY))]
        rule, tau, flavour, k = self.rule, self.tau, self.flavour, self.k
        if flavour is not None and not entry.flavours:
            raise ValueError(f"flavour applies only to {_rules_taking('flavours')}, got flavour={flavour!r} with "
                             f"rule={rule!r}")
        if k is not None and entry.k is None:
            raise ValueError(f"k applies only to {_rules_taking('k')}, got k={k!r} with rule={rule!r}")
        if entry.flavours:
            flavour = choice(entry.flavours[0] if flavour is None else flavour, "flavour", entry.flavours)
        if entry.tau is not None:
            tau = entry.tau if tau is None else _validate_tau(tau)
        elif tau is None or _validate_tau(tau) == 0.0:
            tau = 0.0
        else:
            raise ValueError(
                f"tau must be None or 0 for rule={rule!r} (use rule='and_mask' for tau > 0), got tau={tau}")
        object.__setattr__(self, "tau", tau)
        object.__setattr__(self, "flavour", flavour)
        if entry.check is not None:
            entry.check(self)
        if entry.k is not None:
            object.__setattr__(self, "k", positive(entry.k if k is None else k, "k"))

    def threshold(self, K) -> int:
        """The smallest ``|S|`` the rule's agreement mask keeps for K environments: ``agreement_threshold_count(tau,
        K)``; K for the paper's geometric mean (tau = 1, unanimity), 0 for a rule without a tau."""
        return agreement_threshold_count(self.tau, K)


def _rules_taking(option: str) -> str:
    """``rule='a' or rule='b'``: the registered rules that take ``option`` (``"flavours"`` or ``"k"``)."""
    return " or ".join(f"rule={name!r}" for name, entry in REGISTRY.items() if getattr(entry, option))


def _mean_rule(G: np.ndarray, spec: RuleSpec):
    """``mean_e G[e]``, every component kept."""
    return _mean(G), np.ones(G.shape[1:], dtype=bool)


def _and_mask_rule(G: np.ndarray, spec: RuleSpec):
    """``and_masked_mean`` and its ``and_mask`` (paper §2.3)."""
    return and_masked_mean(G, spec.tau), and_mask(G, spec.tau)


def _geometric_mean_rule(G: np.ndarray, spec: RuleSpec):
    """``geometric_mean`` and its ``geometric_mean_mask`` (paper §2.2, §2.3 (i)), in the spec's flavour."""
    return (geometric_mean(G, flavour=spec.flavour, tau=spec.tau),
            geometric_mean_mask(G, flavour=spec.flavour, tau=spec.tau))


def _sand_mask_rule(G: np.ndarray, spec: RuleSpec):
    """``sand_masked_mean`` and its soft ``sand_mask``."""
    return sand_masked_mean(G, spec.tau, spec.k), sand_mask(G, spec.tau, spec.k)


#: The rules ``RuleSpec`` may name, with how the oracle computes each and which options it takes (module
#: docstring, "How to add a rule").
REGISTRY: dict[str, Rule] = {
    "mean": Rule(_mean_rule),
    "and_mask": Rule(_and_mask_rule, tau=0.0),
    "geometric_mean": Rule(_geometric_mean_rule, tau=1.0, flavours=FLAVOURS, check=_paper_flavour_needs_unanimity),
    "sand_mask": Rule(_sand_mask_rule, tau=0.0, k=10.0),
}

#: The built-in rules (``REGISTRY`` holds these and any registered later).
RULES = tuple(REGISTRY)


def variant_names() -> tuple[str, ...]:
    """Every registered rule with each of its flavours, as ``rule`` or ``rule.flavour`` (``"geometric_mean.paper"``),
    in registry order: the variants a conformance check covers one by one."""
    return tuple(f"{name}.{flavour}" if flavour else name
                 for name, entry in REGISTRY.items() for flavour in (entry.flavours or (None,)))


def aggregate_arguments(rule=None, tau=None, rescale=False, flavour=None, k=None, *, spec=None):
    """The validated rule and rescaling flag of an ``aggregate`` call, ``(spec, rescale)``, for every backend.

    The rule comes either as a ``RuleSpec`` (``spec``) or as the keywords ``rule``, ``tau``, ``flavour``, ``k``
    (``RuleSpec(rule, tau, flavour, k)``), not both (TypeError); ``rescale`` must be a bool. A call with several
    bad arguments reports the rule's name first, then ``rescale``, then the other options.
    """
    if spec is not None:
        if not isinstance(spec, RuleSpec):
            raise TypeError(f"spec must be a RuleSpec, got {type(spec).__name__} {spec!r}")
        if (rule, tau, flavour, k) != (None, None, None, None):
            raise TypeError("give the rule either as a RuleSpec or as rule=... with its options, not both; got "
                            f"{spec!r} and rule={rule!r}, tau={tau!r}, flavour={flavour!r}, k={k!r}")
    else:
        choice(rule, "rule", tuple(REGISTRY))
    if not isinstance(rescale, (bool, np.bool_)):
        raise TypeError(f"rescale must be a bool, got {type(rescale).__name__} {rescale!r}")
    return (RuleSpec(rule, tau, flavour, k) if spec is None else spec), bool(rescale)


def rule_options(rule, tau=None, flavour=None, k=None) -> dict:
    """Keyword options for ``RuleSpec(rule, **rule_options(...))`` or ``aggregate(grads, rule=rule,
    **rule_options(...))`` from a caller that always has a tau (a configuration, a command line): tau is dropped
    for a rule that takes none (``mean``), and options that are None are left out. Validates nothing."""
    without_tau = [name for name, entry in REGISTRY.items() if entry.tau is None]
    options = {"flavour": flavour, "k": k, "tau": None if rule in without_tau else tau}
    return {key: value for key, value in options.items() if value is not None}


def aggregate(grads, spec=None, *, rule=None, tau=None, rescale=False, flavour=None, k=None):
    """Apply one aggregation rule to every parameter tensor of a model, rescaling per tensor when asked.

    ``aggregate(grads, spec, rescale=False)`` with a ``RuleSpec``, or ``aggregate(grads, rule=..., tau=...,
    flavour=..., k=..., rescale=False)``, which builds ``RuleSpec(rule, tau, flavour, k)`` (not both).

    ``grads``: a non-empty list or tuple of gradient stacks ``G[K, *shape_i]``, one per parameter tensor, all
    with the same K >= 1 and the same real floating dtype, finite.

    The rules and the masks they return:

    - ``"mean"``: ``mean_e G[e]``; mask all True. ``tau`` must be None or 0 (the mean is the AND-mask at
      tau = 0; use ``rule="and_mask"`` for tau > 0).
    - ``"and_mask"``: ``and_masked_mean(G, tau)``; the bool AND-mask. ``tau`` None means 0.
    - ``"geometric_mean"``: ``geometric_mean(G, flavour=flavour, tau=tau)``; the bool ``geometric_mean_mask``.
      ``flavour`` None means ``"paper"``; ``tau`` None means 1 (the only value the paper flavour accepts).
    - ``"sand_mask"``: ``sand_masked_mean(G, tau, k)``; the float64 soft mask. ``tau`` None means 0, ``k``
      None means 10.
    - any rule registered in :data:`REGISTRY`: its ``compute``.

    ``flavour`` is accepted only with ``rule="geometric_mean"`` and ``k`` only with ``rule="sand_mask"``
    (ValueError otherwise; ``RuleSpec``). ``rescale`` (a bool) multiplies each tensor's result by ``n / n_kept``
    of its own mask (``rescale_inverse_sparsity``); a fully masked tensor stays exactly 0.

    Returns ``(aggregated, masks)``: two lists with one float64 array (resp. mask) of shape ``shape_i`` per
    parameter tensor.
    """
    spec, rescale = aggregate_arguments(rule, tau, rescale, flavour, k, spec=spec)
    stacks = _validate_gradient_list(grads)
    compute = REGISTRY[spec.rule].compute

    aggregated, masks = [], []
    for G in stacks:
        value, mask = compute(G, spec)
        if rescale:
            value = rescale_inverse_sparsity(value, mask)
        aggregated.append(value)
        masks.append(mask)
    return aggregated, masks


# ----------------------------------------------------------------------------------------------------------------
# Temporal AND-mask Adam  [paper §3.3, App. B.6, Algorithm 1]
# ----------------------------------------------------------------------------------------------------------------


def _shapes_of(params_or_shapes) -> list[tuple[int, ...]]:
    """Shapes from a list whose entries are shape tuples (of ints) or parameter arrays."""
    if not isinstance(params_or_shapes, (list, tuple)):
        raise TypeError(
            "params_or_shapes must be a list or tuple with one entry (a shape tuple or an array) per parameter "
            f"tensor, got {type(params_or_shapes).__name__}"
        )
    if len(params_or_shapes) == 0:
        raise ValueError("params_or_shapes must hold at least one parameter tensor, got an empty sequence")
    shapes = []
    for i, item in enumerate(params_or_shapes):
        if isinstance(item, tuple) and all(isinstance(d, numbers.Integral) for d in item):
            shapes.append(tuple(integer(d, f"params_or_shapes[{i}][{j}]", low=0) for j, d in enumerate(item)))
        else:
            shapes.append(float_array(item, f"params_or_shapes[{i}]").shape)
    return shapes


class TemporalAndMaskAdam:
    """Algorithm 1 of the paper, "temporal" AND-mask Adam (App. B.6), exactly as printed.

    Sign agreement is accumulated over time (one environment per step) by a third exponential moving average.
    With zero initial state ``m = v = a = 0`` and ``t = 0``, each ``step`` does, elementwise::

        t <- t + 1
        m <- beta1 m + (1 - beta1) g
        v <- beta2 v + (1 - beta2) g*g            (from the unmasked g)
        a <- beta3 a + (1 - beta3) sign(g)        (sign(0) = 0)
        b <- 1[ |a| >= tau ]
        theta <- theta - lr * (m * b) / (sqrt(v) + eps)      (the mask acts on the first moment only)

    Decisions where the paper is silent (Algorithm 1 states no initial state and no bias correction):

    - The initial state is 0 (the paper does not state it). So the first step can only move a component if
      ``1 - beta3 >= tau``: e.g. beta3 = 0.8, tau = 0.5 gives |a| = 0.2 < tau and nothing moves.
    - No bias correction by default, as printed. ``bias_correction=True`` uses ``m / (1 - beta1^t)``,
      ``v / (1 - beta2^t)`` and ``a / (1 - beta3^t)``, each with its own beta: ``a`` is also an EMA started at
      zero, biased towards 0 by the same factor, and its corrected value is a weighted mean of past signs in
      [-1, 1]. The corrected values are used for the mask and the update; the stored state stays uncorrected.
    - ``|a| >= tau`` is compared in float64 as printed, with no tie tolerance (``a`` is not an integer count):
      e.g. ``1 - 0.8 = 0.19999999999999996 < 0.2``.
    - Where ``sqrt(v) + eps == 0`` (only possible with eps = 0) the numerator is 0 as well and the update is 0,
      the eps -> 0 limit; a nonzero numerator there (g*g underflowed to 0) raises ValueError.
    - Weight decay is NOT part of this step: the paper applies it "as a second independent update after the
      AND-mask routine" (decoupled); apply it separately.

    Constructor: ``params_or_shapes`` is a list with one entry per parameter tensor, either a shape tuple of ints
    or an array (only its shape is used). ``lr > 0``; ``beta1, beta2, beta3`` in [0, 1); ``tau`` in [0, 1];
    ``eps >= 0``; ``bias_correction`` a bool.

    ``step(params, grads)`` takes two lists of real floating, finite arrays of the registered shapes, returns
    ``(new_params, masks)``: float64 arrays and the bool masks ``b``; the inputs are never modified. The state is
    readable as ``m``, ``v``, ``a`` (lists of float64 arrays, uncorrected) and ``t`` (steps taken).
    """

    def __init__(
        self,
        params_or_shapes,
        lr,
        *,
        beta3,
        tau,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        bias_correction=False,
    ):
        self.shapes = _shapes_of(params_or_shapes)
        self.lr = positive(lr, "lr")
        self.beta1 = self._beta(beta1, "beta1")
        self.beta2 = self._beta(beta2, "beta2")
        self.beta3 = self._beta(beta3, "beta3")
        self.tau = _validate_tau(tau)
        self.eps = positive(eps, "eps", allow_zero=True)
        if not isinstance(bias_correction, (bool, np.bool_)):
            raise TypeError(f"bias_correction must be a bool, got {type(bias_correction).__name__} {bias_correction!r}")
        self.bias_correction = bool(bias_correction)
        self.m = [np.zeros(shape) for shape in self.shapes]
        self.v = [np.zeros(shape) for shape in self.shapes]
        self.a = [np.zeros(shape) for shape in self.shapes]
        self.t = 0

    @staticmethod
    def _beta(value, name: str) -> float:
        value = in_range(value, name, 0.0, 1.0)
        if value == 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value}")
        return value

    def _arrays(self, arrays, name: str) -> list[np.ndarray]:
        if not isinstance(arrays, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of arrays, got {type(arrays).__name__}")
        if len(arrays) != len(self.shapes):
            raise ValueError(f"{name} must hold {len(self.shapes)} arrays (one per parameter), got {len(arrays)}")
        out = []
        for i, (x, shape) in enumerate(zip(arrays, self.shapes)):
            arr = finite(float_array(x, f"{name}[{i}]"), f"{name}[{i}]")
            if arr.shape != shape:
                raise ValueError(f"{name}[{i}] must have shape {shape}, got shape {arr.shape}")
            out.append(arr.astype(np.float64))
        return out

    def step(self, params, grads):
        """One step of Algorithm 1; returns ``(new_params, masks)`` and updates ``m, v, a, t``."""
        params64 = self._arrays(params, "params")
        grads64 = self._arrays(grads, "grads")
        t = self.t + 1
        b1, b2, b3 = self.beta1, self.beta2, self.beta3
        m = [b1 * m + (1 - b1) * g for m, g in zip(self.m, grads64)]
        v = [b2 * v + (1 - b2) * g * g for v, g in zip(self.v, grads64)]
        a = [b3 * a + (1 - b3) * np.sign(g) for a, g in zip(self.a, grads64)]
        if self.bias_correction:
            m_used = [x / (1 - b1**t) for x in m]
            v_used = [x / (1 - b2**t) for x in v]
            a_used = [x / (1 - b3**t) for x in a]
        else:
            m_used, v_used, a_used = m, v, a

        new_params, masks = [], []
        for i, (theta, m_i, v_i, a_i) in enumerate(zip(params64, m_used, v_used, a_used)):
            mask = np.asarray(np.abs(a_i) >= self.tau, dtype=bool)
            numerator = m_i * mask
            denominator = np.sqrt(v_i) + self.eps
            if np.any((denominator == 0) & (numerator != 0)):
                raise ValueError(
                    f"grads[{i}]: sqrt(v) + eps is 0 where the masked first moment is not (g*g underflowed to 0 "
                    "with eps = 0); use eps > 0"
                )
            update = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)
            new_params.append(np.asarray(theta - self.lr * update, dtype=np.float64))
            masks.append(mask)

        self.m, self.v, self.a, self.t = m, v, a, t
        return new_params, masks
