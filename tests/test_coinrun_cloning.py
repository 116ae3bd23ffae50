"""CoinRun behavioural cloning (paper §3.3, App. B.6): the KL and class accuracy by hand, the batching, the
schedule, the optimizers against independent routes, resuming, the figures and the train stage end to end, on
random label folders (no Procgen)."""

import copy
import importlib.util
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hardtovary.accel.torch.optim import TemporalAndMaskAdam
from hardtovary.experiments import cli, stats
from hardtovary.experiments.coinrun import cloning, figures, game, labels
from hardtovary.experiments.errors import UsageError

TINY = dict(epochs=2, batch_size=4, width=1 / 16)
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY_ARGS = ["--epochs", "2", "--batch-size", "4", "--width", "0.0625", "--no-progress"]


@pytest.fixture
def label_folder(tmp_path):
    """3 training levels of 6 states, 4 test levels of one state each."""
    return labels.write_random_labels(tmp_path / "labels", train_levels=[3, 5, 8], test_levels=[100, 101, 102, 103],
                                      states=6, test_states=1, seed=1)


@pytest.fixture
def data(label_folder):
    return cloning.load_data(label_folder)


# ---- metrics ---------------------------------------------------------------------------------------------------


def test_kl_is_cross_entropy_minus_entropy_by_hand():
    p = np.zeros((2, game.NUM_ACTIONS))
    p[0, :2] = 0.5
    p[1, 4] = 1.0
    q = np.full((2, game.NUM_ACTIONS), 0.05)
    q[:, 0], q[:, 1] = 0.2, 0.15  # 0.35 + 13 * 0.05 = 1
    expected = [0.5 * math.log(0.5 / q[0, 0]) + 0.5 * math.log(0.5 / q[0, 1]), math.log(1.0 / q[1, 4])]
    np.testing.assert_allclose(cloning.kl_divergence(p, np.log(q)), expected, rtol=1e-12)
    np.testing.assert_allclose(cloning.entropy(p), [math.log(2.0), 0.0], rtol=1e-12)


def test_kl_is_zero_when_the_prediction_is_the_target_even_with_zero_probabilities():
    p = np.zeros((3, game.NUM_ACTIONS))
    p[0, 7] = 1.0
    p[1, [1, 2]] = [0.25, 0.75]
    p[2] = 1.0 / game.NUM_ACTIONS
    with np.errstate(divide="ignore"):
        log_q = np.log(p)  # -inf where p = 0
    np.testing.assert_array_equal(cloning.kl_divergence(p, log_q), [0.0, 0.0, 0.0])


def test_class_accuracy_sums_probabilities_within_classes():
    """State 0: the single most probable action is LEFT (0.2) but the NOOP class holds 0.8 over its 8 actions, so
    the predicted class is NOOP; state 1: RIGHT+UP. Experts: NOOP and LEFT -> accuracy 1/2."""
    probs = np.zeros((2, game.NUM_ACTIONS))
    probs[0, list(game.ACTION_CLASSES["NOOP"])] = 0.1
    probs[0, game.ACTION_CLASSES["LEFT"][0]] = 0.2
    probs[1, game.ACTION_CLASSES["RIGHT+UP"][0]] = 0.9
    probs[1, game.ACTION_CLASSES["LEFT"]] = 0.05
    experts = np.array([game.CLASS_NAMES.index("NOOP"), game.CLASS_NAMES.index("LEFT")])
    assert cloning.class_accuracy(np.log(probs + 1e-300), experts) == 0.5
    assert cloning.class_accuracy(np.log(probs[:1] + 1e-300), experts[:1]) == 1.0


def test_input_is_channels_first_float_over_255():
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    x = cloning.to_input(frames)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 64, 64)
    assert x[1, 2, 10, 20] == frames[1, 10, 20, 2].item() / 255.0


