"""``agg.prop.*``: properties every implementation must have, whatever its internals: environment permutation
invariance, sign-flip equivariance ``f(-G) = -f(G)``, "tau = 0 is the mean", and the keep rate of the AND-mask on
i.i.d. Gaussian gradients against the paper's Prop. 2 (eq. 4). Each property check first judges fixed cases built
to sit on its edge, then hypothesis draws, with the options the target supports (found by probing it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from hardtovary.reference import consistency as _consistency
from hardtovary.reference.rules import variant_names

from .. import strategies as S
from .. import tolerances as T
from ..compare import AggCase, call_aggregate, ks_for, oracle_aggregate, probe, rule_variants, valid_tau
from ..judging import MAX_OFFENDING, Mismatch, draw_and_judge, jsonable, judge_each, judged
from ..registry import Check, check, register

#: The fixed stack every property check judges first (K = 4, values exact in every dtype). Columns: balanced signs
#: with a nonzero mean (S = 0: and_mask keeps it at tau = 0, a strict `>` drops it), unanimous +, three exact zeros
#: and one + (sign(0) counted as +1 makes it unanimous one way only), 3 of 4 agreeing, unanimous -.
PROPERTY_STACK = np.array([[3.0, 1.0, 0.0, 2.0, -1.0],
                           [1.0, 2.0, 0.0, -1.0, -2.0],
                           [-1.0, 0.5, 1.0, 4.0, -0.5],
                           [-2.0, 1.0, 0.0, 1.0, -4.0]])
PROPERTY_PERMUTATIONS = ((3, 2, 1, 0), (1, 2, 3, 0), (1, 0, 2, 3))
PROPERTY_TAUS = (0.0, 0.5, 1.0)


@dataclass(eq=False)
class PropertyCase(AggCase):
    perm: tuple | None = None

    def label(self) -> str:
        return super().label() + (f" perm={list(self.perm)}" if self.perm is not None else "")


def _judge_property(adapter, kind: str, case: PropertyCase) -> None:
    grads = case.grads
    if kind == "tau0_mean":
        first = call_aggregate(adapter, grads, "and_mask", 0.0, case.rescale)
        second = call_aggregate(adapter, grads, "mean", 0.0, case.rescale)
        sign, what = 1.0, "and_mask(tau=0) vs mean"
    else:
        first = call_aggregate(adapter, grads, **case.options())
        if kind == "permutation":
            other = [G[np.asarray(case.perm, dtype=np.int64)] for G in grads]
            sign, what = 1.0, f"environments permuted by {list(case.perm)}"
        else:
            other = [-G for G in grads]
            sign, what = -1.0, "f(-G) vs -f(G)"
        second = call_aggregate(adapter, other, **case.options())
    judged()
    values, masks = oracle_aggregate(grads, **case.options())
    tol = T.for_dtype(np.asarray(grads[0]).dtype)
    for i, (a, b, o, m, G) in enumerate(zip(first, second, values, masks, grads)):
        a = np.asarray(a, dtype=np.float64)
        b = sign * np.asarray(b, dtype=np.float64)
        G64 = np.asarray(G, dtype=np.float64)
        m64 = np.asarray(m, dtype=np.float64)
        factor = m64.size / m64.sum() if case.rescale and m64.sum() > 0 else 1.0
        bound = 2 * tol.bound(o, np.abs(G64).max(axis=0) * factor, G64.shape[0])
        bad = ~T.within(a, b, bound)
        if np.any(bad):
            offending = []
            for ix in [tuple(int(v) for v in ix) for ix in np.argwhere(bad)][:MAX_OFFENDING]:
                col = G64[(slice(None),) + ix]
                offending.append({"index": list(ix), "p": int(np.sum(col > 0)), "q": int(np.sum(col < 0)),
                                  "z": int(np.sum(col == 0)), "S": int(np.sign(col).sum()),
                                  "first": float(a[ix]), "second": float(b[ix]), "G": jsonable(col)})
            raise Mismatch(f"{what}: outputs differ at {int(bad.sum())} component(s)", {
                "case": case.name, "rule": case.rule, "flavour": case.flavour, "tau": case.tau,
                "rescale": case.rescale, "k": case.k, "K": G64.shape[0], "dtype": T.dtype_name(G.dtype),
                "tensor": i, "offending": offending})


def _property_check(kind, rule, flavour, dtype):
    """``kind`` is permutation, sign_flip or tau0_mean (which compares and_mask at tau 0 with the mean)."""
    def run(adapter, settings):
        options = [{"rescale": r, "k": k} for r in (False, True) for k in ks_for(rule)]
        options = probe(adapter, rule, flavour, dtype, options)
        if kind == "tau0_mean":
            mean_ok = probe(adapter, "mean", None, dtype, options)
            options = [o for o in options if o in mean_ok]
        if not options:
            return []
        G = PROPERTY_STACK.astype(dtype)
        perms = PROPERTY_PERMUTATIONS if kind == "permutation" else (None,)
        taus = (0.0,) if kind == "tau0_mean" else sorted({valid_tau(rule, flavour, t) for t in PROPERTY_TAUS})
        fixed = [PropertyCase(f"fixed K=4 stack ({kind})", [G], rule, tau, opt["rescale"], flavour, opt["k"], perm)
                 for tau in taus for opt in options for perm in perms]
        notes = judge_each(fixed, lambda case: _judge_property(adapter, kind, case))

        def body(data):
            K = data.draw(S.env_counts(), label="K")
            tau = 0.0 if kind == "tau0_mean" else valid_tau(rule, flavour, data.draw(S.taus(K), label="tau"))
            opt = data.draw(st.sampled_from(options), label="options")
            grads = [data.draw(S.gradient_stack(K, data.draw(S.param_shapes(), label="shape"), dtype, tau),
                               label="grads[0]")]
            perm = tuple(data.draw(st.permutations(range(K)), label="perm")) if kind == "permutation" else None
            _judge_property(adapter, kind, PropertyCase("drawn", grads, rule, tau, opt["rescale"], flavour,
                                                        opt["k"], perm))

        return notes + draw_and_judge(settings, body)
    return run


#: The properties every rule variant has, each with its description.
RULE_PROPERTIES = (("permutation", "environment permutation invariance"),
                   ("sign_flip", "sign-flip equivariance f(-G) = -f(G)"))


def register_checks(stem: str, kinds=RULE_PROPERTIES) -> None:
    """The ``agg.prop.<kind>.<stem>.<dtype>`` checks of one rule variant (``rule`` or ``rule.flavour``)."""
    ((rule, flavour, _),) = rule_variants((stem,))
    for kind, what in kinds:
        for dtype in S.DTYPES:
            register(Check(f"agg.prop.{kind}.{stem}.{dtype}", f"{what}, {stem}, {dtype}", "aggregate",
                           _property_check(kind, rule, flavour, dtype)))


for _kind in RULE_PROPERTIES:  # property outermost: the order of the reports
    for _stem in variant_names():
        register_checks(_stem, (_kind,))
for _dtype in S.DTYPES:
    register(Check(f"agg.prop.tau0_mean.{_dtype}", f"and_mask at tau = 0 equals the mean ({_dtype}; balanced signs "
                   "included)", "aggregate", _property_check("tau0_mean", "and_mask", None, _dtype)))


#: (K, tau) pairs of the keep-rate check.
KEEP_RATE_CASES = ((4, 0.5), (5, 0.6), (7, 1 / 7), (10, 0.6), (16, 0.25), (3, 1.0))
KEEP_RATE_P = 4000


@check("agg.prop.keep_rate", "keep rate on Gaussian gradients = Prop. 2 (keep_probability_threshold), 5 sigma")
def _keep_rate(adapter, settings):
    """Fraction of nonzero outputs of and_mask on i.i.d. Gaussian gradients vs Prop. 2's keep probability."""
    # plain if the target can, else rescaled: rescaling changes no zero into a nonzero (an implementation that always
    # rescales, as DomainBed's, is judged too)
    options = probe(adapter, "and_mask", None, "float32", [{"rescale": False, "k": None}, {"rescale": True, "k": None}])
    if not options:
        return []
    rng = np.random.default_rng(2021)
    notes = []
    for K, tau in KEEP_RATE_CASES:
        G = rng.standard_normal((K, KEEP_RATE_P)).astype(np.float32)
        out = np.asarray(call_aggregate(adapter, [G], "and_mask", tau, options[0]["rescale"])[0], dtype=np.float64)
        judged()
        rate = float(np.mean(out != 0))
        expected = _consistency.keep_probability_threshold(K, tau)
        bound = 5 * math.sqrt(expected * (1 - expected) / KEEP_RATE_P) + 1 / KEEP_RATE_P
        if abs(rate - expected) > bound:
            raise Mismatch(f"keep rate {rate:.4f} vs Prop. 2's {expected:.4f} (allowed +-{bound:.4f}, 5 binomial "
                           f"sigma, P = {KEEP_RATE_P})", {"K": K, "tau": tau, "rate": rate, "expected": expected,
                                                         "dtype": "float32"})
        notes.append(f"K={K} tau={tau:.3g}: {rate:.3f} vs {expected:.3f}")
    return ["compared: " + "; ".join(notes)]
