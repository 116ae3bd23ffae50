"""The checks of the conformance suite.

Every check has an ``id`` (dotted; ``--checks`` and the expected-failures file accept ids, prefixes and globs),
a one-line description, the target callable it needs, and a ``run(adapter, settings)`` that returns notes (strings
shown in the report) or raises :class:`Mismatch` with the smallest counterexample found (hypothesis shrinks it).
What a check judged is counted in its :class:`Tally`: the target outputs it compared with the oracle, the
divergences it reports without failing, and the option combinations the target does not support. The runner turns
these into a verdict, and a check that compared nothing never passes.

Families (``<dtype>`` is float64, float32 or float16: each dtype is its own check, so that a crash in one dtype is one
failure and the other dtypes are still judged):

``agg.oracle.<rule>[.<flavour>].<plain|rescaled>.<dtype>``  drawn gradient lists vs ``reference.rules.aggregate``,
                                                            after one fixed, partially masked stack
``agg.special.*``                                    named edge cases, each option combination judged on its own
``agg.ties.exact``, ``agg.ties.float_noise.<dtype>`` ties |S| = tau*K; float-noise ties are reported, not failed
``agg.prop.<permutation|sign_flip>.<rule>.<dtype>``  environment permutation invariance, sign-flip equivariance
``agg.prop.tau0_mean.<dtype>``, ``agg.prop.keep_rate``   tau = 0 is the mean; keep rate on Gaussian gradients
                                                    (Prop. 2, eq. 4)
``envgrad.<nobn|bn_pooled|bn_per_env>.<bce|ce|mse>`` vs ``reference.mlp.env_gradients``
``step.*``                                          one AND-mask/optimizer step vs reference.optim (order: rule,
                                                    then + l1 sign(theta), then the optimizer with weight decay)
``temporal.*``                                      vs ``reference.rules.TemporalAndMaskAdam``
``spirals.bit_identical``                           vs ``reference.data.spirals``, bit for bit

Every property check first judges fixed cases built to sit on its edge (balanced signs for tau = 0, exact zeros for
the sign flip, ties for the permutation), then hypothesis draws. Drawn options (rescaling, the SAND-mask's k) come
only from those the target supports, found by probing it first, so the draws do not depend on what it refuses.

Comparison policy (see :mod:`.tolerances`): decisions exact (a component the oracle masks must come back exactly
0.0), magnitudes within the per-dtype tolerance.
"""

from __future__ import annotations

import contextvars
import difflib
import fnmatch
import math
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from hypothesis import HealthCheck, Phase, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from hardtovary.reference import consistency as _consistency
from hardtovary.reference import data as _data
from hardtovary.reference import mlp as _mlp
from hardtovary.reference import rules as _rules

from . import strategies as S
from . import tolerances as T
from .targets import REFUSALS, Adapter, Unsupported

DTYPES = S.DTYPES

#: Offending components kept per mismatch (the terminal shows the first few unless asked for all).
MAX_OFFENDING = 20


class Mismatch(AssertionError):
    """A target disagrees with the oracle; ``counterexample`` is a JSON-able dict."""

    def __init__(self, message: str, counterexample: dict | None = None):
        super().__init__(message)
        self.message = message
        self.counterexample = counterexample or {}


class UnknownCheck(ValueError):
    """A ``--checks`` pattern or an expected-failures entry that matches no check id."""


@dataclass
class Settings:
    max_examples: int = 30
    shrink: bool = True


@dataclass
class Check:
    id: str
    description: str
    needs: str
    run: Callable[[Adapter, Settings], list]


