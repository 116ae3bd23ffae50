"""pytest plugin: run the conformance checks as items of your own test session.

    pytest -p hardtovary.conformance.pytest_plugin --conformance-target mypkg.impl:target \\
           [--conformance-xfails FILE] [--conformance-max-examples N] [--conformance-checks id,id]
           [--conformance-no-shrink]

The target is named as on the command line of ``hardtovary conformance``: ``module:attribute`` (imported with the
current directory first on the import path) or ``path/to/file.py:attribute``. Each check becomes an item
``conformance[<check id>]`` (select with ``-k``). A FAIL fails the item with the counterexample (all offending
components with ``-v``); a check declared in the xfails file is marked ``xfail(strict=False)`` (so it shows as
xfailed or XPASS); a missing callable or NotImplementedError skips the item with the reason. A target that cannot be
loaded, an unknown check id or a malformed xfails file is a usage error (one line). A session in which the
conformance items compared nothing fails. Without ``--conformance-target`` the plugin adds nothing.
"""

from __future__ import annotations

import pytest

from . import checks as C
from . import report as R
from . import runner
from . import xfails as X
from .judging import Settings
from .targets import Adapter, TargetError, describe_offer, load_target

_STATE = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("conformance", "hardtovary conformance suite")
    group.addoption("--conformance-target", default=None, metavar="MODULE:ATTR",
                    help="run the conformance checks against this target (module:attribute or file.py:attribute)")
    group.addoption("--conformance-xfails", default=None, metavar="FILE", help="expected-failures file")
    group.addoption("--conformance-max-examples", type=int, default=30, metavar="N")
    group.addoption("--conformance-checks", default=None, help="comma-separated check ids/prefixes/globs")
    group.addoption("--conformance-no-shrink", action="store_true",
                    help="report the first counterexample found instead of the smallest")


def pytest_configure(config):
    name = config.getoption("conformance_target")
    if not name:
        return
    patterns = config.getoption("conformance_checks")
    patterns = [p.strip() for p in patterns.split(",") if p.strip()] if patterns else None
    path = config.getoption("conformance_xfails")
    if config.getoption("conformance_max_examples") < 1:
        raise pytest.UsageError("--conformance-max-examples must be a positive integer")
    try:
        selected = C.select(patterns)
        xfails = X.load(path) if path else {}
        target = load_target(name)
    except (TargetError, X.XfailFormatError, C.UnknownCheck) as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_STATE] = {"name": name, "target": target, "adapter": Adapter(target, name), "checks": selected,
                            "xfails": xfails, "compared": 0, "ran": 0,
                            "settings": Settings(max_examples=config.getoption("conformance_max_examples"),
                                                 shrink=not config.getoption("conformance_no_shrink"))}


class ConformanceItem(pytest.Item):
    def __init__(self, *, check, state, **kwargs):
        super().__init__(**kwargs)
        self.check, self.state = check, state

    def runtest(self):
        res = runner.run_check(self.check, self.state["adapter"], self.state["settings"])
        self.state["ran"] += 1
        self.state["compared"] += bool(res.compared)
        if res.verdict in ("skip", "unsupported"):
            pytest.skip(f"{res.verdict}: {res.message}")
        if res.verdict == "FAIL":
            verbose = self.config.getoption("verbose") > 0
            raise AssertionError("\n".join([f"{self.check.id}: {res.message}"]
                                           + R.format_counterexample(res.counterexample, verbose)))

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, AssertionError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"conformance[{self.check.id}]"


def pytest_collection_modifyitems(session, config, items):
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    for check in state["checks"]:
        item = ConformanceItem.from_parent(session, name=f"conformance[{check.id}]", check=check, state=state)
        reason = X.reason_for(check.id, state["xfails"])
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
        items.append(item)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(_STATE, None)
    if state is not None and state["ran"]:
        terminalreporter.write_line(f"conformance: {state['compared']} of {state['ran']} checks compared values")
        if not state["compared"]:
            terminalreporter.write_line("conformance: NOTHING WAS CHECKED: no check compared a target output with "
                                        f"the oracle ({describe_offer(state['target'])})", red=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    state = session.config.stash.get(_STATE, None)
    if state is not None and state["ran"] and not state["compared"] and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
