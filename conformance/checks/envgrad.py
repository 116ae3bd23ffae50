"""``envgrad.<nobn|bn_pooled|bn_per_env>.<bce|ce|mse>``: per-environment gradients of the oracle's MLP
(:func:`hardtovary.reference.mlp.env_gradients`) with and without BatchNorm, in both semantics (statistics pooled
over all environments, or per environment), for every loss, on drawn architectures and weights."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from hardtovary.reference import mlp as _mlp

from ..compare import compare_arrays
from ..judging import draw_and_judge
from ..registry import Check, register

LOSSES = {"bce": "bce_with_logits", "ce": "cross_entropy", "mse": "mse"}
BN_MODES = {"nobn": (False, "pooled"), "bn_pooled": (True, "pooled"), "bn_per_env": (True, "per_env")}


def _envgrad_check(bn_mode, loss_key):
    batch_norm, semantics = BN_MODES[bn_mode]
    loss = LOSSES[loss_key]

    def run(adapter, settings):
        def body(data):
            in_f = data.draw(st.integers(1, 4), label="in_features")
            hidden = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1 if batch_norm else 0, max_size=2),
                                     label="hidden"))
            out_f = 1 if loss == "bce_with_logits" else data.draw(st.integers(1, 3), label="out_features")
            activation = data.draw(st.sampled_from(("leaky_relu", "relu", "tanh")), label="activation")
            K = data.draw(st.integers(1, 4), label="K")
            B = data.draw(st.integers(2 if batch_norm else 1, 4), label="B")
            seed = data.draw(st.integers(0, 2**16), label="seed")
            spec = dict(in_features=in_f, hidden=hidden, out_features=out_f, activation=activation,
                        negative_slope=0.01, batch_norm=batch_norm, bn_eps=1e-5)
            mspec = _mlp.MLPSpec(**spec)
            rng = np.random.default_rng(seed)
            params = _mlp.init_params(mspec, rng)
            if batch_norm:  # non-trivial gamma/beta
                params = [p + 0.1 * rng.standard_normal(p.shape) for p in params]
            X = rng.standard_normal((K, B, in_f))
            if loss == "bce_with_logits":
                Y = rng.integers(0, 2, (K, B)).astype(np.float64)
            elif loss == "cross_entropy":
                Y = rng.integers(0, out_f, (K, B))
            else:
                Y = rng.standard_normal((K, B, out_f))
            expected = _mlp.env_gradients(mspec, params, X, Y, loss=loss, semantics=semantics).grads
            got = adapter.env_gradients(spec, params, X, Y, loss=loss, semantics=semantics)
            # Rounding in a backward pass is relative to the magnitudes flowing through it, not to each tensor's own
            # size: a Linear bias feeding BatchNorm has a gradient that is exactly 0 in exact arithmetic and
            # rounding noise (~1e-17) in any implementation. The global gradient scale is added to each tensor's.
            global_scale = max((float(np.abs(e).max()) for e in expected if e.size), default=0.0)
            compare_arrays(got, expected, {"spec": spec, "K": K, "B": B, "seed": seed, "loss": loss,
                                           "semantics": semantics}, what="grads", scale_extra=global_scale)
        return draw_and_judge(settings, body, cap=15)
    return run


for _bn_mode in BN_MODES:
    for _loss_key, _loss in LOSSES.items():
        register(Check(f"envgrad.{_bn_mode}.{_loss_key}", f"env_gradients ({_bn_mode}, {_loss}) vs "
                       "reference.mlp.env_gradients", "env_gradients", _envgrad_check(_bn_mode, _loss_key)))
