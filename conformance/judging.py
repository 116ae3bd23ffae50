"""What a check judged, and how it draws: the machinery every check shares.

- :class:`Mismatch`: a target disagrees with the oracle (with a JSON-able counterexample).
- :class:`Tally`: what one check judged (comparisons, divergences reported without failing, unsupported option
  combinations, seconds spent shrinking); the runner opens one per check (:func:`tallying`) and turns it into a
  verdict, so a check that compared nothing never passes.
- :func:`draw_and_judge`: hypothesis draws (derandomized, the same by every route) with unsupported draws recorded.
- :func:`judge_each`: named cases judged one by one, so that one failing case does not hide the others.
"""

from __future__ import annotations

import contextvars
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from .targets import Unsupported

#: Offending components (or failed cases) kept per mismatch; the terminal shows the first few unless verbose.
MAX_OFFENDING = 20


class Mismatch(AssertionError):
    """A target disagrees with the oracle; ``counterexample`` is a JSON-able dict."""

    def __init__(self, message: str, counterexample: dict | None = None):
        super().__init__(message)
        self.message = message
        self.counterexample = counterexample or {}


@dataclass
class Settings:
    max_examples: int = 30
    shrink: bool = True


@dataclass
class Tally:
    """What one check judged: target outputs compared with the oracle (a deliberate refusal of bad input counts),
    divergences reported without failing, option combinations the target does not support, and the seconds
    hypothesis spent shrinking a counterexample."""

    compared: int = 0
    divergences: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    shrink_seconds: float = 0.0


_TALLY: contextvars.ContextVar[Tally] = contextvars.ContextVar("conformance_tally")


@contextmanager
def tallying():
    """Count what the checks run inside this block judged (the runner opens one per check)."""
    tally = Tally()
    token = _TALLY.set(tally)
    try:
        yield tally
    finally:
        _TALLY.reset(token)


def current_tally() -> Tally:
    """The running check's tally (a throwaway one outside :func:`tallying`, e.g. a comparison called from a test)."""
    return _TALLY.get(None) or Tally()


def judged(n: int = 1) -> None:
    """Record that ``n`` target outputs were compared with the oracle."""
    current_tally().compared += n


def record_unsupported(message: str) -> None:
    tally = current_tally()
    if message not in tally.unsupported:
        tally.unsupported.append(message)


def jsonable(x):
    """A float array (or scalar) as JSON: non-finite values as strings."""
    a = np.asarray(x)
    if a.dtype.kind == "f":
        return [float(v) if np.isfinite(v) else str(v) for v in a.ravel()] if a.ndim else (
            float(a) if np.isfinite(a) else str(a))
    return a.tolist()


# ----------------------------------------------------------------------------------------------------------------
# hypothesis
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def _draws_independent_of_loaded_modules():
    """Hypothesis mixes literal constants of the "local" modules loaded in the process (those outside
    site-packages: an editable install, the user's adapter, a conftest) into its draws. The suite's draws must be
    the same by every route (CLI, pytest plugin, ``run_suite``) and installation, so while it draws, that pool is
    empty. Hypothesis offers no public switch for it; without the private hook there is no pool to empty, and
    ``tests/test_conformance.py`` checks that the draws stay independent of the loaded modules."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - a hypothesis without the feature
        yield
        return
    original = getattr(providers, "_get_local_constants", None)
    cache = getattr(getattr(providers, "CONSTANTS_CACHE", None), "cache", None)
    if original is None or cache is None:  # pragma: no cover
        yield
        return
    empty = providers.Constants()
    providers._get_local_constants = lambda: empty
    cache.clear()
    try:
        yield
    finally:
        providers._get_local_constants = original
        cache.clear()


def _phases(settings: Settings) -> tuple:
    return (Phase.explicit, Phase.reuse, Phase.generate) + ((Phase.shrink,) if settings.shrink else ())


def draw_and_judge(settings: Settings, body, cap: int | None = None) -> list:
    """Run ``body(data)`` on hypothesis draws (derandomized, no database). A drawn option combination the target
    does not support is recorded in the tally, not failed; the first failure is shrunk unless shrinking is off."""
    tally = current_tally()
    failed_at: list[float] = []
    # Hypothesis seeds a derandomized run with a digest of the source of `run` below: editing its text changes every
    # draw of the suite (and with it the reports), so its text stays as it is, this local name included.
    _unsupported = record_unsupported

    @hsettings(max_examples=max(1, min(settings.max_examples, cap or settings.max_examples)), deadline=None,
               database=None, derandomize=True, report_multiple_bugs=False, print_blob=False,
               suppress_health_check=list(HealthCheck), phases=_phases(settings))
    @given(st.data())
    def run(data):
        try:
            body(data)
        except Unsupported as exc:
            _unsupported(str(exc))
        except BaseException:
            if not failed_at:
                failed_at.append(time.perf_counter())
            raise

    with _draws_independent_of_loaded_modules():
        try:
            run()
        finally:
            if failed_at and settings.shrink:
                tally.shrink_seconds += time.perf_counter() - failed_at[0]
    return ["compared on drawn inputs"]


# ----------------------------------------------------------------------------------------------------------------
# named cases, judged one by one
# ----------------------------------------------------------------------------------------------------------------


def judge_each(cases, judge) -> list:
    """Judge every case on its own (``judge(case)``; each case has a ``label()``): a case that fails or crashes is
    one failure, and the others are still judged. Cases the target does not support are recorded in the tally."""
    failures, n_judged, n_unsupported = [], 0, 0
    for case in cases:
        try:
            judge(case)
        except Unsupported as exc:
            n_unsupported += 1
            record_unsupported(f"{case.label()}: {exc}")
            continue
        except Exception as exc:  # a Mismatch, or the target crashing on this case
            failures.append((case, exc))
        n_judged += 1
    if failures:
        raise _case_failures(failures, n_judged)
    return [f"judged {n_judged} case{'s' if n_judged != 1 else ''}"
            + (f" ({n_unsupported} unsupported)" if n_unsupported else "")]


def _case_failures(failures, n_cases) -> Mismatch:
    case, first = failures[0]
    if isinstance(first, Mismatch):
        message, cx = first.message, dict(first.counterexample)
    else:
        message = f"{type(first).__name__}: {first}"
        cx = {"case": case.name, "traceback": "".join(traceback.format_exception(first, limit=-6))[-2000:]}
    cx["failed_cases"] = [{"case": c.label(), "error": e.message if isinstance(e, Mismatch)
                           else f"{type(e).__name__}: {e}"} for c, e in failures[:MAX_OFFENDING]]
    head = f"{len(failures)} of {n_cases} cases failed; first, {case.label()}: " if n_cases > 1 else ""
    return Mismatch(head + message, cx)
