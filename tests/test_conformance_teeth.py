"""The conformance suite has teeth: every planted mutant is caught; the oracle passes everything."""

import pytest

from hardtovary.conformance import checks, mutants, runner, targets


@pytest.mark.parametrize("name", sorted(mutants.MUTANTS))
def test_mutant_is_caught(name):
    mutant = mutants.MUTANTS[name]
    target, catching = mutant.target, mutant.catches
    # shrink=False keeps the test fast; the CLI shrinks (see test_conformance.py for a shrunk report)
    results = runner.run_suite(target, checks=list(catching), max_examples=15, shrink=False)
    failed = {r.check_id: r for r in results if r.verdict == "FAIL"}
    assert set(catching) <= set(failed), {r.check_id: (r.verdict, r.message) for r in results}
    for r in failed.values():  # a Mismatch with a counterexample, not a crash of the suite's own code
        assert "traceback" not in r.counterexample, r.message
    assert runner.exit_status(results) == 1


def test_catalogue_size():
    assert len(mutants.MUTANTS) >= 15
    for mutant in mutants.MUTANTS.values():
        assert mutant.catches and set(mutant.catches) <= set(checks.CHECKS) and mutant.breaks


@pytest.mark.slow
def test_reference_passes_everything():
    results = runner.run_suite(targets.reference, max_examples=20)
    bad = {r.check_id: (r.verdict, r.message) for r in results if r.verdict != "pass"}
    assert not bad
    assert runner.exit_status(results) == 0
    assert len(results) == len(checks.CHECKS)
