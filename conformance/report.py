"""Reports: a terminal table and a JSON file.

The table has one row per check (id, verdict, seconds, a short message). Below it come the divergences reported
without failing, in full, and for every FAIL (and xfail) the smallest counterexample hypothesis found: its drawn
inputs (hypothesis's labelled draws), K, tau, rule options, then the components where a decision differs (the
oracle masks and the target keeps, or the reverse), then those whose values differ, each with its sign counts (p, q,
z, S) and both outputs; for a rescaled rule also the components the oracle masks. The summary says how many
checks compared values. ``verbose`` lists every offending component and every note in full. The JSON report holds
the same, machine-readable::

    {"target": ..., "summary": {"pass": n, "FAIL": n, ...}, "checks_compared": n, "comparisons": n,
     "exit_status": 0|1, "nothing_compared": null | "<why>",
     "results": [{"check_id", "description", "verdict", "message", "counterexample", "notes", "xfail_reason",
                  "seconds", "compared", "divergences", "unsupported", "shrink_seconds"}, ...]}
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .runner import VERDICTS, checks_compared, exit_status

#: Offending components shown per counterexample unless verbose.
SHOWN = 3

_INPUT_KEYS = ("case", "rule", "flavour", "k", "K", "tau", "rescale", "dtype", "shapes", "tensor", "loss",
               "semantics", "spec", "B", "seed", "step", "optimizer", "weight_decay", "weight_decay_order", "l1",
               "beta3", "bias_correction", "args")


def summary(results) -> dict:
    counts = Counter(r.verdict for r in results)
    return {v: counts.get(v, 0) for v in VERDICTS}


def _short(text, width: int, verbose: bool = False) -> str:
    text = " ".join(str(text).split())
    return text if verbose or len(text) <= width else text[: width - 1] + "…"


def _counts(c: dict) -> str:
    if "p" not in c:
        return ""
    text = f"p={c['p']} q={c['q']} z={c['z']} S={c['S']}"
    return text + (f" (keep iff |S| >= {c['threshold']})" if c.get("threshold") is not None else "")


def format_counterexample(cx: dict, verbose: bool = False) -> list[str]:
    lines = []
    head = {k: cx[k] for k in _INPUT_KEYS if cx.get(k) is not None}
    if head:
        lines.append("    inputs: " + ", ".join(f"{k}={v}" for k, v in head.items()))
    shown = None if verbose else SHOWN
    if cx.get("draws"):
        lines.append("    drawn: " + _short(", ".join(f"{k}={v}" for k, v in cx["draws"].items()), 300, verbose))
    if "oracle_kept" in cx:
        kept, n = cx["oracle_kept"]
        lines.append(f"    oracle keeps {kept:g} of {n} components (rescaling factor {n / kept:.4g})" if kept
                     else f"    oracle masks all {n} components (output exactly 0)")
        if "uniform_ratio" in cx:
            lines.append(f"    target/oracle = {cx['uniform_ratio']:.6g} on every kept component: the target rescales"
                         f" as if it kept {cx['implied_kept']:.4g} of {n}")
        listed = {tuple(c["index"]) for c in cx.get("offending", [])}
        masked = [c for c in cx.get("oracle_masked", []) if tuple(c["index"]) not in listed]
        for c in masked[:shown]:
            lines.append(f"    oracle masks index {c['index']}: {_counts(c)}  target={c['target']!r}")
            lines.append(f"      G[:, j] = {_short(c['G'], 160, verbose)}")
        if shown is not None and len(masked) > shown:
            lines.append(f"    ... {len(masked) - shown} more masked components (-v shows all)")
    offending = cx.get("offending", [])
    for off in offending[:shown]:
        outs = (f"oracle={off['oracle']!r} target={off['target']!r}" if "oracle" in off
                else f"first={off.get('first')!r} second={off.get('second')!r}")
        cause = f"{off['cause']}: " if off.get("cause") else ""
        lines.append(f"    index {off.get('index')}: {cause}{_counts(off)}  {outs}")
        if "G" in off:
            lines.append(f"      G[:, j] = {_short(off['G'], 160, verbose)}")
    n_bad = cx.get("n_bad", len(offending))
    if shown is not None and n_bad > shown:
        lines.append(f"    ... {n_bad - shown} more differing components" + (" (-v shows them)" if len(offending) >
                                                                                     shown else ""))
    for k in ("target", "oracle", "rate", "expected", "n_diff", "index"):
        if k in cx and not offending:
            lines.append(f"    {k}: {_short(cx[k], 160, verbose)}")
    failed_cases = cx.get("failed_cases", [])
    if len(failed_cases) > 1:
        by_error: dict[str, list[str]] = {}
        for f in failed_cases:
            by_error.setdefault(f["error"], []).append(f["case"])
        lines.append(f"    failed cases ({len(failed_cases)}{'+' if len(failed_cases) >= 20 else ''}), by error:")
        for error, labels in by_error.items():
            lines.append(f"      {_short(error, 160, verbose)}  [{len(labels)} case{'s' if len(labels) > 1 else ''}]")
            for label in labels[:None if verbose else 3]:
                lines.append(f"        {label}")
            if not verbose and len(labels) > 3:
                lines.append(f"        ... {len(labels) - 3} more (-v shows them)")
    if "traceback" in cx and verbose:  # its last line is already the message
        lines += ["    " + line for line in cx["traceback"].strip().splitlines()]
    return lines


def table(results, target_name: str = "", *, verbose: bool = False, nothing_compared: str | None = None) -> str:
    """The terminal report. ``nothing_compared`` explains a run in which no check compared anything (the target's
    offer, :func:`hardtovary.conformance.targets.describe_offer`)."""
    width = max([len(r.check_id) for r in results] + [10])
    lines = [f"conformance of {target_name}" if target_name else "conformance", ""]
    lines.append(f"{'check'.ljust(width)}  {'verdict':<11}  {'s':>5}  {'compared':>8}  detail")
    lines.append("-" * (width + 70))
    for r in results:
        detail = r.message or ("; ".join(r.notes) if r.notes else "")
        if r.xfail_reason:
            detail = f"[declared: {r.xfail_reason}] " + detail
        if r.shrink_seconds >= 1:
            detail += f" (shrinking took {r.shrink_seconds:.0f} s)"
        lines.append(f"{r.check_id.ljust(width)}  {r.verdict:<11}  {r.seconds:5.1f}  {r.compared:>8}  "
                     f"{_short(detail, 90, verbose)}")
        if verbose:
            lines += [f"    note: {n}" for n in r.notes] + [f"    unsupported: {u}" for u in r.unsupported]
    divergences = [(r, d) for r in results for d in r.divergences]
    if divergences:
        lines += ["", "divergences reported, not failed:"]
        lines += [f"  {r.check_id}: {d}" for r, d in divergences]
    failures = [r for r in results if r.verdict in ("FAIL", "xfail")]
    if failures:
        lines += ["", "counterexamples (smallest found):"]
        for r in failures:
            lines.append(f"  {r.check_id} [{r.verdict}]: {_short(r.message, 300, verbose)}")
            lines += format_counterexample(r.counterexample, verbose)
    s = summary(results)
    n_compared = checks_compared(results)
    lines += ["", "summary: " + ", ".join(f"{v} {n}" for v, n in s.items() if n)
              + f"; {n_compared} of {len(results)} checks compared values "
                f"({sum(r.compared for r in results)} comparisons)"]
    if not n_compared:
        lines.append("NOTHING WAS CHECKED: no check compared a target output with the oracle"
                     + (f" ({nothing_compared})" if nothing_compared else ""))
    lines.append(f"exit status {exit_status(results)}")
    return "\n".join(lines)


def to_json(results, target_name: str = "", *, nothing_compared: str | None = None) -> dict:
    n_compared = checks_compared(results)
    return {"target": target_name, "summary": summary(results), "checks_compared": n_compared,
            "comparisons": sum(r.compared for r in results), "exit_status": exit_status(results),
            "nothing_compared": None if n_compared else (nothing_compared or "no check compared anything"),
            "results": [r.to_dict() for r in results]}


def check_writable(path) -> None:
    """Raise OSError (one line) unless a report can be written at ``path``: checked before a run, not after."""
    path = Path(path)
    if path.is_dir():
        raise OSError(f"--report {str(path)!r} is a folder; give a file name such as {str(path / 'report.json')!r}")
    if not path.parent.is_dir():
        raise OSError(f"--report {str(path)!r}: the folder {str(path.parent)!r} does not exist")


def write_json(results, path, target_name: str = "", *, nothing_compared: str | None = None) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_json(results, target_name, nothing_compared=nothing_compared), fh, indent=2, default=str)
        fh.write("\n")
