"""The thread bound of every command (--threads, HARDTOVARY_THREADS) and the runtime record in every results.json."""

import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import threadpoolctl

from hardtovary.experiments import cli, runtime

TORCH = cli.torch_available()
needs_torch = pytest.mark.skipif(not TORCH, reason="needs torch")

SPIRALS = ["--n-envs", "2", "--examples-per-env", "16", "--n-test", "20", "--n-dims", "3", "--no-progress"]
# The tiniest run of every command that writes a results.json (argv after the command name and --out).
COMMANDS = {
    "synthetic": ["--methods", "mean", "--hidden", "4", "--batch-size", "8", "--epochs", "1", *SPIRALS],
    "sweep": ["--budget", "1", "--top", "1", "--seeds", "1", "--epochs", "1", "--widths", "4", "--depths", "1",
              "--batch-sizes", "8", *SPIRALS],
}
TORCH_COMMANDS = {
    "baselines": ["--methods", "erm", "--hidden", "4", "--batch-size", "8", "--epochs", "1", *SPIRALS],
    "baselines-search": ["--methods", "erm", "--budget", "1", "--seeds", "1", "--epochs", "1", "--widths", "4",
                         "--depths", "1", "--batch-sizes", "8", *SPIRALS],
    "env-count": ["--envs", "2", "--methods", "erm", "--runs", "1", "--examples-per-env", "8", "--hidden", "4",
                  "--batch-size", "8", "--epochs", "1", "--n-test", "20", "--no-progress"],
    "gradient-correlation": ["--seeds", "1", "--taus", "0,1", "--hidden", "4", "--n-envs", "2", "--batch-size", "8",
                             "--n-dims", "3", "--no-progress"],
}


def pool_threads() -> list[int]:
    return [info["num_threads"] for info in threadpoolctl.threadpool_info()]


def test_the_bound_comes_from_the_option_then_the_variable_then_the_default(monkeypatch):
    monkeypatch.delenv("HARDTOVARY_THREADS", raising=False)
    assert runtime.resolve_threads(None) == 1
    assert runtime.resolve_threads(3) == 3
    monkeypatch.setenv("HARDTOVARY_THREADS", " 2 ")
    assert runtime.resolve_threads(None) == 2
    assert runtime.resolve_threads(0) == 0
    monkeypatch.setenv("HARDTOVARY_THREADS", "")
    assert runtime.resolve_threads(None) == 1


def test_limited_threads_bounds_the_loaded_pools_and_restores_them(monkeypatch):
    torch = pytest.importorskip("torch") if TORCH else None
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    before_torch = torch.get_num_threads() if torch else None
    with threadpoolctl.threadpool_limits(limits=3):
        if torch:
            torch.set_num_threads(3)
        assert set(pool_threads()) == {3}
        with runtime.limited_threads(1):
            assert set(pool_threads()) == {1}
            assert os.environ["OMP_NUM_THREADS"] == os.environ["OPENBLAS_NUM_THREADS"] == "1"
            if torch:
                assert torch.get_num_threads() == 1
        assert set(pool_threads()) == {3}
        assert os.environ["OMP_NUM_THREADS"] == "7" and "OPENBLAS_NUM_THREADS" not in os.environ
        if torch:
            assert torch.get_num_threads() == 3
        with runtime.limited_threads(0):
            assert set(pool_threads()) == {3}
    if torch:
        torch.set_num_threads(before_torch)


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: a bound of 1 is every library's default")
def test_limited_threads_reaches_libraries_loaded_inside_the_block():
    # a fresh interpreter, where SciPy's BLAS (and torch) load only inside the block
    code = ("import sys, threadpoolctl\n"
            "from hardtovary.experiments import runtime\n"
            "assert 'scipy.linalg' not in sys.modules and 'torch' not in sys.modules\n"
            "with runtime.limited_threads(1):\n"
            "    import scipy.linalg\n"
            f"    {'import torch' if TORCH else 'torch = None'}\n"
            "    pools = [i['num_threads'] for i in threadpoolctl.threadpool_info()]\n"
            "    print(pools, torch.get_num_threads() if torch else 1)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                            "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    pools, torch_threads = done.stdout.rsplit(" ", 1)
    assert set(json.loads(pools)) == {1} and int(torch_threads) == 1


@pytest.mark.parametrize("name", ["synthetic", "sweep", "ilc", "conformance", *TORCH_COMMANDS, "cifar10"])
def test_every_command_documents_threads(name, capsys):
    if name in (*TORCH_COMMANDS, "cifar10") and not TORCH:
        pytest.skip("without torch the command is a stand-in that explains how to install it")
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    assert "--threads N" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--threads", "-1"], ["--threads", "two"]])
def test_a_bad_threads_option_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["ilc", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--threads" in err and "Traceback" not in err


def test_a_bad_threads_variable_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setenv("HARDTOVARY_THREADS", "many")
    assert cli.main(["ilc"]) == 2
    err = capsys.readouterr().err
    assert "HARDTOVARY_THREADS" in err and "'many'" in err and len(err.strip().splitlines()) == 1


def run_command(name, argv, out, monkeypatch, threads_env=None):
    if threads_env is None:
        monkeypatch.delenv("HARDTOVARY_THREADS", raising=False)
    else:
        monkeypatch.setenv("HARDTOVARY_THREADS", threads_env)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main([name, "--out", str(out), *argv]) == 0
    return json.loads((out / "results.json").read_text())["runtime"]


def check_runtime(record, threads):
    assert record["versions"]["numpy"] == np.__version__
    assert record["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert {p["num_threads"] for p in record["threads"]["pools"]} == {threads}
    assert record["threads"]["variables"]["OMP_NUM_THREADS"] == str(threads)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_numpy_commands_record_the_runtime_under_the_default_bound(name, tmp_path, monkeypatch):
    record = run_command(name, COMMANDS[name], tmp_path / name, monkeypatch)
    check_runtime(record, threads=1)


@needs_torch
@pytest.mark.parametrize("name", list(TORCH_COMMANDS))
def test_torch_commands_record_the_runtime_and_torch_threads(name, tmp_path, monkeypatch):
    import torch

    record = run_command(name, [*TORCH_COMMANDS[name], "--threads", "3"], tmp_path / name, monkeypatch)
    check_runtime(record, threads=3)
    assert record["versions"]["torch"] == importlib.metadata.version("torch")
    assert torch.__version__.startswith(record["versions"]["torch"])
    assert record["threads"]["torch"] == 3


@needs_torch
def test_cifar10_records_the_runtime(tmp_path, monkeypatch):
    from hardtovary.experiments import cifar10

    data = cifar10.write_random_cifar10(tmp_path / "data", n_train=8, n_test=5)
    record = run_command("cifar10", ["--data", str(data), "--experiment", "label-noise", "--taus", "0", "--epochs",
                                     "1", "--width", "0.125", "--batch-size", "4", "--no-progress"],
                         tmp_path / "run", monkeypatch, threads_env="3")
    check_runtime(record, threads=3)
    assert record["threads"]["torch"] == 3


def test_no_bound_leaves_the_libraries_defaults(tmp_path, monkeypatch):
    defaults = set(pool_threads())
    record = run_command("synthetic", [*COMMANDS["synthetic"], "--threads", "0"], tmp_path / "s", monkeypatch)
    assert {p["num_threads"] for p in record["threads"]["pools"]} == defaults
    assert record["threads"]["variables"]["OMP_NUM_THREADS"] is None
