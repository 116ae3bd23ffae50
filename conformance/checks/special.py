"""``agg.special.*``: the named edge cases of :mod:`hardtovary.reference.edge_cases`, one check per case, each option
combination judged on its own (a case that fails or crashes is one failure; the others are still judged).

Most cases compare with the oracle; ``float16`` also requires the masks of float64 input holding the same values,
and ``nonfinite`` passes a deliberate refusal (:data:`hardtovary.conformance.protocol.REFUSALS`, while the finite
twin is accepted) or a non-finite value where the bad entry is, never a finite one."""

from __future__ import annotations

import numpy as np

from hardtovary.reference.edge_cases import EDGE_CASES

from ..compare import AggCase, call_aggregate, compare_aggregate, edge_case_cases, judge_aggregate
from ..judging import Mismatch, jsonable, judge_each, judged
from ..protocol import REFUSALS
from ..registry import Check, register


def _judge_float16(adapter, case: AggCase) -> None:
    out16 = call_aggregate(adapter, case.grads, **case.options())
    compare_aggregate(case.grads, out16, case=case.name, **case.options())
    out64 = call_aggregate(adapter, [G.astype(np.float64) for G in case.grads], **case.options())
    same_zeros = (np.asarray(out16[0], dtype=np.float64) == 0) == (np.asarray(out64[0], dtype=np.float64) == 0)
    if not np.all(same_zeros):
        raise Mismatch("float16 input masks differently from float64 input holding the same values",
                       {"case": case.name, "rule": case.rule, "tau": case.tau, "flavour": case.flavour,
                        "rescale": case.rescale})


def _judge_nonfinite(adapter, case: AggCase, finite_twin) -> None:
    try:
        judge_aggregate(adapter, AggCase(case.name + " (finite twin)", [G.copy() for G in finite_twin], case.rule,
                                         case.tau, case.rescale, case.flavour, case.k))
    except REFUSALS as exc:
        raise Mismatch(f"refuses the finite twin too ({type(exc).__name__}: {exc}): a refusal counts only when "
                       "the same stack with finite values is accepted", {"rule": case.rule, "tau": case.tau,
                                                                        "rescale": case.rescale}) from exc
    try:
        out = call_aggregate(adapter, case.grads, **case.options())
    except REFUSALS:
        judged()
        return
    judged()
    for G, value in zip(case.grads, out):
        bad = ~np.all(np.isfinite(G), axis=0).reshape(-1)
        value = np.asarray(value, dtype=np.float64).reshape(-1)
        for j in np.flatnonzero(bad & np.isfinite(value)):
            raise Mismatch(f"{case.name}: gave a finite value {value[j]} at the bad component (silently dropped)",
                           {"rule": case.rule, "flavour": case.flavour, "rescale": case.rescale, "tau": case.tau,
                            "K": G.shape[0], "G": jsonable(G.reshape(G.shape[0], -1)[:, j]),
                            "target": jsonable(value)})


def _special_check(edge_case):
    def run(adapter, settings):
        if edge_case.judge == "float16":
            judge = lambda case: _judge_float16(adapter, case)  # noqa: E731
        elif edge_case.judge == "nonfinite":
            judge = lambda case: _judge_nonfinite(adapter, case, edge_case.finite_twin)  # noqa: E731
        else:
            judge = lambda case: judge_aggregate(adapter, case)  # noqa: E731
        return judge_each(edge_case_cases(edge_case), judge)
    return run


for _case in EDGE_CASES:
    if _case.check_id().startswith("agg.special."):
        register(Check(_case.check_id(), _case.title, "aggregate", _special_check(_case)))