# ----------------------------------------------------------------------------------------------------------------
# what a check judged
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one check judged: target outputs compared with the oracle (a deliberate refusal of bad input counts),
    divergences reported without failing, option combinations the target does not support, and the seconds
    hypothesis spent shrinking a counterexample."""

    compared: int = 0
    divergences: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    shrink_seconds: float = 0.0


_TALLY: contextvars.ContextVar[Tally] = contextvars.ContextVar("conformance_tally")


@contextmanager
def tallying():
    """Count what the checks run inside this block judged (the runner opens one per check)."""
    tally = Tally()
    token = _TALLY.set(tally)
    try:
        yield tally
    finally:
        _TALLY.reset(token)


def _tally() -> Tally:
    # outside `tallying` (a comparison called directly, e.g. from a test) the counts go to a throwaway tally
    return _TALLY.get(None) or Tally()


def _judged(n: int = 1) -> None:
    _tally().compared += n


def _unsupported(message: str) -> None:
    tally = _tally()
    if message not in tally.unsupported:
        tally.unsupported.append(message)


# ----------------------------------------------------------------------------------------------------------------
# hypothesis
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def _draws_independent_of_loaded_modules():
    """Hypothesis mixes literal constants of the "local" modules loaded in the process (those outside
    site-packages: an editable install, the user's adapter, a conftest) into its draws. The suite's draws must be
    the same by every route (CLI, pytest plugin, ``run_suite``) and installation, so while it draws, that pool is
    empty. Hypothesis offers no public switch for it; without the private hook there is no pool to empty, and
    ``tests/test_conformance.py`` checks that the draws stay independent of the loaded modules."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - a hypothesis without the feature
        yield
        return
    original = getattr(providers, "_get_local_constants", None)
    cache = getattr(getattr(providers, "CONSTANTS_CACHE", None), "cache", None)
    if original is None or cache is None:  # pragma: no cover
        yield
        return
    empty = providers.Constants()
    providers._get_local_constants = lambda: empty
    cache.clear()
    try:
        yield
    finally:
        providers._get_local_constants = original
        cache.clear()


def _phases(settings: Settings) -> tuple:
    return (Phase.explicit, Phase.reuse, Phase.generate) + ((Phase.shrink,) if settings.shrink else ())


def _hypothesis(settings: Settings, body, cap: int | None = None) -> list:
    """Run ``body(data)`` on hypothesis draws (derandomized, no database). A drawn option combination the target
    does not support is recorded in the tally, not failed; the first failure is shrunk unless shrinking is off."""
    tally = _tally()
    failed_at: list[float] = []

    @hsettings(max_examples=max(1, min(settings.max_examples, cap or settings.max_examples)), deadline=None,
               database=None, derandomize=True, report_multiple_bugs=False, print_blob=False,
               suppress_health_check=list(HealthCheck), phases=_phases(settings))
    @given(st.data())
    def run(data):
        try:
            body(data)
        except Unsupported as exc:
            _unsupported(str(exc))
        except BaseException:
            if not failed_at:
                failed_at.append(time.perf_counter())
            raise

    with _draws_independent_of_loaded_modules():
        try:
            run()
        finally:
            if failed_at and settings.shrink:
                tally.shrink_seconds += time.perf_counter() - failed_at[0]
    return ["compared on drawn inputs"]


# ----------------------------------------------------------------------------------------------------------------
# aggregate: cases, the oracle and the comparison
# ----------------------------------------------------------------------------------------------------------------


def _jsonable(x):
    a = np.asarray(x)
    if a.dtype.kind == "f":
        return [float(v) if np.isfinite(v) else str(v) for v in a.ravel()] if a.ndim else (
            float(a) if np.isfinite(a) else str(a))
    return a.tolist()


def _combos():
    """(rule, flavour) pairs with their check-id stem."""
    return [("mean", None, "mean"), ("and_mask", None, "and_mask"), ("geometric_mean", "paper",
            "geometric_mean.paper"), ("geometric_mean", "original", "geometric_mean.original"),
            ("sand_mask", None, "sand_mask")]


def _valid_tau(rule, flavour, tau):
    if rule == "mean":
        return 0.0
    if rule == "geometric_mean" and flavour == "paper":
        return 1.0
    return tau


#: SAND-mask sharpness values the suite uses; other rules take no k.
SAND_KS = (10.0, 1.0, 100.0)


def _ks(rule) -> tuple:
    return SAND_KS if rule == "sand_mask" else (None,)


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


def _oracle_aggregate(grads, rule, tau, rescale, flavour=None, k=None):
    return _rules.aggregate([np.asarray(g) for g in grads], rule=rule, rescale=rescale,
                            **_rules.rule_options(rule, tau, flavour, k))


def _call_agg(adapter, grads, rule, tau, rescale, flavour=None, k=None):
    return adapter.aggregate(grads, rule=rule, tau=tau, rescale=rescale, flavour=flavour, k=k)


def _component(G64, o, t64, bound, ix, cause, threshold) -> dict:
    p, q, z = (int(c) for c in (np.sum(G64[(slice(None),) + ix] > 0), np.sum(G64[(slice(None),) + ix] < 0),
                                np.sum(G64[(slice(None),) + ix] == 0)))
    return {"index": list(ix), "cause": cause, "p": p, "q": q, "z": z, "S": p - q, "threshold": threshold,
            "oracle": float(o[ix]), "target": _jsonable(t64[ix]), "allowed_error": float(bound[ix]),
            "G": _jsonable(G64[(slice(None),) + ix])}


def _why_masked(rule, flavour, S_abs, K, threshold) -> str:
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
        why = _why_masked(rule, flavour, int(S_abs[ix]), K, threshold)
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
            _component(G64, o, t64, bound, ix, f"oracle masks it ({_why_masked(rule, flavour, int(S_abs[ix]), K, threshold)})",
                       threshold) for ix in masked[:MAX_OFFENDING]]
        both = (o != 0) & (t64 != 0) & np.isfinite(t64)
        if np.any(both):
            ratio = t64[both] / o[both]
            if np.allclose(ratio, ratio[0], rtol=1e-6, atol=0) and not math.isclose(ratio[0], 1.0, rel_tol=1e-6):
                details["uniform_ratio"] = float(ratio[0])
                details["implied_kept"] = kept / float(ratio[0])
    return details


def compare_aggregate(grads, out, *, rule, tau, rescale, flavour=None, k=None, case=None, oracle=None):
    """Raise Mismatch unless ``out`` matches the oracle on ``grads`` (decisions exact, values within tolerance)."""
    _judged()
    grads = [np.asarray(g) for g in grads]
    dtype = grads[0].dtype
    tol = T.for_dtype(dtype)
    values, masks = oracle or _oracle_aggregate(grads, rule, tau, rescale, flavour, k)
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
    divergences = _tally().divergences
    for ix in [tuple(int(v) for v in ix) for ix in np.argwhere(excused & ~T.within(t64, o, bound))][:3]:
        message = (f"sign of a cancelling mean (reported, not failed){' in ' + case if case else ''}: "
                   f"K={K}, G[:, j]={_jsonable(G64[(slice(None),) + ix])}: oracle {float(o[ix])!r}, "
                   f"target {float(t64[ix])!r}")
        if len(divergences) < 10 and message not in divergences:
            divergences.append(message)
    return excused


def _judge_aggregate(adapter, case: AggCase) -> None:
    out = _call_agg(adapter, case.grads, **case.options())
    compare_aggregate(case.grads, out, case=case.name, **case.options())


def _judge_each(cases, judge) -> list:
    """Judge every case on its own: a case that fails or crashes is one failure, and the others are still judged.
    Cases the target does not support are recorded in the tally."""
    failures, judged, unsupported = [], 0, 0
    for case in cases:
        try:
            judge(case)
        except Unsupported as exc:
            unsupported += 1
            _unsupported(f"{case.label()}: {exc}")
            continue
        except Exception as exc:  # a Mismatch, or the target crashing on this case
            failures.append((case, exc))
        judged += 1
    if failures:
        raise _case_failures(failures, judged)
    return [f"judged {judged} case{'s' if judged != 1 else ''}" + (f" ({unsupported} unsupported)" if unsupported
                                                                   else "")]


