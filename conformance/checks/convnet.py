"""Convolutional networks (:mod:`hardtovary.reference.convnet`): per-example and per-environment gradients and the
running statistics of BatchNorm2d, against the oracle.

- ``envgrad.<fast_resnet|resnet18>.<per_example|pooled|per_env>.<ce|soft>``: the networks of the image
  experiments at width 1/16 (FastResNet on 16x16 images, the CoinRun ResNet-18 on CoinRun's 64x64), per example (every
  image its own environment, statistics over the batch: the CIFAR-10 experiment) and per environment with pooled
  or per-environment statistics, with hard labels and with soft targets (CoinRun's expert distributions).
- ``envgrad.convnet.layers.<pooled|per_env>``: small networks that use every layer: strided, padded, biased
  convolutions of kernel 1, 3 and 7, overlapping max pools with padding, identity and projection residuals,
  global max and average pooling, Flatten, Scale.
- ``envgrad.convnet.ties``: max pools over windows whose maxima tie at positive values and at zero (after a
  ReLU): the gradient goes to the first maximum in row-major order, as torch's.
- ``eval.convnet.<pooled|per_env>``: eval-mode logits after one training forward has updated the running
  statistics (torch's momentum convention and unbiased running variance).

Sizes are small enough for a check to take seconds; the judging is the suite's (:func:`..compare.compare_arrays`
within the float64 tolerance, relative to the largest gradient of the network).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from hardtovary.reference import convnet as cn

from ..compare import compare_arrays
from ..judging import draw_and_judge, judge_each
from ..registry import Check, check, register

#: The networks of the image experiments, at the sizes the checks use: (spec, image shape [C, H, W]).
NETWORKS = {
    "fast_resnet": (cn.fast_resnet(width=1 / 16), (3, 16, 16)),
    "resnet18": (cn.resnet18(width=1 / 16), (3, 64, 64)),
}
#: layout -> (semantics, batch per environment or None to draw it)
LAYOUTS = {"per_example": ("pooled", 1), "pooled": ("pooled", None), "per_env": ("per_env", None)}
TARGET_KINDS = ("ce", "soft")


def _params(spec, rng) -> list:
    """torch's initialisation, with BatchNorm's gamma and beta moved off 1 and 0 so that they matter."""
    return [p + 0.1 * rng.standard_normal(p.shape) for p in cn.init_params(spec, rng)]


def _targets(kind: str, rng, shape: tuple, classes: int):
    if kind == "ce":
        return rng.integers(0, classes, shape)
    return rng.dirichlet(np.ones(classes), shape)


def _compare_gradients(adapter, spec, params, X, Y, semantics, ctx: dict) -> None:
    expected = cn.env_gradients(spec, params, X, Y, loss="cross_entropy", semantics=semantics).grads
    got = adapter.env_gradients(spec.to_dict(), params, X, Y, loss="cross_entropy", semantics=semantics)
    # rounding in a backward pass is relative to the magnitudes flowing through it: the largest gradient of the
    # network is added to each tensor's own scale (as for the MLP)
    scale = max(float(np.abs(e).max()) for e in expected if e.size)
    compare_arrays(got, expected, dict(ctx, semantics=semantics, K=X.shape[0], B=X.shape[1]), what="grads",
                   scale_extra=scale)


def _network_check(net: str, layout: str, kind: str):
    spec, image = NETWORKS[net]
    semantics, batch = LAYOUTS[layout]

    def run(adapter, settings):
        def body(data):
            K = data.draw(st.integers(2, 4) if batch == 1 else st.integers(1, 3), label="K")
            B = batch or data.draw(st.integers(1, 3), label="B")
            seed = data.draw(st.integers(0, 2**16), label="seed")
            rng = np.random.default_rng(seed)
            params = _params(spec, rng)
            X = rng.standard_normal((K, B, *image))
            Y = _targets(kind, rng, (K, B), spec.num_classes)
            _compare_gradients(adapter, spec, params, X, Y, semantics, {"network": net, "seed": seed,
                                                                        "targets": kind})
        return draw_and_judge(settings, body, cap=3)
    return run


for _net in NETWORKS:
    for _layout in LAYOUTS:
        for _kind in TARGET_KINDS:
            register(Check(f"envgrad.{_net}.{_layout}.{_kind}",
                           f"env_gradients of {_net} (width 1/16), {_layout.replace('_', '-')}, "
                           f"{'hard labels' if _kind == 'ce' else 'soft targets'}, vs reference.convnet",
                           "env_gradients", _network_check(_net, _layout, _kind)))


# ----------------------------------------------------------------------------------------------------------------
# every layer
# ----------------------------------------------------------------------------------------------------------------

#: Small networks that use every layer type and option: (spec, image shape).
LAYER_NETS = (
    (cn.NetSpec((cn.Conv2d("a", 3, 4, 3, 2, 1, bias=True), cn.BatchNorm2d("a_bn", 4), cn.ReLU(),
                 cn.MaxPool2d(3, 2, 1),
                 cn.Residual((cn.Conv2d("r.c1", 4, 4, 3, 1, 1), cn.BatchNorm2d("r.b1", 4), cn.ReLU(),
                              cn.Conv2d("r.c2", 4, 4, 3, 1, 1), cn.BatchNorm2d("r.b2", 4))),
                 cn.ReLU(),
                 cn.Residual((cn.Conv2d("p.c1", 4, 6, 3, 2, 1), cn.BatchNorm2d("p.b1", 6)),
                             (cn.Conv2d("p.down", 4, 6, 1, 2, 0), cn.BatchNorm2d("p.down_bn", 6))),
                 cn.GlobalAvgPool(), cn.Linear("fc", 6, 3), cn.Scale(0.5)), 3), (3, 16, 16)),
    (cn.NetSpec((cn.Conv2d("c", 2, 3, 1, bias=True), cn.ReLU(), cn.MaxPool2d(2), cn.Flatten(),
                 cn.Linear("fc", 3 * 4 * 4, 4)), 2), (2, 8, 8)),
    (cn.NetSpec((cn.Conv2d("stem", 1, 2, 7, 2, 3), cn.BatchNorm2d("stem_bn", 2), cn.ReLU(), cn.GlobalMaxPool(),
                 cn.Linear("fc", 2, 2, bias=False)), 1), (1, 12, 12)),
)


def _layers_check(semantics: str):
    def run(adapter, settings):
        def body(data):
            net = data.draw(st.integers(0, len(LAYER_NETS) - 1), label="network")
            spec, image = LAYER_NETS[net]
            K = data.draw(st.integers(1, 3), label="K")
            B = data.draw(st.integers(1, 3), label="B")
            seed = data.draw(st.integers(0, 2**16), label="seed")
            rng = np.random.default_rng(seed)
            X = rng.standard_normal((K, B, *image))
            Y = _targets(data.draw(st.sampled_from(TARGET_KINDS), label="targets"), rng, (K, B), spec.num_classes)
            _compare_gradients(adapter, spec, _params(spec, rng), X, Y, semantics, {"network": net, "seed": seed})
        return draw_and_judge(settings, body, cap=10)
    return run


for _semantics in ("pooled", "per_env"):
    register(Check(f"envgrad.convnet.layers.{_semantics}", f"env_gradients of small networks using every layer "
                   f"type ({_semantics} statistics) vs reference.convnet", "env_gradients", _layers_check(_semantics)))


# ----------------------------------------------------------------------------------------------------------------
# ties in max pooling
# ----------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class TieCase:
    name: str
    spec: cn.NetSpec
    params: list
    X: np.ndarray
    Y: np.ndarray

    def label(self) -> str:
        return self.name


def _tie_image() -> np.ndarray:
    """Two channels of 4x4 pixels whose 1x1 convolution with weights (1, 1) gives, in every 2x2 window, the values
    1 (from (1, 0)), 1 (from (0, 1)), 1 (from (0.5, 0.5)) and 0.5: a three-way tie at a positive value between
    pixels with different inputs, so that where the gradient goes changes the convolution's weight gradient."""
    window = np.array([[[1.0, 0.0], [0.5, 0.25]], [[0.0, 1.0], [0.5, 0.25]]])   # [channel, 2, 2]
    return np.tile(window, (1, 2, 2))


