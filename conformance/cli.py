"""Command line of the conformance suite.

    hardtovary conformance --target module:attribute | path/to/file.py:attribute
                           [--checks id,id,...] [--xfails FILE] [--report FILE.json] [--max-examples N]
                           [--no-shrink] [-v] [--list]

Exit status 0 exactly when no check FAILed unexpectedly (xfail, xpass, skip and unsupported do not count) and at
least one check compared something; 1 otherwise; 2 for usage errors (a target that cannot be loaded, an unknown
check id, a malformed expected-failures file, a report path that cannot be written).

For ``experiments/cli.py``: ``add_arguments(parser)`` adds these options to a (sub)parser and
``run_from_args(args)`` runs them; ``main(argv)`` does both.
"""

from __future__ import annotations

import argparse
import sys

from . import checks as C
from . import report as R
from . import runner
from . import xfails as X
from .targets import TargetError, describe_offer, load_target


def _max_examples(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--target", default="hardtovary.conformance.targets:reference",
                        help="the implementation to check: module:attribute (imported with the current directory "
                             "first on the path) or path/to/file.py:attribute (default: the oracle itself)")
    parser.add_argument("--checks", default=None,
                        help="comma-separated check ids, prefixes (agg.special) or globs (default: all)")
    parser.add_argument("--xfails", default=None, metavar="FILE",
                        help="expected-failures file: one 'check_id  reason' per line, # comments")
    parser.add_argument("--report", default=None, metavar="FILE.json", help="also write a JSON report")
    parser.add_argument("--max-examples", type=_max_examples, default=30, metavar="N",
                        help="hypothesis examples per drawn check (default 30)")
    parser.add_argument("--no-shrink", dest="shrink", action="store_false",
                        help="report the first counterexample found instead of shrinking it to the smallest (faster "
                             "on a target that fails; the table says how long shrinking took)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="every offending component and every note in full")
    parser.add_argument("--list", action="store_true", help="list the check ids and exit")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="hardtovary conformance",
                                                 description="Check an implementation against the oracle."))


def run_from_args(args, out=None) -> int:
    out = out or sys.stdout
    if args.list:
        for c in C.CHECKS.values():
            print(f"{c.id:44s} [{c.needs}] {c.description}", file=out)
        return 0
    try:
        patterns = [p.strip() for p in args.checks.split(",") if p.strip()] if args.checks else None
        C.select(patterns)
        xf = X.load(args.xfails) if args.xfails else {}
        if args.report:
            R.check_writable(args.report)
        target = load_target(args.target)
        results = runner.run_suite(target, checks=patterns, xfails=xf, max_examples=args.max_examples,
                                   name=args.target, shrink=args.shrink)
    except (TargetError, X.XfailFormatError, C.UnknownCheck, OSError) as exc:
        print(f"hardtovary conformance: error: {exc}", file=sys.stderr)
        return 2
    nothing = None if runner.checks_compared(results) else describe_offer(target)
    print(R.table(results, args.target, verbose=args.verbose, nothing_compared=nothing), file=out)
    if args.report:
        R.write_json(results, args.report, args.target, nothing_compared=nothing)
    return runner.exit_status(results)


def main(argv=None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