def _case_failures(failures, n_cases) -> Mismatch:
    case, first = failures[0]
    if isinstance(first, Mismatch):
        message, cx = first.message, dict(first.counterexample)
    else:
        message = f"{type(first).__name__}: {first}"
        cx = {"case": case.name, "traceback": "".join(traceback.format_exception(first, limit=-6))[-2000:]}
    cx["failed_cases"] = [{"case": c.label(), "error": e.message if isinstance(e, Mismatch)
                           else f"{type(e).__name__}: {e}"} for c, e in failures[:MAX_OFFENDING]]
    head = f"{len(failures)} of {n_cases} cases failed; first, {case.label()}: " if n_cases > 1 else ""
    return Mismatch(head + message, cx)


def _run_cases(adapter, cases) -> list:
    return _judge_each(cases, lambda case: _judge_aggregate(adapter, case))


def _all_rules(grads, taus=(0.0, 0.5, 1.0), rescales=(False, True), name="case", sand_ks=(10.0,)):
    for rule, flavour, _ in _combos():
        for tau in sorted({_valid_tau(rule, flavour, t) for t in taus}):
            for rescale in rescales:
                for k in (sand_ks if rule == "sand_mask" else (None,)):
                    yield AggCase(name, grads, rule, tau, rescale, flavour, k)


def _probe(adapter, rule, flavour, dtype, options: list[dict]) -> list[dict]:
    """The option dicts (``rescale``, ``k``) the target accepts for ``rule`` on a small stack of ``dtype``, at
    tau 0.6 or 1. An option the target crashes on is kept: the check then judges the crash."""
    G = PARTIALLY_MASKED.astype(dtype)
    supported = []
    for opt in options:
        for tau in sorted({_valid_tau(rule, flavour, 0.6), _valid_tau(rule, flavour, 1.0)}):
            try:
                _call_agg(adapter, [G.copy()], rule, tau, opt["rescale"], flavour, opt["k"])
            except Unsupported as exc:
                _unsupported(f"{rule}{'/' + flavour if flavour else ''} rescale={opt['rescale']} "
                             f"{'k=' + format(opt['k'], 'g') + ' ' if opt['k'] else ''}{dtype}: {exc}")
                continue
            except Exception:  # noqa: S110 - a crash is judged by the check that uses this option
                pass
            supported.append(opt)
            break
    return supported


# ----------------------------------------------------------------------------------------------------------------
# aggregate: oracle comparison on drawn inputs
# ----------------------------------------------------------------------------------------------------------------


#: A stack that every ``agg.oracle`` check compares first, whatever hypothesis draws: K = 3, four components of which
#: tau = 0.6 keeps two (|S| = 3) and masks two (|S| = 1), so the rescaling factor is 2 and a target that rescales
#: when it should not, or does not when it should, differs here. Its values are exact in every dtype.
PARTIALLY_MASKED = np.array([[1.0, -1.0, 2.0, 0.5], [1.0, 1.0, 3.0, -0.5], [2.0, -1.0, 1.0, 0.5]])


def _oracle_check(rule, flavour, rescale, dtype):
    def run(adapter, settings):
        ks = [opt["k"] for opt in _probe(adapter, rule, flavour, dtype, [{"rescale": rescale, "k": k}
                                                                          for k in _ks(rule)])]
        if not ks:
            return []
        notes = _run_cases(adapter, [AggCase("partially masked K=3", [PARTIALLY_MASKED.astype(dtype)], rule,
                                             _valid_tau(rule, flavour, 0.6), rescale, flavour, ks[0])])

        def body(data):
            K = data.draw(S.env_counts(), label="K")
            tau = _valid_tau(rule, flavour, data.draw(S.taus(K), label="tau"))
            k = data.draw(st.sampled_from(ks), label="k")
            n = data.draw(st.integers(1, 3), label="n_tensors")
            grads = [data.draw(S.gradient_stack(K, data.draw(S.param_shapes(), label=f"shape[{i}]"), dtype, tau),
                               label=f"grads[{i}]") for i in range(n)]
            out = _call_agg(adapter, grads, rule, tau, rescale, flavour, k)
            compare_aggregate(grads, out, rule=rule, tau=tau, rescale=rescale, flavour=flavour, k=k)

        return notes + _hypothesis(settings, body)
    return run


# ----------------------------------------------------------------------------------------------------------------
# aggregate: named special cases
# ----------------------------------------------------------------------------------------------------------------


def _special_all_zeros(adapter, settings):
    cases = list(_all_rules([np.zeros((3, 4))], name="all zeros K=3"))
    cases += list(_all_rules([np.zeros((1, 2, 2))], name="all zeros K=1"))
    return _run_cases(adapter, cases)


def _special_k1(adapter, settings):
    G = np.array([[1.5, -2.0, 0.0, 3.0]])
    return _run_cases(adapter, _all_rules([G], name="K=1 with one zero of 4"))


def _special_identical(adapter, settings):
    G = np.tile(np.array([1.0, -2.0, 0.5, 3.0]), (4, 1))
    return _run_cases(adapter, _all_rules([G], taus=(1.0, 0.5), name="identical gradients"))


def _special_exact_zeros(adapter, settings):
    # columns: p=2,z=2 | +,0,- ,0 | p=3,z=1 | q=1,z=3 | p=2,q=1,z=1
    G = np.array([[1.0, 1.0, 1.0, -1.0, 2.0],
                  [2.0, 0.0, 3.0, 0.0, 1.0],
                  [0.0, -1.0, 0.5, 0.0, -1.0],
                  [0.0, 0.0, 0.0, 0.0, 0.0]])
    return _run_cases(adapter, _all_rules([G], taus=(0.25, 0.5, 0.75, 1.0), name="exact zeros"))


def _special_partial_agreement(adapter, settings):
    G = np.array([[1.0, 2.0, -1.0], [2.0, -1.0, -3.0], [4.0, 3.0, -2.0], [0.5, 1.0, -1.0]])  # column 1: 3 of 4
    return _run_cases(adapter, _all_rules([G], taus=(0.5, 0.75, 1.0), name="partial agreement"))


