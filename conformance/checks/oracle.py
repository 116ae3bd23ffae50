"""``agg.oracle.<rule>[.<flavour>].<plain|rescaled>.<dtype>``: a target's ``aggregate`` against the oracle
(:func:`hardtovary.reference.rules.aggregate`) on one fixed, partially masked stack, then on hypothesis-drawn
gradient lists of that dtype (magnitudes over many orders, exact zeros, sign patterns steered to and from the tie,
1 to 3 tensors). Options that are drawn (the SAND-mask's k) come only from those the target supports."""

from __future__ import annotations

from hypothesis import strategies as st

from hardtovary.reference.rules import variant_names

from .. import strategies as S
from ..compare import (
    PARTIALLY_MASKED,
    AggCase,
    call_aggregate,
    compare_aggregate,
    ks_for,
    probe,
    rule_variants,
    run_cases,
    valid_tau,
)
from ..judging import draw_and_judge
from ..registry import Check, register


def _oracle_check(rule, flavour, rescale, dtype):
    def run(adapter, settings):
        ks = [opt["k"] for opt in probe(adapter, rule, flavour, dtype, [{"rescale": rescale, "k": k}
                                                                         for k in ks_for(rule)])]
        if not ks:
            return []
        notes = run_cases(adapter, [AggCase("partially masked K=3", [PARTIALLY_MASKED.astype(dtype)], rule,
                                            valid_tau(rule, flavour, 0.6), rescale, flavour, ks[0])])

        def body(data):
            K = data.draw(S.env_counts(), label="K")
            tau = valid_tau(rule, flavour, data.draw(S.taus(K), label="tau"))
            k = data.draw(st.sampled_from(ks), label="k")
            n = data.draw(st.integers(1, 3), label="n_tensors")
            grads = [data.draw(S.gradient_stack(K, data.draw(S.param_shapes(), label=f"shape[{i}]"), dtype, tau),
                               label=f"grads[{i}]") for i in range(n)]
            out = call_aggregate(adapter, grads, rule, tau, rescale, flavour, k)
            compare_aggregate(grads, out, rule=rule, tau=tau, rescale=rescale, flavour=flavour, k=k)

        return notes + draw_and_judge(settings, body)
    return run


def register_checks(stem: str) -> None:
    """The ``agg.oracle.<stem>.*`` checks of one rule variant (``rule`` or ``rule.flavour``)."""
    ((rule, flavour, _),) = rule_variants((stem,))
    for rescale in (False, True):
        for dtype in S.DTYPES:
            register(Check(f"agg.oracle.{stem}.{'rescaled' if rescale else 'plain'}.{dtype}",
                           f"aggregate(rule={rule}{', flavour=' + flavour if flavour else ''}, rescale={rescale}) "
                           f"vs the oracle on drawn {dtype} gradient lists", "aggregate",
                           _oracle_check(rule, flavour, rescale, dtype)))


for _stem in variant_names():
    register_checks(_stem)
