"""``temporal.*``: Algorithm 1 of the paper (App. B.6, the temporal AND-mask Adam) against
:class:`hardtovary.reference.rules.TemporalAndMaskAdam`: as printed (no bias correction), with bias correction, and
from its zero initial state."""

from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from hardtovary.reference import rules as _rules

from .. import strategies as S
from ..compare import compare_arrays
from ..judging import Mismatch, draw_and_judge
from ..registry import Check, check, register


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
                compare_arrays(g, e, dict(kw, seed=seed, step=t + 1, shapes=[list(s) for s in shapes]),
                               what=f"params after step {t + 1}", scale_extra=kw["lr"] * (t + 1) * 10)
        return draw_and_judge(settings, body, cap=25)
    return run


register(Check("temporal.oracle", "Algorithm 1 as printed (no bias correction) vs TemporalAndMaskAdam", "temporal",
               _temporal_check(False)))
register(Check("temporal.bias_correction", "Algorithm 1 with bias_correction=True", "temporal",
               _temporal_check(True)))


@check("temporal.zero_state", "zero initial state: beta3 = 0.8, tau = 0.5 moves nothing at first", needs="temporal")
def _temporal_zero_state(adapter, settings):
    """beta3 = 0.8, tau = 0.5: |a| = 0.2 after one step, so nothing moves (zero initial state)."""
    params = [np.array([1.0, -2.0, 0.5])]
    seq = [[np.array([0.3, -0.2, 0.1])]] * 5
    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, beta3=0.8, tau=0.5, eps=1e-8, bias_correction=False)
    expected, _ = _oracle_temporal(params, seq, kw)
    got = adapter.temporal(params, seq, **kw)
    for t, (g, e) in enumerate(zip(got, expected)):
        compare_arrays(g, e, dict(kw, step=t + 1), what=f"params after step {t + 1}", scale_extra=1.0)
    return ["compared 5 steps"]
