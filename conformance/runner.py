"""Run checks against a target and turn outcomes into verdicts.

Verdicts: ``pass``, ``FAIL`` (unexpected failure), ``xfail`` (declared failure that failed), ``xpass`` (declared
failure that passed), ``skip`` (the target lacks the callable), ``unsupported`` (the target raised
NotImplementedError for every input of the check). A check that crashes with an exception from the target is a
FAIL, with the exception in the message.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field

from . import checks as C
from . import xfails as X
from .targets import Adapter, Unsupported

VERDICTS = ("pass", "FAIL", "xfail", "xpass", "skip", "unsupported")


@dataclass
class Result:
    check_id: str
    description: str
    verdict: str
    message: str = ""
    counterexample: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    xfail_reason: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def run_check(check: C.Check, adapter: Adapter, settings: C.Settings, xfail_reason: str | None = None) -> Result:
    start = time.perf_counter()
    res = Result(check.id, check.description, "pass", xfail_reason=xfail_reason)
    if not adapter.has(check.needs):
        res.verdict, res.message = "skip", f"target offers no `{check.needs}`"
        return res
    failed = False
    try:
        res.notes = list(check.run(adapter, settings) or [])
    except Unsupported as exc:
        res.verdict, res.message = "unsupported", str(exc)
    except C.Mismatch as exc:
        failed, res.message, res.counterexample = True, exc.message, exc.counterexample
    except Exception as exc:  # noqa: BLE001 - a target crashing is a failure of that check
        failed = True
        res.message = f"{type(exc).__name__}: {exc}"
        res.counterexample = {"traceback": traceback.format_exc(limit=6)[-2000:]}
    if failed:
        res.verdict = "xfail" if xfail_reason else "FAIL"
    elif res.verdict == "pass" and xfail_reason:
        res.verdict = "xpass"
    res.seconds = time.perf_counter() - start
    return res


def run_suite(target, *, checks=None, xfails: dict | None = None, max_examples: int = 30, name=None,
              progress=None, shrink: bool = True) -> list[Result]:
    adapter = target if isinstance(target, Adapter) else Adapter(target, name)
    settings = C.Settings(max_examples=max_examples, shrink=shrink)
    results = []
    for check in C.select(checks):
        results.append(run_check(check, adapter, settings, X.reason_for(check.id, xfails or {})))
        if progress:
            progress(results[-1])
    return results


def exit_status(results) -> int:
    """0 exactly when no check FAILed unexpectedly."""
    return 1 if any(r.verdict == "FAIL" for r in results) else 0