def _tie_cases() -> list:
    one = np.ones((1, 2, 1, 1))
    fc = np.array([[1.0, -2.0, 0.5, 3.0], [-1.0, 0.25, 2.0, -0.5]])
    X = np.stack([_tie_image(), _tie_image()[:, ::-1]])[None]                  # [K=1, B=2, 2, 4, 4]
    Y = np.array([[0, 1]])
    window = cn.NetSpec((cn.Conv2d("c", 2, 1, 1), cn.MaxPool2d(2), cn.Flatten(), cn.Linear("fc", 4, 2)), 2)
    overlapping = cn.NetSpec((cn.Conv2d("c", 2, 1, 1), cn.MaxPool2d(3, 2, 1), cn.Flatten(), cn.Linear("fc", 4, 2)), 2)
    global_max = cn.NetSpec((cn.Conv2d("c", 2, 1, 1), cn.GlobalMaxPool(), cn.Linear("fc", 1, 2)), 2)
    relu_zeros = cn.NetSpec((cn.Conv2d("c", 2, 1, 1, bias=True), cn.ReLU(), cn.MaxPool2d(2), cn.Flatten(),
                             cn.Linear("fc", 4, 2)), 2)
    return [TieCase("2x2 windows, a three-way tie at 1", window, [one, fc, np.zeros(2)], X, Y),
            TieCase("3x3 windows, stride 2, padding 1, ties at 1", overlapping, [one, fc, np.zeros(2)], X, Y),
            TieCase("global max, ties at 1", global_max, [one, fc[:, :1], np.zeros(2)], X, Y),
            TieCase("windows of zeros after a ReLU", relu_zeros, [-one, np.array([0.5]), fc, np.zeros(2)], X, Y)]


