"""The AND-mask step in torch habits: write the aggregated gradients into ``param.grad``, then any optimizer steps.

- :func:`and_mask_backward` replaces ``loss.backward()``: per-environment gradients (:mod:`.env_gradients`),
  one rule of :mod:`.rules` per parameter tensor, then ``+ l1 * sign(theta)`` *after* masking (never masked, as the
  authors' ``add_l1_grads``), written into ``param.grad`` in the parameter's dtype.
- :func:`make_optimizer` gives the optimizers of ``reference.optim``: Adam with coupled ('before',
  ``torch.optim.Adam``) or decoupled ('after', ``torch.optim.AdamW``) weight decay; SGD with momentum, coupled
  ('before', ``torch.optim.SGD``) or decoupled ('after', :class:`DecoupledSGD`).
- :class:`TemporalAndMaskAdam` is Algorithm 1 (App. B.6), exactly as ``reference.rules.TemporalAndMaskAdam``.
"""

from __future__ import annotations

import torch
from torch import nn

from hardtovary.reference.rules import RuleSpec, rule_options
from hardtovary.reference.validate import choice, in_range, positive

from . import rules as _rules
from .env_gradients import env_gradients

__all__ = ["and_mask_backward", "make_optimizer", "DecoupledSGD", "TemporalAndMaskAdam"]


def and_mask_backward(model: nn.Module, X, Y, loss_fn, *, rule: str = "and_mask", tau=1.0, rescale=False,
                      flavour=None, k=None, spec: RuleSpec | None = None, semantics: str = "pooled", l1=0.0,
                      **engine_options):
    """Compute the aggregated gradient of environment batches ``X[K, B, ...]``, ``Y[K, B, ...]`` and write it
    into each parameter's ``.grad`` (overwriting, as the authors' ``get_grads``). Returns ``(mean_loss, masks)``:
    the mean of the K environment losses (a detached 0-d tensor) and one mask per parameter (bool, or the soft
    SAND-mask). The rule is ``spec`` (a ``RuleSpec``) or, without one, ``rule``/``tau``/``flavour``/``k`` as
    :func:`.rules.aggregate` (``rule='mean'`` ignores ``tau``, as ``reference.training``); ``rescale`` as there;
    ``l1 >= 0`` adds ``l1 * sign(theta)`` after masking.
    ``engine_options`` go to :func:`.env_gradients.env_gradients` (e.g. ``chunk_size``, ``pooled_method``)."""
    l1 = positive(l1, "l1", allow_zero=True)
    out = env_gradients(model, X, Y, loss_fn, semantics=semantics, **engine_options)
    spec = spec if spec is not None else RuleSpec(rule, **rule_options(rule, tau, flavour, k))
    aggregated, masks = _rules.aggregate(out.grads, spec, rescale=rescale)
    write_grads(model, aggregated, l1)
    return out.losses.mean(), masks


def write_grads(model: nn.Module, aggregated, l1: float) -> None:
    """Write one aggregated gradient per parameter that requires grad (``model.parameters()`` order) into its
    ``.grad``, in the parameter's dtype, with ``l1 * sign(theta)`` added after masking (never masked, as the
    authors' ``add_l1_grads``). ``l1`` validated by the caller."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, g in zip(params, aggregated):
            if l1 != 0:
                g = g.to(_rules.compute_dtype(g.dtype)) + l1 * torch.sign(p.detach()).to(_rules.compute_dtype(g.dtype))
            p.grad = g.to(p.dtype)


def _closure_loss(closure):
    """The loss ``closure()`` returns, computed with gradients enabled, as torch's optimizers do in ``step``; None
    without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()

