"""Progress bars of the long-running commands (tqdm)."""

from __future__ import annotations


def show_epoch(bar):
    """A per-epoch callback ``on_epoch(record)`` that shows the epoch and its train and o.o.d. test accuracy on
    ``bar``."""

    def show(record):
        bar.set_postfix(epoch=record["epoch"], train=f"{record['train_acc']:.3f}", test=f"{record['test_acc']:.3f}")

    return show
