"""Progress bars of the long-running commands (tqdm), and what a resumed run reuses."""

from __future__ import annotations

import sys


def show_epoch(bar):
    """A per-epoch callback ``on_epoch(record)`` that shows the epoch and its train and o.o.d. test accuracy on
    ``bar``."""

    def show(record):
        bar.set_postfix(epoch=record["epoch"], train=f"{record['train_acc']:.3f}", test=f"{record['test_acc']:.3f}")

    return show


def start_unit(bar, name: str) -> None:
    """Name the unit of work that ``bar`` counts from now on, and clear what the previous unit showed (its epoch
    and accuracies would otherwise stand under the new name until the new unit's first epoch ends)."""
    bar.set_postfix(refresh=False)
    bar.set_description(name)


def note_resume(reused: int, total: int, what: str, folder) -> None:
    """Say on stderr what a resumed run takes from its run folder, e.g. ``resuming: 2 of 3 methods reused from
    runs/x``; nothing when it reuses nothing. ``what`` names the units in the plural."""
    if reused:
        from tqdm import tqdm

        tqdm.write(f"resuming: {reused} of {total} {what} reused from {folder}", file=sys.stderr)
