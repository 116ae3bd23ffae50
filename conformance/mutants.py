"""Planted mutants: the suite's teeth.

Each mutant is a target built on the oracle (:class:`~hardtovary.conformance.targets.ReferenceTarget`) with one
deliberate bug taken from a real implementation's mistake, or one that a tolerance or a property exists to catch.
``MUTANTS`` maps a name to a :class:`Mutant`: the target, what it breaks, and the checks known to catch it (the
teeth test asserts that each of those checks FAILs).
Run one by hand: ``--target hardtovary.conformance.mutants:strict_gt``.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from hardtovary.reference import convnet as _convnet
from hardtovary.reference import rules as _rules

from .targets import ReferenceTarget


def _signs(G, zero_as_plus=False):
    s = np.sign(G)
    return np.where(s == 0, 1.0, s) if zero_as_plus else s


class _RuleMutant(ReferenceTarget):
    """Reimplements aggregate from parts so that one piece can be swapped."""

    rescale_mode = "per_tensor"   # "per_tensor" | "always" | "never" | "global"
    #: added to the kept fraction before inverting it (the authors' code adds 1e-10, which no tolerance sees)
    kept_fraction_smoothing = 0.0

    def keep(self, G, tau):  # canonical
        K = G.shape[0]
        return np.abs(np.sign(G).sum(0)) >= _rules.agreement_threshold_count(tau, K)

    def combine(self, G):
        return G.mean(0)

    def value_and_mask(self, G, rule, tau, flavour, k):
        if rule == "and_mask":
            keep = self.keep(G, tau)
            return np.where(keep, self.combine(G), 0.0), keep.astype(float)
        if rule == "mean":
            return self.combine(G), np.ones(G.shape[1:])
        if rule == "geometric_mean":
            return self.geometric(G, flavour or "paper", tau)
        k = 10.0 if k is None else k
        m = self.sand(G, tau, k)
        return m * G.mean(0), m

    def geometric(self, G, flavour, tau):
        v = _rules.geometric_mean(G, flavour=flavour, tau=tau if flavour == "original" else None)
        return v, _rules.geometric_mean_mask(G, flavour=flavour, tau=tau if flavour == "original" else None)

    def sand(self, G, tau, k):
        return _rules.sand_mask(G, tau, k)

    def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
        grads = [np.asarray(g) for g in grads]
        for g in grads:
            if not np.all(np.isfinite(g)):
                raise ValueError("non-finite gradient")
        pairs = [self.value_and_mask(np.asarray(g, dtype=np.float64), rule, tau, flavour, k) for g in grads]
        do = {"per_tensor": rescale, "always": True, "never": False, "global": rescale}[self.rescale_mode]
        if not do:
            return [v for v, _ in pairs]
        if self.rescale_mode == "global":
            n = sum(m.size for _, m in pairs)
            kept = sum(float(m.sum()) for _, m in pairs)
            return [v * (n / kept) if kept else v * 0 for v, _ in pairs]
        return [v / (m.sum() / m.size + self.kept_fraction_smoothing) if m.sum() else v * 0 for v, m in pairs]


class StrictGreater(_RuleMutant):
    def keep(self, G, tau):
        return np.abs(np.sign(G).sum(0)) > tau * G.shape[0]


class SumNotMean(_RuleMutant):
    def combine(self, G):
        return G.sum(0)


class RescaleAlways(_RuleMutant):
    rescale_mode = "always"


class RescaleNever(_RuleMutant):
    rescale_mode = "never"


class RescaleGlobal(_RuleMutant):
    rescale_mode = "global"


class RescaleSmoothed(_RuleMutant):
    """Rescaling by 1 / (kept fraction + 1e-5): about 1e-5 relative, which only a tight float64 tolerance sees."""

    kept_fraction_smoothing = 1e-5


class EnvAxisMixed(_RuleMutant):
    """The stack read as [*shape, K] by a reshape: the environment axis is mixed with a parameter axis."""

    def combine(self, G):
        return G.reshape(G.shape[1:] + (G.shape[0],)).mean(-1)


class SignZeroPlus(_RuleMutant):
    def keep(self, G, tau):
        return np.abs(_signs(G, True).sum(0)) >= _rules.agreement_threshold_count(tau, G.shape[0])


class FlushSubnormals(_RuleMutant):
    """Subnormal float32 gradients read as 0, as a GPU kernel compiled with flush-to-zero (CuPy's -ftz=true) reads
    them in its float32 comparisons: their signs count 0 and the paper geometric mean's logarithm is -inf."""

    def aggregate(self, grads, **options):
        flushed = []
        for g in grads:
            g = np.asarray(g)
            if g.dtype == np.float32:
                g = np.where(np.abs(g) < np.finfo(np.float32).tiny, np.float32(0), g)
            flushed.append(g)
        return super().aggregate(flushed, **options)


class Float32Agreement(_RuleMutant):
    """|mean sign| in float32 compared with a float64 tau, no tie tolerance."""

    def keep(self, G, tau):
        A = np.abs(np.sign(G).astype(np.float32).mean(0, dtype=np.float32))
        return A.astype(np.float64) >= tau


class GeoMeanNotebookFloat32(_RuleMutant):
    """The notebook's exp(sum log)^(1/K), computed in float32 (underflows for K = 16, |g| = 1e-3)."""

    def geometric(self, G, flavour, tau):
        if flavour == "original":
            return super().geometric(G, flavour, tau)
        K = G.shape[0]
        keep = np.abs(np.sign(G).sum(0)) == K
        mags = np.abs(G).astype(np.float32)
        with np.errstate(divide="ignore", over="ignore", under="ignore"):
            prod = np.exp(np.log(np.where(keep, mags, 1)).sum(0, dtype=np.float32)).astype(np.float32)
        v = np.sign(G.sum(0)) * prod.astype(np.float64) ** (1.0 / K)
        return np.where(keep, v, 0.0), keep.astype(float)


class GeoMeanPartialAgreement(_RuleMutant):
    """Paper flavour asked, but partly agreeing components kept with sign(arithmetic mean) (majority vote)."""

    def geometric(self, G, flavour, tau):
        if flavour == "original":
            return super().geometric(G, flavour, tau)
        K = G.shape[0]
        keep = np.abs(np.sign(G).sum(0)) >= math.ceil(0.5 * K)
        with np.errstate(divide="ignore"):
            mag = np.exp(np.log(np.abs(G)).mean(0))
        v = np.where(keep, np.sign(G.mean(0)) * mag, 0.0)
        return v, keep.astype(float)


class SandDomainBed(_RuleMutant):
    """DomainBed's SANDMask: population variance (ddof=0) and NaN -> 1e-17 substitutes."""

    def sand(self, G, tau, k):
        A = np.abs(np.sign(G).mean(0))
        var = G.var(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            m = np.maximum(np.tanh(k * (A - tau) / var), 0.0)
        return np.nan_to_num(m, nan=1e-17)


class CountForm(_RuleMutant):
    def keep(self, G, tau):
        K = G.shape[0]
        # the count form's "t agreeing signs" for the canonical |S| threshold: t = ceil((K + |S|_min) / 2)
        t = math.ceil((K + _rules.agreement_threshold_count(tau, K)) / 2)
        return np.maximum((G > 0).sum(0), (G < 0).sum(0)) >= t


class BNPerEnv(ReferenceTarget):
    def env_gradients(self, spec, params, X, Y, *, loss, semantics):
        return super().env_gradients(spec, params, X, Y, loss=loss, semantics="per_env" if X.shape[1] >= 2 else
                                     semantics)


@contextmanager
def _swapped(**replacements):
    """The oracle's convnet with some of its functions replaced, for the duration of one call."""
    originals = {name: getattr(_convnet, name) for name in replacements}
    for name, function in replacements.items():
        setattr(_convnet, name, function)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(_convnet, name, function)


class _ConvnetSwap(ReferenceTarget):
    """The oracle with one piece of :mod:`hardtovary.reference.convnet` swapped (``swaps()``: name -> function)."""

    def swaps(self) -> dict:
        raise NotImplementedError

    def env_gradients(self, spec, params, X, Y, *, loss, semantics):
        with _swapped(**self.swaps()):
            return super().env_gradients(spec, params, X, Y, loss=loss, semantics=semantics)

    def eval_logits(self, spec, params, X_train, X_eval, *, semantics):
        with _swapped(**self.swaps()):
            return super().eval_logits(spec, params, X_train, X_eval, semantics=semantics)


class BNStatsDetached(_ConvnetSwap):
    """BatchNorm2d's batch mean and variance treated as constants in the backward (``detach()``d statistics)."""

    def swaps(self):
        def backward(gamma, dy, saved):
            xhat, inv_std = saved[:2]
            return ((gamma[:, None, None] * inv_std) * dy,
                    [np.sum(dy * xhat, axis=(1, 3, 4)), dy.sum(axis=(1, 3, 4))])
        return {"_bn_backward": backward}


class BNUnbiasedVariance(_ConvnetSwap):
    """BatchNorm2d normalising with the unbiased batch variance (torch normalises with the biased one)."""

    def swaps(self):
        biased = _convnet._bn_train_forward

        def forward(layer, gamma, beta, x):
            _, _, stats = biased(layer, gamma, beta, x)  # the batch statistics, as torch records them
            mean = x.mean(axis=(1, 3, 4), keepdims=True)
            inv_std = 1.0 / np.sqrt(x.var(axis=(1, 3, 4), keepdims=True, ddof=1) + layer.eps)
            xhat = (x - mean) * inv_std
            return gamma[:, None, None] * xhat + beta[:, None, None], (xhat, inv_std), stats
        return {"_bn_train_forward": forward}


class MaxPoolSplitTies(_ConvnetSwap):
    """A max-pool window's gradient shared equally among its tied maxima (torch gives it all to the first)."""

    def swaps(self):
        first_max = _convnet._maxpool_forward

        def forward(layer, x):
            y, (first, x_shape) = first_max(layer, x)
            k, s = layer.kernel_size, layer.stride or layer.kernel_size
            windows = _convnet._windows(_convnet._pad(x, layer.padding, -np.inf), k, s)
            ties = windows.reshape(*windows.shape[:-2], k * k) == y[..., None]
            return y, (ties, x_shape)

        def backward(layer, dy, saved):
            ties, x_shape = saved
            k, s, p = layer.kernel_size, layer.stride or layer.kernel_size, layer.padding
            H, W = x_shape[-2:]
            Ho, Wo = dy.shape[-2:]
            share = ties / ties.sum(axis=-1, keepdims=True)
            dx = np.zeros(dy.shape[:3] + (H + 2 * p, W + 2 * p))
            for i in range(k):
                for j in range(k):
                    dx[:, :, :, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s] += dy * share[..., i * k + j]
            return dx[:, :, :, p:p + H, p:p + W]
        return {"_maxpool_forward": forward, "_maxpool_backward": backward}


class ConvnetBNPerEnv(ReferenceTarget):
    """A convolutional network's BatchNorm statistics per environment (per image, per example) where pooled ones
    were asked."""

    def env_gradients(self, spec, params, X, Y, *, loss, semantics):
        if spec.get("kind") == "convnet":
            semantics = "per_env"
        return super().env_gradients(spec, params, X, Y, loss=loss, semantics=semantics)


class RunningMomentumInverted(ReferenceTarget):
    """Running statistics updated as ``m running + (1 - m) batch`` (torch: ``(1 - m) running + m batch``)."""

    def eval_logits(self, spec, params, X_train, X_eval, *, semantics):
        running = _convnet.running_stats_after(spec, params, X_train, semantics=semantics, momentum=0.9)
        return _convnet.predict(spec, params, X_eval, running)


class MissingOutputScale(ReferenceTarget):
    """FastResNet without its final ``* 0.125`` (every Scale layer dropped)."""

    def env_gradients(self, spec, params, X, Y, *, loss, semantics):
        if spec.get("kind") == "convnet":
            net = _convnet.NetSpec.from_dict(spec)
            spec = dataclasses.replace(net, layers=tuple(x for x in net.layers if not isinstance(x, _convnet.Scale)))
            spec = spec.to_dict()
        return super().env_gradients(spec, params, X, Y, loss=loss, semantics=semantics)


class LossSummed(ReferenceTarget):
    def env_gradients(self, spec, params, X, Y, *, loss, semantics):
        B = np.asarray(X).shape[1]
        return [g * B for g in super().env_gradients(spec, params, X, Y, loss=loss, semantics=semantics)]


class L1Masked(ReferenceTarget):
    def _masked_update(self, params, grads, *, rule, tau, rescale, l1):
        if l1:
            grads = [np.asarray(G) + l1 * np.sign(p) for G, p in zip(grads, params)]
        return self.aggregate(grads, rule=rule, tau=tau, rescale=rescale)


class WeightDecayMasked(ReferenceTarget):
    """Coupled weight decay added to every environment's gradient before the mask (and not again later)."""

    def step(self, params, grads, *, weight_decay, weight_decay_order, state=None, **kw):
        if weight_decay and weight_decay_order == "before":
            grads = [np.asarray(G) + weight_decay * np.asarray(p) for G, p in zip(grads, params)]
            weight_decay = 0.0
        return super().step(params, grads, weight_decay=weight_decay, weight_decay_order=weight_decay_order,
                            state=state, **kw)


class TemporalBiasCorrected(ReferenceTarget):
    def temporal(self, params, grad_sequence, *, bias_correction, **kw):
        return super().temporal(params, grad_sequence, bias_correction=True, **kw)


class TemporalMaskOnGradient(ReferenceTarget):
    """The mask applied to g before the moments (the usual AND-mask-then-Adam) instead of to m in the update."""

    def temporal(self, params, grad_sequence, *, lr, beta1, beta2, beta3, tau, eps, bias_correction):
        params = [np.asarray(p, dtype=np.float64) for p in params]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        a = [np.zeros_like(p) for p in params]
        out = []
        for grads in grad_sequence:
            new = []
            for i, g in enumerate(grads):
                g = np.asarray(g, dtype=np.float64)
                a[i] = beta3 * a[i] + (1 - beta3) * np.sign(g)
                b = np.abs(a[i]) >= tau
                m[i] = beta1 * m[i] + (1 - beta1) * g * b
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                new.append(params[i] - lr * m[i] / (np.sqrt(v[i]) + eps))
            params = new
            out.append(params)
        return out


class SpiralsNoiseFirst(ReferenceTarget):
    """Radius noise added before the angle is computed (the paper's text order), RNG calls unchanged."""

    def spirals(self, n_examples, n_revolutions, env, n_envs, n_dims, seed):
        rng = np.random.RandomState(seed)
        sig = rng.randn(n_envs, n_dims)
        radii = rng.uniform(0.08, 1, n_examples)
        labels = rng.randint(0, 2, n_examples)
        radii = radii + rng.uniform(-0.02, 0.02, n_examples)
        angles = 2 * n_revolutions * np.pi * radii + np.pi * labels
        xs, ys = np.cos(angles) * radii, np.sin(angles) * radii
        if env == "test":
            signatures = rng.randn(n_examples, n_dims)
        else:
            signatures = sig[env] * (labels * 2 - 1).reshape(1, -1).T
        mech = np.stack((xs, ys), axis=1)
        mech /= mech.std(axis=0)
        return np.hstack((mech, signatures)).astype(np.float32), labels.astype(np.float32)


@dataclass(frozen=True)
class Mutant:
    """A planted mistake: its name (``--target hardtovary.conformance.mutants:<name>``), the target, what it breaks,
    and the checks expected to catch it (``tests/test_conformance_teeth.py`` asserts each one fails them)."""

    name: str
    target: object = field(repr=False)
    breaks: str
    catches: tuple[str, ...]

    @property
    def target_name(self) -> str:
        return f"hardtovary.conformance.mutants:{self.name}"


MUTANTS: dict[str, Mutant] = {m.name: m for m in (
    Mutant("strict_gt", StrictGreater(), "strict > instead of >= (InvarianceUnitTests)",
           ("agg.ties.exact", "agg.prop.tau0_mean.float64")),
    Mutant("sum_not_mean", SumNotMean(), "sum instead of mean (DGvGS Agr-Sum)",
           ("agg.oracle.mean.plain.float64",)),
    Mutant("rescale_always", RescaleAlways(), "rescaling always on (DomainBed)",
           ("agg.oracle.and_mask.plain.float64",)),
    Mutant("rescale_never", RescaleNever(), "rescaling always off",
           ("agg.oracle.and_mask.rescaled.float64", "agg.special.k1")),
    Mutant("rescale_global", RescaleGlobal(), "rescaling over the whole model instead of per tensor",
           ("agg.special.per_tensor_rescale",)),
    Mutant("rescale_smoothed", RescaleSmoothed(),
           "rescaling by 1 / (kept fraction + 1e-5): an error of about 1e-5 relative",
           ("agg.oracle.and_mask.rescaled.float64",)),
    Mutant("env_axis_mixed", EnvAxisMixed(), "environment axis mixed with a parameter axis by a reshape",
           ("agg.prop.permutation.mean.float64",)),
    Mutant("sign0_plus", SignZeroPlus(), "sign(0) counted as +1",
           ("agg.special.exact_zeros", "agg.prop.sign_flip.and_mask.float64")),
    Mutant("flush_subnormals", FlushSubnormals(), "subnormal float32 gradients flushed to 0 (a GPU's -ftz=true)",
           ("agg.special.subnormal",)),
    Mutant("float32_agreement", Float32Agreement(), "float32 |mean sign| compared with a float64 tau, no tie tolerance",
           ("agg.ties.exact",)),
    Mutant("geomean_float32_underflow", GeoMeanNotebookFloat32(),
           "geometric mean as exp(sum log)^(1/K) in float32 (notebook)",
           ("agg.special.underflow",)),
    Mutant("geomean_partial_agreement", GeoMeanPartialAgreement(),
           "paper GM asked; partial agreement kept with sign of the arithmetic mean",
           ("agg.special.partial_agreement",)),
    Mutant("sand_domainbed", SandDomainBed(), "SAND-mask with DomainBed's ddof=0 variance and 1e-17 NaN substitutes",
           ("agg.oracle.sand_mask.plain.float64", "agg.special.identical")),
    Mutant("count_form", CountForm(), "count form instead of threshold form",
           ("agg.special.exact_zeros",)),
    Mutant("bn_per_env", BNPerEnv(), "BatchNorm statistics per environment where pooled was asked",
           ("envgrad.bn_pooled.bce",)),
    Mutant("bn_stats_detached", BNStatsDetached(), "BatchNorm2d's batch statistics detached from the graph",
           ("envgrad.fast_resnet.pooled.ce", "envgrad.convnet.layers.pooled")),
    Mutant("bn_unbiased_variance", BNUnbiasedVariance(), "BatchNorm2d normalising with the unbiased variance",
           ("envgrad.fast_resnet.per_example.ce", "eval.convnet.pooled")),
    Mutant("convnet_bn_per_env", ConvnetBNPerEnv(),
           "a convnet's BatchNorm statistics per environment where pooled was asked",
           ("envgrad.fast_resnet.per_example.ce", "envgrad.resnet18.pooled.soft")),
    Mutant("maxpool_split_ties", MaxPoolSplitTies(), "a max-pool window's gradient split over its tied maxima",
           ("envgrad.convnet.ties",)),
    Mutant("running_momentum_inverted", RunningMomentumInverted(),
           "running statistics updated with the momentum inverted (m running + (1 - m) batch)",
           ("eval.convnet.pooled", "eval.convnet.per_env")),
    Mutant("missing_output_scale", MissingOutputScale(), "FastResNet without its output scale 0.125",
           ("envgrad.fast_resnet.pooled.ce", "envgrad.fast_resnet.per_example.soft")),
    Mutant("loss_summed", LossSummed(), "per-environment loss summed, not averaged",
           ("envgrad.nobn.mse",)),
    Mutant("l1_masked", L1Masked(), "L1 term added before the mask (masked)",
           ("step.l1_after_mask",)),
    Mutant("weight_decay_masked", WeightDecayMasked(),
           "coupled weight decay added to the env gradients before the mask",
           ("step.adam.before",)),
    Mutant("temporal_bias_correction", TemporalBiasCorrected(), "Algorithm 1 with bias correction",
           ("temporal.oracle",)),
    Mutant("temporal_mask_on_gradient", TemporalMaskOnGradient(),
           "Algorithm 1 with the mask on g entering the moments instead of on m",
           ("temporal.oracle",)),
    Mutant("spirals_noise_first", SpiralsNoiseFirst(), "spirals with radius noise before the angle",
           ("spirals.bit_identical",)),
)}

# module attributes, so that `--target hardtovary.conformance.mutants:strict_gt` works
globals().update({name: m.target for name, m in MUTANTS.items()})