def _special_one_env_zero(adapter, settings):
    G = np.array([[1.0, 1.0], [2.0, 2.0], [0.0, 3.0]])
    return _run_cases(adapter, _all_rules([G], taus=(0.5, 2 / 3, 1.0), name="(1, 2, 0)"))


def _special_fully_masked(adapter, settings):
    G0 = np.array([[1.0, -1.0, 2.0], [-1.0, 1.0, -2.0]])   # every component disagrees
    G1 = np.array([[1.0, 2.0], [3.0, -1.0]])
    cases = [c for c in _all_rules([G0, G1], taus=(1.0,), rescales=(True, False), name="fully masked tensor")
             if c.rule != "mean"]
    return _run_cases(adapter, cases)


def _special_per_tensor_rescale(adapter, settings):
    G0 = np.array([[1.0, 2.0, -1.0, 4.0], [1.0, 1.0, 1.0, 2.0], [2.0, 5.0, -3.0, 1.0]])  # 3 of 4 kept at tau=1
    G1 = np.array([[1.0, -2.0], [2.0, 1.0], [1.0, 1.0]])                                  # 1 of 2 kept
    cases = [c for c in _all_rules([G0, G1], taus=(1.0,), rescales=(True,), name="two tensors, rescaled")
             if c.rule != "mean"]
    return _run_cases(adapter, cases)


def _special_underflow(adapter, settings):
    G32 = np.full((16, 6), 1e-3, dtype=np.float32)
    G32[:, 3:] *= -1
    G64 = np.full((16, 3), 1e-20)
    cases = []
    for G, name in ((G32, "K=16 |g|=1e-3 float32"), (G64, "K=16 |g|=1e-20 float64")):
        cases += [AggCase(name, [G], "geometric_mean", 1.0, False, "paper"),
                  AggCase(name, [G], "geometric_mean", 1.0, False, "original"),
                  AggCase(name, [G], "and_mask", 1.0, False),
                  AggCase(name, [G], "mean", 0.0, False)]
    return _run_cases(adapter, cases)


def _special_float16(adapter, settings):
    rng = np.random.default_rng(16)
    G16 = (rng.standard_normal((5, 3, 4)) * 10.0 ** rng.integers(-3, 2, (5, 3, 4))).astype(np.float16)
    G16[1, 0, :2] = 0

    def judge(case):
        out16 = _call_agg(adapter, case.grads, **case.options())
        compare_aggregate(case.grads, out16, case=case.name, **case.options())
        out64 = _call_agg(adapter, [G16.astype(np.float64)], **case.options())
        same_zeros = (np.asarray(out16[0], dtype=np.float64) == 0) == (np.asarray(out64[0], dtype=np.float64) == 0)
        if not np.all(same_zeros):
            raise Mismatch("float16 input masks differently from float64 input holding the same values",
                           {"case": case.name, "rule": case.rule, "tau": case.tau, "flavour": case.flavour,
                            "rescale": case.rescale})

    return _judge_each(_all_rules([G16], taus=(0.0, 0.6, 1.0), name="float16"), judge)


def _special_nonfinite(adapter, settings):
    """Pass: for every rule, the target either refuses the non-finite stack with one of ``targets.REFUSALS`` while
    accepting (and computing correctly) the same stack with a finite value in that place, or returns a non-finite
    value at the component holding the NaN/inf. Fail: a finite value there (the bad entry silently dropped or
    masked), a refusal of the finite stack, or any other exception (a wrong signature is not a refusal)."""
    finite = np.array([[1.0, 2.0, 3.0], [1.0, 5.0, 2.0], [2.0, 1.0, 1.0]])

    def judge(case):
        try:
            _judge_aggregate(adapter, AggCase(case.name + " (finite twin)", [finite.copy()], case.rule, case.tau,
                                              case.rescale, case.flavour, case.k))
        except REFUSALS as exc:
            raise Mismatch(f"refuses the finite twin too ({type(exc).__name__}: {exc}): a refusal counts only when "
                           "the same stack with finite values is accepted", {"rule": case.rule, "tau": case.tau,
                                                                            "rescale": case.rescale}) from exc
        try:
            out = _call_agg(adapter, case.grads, **case.options())
        except REFUSALS:
            _judged()
            return
        _judged()
        value = np.asarray(out[0], dtype=np.float64).reshape(-1)
        if np.isfinite(value[1]):
            raise Mismatch(f"{case.name}: gave a finite value {value[1]} at the bad component (silently dropped)",
                           {"rule": case.rule, "flavour": case.flavour, "rescale": case.rescale, "tau": case.tau,
                            "K": 3, "G": _jsonable(case.grads[0][:, 1]), "target": _jsonable(value)})

    cases = []
    for bad in (np.nan, np.inf, -np.inf):
        G = finite.copy()
        G[1, 1] = bad
        cases += [c for c in _all_rules([G], taus=(1.0,), name=f"{bad} in environment 1")]
    notes = _judge_each(cases, judge)
    return notes


# ----------------------------------------------------------------------------------------------------------------
# ties
# ----------------------------------------------------------------------------------------------------------------


def _tie_stack(K: int, j: int) -> np.ndarray:
    """Columns with |S| = j (kept at tau = j/K), j-1 and j-2 (dropped), fixing parity with exact zeros."""
    cols = []
    for s in (j, j - 1, j - 2):
        if s < 0:
            continue
        for sign in (1, -1):
            z = (K - s) % 2
            if s + z > K:
                continue
            p = (K - z + s) // 2
            q = K - z - p
            cols.append(sign * np.array([1.5] * p + [-0.75] * q + [0.0] * z))
    return np.stack(cols, axis=1)


def _ties_exact(adapter, settings):
    cases = []
    for K in range(1, 17):
        for j in range(0, K + 1):
            G = _tie_stack(K, j)
            tau = j / K
            name = f"tie |S|={j}, K={K}, tau={j}/{K}"
            cases += [AggCase(name, [G], "and_mask", tau, False),
                      AggCase(name, [G], "and_mask", tau, True),
                      AggCase(name, [G], "geometric_mean", tau, False, "original"),
                      AggCase(name, [G], "sand_mask", tau, False, None, 10.0)]
    cases.append(AggCase("(+,+,+,-) tau=0.5", [np.array([[1.0], [2.0], [0.5], [-1.0]])], "and_mask", 0.5, False))
    return _run_cases(adapter, cases)


