"""CIFAR-10 experiment: the loader on the on-disk format, random labels, and a CPU smoke run of the command."""

import copy
import json
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hardtovary.experiments import cifar10, cli

N_TRAIN_PER_BATCH, N_TEST = 8, 20


def _write_batch(path, data, labels):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"tiny", b"labels": [int(v) for v in labels], b"data": data,
                     b"filenames": [b"x.png"] * len(labels)}, f)


def write_tiny_cifar(root, seed=0):
    """40 training images in 5 batches and 20 test images, in the official python-version format. Image 0 of
    data_batch_1 is pure red."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(cifar10.TRAIN_FILES):
        data = rng.integers(0, 256, size=(N_TRAIN_PER_BATCH, 3072), dtype=np.uint8)
        if i == 0:
            data[0] = 0
            data[0, :1024] = 255
        _write_batch(root / name, data, rng.integers(0, 10, N_TRAIN_PER_BATCH))
    _write_batch(root / cifar10.TEST_FILE, rng.integers(0, 256, size=(N_TEST, 3072), dtype=np.uint8),
                 rng.integers(0, 10, N_TEST))
    with open(root / cifar10.META_FILE, "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    return root


def test_loader_reads_the_official_format(tmp_path):
    d = cifar10.load_cifar10(write_tiny_cifar(tmp_path / "c"))
    assert d.X_train.shape == (40, 3, 32, 32) and d.X_train.dtype == np.float32
    assert d.X_test.shape == (N_TEST, 3, 32, 32) and d.y_test.shape == (N_TEST,)
    assert d.y_train.dtype == np.int64 and d.y_train.shape == (40,)
    assert d.classes == tuple(f"class{i}" for i in range(10))
    # red-only image: channel 0 at (1 - mean_r) / std_r everywhere, channels 1, 2 at -mean / std
    red = d.X_train[0]
    np.testing.assert_allclose(red[0], (1 - cifar10.MEAN[0]) / cifar10.STD[0], rtol=1e-6)
    for c in (1, 2):
        np.testing.assert_allclose(red[c], -cifar10.MEAN[c] / cifar10.STD[c], rtol=1e-6)
    # pixel order: row-major 32x32 within each channel
    with open(tmp_path / "c" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][3]
    expected = (raw[1024 + 5 * 32 + 7] / 255.0 - cifar10.MEAN[1]) / cifar10.STD[1]
    assert d.X_train[N_TRAIN_PER_BATCH + 3, 1, 5, 7] == pytest.approx(expected, rel=1e-6)
    sub = cifar10.load_cifar10(tmp_path / "c", n_train=12, n_test=5)
    assert sub.X_train.shape[0] == 12 and sub.X_test.shape[0] == 5
    np.testing.assert_array_equal(sub.y_train, d.y_train[:12])


def test_missing_files_are_each_named(tmp_path):
    root = write_tiny_cifar(tmp_path / "c")
    (root / "data_batch_3").unlink()
    (root / "test_batch").unlink()
    with pytest.raises(FileNotFoundError) as err:
        cifar10.load_cifar10(root)
    message = str(err.value)
    assert str(root) in message and "data_batch_3" in message and "test_batch" in message
    assert "data_batch_1," not in message.split("lacks")[1].split("(")[0]
    assert "cifar-10-batches-py" in message


@pytest.mark.parametrize("content", [b"not a pickle", pickle.dumps([1, 2, 3]), pickle.dumps({b"labels": [1]}),
                                     pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
                                     pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]})])
def test_malformed_file_is_a_value_error(tmp_path, content):
    root = write_tiny_cifar(tmp_path / "c")
    (root / "data_batch_4").write_bytes(content)
    with pytest.raises(ValueError, match="data_batch_4"):
        cifar10.load_cifar10(root)


def test_randomize_labels_semantics():
    y = np.random.default_rng(1).integers(0, 10, 5000)
    same, changed = cifar10.randomize_labels(y, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(same, y)
    assert not changed.any()
    new, changed = cifar10.randomize_labels(y, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(changed, new != y)
    # each label redrawn uniformly: changed ~ Binomial(5000, 0.9), sd ~ 21; allow 5 sd
    assert abs(changed.sum() - 4500) < 5 * np.sqrt(5000 * 0.9 * 0.1)
    assert new.min() >= 0 and new.max() <= 9 and new.dtype == np.int64
    noisy, changed = cifar10.randomize_labels(y, 0.25, np.random.default_rng(3))
    assert (noisy != y).sum() == changed.sum() <= 1250
    np.testing.assert_array_equal(changed, noisy != y)
    again, _ = cifar10.randomize_labels(y, 0.25, np.random.default_rng(3))
    np.testing.assert_array_equal(again, noisy)
    other, _ = cifar10.randomize_labels(y, 0.25, np.random.default_rng(4))
    assert not np.array_equal(other, noisy)


def test_trials_grid_and_lr_schedule():
    grid = cifar10.trials_for("memorization")
    assert len(grid) == 14 and {t["tau"] for t in grid.values()} == set(cifar10.TAUS)
    noise = cifar10.trials_for("label-noise")
    assert sorted((t["tau"], t["lr"]) for t in noise.values()) == [(0.0, 1e-3), (0.2, 5e-3)]
    assert [cifar10.lr_at(1.0, e, (60,)) for e in (0, 59, 60, 79)] == [1.0, 1.0, pytest.approx(0.1),
                                                                      pytest.approx(0.1)]


TINY = ["--n-test", "8", "--width", "0.125", "--batch-size", "4", "--no-progress"]


@pytest.mark.slow
def test_cli_smoke_run_writes_results_and_resumes(tmp_path, monkeypatch, capsys):
    data = write_tiny_cifar(tmp_path / "c")
    out = tmp_path / "run"
    args = ["cifar10", "--data", str(data), "--experiment", "label-noise", "--taus", "0.2", "--epochs", "2",
            "--n-train", "16", "--out", str(out), *TINY]
    real_step, calls = cifar10.train_step, []

    def interrupted_step(*a, **k):  # killed in epoch 2, after epoch 1's checkpoint
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(cifar10, "train_step", interrupted_step)
    assert cli.main(args) == 130
    trial = out / "trials" / "noisy-tau0.2-seed0"
    history = json.loads((trial / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    assert torch.load(trial / "checkpoint.pt", weights_only=False)["epochs_done"] == 1

    calls.clear()
    assert cli.main(args) == 0
    assert len(calls) == 4  # only epoch 2's 16 / 4 steps
    results = json.loads((out / "results.json").read_text())
    r = results["trials"]["noisy-tau0.2-seed0"]
    assert [h["epoch"] for h in r["history"]] == [1, 2] and r["tau"] == 0.2 and r["lr"] == 5e-3
    for key in ("train_acc", "test_acc"):
        assert 0 <= r["final"][key] <= 1
    assert (r["final"]["mislabeled_acc"] is None) == (r["n_mislabeled"] == 0)
    assert "noisy-tau0.2-seed0" in capsys.readouterr().out

    calls.clear()
    assert cli.main(args) == 0 and calls == []  # finished trial: nothing retrained


def per_example_gradients(model, X, Y):
    """Stacks G[B, *shape] (float64 NumPy), one per parameter, of each example's cross-entropy gradient through
    one train-mode forward of the whole batch (BatchNorm statistics pooled over the batch): B separate backward
    passes, independent of the engine behind train_step."""
    losses = torch.nn.functional.cross_entropy(model(X), Y, reduction="none")
    params = list(model.parameters())
    per_example = [torch.autograd.grad(losses[b], params, retain_graph=True) for b in range(len(Y))]
    return [torch.stack([g[i] for g in per_example]).numpy() for i in range(len(params))]


@pytest.mark.parametrize("network, image", [("FastResNet", (3, 32, 32)), ("DigitsResNet", (1, 8, 8))])
@pytest.mark.parametrize("tau, rescale", [(0.0, False), (0.5, False), (0.5, True), (1.0, False), (1.0, True)])
def test_train_step_is_the_oracle_rule_on_the_per_example_gradients(tau, rescale, network, image):
    """One SGD step of train_step (float64, every example its own environment) equals theta - lr * the oracle's
    rule on per-example gradients computed here: the mean gradient at tau = 0, the AND-mask otherwise, rescaled
    per tensor by n / n_kept exactly when asked. The kept fraction it reports is the oracle masks' share of all
    components. For the networks of CIFAR-10 and of the digits."""
    from hardtovary.accel.torch import models
    from hardtovary.reference import rules

    torch.manual_seed(0)
    initial = getattr(models, network)(width=0.125).double()
    X, Y = torch.randn(4, *image, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    G = per_example_gradients(copy.deepcopy(initial), X, Y)
    if tau == 0:
        update, masks = rules.aggregate(G, rule="mean")
    else:
        update, masks = rules.aggregate(G, rule="and_mask", tau=tau, rescale=rescale)
        # the case discriminates: some tensors are partly masked, so rescaling changes them
        assert any(0 < m.sum() < m.size for m in masks)
    model, lr = copy.deepcopy(initial), 0.5
    _, kept = cifar10.train_step(model, torch.optim.SGD(model.parameters(), lr=lr), X, Y, tau=tau, rescale=rescale)
    if tau == 0:
        assert kept is None
    else:
        assert kept == pytest.approx(np.concatenate([m.ravel() for m in masks]).mean(), rel=1e-12)
    for after, before, u in zip(model.parameters(), initial.parameters(), update):
        expected = before.detach() - lr * torch.as_tensor(u)
        torch.testing.assert_close(after.detach(), expected, rtol=1e-9, atol=1e-12)


def test_cli_missing_data_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["cifar10", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data_batch_1" in err and "batches.meta" in err and "cifar-10-batches-py" in err
    assert not (tmp_path / "run").exists()


def test_random_cifar10_is_readable_in_the_official_layout(tmp_path):
    root = cifar10.write_random_cifar10(tmp_path / "rnd", n_train=12, n_test=5, seed=3)
    data = cifar10.load_cifar10(root)
    assert data.X_train.shape == (12, 3, 32, 32) and data.X_test.shape == (5, 3, 32, 32)
    assert data.y_train.min() >= 0 and data.y_train.max() <= 9 and len(data.classes) == 10
    sizes = []
    for name in cifar10.TRAIN_FILES:
        with open(root / name, "rb") as f:
            sizes.append(len(pickle.load(f, encoding="bytes")[b"labels"]))
    assert sizes == [3, 3, 2, 2, 2]
    with pytest.raises(ValueError, match="n_train"):
        cifar10.write_random_cifar10(tmp_path / "bad", n_train=4)
