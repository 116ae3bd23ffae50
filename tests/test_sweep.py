"""Batched sweeps (hardtovary.accel.sweep) against the reference training loop, and the commands built on them."""

import dataclasses
import json
import re

import numpy as np
import pytest

from hardtovary.accel.backend import cupy_status
from hardtovary.accel.sweep import SweepResult, train_sweep
from hardtovary.experiments import cli
from hardtovary.reference import data, training
from hardtovary.reference.training import EARLY_ABORT_TEST_ACC, EARLY_ABORT_TRAIN_ACC

CUPY_OK, CUPY_REASON = cupy_status()
HISTORY_KEYS = {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "kept_fraction"}


@pytest.fixture(scope="module")
def env():
    task = data.make_spirals_task(data.SpiralsConfig(n_train_envs=4, examples_per_env=48, n_test=60, n_dims=4))
    return training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)


BASE = training.TrainConfig(hidden=(12, 8), batch_size=8, n_agreement_envs=4, epochs=3, lr_milestones=(2,))


def mixed_configs():
    """Mixed rules, taus, rescaling, optimizers, learning rates, weight decay orders, L1, epochs and seeds; two
    architectures / batch layouts, so that grouping is exercised too."""
    r = dataclasses.replace
    return [
        r(BASE, method="mean", tau=0.0, seed=11),
        r(BASE, method="and_mask", tau=1.0, rescale=True, optimizer="sgd", lr=0.1, seed=12),
        r(BASE, method="and_mask", tau=0.5, weight_decay_order="after", l1=1e-3, seed=13),
        r(BASE, method="geometric_mean", optimizer="sgd", momentum=0.0, weight_decay=0.0, seed=14),
        r(BASE, method="sand_mask", tau=0.5, rescale=True, lr=3e-2, weight_decay=0.0, l1=1e-4, seed=15),
        r(BASE, method="geometric_mean", flavour="original", tau=0.5, epochs=2, seed=16),
        r(BASE, method="and_mask", tau=0.75, optimizer="sgd", weight_decay_order="after", lr=0.05, seed=17,
          lr_milestones=(1, 2)),
        r(BASE, method="and_mask", tau=1.0, n_agreement_envs=2, batch_size=16, seed=18),     # another layout
        r(BASE, method="mean", tau=0.0, hidden=(6,), activation="tanh", seed=19),           # another architecture
    ]


def assert_same_run(result, reference, atol=1e-10):
    assert len(result.params) == len(reference.params)
    for a, b in zip(result.params, reference.params):
        assert a.shape == b.shape and a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    assert len(result.history) == len(reference.history)
    for x, y in zip(result.history, reference.history):
        assert set(x) == HISTORY_KEYS
        for key in HISTORY_KEYS:
            assert x[key] == pytest.approx(y[key], abs=atol), key


@pytest.mark.parametrize("backend, atol", [
    ("numpy", 1e-10),
    # float64 on the GPU: cuBLAS sums in another order, so agreement is to accumulated rounding, not bits
    pytest.param("cupy", 1e-8, marks=pytest.mark.skipif(not CUPY_OK, reason=CUPY_REASON)),
])
def test_a_sweep_equals_separate_reference_runs(env, backend, atol):
    configs = mixed_configs()
    results = train_sweep(env, configs, backend=backend)
    assert len(results) == len(configs)
    for config, result in zip(configs, results):
        assert isinstance(result, SweepResult) and result.stopped == "completed"
        assert_same_run(result, training.train(env, config), atol=atol)


def test_runs_are_independent(env):
    configs = mixed_configs()[:5]
    before = train_sweep(env, configs, backend="numpy")
    changed = list(configs)
    changed[1] = dataclasses.replace(configs[1], lr=0.3, seed=99, method="mean", tau=0.0, rescale=False)
    after = train_sweep(env, changed, backend="numpy")
    for i in (0, 2, 3, 4):
        assert_same_run(after[i], before[i], atol=1e-13)
    assert not np.allclose(after[1].params[0], before[1].params[0])
    # and a run alone in its sweep is the same run
    alone = train_sweep(env, [configs[3]], backend="numpy")[0]
    assert_same_run(alone, before[3], atol=1e-13)


