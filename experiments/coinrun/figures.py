"""Figures of the CoinRun experiment (paper §3.3, App. B.6), as PNGs; each function returns the path written, or
None when matplotlib is not installed.

- :func:`plot_kl_curves` (Fig. 18): train KL (log scale) and test KL against the epoch, one line per method: the
  mean over its best runs (lowest minimum test KL), with a 95% bootstrap confidence band of that mean.
- :func:`plot_min_test_kl` (the main text's figure of §3.3): the minimum test KL of each of the best runs per
  method, one dot each, and their mean.
- :func:`plot_levels` (Fig. 17): the first frame of some levels of a label folder, titled with the level seed.

:func:`write_figures` writes the first two into a run folder (:data:`FIGURES`).

Runs are given as ``{method: [run, ...]}`` with each run a dict holding its ``history`` (one record per epoch with
``epoch``, ``train_kl`` and ``test_kl``, as :func:`hardtovary.experiments.coinrun.cloning.train_run` returns).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hardtovary.experiments.coinrun import cloning, labels
from hardtovary.experiments.plots import matplotlib_pyplot, save_figure
from hardtovary.experiments.stats import bootstrap_mean_ci

__all__ = ["METHOD_LABELS", "FIGURES", "plot_kl_curves", "plot_min_test_kl", "plot_levels", "write_figures"]

#: The methods as the paper's legends name them.
METHOD_LABELS = {"adam": "Adam", "and_mask": "Adam + AND-mask"}
#: The figures the train and search stages write into their run folder.
FIGURES = {"kl_curves": "fig18_kl_curves.png", "min_test_kl": "min_test_kl.png"}
#: The confidence level of the bands of Fig. 18.
CONFIDENCE = 0.95


def _label(method: str, runs: list) -> str:
    return f"{METHOD_LABELS.get(method, method)} (best {len(runs)})"


def plot_kl_curves(runs_by_method: dict, path, top: int | None = None) -> Path | None:
    """Fig. 18: train KL (log y) and test KL against the epoch, per method the mean over its ``top`` best runs
    (all when None) over the epochs all of them reached, with a 95% bootstrap confidence band of the mean
    (:func:`hardtovary.experiments.stats.bootstrap_mean_ci`) when there are two runs or more."""
    plt = matplotlib_pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, runs in runs_by_method.items():
        best = cloning.best_runs(runs, top)
        n = min(len(run["history"]) for run in best)
        epochs = [record["epoch"] for record in best[0]["history"][:n]]
        for ax, key in zip(axes, ("train_kl", "test_kl")):
            values = np.array([[record[key] for record in run["history"][:n]] for run in best])
            (line,) = ax.plot(epochs, values.mean(axis=0), label=_label(method, best))
            if len(best) > 1:
                low, high = bootstrap_mean_ci(values, level=CONFIDENCE)
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, lw=0)
    for ax, title in zip(axes, ("training levels", "test levels")):
        ax.set_title(f"KL(expert || policy), {title}")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL divergence (nats)")
    axes[1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_min_test_kl(runs_by_method: dict, path, top: int | None = None) -> Path | None:
    """The minimum test KL of each of the ``top`` best runs of each method (all when None), one dot per run,
    with a bar at their mean (§3.3: "minimum test loss for the 10 best runs")."""
    plt = matplotlib_pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.8))
    names = []
    for x, (method, runs) in enumerate(runs_by_method.items()):
        values = [cloning.min_test_kl(run["history"]) for run in cloning.best_runs(runs, top)]
        offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(x + offsets, values, s=18, alpha=0.8)
        ax.plot([x - 0.25, x + 0.25], [np.mean(values)] * 2, color="black", lw=1.5)
        names.append(_label(method, values))
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("minimum KL divergence on test")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_levels(label_folder, path, count: int = 8, split: str = "train") -> Path | None:
    """Fig. 17: one labelled state of each of the first ``count`` levels of ``split`` in a label folder, in a grid
    of four columns, each titled with its level seed. The state is the middle one of the level's labelled states
    (they are kept in the order they were played): every level starts alike, with the agent at the bottom left, so
    a later state shows more of what tells levels apart."""
    plt = matplotlib_pyplot()
    if plt is None:
        return None
    levels = labels.load_split(label_folder, split)[:count]
    columns = min(4, len(levels))
    rows = -(-len(levels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, level in zip(axes.flat, levels):
        ax.imshow(level.frames[len(level.frames) // 2])
        ax.set_title(f"level {level.level}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_figures(runs_by_method: dict, out, top: int | None = None) -> list:
    """:data:`FIGURES` in the folder ``out``, over the ``top`` best runs of each method (all when None); the paths
    written (None for each without matplotlib)."""
    out = Path(out)
    return [plot_kl_curves(runs_by_method, out / FIGURES["kl_curves"], top),
            plot_min_test_kl(runs_by_method, out / FIGURES["min_test_kl"], top)]