@check("envgrad.convnet.ties", "max pools whose windows tie (at a positive value, and at zero after a ReLU): the "
       "gradient goes to the first maximum in row-major order, as torch's", needs="env_gradients")
def _ties(adapter, settings):
    return judge_each(_tie_cases(), lambda case: _compare_gradients(
        adapter, case.spec, case.params, case.X, case.Y, "pooled", {"case": case.name}))


# ----------------------------------------------------------------------------------------------------------------
# running statistics and eval mode
# ----------------------------------------------------------------------------------------------------------------


def _eval_check(semantics: str):
    nets = [LAYER_NETS[0], NETWORKS["fast_resnet"]]

    def run(adapter, settings):
        def body(data):
            spec, image = nets[data.draw(st.integers(0, len(nets) - 1), label="network")]
            K = data.draw(st.integers(1, 3), label="K")
            B = data.draw(st.integers(1, 3), label="B")
            seed = data.draw(st.integers(0, 2**16), label="seed")
            rng = np.random.default_rng(seed)
            params = _params(spec, rng)
            X_train = rng.standard_normal((K, B, *image)) + rng.standard_normal()  # running means away from 0
            X_eval = rng.standard_normal((2, *image))
            running = cn.running_stats_after(spec, params, X_train, semantics=semantics)
            expected = cn.predict(spec, params, X_eval, running)
            got = adapter.eval_logits(spec.to_dict(), params, X_train, X_eval, semantics=semantics)
            compare_arrays([got], [expected], {"seed": seed, "K": K, "B": B, "semantics": semantics},
                           what="eval logits")
        return draw_and_judge(settings, body, cap=5)
    return run


for _semantics in ("pooled", "per_env"):
    register(Check(f"eval.convnet.{_semantics}", f"eval-mode logits after one training forward ({_semantics}) has "
                   "updated the running statistics, vs reference.convnet", "eval_logits", _eval_check(_semantics)))