def test_early_abort_flags_and_stops_a_run(env):
    shortcut = dataclasses.replace(BASE, method="mean", tau=0.0, lr=3e-2, epochs=12, lr_milestones=(), seed=3)
    reference = training.train(env, shortcut)
    hits = [r["train_acc"] > EARLY_ABORT_TRAIN_ACC and r["test_acc"] < EARLY_ABORT_TEST_ACC
            for r in reference.history]
    assert any(hits), "the fixture must make averaging fit the shortcuts"
    stop = hits.index(True) + 1
    assert stop < shortcut.epochs
    slow = dataclasses.replace(BASE, method="and_mask", tau=1.0, lr=1e-4, epochs=4, seed=4)   # never aborts
    aborted, kept = train_sweep(env, [shortcut, slow], backend="numpy", early_abort=True)
    assert aborted.stopped == "early_abort" and len(aborted.history) == stop
    assert_same_run(aborted, training.train(env, dataclasses.replace(shortcut, epochs=stop)))
    assert kept.stopped == "completed"
    assert_same_run(kept, training.train(env, slow))
    full = train_sweep(env, [shortcut], backend="numpy")[0]
    assert full.stopped == "completed" and len(full.history) == shortcut.epochs


def test_a_diverging_run_is_flagged_and_the_others_go_on(env):
    good = dataclasses.replace(BASE, method="and_mask", seed=5)
    bad = dataclasses.replace(BASE, method="mean", tau=0.0, optimizer="sgd", lr=1e300, seed=6)
    with pytest.raises(ValueError), np.errstate(all="ignore"):
        training.train(env, bad)                      # the reference refuses to go on
    results = train_sweep(env, [good, bad], backend="numpy")
    assert results[1].stopped == "diverged"
    assert all(np.all(np.isfinite(p)) for p in results[1].params)
    assert all(np.isfinite(v) for r in results[1].history for v in r.values())
    assert_same_run(results[0], training.train(env, good))


def test_float32_is_close_and_callbacks_report_every_epoch(env):
    # (not the tau = 1 rescaled SGD run: a mask flip at float32 rounding, amplified by rescaling, is chaotic)
    configs = [mixed_configs()[i] for i in (0, 2, 3)]
    seen, steps = [], []
    results = train_sweep(env, configs, backend="numpy", dtype="float32",
                          on_epoch=lambda i, record: seen.append((i, record["epoch"])), on_step=steps.append)
    assert sorted(seen) == [(i, e) for i in range(3) for e in (1, 2, 3)]
    assert sum(steps) == 3 * 3 * training.steps_per_epoch(4, 48, BASE)
    for config, result in zip(configs, results):
        ref = training.train(env, config)
        assert result.final["train_loss"] == pytest.approx(ref.final["train_loss"], abs=1e-4)
        assert result.final["test_loss"] == pytest.approx(ref.final["test_loss"], abs=1e-4)
        for a, b in zip(result.params, ref.params):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_runs_are_aggregated_together_when_their_rule_specs_are_equal():
    """The rule groups of a batch are keyed by TrainConfig.rule_spec: options a rule ignores or fills in by default
    (mean's tau, the paper flavour, k = 10) do not split a group."""
    from hardtovary.accel.sweep import _RuleGroups
    from hardtovary.reference.rules import RuleSpec

    r = dataclasses.replace
    configs = [r(BASE, method="mean", tau=0.3), r(BASE, method="mean", tau=0.9, rescale=True),
               r(BASE, method="geometric_mean", tau=1.0), r(BASE, method="geometric_mean", flavour="paper"),
               r(BASE, method="geometric_mean", flavour="original", tau=1.0),
               r(BASE, method="sand_mask", tau=0.5), r(BASE, method="sand_mask", tau=0.5, sand_k=10.0),
               r(BASE, method="and_mask", tau=0.5), r(BASE, method="and_mask", tau=0.5, rescale=True)]
    groups = _RuleGroups(configs)
    assert {spec: idx.tolist() for idx, spec in groups.groups} == {
        RuleSpec("mean"): [0, 1], RuleSpec("geometric_mean", 1.0, "paper"): [2, 3],
        RuleSpec("geometric_mean", 1.0, "original"): [4], RuleSpec("sand_mask", 0.5, None, 10.0): [5, 6],
        RuleSpec("and_mask", 0.5): [7, 8]}
    assert groups.rescale.tolist() == [False, True, False, False, False, False, False, False, True]


