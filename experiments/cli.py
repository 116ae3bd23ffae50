"""The ``hardtovary`` command line (also ``python -m hardtovary``).

A table of commands (:data:`COMMANDS`): each is a module with ``add_arguments(parser)`` and ``run(args) -> int``,
imported only when its command is parsed, so that ``hardtovary --help`` and the commands that need no torch start
without importing it. Bad input raises :class:`~hardtovary.experiments.errors.UsageError`, printed as one line with
exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import NamedTuple

from hardtovary import __version__
from hardtovary.experiments import runtime
from hardtovary.experiments.errors import UsageError
from hardtovary.experiments.options import Parser, install_hint


class Command(NamedTuple):
    module: str                     # the module with add_arguments(parser) and the run function
    help: str                       # its line in `hardtovary --help`
    torch: bool = False             # built on PyTorch: where torch is missing, a stand-in says how to install it
    run: str = "run"                # the name of the run function
    description: str | None = None  # for a module that does not describe its command itself
    interrupted: str | None = None  # likewise, what an interrupt keeps
    stages: bool = False            # the command has stages (subcommands), each with its own --threads


_CONFORMANCE = (
    "Run the conformance suite against a target named as module:attribute (imported with the current "
    "directory first on the path) or path/to/file.py:attribute (see docs/conformance.md). "
    "Built-in targets: hardtovary.conformance.targets:reference (the oracle), "
    "hardtovary.conformance.torch_target:target (hardtovary.accel.torch), "
    "hardtovary.conformance.accel_target:target (hardtovary.accel.rules) and the planted mutants "
    "hardtovary.conformance.mutants:<name>. Exit status 0 exactly when no check fails unexpectedly and at "
    "least one check compared values; 1 otherwise; 2 for usage errors.")

COMMANDS = {
    "synthetic": Command("hardtovary.experiments.cmd_synthetic",
                         "synthetic memorization task: averaging vs AND-mask vs geometric mean"),
    "sweep": Command("hardtovary.experiments.cmd_sweep", "random hyperparameter search on the synthetic task "
                     "(paper Table 1), best configurations over seeds"),
    "ilc": Command("hardtovary.experiments.cmd_ilc",
                   "exact inconsistency scores and ILC of quadratic problems (paper §2, App. A.2)"),
    "conformance": Command("hardtovary.conformance.cli", "check an implementation of the rules, gradients and "
                           "optimizer steps against the oracle", run="run_from_args", description=_CONFORMANCE,
                           interrupted="no verdict was reached"),
    "baselines": Command("hardtovary.experiments.cmd_baselines", "synthetic task baselines: ERM "
                         "(dropout/L1/L2/BatchNorm), DANN, IRM, AND-mask (torch)", torch=True),
    "baselines-search": Command("hardtovary.experiments.cmd_baselines_search", "random search per baseline (ERM, "
                                "DANN, IRM, AND-mask; paper Tables 1-2), best re-run over seeds", torch=True),
    "gradient-correlation": Command("hardtovary.experiments.cmd_gradient_correlation", "gradient correlations "
                                    "with the mechanism and shortcut signals against the threshold (Fig. 7)",
                                    torch=True),
    "cifar10": Command("hardtovary.experiments.cmd_cifar10", "CIFAR-10 memorization (Figs. 8, 16) and label noise "
                       "(Fig. 9) with the per-example AND-mask; --dataset digits: the same on the 8x8 digits",
                       torch=True),
    "env-count": Command("hardtovary.experiments.cmd_env_count", "max o.o.d. test accuracy against the number of "
                         "training environments (Fig. 15, App. B.4)", torch=True),
    "coinrun": Command("hardtovary.experiments.cmd_coinrun", "CoinRun behavioural cloning: label with a planning "
                       "expert, clone with Adam vs the temporal AND-mask, TPE search (§3.3)", stages=True),
}


def build_parser(commands=None):
    """The parser of ``hardtovary``, with the options of each command named in ``commands`` (default: every
    command). The others are listed with their help line only: their modules are not imported."""
    parser = Parser(prog="hardtovary",
                    description="The AND-mask, the geometric mean of gradients and ILC "
                                "(Parascandolo et al., 'Learning Explanations That Are Hard To Vary', ICLR 2021).")
    parser.add_argument("--version", action="version", version=f"hardtovary {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        if command.torch and not torch_available():
            _add_needs_torch(subparsers, name)
            continue
        sub = subparsers.add_parser(name, help=command.help)
        if commands is None or name in commands:
            module = importlib.import_module(command.module)
            module.add_arguments(sub)
            if not command.stages:  # a command with stages leaves `run` to the stage parsed
                sub.set_defaults(run=getattr(module, command.run))
            if command.description is not None:
                sub.description = command.description
            if command.interrupted is not None:
                sub.set_defaults(interrupted=command.interrupted)
            if not command.stages:
                runtime.add_threads_option(sub)
    return parser


def torch_available() -> bool:
    """Whether PyTorch can be imported (the commands built on hardtovary.accel.torch need it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def _add_needs_torch(subparsers, name: str) -> None:
    """A stand-in for a command built on PyTorch when torch is not installed: it says how to install it."""
    # no option prefix: every argument (--help included) lands in `rest`, and the command explains itself
    p = subparsers.add_parser(name, help=f"(needs PyTorch: {install_hint('torch')})", add_help=False,
                              prefix_chars="\x00")
    p.add_argument("rest", nargs="*", help="ignored")

    def refuse(args) -> int:
        print(f"hardtovary {name}: this command needs PyTorch (torch >= 2.1), which is not installed; "
              f"{install_hint('torch')}", file=sys.stderr)
        return 2

    p.set_defaults(run=refuse)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the command is the first word that is not an option: the top level takes no option with a value
    parser = build_parser(commands=[word for word in argv if not word.startswith("-")][:1])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with runtime.limited_threads(runtime.resolve_threads(getattr(args, "threads", None))):
            status = args.run(args)
        sys.stdout.flush()  # a reader that stopped early (`| head`) shows here, as BrokenPipeError
        return status
    except UsageError as exc:
        print(f"hardtovary {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader has what it wanted; nothing to say. Point stdout at devnull so that the interpreter's last
        # flush does not fail again (Python docs, signal module, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2
    except KeyboardInterrupt:
        note = getattr(args, "interrupted", None)
        where = {"out": getattr(args, "out", None)}
        print(f"\ninterrupted{'; ' + note.format(**where) if note else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
