"""``hardtovary coinrun search``: TPE search of the cloning (work in progress)."""

from __future__ import annotations

from hardtovary.experiments import options
from hardtovary.experiments.errors import UsageError


def add_arguments(parser) -> None:
    options.describe(parser, "TPE search of the cloning hyperparameters (paper App. B.6).")


def run(args) -> int:
    raise UsageError("coinrun search is not implemented yet")
