"""Targets: what the conformance suite checks, how it is named, and the built-in ``reference`` target.

A *target* is any object (a module, a class instance, ...) that offers some of the callables described in
:data:`PROTOCOL`. It is named on the command line in one of two ways (:func:`load_target`):

- ``module:attribute``: the module is imported with the current directory first on the import path, as
  ``python -m`` would (``attribute`` may be dotted, e.g. ``pkg.mod:Impl.instance``; ``module`` alone means the
  module itself);
- ``path/to/file.py:attribute``: the file is loaded as a module, with its folder first on the import path so that
  it can import its neighbours.

A callable the target lacks skips its checks (the report says which); a call that raises ``NotImplementedError``
marks that option combination "unsupported" instead of failed. Everything else a call raises is a failure, except
a deliberate refusal of non-finite input (:data:`.protocol.REFUSALS`, judged by ``agg.special.nonfinite`` only).

The suite only talks to targets through :class:`Adapter`, which converts results with ``numpy.asarray`` (so torch
tensors on the CPU, CuPy arrays with ``__array__``... work as long as ``numpy.asarray`` accepts them; a torch
adapter converting CUDA tensors belongs to the torch target itself) and turns ``NotImplementedError`` into
:class:`Unsupported`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from hardtovary.reference import convnet as _convnet
from hardtovary.reference import data as _data
from hardtovary.reference import mlp as _mlp
from hardtovary.reference import optim as _optim
from hardtovary.reference import rules as _rules

from .protocol import PROTOCOL, REFUSALS, method_names, offered

__all__ = ["PROTOCOL", "REFUSALS", "Adapter", "ReferenceTarget", "TargetError", "Unsupported", "describe_offer",
           "load_target", "offered", "reference"]

class Unsupported(Exception):
    """A target raised NotImplementedError for this option combination."""


class TargetError(Exception):
    """A target could not be loaded (the message is one line, meant for the user)."""


def _split_name(name: str) -> tuple[str, str]:
    """``module:attr`` / ``file.py:attr`` -> (module or file, attr). A colon inside a Windows drive is kept."""
    if name.endswith(".py"):
        return name, ""
    source, sep, attr = name.rpartition(":")
    return (source, attr) if sep and source else (name, "")


def _is_file_name(source: str) -> bool:
    return source.endswith(".py") or "/" in source or os.sep in source


def _import_module(module_name: str, name: str):
    """Import ``module_name`` with the current directory first on the import path (as ``python -m`` does)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # the user's module failed while importing: one line, not our traceback
        missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + "."))
        if missing:
            raise TargetError(
                f"cannot import target {name!r}: no module named {exc.name!r} in the current directory ({cwd}) or "
                f"on the Python path; name a file instead, e.g. path/to/{module_name.rsplit('.', 1)[-1]}.py:attr"
            ) from exc
        raise TargetError(f"importing module {module_name!r} for target {name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from exc


def _load_file(path_text: str, name: str):
    """Load a Python file as a module, its folder first on the import path (so it can import its neighbours)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise TargetError(f"cannot load target {name!r}: no file {str(path)!r} (from the current directory "
                          f"{os.getcwd()})")
    path = path.resolve()
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module_name = path.stem
    existing = sys.modules.get(module_name)
    if existing is not None and getattr(existing, "__file__", None) == str(path):
        return existing
    if existing is not None:  # another module of that name is loaded: do not replace it
        module_name = f"_hardtovary_target_{abs(hash(str(path))):x}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load target {name!r}: {str(path)!r} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise TargetError(f"loading file {str(path)!r} for target {name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    return module


def load_target(name: str):
    """Resolve a target name: ``module:attribute``, ``module``, ``path/to/file.py:attribute`` or
    ``path/to/file.py`` (see the module docstring). Raises :class:`TargetError` with a one-line message."""
    if not isinstance(name, str) or not name.strip():
        raise TargetError(f"target must be 'module:attribute' or 'path/to/file.py:attribute', got {name!r}")
    source, attr = _split_name(name.strip())
    obj = _load_file(source, name) if _is_file_name(source) else _import_module(source, name)
    for part in filter(None, attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            close = difflib.get_close_matches(part, [a for a in dir(obj) if not a.startswith("_")], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TargetError(f"target {name!r}: {type(obj).__name__} {getattr(obj, '__name__', '')!s} has no "
                              f"attribute {part!r}{hint}".replace("  ", " ")) from None
    return obj


def describe_offer(target) -> str:
    """One paragraph for a run that compared nothing: the protocol callables found and not found, and the names
    the target has that look like misspellings of them."""
    offer = offered(target)
    found = [c for c, ok in offer.items() if ok]
    missing = [c for c, ok in offer.items() if not ok]
    protocol_names = method_names()
    near = []
    for attr in dir(target):
        if attr.startswith("_") or attr in protocol_names:
            continue
        match = difflib.get_close_matches(attr.lower(), protocol_names, n=1, cutoff=0.6)
        if match:
            near.append(f"{attr} (did you mean {match[0]}?)")
    not_callable = [a for a in protocol_names if hasattr(target, a) and not callable(getattr(target, a))]
    kind = type(target).__name__
    what = (f"the target is a {kind} named {target.__name__!r}; name the object that has it as a method"
            if callable(target) and hasattr(target, "__name__") and not hasattr(target, "aggregate")
            else f"the target is a {kind}")
    parts = [what, "protocol callables found: " + (", ".join(found) or "none"),
             "not found: " + (", ".join(missing) or "none")]
    if near:
        parts.append("near misses: " + ", ".join(near))
    if not_callable:
        parts.append("present but not callable: " + ", ".join(not_callable))
    return "; ".join(parts)


def _arrays(result, what: str) -> list[np.ndarray]:
    if isinstance(result, np.ndarray) or not hasattr(result, "__iter__"):
        raise TypeError(f"{what} must return a list of arrays, got {type(result).__name__}")
    return [np.asarray(r) for r in result]


class Adapter:
    """The one boundary between the suite and a target."""

    def __init__(self, target, name: str | None = None):
        self.target = target
        self.name = name or getattr(target, "__name__", type(target).__name__)

    def has(self, what: str) -> bool:
        return offered(self.target)[what]

    def _call(self, what, *args, **kwargs):
        try:
            return getattr(self.target, what)(*args, **kwargs)
        except NotImplementedError as exc:
            raise Unsupported(f"{what}: {exc}" if str(exc) else what) from exc

    def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
        extra = {}
        if flavour is not None:
            extra["flavour"] = flavour
        if k is not None:
            extra["k"] = k
        out = self._call("aggregate", list(grads), rule=rule, tau=tau, rescale=rescale, **extra)
        return _arrays(out, "aggregate")

    def env_gradients(self, spec: dict, params, X, Y, *, loss, semantics):
        out = self._call("env_gradients", dict(spec), list(params), X, Y, loss=loss, semantics=semantics)
        return _arrays(out, "env_gradients")

    def eval_logits(self, spec: dict, params, X_train, X_eval, *, semantics):
        return np.asarray(self._call("eval_logits", dict(spec), list(params), X_train, X_eval, semantics=semantics))

    def steps(self, params, grad_sequence, **kw):
        """Parameters after each step (uses ``steps`` when offered, else loops ``step`` with its state)."""
        if callable(getattr(self.target, "steps", None)):
            out = self._call("steps", list(params), list(grad_sequence), **kw)
            return [_arrays(p, "steps") for p in out]
        state, out = None, []
        for grads in grad_sequence:
            params, state = self._call("step", list(params), list(grads), state=state, **kw)
            params = _arrays(params, "step")
            out.append(params)
        return out

    def temporal(self, params, grad_sequence, **kw):
        out = self._call("temporal", list(params), [list(g) for g in grad_sequence], **kw)
        return [_arrays(p, "temporal") for p in out]

    def spirals(self, *args):
        X, y = self._call("spirals", *args)
        return np.asarray(X), np.asarray(y)


# ----------------------------------------------------------------------------------------------------------------
# The built-in reference target: the oracle itself (must pass everything)
# ----------------------------------------------------------------------------------------------------------------


class ReferenceTarget:
    """The oracle behind the target protocol. Subclassed by :mod:`hardtovary.conformance.mutants`."""

    def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
        return _rules.aggregate(list(grads), rule=rule, rescale=bool(rescale),
                                **_rules.rule_options(rule, tau, flavour, k))[0]

    def env_gradients(self, spec, params, X, Y, *, loss, semantics):
        if spec.get("kind") == "convnet":
            return _convnet.env_gradients(spec, params, X, Y, loss=loss, semantics=semantics).grads
        return _mlp.env_gradients(_mlp.MLPSpec(**spec), params, X, Y, loss=loss, semantics=semantics).grads

    def eval_logits(self, spec, params, X_train, X_eval, *, semantics):
        running = _convnet.running_stats_after(spec, params, X_train, semantics=semantics)
        return _convnet.predict(spec, params, X_eval, running)

    # -- step ---------------------------------------------------------------------------------------------------
    def _make_optimizer(self, params, optimizer, weight_decay, weight_decay_order, momentum):
        if optimizer == "adam":
            return _optim.Adam(params, weight_decay=weight_decay, weight_decay_order=weight_decay_order)
        if optimizer == "sgd":
            return _optim.SGD(params, momentum=momentum, weight_decay=weight_decay,
                              weight_decay_order=weight_decay_order)
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")

    def _masked_update(self, params, grads, *, rule, tau, rescale, l1):
        update = self.aggregate(grads, rule=rule, tau=tau, rescale=rescale)
        if l1:
            update = [u + g for u, g in zip(update, _optim.l1_gradient(params, l1))]
        return update

    def step(self, params, grads, *, rule, tau, rescale, optimizer, lr, weight_decay, weight_decay_order,
             l1, momentum, state=None):
        if state is None:
            state = SimpleNamespace(opt=self._make_optimizer(params, optimizer, weight_decay, weight_decay_order,
                                                             momentum))
        update = self._masked_update(params, grads, rule=rule, tau=tau, rescale=rescale, l1=l1)
        return state.opt.step(params, update, lr), state

    # -- temporal -----------------------------------------------------------------------------------------------
    def temporal(self, params, grad_sequence, *, lr, beta1, beta2, beta3, tau, eps, bias_correction):
        opt = _rules.TemporalAndMaskAdam(params, lr, beta1=beta1, beta2=beta2, beta3=beta3, tau=tau, eps=eps,
                                         bias_correction=bias_correction)
        out = []
        for grads in grad_sequence:
            params, _ = opt.step(params, grads)
            out.append(params)
        return out

    def spirals(self, n_examples, n_revolutions, env, n_envs, n_dims, seed):
        return _data.spirals(n_examples, n_revolutions, env, n_envs, n_dims, seed)


#: ``--target hardtovary.conformance.targets:reference``
reference = ReferenceTarget()