def test_bootstrap_mean_ci_known_case():
    """Samples (0, 0, 0, 1): the bootstrap mean is Binomial(4, 1/4) / 4, whose 2.5% and 97.5% quantiles are 0 and
    0.75 (P(mean <= 0.5) = 0.949, P(mean <= 0.75) = 0.996); a constant column has a zero-width interval."""
    values = np.array([[0.0, 2.0], [0.0, 2.0], [0.0, 2.0], [1.0, 2.0]])
    low, high = stats.bootstrap_mean_ci(values, resamples=20_000, seed=3)
    np.testing.assert_array_equal(low, [0.0, 2.0])
    np.testing.assert_array_equal(high, [0.75, 2.0])
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_mean_ci(values, level=1.0)


# ---- batching and schedule -------------------------------------------------------------------------------------


def test_batches_visit_every_state_once_with_one_level_per_batch():
    sizes = [5, 7, 4, 9, 2]  # remainders with batch 3: 2 (kept), 1 (dropped), 1 (dropped), 0, 2 (kept)
    level_index = np.repeat(np.arange(len(sizes)), sizes)
    batches = cloning.epoch_batches(level_index, 3, seed=4, epoch=0)
    assert all(2 <= len(b) <= 3 and len(set(level_index[b])) == 1 for b in batches)
    seen = np.concatenate(batches)
    assert len(seen) == len(set(seen))
    missing = sorted(set(range(len(level_index))) - set(seen))
    assert sorted(level_index[missing]) == [1, 2]  # one state of each level with a remainder of one
    assert len(batches) == 2 + 2 + 1 + 3 + 1
    levels_in_order = [int(level_index[b[0]]) for b in batches]
    assert levels_in_order != sorted(levels_in_order)  # levels interleaved, not visited one after the other
    again = cloning.epoch_batches(level_index, 3, seed=4, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = cloning.epoch_batches(level_index, 3, seed=4, epoch=1)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def _config(method="adam", **changes):
    return cloning.method_config(method, **{**TINY, **changes})


@pytest.mark.parametrize("epochs, factors", [(1, [1]), (2, [1, 0.1]), (3, [1, 0.1, 0.01]),
                                             (8, [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]),
                                             (10, [1] * 5 + [0.1] * 2 + [0.01] * 3)])
def test_lr_drops_tenfold_at_half_and_three_quarters(epochs, factors):
    config = _config(lr=0.5, epochs=epochs)
    np.testing.assert_allclose([cloning.lr_at(config, e) for e in range(epochs)], 0.5 * np.array(factors),
                               rtol=1e-12)


# ---- configuration ---------------------------------------------------------------------------------------------


def test_config_defaults_validation_and_key():
    mask = cloning.method_config("and_mask")
    assert (mask.lr, mask.beta1, mask.beta3, mask.tau, mask.weight_decay) == (0.0078, 0.21, 0.79, 0.36, 0.057)
    adam = cloning.method_config("adam", lr=None, seed=2)
    assert adam.beta3 is None and adam.tau is None and adam.lr == 1e-3 and adam.seed == 2
    assert json.loads(json.dumps(adam.to_dict())) == adam.to_dict()
    assert adam.key() == cloning.method_config("adam", seed=2).key() != cloning.method_config("adam").key()
    assert adam.key().startswith("adam-")
    for method, changes, match in [("adam", dict(tau=0.5), "only to and_mask"), ("and_mask", dict(beta3=1.0), "beta3"),
                                   ("and_mask", dict(tau=1.5), "tau"), ("adam", dict(batch_size=1), "batch_size"),
                                   ("adam", dict(beta1=-0.1), "beta1"), ("adam", dict(lr=0.0), "lr"),
                                   ("adam", dict(weight_decay=-1.0), "weight_decay"), ("adam", dict(width=0), "width"),
                                   ("adam", dict(seed=-1), "seed"), ("sgd", {}, "method")]:
        with pytest.raises(ValueError, match=match):
            cloning.method_config(method, **changes)
    with pytest.raises(ValueError, match="needs beta3 and tau"):
        cloning.CloningConfig("and_mask", lr=0.1, beta1=0.5)


def test_label_folder_with_a_one_state_level_is_refused(tmp_path):
    folder = labels.write_random_labels(tmp_path / "l", train_levels=[1, 2], test_levels=[9], states=1)
    with pytest.raises(UsageError, match="level 1 has 1 state"):
        cloning.load_data(folder)


# ---- optimizers ------------------------------------------------------------------------------------------------


def _batch(seed=0, n=4):
    rng = np.random.default_rng(seed)
    frames = torch.from_numpy(rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8))
    targets = torch.from_numpy(rng.dirichlet(np.ones(game.NUM_ACTIONS), n).astype(np.float32))
    return cloning.to_input(frames), targets


