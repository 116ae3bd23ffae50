"""``hardtovary baselines-search``: per-method random search over the paper's Tables 1 and 2, best re-run over seeds."""

import json

import pytest

pytest.importorskip("torch")

from hardtovary.experiments import baselines_search as bs
from hardtovary.experiments import cli
from hardtovary.experiments.sweep import PAPER_ARCHITECTURE

TINY = ["--n-envs", "2", "--examples-per-env", "32", "--n-test", "40", "--n-dims", "3", "--widths", "8",
        "--depths", "1", "--batch-sizes", "8,16", "--epochs", "2", "--budget", "2", "--seeds", "2", "--no-progress"]


@pytest.mark.parametrize("method", ["erm", "dann", "and_mask", "geometric_mean"])
def test_table1_sampling_respects_the_space(method):
    trials = bs.sample_trials(method, 200, arch=PAPER_ARCHITECTURE, seed=3)
    regs = set()
    for t in trials:
        assert tuple(t) == bs.KEYS[method]
        assert t["hidden_units"] in (256, 512) and t["batch_size"] in (64, 128, 256)
        assert t.get("layers", 3) in (3, 5)
        assert t["optimizer"] in ("adam", "sgd") and t["lr"] in (1e-3, 1e-2, 1e-1)
        assert t["l1"] == 0 or t["l2"] == 0  # never both
        assert t["l2"] in (0.0, 1e-5, 1e-4, 1e-3) and t["l1"] in (0.0, 1e-6, 1e-5, 1e-4)
        regs.add("l2" if t["l2"] else "l1" if t["l1"] else "none")
        if method == "erm":
            assert t["batch_norm"] in (True, False) and t["dropout"] in (0.0, 0.5)
        if method in ("and_mask", "geometric_mean"):
            assert t["tau"] in bs.AND_MASK_TAUS and t["rescale"] in (True, False)
            if method == "geometric_mean":
                assert t["tau"] == 1.0
    assert regs == {"l1", "l2", "none"}
    assert "layers" not in bs.KEYS["dann"] and "batch_norm" not in bs.KEYS["and_mask"]


def test_irm_sampling_uses_only_table2():
    trials = bs.sample_trials("irm", 200, seed=1)
    for t in trials:
        assert set(t) == {"hidden_units", "layers", "batch_size", "optimizer", "batch_norm", "penalty_weight",
                          "anneal_iters", "lr"}
        assert t["penalty_weight"] in (10, 100, 1000) and t["anneal_iters"] in (0, 1, 2, 4, 8)
        assert t["lr"] in (1e-3, 1e-2, 1e-1, 1.0)
    assert {t["lr"] for t in trials} == {1e-3, 1e-2, 1e-1, 1.0}
    cfg = bs.trial_config("irm", trials[0], epochs=8, seed=5, early_abort=True)
    assert cfg.irm_penalty_weight == trials[0]["penalty_weight"] and cfg.irm_anneal_iters == trials[0]["anneal_iters"]
    assert cfg.l1 == cfg.weight_decay == cfg.dropout == 0 and cfg.lr_milestones == (4, 6) and cfg.early_abort


def test_sampling_is_deterministic_per_seed_and_method():
    for m in ("erm", "dann", "irm", "and_mask"):
        assert bs.sample_trials(m, 10, seed=7) == bs.sample_trials(m, 10, seed=7)
        assert bs.sample_trials(m, 10, seed=7) != bs.sample_trials(m, 10, seed=8)
    # a longer budget extends, not reshuffles
    assert bs.sample_trials("erm", 10, seed=7)[:4] == bs.sample_trials("erm", 4, seed=7)


def test_cli_tiny_run_writes_table_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["baselines-search", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    table = (out / "table.txt").read_text()
    assert table.strip() in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["erm", "dann", "irm", "and_mask"]
    for m, r in results["methods"].items():
        assert m in table and len(r["search"]) == 2
        best = r["best"]
        assert best["trial"] == r["search"][0]["trial"] and best["n_seeds"] == 2 and len(best["runs"]) == 2
        assert best["runs"][0]["seed"] != best["runs"][1]["seed"]
        assert 0 <= best["test_acc_mean"] <= 1 and best["test_acc_std"] >= 0
        assert r["search"][0]["test_acc"] >= r["search"][1]["test_acc"]
    units = sorted(p.name for p in (out / "units").iterdir())
    assert len(units) == 4 * (2 + 2) and "search-irm-001.json" in units and "seeds-and_mask-001.json" in units

    # resume: finished units are read back, not retrained
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()}
    (out / "units" / "seeds-dann-001.json").unlink()
    capsys.readouterr()
    assert cli.main(["baselines-search", "--out", str(out), *TINY]) == 0
    err = capsys.readouterr().err
    assert f"resuming: 8 of 8 search runs reused from {out}" in err and f"7 of 8 re-runs reused from {out}" in err
    after = {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()}
    assert set(after) == set(stamps)
    changed = [n for n in after if after[n] != stamps[n]]
    assert changed == ["seeds-dann-001.json"]
    assert json.loads((out / "results.json").read_text())["methods"]["erm"] == results["methods"]["erm"]

    # different options on the same folder are refused
    capsys.readouterr()
    assert cli.main(["baselines-search", "--out", str(out), *TINY[:-1], "--seed", "1", "--no-progress"]) == 2
    assert "different configuration" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--budget", "0"], ["--seeds", "-1"], ["--methods", "erm,svm"],
                                  ["--epochs", "x"], ["--widths", "a,b"]])
def test_bad_options_are_refused_by_the_parser(argv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["baselines-search", "--out", str(tmp_path / "r"), *argv])
    assert exc.value.code == 2
    assert not (tmp_path / "r").exists()


def test_bad_values_are_refused_before_training(tmp_path, capsys):
    # batch size larger than the examples per environment
    assert cli.main(["baselines-search", "--out", str(tmp_path / "a"), *TINY, "--batch-sizes", "64"]) == 2
    assert "exceed" in capsys.readouterr().err
    assert cli.main(["baselines-search", "--out", str(tmp_path / "b"), *TINY, "--depths", "0"]) == 2
    assert cli.main(["baselines-search", "--out", str(tmp_path / "c"), *TINY, "--n-agreement-envs", "3"]) == 2
    with pytest.raises(ValueError):
        bs.run(tmp_path / "d", methods=("erm", "erm"))
    with pytest.raises(ValueError):
        bs.sample_trials("svm", 1)


def test_help_documents_every_option():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "baselines-search" in a.choices)
    p = sub.choices["baselines-search"]
    for action in p._actions:
        assert action.help, action.option_strings


def test_the_search_restores_subnormal_arithmetic_for_the_rest_of_the_process(tmp_path):
    import numpy as np

    tiny = np.nextafter(0.0, 1.0)  # the smallest subnormal double
    with pytest.raises(ValueError):
        bs.run(tmp_path / "d", methods=("erm", "erm"))  # the flag is set and must be cleared on the way out
    assert tiny * 1.0 > 0.0 and tiny + tiny == 2 * tiny
