"""Comparing a target's outputs with the oracle: the cases of ``aggregate`` and how each output is judged.

- :class:`AggCase`: one call of ``aggregate`` (inputs and options) with its label; :func:`all_rules` spans the rule
  variants of one input, :func:`probe` finds which options a target supports.
- :func:`compare_aggregate`: decisions exact (a component the oracle masks must come back exactly 0.0), magnitudes
  within the per-dtype tolerance (:mod:`.tolerances`); a mismatch lists the components where a decision differs
  first, then the values, each with its sign counts.
- :func:`compare_arrays`: lists of arrays (gradients, parameters after optimizer steps) within tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hardtovary.reference import rules as _rules
from hardtovary.reference.rules import RuleSpec, variant_names

from . import strategies as S
from . import tolerances as T
from .judging import MAX_OFFENDING, Mismatch, current_tally, jsonable, judge_each, judged, record_unsupported
from .targets import Unsupported

#: A stack that every ``agg.oracle`` check compares first, whatever hypothesis draws: K = 3, four components of which
#: tau = 0.6 keeps two (|S| = 3) and masks two (|S| = 1), so the rescaling factor is 2 and a target that rescales
#: when it should not, or does not when it should, differs here. Its values are exact in every dtype.
PARTIALLY_MASKED = np.array([[1.0, -1.0, 2.0, 0.5], [1.0, 1.0, 3.0, -0.5], [2.0, -1.0, 1.0, 0.5]])


def variant(stem: str) -> tuple[str, str | None]:
    """``"geometric_mean.paper"`` -> ``("geometric_mean", "paper")``, ``"and_mask"`` -> ``("and_mask", None)``."""
    rule, _, flavour = stem.partition(".")
    return rule, flavour or None


def rule_variants(stems=None):
    """(rule, flavour, stem) of each rule variant (every registered one by default), in the order of the checks."""
    return [(*variant(stem), stem) for stem in (variant_names() if stems is None else stems)]


def valid_tau(rule, flavour, tau):
    """``tau`` if the rule accepts it (:class:`~hardtovary.reference.rules.RuleSpec`), else the rule's default: 0
    for a rule without a threshold (the mean), 1 for the paper geometric mean."""
    try:
        return RuleSpec(rule, tau, flavour).tau
    except ValueError:
        return RuleSpec(rule, None, flavour).tau


def ks_for(rule) -> tuple:
    """The sharpness values drawn for a rule: its default, a tenth and ten times it (SAND-mask: 10, 1, 100); (None,)
    for a rule without one."""
    k = _rules.REGISTRY[rule].k
    return (None,) if k is None else (k, k / 10, k * 10)


@dataclass(eq=False)
class AggCase:
    """One call of ``aggregate`` with everything needed to judge it."""

    name: str
    grads: list
    rule: str
    tau: float
    rescale: bool
    flavour: str | None = None
    k: float | None = None

    def label(self) -> str:
        rule = self.rule + (f"/{self.flavour}" if self.flavour else "")
        k = f" k={self.k:g}" if self.k is not None else ""
        dtype = np.asarray(self.grads[0]).dtype
        return f"{self.name} [{rule} tau={self.tau:.4g} rescale={self.rescale}{k} {dtype}]"

    def options(self) -> dict:
        return dict(rule=self.rule, tau=self.tau, rescale=self.rescale, flavour=self.flavour, k=self.k)


def oracle_aggregate(grads, rule, tau, rescale, flavour=None, k=None):
    return _rules.aggregate([np.asarray(g) for g in grads], rule=rule, rescale=rescale,
                            **_rules.rule_options(rule, tau, flavour, k))


def call_aggregate(adapter, grads, rule, tau, rescale, flavour=None, k=None):
    return adapter.aggregate(grads, rule=rule, tau=tau, rescale=rescale, flavour=flavour, k=k)


def _component(G64, o, t64, bound, ix, cause, threshold) -> dict:
    p, q, z = (int(c) for c in (np.sum(G64[(slice(None),) + ix] > 0), np.sum(G64[(slice(None),) + ix] < 0),
                                np.sum(G64[(slice(None),) + ix] == 0)))
    return {"index": list(ix), "cause": cause, "p": p, "q": q, "z": z, "S": p - q, "threshold": threshold,
            "oracle": float(o[ix]), "target": jsonable(t64[ix]), "allowed_error": float(bound[ix]),
            "G": jsonable(G64[(slice(None),) + ix])}


def _why_masked(rule, flavour, S_abs, threshold) -> str:
    if rule == "and_mask" or (rule == "geometric_mean" and flavour == "original"):
        return f"|S|={S_abs} < {threshold}"
    if rule == "geometric_mean":
        return "signs not unanimous"
    if rule == "sand_mask":
        return "soft mask 0: agreement <= tau"
    return ""


def _mismatch_details(G64, o, t64, m64, bound, value_bad, decision_bad, *, rule, flavour, tau, rescale) -> dict:
    """The offending components, those where a decision differs first, and for a rescaled rule the components the
    oracle masks (the usual cause of a uniformly wrong rescaling factor)."""
    K = G64.shape[0]
    threshold = S.threshold(tau, K) if tau is not None else None
    S_abs = np.abs(np.sign(G64).sum(axis=0)).astype(int)
    dropped = value_bad & (o != 0) & (t64 == 0)
    bad = decision_bad | value_bad
    ranked = sorted((tuple(int(v) for v in ix) for ix in np.argwhere(bad)),
                    key=lambda ix: (0 if decision_bad[ix] else 1 if dropped[ix] else 2, ix))
    offending = []
    for ix in ranked[:MAX_OFFENDING]:
        why = _why_masked(rule, flavour, int(S_abs[ix]), threshold)
        if decision_bad[ix]:
            cause = f"oracle masks it ({why}), target keeps it"
        elif dropped[ix]:
            cause = "oracle keeps it, target returns 0"
        else:
            cause = f"value off by {abs(float(t64[ix]) - float(o[ix])):.3g} (allowed {float(bound[ix]):.3g})"
        offending.append(_component(G64, o, t64, bound, ix, cause, threshold))
    details = {"offending": offending, "n_bad": int(bad.sum()), "n_components": int(o.size)}
    if rescale and rule != "mean":
        kept = float(m64.sum())
        masked = [tuple(int(v) for v in ix) for ix in np.argwhere(m64 == 0)]
        details["oracle_kept"] = [kept, int(m64.size)]
        details["oracle_masked"] = [
            _component(G64, o, t64, bound, ix,
                       f"oracle masks it ({_why_masked(rule, flavour, int(S_abs[ix]), threshold)})", threshold)
            for ix in masked[:MAX_OFFENDING]]
        both = (o != 0) & (t64 != 0) & np.isfinite(t64)
        if np.any(both):
            ratio = t64[both] / o[both]
            if np.allclose(ratio, ratio[0], rtol=1e-6, atol=0) and not math.isclose(ratio[0], 1.0, rel_tol=1e-6):
                details["uniform_ratio"] = float(ratio[0])
                details["implied_kept"] = kept / float(ratio[0])
    return details


def compare_aggregate(grads, out, *, rule, tau, rescale, flavour=None, k=None, case=None, oracle=None):
    """Raise Mismatch unless ``out`` matches the oracle on ``grads`` (decisions exact, values within tolerance)."""
    judged()
    grads = [np.asarray(g) for g in grads]
    dtype = grads[0].dtype
    tol = T.for_dtype(dtype)
    values, masks = oracle or oracle_aggregate(grads, rule, tau, rescale, flavour, k)
    K = grads[0].shape[0]
    base = {"case": case, "rule": rule, "flavour": flavour, "k": k, "tau": tau, "rescale": rescale,
            "K": K, "dtype": T.dtype_name(dtype), "shapes": [list(g.shape) for g in grads]}
    if len(out) != len(grads):
        raise Mismatch(f"returned {len(out)} arrays for {len(grads)} parameter tensors", base)
    for i, (G, o, m, t) in enumerate(zip(grads, values, masks, out)):
        t = np.asarray(t)
        if t.shape != o.shape:
            raise Mismatch(f"tensor {i}: returned shape {t.shape}, expected {o.shape}", base)
        t64 = t.astype(np.float64)
        G64 = G.astype(np.float64)
        m64 = np.asarray(m, dtype=np.float64)
        kept = float(m64.sum())
        factor = (m64.size / kept) if (rescale and kept > 0) else 1.0
        scale = (np.abs(G64).max(axis=0) if G64.size else np.zeros(o.shape)) * factor
        bound = tol.bound(o, scale, K)
        if rule == "geometric_mean":
            # exp(mean log|g|) evaluated in the target's dtype: a relative error of |mean log|g|| * eps from the
            # log-domain mean is inherent (5e-6 in float32 near |g| ~ 1e-37), so it is allowed on top.
            with np.errstate(divide="ignore"):
                logs = np.abs(np.log(np.abs(o)))
            bound = bound + np.where(np.isfinite(logs), logs, 0.0) * tol.eps * np.abs(o)
        decision_bad = (m64 == 0) & (t64 != 0)
        value_bad = ~T.within(t64, o, bound)
        if rule == "geometric_mean" and flavour == "original" and np.any(value_bad):
            value_bad &= ~_sign_of_cancelling_mean(G64, o, t64, m64, bound, tol, case)
        if np.any(decision_bad | value_bad):
            details = _mismatch_details(G64, o, t64, m64, bound, value_bad, decision_bad, rule=rule,
                                        flavour=flavour, tau=tau, rescale=rescale)
            kind = "decision (masked component not exactly 0)" if np.any(decision_bad) else "value"
            raise Mismatch(f"tensor {i}: {details['n_bad']} of {details['n_components']} component(s) differ from "
                           f"the oracle ({kind})", dict(base, tensor=i, **details))


def _sign_of_cancelling_mean(G64, o, t64, m64, bound, tol, case) -> np.ndarray:
    """The kept components of the authors' geometric mean where the sign of the mean is undecidable in the target's
    dtype (tolerances, widening 4) and the target returned 0 or the oracle's value with either sign: excused, and
    reported as a divergence."""
    K = G64.shape[0]
    doubt = tol.sign_undecidable(_rules.mean_gradient(G64), np.abs(G64).max(axis=0), K) & (m64 != 0)
    excused = doubt & ((t64 == 0) | T.within(-t64, o, bound))
    divergences = current_tally().divergences
    for ix in [tuple(int(v) for v in ix) for ix in np.argwhere(excused & ~T.within(t64, o, bound))][:3]:
        message = (f"sign of a cancelling mean (reported, not failed){' in ' + case if case else ''}: "
                   f"K={K}, G[:, j]={jsonable(G64[(slice(None),) + ix])}: oracle {float(o[ix])!r}, "
                   f"target {float(t64[ix])!r}")
        if len(divergences) < 10 and message not in divergences:
            divergences.append(message)
    return excused


def judge_aggregate(adapter, case: AggCase) -> None:
    out = call_aggregate(adapter, case.grads, **case.options())
    compare_aggregate(case.grads, out, case=case.name, **case.options())


def run_cases(adapter, cases) -> list:
    return judge_each(cases, lambda case: judge_aggregate(adapter, case))


def all_rules(grads, taus=(0.0, 0.5, 1.0), rescales=(False, True), name="case", stems=None):
    """The cases of one input for each rule variant (``stems``, in order; every registered one by default), tau
    (made valid for the rule: 0 for the mean, 1 for the paper geometric mean) and rescaling choice, with the rule's
    default sharpness."""
    for rule, flavour, _ in rule_variants(stems):
        for tau in sorted({valid_tau(rule, flavour, t) for t in taus}):
            for rescale in rescales:
                for k in ks_for(rule)[:1]:
                    yield AggCase(name, grads, rule, tau, rescale, flavour, k)


def edge_case_cases(case) -> list:
    """The :class:`AggCase` list of one :class:`hardtovary.reference.edge_cases.EdgeCase`, inputs outermost (copies
    of the table's arrays: a target that writes into its input cannot change the table)."""
    return [c for label, grads in case.inputs
            for c in all_rules([G.copy() for G in grads], case.taus, case.rescales, label, stems=case.rule_variants())]


def probe(adapter, rule, flavour, dtype, options: list[dict]) -> list[dict]:
    """The option dicts (``rescale``, ``k``) the target accepts for ``rule`` on a small stack of ``dtype``, at
    tau 0.6 or 1. An option the target crashes on is kept: the check then judges the crash."""
    G = PARTIALLY_MASKED.astype(dtype)
    supported = []
    for opt in options:
        for tau in sorted({valid_tau(rule, flavour, 0.6), valid_tau(rule, flavour, 1.0)}):
            try:
                call_aggregate(adapter, [G.copy()], rule, tau, opt["rescale"], flavour, opt["k"])
            except Unsupported as exc:
                record_unsupported(f"{rule}{'/' + flavour if flavour else ''} rescale={opt['rescale']} "
                             f"{'k=' + format(opt['k'], 'g') + ' ' if opt['k'] else ''}{dtype}: {exc}")
                continue
            except Exception:  # noqa: S110 - a crash is judged by the check that uses this option
                pass
            supported.append(opt)
            break
    return supported


def compare_arrays(got, expected, ctx: dict, what: str, scale_extra: float = 0.0):
    judged()
    if len(got) != len(expected):
        raise Mismatch(f"returned {len(got)} arrays, expected {len(expected)}", ctx)
    for i, (g, e) in enumerate(zip(got, expected)):
        g = np.asarray(g)
        if g.shape != e.shape:
            raise Mismatch(f"{what}[{i}]: shape {g.shape}, expected {e.shape}", ctx)
        tol = T.for_dtype(g.dtype)
        scale = (np.abs(e).max() if e.size else 0.0) + scale_extra
        bound = tol.bound(e, scale, 1)
        ok = T.within(g, e, bound)
        if not np.all(ok):
            ix = tuple(int(v) for v in np.argwhere(~ok)[0])
            raise Mismatch(f"{what}[{i}] differs from the oracle at {list(ix)}: target {g[ix]!r}, oracle {e[ix]!r}",
                           dict(ctx, tensor=i, index=list(ix), target=jsonable(g[ix]), oracle=float(e[ix]),
                                n_bad=int((~ok).sum())))
