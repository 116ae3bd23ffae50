"""Executors (experiments/executors.py): units skipped when the run folder holds them, results written by the
driver as they complete, worker deaths retried and unit errors not, and the same results whatever the executor
and the number of workers, through a real command; Ray for real, on a local cluster."""

import json
import os
from pathlib import Path

import pytest

from hardtovary.experiments import cli, executors
from hardtovary.experiments.executors import LocalExecutor, Unit, run_units
from hardtovary.experiments.runfolder import RunFolder


def square(x, *, on_step=None, on_epoch=None, offset=0):
    if on_step is not None:
        on_step()
    return {"value": x * x + offset, "pid": os.getpid()}


def dies_once(marker, x, *, on_step=None, on_epoch=None):
    """Kills its own process the first time it runs (as the OOM killer would), succeeds the next."""
    marker = Path(marker)
    if not marker.exists():
        marker.write_text("died")
        os._exit(1)
    return {"value": x}


def always_dies(*, on_step=None, on_epoch=None):
    os._exit(1)


def raises(*, on_step=None, on_epoch=None):
    raise ArithmeticError("a bug in the unit")


class Recording(RunFolder):
    """A run folder that records which process saved each unit."""

    def save(self, name, result):
        super().save(name, {**result, "saved_by": os.getpid()})


def _units(n=4):
    return [Unit(f"u{i}", square, (i,), label=f"unit {i}", options={"offset": 1}) for i in range(n)]


@pytest.mark.parametrize("workers", [1, 2])
def test_units_run_once_and_the_driver_writes_every_result(tmp_path, workers):
    folder = Recording(tmp_path, {"x": 1})
    results = run_units(folder, _units(), LocalExecutor(workers), progress=False)
    assert [r["value"] for r in results.values()] == [1, 2, 5, 10]
    assert list(results) == ["u0", "u1", "u2", "u3"]
    assert {r["saved_by"] for r in results.values()} == {os.getpid()}
    assert ({r["pid"] for r in results.values()} == {os.getpid()}) == (workers == 1)
    assert json.loads(folder.unit_path("u2").read_text())["value"] == 5


def test_finished_units_are_skipped(tmp_path, capsys):
    folder = RunFolder(tmp_path, {"x": 1})
    folder.save("u1", {"value": -7})
    results = run_units(folder, _units(), LocalExecutor(1), what="units", progress=False, where=tmp_path)
    assert results["u1"] == {"value": -7}
    assert "resuming: 1 of 4 units reused" in capsys.readouterr().err


def test_a_dead_worker_is_replaced_and_its_unit_run_again(tmp_path, capsys):
    folder = RunFolder(tmp_path / "run", {"x": 1})
    units = [Unit("dies", dies_once, (str(tmp_path / "marker"), 3)), *_units(2)]
    results = run_units(folder, units, LocalExecutor(2), progress=False)
    assert results["dies"] == {"value": 3} and results["u1"]["value"] == 2
    assert "running dies again (1 of 2)" in capsys.readouterr().err


