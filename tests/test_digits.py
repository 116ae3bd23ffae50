"""The memorization experiments on scikit-learn's 8x8 digits (``hardtovary cifar10 --dataset digits``, paper §3.2,
Figs. 8, 9, 16 at a CPU's scale): the loader, the network, the summary over seeds and a small run of the command."""

import builtins
import importlib.metadata
import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hardtovary.accel.torch.models import DigitsResNet
from hardtovary.experiments import cifar10, cli, digits
from hardtovary.experiments.errors import UsageError

#: The tests that read the images need the 'digits' extra; the network, the summary and the missing-extra error do not.
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="scikit-learn (the 'digits' extra) is not installed")


@pytest.fixture(scope="module")
def raw():
    """scikit-learn's own images and labels, read without the module under test."""
    bunch = pytest.importorskip("sklearn.datasets").load_digits()
    return bunch.images, bunch.target


@pytest.fixture(scope="module")
def full(raw):
    return digits.load_digits()


def test_loader_shapes_dtypes_and_the_fixed_split(full, raw):
    images, target = raw
    assert full.X_train.shape == (1438, 1, 8, 8) and full.X_test.shape == (359, 1, 8, 8)
    assert full.X_train.dtype == np.float32 and full.y_train.dtype == np.int64 and full.y_test.dtype == np.int64
    assert full.classes == tuple("0123456789") and set(np.unique(full.y_train)) == set(range(10))
    # undo the stated normalisation, (x / 16 - MEAN) / STD, and find every image among scikit-learn's: the two parts
    # are disjoint and together hold each of the 1797 images once, each with its own label
    levels = np.rint((np.concatenate([full.X_train, full.X_test])[:, 0] * digits.STD + digits.MEAN) * 16)
    np.testing.assert_allclose((levels / 16 - digits.MEAN) / digits.STD,
                               np.concatenate([full.X_train, full.X_test])[:, 0], atol=1e-5)
    index = {(img.astype(np.int64).tobytes(), int(y)): i for i, (img, y) in enumerate(zip(images, target))}
    found = [index.get((img.astype(np.int64).tobytes(), int(y))) for img, y in
             zip(levels, np.concatenate([full.y_train, full.y_test]))]
    assert len(index) == 1797  # no two images with one label are identical, so the match is unambiguous
    assert None not in found and sorted(found) == list(range(1797))
    assert found[:1438] == list(np.random.default_rng(0).permutation(1797)[:1438])


def test_normalisation_constants_are_the_pixels_mean_and_std(raw):
    x = raw[0] / 16
    assert digits.MEAN == pytest.approx(x.mean(), abs=5e-5) and digits.STD == pytest.approx(x.std(), abs=5e-5)


