"""Models of the experiments: the reference MLP as a torch ``nn.Sequential``, FastResNet (CIFAR-10) and its 8x8
sibling (the digits), and any convolutional network of :mod:`hardtovary.reference.convnet` (:func:`from_spec`:
FastResNet, the CoinRun ResNet-18).

- :func:`mlp_from_spec` builds ``Linear -> [BatchNorm1d] -> activation`` per hidden layer and a final ``Linear``
  from a :class:`hardtovary.reference.mlp.MLPSpec`; its ``state_dict`` keys are
  :func:`hardtovary.reference.mlp.param_names` (same Sequential indices), so :func:`load_reference_params`
  copies the oracle's parameter list 1:1.
- :class:`FastResNet` is the Page cifar10-fast network of the PyTorch-Ignite CIFAR-10 example (paper App. B.5),
  with a width multiplier for small tests. No module uses ``inplace=True``, so it runs under ``torch.func``.
- :class:`DigitsResNet` is FastResNet sized for scikit-learn's 8x8 one-channel digits (its first two stages), for
  the memorization experiments at a CPU's scale.
- :func:`from_spec` builds a :class:`SpecNet` from a :class:`hardtovary.reference.convnet.NetSpec`: one torch
  module per parameterised layer, registered under the layer's name, so ``state_dict`` keys and parameter order
  are :func:`hardtovary.reference.convnet.param_names` and :func:`load_reference_params` copies the oracle's
  parameters 1:1. ``from_spec(convnet.fast_resnet(w))`` has the names of ``FastResNet(width=w)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hardtovary.reference import convnet as _convnet
from hardtovary.reference import mlp as _mlp

__all__ = ["mlp_from_spec", "load_reference_params", "FastResNet", "DigitsResNet", "conv_bn", "Residual", "SpecNet",
           "from_spec"]


def _activation(spec: _mlp.MLPSpec) -> nn.Module:
    if spec.activation == "leaky_relu":
        return nn.LeakyReLU(spec.negative_slope)
    if spec.activation == "relu":
        return nn.ReLU()
    return nn.Tanh()


def mlp_from_spec(spec: _mlp.MLPSpec, *, dtype: torch.dtype | None = None, device=None) -> nn.Sequential:
    """The ``nn.Sequential`` of ``spec``: per hidden layer ``Linear -> [BatchNorm1d(eps=spec.bn_eps)] ->
    activation``, then ``Linear(last, out_features)``. Parameter order and names equal
    ``reference.mlp.param_names(spec)``. Initialised with torch's defaults (use :func:`load_reference_params`
    to copy the oracle's weights)."""
    if not isinstance(spec, _mlp.MLPSpec):
        raise TypeError(f"spec must be a hardtovary.reference.mlp.MLPSpec, got {type(spec).__name__}")
    layers: list[nn.Module] = []
    fan_in = spec.in_features
    for width in spec.hidden:
        layers.append(nn.Linear(fan_in, width))
        if spec.batch_norm:
            layers.append(nn.BatchNorm1d(width, eps=spec.bn_eps))
        layers.append(_activation(spec))
        fan_in = width
    layers.append(nn.Linear(fan_in, spec.out_features))
    model = nn.Sequential(*layers)
    if dtype is not None or device is not None:
        model = model.to(dtype=dtype, device=device)
    names = [name for name, _ in model.named_parameters()]
    assert names == _mlp.param_names(spec), (names, _mlp.param_names(spec))
    return model


def load_reference_params(model: nn.Module, params) -> nn.Module:
    """Copy a list of arrays (the oracle's parameter list, in ``model.parameters()`` order) into ``model``,
    converting to each parameter's dtype and device. Returns ``model``."""
    model_params = list(model.parameters())
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list or tuple of arrays, got {type(params).__name__}")
    if len(params) != len(model_params):
        raise ValueError(f"params must hold {len(model_params)} arrays (one per parameter), got {len(params)}")
    with torch.no_grad():
        for i, (p, value) in enumerate(zip(model_params, params)):
            value = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"params[{i}] must have shape {tuple(p.shape)}, got {tuple(value.shape)}")
            p.copy_(value.to(dtype=p.dtype, device=p.device))
    return model


# ----------------------------------------------------------------------------------------------------------------
# FastResNet  [paper §3.2, App. B.5; the PyTorch-Ignite CIFAR-10 example]
# ----------------------------------------------------------------------------------------------------------------


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """``Conv2d(3x3, padding 1, bias=False) -> BatchNorm2d -> ReLU``."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class Residual(nn.Module):
    """``x + conv_bn(conv_bn(x))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.res1 = conv_bn(channels, channels)
        self.res2 = conv_bn(channels, channels)

    def forward(self, x):
        return x + self.res2(self.res1(x))


def _channels(width, base: tuple) -> list[int]:
    """The channel counts ``base`` times ``width`` (a real > 0), rounded, at least 1."""
    if not (isinstance(width, (int, float)) and not isinstance(width, bool) and width > 0):
        raise ValueError(f"width must be a real > 0, got {width!r}")
    return [max(1, int(round(n * width))) for n in base]


