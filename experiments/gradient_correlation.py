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
* **Network**: 3 x 256 LeakyReLU (slope 0.01) MLP with one logit and BCE-with-logits, the authors'
  initialisation (Kaiming-normal weights, bias 0.01), float32; seeds ``0 .. n_seeds - 1`` seed the weights and the
  permutations; the data are fixed (``data_seed``).
"""

from __future__ import annotations

import dataclasses
import math
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
from hardtovary.reference.rules import TIE_TOLERANCE

__all__ = ["DEFAULT_TAUS", "DEFAULT_DATA", "GradientCorrelationConfig", "threshold_mask", "xor_mask",
           "pearson", "gradient_sets", "correlation_curves", "run", "format_table", "plot_curves"]

#: -1, -0.9, ..., 1.
DEFAULT_TAUS = tuple(round(-1.0 + 0.1 * i, 10) for i in range(21))
DEFAULT_DATA = _data.SpiralsConfig(n_train_envs=16, examples_per_env=1024, n_test=2, n_revolutions=3, n_dims=8,
                                   seed=0)


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

    def __post_init__(self):
        if self.n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {self.n_seeds}")
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
    K = G.shape[0]
    S = _rules.sign_agreement(G)
    return S.abs() <= math.floor((1.0 - abs(tau)) * K + TIE_TOLERANCE)


def threshold_mask(G: torch.Tensor, tau: float) -> torch.Tensor:
    """The mask of Fig. 7's x-axis: the AND-mask for ``tau >= 0``, the XOR mask for ``tau < 0``."""
    tau = float(tau)
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [-1, 1], got {tau}")
    return _rules.and_mask(G, tau) if tau >= 0 else xor_mask(G, tau)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation of two 1-D tensors (float64); NaN with fewer than 3 points or zero variance."""
    x, y = x.double(), y.double()
    if x.numel() < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


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
    average; also the fraction kept. Returns ``{"mechanism": [...], "shortcut": [...], "kept": [...]}``.

    With ``remove_label_independent`` the average gradient of ``sets['null']`` (inputs independent of the labels) is
    subtracted from all three averages first. At a random initialisation that shared part dominates every gradient
    and pushes every correlation towards 1; the masks are still computed on the original gradients."""
    G = sets["original"]
    base = sets["null"].mean(dim=0) if remove_label_independent else 0.0
    mean = G.mean(dim=0) - base
    g_mech, g_short = sets["mechanism"].mean(dim=0) - base, sets["shortcut"].mean(dim=0) - base
    out = {"mechanism": [], "shortcut": [], "kept": []}
    for tau in taus:
        keep = threshold_mask(G, tau) & (mean != 0)
        out["mechanism"].append(pearson(mean[keep], g_mech[keep]))
        out["shortcut"].append(pearson(mean[keep], g_short[keep]))
        out["kept"].append(float(keep.double().mean()))
    return out


def _model(in_features: int, hidden: tuple[int, ...], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = mlp_from_spec(_mlp.MLPSpec(in_features=in_features, hidden=hidden), dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(m.weight)
            torch.nn.init.constant_(m.bias, _mlp.BIAS_INIT)
    return model


def run(config: GradientCorrelationConfig = GradientCorrelationConfig(), out: Path | None = None,
        progress: bool = False) -> dict:
    """Run the experiment over ``config.n_seeds`` weight seeds. Returns (and writes to ``out/results.json`` when
    ``out`` is given) ``taus``, per curve the per-seed values and their mean and std, and the configuration."""
    task = _data.make_spirals_task(config.data)
    X = torch.as_tensor(task.X_train, dtype=torch.float32)
    y = torch.as_tensor(task.y_train, dtype=torch.float32)
    per_seed = {"mechanism": [], "shortcut": [], "kept": []}
    seeds = range(config.n_seeds)
    if progress:
        from tqdm import tqdm
        seeds = tqdm(seeds, desc="seeds", dynamic_ncols=True)
    for seed in seeds:
        model = _model(X.shape[2], config.hidden, seed)
        generator = torch.Generator().manual_seed(seed)
        curves = correlation_curves(gradient_sets(model, X, y, 2, generator), config.taus,
                                    remove_label_independent=config.remove_label_independent)
        for k in per_seed:
            per_seed[k].append(curves[k])
    results = {"config": {"hidden": list(config.hidden), "n_seeds": config.n_seeds, "taus": list(config.taus),
                          "remove_label_independent": config.remove_label_independent,
                          "data": dataclasses.asdict(config.data)},
               "taus": list(config.taus)}
    for k, values in per_seed.items():
        a = np.asarray(values, dtype=float)
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
    """One row per tau: mask kind, mean ± std of both correlations over seeds, and the fraction kept."""
    lines = [f"{'tau':>6}  {'mask':<4}{'rho(mechanism)':>18}{'rho(shortcut)':>18}{'kept':>8}"]
    m, s, k = results["mechanism"], results["shortcut"], results["kept"]
    for i, tau in enumerate(results["taus"]):
        kind = "AND" if tau >= 0 else "XOR"
        lines.append(f"{tau:>6.2f}  {kind:<4}{m['mean'][i]:>10.3f} ± {m['std'][i]:<5.3f}"
                     f"{s['mean'][i]:>10.3f} ± {s['std'][i]:<5.3f}{k['mean'][i]:>8.3f}")
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> Path | None:
    """Both correlations (mean over seeds, ± std band) against the threshold, Fig. 7 style; None without
    matplotlib."""
    from hardtovary.experiments.plots import matplotlib_pyplot, save_figure

    plt = matplotlib_pyplot()
    if plt is None:
        return None
    taus = np.asarray(results["taus"])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label in (("mechanism", "corr(∇L_mech, m_τ(∇L))"), ("shortcut", "corr(∇L_shortcut, m_τ(∇L))")):
        mean, std = np.asarray(results[key]["mean"]), np.asarray(results[key]["std"])
        ax.plot(taus, mean, marker="o", ms=3, label=label)
        ax.fill_between(taus, mean - std, mean + std, alpha=0.2)
    ax.axvline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("agreement threshold τ  (XOR-mask < 0 ≤ AND-mask)")
    ax.set_ylabel("correlation coefficient")
    ax.set_xlim(-1.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
