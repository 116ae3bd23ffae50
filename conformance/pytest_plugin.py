"""pytest plugin: run the conformance checks as items of your own test session.

    pytest -p hardtovary.conformance.pytest_plugin --conformance-target mypkg.impl:target \\
           [--conformance-xfails FILE] [--conformance-max-examples N] [--conformance-checks id,id]

Each check becomes an item ``conformance[<check id>]`` (select with ``-k``). A FAIL fails the item with the
counterexample; a check declared in the xfails file is marked ``xfail(strict=False)`` (so it shows as xfailed or
XPASS); a missing callable or NotImplementedError skips the item with the reason. Without
``--conformance-target`` the plugin adds nothing.
"""

from __future__ import annotations

import pytest

from . import checks as C
from . import report as R
from . import runner
from . import xfails as X
from .targets import Adapter, load_target


def pytest_addoption(parser):
    group = parser.getgroup("conformance", "hardtovary conformance suite")
    group.addoption("--conformance-target", default=None, metavar="MODULE:ATTR",
                    help="run the conformance checks against this target")
    group.addoption("--conformance-xfails", default=None, metavar="FILE", help="expected-failures file")
    group.addoption("--conformance-max-examples", type=int, default=30, metavar="N")
    group.addoption("--conformance-checks", default=None, help="comma-separated check ids/prefixes/globs")


class ConformanceItem(pytest.Item):
    def __init__(self, *, check, adapter, settings, **kwargs):
        super().__init__(**kwargs)
        self.check, self.adapter, self.settings = check, adapter, settings

    def runtest(self):
        res = runner.run_check(self.check, self.adapter, self.settings)
        if res.verdict in ("skip", "unsupported"):
            pytest.skip(f"{res.verdict}: {res.message}")
        if res.verdict == "FAIL":
            raise AssertionError("\n".join([f"{self.check.id}: {res.message}"]
                                           + R.format_counterexample(res.counterexample)))

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, AssertionError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"conformance[{self.check.id}]"


def pytest_collection_modifyitems(session, config, items):
    name = config.getoption("conformance_target")
    if not name:
        return
    adapter = Adapter(load_target(name), name)
    xf = X.load(config.getoption("conformance_xfails")) if config.getoption("conformance_xfails") else {}
    patterns = config.getoption("conformance_checks")
    patterns = [p.strip() for p in patterns.split(",") if p.strip()] if patterns else None
    settings = C.Settings(max_examples=config.getoption("conformance_max_examples"))
    for check in C.select(patterns):
        item = ConformanceItem.from_parent(session, name=f"conformance[{check.id}]", check=check,
                                           adapter=adapter, settings=settings)
        reason = X.reason_for(check.id, xf)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
        items.append(item)