class DecoupledSGD(torch.optim.SGD):
    """``torch.optim.SGD`` with decoupled weight decay (``reference.optim.SGD``, ``weight_decay_order='after'``):
    ``theta <- theta * (1 - lr * weight_decay)`` on the pre-update parameters, then the SGD (momentum) update
    with the undecayed gradient."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = float(weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            wd = group.get("decoupled_weight_decay", 0.0)
            if wd != 0:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(1.0 - group["lr"] * wd)
        super().step()
        return loss


def make_optimizer(params, name: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0,
                   weight_decay_order: str = "before", momentum: float = 0.9,
                   betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimizers of ``reference.optim`` as torch optimizers: ``"adam"`` 'before' -> ``torch.optim.Adam``
    (coupled L2), 'after' -> ``torch.optim.AdamW`` (decoupled); ``"sgd"`` 'before' -> ``torch.optim.SGD``
    (momentum, coupled), 'after' -> :class:`DecoupledSGD`."""
    name = choice(name, "name", ("adam", "sgd"))
    weight_decay_order = choice(weight_decay_order, "weight_decay_order", ("before", "after"))
    lr = positive(lr, "lr")
    weight_decay = positive(weight_decay, "weight_decay", allow_zero=True)
    if name == "adam":
        cls = torch.optim.Adam if weight_decay_order == "before" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    momentum = in_range(momentum, "momentum", 0.0, 1.0)
    if weight_decay_order == "before":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return DecoupledSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class TemporalAndMaskAdam(torch.optim.Optimizer):
    """Algorithm 1 of the paper ("temporal" AND-mask Adam, App. B.6), as ``reference.rules.TemporalAndMaskAdam``.

    Per element, with zero initial state::

        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g*g;  a <- beta3 a + (1 - beta3) sign(g)
        b <- 1[ |a| >= tau ]   (float compare, no tie tolerance)
        theta <- theta - lr * (m * b) / (sqrt(v) + eps)

    No bias correction by default; ``bias_correction=True`` divides m, v and a by ``1 - beta^t`` (each with its
    own beta) for the mask and the update, the stored state stays uncorrected. Where ``sqrt(v) + eps == 0`` the
    update is 0 (eps = 0 only; a nonzero masked moment there raises ValueError). Weight decay is not part of the
    step (apply it separately, decoupled). State is kept in float32 for float16/bfloat16 parameters. After each
    ``step`` the bool masks ``b`` are in ``self.last_masks`` (one per parameter with a gradient).
    """

    def __init__(self, params, lr, *, beta3, tau, beta1=0.9, beta2=0.999, eps=1e-8, bias_correction=False):
        lr = positive(lr, "lr")
        betas = []
        for value, name in ((beta1, "beta1"), (beta2, "beta2"), (beta3, "beta3")):
            value = in_range(value, name, 0.0, 1.0)
            if value == 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")
            betas.append(value)
        tau = in_range(tau, "tau", 0.0, 1.0)
        eps = positive(eps, "eps", allow_zero=True)
        if not isinstance(bias_correction, bool):
            raise TypeError(f"bias_correction must be a bool, got {type(bias_correction).__name__} {bias_correction!r}")
        defaults = dict(lr=lr, beta1=betas[0], beta2=betas[1], beta3=betas[2], tau=tau, eps=eps,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)
        self.last_masks: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        masks = []
        for group in self.param_groups:
            b1, b2, b3 = group["beta1"], group["beta2"], group["beta3"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                cdt = _rules.compute_dtype(p.dtype)
                g = p.grad.to(cdt)
                if not bool(torch.isfinite(g).all()):
                    raise ValueError("TemporalAndMaskAdam: gradients must be finite")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(g)
                    state["v"] = torch.zeros_like(g)
                    state["a"] = torch.zeros_like(g)
                t = state["step"] + 1
                m = b1 * state["m"] + (1 - b1) * g
                v = b2 * state["v"] + (1 - b2) * g * g
                a = b3 * state["a"] + (1 - b3) * torch.sign(g)
                if group["bias_correction"]:
                    m_used, v_used, a_used = m / (1 - b1**t), v / (1 - b2**t), a / (1 - b3**t)
                else:
                    m_used, v_used, a_used = m, v, a
                mask = a_used.abs() >= group["tau"]
                numerator = m_used * mask
                denominator = v_used.sqrt() + group["eps"]
                zero_denominator = denominator == 0
                if group["eps"] == 0 and bool((zero_denominator & (numerator != 0)).any()):
                    raise ValueError(
                        "sqrt(v) + eps is 0 where the masked first moment is not (g*g underflowed to 0 with eps = 0); "
                        "use eps > 0"
                    )
                update = torch.where(zero_denominator, torch.zeros((), dtype=cdt, device=g.device),
                                     numerator / torch.where(zero_denominator, torch.ones_like(denominator),
                                                             denominator))
                p.copy_((p.to(cdt) - group["lr"] * update).to(p.dtype))
                state["m"], state["v"], state["a"], state["step"] = m, v, a, t
                masks.append(mask)
        self.last_masks = masks
        return loss
