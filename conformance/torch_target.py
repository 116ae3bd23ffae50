"""The built-in conformance target for :mod:`hardtovary.accel.torch` (needs PyTorch).

``hardtovary conformance --target hardtovary.conformance.torch_target:target`` checks the torch rules, the
per-environment gradient engines, the optimizer step (aggregated gradients written to ``.grad``, L1 after masking,
``torch.optim`` Adam / AdamW / SGD as :func:`hardtovary.accel.torch.optim.make_optimizer` builds them) and the
temporal AND-mask Adam against the oracle. It has no ``spirals``: the dataset lives in the oracle only.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from hardtovary.accel.torch import env_gradients as _env
from hardtovary.accel.torch import models as _models
from hardtovary.accel.torch import optim as _optim
from hardtovary.accel.torch import rules as _rules
from hardtovary.reference import mlp as _mlp
from hardtovary.reference.rules import rule_options

LOSSES = {
    "bce_with_logits": lambda logits, y: F.binary_cross_entropy_with_logits(logits.squeeze(-1), y),
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}


def _tensor(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, order="C"))  # np.array keeps 0-d arrays 0-d (ascontiguousarray does not)


def _numpy(tensors) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().copy() for t in tensors]


class TorchTarget:
    """Adapter from the target protocol (NumPy in, NumPy out) to :mod:`hardtovary.accel.torch`."""

    def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
        values, _ = _rules.aggregate([_tensor(g) for g in grads], rule=rule, rescale=bool(rescale),
                                     **rule_options(rule, tau, flavour, k))
        return _numpy(values)

    def _model(self, spec, params):
        model = (_models.from_spec(spec, dtype=torch.float64) if spec.get("kind") == "convnet"
                 else _models.mlp_from_spec(_mlp.MLPSpec(**spec), dtype=torch.float64))
        return _models.load_reference_params(model, params)

    def env_gradients(self, spec, params, X, Y, *, loss, semantics):
        out = _env.env_gradients(self._model(spec, params), _tensor(X), _tensor(Y), LOSSES[loss], semantics=semantics)
        return _numpy(out.grads)

    def eval_logits(self, spec, params, X_train, X_eval, *, semantics):
        model = self._model(spec, params).train()
        X_train = _tensor(X_train)
        with torch.no_grad():
            batches = [X_train.flatten(0, 1)] if semantics == "pooled" else list(X_train)
            for batch in batches:  # each training-mode forward updates the running statistics
                model(batch)
            return model.eval()(_tensor(X_eval)).numpy()

    def step(self, params, grads, *, rule, tau, rescale, optimizer, lr, weight_decay, weight_decay_order,
             l1, momentum, state=None):
        if state is None:
            tensors = [torch.nn.Parameter(_tensor(p).clone()) for p in params]
            state = SimpleNamespace(params=tensors, opt=_optim.make_optimizer(
                tensors, optimizer, lr=lr, weight_decay=weight_decay, weight_decay_order=weight_decay_order,
                momentum=momentum))
        values, _ = _rules.aggregate([_tensor(g) for g in grads], rule=rule, rescale=bool(rescale),
                                     **rule_options(rule, tau))
        for p, value in zip(state.params, values):
            p.grad = value + l1 * torch.sign(p.detach()) if l1 else value
        for group in state.opt.param_groups:
            group["lr"] = lr
        state.opt.step()
        return _numpy(state.params), state

    def temporal(self, params, grad_sequence, *, lr, beta1, beta2, beta3, tau, eps, bias_correction):
        tensors = [torch.nn.Parameter(_tensor(p).clone()) for p in params]
        opt = _optim.TemporalAndMaskAdam(tensors, lr, beta1=beta1, beta2=beta2, beta3=beta3, tau=tau, eps=eps,
                                         bias_correction=bias_correction)
        out = []
        for grads in grad_sequence:
            for p, g in zip(tensors, grads):
                p.grad = _tensor(g).to(p.dtype)
            opt.step()
            out.append(_numpy(tensors))
        return out


#: ``--target hardtovary.conformance.torch_target:target``
target = TorchTarget()
