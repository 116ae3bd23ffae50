"""Conformance adapter for the authors' ``get_grads`` (``and_mask/and_mask_utils.py`` of
github.com/gibipara92/learning-explanations-hard-to-vary).

Their code is not part of this project: point ``AUTHORS_AND_MASK_UTILS`` at your copy of ``and_mask_utils.py``
(e.g. from ``git clone`` of their repository), then::

    AUTHORS_AND_MASK_UTILS=/path/to/and_mask/and_mask_utils.py \\
        hardtovary conformance --target docs/audit/authors_adapter.py:target --xfails docs/audit/authors.xfails

``get_grads`` computes the per-environment gradients itself, from a stacked model output, and overwrites
``param.grad``. To hand it given stacks ``G_i[K, *shape]``, environment k's "output" is
``sum_i (p_i * G_i[k]).sum()`` for fresh parameters ``p_i``, so that its gradient is exactly ``G_i[k]``, and each
environment's loss is that output itself (one example per environment).
"""

import importlib.util
import os

import numpy as np
import torch


def _get_grads():
    path = os.environ.get("AUTHORS_AND_MASK_UTILS")
    if not path or not os.path.isfile(path):
        raise RuntimeError("set AUTHORS_AND_MASK_UTILS to the path of the authors' and_mask/and_mask_utils.py")
    spec = importlib.util.spec_from_file_location("authors_and_mask_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_grads


class AuthorsGetGrads:
    def __init__(self):
        self.get_grads = _get_grads()

    def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
        if rule == "mean":  # tau = 0 keeps everything: get_grads returns the mean
            method, tau = "and_mask", 0.0
        elif rule == "and_mask":
            method = "and_mask"
        elif rule == "geometric_mean" and flavour == "original":
            method = "geom_mean"
        else:
            raise NotImplementedError(f"{rule} {flavour or ''}".strip())
        stacks = [torch.from_numpy(np.array(G)) for G in grads]
        K = stacks[0].shape[0]
        params = [torch.zeros(G.shape[1:], dtype=G.dtype, requires_grad=True) for G in stacks]
        output = torch.stack([sum((p * G[e]).sum() for p, G in zip(params, stacks)) for e in range(K)])
        self.get_grads(tau, 1, lambda out, target: out.sum(), K, params, output, torch.zeros(K), method,
                       bool(rescale))
        return [p.grad.detach().numpy() for p in params]


target = AuthorsGetGrads()
