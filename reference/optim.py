"""Optimisers of the experiments in plain NumPy, with torch.optim semantics (paper App. B.3).

The synthetic experiment searches over Adam (beta1 = 0.9, beta2 = 0.999) and SGD with momentum 0.9 (App. B.3,
Table 1), with L2 weight decay or an L1 term, and divides the learning rate by 10 at fixed epochs. The authors'
``run_synthetic.py`` adds weight decay and the L1 term to the gradient *after* the AND-mask, so they are never
masked; here they act on whatever gradient the caller passes in, which is the masked one when this reproduces the
authors' loop.

Conventions:

* A model's parameters are a list (or tuple) of arrays; gradients a list of arrays of the same shapes, in the
  same order. Everything is computed in float64 and returned as new float64 arrays; inputs are never mutated.
* An optimiser object holds its state (step count, moment or momentum buffers, one per parameter array, shaped
  like it) and updates it on every ``step``. The state is only committed once the whole update has been computed
  and checked finite, so a rejected step leaves the optimiser as it was.
* The learning rate is an argument of ``step`` (schedules such as ``multistep_lr`` are applied by the caller).
"""

from __future__ import annotations

import math

import numpy as np

from .validate import choice, finite, float_array, integer, positive, real_number

__all__ = ["SGD", "Adam", "l1_gradient", "multistep_lr"]

_ORDERS = {"before", "after"}


# ---------------------------------------------------------------------------------------------------------------
# validation helpers local to this module (composed from validate)
# ---------------------------------------------------------------------------------------------------------------


def _unit_interval_open(x, name: str) -> float:
    """Return ``x`` as a float after checking ``0 <= x < 1``."""
    value = real_number(x, name)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return value


def _array_list(arrays, name: str) -> list:
    """Check that ``arrays`` is a list or tuple (not a bare array) and return it as a list."""
    if not isinstance(arrays, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of arrays, got {type(arrays).__name__}")
    return list(arrays)


def _shapes_of(params_or_shapes) -> tuple:
    """Shapes of the parameters: a tuple of ints is a shape, anything else an array whose shape is taken."""
    items = _array_list(params_or_shapes, "params_or_shapes")
    if not items:
        raise ValueError("params_or_shapes must hold at least one parameter array or shape, got an empty list")
    shapes = []
    for i, item in enumerate(items):
        if isinstance(item, tuple):
            shapes.append(tuple(integer(d, f"params_or_shapes[{i}][{j}]", low=0) for j, d in enumerate(item)))
        else:
            shapes.append(float_array(item, f"params_or_shapes[{i}]").shape)
    return tuple(shapes)


def _float64_list(arrays, name: str, shapes: tuple) -> list:
    """Validate a list of finite real floating arrays with the given shapes; return float64 copies."""
    arrays = _array_list(arrays, name)
    if len(arrays) != len(shapes):
        raise ValueError(f"{name} must hold {len(shapes)} arrays (one per parameter), got {len(arrays)}")
    out = []
    for i, (array, shape) in enumerate(zip(arrays, shapes)):
        arr = finite(float_array(array, f"{name}[{i}]"), f"{name}[{i}]")
        if arr.shape != shape:
            raise ValueError(f"{name}[{i}] must have shape {shape} (parameter {i}), got shape {arr.shape}")
        out.append(np.array(arr, dtype=np.float64))  # always a copy
    return out


def _check_finite_result(arrays, what: str) -> None:
    """Raise ValueError if an update overflowed (non-finite result from finite input)."""
    for i, arr in enumerate(arrays):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}[{i}] is not finite after the step: the update overflowed float64 "
                             f"(learning rate, weights or gradients too large)")


class _Optimizer:
    """Shared plumbing: parameter shapes, hyperparameter checks and input validation for ``step``."""

    def __init__(self, params_or_shapes, weight_decay, weight_decay_order):
        self.shapes = _shapes_of(params_or_shapes)
        self.weight_decay = positive(weight_decay, "weight_decay", allow_zero=True)
        self.weight_decay_order = choice(weight_decay_order, "weight_decay_order", _ORDERS)
        self.t = 0  # number of steps taken

    def _inputs(self, params, grads, lr):
        lr = positive(lr, "lr")
        params = _float64_list(params, "params", self.shapes)
        grads = _float64_list(grads, "grads", self.shapes)
        return params, grads, lr

    def _coupled(self, params, grads):
        """'before' weight decay (coupled L2): ``g <- g + wd * theta``."""
        if self.weight_decay_order == "before" and self.weight_decay != 0:
            return [g + self.weight_decay * p for p, g in zip(params, grads)]
        return grads

    def _decoupled(self, params, lr):
        """'after' weight decay (decoupled, torch.optim.AdamW): ``theta <- theta * (1 - lr * wd)`` on the
        pre-update parameters."""
        if self.weight_decay_order == "after" and self.weight_decay != 0:
            return [p * (1.0 - lr * self.weight_decay) for p in params]
        return params


