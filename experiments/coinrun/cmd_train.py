"""``hardtovary coinrun train``: behavioural cloning from a label folder (work in progress)."""

from __future__ import annotations

from hardtovary.experiments import options
from hardtovary.experiments.errors import UsageError


def add_arguments(parser) -> None:
    options.describe(parser, "Clone the expert of a label folder with Adam and the temporal AND-mask (paper §3.3).")


def run(args) -> int:
    raise UsageError("coinrun train is not implemented yet")