def test_bad_input_is_refused(env):
    with pytest.raises(ValueError, match="batch_norm"):
        train_sweep(env, [dataclasses.replace(BASE, batch_norm=True)], backend="numpy")
    with pytest.raises(ValueError, match="dtype"):
        train_sweep(env, [BASE], backend="numpy", dtype="float16")
    with pytest.raises(ValueError, match="configs"):
        train_sweep(env, [], backend="numpy")
    with pytest.raises(ValueError, match="batch_size"):
        train_sweep(env, [dataclasses.replace(BASE, batch_size=100)], backend="numpy")


# ------------------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------------------

TINY = ["--n-envs", "4", "--examples-per-env", "16", "--n-test", "40", "--n-dims", "3", "--no-progress"]


def run_cli(*args):
    return cli.main([str(a) for a in args])


def test_synthetic_accel_backend_matches_reference(tmp_path, capsys):
    options = [*TINY, "--hidden", "8,8", "--batch-size", "8", "--epochs", "3",
               "--methods", "mean,and_mask,geometric_mean,sand_mask"]
    assert run_cli("synthetic", "--out", tmp_path / "ref", *options) == 0
    assert run_cli("synthetic", "--out", tmp_path / "acc", "--implementation", "accel", "--backend", "numpy",
                   *options) == 0
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    acc = json.loads((tmp_path / "acc" / "results.json").read_text())
    assert list(acc["methods"]) == list(ref["methods"]) == ["mean", "and_mask", "geometric_mean", "sand_mask"]
    assert acc["config"] == ref["config"]
    for name in ref["methods"]:
        assert acc["methods"][name]["implementation"] == "accel" and acc["methods"][name]["backend"] == "numpy"
        assert ref["methods"][name]["implementation"] == "reference"
        for x, y in zip(acc["methods"][name]["history"], ref["methods"][name]["history"]):
            for key in HISTORY_KEYS:
                assert x[key] == pytest.approx(y[key], abs=1e-10)
    assert (tmp_path / "acc" / "units" / "sand_mask.json").exists()
    assert "sand_mask" in capsys.readouterr().out


SWEEP = ["--budget", "5", "--top", "2", "--seeds", "2", "--epochs", "2", "--widths", "8",
         "--depths", "1,2", "--batch-sizes", "8", "--runs-per-batch", "2", *TINY]


def test_sweep_command_writes_a_table_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run_cli("sweep", "--out", out, *SWEEP) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert len(results["search"]) == 5 and len(results["best"]) == 2
    assert (out / "table.txt").read_text().strip() in printed
    for row in results["best"]:
        assert row["n_seeds"] == 2 and 0 <= row["test_acc_mean"] <= 1 and row["test_acc_std"] >= 0
        assert re.search(rf"^\s+{row['rank']} {row['method']}\s", printed, re.M), printed
    accs = sorted((r["test_acc"] for r in results["search"]), reverse=True)
    assert [r["search_test_acc"] for r in results["best"]] == accs[:2]        # best by o.o.d. test accuracy
    units = sorted(p.name for p in (out / "units").iterdir())
    assert any(u.startswith("search-") for u in units) and any(u.startswith("seeds-") for u in units)
    # a rerun skips finished batches: a marked unit is read back, not retrained
    first = out / "units" / "search-000.json"
    stored = json.loads(first.read_text())
    stored["marker"] = 1
    first.write_text(json.dumps(stored))
    assert run_cli("sweep", "--out", out, *SWEEP) == 0
    assert json.loads(first.read_text())["marker"] == 1
    assert json.loads((out / "results.json").read_text())["best"] == results["best"]
    capsys.readouterr()
    assert run_cli("sweep", "--out", out, *SWEEP, "--budget", "6") == 2            # other options: refused
    assert "different configuration" in capsys.readouterr().err


