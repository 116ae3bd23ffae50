"""Analytic convolutional networks with a hand-derived backward that keeps the environment axis.

The networks of the paper's image experiments, in plain NumPy: the FastResNet of the CIFAR-10 experiment (paper
§3.2, App. B.5; the cifar10-fast network of the authors' code) and a ResNet-18 for the CoinRun experiment (§3.3,
App. B.6). Both are *data*: a :class:`NetSpec` is a tuple of layers (:class:`Conv2d`, :class:`BatchNorm2d`,
:class:`ReLU`, :class:`MaxPool2d`, :class:`GlobalMaxPool`, :class:`GlobalAvgPool`, :class:`Flatten`,
:class:`Linear`, :class:`Scale` and :class:`Residual` blocks), each parameterised layer named by its torch module
path, so that :func:`param_names` are the ``state_dict`` keys of the torch model that
:func:`hardtovary.accel.torch.models.from_spec` builds and a parameter list moves between the two unchanged.

Tensors and parameters follow torch: images ``[N, C, H, W]``, convolution weights ``[out, in, kh, kw]``,
Linear weights ``[out, in]``; BatchNorm's ``weight`` and ``bias`` are gamma and beta.

Per-environment and per-example gradients
-----------------------------------------
Environment batches ``X[K, B, C, H, W]``; ``L_e`` is the mean loss over environment e's B images and ``G[e] =
dL_e/dtheta`` (paper §2). Training-mode BatchNorm couples the images that share statistics, which gives the two
semantics of the MLP (:mod:`hardtovary.reference.mlp`, ``docs/conventions.md``): ``"pooled"`` (statistics over
all K*B images, the authors' one forward; ``G[e]`` is the gradient *through* the shared statistics) and
``"per_env"`` (statistics over each environment's images, DomainBed). :func:`example_gradients` takes every image
as its own environment (K = N, B = 1) with pooled statistics: the per-example gradients of the CIFAR-10
experiment, where the 80 images of a batch are 80 environments.

How the backward keeps the environment axis
-------------------------------------------
Activations carry two leading axes ``[G, R, ...]``: G groups of R rows, BatchNorm statistics over the rows (and
pixels) of each group. Pooled statistics run as one group of all K*B rows (G = 1); per-environment statistics as
K groups of B rows. Cotangents carry ``[T, R, ...]`` with T = K, one per environment loss, and broadcast against
the activations: with G = 1 cotangent e is *dense*, spread over all rows (environment e's loss reaches every row
through the shared statistics), at K times the cost of one backward; with G = K cotangent e lives in group e,
the only rows it touches, at about the cost of one backward. The same layer code serves both, because every
operation below broadcasts a leading axis of size 1 against K.

Derivatives, for one cotangent ``dY`` of the output (sums over rows and pixels are per cotangent):

* Conv2d, as a matrix product of patches (im2col): ``Y = cols(X) W^T + b``; ``dW = dY^T cols(X)``, ``db =
  sum dY``, and ``dX`` adds each patch's gradient ``dY W`` back at its kernel offset (col2im).
* BatchNorm2d in training mode, ``y = gamma xhat + beta``, ``xhat = (x - mu) / sqrt(var + eps)`` with mu and the
  *biased* variance over the rows and pixels of a group::

      dx = gamma / sqrt(var + eps) * (dy - mean(dy) - xhat * mean(dy * xhat)),  dgamma = sum(dy xhat), dbeta = sum(dy)

  In eval mode it is the affine map of the running statistics.
* ReLU: ``dx = dy * (x > 0)``; its derivative at exactly 0 is 0, as torch's.
* Max pooling (a window, or the global max of :class:`GlobalMaxPool`): the whole gradient of a window goes to
  its *first* maximum in row-major order, as torch's kernels pick it; a window of equal values (all zeros after
  a ReLU, say) sends it to its top-left element. Overlapping windows add up. Padding never wins a window.
* Average pooling: ``dx = dy / (H W)`` at every pixel. Residual: the gradients of the body and the shortcut add.

Everything is computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import losses as _losses
from .mlp import BatchStats, EnvGradients, RunningStats, check_running_stats, update_running_stats
from .validate import choice, finite, float_array, integer, parameter_arrays, positive, real_number

SEMANTICS = ("pooled", "per_env")
#: The losses of the image experiments: cross-entropy with hard labels (CIFAR-10) or soft targets (CoinRun's
#: expert action distributions; the KL divergence up to the expert's entropy).
LOSSES = ("cross_entropy",)

__all__ = ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "GlobalMaxPool", "GlobalAvgPool", "Flatten", "Linear",
           "Scale", "Residual", "NetSpec", "fast_resnet", "resnet18", "iter_layers", "param_names", "param_shapes",
           "init_params", "init_running_stats", "forward", "predict", "env_gradients", "example_gradients",
           "pooled_gradient", "running_stats_after", "update_running_stats", "BatchStats", "RunningStats",
           "EnvGradients", "SEMANTICS"]


# ----------------------------------------------------------------------------------------------------------------
# The layers, as data
# ----------------------------------------------------------------------------------------------------------------


def _set(layer, field: str, value) -> None:
    object.__setattr__(layer, field, value)


def _check_name(layer) -> None:
    if not isinstance(layer.name, str) or not layer.name:
        raise TypeError(f"{type(layer).__name__} name must be a nonempty string, got {layer.name!r}")


def _check_counts(layer, names, low: int = 1) -> None:
    """Integer fields of ``layer`` at least ``low``, each error naming the layer and the field."""
    label = f"{type(layer).__name__} {getattr(layer, 'name', '')!r} ".replace(" '' ", " ")
    for field in names:
        _set(layer, field, integer(getattr(layer, field), f"{label}{field}", low=low))


def _check_bias(layer) -> None:
    if not isinstance(layer.bias, bool):
        raise TypeError(f"{type(layer).__name__} {layer.name!r} bias must be True or False, got {layer.bias!r}")


@dataclass(frozen=True)
class Conv2d:
    """``torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)`` (square kernel, zero
    padding), named ``name`` in the model."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    bias: bool = False

    def __post_init__(self):
        _check_name(self)
        _check_counts(self, ("in_channels", "out_channels", "kernel_size", "stride"))
        _check_counts(self, ("padding",), low=0)
        _check_bias(self)


