"""Dissecting learning signals: gradient correlations against the agreement threshold (paper §3.1 end, Fig. 7,
App. B.3.5).

For a randomly initialised MLP and K environments of the spirals data, per-environment gradients ``G[K, P]`` are
computed on three versions of each environment's batch:

(i)   the original data (mechanism + shortcut): ``G``;
(ii)  the mechanism columns permuted across the examples: only the shortcut ("memorization") signal is left;
      its environment average is ``g_short``;
(iii) the shortcut columns permuted across the examples: only the mechanism ("generalization") signal is left;
      its environment average is ``g_mech``.

For each threshold ``tau`` in [-1, 1] the masked average gradient of (i), ``m_tau(G) * mean_e G[e]``, is
correlated (Pearson, across parameter components) with ``g_mech`` and with ``g_short``.

Choices where the paper is silent or ambiguous, all documented here and recorded in the results:

* **Mask for tau >= 0**: the canonical AND-mask (:func:`hardtovary.accel.torch.rules.and_mask`), keep iff
  ``|S_j|`` reaches :func:`hardtovary.reference.rules.agreement_threshold_count` with ``S_j = sum_e sign(G[e, j])``.
* **XOR mask for tau < 0**: keep iff ``|a_j| <= 1 - |tau|`` with ``a_j = S_j / K`` (a continuous reading of
  App. B.3.5), evaluated on the integer ``S_j`` as ``|S_j| <= floor((1 - |tau|) K + 1e-9)`` so float noise cannot
  flip a tie (the tolerance of the AND-mask's threshold, :data:`hardtovary.reference.rules.TIE_TOLERANCE`).
  At tau = 0 both masks keep everything (the plain average); tau = -1 keeps only ``S_j = 0`` (exact disagreement).
  The two masks are complements up to their shared boundary: ``xor_mask(tau - 1)`` and ``and_mask(tau)`` together
  keep every component, and both keep exactly the components with ``|S_j| = tau K`` (when ``tau K`` is an
  integer) -- see :func:`threshold_mask`.
* **Which components enter the correlation**: those kept by the mask whose masked average gradient is nonzero
  ("zero gradients are excluded", App. B.3.5). The reference gradients (ii)/(iii) are not filtered. Fewer than 3
  such components give NaN.
* **Correlation coefficient**: Pearson's r of the scatter (not a slope of the fitted least-squares line).
* **Permutation**: within each environment's batch, one random permutation of the rows applied to the whole
  mechanism block (or the whole shortcut block), drawn independently per environment and per seed.
* **Data**: the authors' code defaults (d_S = 8 shortcut dimensions of scale 1, 3 revolutions), 16 environments,
  a batch of 1024 examples *per environment* (the whole environment).
* **Network**: 3 x 256 LeakyReLU (slope 0.01) MLP with one logit and BCE-with-logits, float32; seeds ``0 ..
  n_seeds - 1`` seed the weights and the permutations; the data are fixed (``data_seed``). App. B.3.5 says only
  "randomly initialized": ``init="authors"`` (default) is the authors' training initialisation (Kaiming-normal
  weights, bias 0.01), ``init="torch"`` PyTorch's ``nn.Linear`` default, whose logits start near 0, so that the
  label-independent part of the gradients (the ``(sigmoid(f) - 1/2) grad f`` term of ``(sigmoid(f) - y) grad f``)
  is small from the start.
* **Stage**: at the initialisation (App. B.3.5), or after ``train_steps`` full-batch Adam steps (the authors'
  learning rate 1e-2) on all environments with the plain mean or the AND-mask at tau = 1 (``train_rule``).

Why the shortcut correlation cannot fall much here (measured, not assumed): the shortcut-only data (ii) differ
from the original data (i) only in the two mechanism columns, so ``m_tau(grad L) = g_short + D`` on the kept
components, where ``D`` is what aligning the mechanism with the labels adds. With ``q = ||D|| / ||g_short||``
(both centred over the kept components), Pearson's r between them is at least ``sqrt(1 - q^2)`` for ``q < 1``
(:func:`pearson_floor`): ``g_short + D`` lies in a ball of radius ``q ||g_short||`` around ``g_short``, whose
widest angle from ``g_short`` is ``arcsin q``. ``run`` records ``q`` and that floor for every tau.
:func:`separability` and :func:`coin_keep_fraction` measure why the mask does not find components where ``D``
dominates: the shortcut gradients' signs are fair coins across environments and much larger than the mechanism's,
so with few environments the mask keeps about what chance keeps (docs/results.md, "Gradient correlations").
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hardtovary.accel.torch import rules as _rules
from hardtovary.accel.torch.env_gradients import env_gradients
from hardtovary.accel.torch.models import mlp_from_spec
from hardtovary.experiments.runfolder import write_results
from hardtovary.reference import data as _data
from hardtovary.reference import mlp as _mlp
from hardtovary.reference.rules import TIE_TOLERANCE, agreement_threshold_count

__all__ = ["DEFAULT_TAUS", "DEFAULT_DATA", "INITS", "TRAIN_RULES", "TRAIN_LR", "GradientCorrelationConfig",
           "threshold_mask", "xor_mask", "coin_keep_fraction", "pearson", "pearson_floor", "gradient_sets",
           "correlation_curves", "separability", "train", "run", "format_table", "format_separability", "plot_curves"]

#: -1, -0.9, ..., 1.
DEFAULT_TAUS = tuple(round(-1.0 + 0.1 * i, 10) for i in range(21))
DEFAULT_DATA = _data.SpiralsConfig(n_train_envs=16, examples_per_env=1024, n_test=2, n_revolutions=3, n_dims=8,
                                   seed=0)
#: Weight initialisations (module docstring): the authors' training code's, and PyTorch's ``nn.Linear`` default.
INITS = ("authors", "torch")
#: Rules of the optional training before the measurement: the plain mean, the AND-mask at tau = 1.
TRAIN_RULES = ("mean", "and_mask")
#: Adam's learning rate for that training: the authors' ``run_synthetic.py`` default.
TRAIN_LR = 1e-2


@dataclass(frozen=True)
class GradientCorrelationConfig:
    """Settings of the experiment: MLP widths, the weight seeds, the thresholds, and the data."""

    hidden: tuple[int, ...] = (256, 256, 256)
    n_seeds: int = 10
    taus: tuple[float, ...] = DEFAULT_TAUS
    data: _data.SpiralsConfig = DEFAULT_DATA
    #: Subtract the label-independent part of every average gradient (the average gradient on the data with all
    #: input columns permuted) before correlating; see :func:`correlation_curves`.
    remove_label_independent: bool = False
    #: One of :data:`INITS`.
    init: str = "authors"
    #: Full-batch Adam steps before the measurement (0: at the initialisation, as App. B.3.5).
    train_steps: int = 0
    #: One of :data:`TRAIN_RULES`; used only when ``train_steps > 0``.
    train_rule: str = "mean"

    def __post_init__(self):
        if self.n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {self.n_seeds}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if isinstance(self.train_steps, bool) or not isinstance(self.train_steps, int) or self.train_steps < 0:
            raise ValueError(f"train_steps must be an integer >= 0, got {self.train_steps!r}")
        if self.train_rule not in TRAIN_RULES:
            raise ValueError(f"train_rule must be one of {list(TRAIN_RULES)}, got {self.train_rule!r}")
        taus = tuple(float(t) for t in self.taus)
        if not taus or any(not -1.0 <= t <= 1.0 for t in taus):
            raise ValueError(f"taus must be non-empty values in [-1, 1], got {self.taus!r}")
        object.__setattr__(self, "taus", taus)
        object.__setattr__(self, "hidden", tuple(int(w) for w in self.hidden))


def xor_mask(G: torch.Tensor, tau: float) -> torch.Tensor:
    """XOR mask for ``tau`` in [-1, 0]: keep iff ``|S_j| <= floor((1 - |tau|) K + 1e-9)``, i.e. ``|a_j| <= 1 -
    |tau|`` with ``a_j = S_j / K`` (module docstring). ``G[K, ...]``; returns bool of shape ``G.shape[1:]``."""
    if not -1.0 <= tau <= 0.0:
        raise ValueError(f"tau must lie in [-1, 0] for the XOR mask, got {tau}")
    S = _rules.sign_agreement(G)
    return S.abs() <= _xor_limit(tau, G.shape[0])


def _xor_limit(tau: float, K: int) -> int:
    """The largest ``|S_j|`` the XOR mask keeps (module docstring)."""
    return math.floor((1.0 - abs(tau)) * K + TIE_TOLERANCE)


def threshold_mask(G: torch.Tensor, tau: float) -> torch.Tensor:
    """The mask of Fig. 7's x-axis: the AND-mask for ``tau >= 0``, the XOR mask for ``tau < 0``."""
    tau = float(tau)
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [-1, 1], got {tau}")
    return _rules.and_mask(G, tau) if tau >= 0 else xor_mask(G, tau)