#: (tau expression, tau, K, |S|): tau carries float noise around |S|/K.
FLOAT_NOISE_TIES = (("2*0.8-1", 2 * 0.8 - 1, 10, 6), ("0.1*3", 0.1 * 3, 20, 6), ("1-0.8", 1 - 0.8, 5, 1),
                    ("0.3+0.6", 0.3 + 0.6, 10, 9), ("0.7*0.5/0.5", 0.7 * 0.5 / 0.5, 10, 7))


def _ties_float_noise(dtype):
    def run(adapter, settings):
        cases = []
        for expr, tau, K, s in FLOAT_NOISE_TIES:
            z = (K - s) % 2
            p = (K - z + s) // 2
            tie = np.array([1.0] * p + [-1.0] * (K - z - p) + [0.0] * z)
            far_keep, far_drop = np.ones(K), np.array([1.0, -1.0] * (K // 2) + [0.0] * (K % 2))
            G = np.stack([tie, far_keep, far_drop], axis=1).astype(dtype)
            cases.append(AggCase(f"float-noise tau={expr}, K={K}, |S|={s}", [G], "and_mask", tau, False))

        def judge(case):
            G = case.grads[0]
            out = np.asarray(_call_agg(adapter, [G], "and_mask", case.tau, False)[0], dtype=np.float64)
            o = _oracle_aggregate([G], "and_mask", case.tau, False)[0][0]
            # the components far from the tie are decided exactly; the tie itself is reported, not failed
            compare_aggregate([G[:, 1:]], [out[1:]], rule="and_mask", tau=case.tau, rescale=False,
                              case=case.name + ": non-tie components")
            if (out[0] == 0) != (o[0] == 0):
                _tally().divergences.append(
                    f"tie divergence (reported, not failed): {case.name}, tau={case.tau!r}, {dtype}: oracle "
                    f"{'keeps' if o[0] else 'drops'}, target {'keeps' if out[0] else 'drops'}")

        return _judge_each(cases, judge)
    return run


# ----------------------------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------------------------

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
        first = _call_agg(adapter, grads, "and_mask", 0.0, case.rescale)
        second = _call_agg(adapter, grads, "mean", 0.0, case.rescale)
        sign, what = 1.0, "and_mask(tau=0) vs mean"
    else:
        first = _call_agg(adapter, grads, **case.options())
        if kind == "permutation":
            other = [G[np.asarray(case.perm, dtype=np.int64)] for G in grads]
            sign, what = 1.0, f"environments permuted by {list(case.perm)}"
        else:
            other = [-G for G in grads]
            sign, what = -1.0, "f(-G) vs -f(G)"
        second = _call_agg(adapter, other, **case.options())
    _judged()
    values, masks = _oracle_aggregate(grads, **case.options())
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
                                  "first": float(a[ix]), "second": float(b[ix]), "G": _jsonable(col)})
            raise Mismatch(f"{what}: outputs differ at {int(bad.sum())} component(s)", {
                "case": case.name, "rule": case.rule, "flavour": case.flavour, "tau": case.tau,
                "rescale": case.rescale, "k": case.k, "K": G64.shape[0], "dtype": T.dtype_name(G.dtype),
                "tensor": i, "offending": offending})


def _property_check(kind, rule, flavour, dtype):
    """``kind`` is permutation, sign_flip or tau0_mean (which compares and_mask at tau 0 with the mean)."""
    def run(adapter, settings):
        options = [{"rescale": r, "k": k} for r in (False, True) for k in _ks(rule)]
        options = _probe(adapter, rule, flavour, dtype, options)
        if kind == "tau0_mean":
            mean_ok = _probe(adapter, "mean", None, dtype, options)
            options = [o for o in options if o in mean_ok]
        if not options:
            return []
        G = PROPERTY_STACK.astype(dtype)
        perms = PROPERTY_PERMUTATIONS if kind == "permutation" else (None,)
        taus = (0.0,) if kind == "tau0_mean" else sorted({_valid_tau(rule, flavour, t) for t in PROPERTY_TAUS})
        fixed = [PropertyCase(f"fixed K=4 stack ({kind})", [G], rule, tau, opt["rescale"], flavour, opt["k"], perm)
                 for tau in taus for opt in options for perm in perms]
        notes = _judge_each(fixed, lambda case: _judge_property(adapter, kind, case))

        def body(data):
            K = data.draw(S.env_counts(), label="K")
            tau = 0.0 if kind == "tau0_mean" else _valid_tau(rule, flavour, data.draw(S.taus(K), label="tau"))
            opt = data.draw(st.sampled_from(options), label="options")
            grads = [data.draw(S.gradient_stack(K, data.draw(S.param_shapes(), label="shape"), dtype, tau),
                               label="grads[0]")]
            perm = tuple(data.draw(st.permutations(range(K)), label="perm")) if kind == "permutation" else None
            _judge_property(adapter, kind, PropertyCase("drawn", grads, rule, tau, opt["rescale"], flavour,
                                                        opt["k"], perm))

        return notes + _hypothesis(settings, body)
    return run


#: (K, tau) pairs of the keep-rate check.
KEEP_RATE_CASES = ((4, 0.5), (5, 0.6), (7, 1 / 7), (10, 0.6), (16, 0.25), (3, 1.0))
KEEP_RATE_P = 4000


