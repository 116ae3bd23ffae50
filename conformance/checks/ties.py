"""``agg.ties.*``: ties ``|S| = tau K``, which the canonical rule keeps (the paper's >=, with ``ceil(tau K - 1e-9)`` so
that float noise in tau cannot flip one), and tau values carrying float noise, whose divergences are reported, not
failed (the answer depends on the dtype a target compares in)."""

from __future__ import annotations

import numpy as np

from hardtovary.reference.edge_cases import BY_NAME

from .. import strategies as S
from ..compare import AggCase, call_aggregate, compare_aggregate, edge_case_cases, oracle_aggregate, probe, run_cases
from ..judging import current_tally, judge_each
from ..registry import Check, check, register


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


@check("agg.ties.exact", "ties |S| = tau*K with tau = j/K (K = 1..16) are kept; SAND drops them")
def _ties_exact(adapter, settings):
    cases = []
    for K in range(1, 17):
        for j in range(K + 1):
            G = _tie_stack(K, j)
            tau = j / K
            name = f"tie |S|={j}, K={K}, tau={j}/{K}"
            cases += [AggCase(name, [G], "and_mask", tau, False),
                      AggCase(name, [G], "and_mask", tau, True),
                      AggCase(name, [G], "geometric_mean", tau, False, "original"),
                      AggCase(name, [G], "sand_mask", tau, False, None, 10.0)]
    cases += edge_case_cases(BY_NAME["tie"])
    return run_cases(adapter, cases)


#: (tau expression, tau, K, |S|): tau carries float noise around |S|/K.
FLOAT_NOISE_TIES = (("2*0.8-1", 2 * 0.8 - 1, 10, 6), ("0.1*3", 0.1 * 3, 20, 6), ("1-0.8", 1 - 0.8, 5, 1),
                    ("0.3+0.6", 0.3 + 0.6, 10, 9), ("0.7*0.5/0.5", 0.7 * 0.5 / 0.5, 10, 7))


def _ties_float_noise(dtype):
    def run(adapter, settings):
        # plain if the target can, else rescaled (an implementation that always rescales, as DomainBed's)
        options = probe(adapter, "and_mask", None, dtype, [{"rescale": False, "k": None}, {"rescale": True, "k": None}])
        if not options:
            return []
        rescale = options[0]["rescale"]
        cases = []
        for expr, tau, K, s in FLOAT_NOISE_TIES:
            z = (K - s) % 2
            p = (K - z + s) // 2
            tie = np.array([1.0] * p + [-1.0] * (K - z - p) + [0.0] * z)
            far_keep, far_drop = np.ones(K), np.array([1.0, -1.0] * (K // 2) + [0.0] * (K % 2))
            G = np.stack([tie, far_keep, far_drop], axis=1).astype(dtype)
            cases.append(AggCase(f"float-noise tau={expr}, K={K}, |S|={s}", [G], "and_mask", tau, rescale))

        def judge(case):
            G = case.grads[0]
            K, s = G.shape[0], int(abs(np.sign(G[:, 0].astype(np.float64)).sum()))
            out = np.asarray(call_aggregate(adapter, [G], "and_mask", case.tau, rescale)[0], dtype=np.float64)
            o = oracle_aggregate([G], "and_mask", case.tau, False)[0][0]
            # the components far from the tie are decided exactly; the tie itself is reported, not failed
            if not rescale:
                compare_aggregate([G[:, 1:]], [out[1:]], rule="and_mask", tau=case.tau, rescale=False,
                                  case=case.name + ": non-tie components")
            else:  # the factor depends on the tie: judge everything against the tie decided the target's way
                tau_as_decided = s / K if out[0] != 0 else (s + 1) / K
                compare_aggregate([G], [out], rule="and_mask", tau=tau_as_decided, rescale=True,
                                  case=case.name + ": the tie taken as the target decides it")
            if (out[0] == 0) != (o[0] == 0):
                current_tally().divergences.append(
                    f"tie divergence (reported, not failed): {case.name}, tau={case.tau!r}, {dtype}: oracle "
                    f"{'keeps' if o[0] else 'drops'}, target {'keeps' if out[0] else 'drops'}")

        return judge_each(cases, judge)
    return run


for _dtype in S.DTYPES:
    register(Check(f"agg.ties.float_noise.{_dtype}", f"tau with float noise (2*0.8-1, 0.1*3, ...) on {_dtype} stacks: "
                   "tie divergences reported, not failed", "aggregate", _ties_float_noise(_dtype)))
