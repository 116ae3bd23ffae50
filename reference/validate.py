"""Input validation shared by every package of hardtovary (the oracle, accel, the experiments): public by design.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, range or
non-finite entries) with a message that names the argument, what was expected and what was received.
"""

from __future__ import annotations

import numbers

import numpy as np


def float_array(x, name: str, *, min_ndim: int = 0) -> np.ndarray:
    """Return ``x`` as a NumPy array of a real floating dtype, without copying when it already is one.

    Raises TypeError for integer, boolean, complex or object input, and ValueError for fewer than
    ``min_ndim`` dimensions.
    """
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be an array of a real floating dtype (float16/32/64), got dtype {arr.dtype}")
    if arr.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {arr.shape}")
    return arr


def non_finite_error(name: str, count: int, index: tuple, value) -> ValueError:
    """The error for an array ``name`` with ``count`` non-finite entries, the first at ``index`` with ``value``
    (shared by the NumPy, CuPy and torch validators, so that every backend words it alike)."""
    return ValueError(f"{name} must be finite, but {count} entr{'y is' if count == 1 else 'ies are'} not; "
                      f"the first is {name}[{', '.join(map(str, index))}] = {value}")


def finite(arr: np.ndarray, name: str) -> np.ndarray:
    """Raise ValueError naming the first non-finite entry of ``arr``; return ``arr`` unchanged otherwise."""
    bad = ~np.isfinite(arr)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise non_finite_error(name, int(bad.sum()), index, arr[index])
    return arr


def gradient_stack(G, name: str = "G") -> np.ndarray:
    """Validate a per-environment gradient stack ``G[K, *shape]``: real floating, finite, K >= 1."""
    arr = float_array(G, name, min_ndim=1)
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one environment (K >= 1) on axis 0, got shape {arr.shape}")
    return finite(arr, name)


def real_number(x, name: str) -> float:
    """Return ``x`` as a Python float; TypeError for bools, strings and other non-reals, ValueError for NaN/inf."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}")
    value = float(x)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def in_range(x, name: str, low: float, high: float) -> float:
    """Return ``x`` as a float after checking ``low <= x <= high``."""
    value = real_number(x, name)
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def positive(x, name: str, *, allow_zero: bool = False) -> float:
    """Return ``x`` as a float after checking ``x > 0`` (or ``x >= 0`` with ``allow_zero``)."""
    value = real_number(x, name)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def integer(x, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``x`` as an int after checking its type and ``low <= x <= high``."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(x).__name__} {x!r}")
    value = int(x)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must lie in {bounds}, got {value}")
    return value


def choice(x, name: str, options) -> str:
    """Return ``x`` after checking it is one of ``options``."""
    if x not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {x!r}")
    return x


def consistent_stacks(stacks, name: str = "grads") -> None:
    """Check that a list of gradient stacks (NumPy, CuPy or torch arrays) shares one K on axis 0 and one dtype."""
    K0, dtype0 = stacks[0].shape[0], stacks[0].dtype
    for i, G in enumerate(stacks):
        if G.shape[0] != K0:
            raise ValueError(
                f"every gradient stack must have the same number of environments K on axis 0: {name}[0] has "
                f"K={K0}, {name}[{i}] has K={G.shape[0]} (shape {tuple(G.shape)})"
            )
    for i, G in enumerate(stacks):
        if G.dtype != dtype0:
            raise TypeError(
                f"every gradient stack must have the same dtype: {name}[0] is {dtype0}, {name}[{i}] is {G.dtype}"
            )


def parameter_arrays(params, shapes, names, listed: str) -> list[np.ndarray]:
    """A network's ``params`` (a list or tuple in parameter order) checked against its ``shapes``: count, real
    floating dtype, shape and finiteness, each error naming the parameter (``names``); ``listed`` describes the
    expected names in the count error. Returns them as float64 arrays."""
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of arrays in parameter order, got {type(params).__name__}")
    if len(params) != len(shapes):
        raise ValueError(f"params must hold {len(shapes)} arrays ({listed}), got {len(params)}")
    checked = []
    for i, (value, shape, name) in enumerate(zip(params, shapes, names)):
        label = f"params[{i}] ({name})"
        arr = float_array(value, label)
        if arr.shape != shape:
            raise ValueError(f"{label} must have shape {shape}, got {arr.shape}")
        checked.append(finite(arr, label).astype(np.float64, copy=False))
    return checked