def test_a_unit_whose_worker_always_dies_stops_the_run(tmp_path):
    folder = RunFolder(tmp_path, {"x": 1})
    with pytest.raises(RuntimeError, match="unit dead: its worker process died 3 times"):
        run_units(folder, [Unit("dead", always_dies)], LocalExecutor(2), progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_in_a_unit_is_not_retried_and_stops_the_run(tmp_path, workers):
    folder = RunFolder(tmp_path, {"x": 1})
    with pytest.raises(ArithmeticError, match="a bug in the unit"):
        run_units(folder, [Unit("bad", raises), *_units(1)], LocalExecutor(workers), progress=False)
    assert folder.finished("bad") is None


class InOrder:
    """An executor elsewhere (not this process) that runs the units in the order it is handed them."""

    def __init__(self):
        self.order = []

    def run(self, units, on_step=None, on_epoch=None):
        for unit in units:
            self.order.append(unit.name)
            yield unit, unit.function(*unit.args, on_step=None, on_epoch=None, **unit.options)


def test_elsewhere_the_longest_units_are_handed_out_first(tmp_path):
    units = [Unit(f"u{i}", square, (i,), steps=steps) for i, steps in enumerate([5, 40, 5, 90, 1])]
    executor = InOrder()
    results = run_units(RunFolder(tmp_path, {}), units, executor, progress=False)
    assert executor.order == ["u3", "u1", "u0", "u2", "u4"]
    assert list(results) == ["u0", "u1", "u2", "u3", "u4"]


def test_repeated_unit_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unit names repeat"):
        run_units(RunFolder(tmp_path, {}), [*_units(2), *_units(1)], progress=False)


ENV_COUNT = ["env-count", "--envs", "2,4", "--runs", "2", "--epochs", "2", "--examples-per-env", "16",
             "--n-test", "32", "--hidden", "8", "--no-progress"]


def _timeless(record):
    """A stored unit without its timings (the only part that differs between two runs of it)."""
    if isinstance(record, dict):
        return {k: _timeless(v) for k, v in record.items() if k != "seconds"}
    if isinstance(record, list):
        return [_timeless(v) for v in record]
    return record


def _units_of(out: Path) -> dict:
    return {path.stem: _timeless(json.loads(path.read_text())) for path in sorted((out / "units").glob("*.json"))}


@pytest.mark.slow
def test_env_count_gives_the_same_units_with_one_and_two_workers(tmp_path):
    pytest.importorskip("torch")
    assert cli.main([*ENV_COUNT, "--out", str(tmp_path / "one")]) == 0
    assert cli.main([*ENV_COUNT, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = _units_of(tmp_path / "one"), _units_of(tmp_path / "two")
    assert len(one) == 8 and one == two


SPIRALS = ["--n-envs", "2", "--examples-per-env", "16", "--n-test", "32", "--no-progress"]


def _command(name, tmp_path) -> list:
    """A tiny run of each command that hands units to an executor."""
    if name == "sweep":
        return ["sweep", *SPIRALS, "--budget", "3", "--seeds", "2", "--top", "1", "--epochs", "2",
                "--runs-per-batch", "2", "--widths", "8", "--depths", "1", "--batch-sizes", "8"]
    if name == "baselines":
        return ["baselines", *SPIRALS, "--methods", "erm,and_mask", "--seeds", "2", "--epochs", "2", "--hidden", "8",
                "--batch-size", "8"]
    if name == "baselines-search":
        return ["baselines-search", *SPIRALS, "--methods", "erm,and_mask", "--budget", "2", "--seeds", "1",
                "--epochs", "2", "--widths", "8", "--depths", "1", "--batch-sizes", "8"]
    if name == "env-count accel":
        return [*ENV_COUNT, "--implementation", "accel"]
    if name == "cifar10":
        from hardtovary.experiments.cifar10 import write_random_cifar10

        data = write_random_cifar10(tmp_path / "c", n_train=16, n_test=8)
        return ["cifar10", "--data", str(data), "--experiment", "label-noise",
                "--epochs", "1", "--n-train", "16", "--n-test", "8", "--width", "0.125", "--batch-size", "4",
                "--no-progress"]
    from hardtovary.experiments.coinrun import labels

    folder = labels.write_random_labels(tmp_path / "labels", train_levels=[3, 5], test_levels=[100, 101],
                                        states=4, test_states=1, seed=2)
    tiny = ["--labels", str(folder), "--epochs", "1", "--batch-size", "2", "--width", "0.0625", "--no-progress"]
    if name == "coinrun train":
        return ["coinrun", "train", *tiny, "--seeds", "0,1"]
    return ["coinrun", "search", *tiny, "--trials", "2", "--parallel-trials", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sweep", "baselines", "baselines-search", "env-count accel", "cifar10",
                                  "coinrun train", "coinrun search"])
def test_every_command_gives_the_same_units_in_this_process_and_in_a_pool(tmp_path, name):
    pytest.importorskip("torch")
    if name.startswith("coinrun"):
        pytest.importorskip("optuna")
    command = _command(name, tmp_path)
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0
    assert cli.main([*command, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = _units_of(tmp_path / "one"), _units_of(tmp_path / "two")
    assert one and one == two


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "argument --workers: must be a positive integer, got 0"),
    (["--ray-address", "auto"], "--ray-address needs --executor ray"),
    (["--executor", "dask"], "invalid choice: 'dask'"),
])
def test_bad_executor_options_are_one_line_errors(tmp_path, capsys, argv, message):
    pytest.importorskip("torch")
    try:
        status = cli.main([*ENV_COUNT, "--out", str(tmp_path), *argv])
    except SystemExit as exc:  # argparse refuses at parsing
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err


def test_ray_missing_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(executors.UsageError, match=r"needs Ray, which is not installed; pip install 'hardtovary\[ray"):
        executors.RayExecutor()


@pytest.mark.slow
def test_a_sweep_on_a_local_ray_cluster_gives_the_units_of_the_local_executor(tmp_path, monkeypatch):
    """Ray for real: a local cluster of 2 CPUs runs env-count's units, retries a unit whose worker died, and
    gives the units the in-process run gives."""
    pytest.importorskip("torch")
    ray = pytest.importorskip("ray")
    # the cluster's workers import this file's dies_once by module name, as a user's functions would be
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    try:
        assert cli.main([*ENV_COUNT, "--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2"]) == 0
        assert cli.main([*ENV_COUNT, "--out", str(tmp_path / "local")]) == 0
        assert _units_of(tmp_path / "ray") == _units_of(tmp_path / "local")
        folder = RunFolder(tmp_path / "retry", {})
        results = run_units(folder, [Unit("dies", dies_once, (str(tmp_path / "marker"), 5))],
                            executors.RayExecutor(workers=2), progress=False)
        assert results == {"dies": {"value": 5}}
    finally:
        ray.shutdown()
