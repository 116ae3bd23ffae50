"""Expected-failures files: known divergences of a target, declared and reported, never hidden.

Format (one entry per line; ``#`` starts a comment; blank lines ignored)::

    # check_id            reason
    agg.oracle.sand_mask.*  DomainBed substitutes 1e-17 for NaN (var = 0); see implementations.md Table B
    agg.ties.exact          strict '>' as in InvarianceUnitTests

The check id may be an exact id, a prefix ending in ``.*`` or any ``fnmatch`` glob. The reason is the rest of
the line after whitespace and is required. A declared check that fails is reported ``xfail``; one that passes
is reported ``xpass`` (not an error, but shown so the entry can be removed).
"""

from __future__ import annotations

import fnmatch


class XfailFormatError(ValueError):
    pass


def parse(text: str, source: str = "<xfails>") -> dict[str, str]:
    entries: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) < 2 or not parts[1].strip():
            raise XfailFormatError(f"{source}:{lineno}: expected 'check_id  reason', got {raw.strip()!r}")
        entries[parts[0]] = parts[1].strip()
    return entries


def load(path) -> dict[str, str]:
    with open(path, encoding="utf-8") as fh:
        return parse(fh.read(), str(path))


def reason_for(check_id: str, entries: dict[str, str]) -> str | None:
    for pattern, reason in entries.items():
        if check_id == pattern or fnmatch.fnmatchcase(check_id, pattern):
            return reason
    return None
