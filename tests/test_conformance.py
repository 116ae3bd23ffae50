"""The conformance suite's machinery: CLI, xfails, reports, adapter, plugin, strategies, verdicts."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardtovary.conformance import checks, cli, compare, judging, mutants, report, runner, targets, tolerances, xfails
from hardtovary.conformance import strategies as S

BIN = Path(sys.executable).parent

#: A NumPy adapter (mean and AND-mask, rescaled per tensor), written into temporary folders by the tests.
ADAPTER = textwrap.dedent('''\
    import math
    import numpy as np


    class Impl:
        def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
            if rule not in ("mean", "and_mask"):
                raise NotImplementedError(rule)
            out = []
            for G in grads:
                G = np.asarray(G, dtype=np.float64)
                S = np.abs(np.sign(G).sum(0))
                keep = S >= (0 if rule == "mean" else math.ceil(tau * G.shape[0] - 1e-9))
                value = np.where(keep, G.mean(0), 0.0)
                if rescale and rule != "mean":
                    value = value * (keep.size / keep.sum()) if keep.sum() else value * 0
                out.append(value)
            return out


    target = Impl()
''')


def _env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args, cwd, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=timeout)


# ----------------------------------------------------------------------------------------------------------------
# naming a target (item: the README's command must work from the adapter's folder)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_console_script_imports_the_adapter_from_the_current_directory(tmp_path):
    (tmp_path / "my_adapter.py").write_text(ADAPTER)
    script = BIN / "hardtovary"
    assert script.exists(), "the hardtovary console script is installed next to the interpreter"
    proc = _run([str(script), "conformance", "--target", "my_adapter:target", "--checks", "agg.special.k1",
                 "--max-examples", "3"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "agg.special.k1" in proc.stdout and "1 of 1 checks compared values" in proc.stdout


@pytest.mark.slow
def test_pytest_plugin_imports_the_adapter_from_the_current_directory(tmp_path):
    (tmp_path / "my_adapter.py").write_text(ADAPTER)
    script = BIN / "pytest"
    assert script.exists()
    proc = _run([str(script), "-q", "-p", "hardtovary.conformance.pytest_plugin", "-p", "no:cacheprovider",
                 "--conformance-target", "my_adapter:target", "--conformance-checks", "agg.special.k1"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "1 of 1 checks compared values" in proc.stdout


@pytest.mark.slow
def test_a_file_path_names_a_target_from_any_folder(tmp_path):
    impl = tmp_path / "deep" / "impl.py"
    impl.parent.mkdir()
    impl.write_text(ADAPTER)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _run([str(BIN / "hardtovary"), "conformance", "--target", "../deep/impl.py:target", "--checks",
                 "agg.special.k1"], elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert targets.load_target(f"{impl}:target").__class__.__name__ == "Impl"
    assert targets.load_target(str(impl)).target.__class__.__name__ == "Impl"  # the module itself


@pytest.mark.slow
def test_a_failed_import_is_one_clear_line_by_both_routes(tmp_path):
    proc = _run([str(BIN / "hardtovary"), "conformance", "--target", "no_such_adapter:target"], tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "no_such_adapter" in err[0] and str(tmp_path) in err[0] and ".py:attr" in err[0]
    assert "Traceback" not in proc.stderr
    proc = _run([str(BIN / "pytest"), "-q", "-p", "hardtovary.conformance.pytest_plugin", "-p", "no:cacheprovider",
                 "--conformance-target", "no_such_adapter:target"], tmp_path)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "INTERNALERROR" not in proc.stdout + proc.stderr and "no_such_adapter" in proc.stderr


def test_load_errors_name_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_adapter.py").write_text("import no_such_dependency_xyz\n")
    with pytest.raises(targets.TargetError, match="broken_adapter.*failed: ModuleNotFoundError.*no_such_dependency"):
        targets.load_target("broken_adapter:target")
    (tmp_path / "typo_adapter.py").write_text("target = 1\n")
    with pytest.raises(targets.TargetError, match="did you mean 'target'"):
        targets.load_target("typo_adapter:targte")
    with pytest.raises(targets.TargetError, match="no file"):
        targets.load_target("missing/impl.py:target")
    assert targets.load_target("hardtovary.conformance.targets:reference") is targets.reference


# ----------------------------------------------------------------------------------------------------------------
# a verdict is earned (item: a target that implements nothing must not pass)
# ----------------------------------------------------------------------------------------------------------------


class _Misspelt:
    def aggregate_grads(self, grads, **options):
        return targets.reference.aggregate(grads, **options)


def _plain_function(grads, **options):
    return targets.reference.aggregate(grads, **options)


@pytest.mark.parametrize("obj, expected", [
    (3, "found: none"),
    (_plain_function, "the target is a function named '_plain_function'"),
    (_Misspelt(), "aggregate_grads (did you mean aggregate?)"),
])
def test_a_target_that_implements_nothing_fails_and_says_why(obj, expected, monkeypatch, capsys, tmp_path):
    module = type(sys)("nothing_target")
    module.target = obj
    monkeypatch.setitem(sys.modules, "nothing_target", module)
    out = tmp_path / "r.json"
    status = cli.main(["--target", "nothing_target:target", "--report", str(out), "--max-examples", "2"])
    text = capsys.readouterr().out
    assert status == 1
    assert "NOTHING WAS CHECKED" in text and expected in text
    assert "not found: aggregate, env_gradients, eval_logits, step, temporal, spirals" in text
    assert f"0 of {len(checks.CHECKS)} checks compared values" in text
    report_json = json.loads(out.read_text())
    assert report_json["exit_status"] == 1 and report_json["checks_compared"] == 0
    assert expected in report_json["nothing_compared"]


def test_a_check_that_compares_nothing_never_passes():
    quiet = checks.Check("x.quiet", "returns without comparing", "aggregate", lambda adapter, settings: ["done"])
    res = runner.run_check(quiet, targets.Adapter(targets.reference), judging.Settings())
    assert res.verdict == "FAIL" and "compared nothing" in res.message
    judged = checks.Check("x.judged", "compares once", "aggregate",
                          lambda adapter, settings: judging.judged() or ["done"])
    assert runner.run_check(judged, targets.Adapter(targets.reference), judging.Settings()).verdict == "pass"


def test_the_summary_says_how_many_checks_compared(capsys):
    assert cli.main(["--checks", "agg.special.k1,spirals", "--max-examples", "2"]) == 0
    assert "2 of 2 checks compared values" in capsys.readouterr().out
    res = runner.run_suite(mutants.spirals_noise_first, checks=["agg.special.k1"])
    # mean 1 tau, and_mask 3, paper GM 1, original GM 3, SAND 3: 11 option sets, each plain and rescaled
    assert res[0].compared == 22 and runner.checks_compared(res) == 1


@pytest.mark.slow
def test_a_plugin_session_that_compared_nothing_fails(tmp_path):
    (tmp_path / "nothing_adapter.py").write_text("class T:\n    def aggregate_grads(self):\n        pass\n\n"
                                                 "target = T()\n")
    proc = _run([str(BIN / "pytest"), "-q", "-p", "hardtovary.conformance.pytest_plugin", "-p", "no:cacheprovider",
                 "--conformance-target", "nothing_adapter:target", "--conformance-checks", "agg.special.k1"],
                tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert "NOTHING WAS CHECKED" in proc.stdout and "did you mean aggregate" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# agg.special.nonfinite: only a deliberate refusal passes
# ----------------------------------------------------------------------------------------------------------------


class _RefusesNonFinite(targets.ReferenceTarget):
    """The oracle refuses NaN/inf with ValueError: a deliberate refusal."""


class _NanPropagates(targets.ReferenceTarget):
    def aggregate(self, grads, **options):
        if all(np.all(np.isfinite(g)) for g in grads):
            return super().aggregate(grads, **options)
        return [np.full(np.asarray(g).shape[1:], np.nan) for g in grads]


class _DropsNonFinite(targets.ReferenceTarget):
    def aggregate(self, grads, **options):
        return super().aggregate([np.nan_to_num(np.asarray(g), nan=0.0, posinf=0.0, neginf=0.0) for g in grads],
                                 **options)


class _WrongSignature(targets.ReferenceTarget):
    def aggregate(self, grads, *, rule, tau, rescale):  # no flavour, no k: a TypeError for those rules
        return super().aggregate(grads, rule=rule, tau=tau, rescale=rescale)


class _TypeErrorOnNonFinite(targets.ReferenceTarget):
    """Accepts finite stacks; on NaN/inf it fails with a TypeError, which is not a refusal."""

    def aggregate(self, grads, **options):
        if not all(np.all(np.isfinite(g)) for g in grads):
            raise TypeError("unexpected keyword argument")
        return super().aggregate(grads, **options)


class _RefusesEverything(targets.ReferenceTarget):
    def aggregate(self, grads, **options):
        raise ValueError("refused")


@pytest.mark.parametrize("target, verdict", [(_RefusesNonFinite(), "pass"), (_NanPropagates(), "pass"),
                                             (_DropsNonFinite(), "FAIL"), (_WrongSignature(), "FAIL"),
                                             (_TypeErrorOnNonFinite(), "FAIL"), (_RefusesEverything(), "FAIL")])
def test_nonfinite_passes_only_a_deliberate_refusal_or_propagation(target, verdict):
    (res,) = runner.run_suite(target, checks=["agg.special.nonfinite"])
    assert res.verdict == verdict, res.message
    if isinstance(target, (_WrongSignature, _TypeErrorOnNonFinite)):
        assert "TypeError" in res.message
    if isinstance(target, _RefusesEverything):
        assert "finite twin" in res.message


# ----------------------------------------------------------------------------------------------------------------
# property checks judge fixed cases on their edge first
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutant, check", [("strict_gt", "agg.prop.tau0_mean"),
                                           ("sign0_plus", "agg.prop.sign_flip.and_mask"),
                                           ("env_axis_mixed", "agg.prop.permutation.and_mask")])
def test_property_checks_catch_their_bug_on_the_fixed_cases_alone(mutant, check):
    results = runner.run_suite(mutants.MUTANTS[mutant].target, checks=[check], max_examples=1, shrink=False)
    assert results and all(r.verdict == "FAIL" for r in results), [(r.check_id, r.verdict) for r in results]
    assert all("fixed K=4 stack" in r.message for r in results)


# ----------------------------------------------------------------------------------------------------------------
# reports show the cause
# ----------------------------------------------------------------------------------------------------------------


def test_a_wrongly_kept_zero_is_shown_as_the_cause(capsys):
    status = cli.main(["--target", "hardtovary.conformance.mutants:sign0_plus", "--checks", "agg.special.k1"])
    text = capsys.readouterr().out
    assert status == 1
    body = text.split("counterexamples (smallest found):", 1)[1]
    masked = body.index("oracle masks index [2]: p=0 q=0 z=1 S=0")
    first_value = body.index("index [0]")
    assert masked < first_value  # the cause before its consequences
    assert "target/oracle = 0.75 on every kept component: the target rescales as if it kept 4 of 4" in body


def test_verbose_prints_every_component_and_note_in_full(capsys):
    args = ["--target", "hardtovary.conformance.mutants:sum_not_mean", "--checks", "agg.oracle.mean.plain.float64",
            "--max-examples", "5", "--no-shrink"]
    cli.main(args)
    short = capsys.readouterr().out
    cli.main(args + ["-v"])
    verbose = capsys.readouterr().out
    assert "… " in short or "more differing components" in short
    assert "more differing components (-v" not in verbose and "…" not in verbose
    assert cli.main(["--checks", "agg.special.k1", "-v"]) == 0
    assert "note: judged 22 cases" in capsys.readouterr().out


def test_float_noise_divergences_are_printed_in_full(capsys):
    assert cli.main(["--target", "hardtovary.conformance.mutants:float32_agreement", "--checks",
                     "agg.ties.float_noise.float64"]) == 0
    text = capsys.readouterr().out
    assert "divergences reported, not failed:" in text
    assert "oracle keeps, target drops" in text


# ----------------------------------------------------------------------------------------------------------------
# one dtype's crash does not hide the others; draws only from supported options, the same by every route
# ----------------------------------------------------------------------------------------------------------------


class _Float16Crash(targets.ReferenceTarget):
    """The authors' float16 defect: a float32 mask assigned to a float16 gradient raises."""

    def aggregate(self, grads, **options):
        if np.asarray(grads[0]).dtype == np.float16:
            raise RuntimeError("assigned grad has data of a different type")
        return super().aggregate(grads, **options)


