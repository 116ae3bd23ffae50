"""Run checks against a target and turn what they judged into verdicts.

Verdicts: ``pass``, ``FAIL`` (unexpected failure), ``xfail`` (declared failure that failed), ``xpass`` (declared
failure that passed), ``skip`` (the target lacks the callable), ``unsupported`` (the target raised
NotImplementedError for every input of the check). A check that crashes with an exception from the target is a
FAIL, with the exception in the message. A check passes only when it compared at least one target output with the
oracle; one that compared nothing otherwise is a FAIL (the suite never passes what it did not check), and a run in
which no check compared anything fails as a whole (:func:`exit_status`).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field

from . import checks as C
from . import xfails as X
from .judging import Mismatch, Settings, tallying
from .registry import Check
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
    #: target outputs compared with the oracle (a deliberate refusal of bad input counts as one)
    compared: int = 0
    #: differences reported without failing (e.g. float-noise ties)
    divergences: list = field(default_factory=list)
    #: option combinations the target does not support (NotImplementedError)
    unsupported: list = field(default_factory=list)
    shrink_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _verdict(failed: bool, compared: int, unsupported: list, xfail_reason: str | None) -> tuple[str, str]:
    if failed:
        return ("xfail" if xfail_reason else "FAIL"), ""
    if compared:
        return ("xpass" if xfail_reason else "pass"), ""
    if unsupported:
        return "unsupported", "; ".join(unsupported[:3])
    return ("xfail" if xfail_reason else "FAIL"), "compared nothing: no target output reached the oracle"


def _draws(exc: BaseException) -> dict:
    """The drawn inputs of the (shrunk) counterexample, from hypothesis's notes on the exception: ``{"draws":
    {label: value, ...}}``, or nothing for a failure on a fixed case."""
    draws = {}
    for note in getattr(exc, "__notes__", []):
        head, sep, value = note.partition("): ")
        if note.startswith("Draw ") and sep and " (" in head:
            draws[head.split(" (", 1)[1]] = value
    return {"draws": draws} if draws else {}


def run_check(check: Check, adapter: Adapter, settings: Settings, xfail_reason: str | None = None) -> Result:
    start = time.perf_counter()
    res = Result(check.id, check.description, "pass", xfail_reason=xfail_reason)
    if not adapter.has(check.needs):
        res.verdict, res.message = "skip", f"target offers no `{check.needs}`"
        return res
    failed = False
    with tallying() as tally:
        try:
            res.notes = list(check.run(adapter, settings) or [])
        except Unsupported as exc:
            tally.unsupported.append(str(exc))
        except Mismatch as exc:
            failed, res.message, res.counterexample = True, exc.message, dict(exc.counterexample)
            res.counterexample.update(_draws(exc))
        except Exception as exc:  # a target crashing is a failure of that check
            failed = True
            res.message = f"{type(exc).__name__}: {exc}"
            res.counterexample = {"traceback": traceback.format_exc(limit=6)[-2000:], **_draws(exc)}
    res.compared, res.divergences = tally.compared, tally.divergences
    res.unsupported, res.shrink_seconds = tally.unsupported, tally.shrink_seconds
    res.verdict, why = _verdict(failed, res.compared, res.unsupported, xfail_reason)
    res.message = res.message or why
    res.seconds = time.perf_counter() - start
    return res


def run_suite(target, *, checks=None, xfails: dict | None = None, max_examples: int = 30, name=None,
              progress=None, shrink: bool = True) -> list[Result]:
    """Run the selected checks (all by default) against ``target``. ``xfails`` maps check-id patterns to reasons
    (:mod:`.xfails`); a pattern that matches no check is an error (:class:`~.checks.UnknownCheck`)."""
    xfails = xfails or {}
    unknown = C.unknown_patterns(list(xfails))
    if unknown:
        raise C.UnknownCheck(C.describe_unknown(unknown, "the expected-failures file"))
    adapter = target if isinstance(target, Adapter) else Adapter(target, name)
    settings = Settings(max_examples=max_examples, shrink=shrink)
    results = []
    for check in C.select(checks):
        results.append(run_check(check, adapter, settings, X.reason_for(check.id, xfails)))
        if progress:
            progress(results[-1])
    return results


def checks_compared(results) -> int:
    """How many checks compared at least one target output with the oracle."""
    return sum(1 for r in results if r.compared)


def exit_status(results) -> int:
    """0 exactly when no check FAILed unexpectedly and at least one check compared something."""
    return 1 if any(r.verdict == "FAIL" for r in results) or not checks_compared(results) else 0
