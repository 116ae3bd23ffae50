"""The built-in conformance target for :mod:`hardtovary.accel.rules` on its NumPy backend.

``hardtovary conformance --target hardtovary.conformance.accel_target:target`` checks the array-module rules (the
code path the CuPy kernels are specified by, run on NumPy) against the oracle. It offers ``aggregate`` only:
``env_gradients``, ``step``, ``temporal`` and ``spirals`` are not part of :mod:`hardtovary.accel.rules` and their
checks are skipped.
"""

from __future__ import annotations

import numpy as np

from hardtovary.accel import rules as _rules
from hardtovary.accel.backend import get_backend, to_numpy
from hardtovary.reference.rules import rule_options


class AccelTarget:
    """Adapter from the target protocol (NumPy in, NumPy out) to :func:`hardtovary.accel.rules.aggregate`."""

    def __init__(self, backend: str = "numpy"):
        self.backend = get_backend(backend)

    def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
        xp = self.backend.xp
        stacks = [xp.asarray(np.array(g, order="C")) for g in grads]  # np.array keeps 0-d/1-d shapes as given
        values, _ = _rules.aggregate(stacks, rule=rule, rescale=bool(rescale), **rule_options(rule, tau, flavour, k))
        return [to_numpy(v) for v in values]


#: ``--target hardtovary.conformance.accel_target:target``
target = AccelTarget("numpy")