@dataclass(frozen=True)
class BatchNorm2d:
    """``torch.nn.BatchNorm2d(channels, eps=eps)`` (affine, tracking running statistics), named ``name``."""

    name: str
    channels: int
    eps: float = 1e-5

    def __post_init__(self):
        _check_name(self)
        _check_counts(self, ("channels",))
        _set(self, "eps", positive(real_number(self.eps, f"BatchNorm2d {self.name!r} eps"),
                                   f"BatchNorm2d {self.name!r} eps"))


@dataclass(frozen=True)
class ReLU:
    """``torch.nn.ReLU()``."""


@dataclass(frozen=True)
class MaxPool2d:
    """``torch.nn.MaxPool2d(kernel_size, stride, padding)``; a stride of None is the kernel size, as torch's.
    ``padding`` is at most ``kernel_size // 2``, as torch requires: a wider pad would make windows of padding only
    (maximum -inf)."""

    kernel_size: int
    stride: int | None = None
    padding: int = 0

    def __post_init__(self):
        if self.stride is None:
            _set(self, "stride", self.kernel_size)
        _check_counts(self, ("kernel_size", "stride"))
        _set(self, "padding", integer(self.padding, "MaxPool2d padding", low=0, high=self.kernel_size // 2))


@dataclass(frozen=True)
class GlobalMaxPool:
    """``torch.nn.AdaptiveMaxPool2d(1)`` then flatten: ``[C, H, W] -> [C]``."""


@dataclass(frozen=True)
class GlobalAvgPool:
    """``torch.nn.AdaptiveAvgPool2d(1)`` then flatten: ``[C, H, W] -> [C]``."""


@dataclass(frozen=True)
class Flatten:
    """``torch.flatten(x, 1)``: ``[C, H, W] -> [C*H*W]``."""


@dataclass(frozen=True)
class Linear:
    """``torch.nn.Linear(in_features, out_features, bias=bias)``, named ``name``."""

    name: str
    in_features: int
    out_features: int
    bias: bool = True

    def __post_init__(self):
        _check_name(self)
        _check_counts(self, ("in_features", "out_features"))
        _check_bias(self)


@dataclass(frozen=True)
class Scale:
    """Multiply by a constant (FastResNet's logits times 0.125)."""

    factor: float

    def __post_init__(self):
        _set(self, "factor", real_number(self.factor, "Scale factor"))


@dataclass(frozen=True)
class Residual:
    """``body(x) + shortcut(x)``: the shortcut is the identity when empty (FastResNet's residual), else a projection
    (ResNet's ``downsample``). Parameters come in the order body, then shortcut (torch's registration order)."""

    body: tuple
    shortcut: tuple = ()

    def __post_init__(self):
        _set(self, "body", tuple(self.body))
        _set(self, "shortcut", tuple(self.shortcut))


LAYER_TYPES = {cls.__name__: cls for cls in (Conv2d, BatchNorm2d, ReLU, MaxPool2d, GlobalMaxPool, GlobalAvgPool,
                                              Flatten, Linear, Scale, Residual)}


@dataclass(frozen=True)
class NetSpec:
    """A convolutional network as data: ``layers`` applied in order to images of ``in_channels`` channels.

    Construction checks that the layers chain (each layer's input channels or features are what the layer before
    gives; a residual's body and shortcut end alike) and that no two layers share a name; :func:`forward` and the
    other functions check that the images are large enough. :meth:`to_dict` / :meth:`from_dict` give a plain form
    (lists and dicts), the one the conformance protocol passes (``{"kind": "convnet", ...}``).
    """

    layers: tuple
    in_channels: int = 3

    def __post_init__(self):
        object.__setattr__(self, "in_channels", integer(self.in_channels, "in_channels", low=1))
        object.__setattr__(self, "layers", tuple(self.layers))
        _check_layers(self.layers, "layers")
        _check_unique_names(self.layers)
        _trace(self.layers, _Shape(self.in_channels), "layers")

    def to_dict(self) -> dict:
        return {"kind": "convnet", "in_channels": self.in_channels, "layers": [_layer_to_dict(x) for x in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> NetSpec:
        if not isinstance(data, dict) or data.get("kind") != "convnet" or not isinstance(data.get("layers"), list):
            raise ValueError(f"spec must be a dict with kind 'convnet' and a list of layers, got {data!r:.80}")
        return cls(tuple(_layer_from_dict(x) for x in data["layers"]), data.get("in_channels", 3))

    @property
    def num_classes(self) -> int:
        linears = [layer for layer in _walk(self.layers) if isinstance(layer, Linear)]
        if not linears:
            raise ValueError("the network has no Linear layer, so no logits")
        return linears[-1].out_features


def _layer_to_dict(layer) -> dict:
    out = {"type": type(layer).__name__}
    for f in fields(layer):
        value = getattr(layer, f.name)
        out[f.name] = [_layer_to_dict(x) for x in value] if isinstance(layer, Residual) else value
    return out


def _layer_from_dict(data: dict):
    if not isinstance(data, dict) or data.get("type") not in LAYER_TYPES:
        raise ValueError(f"a layer must be a dict with a type in {sorted(LAYER_TYPES)}, got {data!r:.80}")
    values = {k: v for k, v in data.items() if k != "type"}
    known = {f.name for f in fields(LAYER_TYPES[data["type"]])}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"a {data['type']} layer has fields {sorted(known)}, got unknown {unknown}")
    if data["type"] == "Residual":
        values = {k: tuple(_layer_from_dict(x) for x in v) for k, v in values.items()}
    return LAYER_TYPES[data["type"]](**values)


def iter_layers(spec) -> list:
    """Every layer of the network, depth first (a residual's body before its shortcut), residuals left out: the
    order of the parameters."""
    return list(_walk(_check_spec(spec).layers))


def _walk(layers):
    """Every layer, depth first (a residual's body before its shortcut)."""
    for layer in layers:
        if isinstance(layer, Residual):
            yield from _walk(layer.body)
            yield from _walk(layer.shortcut)
        else:
            yield layer


def _check_layers(layers, where: str) -> None:
    for i, layer in enumerate(layers):
        if type(layer) not in LAYER_TYPES.values():
            raise TypeError(f"{where}[{i}] must be one of {sorted(LAYER_TYPES)}, got {type(layer).__name__}")
        if isinstance(layer, Residual):
            _check_layers(layer.body, f"{where}[{i}].body")
            _check_layers(layer.shortcut, f"{where}[{i}].shortcut")


def _check_unique_names(layers) -> None:
    seen = set()
    for layer in _walk(layers):
        name = getattr(layer, "name", None)
        if name in seen:
            raise ValueError(f"layers: the name {name!r} is used by two layers (names are state_dict keys)")
        if name is not None:
            seen.add(name)


class _Shape(NamedTuple):
    """What flows between layers: images ``[channels, height, width]`` or features ``[channels]``
    (``image=False``). Sizes are None where unknown: height and width when tracing a spec without images, the
    features of a Flatten then."""

    channels: int | None
    height: int | None = None
    width: int | None = None
    image: bool = True


def _describe(layer) -> str:
    return f"{type(layer).__name__} {layer.name!r}" if hasattr(layer, "name") else type(layer).__name__


def _expect(where: str, layer, field: str, actual) -> None:
    expected = getattr(layer, field)
    if actual is not None and actual != expected:
        raise ValueError(f"{where} ({_describe(layer)}) {field} is {expected}, but its input has {actual}")


def _window_output(shape: _Shape, k: int, s: int, p: int, where: str, layer, images: str | None):
    """Height and width after a k x k window of stride s over a p-padded input (None where unknown)."""
    if shape.height is None:
        return None, None
    if min(shape.height, shape.width) + 2 * p < k:
        raise ValueError(f"{images} are too small for the network: {where} ({_describe(layer)}) gets "
                         f"{shape.height}x{shape.width} pixels, fewer than its {k}x{k} window with padding {p}")
    return (shape.height + 2 * p - k) // s + 1, (shape.width + 2 * p - k) // s + 1


def _trace(layers, shape: _Shape, where: str, images: str | None = None) -> _Shape:
    """The shape after ``layers`` on an input of ``shape``: checks that channels and features chain and, with
    sizes known (``images`` names them in errors), that every window fits."""
    for i, layer in enumerate(layers):
        here = f"{where}[{i}]"
        needs_images = (Conv2d, BatchNorm2d, MaxPool2d, GlobalMaxPool, GlobalAvgPool)
        if isinstance(layer, needs_images) and not shape.image:
            raise ValueError(f"{here} ({_describe(layer)}) needs images [C, H, W], but its input is features")
        if isinstance(layer, Linear) and shape.image:
            raise ValueError(f"{here} ({_describe(layer)}) needs features, but its input is images [C, H, W] "
                             f"(pool or Flatten first)")
        if isinstance(layer, Conv2d):
            _expect(here, layer, "in_channels", shape.channels)
            size = _window_output(shape, layer.kernel_size, layer.stride, layer.padding, here, layer, images)
            shape = _Shape(layer.out_channels, *size)
        elif isinstance(layer, BatchNorm2d):
            _expect(here, layer, "channels", shape.channels)
        elif isinstance(layer, MaxPool2d):
            shape = _Shape(shape.channels,
                           *_window_output(shape, layer.kernel_size, layer.stride, layer.padding, here, layer, images))
        elif isinstance(layer, (GlobalMaxPool, GlobalAvgPool)):
            shape = _Shape(shape.channels, image=False)
        elif isinstance(layer, Flatten) and shape.image:
            features = None if shape.height is None else shape.channels * shape.height * shape.width
            shape = _Shape(features, image=False)
        elif isinstance(layer, Linear):
            if images is not None and shape.channels != layer.in_features:
                raise ValueError(f"{images} give {shape.channels} features at {here} ({_describe(layer)}), which "
                                 f"takes {layer.in_features}")
            _expect(here, layer, "in_features", shape.channels)
            shape = _Shape(layer.out_features, image=False)
        elif isinstance(layer, Residual):
            body = _trace(layer.body, shape, f"{here}.body", images)
            shortcut = _trace(layer.shortcut, shape, f"{here}.shortcut", images)
            if any(a is not None and b is not None and a != b for a, b in zip(body, shortcut)):
                raise ValueError(f"{here} (Residual): the body gives {_shape_text(body)} but the shortcut "
                                 f"{_shape_text(shortcut)}")
            shape = body
    return shape


def _shape_text(shape: _Shape) -> str:
    sizes = [shape.channels] + ([shape.height, shape.width] if shape.image else [])
    return "[" + ", ".join("?" if n is None else str(n) for n in sizes) + "]"


# ----------------------------------------------------------------------------------------------------------------
# The networks of the paper's image experiments
# ----------------------------------------------------------------------------------------------------------------


def _channels(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


def _check_width(width) -> float:
    return positive(real_number(width, "width"), "width")


def fast_resnet(width: float = 1.0, num_classes: int = 10, scale: float = 0.125) -> NetSpec:
    """The cifar10-fast ResNet of the CIFAR-10 experiment (paper §3.2, App. B.5), as the authors' code builds it:
    prep conv 64; layer1 conv 128, max-pool 2, residual(128); layer2 conv 256, max-pool 2; layer3 conv 512,
    max-pool 2, residual(512); global max-pool; Linear(512, num_classes, no bias); logits times ``scale``. Every
    conv is 3x3, padding 1, no bias, followed by BatchNorm2d and ReLU; a residual is ``x + res2(res1(x))``.
    ``width`` multiplies every channel count (rounded, at least 1). Names as ``hardtovary.accel.torch.models.
    FastResNet``'s ``state_dict``."""
    width = _check_width(width)
    c = [_channels(n, width) for n in (64, 128, 256, 512)]

    def conv_bn(name, c_in, c_out):
        return (Conv2d(f"{name}.0", c_in, c_out, 3, 1, 1), BatchNorm2d(f"{name}.1", c_out), ReLU())

    def residual(name, channels):
        return Residual(conv_bn(f"{name}.res1", channels, channels) + conv_bn(f"{name}.res2", channels, channels))

    layers = (conv_bn("prep", 3, c[0])
              + conv_bn("layer1.0", c[0], c[1]) + (MaxPool2d(2), residual("layer1.2", c[1]))
              + conv_bn("layer2.0", c[1], c[2]) + (MaxPool2d(2),)
              + conv_bn("layer3.0", c[2], c[3]) + (MaxPool2d(2), residual("layer3.2", c[3]))
              + (GlobalMaxPool(), Linear("linear", c[3], integer(num_classes, "num_classes", low=1), bias=False),
                 Scale(real_number(scale, "scale"))))
    return NetSpec(layers, 3)


def resnet18(width: float = 1.0, num_classes: int = 15, in_channels: int = 3) -> NetSpec:
    """The ResNet-18 of the CoinRun experiment (paper §3.3, App. B.6; He et al. 2016, torchvision's layout):
    stem conv 7x7 stride 2 padding 3, BatchNorm2d, ReLU, max-pool 3 stride 2 padding 1; four stages of two
    BasicBlocks (64, 128, 256, 512 channels; the first block of stages 2-4 has stride 2 and a 1x1 projection
    shortcut with BatchNorm); global average pooling; Linear(512, num_classes). A BasicBlock is ``relu(bn2(conv2(
    relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs, padding 1, no bias. On the 64x64 frames of CoinRun the
    stem leaves 16x16 and the last stage 2x2 feature maps. ``num_classes`` defaults to Procgen's 15 actions;
    ``width`` multiplies every channel count. Names as torchvision's ``resnet18`` (``conv1``, ``bn1``,
    ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``)."""
    width = _check_width(width)
    c = [_channels(n, width) for n in (64, 128, 256, 512)]
    layers = [Conv2d("conv1", integer(in_channels, "in_channels", low=1), c[0], 7, 2, 3), BatchNorm2d("bn1", c[0]),
              ReLU(), MaxPool2d(3, 2, 1)]
    c_in = c[0]
    for stage, c_out in enumerate(c, start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            name = f"layer{stage}.{block}"
            body = (Conv2d(f"{name}.conv1", c_in, c_out, 3, stride, 1), BatchNorm2d(f"{name}.bn1", c_out), ReLU(),
                    Conv2d(f"{name}.conv2", c_out, c_out, 3, 1, 1), BatchNorm2d(f"{name}.bn2", c_out))
            shortcut = ((Conv2d(f"{name}.downsample.0", c_in, c_out, 1, stride, 0),
                         BatchNorm2d(f"{name}.downsample.1", c_out)) if stride != 1 or c_in != c_out else ())
            layers += [Residual(body, shortcut), ReLU()]
            c_in = c_out
    layers += [GlobalAvgPool(), Linear("fc", c_in, integer(num_classes, "num_classes", low=1))]
    return NetSpec(tuple(layers), in_channels)


# ----------------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------------


def _layer_params(layer) -> list[tuple[str, tuple[int, ...]]]:
    """``(state_dict key, shape)`` of one layer's parameters, in torch's order (weight, then bias)."""
    if isinstance(layer, Conv2d):
        k = layer.kernel_size
        out = [(f"{layer.name}.weight", (layer.out_channels, layer.in_channels, k, k))]
        return out + ([(f"{layer.name}.bias", (layer.out_channels,))] if layer.bias else [])
    if isinstance(layer, BatchNorm2d):
        return [(f"{layer.name}.weight", (layer.channels,)), (f"{layer.name}.bias", (layer.channels,))]
    if isinstance(layer, Linear):
        out = [(f"{layer.name}.weight", (layer.out_features, layer.in_features))]
        return out + ([(f"{layer.name}.bias", (layer.out_features,))] if layer.bias else [])
    return []


def _check_spec(spec) -> NetSpec:
    if isinstance(spec, dict):
        return NetSpec.from_dict(spec)
    if not isinstance(spec, NetSpec):
        raise TypeError(f"spec must be a NetSpec (or its dict form), got {type(spec).__name__}")
    return spec


def param_names(spec) -> list[str]:
    """The ``state_dict`` keys of the parameters, in ``model.parameters()`` order (depth first; a residual's body
    before its shortcut; each layer's weight before its bias)."""
    return [name for layer in _walk(_check_spec(spec).layers) for name, _ in _layer_params(layer)]


def param_shapes(spec) -> list[tuple[int, ...]]:
    """The parameter shapes, in the order of :func:`param_names`."""
    return [shape for layer in _walk(_check_spec(spec).layers) for _, shape in _layer_params(layer)]


def _batch_norms(spec: NetSpec) -> list[BatchNorm2d]:
    return [layer for layer in _walk(spec.layers) if isinstance(layer, BatchNorm2d)]


def init_params(spec, rng: np.random.Generator) -> list[np.ndarray]:
    """torch's default initialisation, as float64 arrays in parameter order: convolution and Linear weights
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``kaiming_uniform_(a=sqrt(5))``), biases likewise, BatchNorm gamma 1 and
    beta 0. The random stream is NumPy's (``rng``), the distributions torch's."""
    spec = _check_spec(spec)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    params = []
    for layer in _walk(spec.layers):
        shapes = [shape for _, shape in _layer_params(layer)]
        if isinstance(layer, BatchNorm2d):
            params += [np.ones(shapes[0]), np.zeros(shapes[1])]
        elif shapes:
            fan_in = int(np.prod(shapes[0][1:]))
            bound = 1.0 / math.sqrt(fan_in)
            params += [rng.uniform(-bound, bound, shape) for shape in shapes]
    return params


def init_running_stats(spec) -> list[RunningStats]:
    """torch's initial running statistics, mean 0 and variance 1, one per BatchNorm2d in parameter order."""
    return [RunningStats(np.zeros(bn.channels), np.ones(bn.channels)) for bn in _batch_norms(_check_spec(spec))]


# ----------------------------------------------------------------------------------------------------------------
# Forward: activations [G, R, ...], BatchNorm statistics over the R rows (and pixels) of each group
# ----------------------------------------------------------------------------------------------------------------


class _Tape(NamedTuple):
    """What the backward of one layer needs, in execution order; ``param`` indexes its first parameter."""

    layer: object
    param: int
    saved: tuple


def _pad(x: np.ndarray, p: int, value: float = 0.0) -> np.ndarray:
    if p == 0:
        return x
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(p, p), (p, p)], constant_values=value)


def _windows(x: np.ndarray, k: int, s: int) -> np.ndarray:
    """Windows of ``x[..., H, W]``: ``[..., H', W', k, k]`` with ``H' = (H - k) // s + 1`` (a view)."""
    return sliding_window_view(x, (k, k), axis=(-2, -1))[..., ::s, ::s, :, :]


def _conv_forward(layer: Conv2d, W, b, x):
    """``x[G, R, C, H, W]`` -> ``[G, R, O, H', W']``; saves the patch matrix ``[G, R*H'*W', C*k*k]``."""
    G, R = x.shape[:2]
    k, s = layer.kernel_size, layer.stride
    patches = _windows(_pad(x, layer.padding), k, s)                         # [G, R, C, H', W', k, k]
    Ho, Wo = patches.shape[3:5]
    cols = patches.transpose(0, 1, 3, 4, 2, 5, 6).reshape(G, R * Ho * Wo, -1)
    y = cols @ W.reshape(W.shape[0], -1).T                                   # [G, R*H'*W', O]
    if b is not None:
        y = y + b
    return y.reshape(G, R, Ho, Wo, -1).transpose(0, 1, 4, 2, 3), (cols, x.shape)


def _conv_backward(layer: Conv2d, W, dy, saved):
    """Gradients for cotangents ``dy[T, R, O, H', W']``: ``(dx, [dW, db])``."""
    cols, x_shape = saved
    T, R, n_out, Ho, Wo = dy.shape
    C, H, Wd = x_shape[2:]
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    dy_rows = dy.transpose(0, 1, 3, 4, 2).reshape(T, R * Ho * Wo, n_out)
    grads = [(np.swapaxes(dy_rows, 1, 2) @ cols).reshape(T, *W.shape)]      # [T, O, C*k*k] -> [T, O, C, k, k]
    if layer.bias:
        grads.append(dy.sum(axis=(1, 3, 4)))
    dcols = (dy_rows @ W.reshape(n_out, -1)).reshape(T, R, Ho, Wo, C, k, k)
    dx = np.zeros((T, R, C, H + 2 * p, Wd + 2 * p))
    for i in range(k):  # col2im: each kernel offset adds its share back at the pixels it read
        for j in range(k):
            dx[:, :, :, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s] += dcols[..., i, j].transpose(0, 1, 4, 2, 3)
    return dx[:, :, :, p:p + H, p:p + Wd], grads


def _bn_train_forward(layer: BatchNorm2d, gamma, beta, x):
    """Training mode over the rows and pixels of each group: ``x[G, R, C, H, W]``."""
    count = x.shape[1] * x.shape[3] * x.shape[4]
    if count < 2:  # torch refuses it too ("Expected more than 1 value per channel when training")
        raise ValueError(f"BatchNorm2d {layer.name!r} in training mode needs more than one value per channel in a "
                         f"group of rows, got {x.shape[1]} row(s) of {x.shape[3]}x{x.shape[4]} pixels")
    mean = x.mean(axis=(1, 3, 4), keepdims=True)
    var = x.var(axis=(1, 3, 4), keepdims=True)  # biased (ddof 0), as torch normalises
    inv_std = 1.0 / np.sqrt(var + layer.eps)
    xhat = (x - mean) * inv_std
    y = gamma[:, None, None] * xhat + beta[:, None, None]
    squeeze = (lambda a: a[0, 0, :, 0, 0]) if x.shape[0] == 1 else (lambda a: a[:, 0, :, 0, 0])
    return y, (xhat, inv_std), BatchStats(squeeze(mean), squeeze(var), count)


def _bn_backward(gamma, dy, saved):
    """Training mode: through the batch statistics; eval mode (``saved`` ends with ``"eval"``): a fixed affine map,
    ``dx = gamma / sqrt(running_var + eps) * dy``."""
    xhat, inv_std = saved[:2]
    dgamma = np.sum(dy * xhat, axis=(1, 3, 4))
    dbeta = dy.sum(axis=(1, 3, 4))
    if len(saved) == 3:  # eval mode
        return (gamma[:, None, None] * inv_std) * dy, [dgamma, dbeta]
    dx = (gamma[:, None, None] * inv_std) * (dy - dy.mean(axis=(1, 3, 4), keepdims=True)
                                             - xhat * np.mean(dy * xhat, axis=(1, 3, 4), keepdims=True))
    return dx, [dgamma, dbeta]


def _maxpool_forward(layer: MaxPool2d, x):
    k, s = layer.kernel_size, layer.stride
    windows = _windows(_pad(x, layer.padding, -np.inf), k, s)               # [..., H', W', k, k]
    flat = windows.reshape(*windows.shape[:-2], k * k)
    first = np.argmax(flat, axis=-1)                                         # the first maximum, row-major
    return np.take_along_axis(flat, first[..., None], axis=-1)[..., 0], (first, x.shape)


def _maxpool_backward(layer: MaxPool2d, dy, saved):
    first, x_shape = saved
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    T, R, C, Ho, Wo = dy.shape
    H, W = x_shape[-2:]
    dx = np.zeros((T, R, C, H + 2 * p, W + 2 * p))
    for i in range(k):
        for j in range(k):
            dx[:, :, :, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s] += dy * (first == i * k + j)
    return dx[:, :, :, p:p + H, p:p + W]


def _global_max_backward(dy, saved):
    """The gradient of each channel's maximum goes to its first maximum in row-major order."""
    first, x_shape = saved
    hw = x_shape[3] * x_shape[4]
    return (dy[..., None] * (np.arange(hw) == first[..., None])).reshape(dy.shape[:3] + x_shape[3:])


def _forward_layers(layers, params: list, x, p: int, running, tape: list, stats: list):
    """Run ``layers`` on ``x[G, R, ...]`` from parameter index ``p``; append to ``tape`` and (training mode) the
    BatchNorm statistics to ``stats``. ``running`` is None (training mode) or an iterator of RunningStats."""
    for layer in layers:
        start = p
        if isinstance(layer, Conv2d):
            W = params[p]
            b = params[p + 1] if layer.bias else None
            p += 2 if layer.bias else 1
            x, saved = _conv_forward(layer, W, b, x)
        elif isinstance(layer, BatchNorm2d):
            gamma, beta = params[p], params[p + 1]
            p += 2
            if running is None:
                x, saved, batch = _bn_train_forward(layer, gamma, beta, x)
                stats.append(batch)
            else:  # eval mode: the affine map of the running statistics
                r = next(running)
                inv_std = 1.0 / np.sqrt(r.var + layer.eps)[:, None, None]
                xhat = (x - r.mean[:, None, None]) * inv_std
                x = gamma[:, None, None] * xhat + beta[:, None, None]
                saved = (xhat, inv_std, "eval")
        elif isinstance(layer, ReLU):
            saved = (x > 0,)
            x = np.maximum(x, 0.0)
        elif isinstance(layer, MaxPool2d):
            x, saved = _maxpool_forward(layer, x)
        elif isinstance(layer, GlobalMaxPool):
            flat = x.reshape(*x.shape[:3], -1)
            first = np.argmax(flat, axis=-1)
            saved = (first, x.shape)
            x = np.take_along_axis(flat, first[..., None], axis=-1)[..., 0]
        elif isinstance(layer, GlobalAvgPool):
            saved = (x.shape,)
            x = x.mean(axis=(3, 4))
        elif isinstance(layer, Flatten):
            saved = (x.shape,)
            x = x.reshape(*x.shape[:2], -1)
        elif isinstance(layer, Linear):
            W = params[p]
            b = params[p + 1] if layer.bias else None
            p += 2 if layer.bias else 1
            saved = (x,)
            x = x @ W.T + (b if b is not None else 0.0)
        elif isinstance(layer, Scale):
            saved = ()
            x = layer.factor * x
        else:  # Residual
            body_tape, shortcut_tape = [], []
            y, p = _forward_layers(layer.body, params, x, p, running, body_tape, stats)
            z, p = _forward_layers(layer.shortcut, params, x, p, running, shortcut_tape, stats)
            saved = (body_tape, shortcut_tape)
            x = y + z
        tape.append(_Tape(layer, start, saved))
    return x, p


def _run(spec: NetSpec, params: list, x, running_stats=None):
    """The network on ``x[G, R, C, H, W]``: ``(logits[G, R, classes], tape, batch statistics)``."""
    tape, stats = [], []
    running = None if running_stats is None else iter(running_stats)
    logits, _ = _forward_layers(spec.layers, params, x, 0, running, tape, stats)
    if logits.ndim != 3:
        raise ValueError(f"the network must end with logits [N, classes] (a Linear after pooling or Flatten), got "
                         f"outputs of shape {logits.shape[1:]} per image")
    return logits, tape, stats


# ----------------------------------------------------------------------------------------------------------------
# Backward: cotangents [T, R, ...], broadcast against the activations [G, R, ...]
# ----------------------------------------------------------------------------------------------------------------


def _backward_layers(tape: list, params: list, dy, grads: list):
    """Propagate the cotangents ``dy`` back through ``tape``, writing parameter gradients into ``grads``."""
    for entry in reversed(tape):
        layer, p, saved = entry
        if isinstance(layer, Conv2d):
            dy, gs = _conv_backward(layer, params[p], dy, saved)
            grads[p:p + len(gs)] = gs
        elif isinstance(layer, BatchNorm2d):
            dy, grads[p:p + 2] = _bn_backward(params[p], dy, saved)
        elif isinstance(layer, ReLU):
            (positive_,) = saved
            dy = dy * positive_
        elif isinstance(layer, MaxPool2d):
            dy = _maxpool_backward(layer, dy, saved)
        elif isinstance(layer, GlobalMaxPool):
            dy = _global_max_backward(dy, saved)
        elif isinstance(layer, GlobalAvgPool):
            (x_shape,) = saved
            dy = np.broadcast_to(dy[..., None, None] / (x_shape[3] * x_shape[4]), dy.shape + x_shape[3:]).copy()
        elif isinstance(layer, Flatten):
            (x_shape,) = saved
            dy = dy.reshape(dy.shape[:2] + x_shape[2:])
        elif isinstance(layer, Linear):
            (x,) = saved
            grads[p] = np.swapaxes(dy, 1, 2) @ x                              # [T, O, F]
            if layer.bias:
                grads[p + 1] = dy.sum(axis=1)
            dy = dy @ params[p]
        elif isinstance(layer, Scale):
            dy = layer.factor * dy
        else:  # Residual
            body_tape, shortcut_tape = saved
            d_body = _backward_layers(body_tape, params, dy, grads)
            d_shortcut = _backward_layers(shortcut_tape, params, dy, grads) if shortcut_tape else dy
            dy = d_body + d_shortcut
    return dy


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _check_params(spec: NetSpec, params) -> list[np.ndarray]:
    """Count, shape and finiteness of ``params``; returns them as float64 arrays."""
    names = param_names(spec)
    return parameter_arrays(params, param_shapes(spec), names, ', '.join(names[:4]) + ', ...')


def _check_images(spec: NetSpec, X, *, ndim: int, name: str = "X") -> np.ndarray:
    """Images as float64: ``[K, B, C, H, W]`` (ndim 5) or ``[N, C, H, W]`` (ndim 4), nonempty and finite."""
    arr = float_array(X, name)
    layout = "[K, B, C, H, W]" if ndim == 5 else "[N, C, H, W]"
    if arr.ndim != ndim or arr.shape[-3] != spec.in_channels:
        raise ValueError(f"{name} must have shape {layout} with C = {spec.in_channels}, got {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{name} must hold at least one image of at least one pixel, got shape {arr.shape}")
    H, W = arr.shape[-2:]
    _trace(spec.layers, _Shape(spec.in_channels, H, W), "layers", images=f"{name}: images of {H}x{W} pixels")
    return finite(arr, name).astype(np.float64, copy=False)


def _check_semantics(semantics) -> str:
    if not isinstance(semantics, str):
        raise TypeError(f"semantics must be a string, one of {list(SEMANTICS)}, got {semantics!r}")
    return choice(semantics, "semantics", SEMANTICS)


def _check_loss(loss) -> str:
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a string, one of {list(LOSSES)}, got {loss!r}")
    return choice(loss, "loss", LOSSES)


def _check_call(spec, params, X, Y, loss, semantics):
    spec = _check_spec(spec)
    semantics = _check_semantics(semantics)
    loss = _check_loss(loss)
    params = _check_params(spec, params)
    X = _check_images(spec, X, ndim=5)
    K, B = X.shape[:2]
    _losses._validated(loss, np.zeros((K, B, spec.num_classes)), Y, logits_name="logits", targets_name="Y")
    return spec, semantics, loss, params, X


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def forward(spec, params, X, *, semantics: str = "pooled") -> np.ndarray:
    """Training-mode logits ``[K, B, classes]`` of environment batches ``X[K, B, C, H, W]`` (BatchNorm statistics
    over all K*B images, ``pooled``, or over each environment's, ``per_env``)."""
    spec = _check_spec(spec)
    semantics = _check_semantics(semantics)
    params = _check_params(spec, params)
    X = _check_images(spec, X, ndim=5)
    K, B = X.shape[:2]
    x = X if semantics == "per_env" else X.reshape(1, K * B, *X.shape[2:])
    logits, _, _ = _run(spec, params, x)
    return logits.reshape(K, B, -1)


def predict(spec, params, X, running_stats) -> np.ndarray:
    """Eval-mode logits ``[N, classes]`` of images ``X[N, C, H, W]``: every BatchNorm2d is the affine map of its
    running statistics (one :class:`RunningStats` per BatchNorm2d, in parameter order)."""
    spec = _check_spec(spec)
    params = _check_params(spec, params)
    X = _check_images(spec, X, ndim=4)
    running = check_running_stats(running_stats, [bn.channels for bn in _batch_norms(spec)])
    logits, _, _ = _run(spec, params, X[None], running)
    return logits[0]


def running_stats_after(spec, params, X, *, semantics: str = "pooled", running_stats=None,
                        momentum: float = 0.1) -> list[RunningStats]:
    """The running statistics after one training-mode forward of ``X[K, B, C, H, W]``, starting from
    ``running_stats`` (torch's initial ones, :func:`init_running_stats`, by default): ``pooled`` statistics give
    one update of every BatchNorm2d, ``per_env`` statistics K updates in environment order (K separate torch
    forwards), as :func:`update_running_stats` defines them (momentum ``m``: ``running <- (1 - m) running + m
    batch``, the unbiased batch variance for ``running_var``)."""
    spec = _check_spec(spec)
    semantics = _check_semantics(semantics)
    params = _check_params(spec, params)
    X = _check_images(spec, X, ndim=5)
    K, B = X.shape[:2]
    _, _, stats = _run(spec, params, X.reshape(1, K * B, *X.shape[2:]) if semantics == "pooled" else X)
    running = (init_running_stats(spec) if running_stats is None
               else check_running_stats(running_stats, [bn.channels for bn in _batch_norms(spec)]))
    return update_running_stats(running, stats, momentum)


def env_gradients(spec, params, X, Y, *, loss: str = "cross_entropy", semantics: str = "pooled") -> EnvGradients:
    """Per-environment gradients ``G[e] = dL_e/dtheta`` of environment batches, in training mode.

    ``X``: real floating ``[K, B, C, H, W]``. ``Y``: the cross-entropy targets of logits ``[K, B, classes]``: class
    indices (integer ``[K, B]``) or probability rows (real ``[K, B, classes]``; soft targets, whose cross-entropy is
    the KL divergence to the target distribution up to its entropy). ``L_e`` is the mean loss over environment e's
    B images. ``pooled``: one forward over all K*B images, ``G[e]`` through the shared statistics (dense
    cotangents, K times the cost of one backward); ``per_env``: statistics per environment (about one backward).

    Returns :class:`EnvGradients`: ``grads`` (one float64 stack ``[K, *shape]`` per parameter), ``losses`` ``[K]``,
    ``logits`` ``[K, B, classes]`` and ``bn_stats`` (one :class:`BatchStats` per BatchNorm2d, for
    :func:`update_running_stats`).
    """
    spec, semantics, loss, params, X = _check_call(spec, params, X, Y, loss, semantics)
    K, B = X.shape[:2]
    pooled = semantics == "pooled"
    logits, tape, stats = _run(spec, params, X.reshape(1, K * B, *X.shape[2:]) if pooled else X)
    logits = logits.reshape(K, B, -1)
    dlogits = _losses.loss_gradient(loss, logits, Y) / B                     # dL_e / dlogits, [K, B, classes]
    if pooled:  # cotangent e: environment e's rows, and zero on the others
        dense = np.zeros((K, K, B, logits.shape[-1]))
        dense[np.arange(K), np.arange(K)] = dlogits
        dlogits = dense.reshape(K, K * B, -1)
    grads = [None] * len(params)
    _backward_layers(tape, params, dlogits, grads)
    return EnvGradients(grads, _losses.loss_per_example(loss, logits, Y).mean(axis=1), logits, stats)


def pooled_gradient(spec, params, X, Y, *, loss: str = "cross_entropy", semantics: str = "pooled"):
    """Gradient of the pooled loss ``L = (1/K) sum_e L_e``, in one backward: ``(grads, L)``."""
    spec, semantics, loss, params, X = _check_call(spec, params, X, Y, loss, semantics)
    K, B = X.shape[:2]
    pooled = semantics == "pooled"
    logits, tape, _ = _run(spec, params, X.reshape(1, K * B, *X.shape[2:]) if pooled else X)
    logits = logits.reshape(K, B, -1)
    dlogits = _losses.loss_gradient(loss, logits, Y) / (K * B)
    grads = [None] * len(params)
    # one cotangent over every row: [1, K*B, classes] (pooled), or each environment's part in its own group,
    # whose gradients are then summed
    _backward_layers(tape, params, dlogits.reshape(1, K * B, -1) if pooled else dlogits, grads)
    grads = [g.sum(axis=0) for g in grads]
    return grads, float(_losses.loss_per_example(loss, logits, Y).mean())


def example_gradients(spec, params, X, Y, *, loss: str = "cross_entropy") -> EnvGradients:
    """Per-example gradients of images ``X[N, C, H, W]``: every image is its own environment (K = N, B = 1) with
    BatchNorm statistics over the N images, each example's loss differentiated through them (the CIFAR-10
    experiment, paper §3.2). ``Y``: ``[N]`` class indices or ``[N, classes]`` probability rows. Returns
    :func:`env_gradients` on ``X[:, None]``: grads ``[N, *shape]``, losses ``[N]``, logits ``[N, 1, classes]``."""
    spec = _check_spec(spec)
    X = _check_images(spec, X, ndim=4)
    Y = np.asarray(Y)
    if Y.ndim < 1 or Y.shape[0] != X.shape[0]:
        raise ValueError(f"Y must have one target (row) per image of X, leading axis {X.shape[0]}, got {Y.shape}")
    return env_gradients(spec, params, X[:, None], Y[:, None], loss=loss, semantics="pooled")