def _keep_rate(adapter, settings):
    """Fraction of nonzero outputs of and_mask on i.i.d. Gaussian gradients vs Prop. 2's keep probability."""
    rng = np.random.default_rng(2021)
    notes = []
    for K, tau in KEEP_RATE_CASES:
        G = rng.standard_normal((K, KEEP_RATE_P)).astype(np.float32)
        out = np.asarray(_call_agg(adapter, [G], "and_mask", tau, False)[0], dtype=np.float64)
        _judged()
        rate = float(np.mean(out != 0))
        expected = _consistency.keep_probability_threshold(K, tau)
        bound = 5 * math.sqrt(expected * (1 - expected) / KEEP_RATE_P) + 1 / KEEP_RATE_P
        if abs(rate - expected) > bound:
            raise Mismatch(f"keep rate {rate:.4f} vs Prop. 2's {expected:.4f} (allowed +-{bound:.4f}, 5 binomial "
                           f"sigma, P = {KEEP_RATE_P})", {"K": K, "tau": tau, "rate": rate, "expected": expected,
                                                         "dtype": "float32"})
        notes.append(f"K={K} tau={tau:.3g}: {rate:.3f} vs {expected:.3f}")
    return ["compared: " + "; ".join(notes)]


# env_gradients
# ----------------------------------------------------------------------------------------------------------------

LOSSES = {"bce": "bce_with_logits", "ce": "cross_entropy", "mse": "mse"}
BN_MODES = {"nobn": (False, "pooled"), "bn_pooled": (True, "pooled"), "bn_per_env": (True, "per_env")}


def _envgrad_check(bn_mode, loss_key):
    batch_norm, semantics = BN_MODES[bn_mode]
    loss = LOSSES[loss_key]

    def run(adapter, settings):
        def body(data):
            in_f = data.draw(st.integers(1, 4), label="in_features")
            hidden = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1 if batch_norm else 0, max_size=2),
                                     label="hidden"))
            out_f = 1 if loss == "bce_with_logits" else data.draw(st.integers(1, 3), label="out_features")
            activation = data.draw(st.sampled_from(("leaky_relu", "relu", "tanh")), label="activation")
            K = data.draw(st.integers(1, 4), label="K")
            B = data.draw(st.integers(2 if batch_norm else 1, 4), label="B")
            seed = data.draw(st.integers(0, 2**16), label="seed")
            spec = dict(in_features=in_f, hidden=hidden, out_features=out_f, activation=activation,
                        negative_slope=0.01, batch_norm=batch_norm, bn_eps=1e-5)
            mspec = _mlp.MLPSpec(**spec)
            rng = np.random.default_rng(seed)
            params = _mlp.init_params(mspec, rng)
            if batch_norm:  # non-trivial gamma/beta
                params = [p + 0.1 * rng.standard_normal(p.shape) for p in params]
            X = rng.standard_normal((K, B, in_f))
            if loss == "bce_with_logits":
                Y = rng.integers(0, 2, (K, B)).astype(np.float64)
            elif loss == "cross_entropy":
                Y = rng.integers(0, out_f, (K, B))
            else:
                Y = rng.standard_normal((K, B, out_f))
            expected = _mlp.env_gradients(mspec, params, X, Y, loss=loss, semantics=semantics).grads
            got = adapter.env_gradients(spec, params, X, Y, loss=loss, semantics=semantics)
            # Rounding in a backward pass is relative to the magnitudes flowing through it, not to each tensor's own
            # size: a Linear bias feeding BatchNorm has a gradient that is exactly 0 in exact arithmetic and
            # rounding noise (~1e-17) in any implementation. The global gradient scale is added to each tensor's.
            global_scale = max((float(np.abs(e).max()) for e in expected if e.size), default=0.0)
            _compare_lists(got, expected, {"spec": spec, "K": K, "B": B, "seed": seed, "loss": loss,
                                           "semantics": semantics}, what="grads", scale_extra=global_scale)
        return _hypothesis(settings, body, cap=15)
    return run


def _compare_lists(got, expected, ctx: dict, what: str, scale_extra: float = 0.0):
    _judged()
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
                           dict(ctx, tensor=i, index=list(ix), target=_jsonable(g[ix]), oracle=float(e[ix]),
                                n_bad=int((~ok).sum())))


# ----------------------------------------------------------------------------------------------------------------
# step
# ----------------------------------------------------------------------------------------------------------------


def _oracle_steps(params, seq, kw):
    from .targets import ReferenceTarget
    ref, state, out = ReferenceTarget(), None, []
    for grads in seq:
        params, state = ref.step(params, grads, state=state, **kw)
        out.append(params)
    return out


def _step_check(optimizer, order_choice, *, l1=0.0, momentum=0.0):
    def run(adapter, settings):
        def body(data):
            K = data.draw(st.integers(1, 6), label="K")
            shapes = data.draw(st.lists(S.param_shapes(max_dims=2, max_side=4), min_size=1, max_size=2),
                               label="shapes")
            n_steps = data.draw(st.integers(1, 3), label="n_steps")
            seed = data.draw(st.integers(0, 2**16), label="seed")
            rule = "and_mask" if l1 else data.draw(st.sampled_from(("and_mask", "mean")), label="rule")
            tau = 0.0 if rule == "mean" else data.draw(st.sampled_from((1.0, 0.5) if l1 else (1.0, 0.5, 0.0)),
                                                       label="tau")
            rescale = data.draw(st.booleans(), label="rescale")
            wd = data.draw(st.sampled_from((0.1, 0.0, 0.01)), label="weight_decay")
            order = order_choice or data.draw(st.sampled_from(("before", "after")), label="weight_decay_order")
            rng = np.random.default_rng(seed)
            params = [np.asarray(rng.standard_normal(s)) for s in shapes]
            seq = []
            for _ in range(n_steps):
                grads = []
                for s in shapes:
                    G = np.asarray(rng.standard_normal((K,) + tuple(s)) * 10.0 ** rng.integers(-2, 2))
                    G[rng.random(G.shape) < 0.1] = 0.0
                    grads.append(G)
                seq.append(grads)
            kw = dict(rule=rule, tau=tau, rescale=rescale, optimizer=optimizer, lr=0.01 if optimizer == "adam"
                      else 0.05, weight_decay=wd, weight_decay_order=order, l1=l1, momentum=momentum)
            expected = _oracle_steps(params, seq, kw)
            got = adapter.steps(params, seq, **kw)
            if len(got) != len(expected):
                raise Mismatch(f"returned {len(got)} parameter lists for {len(expected)} steps", kw)
            theta_scale = max(float(np.abs(p).max()) for p in params) + kw["lr"] * n_steps * 10
            for t, (g, e) in enumerate(zip(got, expected)):
                _compare_lists(g, e, dict(kw, K=K, seed=seed, step=t + 1, shapes=[list(s) for s in shapes]),
                               what=f"params after step {t + 1}", scale_extra=theta_scale)
        return _hypothesis(settings, body, cap=25)
    return run