def test_a_float16_crash_leaves_float32_and_float64_judged():
    res = runner.run_suite(_Float16Crash(), checks=["agg.oracle.and_mask.plain", "agg.prop.tau0_mean",
                                                    "agg.ties.float_noise"], max_examples=5)
    verdicts = {r.check_id: r.verdict for r in res}
    for family in ("agg.oracle.and_mask.plain", "agg.prop.tau0_mean", "agg.ties.float_noise"):
        assert verdicts[f"{family}.float16"] == "FAIL"
        assert verdicts[f"{family}.float64"] == verdicts[f"{family}.float32"] == "pass"


def test_a_crash_in_one_special_case_leaves_the_others_judged():
    class GeometricCrash(targets.ReferenceTarget):
        def aggregate(self, grads, *, rule, **options):
            if rule == "geometric_mean":
                raise RuntimeError("boom")
            return super().aggregate(grads, rule=rule, **options)

    (res,) = runner.run_suite(GeometricCrash(), checks=["agg.special.k1"])
    assert res.verdict == "FAIL" and res.compared > 0
    failed = res.counterexample["failed_cases"]
    assert failed and all("geometric_mean" in f["case"] and "boom" in f["error"] for f in failed)


class _SandRescaledOnly(targets.ReferenceTarget):
    """Like DomainBed's SANDMask: one option pair (rescaled, k = 10)."""

    def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
        if rule != "sand_mask" or not rescale or k != 10.0:
            raise NotImplementedError("rescaled sand_mask with k = 10 only")
        return super().aggregate(grads, rule=rule, tau=tau, rescale=rescale, k=k)