def test_adam_with_decoupled_weight_decay_equals_adamw():
    """Three steps of method adam with weight decay equal torch.optim.AdamW's on the same batches (Loshchilov and
    Hutter's decoupled decay, on the pre-step parameters)."""
    config = _config(lr=0.05, beta1=0.8, weight_decay=0.5)
    ours = cloning.make_model(config)
    theirs = copy.deepcopy(ours)
    optimizer = cloning.make_optimizer(ours.parameters(), config)
    adamw = torch.optim.AdamW(theirs.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                              weight_decay=config.weight_decay)
    for step in range(3):
        x, targets = _batch(step)
        cloning.train_step(ours, optimizer, x, targets, lr=config.lr, weight_decay=config.weight_decay)
        adamw.zero_grad()
        torch.nn.functional.cross_entropy(theirs(x), targets).backward()  # soft targets: the same mean CE
        adamw.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_and_mask_first_step_is_algorithm_1_without_bias_correction():
    """One and_mask step from zero state: a = (1 - beta3) sign(g), so every component with g != 0 is kept when
    tau <= 1 - beta3 and the step is theta - lr (1 - beta1) g / (sqrt((1 - beta2) g^2) + eps) (no bias
    correction); with tau > 1 - beta3 nothing is kept and theta is unchanged."""
    x, targets = _batch(1)
    for tau, kept in ((0.2, True), (0.3, False)):
        config = _config("and_mask", lr=0.01, beta1=0.3, beta3=0.79, tau=tau, weight_decay=0.0)
        model = cloning.make_model(config)
        before = copy.deepcopy(model)
        loss = -(targets * torch.log_softmax(before(x), dim=1)).sum(1).mean()
        grads = torch.autograd.grad(loss, list(before.parameters()))
        optimizer = cloning.make_optimizer(model.parameters(), config)
        assert isinstance(optimizer, TemporalAndMaskAdam)
        returned = cloning.train_step(model, optimizer, x, targets, lr=config.lr, weight_decay=0.0)
        assert float(returned) == pytest.approx(loss.item(), rel=1e-6)  # the mean soft cross-entropy
        for after, p, g in zip(model.parameters(), before.parameters(), grads):
            m = (1 - config.beta1) * g
            step = m / ((1 - config.beta2) * g * g).sqrt().add(config.eps) if kept else torch.zeros_like(g)
            torch.testing.assert_close(after, p - config.lr * step, rtol=1e-5, atol=1e-7)
        n_kept = sum(int(mask.sum()) for mask in optimizer.last_masks)
        assert (n_kept > 0) == kept


# ---- runs ------------------------------------------------------------------------------------------------------


def _strip_seconds(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


@pytest.mark.slow
@pytest.mark.parametrize("method", cloning.METHODS)
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, data, method):
    config = _config(method, weight_decay=0.01)
    straight = cloning.train_run(tmp_path / "straight", data, config)

    class Killed(BaseException):
        pass

    def kill(record):
        raise Killed

    with pytest.raises(Killed):
        cloning.train_run(tmp_path / "resumed", data, config, on_epoch=kill)
    assert cloning.epochs_done(tmp_path / "resumed") == 1
    assert len(json.loads((tmp_path / "resumed" / "history.json").read_text())) == 1
    steps = []
    resumed = cloning.train_run(tmp_path / "resumed", data, config, on_step=lambda: steps.append(1))
    assert len(steps) == cloning.steps_per_epoch(data, config)  # only epoch 2
    assert _strip_seconds(resumed["history"]) == _strip_seconds(straight["history"])
    assert resumed["min_test_kl"] == straight["min_test_kl"]
    history = straight["history"]
    assert [r["epoch"] for r in history] == [1, 2] and [r["lr"] for r in history] == [config.lr, config.lr * 0.1]
    assert all(set(r) == set(cloning.RECORD_KEYS) for r in history)
    assert all(0 <= r[k] <= 1 for r in history for k in ("train_class_acc", "test_class_acc"))
    assert all(r["train_kl"] > 0 and r["test_kl"] > 0 and math.isfinite(r["train_loss"]) for r in history)
    kept = [r["kept_fraction"] for r in history]
    assert all(k is None for k in kept) if method == "adam" else all(0 < k < 1 for k in kept)
    with pytest.raises(UsageError, match="another configuration"):
        cloning.train_run(tmp_path / "resumed", data, _config(method, weight_decay=0.02))


