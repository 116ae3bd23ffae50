"""CoinRun TPE search (paper App. B.6, Table 3): the space, the budget in COMPLETE trials, failed and diverged
trials, resuming after a kill (a trial left RUNNING) and after Ctrl-C, the listing and the stage end to end."""

import importlib.util
import json

import pytest

torch = pytest.importorskip("torch")
optuna = pytest.importorskip("optuna")

from optuna.trial import FixedTrial, TrialState

from hardtovary.experiments import cli
from hardtovary.experiments.coinrun import cloning, figures, labels, search
from hardtovary.experiments.errors import UsageError

TINY = dict(epochs=2, batch_size=4, width=1 / 16)
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY_ARGS = ["--epochs", "2", "--batch-size", "4", "--width", "0.0625", "--no-progress"]
#: Table 3 (paper App. B.6): the best and_mask runs (test KL, lr, beta1, beta3, tau, weight decay).
TABLE3 = [(1.652e-2, 0.0078, 0.21, 0.79, 0.36, 0.057), (1.656e-2, 0.0072, 0.26, 0.86, 0.40, 0.041),
          (1.662e-2, 0.0080, 0.23, 0.84, 0.41, 0.045), (1.665e-2, 0.0068, 0.33, 0.72, 0.47, 0.077),
          (1.672e-2, 0.0063, 0.67, 0.65, 0.47, 0.080)]


@pytest.fixture
def label_folder(tmp_path):
    return labels.write_random_labels(tmp_path / "labels", train_levels=[3, 5], test_levels=[100, 101, 102],
                                      states=5, test_states=1, seed=2)


def _studies(out, methods=cloning.METHODS):
    storage = f"sqlite:///{out / search.STORAGE_FILE}"
    return {m: optuna.load_study(study_name=search.study_name(m), storage=storage) for m in methods}


def _states(study):
    return sorted(t.state.name for t in study.get_trials(deepcopy=False))


def test_space_contains_table3_and_suggest_gives_each_method_its_hyperparameters():
    for _, *values in TABLE3:
        for name, value in zip(("lr", "beta1", "beta3", "tau", "weight_decay"), values):
            assert search.SPACE[name].low <= value <= search.SPACE[name].high, name
    fixed = {"lr": 0.005, "beta1": 0.5, "beta3": 0.8, "tau": 0.4, "weight_decay_on": True, "weight_decay": 0.01}
    assert search.suggest(FixedTrial(fixed), "and_mask") == {k: v for k, v in fixed.items() if k != "weight_decay_on"}
    assert search.suggest(FixedTrial({**fixed, "weight_decay_on": False}), "adam") == dict(lr=0.005, beta1=0.5,
                                                                                          weight_decay=0.0)
    for method in cloning.METHODS:  # every draw makes a valid configuration
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(20):
            cloning.method_config(method, **search.suggest(study.ask(), method))


def _fake_train_run(calls, diverge=()):
    """A stand-in for cloning.train_run: no training, a history whose test KL is the learning rate, recorded in
    ``calls``; the calls whose index is in ``diverge`` raise Diverged."""

    def train_run(folder, data, config, **kwargs):
        calls.append(config)
        if len(calls) - 1 in diverge:
            raise cloning.Diverged("diverged in epoch 1")
        history = [{"epoch": e + 1, "test_kl": config.lr * (2 - e), "train_kl": config.lr} for e in range(2)]
        return {"config": config.to_dict(), "history": history, "seconds": 0.0, "min_test_kl": config.lr}

    return train_run


@pytest.mark.slow
def test_budget_counts_complete_trials_and_diverged_ones_fail(tmp_path, label_folder, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cloning, "train_run", _fake_train_run(calls, diverge={1}))
    out = tmp_path / "s"
    results = search.run(out, label_folder, methods=("adam",), trials=3, top=2, progress=False, **TINY)
    assert len(calls) == 4 and results["methods"]["adam"]["complete"] == 3
    assert results["methods"]["adam"]["failed"] == 1
    assert _states(_studies(out, ["adam"])["adam"]) == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    trials = results["methods"]["adam"]["trials"]
    assert [t["min_test_kl"] for t in trials] == [t["config"]["lr"] for t in trials]
    best = sorted(trials, key=lambda t: t["min_test_kl"])[:2]
    assert results["methods"]["adam"]["best"] == [t["number"] for t in best]
    table = (out / search.TABLE_FILE).read_text().splitlines()
    assert len(table) == 3 and table[1].split()[1] == str(best[0]["number"]) and table[1].split()[5:7] == ["-", "-"]
    assert "runtime" in json.loads((out / "results.json").read_text())
    assert "adam trial 1: diverged in epoch 1; recorded as failed" in capsys.readouterr().err
    # the same budget again trains nothing; a larger one trains only the difference, at a point not drawn before
    search.run(out, label_folder, methods=("adam",), trials=3, progress=False, **TINY)
    assert len(calls) == 4
    search.run(out, label_folder, methods=("adam",), trials=4, progress=False, **TINY)
    assert len(calls) == 5 and calls[-1] not in calls[:-1]
    # the same search started afresh elsewhere draws the same points
    again = []
    monkeypatch.setattr(cloning, "train_run", _fake_train_run(again, diverge={1}))
    search.run(tmp_path / "again", label_folder, methods=("adam",), trials=3, progress=False, **TINY)
    assert again == calls[:4]


