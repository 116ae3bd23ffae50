"""Summary statistics shared by the experiments' tables."""

from __future__ import annotations

import numpy as np


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of ``values``; the deviation is 0.0 for a single value."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def bootstrap_mean_ci(values, *, level: float = 0.95, resamples: int = 10_000, seed: int = 0):
    """Percentile bootstrap confidence interval of the mean of ``values`` over axis 0 (``[n, ...]``: n samples,
    any further axes are intervals computed side by side): ``resamples`` resamples of the n rows with
    replacement, drawn by ``numpy.random.default_rng(seed)``, and the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of their means. Returns ``(low, high)``, each of shape ``values.shape[1:]``."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError(f"bootstrap_mean_ci needs at least one sample on axis 0, got shape {arr.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    rows = np.random.default_rng(seed).integers(0, arr.shape[0], size=(resamples, arr.shape[0]))
    means = arr[rows].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - level) / 2, (1.0 + level) / 2], axis=0)
    return low, high