def test_sweep_matches_separate_reference_runs(tmp_path):
    from hardtovary.experiments import sweep

    small = data.SpiralsConfig(n_train_envs=4, examples_per_env=16, n_test=40, n_dims=3)
    space = sweep.SearchSpace(hidden_units=(8,), layers=(1,), batch_sizes=(8,), methods=sweep.METHODS)
    results = sweep.run(tmp_path / "s", space=space, data_config=small, budget=4, seeds=1, top=1, epochs=2,
                        early_abort=False, progress=False, backend="numpy")
    task = data.make_spirals_task(small)
    env_data = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    trials = sweep.sample_trials(space, 4, epochs=2, n_agreement_envs=4, seed=0)
    for record in results["search"]:
        ref = training.train(env_data, trials[record["trial"]])
        assert record["test_acc"] == pytest.approx(ref.final["test_acc"], abs=1e-12)
        assert record["train_loss"] == pytest.approx(ref.final["train_loss"], abs=1e-10)
    for t in trials:                      # L1 and L2 are never combined
        assert t.l1 == 0 or t.weight_decay == 0


@pytest.mark.parametrize("bad, message", [
    (["--budget", "0"], "positive integer"),
    (["--taus", "1.5"], "taus"),
    (["--methods", "median"], "--methods"),
    (["--budget", "2", "--top", "3"], "top"),
    (["--batch-sizes", "64"], "exceed"),
    (["--rescale", "maybe"], "yes/no"),
])
def test_sweep_refuses_bad_options(tmp_path, capsys, bad, message):
    try:
        code = run_cli("sweep", "--out", tmp_path / "x", *SWEEP, *bad)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_sweep_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        run_cli("sweep", "--help")
    text = capsys.readouterr().out
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["sweep"]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
    for word in ("Table 1", "resume", "--budget", "--seeds", "--top", "0.97"):
        assert word in text or word.lower() in text.lower()
    with pytest.raises(SystemExit):
        run_cli("synthetic", "--help")
    assert "--backend" in capsys.readouterr().out


def test_the_best_configurations_are_re_run_once_each():
    """A configuration drawn twice by the search (different trial seeds, same hyperparameters) is re-run once; the
    next distinct one takes its place (seen on a GPU: the top 3 of a 128-trial search were one configuration)."""
    from hardtovary.experiments import sweep as sweep_command

    r = dataclasses.replace
    trials = [r(BASE, lr=0.1, seed=0), r(BASE, lr=0.1, seed=1), r(BASE, lr=0.01, seed=2), r(BASE, lr=0.1, seed=3),
              r(BASE, lr=0.001, seed=4)]
    ranked = [{"trial": t} for t in (1, 0, 3, 2, 4)]
    assert [x["trial"] for x in sweep_command._distinct_best(ranked, trials, 2)] == [1, 2]
    assert [x["trial"] for x in sweep_command._distinct_best(ranked, trials, 3)] == [1, 2, 4]
    assert [x["trial"] for x in sweep_command._distinct_best(ranked[:3], trials, 3)] == [1]


def test_mean_std_is_the_sample_deviation():
    from hardtovary.experiments.stats import mean_std

    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5)
    assert std == pytest.approx(((0.3**2 + 0.1**2 + 0.4**2) / 2) ** 0.5)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_sweep_bar_reaches_its_total_fresh_and_resumed(tmp_path, monkeypatch, capsys, recording_bar):
    """A search that draws one configuration over and over re-runs it once (fewer than --top), and a resumed run
    reads every batch back: each round's bar (search, re-runs) ends at 100% in both."""
    from hardtovary.experiments import executors, sweep

    monkeypatch.setattr(executors, "tqdm", recording_bar)
    small = data.SpiralsConfig(n_train_envs=4, examples_per_env=16, n_test=40, n_dims=3)
    space = sweep.SearchSpace(hidden_units=(8,), layers=(1,), batch_sizes=(8,), optimizers=("adam",), lrs=(1e-2,),
                              l2=(0.0,), l1=(0.0,), taus=(1.0,), rescale=(True,), methods=("and_mask",))
    options = {"space": space, "data_config": small, "budget": 3, "seeds": 2, "top": 2, "epochs": 2,
               "runs_per_batch": 2, "progress": True, "backend": "numpy"}
    for attempt in ("fresh", "resumed"):
        recording_bar.made.clear()
        sweep.run(tmp_path / "s", **options)
        search, reruns = recording_bar.made
        # run-epochs: 3 trials, then 1 distinct configuration x 2 seeds, 2 epochs each
        assert search.total == (6 if attempt == "fresh" else 0) and reruns.total == (4 if attempt == "fresh" else 0)
        for bar in (search, reruns):
            assert bar.n == bar.total, (attempt, bar.n, bar.total)
    assert "resuming: 2 of 2 search batches reused" in capsys.readouterr().err