def test_a_round_where_every_trial_diverges_is_an_error(tmp_path, label_folder, monkeypatch):
    monkeypatch.setattr(cloning, "train_run", _fake_train_run([], diverge=set(range(10))))
    with pytest.raises(UsageError, match="no and_mask trial of the last 2 completed"):
        search.run(tmp_path / "s", label_folder, methods=("and_mask",), trials=2, progress=False, **TINY)


class Killed(BaseException):
    """A kill the process does not survive: optuna neither catches it nor records the trial's end."""


@pytest.mark.slow
def test_search_resumes_after_a_kill_and_the_requeued_trial_resumes_its_run(tmp_path, label_folder, monkeypatch):
    out, real, epochs = tmp_path / "s", cloning.train_run, []

    def killed_in_trial_2(folder, data, config, **kwargs):
        def on_epoch(record):
            epochs.append((config.key(), record["epoch"]))
            if len(epochs) == 3:  # trial 2 of adam, after its first epoch's checkpoint
                raise Killed

        return real(folder, data, config, **{**kwargs, "on_epoch": on_epoch})

    monkeypatch.setattr(cloning, "train_run", killed_in_trial_2)
    with pytest.raises(Killed):
        search.run(out, label_folder, trials=2, progress=False, **TINY)
    adam = _studies(out)["adam"]
    assert _states(adam) == ["COMPLETE", "RUNNING"]
    killed = adam.get_trials(states=(TrialState.RUNNING,))[0]

    search.run(out, label_folder, trials=2, progress=False, **TINY)
    studies = _studies(out)
    assert _states(studies["adam"]) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert _states(studies["and_mask"]) == ["COMPLETE", "COMPLETE"]
    requeued = studies["adam"].trials[-1]
    assert requeued.params == killed.params and requeued.user_attrs["run"] == killed.user_attrs["run"]
    assert epochs[3] == (killed.user_attrs["run"], 2)  # resumed at epoch 2 from the checkpoint
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["adam"]["complete"] == 2 and results["methods"]["adam"]["failed"] == 1
    assert [len(t["history"]) for m in cloning.METHODS for t in results["methods"][m]["trials"]] == [2] * 4


@pytest.mark.slow
def test_search_stage_end_to_end_with_ctrl_c(tmp_path, label_folder, monkeypatch, capsys):
    out, real, calls = tmp_path / "s", cloning.train_run, []

    def interrupted_once(folder, data, config, **kwargs):
        calls.append(config.key())
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(folder, data, config, **kwargs)

    monkeypatch.setattr(cloning, "train_run", interrupted_once)
    args = ["coinrun", "search", "--labels", str(label_folder), "--out", str(out), "--trials", "2", "--top", "1",
            *TINY_ARGS]
    assert cli.main(args) == 130
    assert cli.main(args) == 0
    assert calls[2] == calls[1]  # the interrupted trial's parameters came back first
    printed = capsys.readouterr().out
    assert "test KL" in printed and "weight decay" in printed
    results = json.loads((out / "results.json").read_text())
    assert {m: (r["complete"], r["failed"], len(r["best"])) for m, r in results["methods"].items()} == {
        "adam": (2, 1, 1), "and_mask": (2, 0, 1)}
    for name in figures.FIGURES.values():  # the figures are optional ('hardtovary[plot]')
        assert (out / name).exists() == HAVE_MATPLOTLIB


def test_search_stage_bad_input_is_a_one_line_error(tmp_path, label_folder, capsys):
    base = ["coinrun", "search", "--out", str(tmp_path / "s"), "--trials", "1", *TINY_ARGS]
    for extra, message in ((["--labels", str(tmp_path / "none")], "is not a CoinRun label folder"),
                           (["--labels", str(label_folder), "--seed", "-1"], "seed must lie in [0, inf]"),
                           (["--labels", str(label_folder), "--batch-size", "1"], "batch_size must be >= 2")):
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "s").exists()
    with pytest.raises(SystemExit):
        cli.main(["coinrun", "search", "--labels", str(label_folder), "--out", str(tmp_path / "s"), "--trials", "0"])
