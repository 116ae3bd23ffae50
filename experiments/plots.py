"""Plots of experiment results (PNG). Needs matplotlib (``pip install "hardtovary[plot]"``)."""

from __future__ import annotations

from pathlib import Path


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
    """Write ``fig`` to ``path`` (PNG) atomically -- a temporary file in the same folder, then a rename -- and close
    it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_learning_curves(results: dict, path: Path) -> Path | None:
    """Training and o.o.d. test accuracy per epoch, one line per method (in the manner of the paper's Fig. 14).

    Returns the path written, or None when matplotlib is missing.
    """
    plt = matplotlib_pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for name, r in results["methods"].items():
        epochs = [h["epoch"] for h in r["history"]]
        axes[0].plot(epochs, [h["train_acc"] for h in r["history"]], label=name)
        axes[1].plot(epochs, [h["test_acc"] for h in r["history"]], label=name)
    for ax, title in zip(axes, ("training environments", "o.o.d. test set")):
        ax.set_title(f"accuracy, {title}")
        ax.set_xlabel("epoch")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0.4, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)
