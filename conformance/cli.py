"""Command line of the conformance suite.

    python -m hardtovary.conformance.cli --target module:attribute [--checks id,id,...] [--xfails FILE]
                                         [--report FILE.json] [--max-examples N] [--list]

Exit status 0 exactly when no check FAILed unexpectedly (xfail, xpass, skip and unsupported do not count);
2 for usage errors (unknown target or check id, malformed expected-failures file).

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
from .targets import TargetError, load_target


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--target", default="hardtovary.conformance.targets:reference",
                        help="the implementation to check, as module:attribute (default: the oracle itself)")
    parser.add_argument("--checks", default=None,
                        help="comma-separated check ids, prefixes (agg.special) or globs (default: all)")
    parser.add_argument("--xfails", default=None, metavar="FILE",
                        help="expected-failures file: one 'check_id  reason' per line, # comments")
    parser.add_argument("--report", default=None, metavar="FILE.json", help="also write a JSON report")
    parser.add_argument("--max-examples", type=int, default=30, metavar="N",
                        help="hypothesis examples per drawn check (default 30)")
    parser.add_argument("--list", action="store_true", help="list the check ids and exit")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="hardtovary-conformance",
                                                 description="Check an implementation against the oracle."))


def run_from_args(args, out=None) -> int:
    out = out or sys.stdout
    if args.list:
        for c in C.CHECKS.values():
            print(f"{c.id:40s} [{c.needs}] {c.description}", file=out)
        return 0
    try:
        target = load_target(args.target)
        xf = X.load(args.xfails) if args.xfails else {}
        patterns = [p.strip() for p in args.checks.split(",") if p.strip()] if args.checks else None
        C.select(patterns)
    except (TargetError, X.XfailFormatError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.max_examples < 1:
        print("error: --max-examples must be >= 1", file=sys.stderr)
        return 2
    results = runner.run_suite(target, checks=patterns, xfails=xf, max_examples=args.max_examples,
                               name=args.target)
    print(R.table(results, args.target), file=out)
    if args.report:
        R.write_json(results, args.report, args.target)
    return runner.exit_status(results)


def main(argv=None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
