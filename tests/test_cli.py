"""The command line, run folders and the README's promises about them."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hardtovary.experiments import cli
from hardtovary.experiments.runfolder import RunFolder, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-envs", "4", "--examples-per-env", "16", "--n-test", "40", "--n-dims", "3", "--hidden", "8",
        "--batch-size", "8", "--epochs", "2", "--no-progress"]


def run_cli(*args):
    return cli.main([str(a) for a in args])


def test_synthetic_writes_results_with_every_method_and_the_configuration(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("synthetic", "--out", out, *TINY) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"mean", "and_mask", "geometric_mean"}
    for r in results["methods"].values():
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1
        assert len(r["history"]) == 2
    assert results["config"]["data"]["n_train_envs"] == 4
    assert results["config"]["methods"]["mean"]["tau"] == 0.0
    assert results["config"]["methods"]["and_mask"]["tau"] == 1.0
    printed = capsys.readouterr().out
    for name in results["methods"]:
        flavour = "paper" if name == "geometric_mean" else "-"
        assert re.search(rf"^{name}\s+\d\.\d\d\s+{flavour}\s+\d\.\d{{3}}\s+\d\.\d{{3}}", printed, re.M), printed


def test_synthetic_resumes_finished_methods_and_refuses_a_different_configuration(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("synthetic", "--out", out, "--methods", "mean", *TINY) == 0
    unit = out / "units" / "mean.json"
    first = unit.read_text()
    unit.write_text(first.replace('"seconds"', '"marker": 1, "seconds"', 1))  # a finished unit is not redone
    assert run_cli("synthetic", "--out", out, "--methods", "mean", *TINY) == 0
    assert '"marker": 1' in unit.read_text()
    capsys.readouterr()
    assert run_cli("synthetic", "--out", out, "--methods", "mean", *TINY, "--lr", "0.5") == 2
    assert "different configuration" in capsys.readouterr().err
    assert run_cli("synthetic", "--out", out, "--methods", "mean", *TINY, "--lr", "0.5", "--fresh") == 0


def test_bad_options_are_refused_with_a_message(tmp_path, capsys):
    assert run_cli("synthetic", "--out", tmp_path, "--methods", "median", *TINY) == 2
    assert "--methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("synthetic", "--tau", "1.5")
    assert "must lie in [0, 1]" in capsys.readouterr().err


def test_every_option_of_every_command_is_documented():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"hardtovary {name} {action.option_strings[0]} has no help text"


def test_python_dash_m_entry_point_works():
    done = subprocess.run([sys.executable, "-m", "hardtovary", "synthetic", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--examples-per-env" in done.stdout


def test_atomic_json_write_leaves_no_temporary_files(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_json_atomic(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_run_folder_keeps_finished_units(tmp_path):
    folder = RunFolder(tmp_path / "r", {"a": 1})
    assert folder.finished("u") is None
    folder.save("u", {"acc": 0.5})
    assert RunFolder(tmp_path / "r", {"a": 1}).finished("u") == {"acc": 0.5}
    with pytest.raises(ValueError, match="different configuration"):
        RunFolder(tmp_path / "r", {"a": 2})


def quick_start_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quick_start_has_two_commands_and_ci_runs_the_second_verbatim():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert "hardtovary synthetic" in commands[0] and "pip install" in commands[0]
    assert "pytest" in commands[1] and "pip install" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci


def test_the_test_command_installs_procgen_as_the_coinrun_errors_say():
    """CI plays real CoinRun and draws its figures: its command installs the coinrun and plot extras, then procgen2,
    gym3 and gym without their dependencies (their metadata pin numpy<2), as the missing-Procgen error says."""
    from hardtovary.experiments.coinrun import game

    command = quick_start_commands()[1]
    assert '".[test,torch,coinrun,plot,ray,digits]"' in command
    no_deps = re.search(r"pip install --no-deps [^&]+", command).group(0).strip()
    assert no_deps in game.INSTALL and f"procgen2=={game.PACKAGE_VERSION}" in no_deps


@pytest.mark.slow
def test_the_quick_start_job_and_the_numpy_commands_run_without_torch(tmp_path):
    # block `import torch` in a fresh interpreter, as on a machine that installed only ".[plot]"
    script = (
        "import importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch is blocked for this test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from hardtovary.experiments import cli\n"
        "assert not cli.torch_available()\n"
        f"args = ['synthetic', '--out', r'{tmp_path / 'run'}', '--epochs', '1', '--n-envs', '2',\n"
        "        '--examples-per-env', '16', '--n-test', '20', '--hidden', '4', '--batch-size', '8', '--no-progress']\n"
        "assert cli.main(args) == 0\n"
        "assert cli.main(['ilc', '--json']) == 0\n"
        "assert cli.main(['baselines', '--epochs', '1']) == 2\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "needs PyTorch" in done.stderr
    assert "'hardtovary[torch]'" in done.stderr and "'.[torch]'" in done.stderr  # from PyPI and from a checkout