@pytest.mark.slow
@pytest.mark.parametrize("n", [10, 30, 60])
def test_properties_draw_only_supported_options(n):
    res = runner.run_suite(_SandRescaledOnly(), checks=["agg.prop.permutation.sand_mask.float64",
                                                        "agg.prop.sign_flip.sand_mask.float64"], max_examples=n)
    assert [r.verdict for r in res] == ["pass", "pass"], [r.message for r in res]
    assert all(r.compared > 10 for r in res)


RECORDER = textwrap.dedent('''\
    import hashlib, os
    import numpy as np
    from hardtovary.conformance.targets import reference


    class Recorder:
        def aggregate(self, grads, **options):
            h = hashlib.sha1(repr(sorted((k, v) for k, v in options.items())).encode())
            for g in grads:
                h.update(np.ascontiguousarray(g).tobytes() + str(g.shape).encode())
            with open(os.environ["RECORD"], "a") as f:
                f.write(h.hexdigest() + "\\n")
            return reference.aggregate(grads, **options)


    target = Recorder()
''')
DRAWN = "agg.oracle.sand_mask.rescaled.float32,agg.prop.sign_flip.and_mask.float64"


@pytest.mark.slow
def test_the_same_settings_draw_the_same_inputs_by_every_route(tmp_path):
    (tmp_path / "recorder.py").write_text(RECORDER)
    (tmp_path / "local_constants.py").write_text("VALUES = [2, 3, 5, 7, 11, 13, 0.123, 1e-07, 4.5, 9, 15, 16]\n")
    routes = {
        "cli": [str(BIN / "hardtovary"), "conformance", "--target", "recorder:target", "--checks", DRAWN,
                "--max-examples", "12"],
        "run_suite": [sys.executable, "-c", "import local_constants; from hardtovary.conformance import runner, "
                      f"targets; runner.run_suite(targets.load_target('recorder:target'), checks={DRAWN.split(',')!r}, "
                      "max_examples=12)"],
        "pytest": [str(BIN / "pytest"), "-q", "-p", "hardtovary.conformance.pytest_plugin", "-p", "no:cacheprovider",
                   "--conformance-target", "recorder:target", "--conformance-checks", DRAWN,
                   "--conformance-max-examples", "12"],
    }
    records = {}
    for name, args in routes.items():
        record = tmp_path / f"{name}.txt"
        env = _env()
        env["RECORD"] = str(record)
        proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert proc.returncode == 0, name + proc.stdout + proc.stderr
        records[name] = record.read_text().split()
    assert len(records["cli"]) > 20
    assert records["cli"] == records["run_suite"] == records["pytest"]


