"""The array namespace of :mod:`hardtovary.accel`: CuPy when a usable GPU is present, NumPy otherwise.

The accel functions are written once against an array module ``xp`` (NumPy's API, which CuPy mirrors), so the
code that runs on a GPU is the code that CI tests on NumPy. The choice:

- ``get_backend("numpy")`` or ``get_backend("cupy")`` picks one explicitly; ``get_backend()`` (or ``"auto"``)
  reads the environment variable ``HARDTOVARY_BACKEND`` (``numpy``, ``cupy`` or ``auto``) and otherwise takes CuPy
  when it imports and sees at least one usable CUDA device, NumPy otherwise.
- Asking for CuPy where it cannot run raises ``RuntimeError`` saying why (not installed, no device, driver error).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

ENV_VAR = "HARDTOVARY_BACKEND"
NAMES = ("auto", "numpy", "cupy")


class Backend(NamedTuple):
    """A backend: its ``name`` (``"numpy"`` or ``"cupy"``) and its array module ``xp``."""

    name: str
    xp: object

    def asarray(self, a, dtype=None):
        """``a`` as an array of this backend (copied to the device for CuPy)."""
        return self.xp.asarray(a, dtype=dtype)


def cupy_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether CuPy imports and sees a usable CUDA device, and if not, why not."""
    try:
        import cupy
    except ImportError as exc:
        return False, f"CuPy is not installed ({exc}); pip install 'hardtovary[gpu]' (from a checkout: '.[gpu]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError and driver errors have no common public base class
        return False, f"CuPy cannot reach a CUDA device: {exc}"
    if count < 1:
        return False, "CuPy sees no CUDA device"
    return True, f"CuPy {cupy.__version__} with {count} CUDA device(s)"


def get_backend(name: str | None = None) -> Backend:
    """The backend named ``name`` (``"numpy"``, ``"cupy"`` or ``"auto"``); None reads ``HARDTOVARY_BACKEND``."""
    chosen = name if name is not None else os.environ.get(ENV_VAR, "auto")
    if chosen not in NAMES:
        source = "backend" if name is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"{source} must be one of {list(NAMES)}, got {chosen!r}")
    if chosen == "numpy":
        return Backend("numpy", np)
    usable, reason = cupy_status()
    if chosen == "cupy" and not usable:
        raise RuntimeError(f"backend 'cupy' was asked for but cannot run: {reason}")
    if usable:
        import cupy

        return Backend("cupy", cupy)
    return Backend("numpy", np)


def array_module(*arrays):
    """NumPy or CuPy, whichever the arrays belong to (CuPy if any of them is a CuPy array)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def to_numpy(a) -> np.ndarray:
    """A NumPy array from a NumPy or CuPy array (copied from the device for CuPy)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
