"""Reports: a terminal table and a JSON file.

The table has one row per check (id, verdict, seconds, a short message); below it, for every FAIL (and xfail),
the smallest counterexample hypothesis found: K, tau, rule options, the sign counts (p, q, z, S) of the
offending components and both outputs. The JSON report holds the same, machine-readable::

    {"target": ..., "summary": {"pass": n, "FAIL": n, ...}, "exit_status": 0|1,
     "results": [{"check_id", "description", "verdict", "message", "counterexample", "notes",
                  "xfail_reason", "seconds"}, ...]}
"""

from __future__ import annotations

import json
from collections import Counter

from .runner import VERDICTS, exit_status


def summary(results) -> dict:
    counts = Counter(r.verdict for r in results)
    return {v: counts.get(v, 0) for v in VERDICTS}


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_counterexample(cx: dict) -> list[str]:
    lines = []
    head = {k: cx[k] for k in ("case", "rule", "flavour", "k", "K", "tau", "rescale", "dtype", "shapes", "loss",
                               "semantics", "spec", "B", "seed", "step", "optimizer", "weight_decay",
                               "weight_decay_order", "l1", "beta3", "bias_correction", "args") if cx.get(k) is not None}
    if head:
        lines.append("    inputs: " + ", ".join(f"{k}={v}" for k, v in head.items()))
    for off in cx.get("offending", []):
        counts = ""
        if "p" in off:
            counts = f"p={off['p']} q={off['q']} z={off['z']}" + (f" S={off['S']}" if "S" in off else "")
            if off.get("threshold") is not None:
                counts += f" |S|>= {off['threshold']} to keep"
        outs = (f"oracle={off['oracle']!r} target={off['target']!r}" if "oracle" in off
                else f"first={off.get('first')!r} second={off.get('second')!r}")
        lines.append(f"    tensor {off.get('tensor')} index {off.get('index')}: {counts}  {outs}")
        if "G" in off:
            lines.append(f"      G[:, j] = {_short(off['G'], 160)}")
    for k in ("target", "oracle", "rate", "expected", "n_diff", "index", "tensor"):
        if k in cx and not cx.get("offending"):
            lines.append(f"    {k}: {_short(cx[k], 160)}")
    if "traceback" in cx:
        lines.append("    " + cx["traceback"].strip().splitlines()[-1])
    return lines


def table(results, target_name: str = "") -> str:
    width = max([len(r.check_id) for r in results] + [10])
    lines = [f"conformance of {target_name}" if target_name else "conformance", ""]
    lines.append(f"{'check'.ljust(width)}  {'verdict':<11}  {'s':>5}  detail")
    lines.append("-" * (width + 60))
    for r in results:
        detail = r.message or ("; ".join(r.notes) if r.notes else "")
        if r.xfail_reason:
            detail = f"[declared: {r.xfail_reason}] " + detail
        lines.append(f"{r.check_id.ljust(width)}  {r.verdict:<11}  {r.seconds:5.1f}  {_short(detail, 90)}")
    failures = [r for r in results if r.verdict in ("FAIL", "xfail")]
    if failures:
        lines += ["", "counterexamples (smallest found):"]
        for r in failures:
            lines.append(f"  {r.check_id} [{r.verdict}]: {r.message}")
            lines += format_counterexample(r.counterexample)
    s = summary(results)
    lines += ["", "summary: " + ", ".join(f"{v} {n}" for v, n in s.items() if n),
              f"exit status {exit_status(results)}"]
    return "\n".join(lines)


def to_json(results, target_name: str = "") -> dict:
    return {"target": target_name, "summary": summary(results), "exit_status": exit_status(results),
            "results": [r.to_dict() for r in results]}


def write_json(results, path, target_name: str = "") -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_json(results, target_name), fh, indent=2, default=str)
        fh.write("\n")
