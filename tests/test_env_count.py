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