def coin_keep_fraction(tau: float, K: int) -> float:
    """The fraction of components :func:`threshold_mask` keeps when each component's K signs are independent fair
    coins (no zeros), as the environment-specific shortcut gradients' signs are: with ``S = 2p - K`` and ``p`` a
    Binomial(K, 1/2) count, ``P(|S| >= agreement_threshold_count(tau, K))`` for tau >= 0 (``2^(1 - K)`` at tau = 1)
    and ``P(|S| <= floor((1 - |tau|) K + 1e-9))`` for tau < 0. Comparing it with the fraction kept tells how much
    of what the mask keeps chance alone would keep. For tau >= 0 it equals
    :func:`hardtovary.reference.consistency.keep_probability_threshold` (Prop. 2's keep probability, in floating
    point); here both branches count in exact integers, the same sum for the AND and the XOR side."""
    tau = float(tau)
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [-1, 1], got {tau}")
    if tau >= 0:
        threshold = agreement_threshold_count(tau, K)
        counts = (p for p in range(K + 1) if abs(2 * p - K) >= threshold)
    else:
        limit = _xor_limit(tau, K)
        counts = (p for p in range(K + 1) if abs(2 * p - K) <= limit)
    return sum(math.comb(K, p) for p in counts) / 2 ** K


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation of two 1-D tensors (float64); NaN with fewer than 3 points or zero variance."""
    x, y = x.double(), y.double()
    if x.numel() < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def _centred_norm(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (x - x.mean()).norm()


def pearson_floor(q: float) -> float:
    """The least Pearson's r between ``g`` and ``g + D`` when ``D``'s centred norm is ``q`` times ``g``'s:
    ``sqrt(1 - q^2)`` for ``0 <= q < 1`` (``g + D`` lies in a ball of radius ``q |g|`` around ``g``; the widest angle
    is ``arcsin q``), and -1 for ``q >= 1`` (the ball holds ``-g``'s direction); NaN for NaN."""
    if math.isnan(q):
        return float("nan")
    if q < 0:
        raise ValueError(f"q must be >= 0, got {q}")
    return math.sqrt(1.0 - q * q) if q < 1.0 else -1.0


def _flat(grads: list) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def _permute_columns(X: torch.Tensor, columns: slice, generator: torch.Generator) -> torch.Tensor:
    """``X[K, B, in]`` with ``X[e, :, columns]`` rows permuted by an independent permutation per environment."""
    X = X.clone()
    for e in range(X.shape[0]):
        order = torch.randperm(X.shape[1], generator=generator)
        X[e, :, columns] = X[e, order][:, columns]
    return X


def _loss(logits, y):
    return F.binary_cross_entropy_with_logits(logits.squeeze(-1), y)


def gradient_sets(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, n_mech: int,
                  generator: torch.Generator) -> dict:
    """Flattened per-environment gradients ``[K, P]`` of ``model`` on ``X[K, B, in]``, ``y[K, B]`` for the
    ``original`` data, the ``shortcut`` data (the first ``n_mech`` columns permuted) and the ``mechanism`` data
    (the other columns permuted), and the ``null`` data (every input column permuted: inputs independent of the
    labels, so its gradient is the label-independent part that all versions share)."""
    versions = {
        "original": X,
        "shortcut": _permute_columns(X, slice(0, n_mech), generator),
        "mechanism": _permute_columns(X, slice(n_mech, None), generator),
        "null": _permute_columns(X, slice(0, None), generator),
    }
    return {name: _flat(env_gradients(model, Xv, y, _loss).grads) for name, Xv in versions.items()}


def correlation_curves(sets: dict, taus, *, remove_label_independent: bool = False) -> dict:
    """For each tau: Pearson r between the masked average gradient of ``sets['original']`` and the average
    gradients of ``sets['mechanism']`` and ``sets['shortcut']``, over the kept components with a nonzero masked
    average; the fraction kept; and, on those components, ``q = ||c(m - g_short)|| / ||c(g_short)||`` (``c``
    centres over the kept components, ``m`` is the masked average) with the floor :func:`pearson_floor` ``(q)`` that
    it puts under the shortcut correlation (module docstring). Returns ``{"mechanism": [...], "shortcut": [...],
    "kept": [...], "shortcut_gap": [...], "shortcut_floor": [...]}``.

    With ``remove_label_independent`` the average gradient of ``sets['null']`` (inputs independent of the labels) is
    subtracted from all three averages first. At a random initialisation that shared part dominates every gradient
    and pushes every correlation towards 1; the masks are still computed on the original gradients."""
    G = sets["original"]
    base = sets["null"].mean(dim=0) if remove_label_independent else 0.0
    mean = G.mean(dim=0) - base
    g_mech, g_short = sets["mechanism"].mean(dim=0) - base, sets["shortcut"].mean(dim=0) - base
    out = {"mechanism": [], "shortcut": [], "kept": [], "shortcut_gap": [], "shortcut_floor": []}
    for tau in taus:
        keep = threshold_mask(G, tau) & (mean != 0)
        out["mechanism"].append(pearson(mean[keep], g_mech[keep]))
        out["shortcut"].append(pearson(mean[keep], g_short[keep]))
        out["kept"].append(float(keep.double().mean()))
        # Same domain as pearson: no gap without 3 points or with a constant shortcut gradient.
        scale = _centred_norm(g_short[keep]) if keep.sum() >= 3 else torch.zeros(())
        gap = float(_centred_norm(mean[keep] - g_short[keep]) / scale) if scale > 0 else float("nan")
        out["shortcut_gap"].append(gap)
        out["shortcut_floor"].append(pearson_floor(gap))
    return out


def separability(sets: dict) -> dict:
    """How well sign agreement across environments can tell mechanism components from shortcut ones (§2.3's
    AND-mask on Fig. 7's data). Per component j: ``r_j = |mean_e M[e, j]| / std_e S[e, j]`` with the label-dependent
    per-environment gradients ``M = sets['mechanism'] - sets['null']`` and ``S = sets['shortcut'] - sets['null']``
    (sample std over environments). If ``S[e, j]`` were Gaussian across environments around a mechanism part
    ``mean_e M[e, j]``, all K signs would agree with probability ``Phi(r)^K + Phi(-r)^K``: at K = 16 that is
    3e-5 for r = 0, 0.06 for r = 1 and 0.5 for r = 1.7. Returns the ``median`` of ``r`` and the fraction
    ``r >= 1`` over the components where the std is positive."""
    M = (sets["mechanism"] - sets["null"]).double()
    S = (sets["shortcut"] - sets["null"]).double()
    spread = S.std(dim=0)
    positive = spread > 0
    if not positive.any():
        return {"median": float("nan"), "fraction_ge_1": float("nan")}
    r = M.mean(dim=0)[positive].abs() / spread[positive]
    # numpy's median: the mean of the two middle values (torch.median returns the lower one)
    return {"median": float(np.median(r.numpy())), "fraction_ge_1": float((r >= 1).double().mean())}


def _model(in_features: int, hidden: tuple[int, ...], seed: int, init: str = "authors") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = mlp_from_spec(_mlp.MLPSpec(in_features=in_features, hidden=hidden), dtype=torch.float32)
    if init == "authors":
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.kaiming_normal_(m.weight)
                torch.nn.init.constant_(m.bias, _mlp.BIAS_INIT)
    return model


def train(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, rule: str, steps: int) -> torch.nn.Module:
    """``steps`` full-batch Adam steps (learning rate :data:`TRAIN_LR`) on the environments ``X[K, B, in]``,
    ``y[K, B]``: the update direction is the mean of the per-environment gradients (``rule="mean"``) or their
    AND-masked mean at tau = 1 (``"and_mask"``, paper §2.3, the best synthetic setting of App. B.3.1). Returns
    ``model``, trained in place."""
    if rule not in TRAIN_RULES:
        raise ValueError(f"rule must be one of {list(TRAIN_RULES)}, got {rule!r}")
    optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    for _ in range(steps):
        grads = env_gradients(model, X, y, _loss).grads
        for p, G in zip(model.parameters(), grads):
            p.grad = G.mean(dim=0) if rule == "mean" else _rules.and_masked_mean(G, 1.0)
        optimizer.step()
    return model


def run(config: GradientCorrelationConfig = GradientCorrelationConfig(), out: Path | None = None,
        progress: bool = False) -> dict:
    """Run the experiment over ``config.n_seeds`` weight seeds. Returns (and writes to ``out/results.json`` when
    ``out`` is given) ``taus``, per curve the per-seed values and their mean and std, and the configuration."""
    task = _data.make_spirals_task(config.data)
    X = torch.as_tensor(task.X_train, dtype=torch.float32)
    y = torch.as_tensor(task.y_train, dtype=torch.float32)
    per_seed = {"mechanism": [], "shortcut": [], "kept": [], "shortcut_gap": [], "shortcut_floor": []}
    separabilities = []
    seeds = range(config.n_seeds)
    if progress:
        from tqdm import tqdm
        seeds = tqdm(seeds, desc="seeds", dynamic_ncols=True)
    for seed in seeds:
        model = train(_model(X.shape[2], config.hidden, seed, config.init), X, y, config.train_rule,
                      config.train_steps)
        generator = torch.Generator().manual_seed(seed)
        sets = gradient_sets(model, X, y, 2, generator)
        curves = correlation_curves(sets, config.taus, remove_label_independent=config.remove_label_independent)
        for k in per_seed:
            per_seed[k].append(curves[k])
        separabilities.append(separability(sets))
    results = {"config": {"hidden": list(config.hidden), "n_seeds": config.n_seeds, "taus": list(config.taus),
                          "remove_label_independent": config.remove_label_independent, "init": config.init,
                          "train_steps": config.train_steps, "train_rule": config.train_rule,
                          "train_lr": TRAIN_LR, "data": dataclasses.asdict(config.data)},
               "taus": list(config.taus),
               "coin": [coin_keep_fraction(tau, config.data.n_train_envs) for tau in config.taus],
               "separability": {k: [s[k] for s in separabilities] for k in ("median", "fraction_ge_1")}}
    for k, values in per_seed.items():
        a = np.asarray(values, dtype=float)
        with warnings.catch_warnings():
            # A tau that keeps fewer than 3 components in every seed has no correlation: its mean is NaN, and the
            # table says so.
            warnings.simplefilter("ignore", RuntimeWarning)
            results[k] = {"per_seed": a.tolist(), "mean": np.nanmean(a, axis=0).tolist() if a.size else [],
                          "std": np.nanstd(a, axis=0).tolist() if a.size else []}
    if out is not None:
        write_results(out, _json_safe(results))
    return results


def _json_safe(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def format_table(results: dict) -> str:
    """One row per tau: mask kind, mean ± std of both correlations over seeds, the fraction kept (3 significant
    digits: a few components out of 1e5 still show), the fraction fair-coin signs would keep
    (:func:`coin_keep_fraction`), and the means of the shortcut gap ``q`` and of the floor ``sqrt(1 - q^2)`` under
    rho(shortcut) (:func:`correlation_curves`)."""
    lines = [f"{'tau':>6}  {'mask':<4}{'rho(mechanism)':>18}{'rho(shortcut)':>18}{'kept':>9}{'coin':>9}"
             f"{'q(short)':>10}{'floor':>8}"]
    m, s, k = results["mechanism"], results["shortcut"], results["kept"]
    q, f = results["shortcut_gap"], results["shortcut_floor"]
    for i, tau in enumerate(results["taus"]):
        kind = "AND" if tau >= 0 else "XOR"
        lines.append(f"{tau:>6.2f}  {kind:<4}{m['mean'][i]:>10.3f} ± {m['std'][i]:<5.3f}"
                     f"{s['mean'][i]:>10.3f} ± {s['std'][i]:<5.3f}{k['mean'][i]:>9.3g}{results['coin'][i]:>9.3g}"
                     f"{q['mean'][i]:>10.3f}"
                     f"{f['mean'][i]:>8.3f}")
    return "\n".join(lines)


def format_separability(results: dict) -> str:
    """One line: :func:`separability`'s median ``r`` and fraction ``r >= 1``, mean ± std over seeds."""
    sep = {k: np.asarray(v, dtype=float) for k, v in results["separability"].items()}
    return (f"separability r = |mechanism| / (shortcut's spread over environments): median "
            f"{sep['median'].mean():.3f} ± {sep['median'].std():.3f}, fraction r >= 1 "
            f"{sep['fraction_ge_1'].mean():.2e} ± {sep['fraction_ge_1'].std():.2e}")


def _setting(config: dict) -> str:
    """One line naming a run's setting, for a figure's title."""
    data = config["data"]
    stage = ("at initialisation" if config["train_steps"] == 0
             else f"after {config['train_steps']} Adam steps ({config['train_rule']})")
    removed = ", label-independent part removed" if config["remove_label_independent"] else ""
    return (f"{data['n_train_envs']} envs × {data['examples_per_env']}, d_S {data['n_dims']} × "
            f"{data['shortcut_scale']:g}, init {config['init']}, {stage}{removed}, {config['n_seeds']} seeds")


def plot_curves(results: dict, path: Path) -> Path | None:
    """Both correlations (mean over seeds, ± std band) against the threshold, Fig. 7 style, with the floor under the
    shortcut correlation (:func:`pearson_floor`, dashed) and the fraction of components kept (right axis, log
    scale: few kept components make the correlations noisy); None without matplotlib."""
    from hardtovary.experiments.plots import matplotlib_pyplot, save_figure

    plt = matplotlib_pyplot()
    if plt is None:
        return None
    taus = np.asarray(results["taus"])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, label in (("mechanism", "corr(∇L_mech, m_τ(∇L))"), ("shortcut", "corr(∇L_shortcut, m_τ(∇L))")):
        mean, std = np.asarray(results[key]["mean"], dtype=float), np.asarray(results[key]["std"], dtype=float)
        line, = ax.plot(taus, mean, marker="o", ms=3, label=label)
        ax.fill_between(taus, mean - std, mean + std, alpha=0.2)
    # `line` is the shortcut curve's, the loop's last: its floor gets its colour.
    ax.plot(taus, np.asarray(results["shortcut_floor"]["mean"], dtype=float), ls="--", color=line.get_color(),
            label="floor √(1 − q²) under the shortcut curve")
    ax.axvline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("agreement threshold τ  (XOR-mask < 0 ≤ AND-mask)")
    ax.set_ylabel("correlation coefficient")
    ax.set_xlim(-1.02, 1.02)
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    kept = np.asarray(results["kept"]["mean"], dtype=float)
    right = ax.twinx()
    right.plot(taus, np.where(kept > 0, kept, np.nan), color="grey", lw=1, label="fraction kept (right)")
    right.set_yscale("log")
    right.set_ylabel("fraction of components kept", color="grey")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    ax.set_title(_setting(results["config"]), fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
