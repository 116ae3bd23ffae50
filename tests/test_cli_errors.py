"""The command table and its errors: bad input is one line with exit status 2, a bug inside a command keeps its
traceback, and a command's parser imports only that command."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hardtovary.experiments import cli

ROOT = Path(__file__).resolve().parents[1]
TORCH = cli.torch_available()
SPIRALS = ["--n-envs", "4", "--examples-per-env", "16", "--n-test", "20", "--n-dims", "3", "--no-progress"]
TRAIN = ["--hidden", "4", "--batch-size", "8", "--epochs", "1"]


def bad_inputs(tmp):
    """Command lines with bad input, each caught at a different place: argument types aside, the options turned
    into configurations, the experiments' own checks, the data files and the run folder."""
    np.savez(tmp / "singular.npz", H=np.array([[[1.0, 0], [0, 0]], [[1.0, 0], [0, 0]]]),
             mu=np.array([[0.0, 0], [1, 1]]))
    (tmp / "garbage").mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (tmp / "garbage" / name).write_bytes(b"not a pickle")
    out = ["--out", str(tmp / "run")]
    lines = {
        "synthetic lr": (["synthetic", *out, *SPIRALS, *TRAIN, "--lr", "-1"], "lr must be > 0"),
        "synthetic data": (["synthetic", *out, *SPIRALS, *TRAIN, "--n-revolutions", "0"], "n_revolutions"),
        "synthetic batching": (["synthetic", *out, *SPIRALS, *TRAIN, "--n-agreement-envs", "3"], "n_agreement_envs"),
        "synthetic accel": (["synthetic", *out, *SPIRALS, *TRAIN, "--implementation", "accel", "--backend", "numpy",
                             "--batch-norm"], "--batch-norm"),
        "sweep top": (["sweep", *out, *SPIRALS, "--budget", "2", "--top", "3"], "top"),
        "sweep space": (["sweep", *out, *SPIRALS, "--widths", "0"], "hidden_units"),
        "ilc problem": (["ilc", "--hessians", str(tmp / "singular.npz")], "singular"),
        "ilc mlp": (["ilc", "--spirals-mlp", "--examples-per-env", "1"], "examples_per_env"),
        "ilc seed": (["ilc", "--patchwork", "--compare", "--seed", "-1"], "--seed"),
    }
    if TORCH:
        lines.update({
            "baselines config": (["baselines", *out, *SPIRALS, *TRAIN, "--methods", "erm", "--dropout", "2"],
                                 "dropout"),
            "baselines seed": (["baselines", *out, *SPIRALS, *TRAIN, "--methods", "erm", "--seed", "-1"], "seed"),
            "baselines batching": (["baselines", *out, *SPIRALS, *TRAIN, "--methods", "erm", "--batch-size", "99"],
                                   "batch_size"),
            "baselines-search methods": (["baselines-search", *out, *SPIRALS, "--methods", "erm,erm",
                                          "--batch-sizes", "8"], "distinct"),
            "env-count envs": (["env-count", *out, "--envs", "2,2", "--methods", "erm", "--no-progress"], "repeat"),
            "gradient-correlation taus": (["gradient-correlation", *out, "--taus", "2", "--no-progress"], "taus"),
            "cifar10 data": (["cifar10", *out, "--data", str(tmp / "garbage"), "--no-progress"], "CIFAR-10"),
        })
    return lines


def test_bad_input_is_one_line_with_status_2(tmp_path, capsys, monkeypatch):
    for name, (argv, words) in bad_inputs(tmp_path).items():
        assert cli.main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"hardtovary {argv[0]}: error: ") and len(err.strip().splitlines()) == 1, (name, err)
        assert words in err, (name, err)
    monkeypatch.setenv("HARDTOVARY_THREADS", "many")
    assert cli.main(["ilc"]) == 2
    assert capsys.readouterr().err.startswith("hardtovary ilc: error: environment variable HARDTOVARY_THREADS")


def test_a_run_folder_of_another_configuration_is_one_line(tmp_path, capsys):
    argv = ["synthetic", "--out", str(tmp_path / "run"), "--methods", "mean", *SPIRALS, *TRAIN]
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--lr", "0.5"]) == 2
    assert "different configuration" in capsys.readouterr().err


def boom(*args, **kwargs):
    raise ValueError("boom")


