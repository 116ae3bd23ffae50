"""What a new user meets on the command line: options applied as documented or refused in one line, errors as
messages (never tracebacks), what a resumed run reuses, and what an interrupted one keeps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hardtovary.experiments import cli, progress, synthetic

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-envs", "4", "--examples-per-env", "16", "--n-test", "40", "--n-dims", "3", "--hidden", "8",
        "--batch-size", "8", "--epochs", "2", "--no-progress"]


def run_cli(*args):
    """Exit status of ``hardtovary ARGS``, whether main returns it or argparse exits with it."""
    try:
        return cli.main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------------------
# Item 9: the geometric mean's tau and flavour
# ------------------------------------------------------------------------------------------------------------


def test_geometric_mean_with_tau_below_one_needs_the_original_flavour(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("synthetic", "--out", out, "--methods", "geometric_mean,and_mask", "--tau", "0.5", *TINY) == 2
    err = one_line_error(capsys)
    assert "--flavour original" in err and "geometric_mean" in err
    assert not out.exists()  # refused before anything was written


def test_the_original_flavour_trains_with_the_tau_given_and_says_so(tmp_path, capsys):
    runs = {}
    for tau in ("0.5", "1"):
        out = tmp_path / f"tau{tau}"
        assert run_cli("synthetic", "--out", out, "--methods", "geometric_mean", "--tau", tau,
                       "--flavour", "original", *TINY) == 0
        printed = capsys.readouterr().out
        runs[tau] = json.loads((out / "results.json").read_text())
        row = next(line for line in printed.splitlines() if line.startswith("geometric_mean"))
        assert row.split()[1:3] == [f"{float(tau):.2f}", "original"], row
    config = runs["0.5"]["config"]["methods"]["geometric_mean"]
    assert config["tau"] == 0.5 and config["flavour"] == "original"
    # tau 0.5 keeps components that tau 1 masks, so the training differs only if the tau given is the tau used
    losses = {tau: [h["train_loss"] for h in r["methods"]["geometric_mean"]["history"]] for tau, r in runs.items()}
    assert losses["0.5"] != losses["1"]


def test_baselines_expose_the_flavour_their_error_asks_for(tmp_path, capsys):
    pytest.importorskip("torch")
    from hardtovary.experiments import baselines

    tiny = ["--n-envs", "2", "--examples-per-env", "16", "--n-test", "20", "--n-dims", "3", "--hidden", "4",
            "--batch-size", "8", "--epochs", "1", "--no-progress"]
    for command in ("baselines", "env-count"):
        assert run_cli(command, "--out", tmp_path / command, "--methods", "geometric_mean", "--tau", "0.5") == 2
        assert "--flavour original" in one_line_error(capsys)
    with pytest.raises(ValueError, match="flavour='paper'"):
        baselines.method_config(baselines.DEFAULT_CONFIG, "geometric_mean", {"tau": 0.5})
    out = tmp_path / "run"
    assert run_cli("baselines", "--out", out, "--methods", "geometric_mean", "--tau", "0.5", "--flavour", "original",
                   *tiny) == 0
    config = json.loads((out / "results.json").read_text())["config"]["methods"]["geometric_mean"]
    assert (config["tau"], config["flavour"]) == (0.5, "original")


def test_flavour_without_the_geometric_mean_is_refused(tmp_path, capsys):
    assert run_cli("synthetic", "--out", tmp_path / "r", "--methods", "and_mask", "--flavour", "original",
                   *TINY) == 2
    assert "--flavour" in one_line_error(capsys)
    assert run_cli("sweep", "--out", tmp_path / "s", "--methods", "and_mask", "--flavour", "original") == 2
    assert "--flavour" in one_line_error(capsys)


def test_synthetic_method_config_refuses_what_the_oracle_refuses():
    with pytest.raises(ValueError, match="flavour='paper'"):
        synthetic.method_config(synthetic.DEFAULT_TRAIN, "geometric_mean", {"tau": 0.5})
    config = synthetic.method_config(synthetic.DEFAULT_TRAIN, "geometric_mean", {"tau": 0.5, "flavour": "original"})
    assert (config.tau, config.flavour) == (0.5, "original")
    assert synthetic.method_config(synthetic.DEFAULT_TRAIN, "and_mask", {"flavour": "original"}).flavour is None


def test_sweep_draws_the_geometric_means_tau_only_in_the_original_flavour():
    from hardtovary.experiments import sweep

    taus = (0.25, 0.5)
    paper = sweep.sample_trials(sweep.SearchSpace(methods=("geometric_mean",), taus=taus), 20, epochs=2,
                                n_agreement_envs=4)
    assert {(t.tau, t.flavour) for t in paper} == {(1.0, "paper")}
    original = sweep.sample_trials(sweep.SearchSpace(methods=("geometric_mean",), taus=taus, flavour="original"), 20,
                                   epochs=2, n_agreement_envs=4)
    assert {(t.tau, t.flavour) for t in original} == {(0.25, "original"), (0.5, "original")}


# ------------------------------------------------------------------------------------------------------------
# Item 10: options silently dropped or changed
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, named", [
    (["--lr-milestones", "-1"], "--lr-milestones"),
    (["--lr-milestones", "0"], "--lr-milestones"),
    (["--lr-milestones", "2"], "--lr-milestones"),         # --epochs 2: never reached
    (["--hidden", ",,"], "--hidden"),
    (["--hidden", "8,0"], "--hidden"),
])
def test_synthetic_refuses_options_it_would_drop(tmp_path, capsys, options, named):
    assert run_cli("synthetic", "--out", tmp_path / "r", *TINY, *options) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_milestone_inside_the_run_is_kept(tmp_path):
    assert run_cli("synthetic", "--out", tmp_path / "r", "--methods", "mean", *TINY, "--lr-milestones", "1") == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["config"]["methods"]["mean"]["lr_milestones"] == [1]
    assert [h["lr"] for h in results["methods"]["mean"]["history"]] == pytest.approx([1e-2, 1e-3])


@pytest.mark.parametrize("command", ["baselines", "env-count", "gradient-correlation", "ilc"])
def test_every_hidden_option_refuses_a_model_without_hidden_layers(capsys, command):
    if command != "ilc" and not cli.torch_available():
        pytest.skip("needs torch")
    assert run_cli(command, "--hidden", ",,") == 2
    assert "--hidden" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# Item 11: errors that arrived as tracebacks
# ------------------------------------------------------------------------------------------------------------


def test_an_unusable_cupy_backend_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from hardtovary.accel import backend

    monkeypatch.setattr(backend, "cupy_status", lambda: (False, "CuPy is not installed (test)"))
    assert run_cli("sweep", "--out", tmp_path / "s", "--backend", "cupy") == 2
    assert "--backend" in one_line_error(capsys)
    monkeypatch.setenv(backend.ENV_VAR, "cupy")
    assert run_cli("sweep", "--out", tmp_path / "s") == 2
    assert backend.ENV_VAR in one_line_error(capsys)
    assert run_cli("synthetic", "--out", tmp_path / "r", "--implementation", "accel", *TINY) == 2
    assert backend.ENV_VAR in one_line_error(capsys)
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()
    monkeypatch.delenv(backend.ENV_VAR)
    assert run_cli("synthetic", "--out", tmp_path / "r", "--backend", "numpy", *TINY) == 2  # the reference
    assert "--implementation accel" in one_line_error(capsys)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "cupy", None)  # as where CuPy is not installed: the message says how
    assert run_cli("sweep", "--out", tmp_path / "s", "--backend", "cupy") == 2
    assert "'hardtovary[gpu]'" in (err := one_line_error(capsys)) and "'.[gpu]'" in err


AFTER_MAIN = ("import sys\nfrom hardtovary.experiments import cli\ncode = cli.main(sys.argv[1:])\n"
              "print('written after main returned')\nsys.exit(code)\n")


@pytest.mark.slow
@pytest.mark.parametrize("command", [["-m", "hardtovary", "ilc", "--json"],
                                     ["-m", "hardtovary", "conformance", "--list"],
                                     ["-c", AFTER_MAIN, "ilc", "--json"]])
def test_a_reader_that_stops_early_gets_no_traceback(command):
    """`hardtovary ilc --json | head -1`: the reader closes the pipe before the command writes (here: at once).
    Output after main returns (at exit, or by a program that calls main) must not fail again."""
    proc = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=300) == 2
    assert err == "", err


# ------------------------------------------------------------------------------------------------------------
# Item 15: resuming and interrupting
# ------------------------------------------------------------------------------------------------------------


def test_a_resumed_run_says_what_it_reused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("synthetic", "--out", out, "--methods", "mean", *TINY) == 0
    assert "resuming" not in capsys.readouterr().err
    assert run_cli("synthetic", "--out", out, "--methods", "mean", *TINY) == 0  # same configuration: all reused
    assert f"resuming: 1 of 1 methods reused from {out}" in capsys.readouterr().err


# The module function each command runs, and what its interrupt message must say.
INTERRUPTED = {
    "synthetic": ("hardtovary.experiments.synthetic", "finished methods"),
    "sweep": ("hardtovary.experiments.sweep", "finished batches"),
    "baselines": ("hardtovary.experiments.baselines", "finished runs"),
    "baselines-search": ("hardtovary.experiments.baselines_search", "finished runs"),
    "env-count": ("hardtovary.experiments.env_count", "finished runs"),
    "cifar10": ("hardtovary.experiments.cifar10", "finished epochs"),
    "gradient-correlation": ("hardtovary.experiments.gradient_correlation", "does not resume"),
}


@pytest.mark.parametrize("command", sorted(INTERRUPTED))
def test_each_command_says_what_an_interrupt_keeps(tmp_path, capsys, monkeypatch, command):
    import importlib

    module, words = INTERRUPTED[command]
    if command not in ("synthetic", "sweep") and not cli.torch_available():
        pytest.skip("needs torch")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), "run", interrupted)
    out = tmp_path / "out"
    extra = ["--data", tmp_path] if command == "cifar10" else []
    assert run_cli(command, "--out", out, *extra) == 130
    err = capsys.readouterr().err
    assert words in err
    if words != "does not resume":
        assert str(out) in err
    if command != "synthetic":
        assert "methods" not in err


def test_a_new_unit_clears_what_the_previous_one_showed():
    import io

    from tqdm import tqdm

    with tqdm(total=2, file=io.StringIO()) as bar:
        bar.set_postfix(epoch=3, test="0.900")
        progress.start_unit(bar, "next")
        assert bar.desc.startswith("next") and bar.postfix in (None, "")


def test_cifar10_bar_shows_no_accuracies_of_the_previous_trial_under_the_next_name(tmp_path, monkeypatch,
                                                                                 recording_bar):
    pytest.importorskip("torch")
    from hardtovary.experiments import cifar10, executors

    data = cifar10.write_random_cifar10(tmp_path / "data", n_train=10, n_test=5)
    monkeypatch.setattr(executors, "tqdm", recording_bar)
    cifar10.run(tmp_path / "run", data, experiment="label-noise", epochs=1, width=0.125, batch_size=5,
                device="cpu", progress=True)
    (bar,) = recording_bar.made
    assert [name for name, _ in bar.started] == ["noisy-tau0-seed0", "noisy-tau0.2-seed0"]
    assert all(shown == "" for _, shown in bar.started), bar.started
    assert bar.n == bar.total