def test_draws_do_not_depend_on_the_modules_loaded(tmp_path, monkeypatch):
    seen = []

    class Recorder(targets.ReferenceTarget):
        def aggregate(self, grads, **options):
            seen.append(tuple(np.asarray(g).tobytes() for g in grads))
            return super().aggregate(grads, **options)

    def draws():
        seen.clear()
        runner.run_suite(Recorder(), checks=["agg.oracle.and_mask.plain.float64"], max_examples=25, shrink=False)
        return list(seen)

    before = draws()
    (tmp_path / "many_constants.py").write_text(
        "TABLE = [" + ", ".join(str(v) for v in list(range(1, 40)) + [0.5 + i / 7 for i in range(40)]) + "]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("many_constants")
    assert draws() == before


# ----------------------------------------------------------------------------------------------------------------
# the suite's surface: expected failures, check ids, report paths
# ----------------------------------------------------------------------------------------------------------------


def test_xfail_and_xpass(tmp_path):
    f = tmp_path / "xf.txt"
    f.write_text("# known\nspirals.*   radius noise first\nagg.special.k1  declared but passes\n")
    entries = xfails.load(f)
    res = runner.run_suite(mutants.spirals_noise_first, checks=["spirals", "agg.special.k1"], xfails=entries)
    verdicts = {r.check_id: r.verdict for r in res}
    assert verdicts == {"spirals.bit_identical": "xfail", "agg.special.k1": "xpass"}
    assert runner.exit_status(res) == 0
    assert "xfail" in report.table(res)


def test_an_expected_failure_names_every_dtype_of_a_prefix():
    res = runner.run_suite(mutants.sum_not_mean, checks=["agg.oracle.mean.plain"],
                           xfails={"agg.oracle.mean.plain": "sums"}, max_examples=3, shrink=False)
    assert {r.verdict for r in res} == {"xfail"} and len(res) == 3


def test_xfail_format_errors(tmp_path, capsys):
    with pytest.raises(xfails.XfailFormatError):
        xfails.parse("agg.special.k1\n")
    with pytest.raises(xfails.XfailFormatError, match=r"xf:2: unknown check id.*'agg.special.kl'.*agg.special.k1"):
        xfails.parse("agg.special.k1  fine\nagg.special.kl  typo\n", "xf")
    with pytest.raises(checks.UnknownCheck):
        runner.run_suite(targets.reference, checks=["spirals"], xfails={"no.such.check": "x"})
    f = tmp_path / "xf.txt"
    f.write_text("agg.specail.k1  typo\n")
    assert cli.main(["--xfails", str(f)]) == 2
    assert "unknown check id" in capsys.readouterr().err


def test_usage_errors_are_one_plain_line(capsys):
    assert cli.main(["--target", "no.such.module:x"]) == 2
    assert cli.main(["--checks", "agg.special.kl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hardtovary conformance: error: unknown check id") and "KeyError" not in err
    assert not err.split("error: ", 1)[1].startswith(("'", '"')) and "did you mean agg.special.k1" in err
    assert cli.main(["--list"]) == 0


def test_a_report_path_that_cannot_be_written_fails_before_the_run(tmp_path, capsys):
    assert cli.main(["--checks", "agg.special.k1", "--report", str(tmp_path / "missing" / "r.json")]) == 2
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and "conformance of" not in captured.out
    assert cli.main(["--checks", "agg.special.k1", "--report", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# earlier behaviour kept
# ----------------------------------------------------------------------------------------------------------------


def test_cli_reference_passes(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["--checks", "agg.special,spirals", "--report", str(out), "--max-examples", "5"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["exit_status"] == 0 and data["summary"]["FAIL"] == 0 and data["checks_compared"] == 13
    assert "agg.special.k1" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_mutant_fails_with_shrunk_counterexample(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["--target", "hardtovary.conformance.mutants:sign0_plus", "--checks",
                   "agg.oracle.and_mask.plain.float64", "--report", str(out), "--max-examples", "30"])
    assert rc == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "p=" in text and "oracle=" in text
    res = json.loads(out.read_text())["results"][0]
    off = res["counterexample"]["offending"][0]
    assert off["z"] >= 1 and "K" in res["counterexample"] and "tau" in res["counterexample"]
    # the shrunk example's labelled draws, in the JSON and the terminal
    assert {"K", "tau", "n_tensors", "grads[0]"} <= set(res["counterexample"]["draws"])
    assert f"drawn: K={res['counterexample']['draws']['K']}, tau=" in text


class _Partial:
    """Only aggregate; and_mask unsupported."""

    def aggregate(self, grads, *, rule, tau, rescale, flavour=None, k=None):
        if rule != "mean":
            raise NotImplementedError(rule)
        return [np.asarray(g, dtype=np.float64).mean(0) for g in grads]


def test_skip_and_unsupported():
    res = runner.run_suite(_Partial(), checks=["agg.oracle.mean.plain.float64", "agg.oracle.and_mask.plain.float64",
                                               "spirals"], max_examples=5)
    verdicts = {r.check_id: r.verdict for r in res}
    assert verdicts == {"agg.oracle.mean.plain.float64": "pass", "agg.oracle.and_mask.plain.float64": "unsupported",
                        "spirals.bit_identical": "skip"}
    assert "no `spirals`" in res[-1].message


def test_float_noise_ties_reported_not_failed():
    res = runner.run_suite(mutants.float32_agreement, checks=["agg.ties.float_noise"])
    assert {r.verdict for r in res} == {"pass"}
    assert any("tie divergence" in d for r in res for d in r.divergences)


def test_load_target_and_protocol():
    for name in ("aggregate", "env_gradients", "step(", "steps(", "temporal", "spirals", "ValueError",
                 "FloatingPointError"):
        assert name in targets.PROTOCOL
    assert targets.REFUSALS == (ValueError, FloatingPointError)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_strategies_steer_ties(data):
    K = data.draw(S.env_counts(), label="K")
    tau = data.draw(S.taus(K), label="tau")
    dtype = data.draw(S.float_dtypes(), label="dtype")
    G = data.draw(S.gradient_stack(K, (6,), dtype, tau, mode="ties"), label="G")
    assert G.dtype == np.dtype(dtype) and G.shape == (K, 6) and np.all(np.isfinite(G))
    absS = np.abs(np.sign(G.astype(np.float64)).sum(0))
    T = S.threshold(tau, K)
    assert np.all(np.abs(absS - T) <= 1) or T > K - 1  # at the tie, up to parity


@pytest.mark.slow
def test_pytest_plugin_reports_failure(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_ok():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "hardtovary.conformance.pytest_plugin",
                           "-p", "no:cacheprovider", "--conformance-target",
                           "hardtovary.conformance.mutants:count_form", "--conformance-checks",
                           "agg.special.exact_zeros,spirals", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, env=_env())
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 2 passed" in proc.stdout
    assert "conformance[agg.special.exact_zeros]" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# tolerances are pinned, and a small error is caught
# ----------------------------------------------------------------------------------------------------------------


def test_tolerances_are_torch_testing_defaults():
    """torch.testing.assert_close's documented defaults (rtol, atol) per dtype; loosening one is a change of the
    suite's verdicts and must show up here."""
    assert tolerances.DEFAULTS == {"float16": (1e-3, 1e-5), "bfloat16": (1.6e-2, 1e-5),
                                   "float32": (1.3e-6, 1e-5), "float64": (1e-7, 1e-7)}


def test_an_error_of_1e_5_relative_is_caught_in_float64_and_would_not_be_under_a_loose_tolerance(monkeypatch):
    check = "agg.oracle.and_mask.rescaled.float64"
    (res,) = runner.run_suite(mutants.rescale_smoothed, checks=[check], max_examples=5, shrink=False)
    assert res.verdict == "FAIL"
    monkeypatch.setitem(tolerances.DEFAULTS, "float64", (1e-4, 1e-4))
    (res,) = runner.run_suite(mutants.rescale_smoothed, checks=[check], max_examples=5, shrink=False)
    assert res.verdict == "pass"  # the mutant sits between the pinned tolerance and a 1000x looser one


def test_float16_tolerance_admits_correct_rounding_of_subnormals_only():
    """Below float16's smallest normal number rounding is absolute: a mean of exactly 17.5 subnormal steps
    rounds to 18 steps, 2.9% off and still right; 19 steps is wrong."""
    tol = tolerances.for_dtype("float16")
    step = 2.0**-24
    oracle, scale = 17.5 * step, 18 * step
    rounded = float(np.float16(oracle))
    assert rounded == 18 * step
    assert abs(rounded - oracle) <= tol.bound(oracle, scale, K=2)
    assert abs(19 * step - oracle) > tol.bound(oracle, scale, K=2)
    assert tolerances.for_dtype("float64").bound(0.0, 0.0) == 0.0


class _Float32Only:
    """The oracle, for float32 stacks only (float64 is refused as unsupported)."""

    def aggregate(self, grads, **options):
        if any(np.asarray(g).dtype != np.float32 for g in grads):
            raise NotImplementedError("float32 only")
        return targets.reference.aggregate(grads, **options)


def test_a_dtype_the_target_refuses_is_unsupported_and_the_others_judged():
    res = runner.run_suite(_Float32Only(), checks=["agg.oracle.and_mask.rescaled"], max_examples=10)
    verdicts = {r.check_id: r.verdict for r in res}
    assert verdicts == {"agg.oracle.and_mask.rescaled.float64": "unsupported",
                        "agg.oracle.and_mask.rescaled.float32": "pass",
                        "agg.oracle.and_mask.rescaled.float16": "unsupported"}


def test_the_sign_of_a_cancelling_mean_is_reported_not_failed():
    """[0.5, 1e-300, -0.5, 2^-7, -2^-7]: the exact mean is positive, a float sum in this order gives 0. A target
    taking the sign of its float sum is excused there (the sign is below the sum's rounding error) and the divergence
    is reported; the same sign error where the mean is clearly nonzero fails, and the magnitude is still judged."""
    G = np.array([[0.5], [1e-300], [-0.5], [2.0**-7], [-(2.0**-7)]])
    options = {"rule": "geometric_mean", "tau": 0.0, "rescale": False, "flavour": "original"}
    oracle = targets.reference.aggregate([G], **options)[0]
    assert oracle[0] > 1e-4 and np.sign(G.sum(0))[0] == 0.0
    with judging.tallying() as tally:
        compare.compare_aggregate([G], [np.zeros(1)], **options)
        compare.compare_aggregate([G], [-oracle], **options)
    assert len(tally.divergences) == 2 and "sign of a cancelling mean" in tally.divergences[0]
    clear = np.array([[1.0], [2.0], [3.0], [-1.0], [0.5]])
    value = targets.reference.aggregate([clear], **options)[0]
    with pytest.raises(judging.Mismatch):
        compare.compare_aggregate([clear], [-value], **options)
    with pytest.raises(judging.Mismatch):
        compare.compare_aggregate([G], [2 * oracle], **options)


def _always_rescaled(base):
    """``base`` as an implementation that always rescales (as DomainBed's): plain calls are unsupported."""

    class AlwaysRescaled(type(base)):
        def aggregate(self, grads, *, rescale, **options):
            if not rescale:
                raise NotImplementedError("always rescales")
            return super().aggregate(grads, rescale=rescale, **options)

    return AlwaysRescaled()


def test_an_implementation_that_always_rescales_is_judged_on_float_noise_ties_and_the_keep_rate():
    checks_ = ["agg.ties.float_noise.float64", "agg.prop.keep_rate"]
    res = runner.run_suite(_always_rescaled(targets.reference), checks=checks_)
    assert [(r.verdict, r.compared > 0) for r in res] == [("pass", True)] * 2
    (noise, _) = runner.run_suite(_always_rescaled(mutants.float32_agreement), checks=checks_)
    assert noise.verdict == "pass" and any("tie divergence" in d for d in noise.divergences)
    (noise, _) = runner.run_suite(_always_rescaled(mutants.rescale_never), checks=checks_)
    assert noise.verdict == "FAIL"  # rescaled output judged with the factor of the tie as the target decides it
