"""Per-example losses and their derivatives with respect to the logits.

Each function works on one example per leading index: ``logits`` has shape ``[..., C]`` (C logits per example)
and the result has one entry per example (shape ``logits.shape[:-1]``) or, for derivatives, the shape of
``logits``. Reductions are the caller's: the MLP takes ``L_e`` as the mean of the per-example losses of
environment e (paper §2), so its upstream gradient is ``loss_gradient(...) / B``.

Kinds (named as the PyTorch losses they reproduce):

``"bce_with_logits"``
    One logit per example (``C == 1``), targets in [0, 1] of shape ``logits.shape[:-1]``, real floating
    (torch's ``BCEWithLogitsLoss`` takes float targets; integer labels are refused). With ``z`` the logit::

        l(z, y) = max(z, 0) - z y + log1p(exp(-|z|))     (= -y log s(z) - (1 - y) log(1 - s(z)))
        dl/dz   = s(z) - y,                               s = logistic sigmoid (scipy.special.expit)

    The form above never exponentiates a positive number, so it is finite and exact for any finite ``z``
    (e.g. ``l(1000, 0) = 1000``, ``l(1000, 1) = 0``).

``"cross_entropy"``
    ``C >= 1`` logits. Targets are either *hard* (integer class indices in ``[0, C)``, shape
    ``logits.shape[:-1]``) or *soft* (real floating probability rows of shape ``logits.shape``, nonnegative,
    each row summing to 1 within ``SOFT_TARGET_ATOL``). The dtype decides, as in ``torch.nn.CrossEntropyLoss``::

        l(z, y) = logsumexp(z) - sum_c y_c z_c            (hard: y = one_hot(class))
        dl/dz   = softmax(z) - y

``"mse"``
    Targets of the shape of ``logits``; the per-example loss is the mean over the last axis, as torch's
    ``MSELoss(reduction='mean')`` averages over every element::

        l(z, y) = (1/C) sum_c (z_c - y_c)^2
        dl/dz   = 2 (z - y) / C

Every function computes in float64 whatever the real floating input dtype and returns float64 (the oracle's
precision, ``docs/conventions.md``). Inputs are validated: unknown kind, shape mismatches, non-floating logits,
non-finite values, class indices out of range and invalid probability rows raise ``TypeError``/``ValueError``
naming the argument.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, logsumexp, softmax

from .validate import choice, finite, float_array

LOSS_KINDS = ("bce_with_logits", "cross_entropy", "mse")

#: Tolerance on the row sums of soft cross-entropy targets.
SOFT_TARGET_ATOL = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _validated(kind, logits, targets, *, logits_name: str = "logits", targets_name: str = "targets"):
    """Check a (kind, logits, targets) triple and return ``(logits, targets, form)`` in computing dtypes.

    ``logits`` comes back as float64 ``[..., C]``. ``targets`` comes back as float64, except hard cross-entropy
    targets, which come back as int64 class indices. ``form`` is ``"hard"`` or ``"soft"`` for cross-entropy and
    ``None`` otherwise. The argument names in messages can be changed so that callers (the MLP) can report their
    own names (e.g. ``Y``).
    """
    if not isinstance(kind, str):
        raise TypeError(f"loss kind must be a string, one of {list(LOSS_KINDS)}, got {type(kind).__name__} {kind!r}")
    choice(kind, "loss kind", LOSS_KINDS)
    z = finite(float_array(logits, logits_name, min_ndim=1), logits_name).astype(np.float64, copy=False)
    n_logits = z.shape[-1]
    if n_logits == 0:
        raise ValueError(f"{logits_name} must have at least one logit on its last axis, got shape {z.shape}")
    y = np.asarray(targets)

    if kind == "bce_with_logits":
        if n_logits != 1:
            raise ValueError(
                f"{logits_name} for 'bce_with_logits' must have exactly one logit on its last axis, got shape {z.shape}"
            )
        y = float_array(y, targets_name)
        _check_shape(y, z.shape[:-1], targets_name, f"{logits_name}.shape[:-1] for 'bce_with_logits'")
        y = finite(y, targets_name).astype(np.float64, copy=False)
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(
                f"{targets_name} for 'bce_with_logits' must lie in [0, 1], got values in [{y.min()}, {y.max()}]"
            )
        return z, y, None

    if kind == "mse":
        y = float_array(y, targets_name)
        _check_shape(y, z.shape, targets_name, f"{logits_name}.shape for 'mse'")
        return z, finite(y, targets_name).astype(np.float64, copy=False), None

    # cross_entropy: integer class indices (hard) or probability rows (soft), told apart by dtype.
    if np.issubdtype(y.dtype, np.integer) and not np.issubdtype(y.dtype, np.bool_):
        _check_shape(y, z.shape[:-1], targets_name, f"{logits_name}.shape[:-1] for hard 'cross_entropy' targets")
        if y.size and (y.min() < 0 or y.max() >= n_logits):
            bad = y[(y < 0) | (y >= n_logits)].flat[0]
            raise ValueError(
                f"{targets_name} for 'cross_entropy' must hold class indices in [0, {n_logits - 1}] "
                f"({n_logits} logits), got {bad}"
            )
        return z, y.astype(np.int64, copy=False), "hard"
    if not np.issubdtype(y.dtype, np.floating):
        raise TypeError(
            f"{targets_name} for 'cross_entropy' must be integer class indices (hard) or real floating "
            f"probability rows (soft), got dtype {y.dtype}"
        )
    _check_shape(y, z.shape, targets_name, f"{logits_name}.shape for soft 'cross_entropy' targets")
    y = finite(y, targets_name).astype(np.float64, copy=False)
    if y.size and y.min() < 0:
        raise ValueError(f"{targets_name} for soft 'cross_entropy' must be nonnegative, got minimum {y.min()}")
    if y.size:
        row_error = np.abs(y.sum(axis=-1) - 1.0)
        if row_error.max() > SOFT_TARGET_ATOL:
            index = tuple(int(i) for i in np.argwhere(row_error > SOFT_TARGET_ATOL)[0])
            raise ValueError(
                f"{targets_name} for soft 'cross_entropy' must have rows summing to 1 (within {SOFT_TARGET_ATOL}), "
                f"but row {index} sums to {y[index].sum()}"
            )
    return z, y, "soft"


def _check_shape(arr: np.ndarray, expected: tuple, name: str, what: str) -> None:
    if arr.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {arr.shape}")


def _one_hot(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """float64 ``[..., n_classes]`` with a 1 at each class index."""
    return (classes[..., None] == np.arange(n_classes)).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def loss_per_example(kind: str, logits, targets) -> np.ndarray:
    """Loss of every example: float64 array of shape ``logits.shape[:-1]`` (see the module docstring)."""
    z, y, form = _validated(kind, logits, targets)
    if kind == "bce_with_logits":
        z1 = z[..., 0]
        return np.maximum(z1, 0.0) - z1 * y + np.log1p(np.exp(-np.abs(z1)))
    if kind == "mse":
        return np.mean((z - y) ** 2, axis=-1)
    if form == "hard":
        return logsumexp(z, axis=-1) - np.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    return logsumexp(z, axis=-1) - np.sum(y * z, axis=-1)


def loss_gradient(kind: str, logits, targets) -> np.ndarray:
    """Derivative of each example's loss with respect to its own logits: float64, shape of ``logits``."""
    z, y, form = _validated(kind, logits, targets)
    if kind == "bce_with_logits":
        return expit(z) - y[..., None]
    if kind == "mse":
        return 2.0 * (z - y) / z.shape[-1]
    if form == "hard":
        y = _one_hot(y, z.shape[-1])
    return softmax(z, axis=-1) - y


def predictions_correct(kind: str, logits, targets) -> np.ndarray:
    """Whether each example is classified correctly: bool array of shape ``logits.shape[:-1]``.

    ``bce_with_logits``: ``(logit >= 0) == (target >= 0.5)``. ``cross_entropy``: ``argmax(logits) == class``
    (hard) or ``argmax(logits) == argmax(target row)`` (soft); ties go to the lowest index (``np.argmax``).
    ``mse`` is a regression loss, for which correctness is not defined: ValueError.
    """
    if kind == "mse":
        raise ValueError(
            "loss kind 'mse' has no notion of a correct prediction; use 'bce_with_logits' or 'cross_entropy'"
        )
    z, y, form = _validated(kind, logits, targets)
    if kind == "bce_with_logits":
        return (z[..., 0] >= 0) == (y >= 0.5)
    predicted = np.argmax(z, axis=-1)
    return predicted == (y if form == "hard" else np.argmax(y, axis=-1))