# ----------------------------------------------------------------------------------------------------------------
# temporal
# ----------------------------------------------------------------------------------------------------------------


def _oracle_temporal(params, seq, kw):
    opt = _rules.TemporalAndMaskAdam(params, kw["lr"], beta1=kw["beta1"], beta2=kw["beta2"], beta3=kw["beta3"],
                                     tau=kw["tau"], eps=kw["eps"], bias_correction=kw["bias_correction"])
    out, margin = [], np.inf
    for grads in seq:
        params, _ = opt.step(params, grads)
        a = opt.a if not kw["bias_correction"] else [x / (1 - kw["beta3"] ** opt.t) for x in opt.a]
        margin = min(margin, min(float(np.min(np.abs(np.abs(x) - kw["tau"]))) for x in a))
        out.append(params)
    return out, margin


def _temporal_check(bias_correction):
    def run(adapter, settings):
        def body(data):
            shapes = data.draw(st.lists(S.param_shapes(max_dims=2, max_side=4), min_size=1, max_size=2),
                               label="shapes")
            n_steps = data.draw(st.integers(1, 8), label="n_steps")
            seed = data.draw(st.integers(0, 2**16), label="seed")
            beta3 = data.draw(st.sampled_from((0.8, 0.5, 0.9)), label="beta3")
            tau = data.draw(st.sampled_from((0.15, 0.35, 0.55, 0.0)), label="tau")
            kw = dict(lr=0.01, beta1=0.9, beta2=0.999, beta3=beta3, tau=tau, eps=1e-8,
                      bias_correction=bias_correction)
            rng = np.random.default_rng(seed)
            params = [np.asarray(rng.standard_normal(s)) for s in shapes]
            bias = [np.asarray(rng.standard_normal(s)) for s in shapes]
            seq = []
            for _ in range(n_steps):
                grads = [np.asarray(b + 0.7 * rng.standard_normal(s)) for b, s in zip(bias, shapes)]
                for g in grads:
                    g[rng.random(g.shape) < 0.1] = 0.0
                seq.append(grads)
            expected, margin = _oracle_temporal(params, seq, kw)
            assume(margin > 1e-6 or tau == 0.0)  # |a| within 1e-6 of tau is a tie in the target's dtype
            got = adapter.temporal(params, seq, **kw)
            if len(got) != len(expected):
                raise Mismatch(f"returned {len(got)} parameter lists for {len(expected)} steps", kw)
            for t, (g, e) in enumerate(zip(got, expected)):
                _compare_lists(g, e, dict(kw, seed=seed, step=t + 1, shapes=[list(s) for s in shapes]),
                               what=f"params after step {t + 1}", scale_extra=kw["lr"] * (t + 1) * 10)
        return _hypothesis(settings, body, cap=25)
    return run


def _temporal_zero_state(adapter, settings):
    """beta3 = 0.8, tau = 0.5: |a| = 0.2 after one step, so nothing moves (zero initial state)."""
    params = [np.array([1.0, -2.0, 0.5])]
    seq = [[np.array([0.3, -0.2, 0.1])]] * 5
    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, beta3=0.8, tau=0.5, eps=1e-8, bias_correction=False)
    expected, _ = _oracle_temporal(params, seq, kw)
    got = adapter.temporal(params, seq, **kw)
    for t, (g, e) in enumerate(zip(got, expected)):
        _compare_lists(g, e, dict(kw, step=t + 1), what=f"params after step {t + 1}", scale_extra=1.0)
    return ["compared 5 steps"]


# ----------------------------------------------------------------------------------------------------------------
# spirals
# ----------------------------------------------------------------------------------------------------------------

SPIRALS_CASES = ((64, 3, 0, 2, 8, 0), (100, 1.5, 1, 3, 0, 7), (50, 3, "test", 4, 4, 123),
                 (1024, 3, 5, 8, 8, 2**32 - 1), (2, 0.5, 0, 1, 1, 1))


def _spirals(adapter, settings):
    for args in SPIRALS_CASES:
        X0, y0 = _data.spirals(*args)
        X, y = adapter.spirals(*args)
        _judged()
        for name, got, exp in (("X", X, X0), ("y", y, y0)):
            if got.dtype != exp.dtype or got.shape != exp.shape or not np.array_equal(got, exp):
                diff = int(np.sum(got != exp)) if got.shape == exp.shape else None
                raise Mismatch(f"spirals{args}: {name} not bit-identical (dtype {got.dtype} vs {exp.dtype}, shape "
                               f"{got.shape} vs {exp.shape}, {diff} entries differ)",
                               {"args": list(map(str, args)), "array": name, "n_diff": diff})
    return [f"compared {len(SPIRALS_CASES)} cases bit for bit"]


# ----------------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------


