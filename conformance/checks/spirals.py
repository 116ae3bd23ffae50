"""``spirals.bit_identical``: the synthetic task's dataset, bit for bit against
:func:`hardtovary.reference.data.spirals` (itself bit-identical to the authors' generator)."""

from __future__ import annotations

import numpy as np

from hardtovary.reference import data as _data

from ..judging import Mismatch, judged
from ..registry import check

SPIRALS_CASES = ((64, 3, 0, 2, 8, 0), (100, 1.5, 1, 3, 0, 7), (50, 3, "test", 4, 4, 123),
                 (1024, 3, 5, 8, 8, 2**32 - 1), (2, 0.5, 0, 1, 1, 1))


@check("spirals.bit_identical", "spirals bit-identical to reference.data.spirals", needs="spirals")
def _spirals(adapter, settings):
    for args in SPIRALS_CASES:
        X0, y0 = _data.spirals(*args)
        X, y = adapter.spirals(*args)
        judged()
        for name, got, exp in (("X", X, X0), ("y", y, y0)):
            if got.dtype != exp.dtype or got.shape != exp.shape or not np.array_equal(got, exp):
                diff = int(np.sum(got != exp)) if got.shape == exp.shape else None
                raise Mismatch(f"spirals{args}: {name} not bit-identical (dtype {got.dtype} vs {exp.dtype}, shape "
                               f"{got.shape} vs {exp.shape}, {diff} entries differ)",
                               {"args": list(map(str, args)), "array": name, "n_diff": diff})
    return [f"compared {len(SPIRALS_CASES)} cases bit for bit"]
