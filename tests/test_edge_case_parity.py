"""Every backend against the oracle on the one edge-case table (``hardtovary.reference.edge_cases``): the reference
itself, accel on NumPy, accel on CuPy where a GPU is usable, and torch. Each case runs through the conformance check
it drives, so the judging (decisions exact, values within the dtype's tolerance, float16 masks as float64's,
non-finite input refused or propagated) is the suite's own. The oracle's outcomes are checked by hand-derived routes
in ``tests/test_rules.py``."""

import numpy as np
import pytest

from hardtovary.conformance import checks, runner
from hardtovary.conformance.judging import Settings
from hardtovary.conformance.targets import Adapter, reference
from hardtovary.reference.edge_cases import EDGE_CASES


def _accel(name):
    from hardtovary.accel.backend import get_backend
    from hardtovary.conformance.accel_target import AccelTarget

    try:
        get_backend(name)
    except RuntimeError as exc:  # CuPy asked for where it cannot run: the reason
        pytest.skip(str(exc))
    return AccelTarget(name)


def _torch():
    pytest.importorskip("torch")
    from hardtovary.conformance.torch_target import TorchTarget

    return TorchTarget()


BACKENDS = {"reference": lambda: reference, "accel-numpy": lambda: _accel("numpy"),
            "accel-cupy": lambda: _accel("cupy"), "torch": _torch}


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_agrees_with_the_oracle_on_each_edge_case(backend, case):
    target = BACKENDS[backend]()
    result = runner.run_check(checks.CHECKS[case.check_id()], Adapter(target), Settings())
    assert result.verdict == "pass", result.message
    assert result.compared > 0 and not result.unsupported


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_refuses_non_finite_gradients_naming_the_entry(backend):
    """The backends of this project refuse NaN/inf with a ValueError, as the oracle does (the protocol would also
    accept a non-finite output there; these refuse)."""
    target = BACKENDS[backend]()
    (case,) = [c for c in EDGE_CASES if c.judge == "nonfinite"]
    for _, grads in case.inputs:
        with pytest.raises(ValueError, match="finite"):
            target.aggregate([np.array(G) for G in grads], rule="and_mask", tau=1.0, rescale=False)