@pytest.mark.slow
def test_metrics_are_the_models_kl_and_accuracy(tmp_path, data):
    """The epoch record's test KL and class accuracy equal those of the saved model evaluated here, in eval
    mode, with the formulas by hand (KL from torch's own kl_div)."""
    config = _config("adam", epochs=1)
    record = cloning.train_run(tmp_path / "r", data, config)["history"][0]
    model = cloning.make_model(config)
    model.load_state_dict(torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["model"])
    model.eval()
    with torch.no_grad():
        log_q = torch.log_softmax(model(cloning.to_input(torch.from_numpy(data.test_frames))), dim=1).double()
    p = torch.from_numpy(data.test_targets).double()
    kl = torch.nn.functional.kl_div(log_q, p, reduction="batchmean")
    assert record["test_kl"] == pytest.approx(float(kl), rel=1e-9)
    predicted = game.class_probabilities(log_q.exp().numpy()).argmax(1)
    assert record["test_class_acc"] == np.mean(predicted == data.test_classes)


def test_a_diverging_run_is_reported(tmp_path, data, monkeypatch):
    monkeypatch.setattr(cloning, "train_step", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(cloning.Diverged, match="diverged in epoch 1"):
        cloning.train_run(tmp_path / "r", data, _config())


# ---- figures ---------------------------------------------------------------------------------------------------


def _fake_run(method, test_kls, train_kls=None):
    train_kls = train_kls or [2 * v for v in test_kls]
    return {"config": {"method": method},
            "history": [{"epoch": e + 1, "test_kl": t, "train_kl": r} for e, (t, r) in
                        enumerate(zip(test_kls, train_kls))]}


def test_kl_curves_average_the_best_runs_by_minimum_test_kl(tmp_path, monkeypatch):
    """Fig. 18: the test-KL line of a method is the mean of its ``top`` runs with the lowest *minimum* test KL:
    here run b (min 0.1, final 0.9) is among the best two, run c (min 0.3, final 0.3) is not."""
    pytest.importorskip("matplotlib")
    shown = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: shown.append(fig) or path)
    runs = {"adam": [_fake_run("adam", [0.5, 0.2]), _fake_run("adam", [0.1, 0.9]), _fake_run("adam", [0.4, 0.3])],
            "and_mask": [_fake_run("and_mask", [0.3, 0.25])]}
    assert figures.plot_kl_curves(runs, tmp_path / "k.png", top=2) == tmp_path / "k.png"
    train_ax, test_ax = shown[0].axes
    lines = {line.get_label(): line for line in test_ax.get_lines()}
    np.testing.assert_allclose(lines["Adam (best 2)"].get_ydata(), [0.3, 0.55])
    np.testing.assert_allclose(lines["Adam + AND-mask (best 1)"].get_ydata(), [0.3, 0.25])
    assert train_ax.get_yscale() == "log"
    assert len(test_ax.collections) == 1  # one confidence band: the method with two runs
    figures.plot_min_test_kl(runs, tmp_path / "m.png", top=2)
    dots = shown[1].axes[0].collections[0].get_offsets()[:, 1]
    np.testing.assert_allclose(sorted(dots), [0.1, 0.2])


def test_figures_are_written_and_none_without_matplotlib(tmp_path, label_folder, monkeypatch):
    pytest.importorskip("matplotlib")
    runs = {"adam": [_fake_run("adam", [0.5, 0.2]), _fake_run("adam", [0.4, 0.3])]}
    for path in figures.write_figures(runs, tmp_path) + [figures.plot_levels(label_folder, tmp_path / "lv.png")]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted([*figures.FIGURES.values(), "lv.png"])
    monkeypatch.setattr(figures, "matplotlib_pyplot", lambda: None)
    assert figures.write_figures(runs, tmp_path / "none") == [None, None]
    assert figures.plot_levels(label_folder, tmp_path / "none.png") is None


