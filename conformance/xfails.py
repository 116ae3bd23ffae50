"""Expected-failures files: known divergences of a target, declared and reported, never hidden.

Format (one entry per line; ``#`` starts a comment; blank lines ignored)::

    # check_id            reason
    agg.oracle.sand_mask.*  DomainBed substitutes 1e-17 for NaN (var = 0)
    agg.ties.exact          strict '>' as in InvarianceUnitTests

The check id may be an exact id, a prefix (``agg.oracle.sand_mask`` declares every check under it) or any
``fnmatch`` glob. The reason is the rest of the line after whitespace and is required. A declared check that
fails is reported ``xfail``; one that passes is reported ``xpass`` (not an error, but shown so the entry can be
removed). An entry that matches no check id is an error (a misspelt id would otherwise declare nothing).
"""

from __future__ import annotations

from .checks import describe_unknown, matches, unknown_patterns  # registers the checks


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
        if unknown_patterns([parts[0]]):
            raise XfailFormatError(f"{source}:{lineno}: " + describe_unknown([parts[0]], "the expected-failures file"))
        entries[parts[0]] = parts[1].strip()
    return entries


def load(path) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise XfailFormatError(f"cannot read the expected-failures file {str(path)!r}: {exc.strerror or exc}") from exc
    return parse(text, str(path))


def reason_for(check_id: str, entries: dict[str, str]) -> str | None:
    """The reason of the first entry whose pattern matches ``check_id`` (as ``--checks`` matches: the id itself, a
    prefix of it, or a glob)."""
    for pattern, reason in entries.items():
        if matches(check_id, pattern):
            return reason
    return None
