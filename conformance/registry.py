"""The registry of checks: each check is registered where it is written, with its id, description and the target
callable it needs.

A single check uses the decorator::

    @check("agg.special.float16", "float16 input: ...", needs="aggregate")
    def _float16(adapter, settings): ...

and a family of checks (one per rule, rescaling and dtype) calls :func:`register` in a loop beside its code. Check
ids are dotted; ``--checks`` and the expected-failures file select them by id, prefix or glob (:func:`matches`).
Within a module the registration order is kept; ``checks/__init__.py`` puts the areas in the order of the
reports (:func:`order_by_module`).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from .judging import Settings
from .targets import Adapter


@dataclass(frozen=True)
class Check:
    id: str
    description: str
    #: the protocol callable the check calls (``hardtovary.conformance.protocol.CALLABLES``)
    needs: str
    run: Callable[[Adapter, Settings], list]


class UnknownCheck(ValueError):
    """A ``--checks`` pattern or an expected-failures entry that matches no check id."""


CHECKS: dict[str, Check] = {}


def register(c: Check) -> Check:
    if c.id in CHECKS:
        raise ValueError(f"check id {c.id!r} is registered twice")
    CHECKS[c.id] = c
    return c


def check(check_id: str, description: str, *, needs: str = "aggregate"):
    """Register the decorated ``run(adapter, settings)`` as a check."""
    def decorate(run):
        register(Check(check_id, description, needs, run))
        return run
    return decorate


def order_by_module(modules) -> None:
    """Put the registry in the order of ``modules`` (stable within each): the order of every report."""
    rank = {m.__name__: i for i, m in enumerate(modules)}
    ordered = sorted(CHECKS.values(), key=lambda c: rank[c.run.__module__])
    CHECKS.clear()
    CHECKS.update((c.id, c) for c in ordered)


def matches(check_id: str, pattern: str) -> bool:
    """A check id matches a pattern that equals it, that it extends by ``.<more>`` (a prefix), or that matches it
    as a glob."""
    return check_id == pattern or check_id.startswith(pattern + ".") or fnmatch.fnmatchcase(check_id, pattern)


def unknown_patterns(patterns) -> list[str]:
    """The patterns that match no check id."""
    return [p for p in patterns if not any(matches(c, p) for c in CHECKS)]


def describe_unknown(patterns, what: str) -> str:
    """A one-line message for patterns that match no check id, with the closest ids."""
    hints = []
    for p in patterns:
        close = difflib.get_close_matches(p, list(CHECKS), n=2, cutoff=0.6)
        hints.append(f"{p!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return (f"unknown check id{'s' if len(patterns) > 1 else ''} in {what}: {', '.join(hints)}; "
            "see the ids with --list")


def select(patterns=None) -> list[Check]:
    """Checks whose id matches one of the patterns (all checks without patterns). Raises :class:`UnknownCheck`
    for a pattern that matches nothing."""
    if not patterns:
        return list(CHECKS.values())
    unknown = unknown_patterns(patterns)
    if unknown:
        raise UnknownCheck(describe_unknown(unknown, "--checks"))
    return [c for c in CHECKS.values() if any(matches(c.id, p) for p in patterns)]
