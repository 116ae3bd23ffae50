"""Plots of experiment results (PNG). Needs matplotlib (``pip install "hardtovary[plot]"``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hardtovary.experiments.runfolder import write_atomic


def matplotlib_pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` as a PNG atomically (:func:`~hardtovary.experiments.runfolder.write_atomic`) and
    close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    finally:
        plt.close(fig)
    return path


def plot_learning_curves(curves: dict, path: Path) -> Path | None:
    """Training and o.o.d. test accuracy per epoch, one line per method (in the manner of the paper's Fig. 14).

    ``curves`` maps a method's name to a list of histories (one per seed; a history is a list of per-epoch records
    with ``epoch``, ``train_acc`` and ``test_acc``). With several seeds the line is their mean over the epochs every
    run reached, and a band spans their minimum to maximum. Returns the path written, or None when matplotlib is
    missing.
    """
    plt = matplotlib_pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for name, histories in curves.items():
        n = min(len(h) for h in histories)
        if n == 0:
            continue
        epochs = [record["epoch"] for record in histories[0][:n]]
        for ax, key in zip(axes, ("train_acc", "test_acc")):
            values = np.array([[record[key] for record in h[:n]] for h in histories])
            label = name if len(histories) == 1 else f"{name} ({len(histories)} seeds)"
            (line,) = ax.plot(epochs, values.mean(axis=0), label=label)
            if len(histories) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
    for ax, title in zip(axes, ("training environments", "o.o.d. test set")):
        ax.set_title(f"accuracy, {title}")
        ax.set_xlabel("epoch")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0.4, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
