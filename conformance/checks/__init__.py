"""The checks of the conformance suite, registered where they are written (:mod:`..registry`), one module per area.

The order of the areas, and of every report:

- :mod:`.oracle`       ``agg.oracle.<rule>[.<flavour>].<plain|rescaled>.<dtype>``: drawn gradient lists vs the oracle
- :mod:`.special`      ``agg.special.*``: the named edge cases of :mod:`hardtovary.reference.edge_cases`
- :mod:`.ties`         ``agg.ties.exact``, ``agg.ties.float_noise.<dtype>``
- :mod:`.properties`   ``agg.prop.<permutation|sign_flip>.<rule>.<dtype>``, ``agg.prop.tau0_mean.<dtype>``,
  ``agg.prop.keep_rate``
- :mod:`.envgrad`      ``envgrad.<nobn|bn_pooled|bn_per_env>.<bce|ce|mse>``: the MLP
- :mod:`.convnet`      ``envgrad.<fast_resnet|resnet18>.*``, ``envgrad.convnet.*``, ``eval.convnet.*``: convolutional
  networks
- :mod:`.step`         ``step.*``: one AND-mask/optimizer step
- :mod:`.temporal`     ``temporal.*``: Algorithm 1
- :mod:`.spirals`      ``spirals.bit_identical``
"""

from hardtovary.reference.rules import variant_names

from ..registry import CHECKS, Check, UnknownCheck, describe_unknown, matches, order_by_module, select, unknown_patterns
from . import convnet, envgrad, oracle, properties, special, spirals, step, temporal, ties

AREAS = (oracle, special, ties, properties, envgrad, convnet, step, temporal, spirals)
order_by_module(AREAS)


def register_rule(name: str) -> list[str]:
    """The conformance entry of a rule added to the oracle's ``REGISTRY`` after import (see "How to add a rule" in
    :mod:`hardtovary.reference.rules`): registers ``agg.oracle.<variant>.*`` and the property checks of each of its
    variants (once), and returns their ids. The named edge cases run every registered rule already."""
    stems = [v for v in variant_names() if v == name or v.startswith(name + ".")]
    if not stems:
        raise ValueError(f"rule {name!r} is not in hardtovary.reference.rules.REGISTRY; register its oracle first")
    for stem in stems:
        if f"agg.oracle.{stem}.plain.float64" not in CHECKS:  # registered at import when the rule came first
            oracle.register_checks(stem)
            properties.register_checks(stem)
    order_by_module(AREAS)
    return [c for c in CHECKS if any(f".{stem}." in c for stem in stems)]

__all__ = ["AREAS", "CHECKS", "Check", "UnknownCheck", "describe_unknown", "matches", "register_rule", "select",
           "unknown_patterns"]