def _build() -> list[Check]:
    checks = []
    for rule, flavour, stem in _combos():
        for rescale in (False, True):
            for dtype in DTYPES:
                cid = f"agg.oracle.{stem}.{'rescaled' if rescale else 'plain'}.{dtype}"
                checks.append(Check(cid, f"aggregate(rule={rule}{', flavour=' + flavour if flavour else ''}, "
                                    f"rescale={rescale}) vs the oracle on drawn {dtype} gradient lists", "aggregate",
                                    _oracle_check(rule, flavour, rescale, dtype)))
    specials = [
        ("agg.special.all_zeros", "all gradients 0 (K = 3 and K = 1), every rule/tau/rescale", _special_all_zeros),
        ("agg.special.k1", "K = 1 with an exact zero: identity at tau = 0, zeros masked and x4/3 rescaled above",
         _special_k1),
        ("agg.special.identical", "identical gradients in every environment (tau = 1 and 0.5)", _special_identical),
        ("agg.special.exact_zeros", "exact zeros count as sign 0 (threshold form, not count form)",
         _special_exact_zeros),
        ("agg.special.partial_agreement", "3 of 4 signs agree (+,-,+,+): paper GM 0, and_mask kept iff tau <= 1/2",
         _special_partial_agreement),
        ("agg.special.one_env_zero", "gradients (1, 2, 0): paper GM 0, original GM ~5.8e-4", _special_one_env_zero),
        ("agg.special.fully_masked", "a fully masked tensor, rescaled, is exactly 0 (never inf/NaN)",
         _special_fully_masked),
        ("agg.special.per_tensor_rescale", "rescaling uses each tensor's own kept fraction",
         _special_per_tensor_rescale),
        ("agg.special.underflow", "K = 16, |g| = 1e-3 in float32 (and 1e-20 in float64): GM must not underflow",
         _special_underflow),
        ("agg.special.float16", "float16 input: oracle values, same masks as float64 input of the same values",
         _special_float16),
        ("agg.special.nonfinite", "NaN/inf in one environment: refused (ValueError or FloatingPointError) while the "
         "finite twin is accepted, or non-finite at that component (never finite)", _special_nonfinite),
        ("agg.ties.exact", "ties |S| = tau*K with tau = j/K (K = 1..16) are kept; SAND drops them", _ties_exact),
    ]
    checks += [Check(cid, desc, "aggregate", fn) for cid, desc, fn in specials]
    for dtype in DTYPES:
        checks.append(Check(f"agg.ties.float_noise.{dtype}", f"tau with float noise (2*0.8-1, 0.1*3, ...) on {dtype} "
                            "stacks: tie divergences reported, not failed", "aggregate", _ties_float_noise(dtype)))
    for kind, what in (("permutation", "environment permutation invariance"),
                       ("sign_flip", "sign-flip equivariance f(-G) = -f(G)")):
        for rule, flavour, stem in _combos():
            for dtype in DTYPES:
                checks.append(Check(f"agg.prop.{kind}.{stem}.{dtype}", f"{what}, {stem}, {dtype}", "aggregate",
                                    _property_check(kind, rule, flavour, dtype)))
    for dtype in DTYPES:
        checks.append(Check(f"agg.prop.tau0_mean.{dtype}", f"and_mask at tau = 0 equals the mean ({dtype}; balanced "
                            "signs included)", "aggregate", _property_check("tau0_mean", "and_mask", None, dtype)))
    checks.append(Check("agg.prop.keep_rate", "keep rate on Gaussian gradients = Prop. 2 "
                        "(keep_probability_threshold), 5 sigma", "aggregate", _keep_rate))
    for bn_mode in BN_MODES:
        for loss_key in LOSSES:
            checks.append(Check(f"envgrad.{bn_mode}.{loss_key}",
                                f"env_gradients ({bn_mode}, {LOSSES[loss_key]}) vs reference.mlp.env_gradients",
                                "env_gradients", _envgrad_check(bn_mode, loss_key)))
    checks += [
        Check("step.adam.before", "AND-mask + Adam, coupled weight decay (added after the mask)", "step",
              _step_check("adam", "before")),
        Check("step.adam.after", "AND-mask + Adam, decoupled weight decay (AdamW)", "step",
              _step_check("adam", "after")),
        Check("step.sgd.momentum", "AND-mask + SGD momentum 0.9, weight decay before/after", "step",
              _step_check("sgd", None, momentum=0.9)),
        Check("step.l1_after_mask", "l1 * sign(theta) added after masking (never masked)", "step",
              _step_check("adam", None, l1=0.01)),
        Check("temporal.oracle", "Algorithm 1 as printed (no bias correction) vs TemporalAndMaskAdam", "temporal",
              _temporal_check(False)),
        Check("temporal.bias_correction", "Algorithm 1 with bias_correction=True", "temporal",
              _temporal_check(True)),
        Check("temporal.zero_state", "zero initial state: beta3 = 0.8, tau = 0.5 moves nothing at first", "temporal",
              _temporal_zero_state),
        Check("spirals.bit_identical", "spirals bit-identical to reference.data.spirals", "spirals", _spirals),
    ]
    return checks


CHECKS: dict[str, Check] = {c.id: c for c in _build()}


def matches(check_id: str, pattern: str) -> bool:
    """A check id matches a pattern that equals it, that it extends by ``.<more>`` (a prefix), or that matches it
    as a glob."""
    return check_id == pattern or check_id.startswith(pattern + ".") or fnmatch.fnmatchcase(check_id, pattern)


def unknown_patterns(patterns) -> list[str]:
    """The patterns that match no check id."""
    return [p for p in patterns if not any(matches(c, p) for c in CHECKS)]


def describe_unknown(patterns, what: str) -> str:
    """A one-line message for patterns that match no check id, with the closest ids."""
    hints = []
    for p in patterns:
        close = difflib.get_close_matches(p, list(CHECKS), n=2, cutoff=0.6)
        hints.append(f"{p!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return f"unknown check id{'s' if len(patterns) > 1 else ''} in {what}: {', '.join(hints)}; " \
           f"see the ids with --list"


def select(patterns=None) -> list[Check]:
    """Checks whose id matches one of the patterns (all checks without patterns). Raises :class:`UnknownCheck`
    for a pattern that matches nothing."""
    if not patterns:
        return list(CHECKS.values())
    unknown = unknown_patterns(patterns)
    if unknown:
        raise UnknownCheck(describe_unknown(unknown, "--checks"))
    return [c for c in CHECKS.values() if any(matches(c.id, p) for p in patterns)]