def test_loader_is_deterministic_and_subsets_are_prefixes(full):
    again = digits.load_digits()
    for a, b in zip(full[:4], again[:4]):
        np.testing.assert_array_equal(a, b)
    sub = digits.load_digits(n_train=100, n_test=7)
    np.testing.assert_array_equal(sub.X_train, full.X_train[:100])
    np.testing.assert_array_equal(sub.y_test, full.y_test[:7])
    for bad in ({"n_train": 0}, {"n_train": 1439}, {"n_test": 360}, {"n_train": 2.5}, {"n_test": True}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            digits.load_digits(**bad)


def test_missing_scikit_learn_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.split(".")[0] == "sklearn":
            raise ImportError("no sklearn here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(UsageError, match=r"scikit-learn.*hardtovary\[digits\]"):
        digits.load_digits()
    assert cli.main(["cifar10", "--dataset", "digits", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'.[digits]'" in err and "Traceback" not in err


def test_data_option_belongs_to_cifar10_only(tmp_path, capsys):
    assert cli.main(["cifar10", "--out", str(tmp_path / "a")]) == 2
    assert "--data DIR" in capsys.readouterr().err
    assert cli.main(["cifar10", "--dataset", "digits", "--data", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "CIFAR-10 only" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_network_forward_and_backward_shapes():
    torch.manual_seed(0)
    model = DigitsResNet(width=0.5)
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [8, 16, 16, 16, 32, 32, 32]
    x = torch.randn(6, 1, 8, 8, requires_grad=True)
    logits = model(x)
    assert logits.shape == (6, 10)
    torch.nn.functional.cross_entropy(logits, torch.arange(6)).backward()
    assert x.grad.shape == x.shape
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    assert sum(m.num_batches_tracked for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)) == 7
    assert DigitsResNet(width=0.01)(torch.randn(2, 1, 8, 8)).shape == (2, 10)  # every stage keeps one channel
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="width"):
            DigitsResNet(width=bad)


def test_profiles_and_trials_of_the_digits():
    profile = cifar10.PROFILES["digits"]
    assert (profile.model, profile.batch_size, profile.n_train) == ("DigitsResNet", 32, 512)
    noise = cifar10.trials_for("label-noise", dataset="digits", seed=3)
    assert sorted((t["tau"], t["lr"], t["seed"]) for t in noise.values()) == [(0.0, 5e-3, 3), (0.2, 5e-3, 3),
                                                                             (0.4, 5e-3, 3)]
    assert len(cifar10.trials_for("memorization", dataset="digits")) == 14
    # CIFAR-10 keeps the paper's settings
    assert sorted((t["tau"], t["lr"]) for t in cifar10.trials_for("label-noise").values()) == [(0.0, 1e-3),
                                                                                              (0.2, 5e-3)]
    with pytest.raises(ValueError, match="dataset"):
        cifar10.trials_for("memorization", dataset="mnist")


def _trial(labels, tau, seed, train, test, kept):
    final = {"train_acc": train, "mislabeled_acc": None, "test_acc": test, "kept_fraction": kept}
    return {"labels": labels, "tau": tau, "lr": 5e-3, "seed": seed, "final": final, "history": [final],
            "seconds": 1.0 + seed}


def test_summary_over_seeds_is_the_mean_and_sample_std():
    trials = {f"{lab}-tau{tau}-seed{s}": _trial(lab, tau, s, tr, te, None if tau == 0 else 0.5)
              for lab, tau, s, tr, te in [("random", 0.0, 0, 1.0, 0.1), ("random", 0.0, 1, 0.8, 0.12),
                                          ("random", 0.0, 2, 0.9, 0.08), ("random", 0.4, 0, 0.3, 0.1)]}
    rows = cifar10.summarize({"config": {"experiment": "memorization"}, "trials": trials})
    assert [(r["labels"], r["tau"], r["seeds"]) for r in rows] == [("random", 0.0, 3), ("random", 0.4, 1)]
    # by hand: mean 0.9, deviations 0.1, -0.1, 0 -> sample variance 0.02 / 2
    assert rows[0]["train_acc_mean"] == pytest.approx(0.9) and rows[0]["train_acc_std"] == pytest.approx(0.1)
    assert rows[0]["test_acc_std"] == pytest.approx(0.02) and rows[0]["seconds_mean"] == pytest.approx(2.0)
    assert rows[0]["kept_fraction_mean"] is None and rows[0]["mislabeled_acc_std"] is None
    assert rows[1]["train_acc_std"] == 0.0 and rows[1]["kept_fraction_mean"] == 0.5
    table = cifar10.format_table({"config": {"experiment": "memorization"}, "trials": trials})
    assert "0.900 ± 0.100" in table and "mean ± std over seeds" in table


TINY = ["--dataset", "digits", "--n-train", "48", "--n-test", "20", "--width", "0.25", "--batch-size", "16",
        "--epochs", "2", "--no-progress"]


@pytest.mark.slow
@needs_sklearn
def test_cli_run_on_the_digits_writes_results_and_figures_and_resumes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    args = ["cifar10", *TINY, "--experiment", "label-noise", "--taus", "0,0.4", "--seeds", "2", "--out", str(out)]
    real_step, calls, killed = cifar10.train_step, [], []

    def interrupted_step(*a, **k):  # killed once, in the second epoch of the first trial, after its first checkpoint
        calls.append(k["tau"])
        if len(calls) == 5 and not killed:
            killed.append(True)
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(cifar10, "train_step", interrupted_step)
    assert cli.main(args) == 130
    assert [h["epoch"] for h in json.loads((out / "trials" / "noisy-tau0-seed0" / "history.json").read_text())] == [1]

    calls.clear()
    assert cli.main(args) == 0
    assert len(calls) == 3 + 3 * 2 * 3  # the rest of the first trial, then three more trials of two epochs
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dataset"] == "digits" and results["config"]["n_train"] == 48
    assert results["runtime"]["versions"]["scikit-learn"] == importlib.metadata.version("scikit-learn")
    assert sorted(results["trials"]) == ["noisy-tau0-seed0", "noisy-tau0-seed1", "noisy-tau0.4-seed0",
                                         "noisy-tau0.4-seed1"]
    for name, r in results["trials"].items():
        assert [h["epoch"] for h in r["history"]] == [1, 2]
        # the labels are drawn by the function CIFAR-10 uses, from the trial's seed
        y = digits.load_digits(n_train=48).y_train
        noisy, changed = cifar10.randomize_labels(y, cifar10.NOISE_FRACTION, np.random.default_rng(r["seed"]))
        assert r["n_mislabeled"] == int(changed.sum())
        kept = [h["kept_fraction"] for h in r["history"]]
        # the per-example AND-mask stepped: at tau 0.4 with 16 examples it keeps a part of the components
        assert kept == [None, None] if r["tau"] == 0 else all(0 < k < 1 for k in kept), (name, kept)
    printed = capsys.readouterr().out
    assert "mean ± std over seeds" in printed and (out / "fig9_label_noise.png").stat().st_size > 0

    calls.clear()
    assert cli.main(args) == 0 and calls == []  # every trial finished: nothing retrained


@pytest.mark.slow
@needs_sklearn
def test_memorization_figures_with_several_seeds(tmp_path):
    pytest.importorskip("matplotlib")
    results = cifar10.run(tmp_path / "run", dataset="digits", experiment="memorization", taus=(0.0, 0.6), epochs=1,
                          n_train=32, n_test=16, width=0.25, batch_size=16, seeds=2, progress=False)
    assert len(results["trials"]) == 8 and results["config"]["batch_size"] == 16
    written = cifar10.plot_results(results, tmp_path / "figs")
    assert sorted(p.name for p in written) == ["fig16_test_acc_vs_tau.png", "fig8_train_acc_vs_tau.png"]
    random_labels = [r for r in results["trials"].values() if r["labels"] == "random"]
    assert all(r["n_mislabeled"] > 0 for r in random_labels)
