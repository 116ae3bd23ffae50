"""``step.*``: one AND-mask training step against the oracle's, in the protocol's order: the rule, then
``l1 sign(theta)`` added after masking (never masked), then Adam or SGD with weight decay coupled ("before") or
decoupled ("after"), over a few steps with the optimizer's state carried along."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from .. import strategies as S
from ..compare import compare_arrays
from ..judging import Mismatch, draw_and_judge
from ..registry import Check, register
from ..targets import ReferenceTarget


def _oracle_steps(params, seq, kw):
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
                compare_arrays(g, e, dict(kw, K=K, seed=seed, step=t + 1, shapes=[list(s) for s in shapes]),
                               what=f"params after step {t + 1}", scale_extra=theta_scale)
        return draw_and_judge(settings, body, cap=25)
    return run


register(Check("step.adam.before", "AND-mask + Adam, coupled weight decay (added after the mask)", "step",
               _step_check("adam", "before")))
register(Check("step.adam.after", "AND-mask + Adam, decoupled weight decay (AdamW)", "step",
               _step_check("adam", "after")))
register(Check("step.sgd.momentum", "AND-mask + SGD momentum 0.9, weight decay before/after", "step",
               _step_check("sgd", None, momentum=0.9)))
register(Check("step.l1_after_mask", "l1 * sign(theta) added after masking (never masked)", "step",
               _step_check("adam", None, l1=0.01)))