class FastResNet(nn.Module):
    """The cifar10-fast ResNet: prep conv 64; layer1 conv 128 + maxpool + residual(128); layer2 conv 256 +
    maxpool; layer3 conv 512 + maxpool + residual(512); adaptive max-pool; ``Linear(512, num_classes,
    bias=False)``; logits times ``scale`` (0.125). BatchNorm + ReLU throughout.

    ``width`` multiplies every channel count (rounded, at least 1), e.g. ``width=0.125`` for fast tests.
    Input ``[N, 3, H, W]`` with H, W divisible by 8 (32x32 for CIFAR-10); output ``[N, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, *, width: float = 1.0, scale: float = 0.125):
        super().__init__()
        c = _channels(width, (64, 128, 256, 512))
        self.scale = float(scale)
        self.prep = conv_bn(3, c[0])
        self.layer1 = nn.Sequential(conv_bn(c[0], c[1]), nn.MaxPool2d(2), Residual(c[1]))
        self.layer2 = nn.Sequential(conv_bn(c[1], c[2]), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(c[2], c[3]), nn.MaxPool2d(2), Residual(c[3]))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.linear = nn.Linear(c[3], num_classes, bias=False)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = self.pool(x).flatten(1)
        return self.linear(x) * self.scale


class DigitsResNet(nn.Module):
    """FastResNet sized for scikit-learn's 8x8 one-channel digits (the memorization experiments of paper §3.2, Figs.
    8, 9, 16, at a CPU's scale): prep conv 16 (8x8); layer1 conv 32 + maxpool (4x4) + residual(32); layer2 conv 64
    + maxpool (2x2) + residual(64); adaptive max-pool; ``Linear(64, num_classes, bias=False)``; logits times
    ``scale`` (0.125). BatchNorm + ReLU throughout, built from FastResNet's own blocks.

    FastResNet's third stage is left out: on 8x8 inputs it would convolve 1x1 maps, where a 3x3 kernel is its centre
    tap alone. ``width`` multiplies every channel count (rounded, at least 1). Input ``[N, 1, H, W]`` with H, W
    divisible by 4; output ``[N, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, *, width: float = 1.0, scale: float = 0.125):
        super().__init__()
        c = _channels(width, (16, 32, 64))
        self.scale = float(scale)
        self.prep = conv_bn(1, c[0])
        self.layer1 = nn.Sequential(conv_bn(c[0], c[1]), nn.MaxPool2d(2), Residual(c[1]))
        self.layer2 = nn.Sequential(conv_bn(c[1], c[2]), nn.MaxPool2d(2), Residual(c[2]))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.linear = nn.Linear(c[2], num_classes, bias=False)

    def forward(self, x):
        x = self.pool(self.layer2(self.layer1(self.prep(x)))).flatten(1)
        return self.linear(x) * self.scale


# ----------------------------------------------------------------------------------------------------------------
# Any network of hardtovary.reference.convnet
# ----------------------------------------------------------------------------------------------------------------


class SpecNet(nn.Module):
    """A :class:`hardtovary.reference.convnet.NetSpec` as a torch module. Parameterised layers are registered under
    their names (containers are created for the dotted path, in the spec's order), and :meth:`forward` walks the
    spec: ReLU, pooling, flattening and scaling are functional calls. Training-mode BatchNorm2d updates its running
    statistics as torch's does."""

    def __init__(self, spec):
        super().__init__()
        self.spec = _convnet.NetSpec.from_dict(spec) if isinstance(spec, dict) else spec
        for layer in _convnet.iter_layers(self.spec):
            module = _module_of(layer)
            if module is not None:
                *path, leaf = layer.name.split(".")
                parent = self
                for part in path:
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(leaf, module)

    def forward(self, x):
        return self._apply_layers(self.spec.layers, x)

    def _apply_layers(self, layers, x):
        for layer in layers:
            if isinstance(layer, (_convnet.Conv2d, _convnet.BatchNorm2d, _convnet.Linear)):
                x = self.get_submodule(layer.name)(x)
            elif isinstance(layer, _convnet.ReLU):
                x = F.relu(x)
            elif isinstance(layer, _convnet.MaxPool2d):
                x = F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding)
            elif isinstance(layer, _convnet.GlobalMaxPool):
                x = F.adaptive_max_pool2d(x, 1).flatten(1)
            elif isinstance(layer, _convnet.GlobalAvgPool):
                x = F.adaptive_avg_pool2d(x, 1).flatten(1)
            elif isinstance(layer, _convnet.Flatten):
                x = x.flatten(1)
            elif isinstance(layer, _convnet.Scale):
                x = x * layer.factor
            else:  # Residual
                x = self._apply_layers(layer.body, x) + (self._apply_layers(layer.shortcut, x) if layer.shortcut
                                                         else x)
        return x


def _module_of(layer) -> nn.Module | None:
    if isinstance(layer, _convnet.Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         bias=layer.bias)
    if isinstance(layer, _convnet.BatchNorm2d):
        return nn.BatchNorm2d(layer.channels, eps=layer.eps)
    if isinstance(layer, _convnet.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    return None


def from_spec(spec, *, dtype: torch.dtype | None = None, device=None) -> SpecNet:
    """The torch module of a :class:`hardtovary.reference.convnet.NetSpec` (or its dict form), with torch's default
    initialisation; its parameter names and order are ``convnet.param_names(spec)``."""
    model = SpecNet(spec)
    if dtype is not None or device is not None:
        model = model.to(dtype=dtype, device=device)
    names = [name for name, _ in model.named_parameters()]
    assert names == _convnet.param_names(model.spec), (names, _convnet.param_names(model.spec))
    return model
