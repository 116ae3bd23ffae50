"""The checks of the conformance suite, registered where they are written (:mod:`..registry`), one module per area.

The order of the areas, and of every report:

- :mod:`.oracle`       ``agg.oracle.<rule>[.<flavour>].<plain|rescaled>.<dtype>``: drawn gradient lists vs the oracle
- :mod:`.special`      ``agg.special.*``: the named edge cases of :mod:`hardtovary.reference.edge_cases`
- :mod:`.ties`         ``agg.ties.exact``, ``agg.ties.float_noise.<dtype>``
- :mod:`.properties`   ``agg.prop.<permutation|sign_flip>.<rule>.<dtype>``, ``agg.prop.tau0_mean.<dtype>``,
  ``agg.prop.keep_rate``
- :mod:`.envgrad`      ``envgrad.<nobn|bn_pooled|bn_per_env>.<bce|ce|mse>``
- :mod:`.step`         ``step.*``: one AND-mask/optimizer step
- :mod:`.temporal`     ``temporal.*``: Algorithm 1
- :mod:`.spirals`      ``spirals.bit_identical``
"""

from ..registry import CHECKS, Check, UnknownCheck, describe_unknown, matches, order_by_module, select, unknown_patterns
from . import envgrad, oracle, properties, special, spirals, step, temporal, ties

order_by_module((oracle, special, ties, properties, envgrad, step, temporal, spirals))

__all__ = ["CHECKS", "Check", "UnknownCheck", "describe_unknown", "matches", "select", "unknown_patterns"]