class SGD(_Optimizer):
    """SGD with optional momentum and weight decay, as ``torch.optim.SGD`` (dampening 0, no Nesterov).

    One step with learning rate ``lr`` (App. B.3 Table 1's "SGD + momentum 0.9"):

    * ``d = g`` (+ ``weight_decay * theta`` when ``weight_decay_order == "before"``, torch's coupled decay);
    * with ``momentum > 0``: ``buf = d`` on the first step, then ``buf = momentum * buf + d``; ``d = buf``;
    * ``theta <- theta - lr * d``.

    ``weight_decay_order == "after"`` is the decoupled variant (as torch.optim.AdamW, which torch.optim.SGD does
    not offer): ``theta <- theta * (1 - lr * weight_decay)`` on the pre-update parameters, then the update above
    without the decay term. Without momentum the two orders are the same map up to rounding; with momentum they
    differ from the second step on, because "before" accumulates the decay in the buffer.

    Args:
        params_or_shapes: list or tuple of the parameter arrays (or their shapes, as tuples of ints).
        momentum: real in [0, 1). weight_decay: real >= 0. weight_decay_order: "before" or "after".

    State: ``t`` (steps taken) and ``momentum_buffer`` (list, one float64 array per parameter, ``None`` before
    the first step or when ``momentum == 0``).
    """

    def __init__(self, params_or_shapes, momentum=0.0, weight_decay=0.0, weight_decay_order="before"):
        super().__init__(params_or_shapes, weight_decay, weight_decay_order)
        self.momentum = _unit_interval_open(momentum, "momentum")
        self.momentum_buffer = [None] * len(self.shapes)

    def step(self, params, grads, lr):
        """Return the parameters after one SGD step (new float64 arrays); updates ``t`` and the buffers.

        Args:
            params, grads: lists of finite real floating arrays with the shapes given at construction.
            lr: learning rate, a real > 0.

        Raises:
            TypeError / ValueError for bad input (naming the list index and the shapes), ValueError if the
            update overflows.
        """
        params, grads, lr = self._inputs(params, grads, lr)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected below and rejected
            directions = self._coupled(params, grads)
            buffers = self.momentum_buffer
            if self.momentum > 0:
                if self.t == 0:
                    buffers = [d.copy() for d in directions]
                else:
                    buffers = [self.momentum * b + d for b, d in zip(self.momentum_buffer, directions)]
                directions = buffers
            new_params = [p - lr * d for p, d in zip(self._decoupled(params, lr), directions)]
        _check_finite_result(new_params, "params")
        if self.momentum > 0:
            _check_finite_result(buffers, "momentum_buffer")
        self.momentum_buffer = buffers
        self.t += 1
        return new_params


