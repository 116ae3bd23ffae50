"""Conformance adapters for DomainBed's ``ANDMask.mask_grads`` and ``SANDMask.mask_grads``
(``domainbed/algorithms.py`` of github.com/facebookresearch/DomainBed).

Their code is not part of this project: point ``DOMAINBED_ALGORITHMS`` at your copy of ``domainbed/algorithms.py``,
then::

    export DOMAINBED_ALGORITHMS=/path/to/domainbed/algorithms.py
    hardtovary conformance --target docs/audit/domainbed_adapter.py:andmask \\
        --xfails docs/audit/domainbed_andmask.xfails
    hardtovary conformance --target docs/audit/domainbed_adapter.py:sandmask \\
        --xfails docs/audit/domainbed_sandmask.xfails

Importing ``domainbed.algorithms`` pulls in torchvision and timm (its networks), which the masks do not use, so the
adapter compiles just the two ``mask_grads`` methods from the file, in a namespace holding torch. Each method takes
``(self, [tau,] gradients, params)`` with ``gradients`` a list over parameters of lists over environments, reads
``self.tau`` (and ``self.k``) and writes ``param.grad``; rescaling is always on, so ``rescale=False`` is not
supported.
"""

import ast
import os
from types import SimpleNamespace

import numpy as np
import torch


def _mask_grads(class_name: str):
    path = os.environ.get("DOMAINBED_ALGORITHMS")
    if not path or not os.path.isfile(path):
        raise RuntimeError("set DOMAINBED_ALGORITHMS to the path of DomainBed's domainbed/algorithms.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    (method,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "mask_grads"]
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[method], type_ignores=[]), path, "exec"), namespace)
    return namespace["mask_grads"]


class DomainBedMask:
    def __init__(self, class_name: str, rules: tuple):
        self.mask_grads = _mask_grads(class_name)
        self.class_name, self.rules = class_name, rules

    def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
        if rule not in self.rules or not rescale:
            raise NotImplementedError(f"{self.class_name}: {rule} with rescale={rescale} (it always rescales)")
        stacks = [torch.from_numpy(np.array(G)) for G in grads]
        params = [torch.zeros(G.shape[1:], dtype=G.dtype, requires_grad=True) for G in stacks]
        gradients = [list(G.unbind(0)) for G in stacks]
        me = SimpleNamespace(tau=0.0 if rule == "mean" else tau, k=k)
        if self.class_name == "ANDMask":
            self.mask_grads(me, me.tau, gradients, params)
        else:
            self.mask_grads(me, gradients, params)
        return [p.grad.detach().numpy() for p in params]


#: ``ANDMask`` (the mean is its tau = 0)
andmask = DomainBedMask("ANDMask", ("and_mask", "mean"))
#: ``SANDMask``
sandmask = DomainBedMask("SANDMask", ("sand_mask",))