def test_level_grid_titles_are_the_level_seeds(tmp_path, label_folder, monkeypatch):
    pytest.importorskip("matplotlib")
    shown = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: shown.append(fig) or path)
    figures.plot_levels(label_folder, tmp_path / "lv.png", count=2)
    shown_axes = [ax for ax in shown[0].axes if ax.get_title()]
    assert [ax.get_title() for ax in shown_axes] == ["level 3", "level 5"]
    middle = labels.read_level(labels.level_path(label_folder, "train", 5)).frames[3]  # the 4th of 6: the middle
    np.testing.assert_array_equal(shown_axes[1].get_images()[0].get_array(), middle)


# ---- the train stage -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_stage_end_to_end_and_resume(tmp_path, label_folder, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["coinrun", "train", "--labels", str(label_folder), "--out", str(out), "--seeds", "0,1", *TINY_ARGS]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "and_mask" in printed and "min test kl" in printed and "results.json" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"adam-seed0", "adam-seed1", "and_mask-seed0", "and_mask-seed1"}
    assert "runtime" in results and results["summary"]["adam"]["runs"] == 2
    run = results["runs"]["and_mask-seed1"]
    assert run["config"]["tau"] == 0.36 and run["config"]["seed"] == 1 and len(run["history"]) == 2
    assert json.loads((out / "runs" / "and_mask-seed1" / "history.json").read_text()) == run["history"]
    mean, _ = results["summary"]["adam"]["min_test_kl"]
    assert mean == pytest.approx(np.mean([results["runs"][f"adam-seed{s}"]["min_test_kl"] for s in (0, 1)]))
    assert results["config"]["labels"]["train_levels_read"] == [3, 5, 8]
    for name in figures.FIGURES.values():  # the figures are optional ('hardtovary[plot]')
        assert (out / name).exists() == HAVE_MATPLOTLIB
    monkeypatch.setattr(cloning, "train_run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert cli.main(args) == 0
    assert "4 of 4 runs reused" in capsys.readouterr().err


def _error(args, capsys) -> str:
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hardtovary coinrun: error: ")
    return err


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "1"], "batch_size must be >= 2"),
    (["--beta1", "1"], "beta1 must lie in [0, 1)"),
    (["--beta3", "-0.5"], "beta3 must lie in [0.0, 1.0]"),
    (["--methods", "adam", "--tau", "0.5"], "--beta3 and --tau apply only to and_mask"),
    (["--seeds", "-1"], "seed must lie in [0, inf]"),
    (["--seeds", ","], "--seeds must list at least one seed"),
    (["--device", "nonsense"], "--device nonsense"),
])
def test_train_stage_bad_options_are_one_line_errors(tmp_path, label_folder, capsys, extra, message):
    out = tmp_path / "run"
    err = _error(["coinrun", "train", "--labels", str(label_folder), "--out", str(out), *TINY_ARGS, *extra], capsys)
    assert message in err
    assert not out.exists()


def test_train_stage_refuses_a_missing_or_unusable_label_folder(tmp_path, capsys):
    base = ["coinrun", "train", "--out", str(tmp_path / "run"), *TINY_ARGS]
    assert "is not a CoinRun label folder" in _error([*base, "--labels", str(tmp_path / "none")], capsys)
    folder = labels.write_random_labels(tmp_path / "one", train_levels=[4], test_levels=[9], states=1)
    assert "level 4 has 1 state" in _error([*base, "--labels", str(folder)], capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra", [["--methods", "sgd"], ["--tau", "1.5"], ["--epochs", "0"]])
def test_train_stage_argument_types_refuse_bad_values(tmp_path, label_folder, capsys, extra):
    with pytest.raises(SystemExit) as exc:
        cli.main(["coinrun", "train", "--labels", str(label_folder), "--out", str(tmp_path / "o"), *extra])
    assert exc.value.code == 2
    assert extra[0] in capsys.readouterr().err