class Adam(_Optimizer):
    """Adam with coupled ('before') or decoupled ('after') weight decay, as ``torch.optim.Adam`` / ``AdamW``.

    One step with learning rate ``lr`` (App. B.3 Table 1's Adam (0.9, 0.999); ``eps`` 1e-8 as torch):

    * ``t <- t + 1``; ``g`` (+ ``weight_decay * theta`` when ``weight_decay_order == "before"``);
    * ``m <- beta1 m + (1 - beta1) g``; ``v <- beta2 v + (1 - beta2) g**2`` (torch's ``lerp_`` form of the first
      moment equals this up to rounding);
    * ``theta <- theta - (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``.

    The first step is ``lr * g / (|g| + eps)`` up to rounding, i.e. about ``lr * sign(g)`` whatever the
    gradient's size.

    Weight decay orders:

    * ``"before"``: coupled L2, torch Adam's ``weight_decay``, the authors' ``AdamFlexibleWeightDecay`` 'before'.
      The decay passes through the moments, so with a zero gradient theta still moves by about ``lr * sign(theta)``.
    * ``"after"``: decoupled, torch.optim.AdamW: ``theta <- theta * (1 - lr * weight_decay)`` on the pre-update
      parameters, then the Adam update with the undecayed gradient. The authors' ``AdamFlexibleWeightDecay``
      'after' differs: it applies ``theta <- theta - (lr / (1 - beta1**t)) * weight_decay * theta`` *after* the
      Adam update, to the updated parameters and with the bias-corrected step size, which differs from AdamW by a
      factor ``1 / (1 - beta1**t)`` in the decay (10x on the first step, -> 1 as t grows) and by a second-order
      term. This oracle follows torch.optim.AdamW.

    With ``eps == 0`` a component whose second moment is exactly 0 (all its gradients were 0) gets a zero update
    rather than torch's 0/0 = NaN.

    Args:
        params_or_shapes: list or tuple of the parameter arrays (or their shapes, as tuples of ints).
        betas: pair of reals in [0, 1). eps: real >= 0. weight_decay: real >= 0. weight_decay_order: "before" or
            "after".

    State: ``t`` (steps taken), ``exp_avg`` and ``exp_avg_sq`` (lists of float64 arrays, zeros at the start).
    """

    def __init__(self, params_or_shapes, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 weight_decay_order="before"):
        super().__init__(params_or_shapes, weight_decay, weight_decay_order)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_unit_interval_open(betas[0], "betas[0]"), _unit_interval_open(betas[1], "betas[1]"))
        self.eps = positive(eps, "eps", allow_zero=True)
        self.exp_avg = [np.zeros(shape) for shape in self.shapes]
        self.exp_avg_sq = [np.zeros(shape) for shape in self.shapes]

    def step(self, params, grads, lr):
        """Return the parameters after one Adam step (new float64 arrays); updates ``t`` and the moments.

        Args:
            params, grads: lists of finite real floating arrays with the shapes given at construction.
            lr: learning rate, a real > 0.

        Raises:
            TypeError / ValueError for bad input (naming the list index and the shapes), ValueError if the
            update or the moments overflow.
        """
        params, grads, lr = self._inputs(params, grads, lr)
        beta1, beta2 = self.betas
        t = self.t + 1
        step_size = lr / (1 - beta1**t)
        bias_correction2_sqrt = math.sqrt(1 - beta2**t)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected below and rejected
            grads = self._coupled(params, grads)
            exp_avg = [beta1 * m + (1 - beta1) * g for m, g in zip(self.exp_avg, grads)]
            exp_avg_sq = [beta2 * v + (1 - beta2) * g * g for v, g in zip(self.exp_avg_sq, grads)]
            new_params = []
            for p, m, v in zip(self._decoupled(params, lr), exp_avg, exp_avg_sq):
                denom = np.sqrt(v) / bias_correction2_sqrt + self.eps
                ratio = np.divide(m, denom, out=np.zeros_like(m), where=denom > 0)
                new_params.append(p - step_size * ratio)
        _check_finite_result(exp_avg, "exp_avg")
        _check_finite_result(exp_avg_sq, "exp_avg_sq")
        _check_finite_result(new_params, "params")
        self.exp_avg, self.exp_avg_sq, self.t = exp_avg, exp_avg_sq, t
        return new_params


def l1_gradient(params, l1):
    """Gradient of the L1 penalty ``l1 * sum |theta|``: ``l1 * sign(theta)`` per parameter array (sign(0) = 0).

    The authors' ``run_synthetic.py`` adds this term to the gradients *after* the AND-mask (``add_l1_grads``), so
    the L1 term is never masked; add it to the masked gradient to reproduce that.

    Args:
        params: list or tuple of finite real floating arrays.
        l1: coefficient, a real >= 0.

    Returns:
        list of float64 arrays shaped like ``params``.
    """
    l1 = positive(l1, "l1", allow_zero=True)
    params = _array_list(params, "params")
    shapes = tuple(np.shape(p) for p in params)
    return [l1 * np.sign(p) for p in _float64_list(params, "params", shapes)]


def paper_milestones(epochs: int) -> tuple[int, ...]:
    """The paper's schedule for the synthetic task (App. B.3): the learning rate drops at 1/2 and 3/4 of the
    ``epochs`` (milestones below 1 are dropped)."""
    return tuple(sorted({m for m in (epochs // 2, 3 * epochs // 4) if m >= 1}))


def multistep_lr(base_lr, epoch, milestones, gamma=0.1):
    """Learning rate of torch's ``MultiStepLR`` after ``epoch`` scheduler steps: ``base_lr * gamma**k``.

    ``k`` is the number of milestones ``<= epoch`` (a milestone listed twice counts twice), with ``epoch`` the
    number of completed ``scheduler.step()`` calls (0 = the start, where a milestone 0 already applies, as in
    torch). The value is computed as torch's chained form does it, multiplying by ``gamma**count`` at each
    distinct milestone in increasing order, so it matches torch's float bit for bit.

    The paper drops the rate 10x at 1/2 and 3/4 of training (App. B.3), the authors' synthetic code once at
    3/4.

    Args:
        base_lr: real > 0. epoch: integer >= 0. milestones: iterable of integers >= 0, any order (may be empty).
        gamma: multiplicative factor, real > 0.

    Returns:
        float.
    """
    lr = positive(base_lr, "base_lr")
    epoch = integer(epoch, "epoch", low=0)
    gamma = positive(gamma, "gamma")
    if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
        raise TypeError(f"milestones must be an iterable of integers, got {type(milestones).__name__}")
    milestones = [integer(m, f"milestones[{i}]", low=0) for i, m in enumerate(milestones)]
    for m in sorted(set(milestones)):
        if m <= epoch:
            lr = lr * gamma ** milestones.count(m)
    return lr
