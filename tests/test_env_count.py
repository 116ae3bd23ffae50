"""The env-count experiment (paper Fig. 15, App. B.4): tiny CLI runs, resumption, statistics, bad options."""

import json

import pytest

pytest.importorskip("torch")

from hardtovary.experiments import cli
from hardtovary.experiments import env_count as ec

TINY = ["--envs", "2,4", "--examples-per-env", "16", "--hidden", "8", "--epochs", "1", "--runs", "2",
        "--batch-size", "8", "--n-test", "32", "--no-progress"]


def test_cli_writes_table_json_and_resumes(tmp_path, capsys):
    out = tmp_path / "ec"
    assert cli.main(["env-count", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "erm" in printed and "and_mask" in printed
    table = (out / "table.txt").read_text()
    assert table.splitlines()[2].split()[0] == "2" and table.splitlines()[3].split()[0] == "4"
    results = json.loads((out / "results.json").read_text())
    assert set(results["envs"]) == {"2", "4"}
    units = sorted(p.name for p in (out / "units").glob("*.json"))
    assert len(units) == 2 * 2 * 2 and "envs00004-and_mask-run1.json" in units
    for n in ("2", "4"):
        for m in ("erm", "and_mask"):
            cell = results["envs"][n][m]
            assert len(cell["runs"]) == 2 and 0.0 <= cell["mean"] <= cell["best"] <= 1.0
            assert cell["examples_per_env"] == 16 and cell["n_agreement_envs"] == int(n)
    # Rerun: every unit is skipped (their files are untouched), the same results come back.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "units").glob("*.json")}
    assert cli.main(["env-count", "--out", str(out), *TINY]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "units").glob("*.json")} == stamps
    assert json.loads((out / "results.json").read_text())["envs"] == results["envs"]
    # A missing unit is recomputed, only that one.
    (out / "units" / "envs00002-erm-run0.json").unlink()
    capsys.readouterr()
    assert cli.main(["env-count", "--out", str(out), *TINY]) == 0
    assert (out / "units" / "envs00002-erm-run0.json").exists()
    assert f"resuming: 7 of 8 runs reused from {out}" in capsys.readouterr().err
    assert (out / "units" / "envs00004-erm-run0.json").stat().st_mtime_ns == stamps["envs00004-erm-run0.json"]
    # Other options into the same folder are refused.
    assert cli.main(["env-count", "--out", str(out), *TINY, "--lr", "0.5"]) == 2


def test_best_of_runs_is_the_max_of_per_run_maxima(tmp_path):
    results = ec.run(tmp_path / "ec", envs=(2,), methods=("erm",), runs=3, total_examples=32, progress=False,
                     data_config=ec.DEFAULT_DATA.__class__(n_train_envs=2, examples_per_env=16, n_test=32),
                     base=ec.DEFAULT_CONFIG.__class__(hidden=(8,), batch_size=8, epochs=2))
    cell = results["envs"]["2"]["erm"]
    per_run = []
    for r in range(3):
        unit = json.loads((tmp_path / "ec" / "units" / f"{ec.unit_name(2, 'erm', r)}.json").read_text())
        assert unit["max_test_acc"] == max(h["test_acc"] for h in unit["history"])
        per_run.append(unit["max_test_acc"])
    assert cell["runs"] == per_run and cell["best"] == max(per_run)
    assert cell["mean"] == pytest.approx(sum(per_run) / 3) and cell["examples_per_env"] == 16
    assert ec.summarise([0.5, 0.9, 0.7]) == {"best": 0.9, "mean": pytest.approx(0.7), "runs": [0.5, 0.9, 0.7]}


def test_agreement_envs_and_examples_per_env():
    assert [ec.agreement_envs(n) for n in (1, 2, 16, 64, 4096)] == [1, 2, 16, 16, 16]
    assert ec.agreement_envs(24) == 12 and ec.agreement_envs(17) == 1 and ec.agreement_envs(6) == 6
    assert ec.examples_per_env(64, 100, 4096) == 64 and ec.examples_per_env(64, 100, None) == 100
    with pytest.raises(ValueError):
        ec.examples_per_env(4096, 100, 4096)


@pytest.mark.parametrize("bad", [["--envs", "0"], ["--envs", "2,-4"], ["--envs", "x"], ["--runs", "0"],
                                 ["--methods", "nope"], ["--total-examples", "0"], ["--examples-per-env", "-3"]])
def test_bad_options_are_refused(bad, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["env-count", "--out", str(tmp_path / "ec"), *TINY, *bad])
    assert exc.value.code == 2


def test_non_power_envs_are_fine_and_too_little_data_is_refused(tmp_path, capsys):
    assert cli.main(["env-count", "--out", str(tmp_path / "a"), *TINY, "--envs", "3,6", "--runs", "1",
                     "--methods", "and_mask"]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["envs"]["6"]["and_mask"]["n_agreement_envs"] == 6
    assert cli.main(["env-count", "--out", str(tmp_path / "b"), *TINY, "--total-examples", "4"]) == 2
    assert "examples" in capsys.readouterr().err
    with pytest.raises(ValueError):
        ec.run(tmp_path / "c", envs=(2, 2), progress=False)


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["env-count", "--help"])
    text = capsys.readouterr().out
    for option in ("--envs", "--methods", "--runs", "--examples-per-env", "--total-examples",
                   "--max-agreement-envs", "--epochs", "--hidden", "--fresh", "--no-progress"):
        assert option in text


ACCEL = ["--implementation", "accel"]


def test_accel_runs_are_the_reference_loops_runs(tmp_path):
    """Each run of the batched implementation is the reference loop's run of the same method, preset and seed,
    with its configuration written out here by hand (not by the mapping under test): every option of the base
    configuration away from its default, so that one the mapping dropped would show, and tau set by the user."""
    from hardtovary.reference import data, training

    spirals = data.SpiralsConfig(n_train_envs=8, examples_per_env=16, n_test=32, n_dims=2, seed=3)
    base = ec.DEFAULT_CONFIG.__class__(hidden=(8, 8), batch_size=8, epochs=3, lr=0.05, lr_milestones=(2,), seed=5,
                                       optimizer="sgd", momentum=0.5, l1=1e-3, lr_gamma=0.5)
    task = data.make_spirals_task(data.SpiralsConfig(n_train_envs=8, examples_per_env=16, n_test=32, n_dims=2, seed=3))
    env_data = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    common = dict(hidden=(8, 8), batch_size=8, n_agreement_envs=4, epochs=3, lr=0.05, lr_milestones=(2,),
                  lr_gamma=0.5, weight_decay=1e-4, optimizer="sgd", momentum=0.5, l1=1e-3)
    cases = {  # run folder: (the user's overrides, {method: its rule as the reference loop takes it})
        "presets": (None, {"erm": dict(method="mean", tau=0.0, rescale=False),
                           "and_mask": dict(method="and_mask", tau=1.0, rescale=True),
                           "geometric_mean": dict(method="geometric_mean", tau=1.0, rescale=True, flavour="paper")}),
        "tau": ({"tau": 0.5}, {"and_mask": dict(method="and_mask", tau=0.5, rescale=True)}),
    }
    for folder, (overrides, rules) in cases.items():
        results = ec.run(tmp_path / folder, envs=(8,), methods=tuple(rules), runs=2, data_config=spirals, base=base,
                         max_agreement_envs=4, overrides=overrides, implementation="accel", backend="numpy",
                         progress=False)
        stored = json.loads((tmp_path / folder / "units" / "envs00008-batched.json").read_text())["runs"]
        for method, rule in rules.items():
            maxima = []
            for r in range(2):
                config = training.TrainConfig(**rule, **common, seed=5 + r)
                expected = training.train(env_data, config).history
                got = stored[ec.unit_name(8, method, r)]["history"]
                for key in ("train_loss", "test_loss", "train_acc", "test_acc", "lr"):
                    assert [h[key] for h in got] == pytest.approx([h[key] for h in expected], rel=1e-9, abs=1e-12)
                maxima.append(max(h["test_acc"] for h in expected))
            assert results["envs"]["8"][method]["runs"] == maxima
            assert results["envs"]["8"][method]["n_agreement_envs"] == 4


def test_accel_cli_resumes_and_names_one_unit_per_environment_count(tmp_path, capsys):
    out = tmp_path / "ec"
    assert cli.main(["env-count", "--out", str(out), *TINY, *ACCEL, "--dtype", "float32"]) == 0
    assert sorted(p.name for p in (out / "units").glob("*.json")) == ["envs00002-batched.json",
                                                                      "envs00004-batched.json"]
    unit = json.loads((out / "units" / "envs00002-batched.json").read_text())
    assert unit["dtype"] == "float32" and unit["backend"] == "numpy" and len(unit["runs"]) == 4
    assert json.loads((out / "config.json").read_text())["implementation"] == "accel"
    results = json.loads((out / "results.json").read_text())
    (out / "units" / "envs00004-batched.json").unlink()
    capsys.readouterr()
    assert cli.main(["env-count", "--out", str(out), *TINY, *ACCEL, "--dtype", "float32"]) == 0
    assert "resuming: 1 of 2 environment counts reused" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["envs"] == results["envs"]
    # The other precision, or the torch implementation, into the same folder is refused.
    assert cli.main(["env-count", "--out", str(out), *TINY, *ACCEL]) == 2
    assert cli.main(["env-count", "--out", str(out), *TINY]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--implementation", "accel", "--methods", "erm,irm"], "--implementation accel trains erm, and_mask, "
                                                            "geometric_mean; irm need --implementation torch"),
    (["--backend", "numpy"], "--backend and --dtype apply only with --implementation accel"),
    (["--dtype", "float32"], "--backend and --dtype apply only with --implementation accel"),
])
def test_accel_options_are_checked_against_each_other(tmp_path, capsys, argv, message):
    assert cli.main(["env-count", "--out", str(tmp_path / "ec"), *TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "ec").exists()


class _Recorder:
    """An executor elsewhere that runs the units in the order handed out, counting the steps each reports."""

    def __init__(self):
        self.order, self.reported, self.declared = [], {}, {}

    def run(self, units, on_step=None, on_epoch=None):
        for unit in units:
            self.order.append(unit.name)
            self.declared[unit.name] = unit.steps
            counted = []
            result = unit.function(*unit.args, on_step=counted.append, on_epoch=None, **unit.options)
            self.reported[unit.name] = sum(counted)
            yield unit, result


def test_accel_units_weigh_their_steps_and_the_largest_goes_first(tmp_path):
    from hardtovary.reference import data

    recorder = _Recorder()
    ec.run(tmp_path / "ec", envs=(2, 4, 8), methods=("erm", "and_mask"), runs=2, implementation="accel",
           data_config=data.SpiralsConfig(n_train_envs=2, examples_per_env=16, n_test=32),
           base=ec.DEFAULT_CONFIG.__class__(hidden=(8,), batch_size=8, epochs=2), max_agreement_envs=2,
           progress=False, executor=recorder)
    assert recorder.order == ["envs00008-batched", "envs00004-batched", "envs00002-batched"]
    # 4 runs x 2 epochs x (16 // 8 batches) x (n // 2 groups of environments) steps, each reported as it is made.
    assert recorder.declared == {f"envs{n:05d}-batched": 4 * 2 * 2 * (n // 2) for n in (2, 4, 8)}
    assert recorder.reported == recorder.declared