# For each command: where a bug inside its run is planted (module, attribute path), and a command line that gets
# there past the validation of its options.
BUGS = {
    "synthetic": ("hardtovary.reference.training", "train", ["--methods", "mean", *SPIRALS, *TRAIN]),
    "sweep": ("hardtovary.accel.sweep", "train_sweep",
              ["--budget", "1", "--top", "1", "--seeds", "1", "--epochs", "1", "--widths", "4", "--depths", "1",
               "--batch-sizes", "8", *SPIRALS]),
    "ilc": ("hardtovary.reference.quadratic", "inconsistency_score", ["--patchwork"]),
    "baselines": ("hardtovary.experiments.baselines", "ERM.backward", ["--methods", "erm", *SPIRALS, *TRAIN]),
    "baselines-search": ("hardtovary.experiments.baselines", "train_baseline",
                         ["--methods", "erm", "--budget", "1", "--seeds", "1", "--epochs", "1", "--widths", "4",
                          "--depths", "1", "--batch-sizes", "8", *SPIRALS]),
    "env-count": ("hardtovary.experiments.baselines", "train_baseline",
                  ["--envs", "2", "--methods", "erm", "--runs", "1", "--hidden", "4", "--epochs", "1",
                   "--no-progress"]),
    "gradient-correlation": ("hardtovary.experiments.gradient_correlation", "gradient_sets",
                             ["--seeds", "1", "--taus", "0", "--hidden", "4", "--n-envs", "2", "--batch-size", "8",
                              "--no-progress"]),
    "cifar10": ("hardtovary.experiments.cifar10", "train_step",
                ["--experiment", "label-noise", "--taus", "0", "--epochs", "1", "--width", "0.125",
                 "--batch-size", "4", "--no-progress"]),
}


@pytest.mark.parametrize("command", sorted(BUGS))
def test_a_bug_inside_a_command_keeps_its_traceback(command, tmp_path, monkeypatch, capsys):
    import importlib

    if command not in ("synthetic", "sweep", "ilc") and not TORCH:
        pytest.skip("needs torch")
    module, path, argv = BUGS[command]
    *owners, attribute = path.split(".")
    target = importlib.import_module(module)
    for name in owners:
        target = getattr(target, name)
    monkeypatch.setattr(target, attribute, boom)
    if command == "cifar10":
        from hardtovary.experiments import cifar10

        argv = [*argv, "--data", str(cifar10.write_random_cifar10(tmp_path / "data", n_train=8, n_test=5))]
    if command != "ilc":
        argv = [*argv, "--out", str(tmp_path / "run")]
    with pytest.raises(ValueError, match="^boom$"):
        cli.main([command, *argv])
    assert "error: boom" not in capsys.readouterr().err


def test_the_traceback_reaches_the_terminal(tmp_path):
    script = ("import sys\n"
              "from hardtovary.reference import training\n"
              "from hardtovary.experiments import cli\n"
              "def boom(*args, **kwargs):\n"
              "    raise ValueError('boom')\n"
              "training.train = boom\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    argv = ["synthetic", "--out", str(tmp_path / "run"), "--methods", "mean", *SPIRALS, *TRAIN]
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=False)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and done.stderr.rstrip().endswith("ValueError: boom")


def imported_after(argv) -> dict:
    """Which of torch, the command modules and the oracle a fresh interpreter has imported after ``hardtovary
    ARGV`` (run in-process, so that sys.modules can be read), and what it printed."""
    code = ("import contextlib, io, json, sys\n"
            "from hardtovary.experiments import cli\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            f"        cli.main({argv!r})\n"
            "    except SystemExit:\n"
            "        pass\n"
            "names = [m for m in sys.modules if m == 'torch' or m.startswith(('hardtovary.experiments.cmd_',\n"
            "         'hardtovary.reference', 'hardtovary.conformance'))]\n"
            "print(json.dumps({'modules': names, 'out': out.getvalue()}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=True)
    return json.loads(done.stdout)


def test_the_listing_imports_no_command_and_names_every_one():
    seen = imported_after(["--help"])
    assert seen["modules"] == []
    for name, command in cli.COMMANDS.items():
        help_line = command.help if TORCH or not command.torch else "(needs PyTorch"
        assert name in seen["out"] and " ".join(help_line.split()[:4]) in " ".join(seen["out"].split()), name


@pytest.mark.slow
def test_a_command_imports_only_itself():
    seen = imported_after(["synthetic", "--help"])
    assert "torch" not in seen["modules"], seen["modules"]
    assert [m for m in seen["modules"] if m.startswith("hardtovary.experiments.cmd_")] == [
        "hardtovary.experiments.cmd_synthetic"]
    assert "--examples-per-env" in seen["out"]
    seen = imported_after(["ilc", "--help"])
    assert "torch" not in seen["modules"] and "hardtovary.experiments.cmd_synthetic" not in seen["modules"]
