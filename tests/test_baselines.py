"""Baselines of the synthetic task (DANN's gradient reversal, IRMv1, ERM, AND-mask in torch) and the gradient
correlations of Fig. 7, with their command-line subcommands."""

import dataclasses
import importlib.util
import json
import math
import re
from typing import NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hardtovary.experiments import baselines as bl
from hardtovary.experiments import cli
from hardtovary.experiments import gradient_correlation as gc
from hardtovary.reference import data, mlp, training

TINY_DATA = data.SpiralsConfig(n_train_envs=4, examples_per_env=32, n_test=40, n_dims=3, seed=0)
TINY = bl.BaselineConfig(hidden=(8, 8), batch_size=8, epochs=2, lr=1e-2)


# ---- gradient reversal ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lambd", [0.0, 0.5, 2.0])
def test_gradient_reversal_is_identity_forward_and_scales_the_gradient_by_minus_lambda(lambd):
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    layer = bl.GradientReversal(lambd)
    y = layer(x)
    assert torch.equal(y, x)
    w = torch.randn(5, 3, dtype=torch.float64)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    torch.testing.assert_close(g, -lambd * w)
    # autograd check: with lambda = -1 the custom backward must equal the numerical Jacobian of the identity
    assert torch.autograd.gradcheck(lambda t: bl.grad_reverse(t, -1.0), (x,))
    with pytest.raises(RuntimeError):
        torch.autograd.gradcheck(lambda t: bl.grad_reverse(t, 1.0), (x,))
    (g2,) = torch.autograd.grad(bl.grad_reverse(x, lambd).pow(2).sum(), x)
    torch.testing.assert_close(g2, -lambd * 2 * x.detach())


def test_dann_discriminator_gradient_reaches_the_embedding_reversed():
    torch.manual_seed(0)
    model = bl.DANN(4, 3, 6, lambd=0.7)
    x = torch.randn(10, 4)
    _, d = model(x)
    z = model.embedding(x)
    (g_rev,) = torch.autograd.grad(model(x)[1].sum(), model.embedding[0].weight)
    (g_plain,) = torch.autograd.grad(model.discriminator(z).sum(), model.embedding[0].weight)
    torch.testing.assert_close(g_rev, -0.7 * g_plain)


# ---- IRMv1 penalty ----------------------------------------------------------------------------------------------

def _risk(w, z, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(w * z, y)


def test_irm_penalty_is_zero_when_the_scale_is_optimal_in_every_environment():
    # environment 1: 3 of 4 examples positive at logit log 3 (sigmoid = 3/4); environment 2: soft targets sigmoid(z)
    z1 = torch.full((4,), math.log(3.0), dtype=torch.float64)
    y1 = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    z2 = torch.tensor([-2.0, 0.3, 1.5], dtype=torch.float64)
    y2 = torch.sigmoid(z2)
    for z, y in ((z1, y1), (z2, y2)):
        assert float(bl.irm_penalty(z, y).detach()) < 1e-28
    # the same logits with other labels: the scale is no longer optimal
    assert float(bl.irm_penalty(z1, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)).detach()) > 1e-3
    assert float(bl.irm_penalty(z2, (z2 > 0).double()).detach()) > 1e-3


def test_irm_penalty_equals_the_squared_finite_difference_derivative_and_is_differentiable():
    torch.manual_seed(1)
    z = torch.randn(20, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(20, dtype=torch.float64) > 0.5).double()
    h = 1e-6
    with torch.no_grad():
        fd = (_risk(1 + h, z, y) - _risk(1 - h, z, y)) / (2 * h)
    penalty = bl.irm_penalty(z, y)
    value = float(penalty.detach())
    assert value > 0
    assert value == pytest.approx(float(fd) ** 2, rel=1e-6)
    (g,) = torch.autograd.grad(penalty, z)  # create_graph=True: the penalty trains Phi
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ---- training ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_task():
    return data.make_spirals_task(TINY_DATA)


@pytest.mark.parametrize("method", bl.METHODS)
def test_each_baseline_trains_and_reports_accuracies(method, tiny_task):
    config = bl.method_config(TINY, method)
    history = bl.train_baseline(method, tiny_task, config)
    assert [r["epoch"] for r in history] == [1, 2]
    for r in history:
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1
        assert math.isfinite(r["train_loss"])


@pytest.mark.parametrize("options", [{"dropout": 0.5, "l1": 1e-4, "weight_decay": 1e-3},
                                     {"batch_norm": True, "l1": 1e-5}])
def test_erm_regularisers_run(options, tiny_task):
    history = bl.train_baseline("erm", tiny_task, dataclasses.replace(TINY, **options))
    assert len(history) == 2 and 0 <= history[-1]["test_acc"] <= 1


def test_and_mask_with_batch_norm_and_sgd_runs(tiny_task):
    config = dataclasses.replace(bl.method_config(TINY, "and_mask"), batch_norm=True, optimizer="sgd")
    assert len(bl.train_baseline("and_mask", tiny_task, config)) == 2


def test_train_baseline_is_the_loop_around_an_algorithms_update(monkeypatch, tiny_task):
    """An algorithm that predicts 1 everywhere and reports its step number as the risk: the loop hands it every
    environment's batches once per epoch, and the history averages what it reports."""
    calls = []

    class Constant(bl.Algorithm):
        def backward(self, X, y, envs):
            calls.append((tuple(X.shape), envs.tolist()))
            for p in self.model.parameters():
                p.grad = torch.zeros_like(p)
            return torch.tensor(float(self.steps)), torch.ones(y.numel()), {"groups": float(len(envs)) + self.steps}

        def predict(self, X):
            return torch.ones(len(X))

    monkeypatch.setitem(bl.ALGORITHMS, "erm", Constant)
    history = bl.train_baseline("erm", tiny_task, dataclasses.replace(TINY, n_agreement_envs=2))
    steps = (TINY_DATA.examples_per_env // TINY.batch_size) * (TINY_DATA.n_train_envs // 2)  # 4 batches x 2 groups
    assert len(calls) == TINY.epochs * steps
    assert {shape for shape, _ in calls} == {(2, TINY.batch_size, tiny_task.X_train.shape[2])}
    for epoch in range(TINY.epochs):
        envs = [e for _, group in calls[epoch * steps:(epoch + 1) * steps] for e in group]
        assert sorted(envs) == sorted(list(range(TINY_DATA.n_train_envs)) * 4)
    for epoch, record in enumerate(history):
        numbers = range(epoch * steps, (epoch + 1) * steps)
        assert record["train_loss"] == pytest.approx(np.mean(numbers))
        assert record["groups"] == pytest.approx(2 + np.mean(numbers))
        # every training example is seen once per epoch, and "1" is right where the label is 1
        assert record["train_acc"] == pytest.approx(tiny_task.y_train.mean())
        assert record["test_acc"] == pytest.approx(tiny_task.y_test.mean())


# ---- the exact step of each method --------------------------------------------------------------------------
# The optimizer of train_baseline is wrapped to record, at every step, the parameters and the gradients it is
# handed and the parameters it leaves; the model is wrapped to record its training-mode inputs and dropout masks.
# The expected gradients come from an independent route: the NumPy oracle (reference.mlp) for ERM with and without
# BatchNorm, and a hand-written float64 forward in torch for IRM's penalty and for dropout.

STEP_CONFIG = bl.BaselineConfig(hidden=(8, 8), batch_size=8, epochs=1, lr=0.1, optimizer="sgd", momentum=0.0)
N_ENVS, N_IN = 2, 3
REAL_MAKE_OPTIMIZER, REAL_BUILD_MLP = bl.make_optimizer, bl.build_mlp  # before any test patches them


class Step(NamedTuple):
    before: list  # float64 copies of the parameters, the gradients and the parameters after the step
    grads: list
    after: list


class Recorder:
    """Patches ``baselines.make_optimizer`` and ``baselines.build_mlp`` to record every optimizer step and every
    training-mode forward pass (its input, and the keep-masks of its Dropout layers)."""

    def __init__(self, monkeypatch):
        self.steps, self.inputs, self.masks, self.models = [], [], [], []

        def snapshot(params, attribute=None):
            return [(p if attribute is None else getattr(p, attribute)).detach().double().clone() for p in params]

        def make(params, *args, **kwargs):
            params = list(params)
            optimizer = REAL_MAKE_OPTIMIZER(params, *args, **kwargs)
            real_step = optimizer.step

            def step(*a, **k):
                before, grads = snapshot(params), snapshot(params, "grad")
                result = real_step(*a, **k)
                self.steps.append(Step(before, grads, snapshot(params)))
                return result

            optimizer.step = step
            return optimizer

        def build(*args, **kwargs):
            model = REAL_BUILD_MLP(*args, **kwargs)

            def record_input(module, inputs):
                if module.training:
                    self.inputs.append(inputs[0].detach().double().clone())
                    self.masks.append([])

            def record_mask(module, inputs, output):
                if module.training:
                    self.masks[-1].append((output != 0).double())

            model.register_forward_pre_hook(record_input)
            for layer in model:
                if isinstance(layer, torch.nn.Dropout):
                    layer.register_forward_hook(record_mask)
            self.models.append(model)
            return model

        monkeypatch.setattr(bl, "make_optimizer", make)
        monkeypatch.setattr(bl, "build_mlp", build)


def step_task():
    """Two environments of 8 float32-exact inputs with label 1[x_0 > 0], so a step's labels follow from its
    inputs; with batch 8, one step per epoch."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N_ENVS, STEP_CONFIG.batch_size, N_IN)).astype(np.float32).astype(np.float64)
    X_test = rng.standard_normal((40, N_IN)).astype(np.float32).astype(np.float64)
    return training.EnvironmentData(X, (X[..., 0] > 0).astype(np.float64), X_test, (X_test[:, 0] > 0) * 1.0)


def train_recorded(monkeypatch, method, config):
    recorder = Recorder(monkeypatch)
    history = bl.train_baseline(method, step_task(), config)
    assert len(recorder.steps) == len(recorder.inputs) == config.epochs  # one step per epoch here
    return recorder, history


def step_batch(flat):
    """The step's inputs [K, B, in] (train_baseline stacks environment e's B rows at e*B) and their labels."""
    X = flat.reshape(N_ENVS, -1, N_IN)
    return X, (X[..., 0] > 0).double()


def oracle_spec(batch_norm=False):
    return mlp.MLPSpec(in_features=N_IN, hidden=STEP_CONFIG.hidden, batch_norm=batch_norm)


def oracle_risk_gradient(step, flat, batch_norm=False):
    """Gradient of the pooled risk mean_e L_e by the NumPy oracle, at the step's parameters and inputs."""
    X, Y = step_batch(flat)
    grads, _ = mlp.pooled_gradient(oracle_spec(batch_norm), [p.numpy() for p in step.before], X.numpy(),
                                    Y.numpy(), loss="bce_with_logits", semantics="pooled")
    return [torch.as_tensor(g) for g in grads]


def assert_float32_close(actual, expected, scale=None):
    """Tensors computed in float32 (training) against float64 references, each list element separately; absolute
    tolerance relative to ``scale``, by default the largest expected magnitude."""
    assert len(actual) == len(expected)
    scale = scale or max(float(e.abs().max()) for e in expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e.to(a.dtype), rtol=1e-4, atol=1e-5 * scale)


def hand_forward(params, X, *, masks=(), p=0.0):
    """Logits of the documented MLP (Linear -> LeakyReLU(0.01) [-> Dropout] per hidden layer, then Linear) in
    float64, with the given dropout keep-masks scaled by 1 / (1 - p)."""
    h = X
    for i in range(0, len(params) - 2, 2):
        h = torch.nn.functional.leaky_relu(h @ params[i].T + params[i + 1], 0.01)
        if masks:
            h = h * masks[i // 2] / (1 - p)
    return (h @ params[-2].T + params[-1]).squeeze(-1)


def test_erm_step_is_the_risk_gradient_and_l1_adds_exactly_l1_sign_theta(monkeypatch):
    l1 = 1e-2
    plain, _ = train_recorded(monkeypatch, "erm", STEP_CONFIG)
    with_l1, _ = train_recorded(monkeypatch, "erm", dataclasses.replace(STEP_CONFIG, l1=l1))
    (step0,), (step1,) = plain.steps, with_l1.steps
    assert torch.equal(plain.inputs[0], with_l1.inputs[0])  # the same seed: the same batch and initial weights
    for a, b in zip(step0.before, step1.before):
        assert torch.equal(a, b)
    assert_float32_close(step0.grads, oracle_risk_gradient(step0, plain.inputs[0]))
    # the L1 term l1 * sum|theta| adds l1 * sign(theta) to the gradient (every parameter, biases too) ...
    signs = [torch.sign(p) for p in step0.before]
    assert all(bool((s != 0).all()) for s in signs)
    gradient_scale = max(float(g.abs().max()) for g in step0.grads)  # float32 rounding of the gradients
    assert_float32_close([b - a for a, b in zip(step0.grads, step1.grads)], [l1 * s for s in signs], gradient_scale)
    # ... so plain SGD's step changes by -lr * l1 * sign(theta)
    assert_float32_close([(b1 - b0) - (a1 - a0) for a0, a1, b0, b1 in zip(step0.before, step0.after, step1.before,
                                                                          step1.after)],
                         [-STEP_CONFIG.lr * l1 * s for s in signs], max(float(t.abs().max()) for t in step0.before))


def test_erm_l2_is_coupled_weight_decay_before_adam(monkeypatch):
    # Adam's first step is -lr * g' / (|g'| + eps) with g' = g + wd * theta: decay inside the moments ('before');
    # decoupled decay (AdamW) would give -lr * g / (|g| + eps) - lr * wd * theta instead
    wd = 0.1
    recorder, _ = train_recorded(monkeypatch, "erm", dataclasses.replace(STEP_CONFIG, optimizer="adam",
                                                                         weight_decay=wd))
    (step,) = recorder.steps
    assert_float32_close(step.grads, oracle_risk_gradient(step, recorder.inputs[0]))  # L2 is not in the loss
    coupled = [g + wd * theta for g, theta in zip(step.grads, step.before)]
    expected = [theta - STEP_CONFIG.lr * g / (g.abs() + 1e-8) for theta, g in zip(step.before, coupled)]
    assert_float32_close(step.after, expected)


def test_erm_dropout_masks_the_training_forward_and_not_the_evaluation(monkeypatch):
    p = 0.5
    recorder, history = train_recorded(monkeypatch, "erm", dataclasses.replace(STEP_CONFIG, dropout=p))
    (step,), (masks,) = recorder.steps, recorder.masks
    # one Dropout after each hidden activation, each dropping about half of its 16 x 8 activations
    assert [layer.p for layer in recorder.models[0] if isinstance(layer, torch.nn.Dropout)] == [p, p]
    assert len(masks) == 2 and all(0.25 < float(1 - m.mean()) < 0.75 for m in masks)
    X, Y = step_batch(recorder.inputs[0])
    theta = [t.clone().requires_grad_(True) for t in step.before]
    logits = hand_forward(theta, X.reshape(-1, N_IN), masks=masks, p=p).reshape(Y.shape)
    risk = torch.nn.functional.binary_cross_entropy_with_logits(logits, Y, reduction="none").mean(dim=1).mean()
    assert_float32_close(step.grads, torch.autograd.grad(risk, theta))
    # the test accuracy is measured without dropout
    task = step_task()
    with torch.no_grad():
        test_logits = hand_forward(step.after, torch.as_tensor(task.X_test))
    correct = int(((test_logits > 0).double() == torch.as_tensor(task.y_test)).sum())
    assert history[-1]["test_acc"] == pytest.approx(correct / len(task.y_test), abs=1e-6)  # a float32 mean


def test_erm_batch_norm_uses_the_step_statistics_in_training_and_the_running_ones_in_evaluation(monkeypatch):
    recorder, history = train_recorded(monkeypatch, "erm", dataclasses.replace(STEP_CONFIG, batch_norm=True))
    (step,), model = recorder.steps, recorder.models[0]
    # gradient through BatchNorm with the statistics of the step's 2 x 8 stacked rows (the oracle, "pooled")
    assert_float32_close(step.grads, oracle_risk_gradient(step, recorder.inputs[0], batch_norm=True))
    # the running statistics took one training-mode update from those rows
    spec = oracle_spec(batch_norm=True)
    X, Y = step_batch(recorder.inputs[0])
    out = mlp.env_gradients(spec, [p.numpy() for p in step.before], X.numpy(), Y.numpy(), loss="bce_with_logits")
    running = mlp.update_running_stats(mlp.init_running_stats(spec), out.bn_stats)
    layers = [layer for layer in model if isinstance(layer, torch.nn.BatchNorm1d)]
    assert len(layers) == 2
    for layer, stats in zip(layers, running):
        assert_float32_close([layer.running_mean.double(), layer.running_var.double()],
                             [torch.as_tensor(stats.mean), torch.as_tensor(stats.var)])
    # the test accuracy uses the running statistics (eval mode)
    task = step_task()
    logits = mlp.predict(spec, [p.numpy() for p in step.after], task.X_test, running)[:, 0]
    correct = int(np.sum((logits > 0) == task.y_test))
    assert history[-1]["test_acc"] == pytest.approx(correct / len(task.y_test), abs=1e-6)  # a float32 mean


def test_irm_step_weighs_the_penalty_1_before_anneal_iters_and_the_full_weight_after(monkeypatch):
    weight, anneal = 100.0, 2
    config = dataclasses.replace(STEP_CONFIG, epochs=4, irm_penalty_weight=weight, irm_anneal_iters=anneal)
    recorder, _ = train_recorded(monkeypatch, "irm", config)
    for i, (step, flat) in enumerate(zip(recorder.steps, recorder.inputs)):
        X, Y = step_batch(flat)
        theta = [t.clone().requires_grad_(True) for t in step.before]
        z = hand_forward(theta, X.reshape(-1, N_IN)).reshape(Y.shape)
        risk = torch.nn.functional.binary_cross_entropy_with_logits(z, Y, reduction="none").mean(dim=1).mean()
        # IRMv1: the squared derivative of environment e's risk in a scale w at w = 1, mean_b (sigmoid(z) - y) z
        penalty = ((torch.sigmoid(z) - Y) * z).mean(dim=1).pow(2).mean()
        expected_weight = 1.0 if i < anneal else weight
        loss = (risk + expected_weight * penalty) / max(expected_weight, 1.0)  # divided by the weight when > 1
        expected = torch.autograd.grad(loss, theta, retain_graph=True)
        assert_float32_close(step.grads, expected)
        # the case discriminates: the penalty's own gradient is far above the tolerance, so a weight of 1 after
        # anneal_iters (or 100 before) would be seen
        penalty_gradient = torch.autograd.grad(penalty, theta)
        assert max(float(g.abs().max()) for g in penalty_gradient) > 1e-2 * max(float(g.abs().max()) for g in expected)


def test_early_abort_stops_a_run_that_memorises():
    # shortcut-only data: one large signature per environment, test shortcuts independent of the label
    task = data.make_spirals_task(data.SpiralsConfig(n_train_envs=4, examples_per_env=64, n_test=400, n_dims=8,
                                                     shortcut_scale=3.0, seed=0))
    config = bl.BaselineConfig(hidden=(32, 32), batch_size=16, epochs=40, lr=1e-2, early_abort=True)
    history = bl.train_baseline("erm", task, config)
    assert history[-1].get("aborted") is True
    assert len(history) < 40
    assert history[-1]["train_acc"] > 0.97 and history[-1]["test_acc"] < 0.6
    no_abort = bl.train_baseline("erm", task, dataclasses.replace(config, early_abort=False, epochs=len(history) + 2))
    assert len(no_abort) == len(history) + 2 and not any(r.get("aborted") for r in no_abort)


def test_bad_arguments_are_refused(tiny_task):
    with pytest.raises(ValueError, match="method"):
        bl.train_baseline("nope", tiny_task, TINY)
    with pytest.raises(ValueError, match="n_agreement_envs"):
        bl.train_baseline("erm", tiny_task, dataclasses.replace(TINY, n_agreement_envs=3))
    with pytest.raises(ValueError, match="dropout"):
        bl.train_baseline("and_mask", tiny_task, dataclasses.replace(TINY, dropout=0.5))


# ---- gradient correlation ---------------------------------------------------------------------------------------

def test_and_and_xor_masks_complement_each_other_with_a_shared_boundary():
    K = 8
    G = torch.randn(K, 2000, dtype=torch.float64)
    S = torch.sign(G).sum(dim=0).abs()
    assert gc.threshold_mask(G, 0.0).all() and gc.threshold_mask(G, -0.0).all()
    assert torch.equal(gc.threshold_mask(G, -1.0), S == 0)
    for tau in (0.25, 0.5, 0.75, 1.0):  # tau * K integer
        and_keep, xor_keep = gc.threshold_mask(G, tau), gc.threshold_mask(G, tau - 1.0)
        assert (and_keep | xor_keep).all()
        assert torch.equal(and_keep & xor_keep, S == round(tau * K))
        assert torch.equal(xor_keep, S <= (1 - (1 - tau)) * K + 1e-9)
    with pytest.raises(ValueError):
        gc.threshold_mask(G, 1.5)


def test_correlations_are_one_when_mechanism_and_shortcut_signals_coincide():
    # every column constant within each environment: permuting the mechanism or the shortcut rows changes nothing,
    # so the three gradient versions coincide
    torch.manual_seed(0)
    K, B = 6, 32
    X = torch.randn(K, 1, 5).expand(K, B, 5).contiguous()
    y = (torch.rand(K, B) > 0.5).float()
    model = gc._model(5, (16, 16), seed=0)
    sets = gc.gradient_sets(model, X, y, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sets["mechanism"], sets["original"])
    torch.testing.assert_close(sets["shortcut"], sets["original"])
    curves = gc.correlation_curves(sets, (-0.5, 0.0, 0.5))
    for key in ("mechanism", "shortcut"):
        for value in curves[key]:
            assert value == pytest.approx(1.0, abs=1e-9)


def test_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(50), rng.standard_normal(50)
    assert gc.pearson(torch.tensor(a), torch.tensor(b)) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert math.isnan(gc.pearson(torch.ones(2), torch.ones(2)))


def test_gradient_correlation_cli_writes_its_table(tmp_path, capsys):
    out = tmp_path / "gc"
    assert cli.main(["gradient-correlation", "--out", str(out), "--seeds", "2", "--taus=-1,0,1",
                     "--hidden", "8,8", "--n-envs", "4", "--batch-size", "16", "--n-dims", "3",
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "rho(mechanism)" in printed and "XOR" in printed and "AND" in printed
    table = (out / "table.txt").read_text()
    assert len(table.strip().splitlines()) == 4
    results = json.loads((out / "results.json").read_text())
    assert results["taus"] == [-1.0, 0.0, 1.0]
    assert len(results["mechanism"]["per_seed"]) == 2


# ---- the baselines command --------------------------------------------------------------------------------------

BASELINES_TINY = ["--n-envs", "4", "--examples-per-env", "16", "--n-test", "40", "--n-dims", "3", "--hidden", "8",
                  "--batch-size", "8", "--epochs", "2", "--no-progress"]


def test_baselines_cli_writes_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "bl"
    assert cli.main(["baselines", "--out", str(out), *BASELINES_TINY]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == list(bl.DEFAULT_METHODS)
    for name, r in results["methods"].items():
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["test_acc_std"] == 0.0
        assert len(r["runs"]) == 1 and len(r["runs"][0]["history"]) == 2 and r["runs"][0]["seed"] == 0
        assert name in printed
        assert (out / "units" / f"{name}-seed0.json").exists()
    assert results["config"]["methods"]["irm"]["irm_penalty_weight"] == 100.0
    # resume: a finished unit is not retrained (its stored file is reused as is)
    unit = out / "units" / "dann-seed0.json"
    stored = json.loads(unit.read_text())
    stored["seconds"] = 12345.0
    unit.write_text(json.dumps(stored))
    (out / "units" / "irm-seed0.json").unlink()
    assert cli.main(["baselines", "--out", str(out), *BASELINES_TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["dann"]["seconds"] == 12345.0
    assert (out / "units" / "irm-seed0.json").exists()
    # a different configuration is refused
    capsys.readouterr()
    assert cli.main(["baselines", "--out", str(out), *BASELINES_TINY, "--lr", "0.5"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_removing_the_label_independent_part_subtracts_the_null_gradient():
    from hardtovary.experiments import gradient_correlation as gc

    torch.manual_seed(0)
    K, P = 4, 50
    shared = torch.randn(P)
    signal = torch.randn(P)
    sets = {
        # every version = the same label-independent part + a version-specific signal
        "original": shared + signal + 0.01 * torch.randn(K, P),
        "mechanism": shared + signal + 0.01 * torch.randn(K, P),
        "shortcut": shared + torch.randn(P) + 0.01 * torch.randn(K, P),
        "null": shared + 0.01 * torch.randn(K, P),
    }
    plain = gc.correlation_curves(sets, [0.0])
    centred = gc.correlation_curves(sets, [0.0], remove_label_independent=True)
    # the shared part makes the unrelated shortcut signal look correlated; removing it exposes the truth
    assert plain["shortcut"][0] > 0.4
    assert abs(centred["shortcut"][0]) < 0.35
    assert centred["mechanism"][0] > 0.99


@pytest.mark.slow
def test_baselines_over_seeds_report_mean_and_sample_std(tmp_path, capsys):
    out = tmp_path / "bl"
    args = ["baselines", "--out", str(out), *BASELINES_TINY, "--methods", "erm,and_mask", "--seeds", "3",
            "--seed", "5"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seeds"] == [5, 6, 7]
    for name, r in results["methods"].items():
        assert [run["seed"] for run in r["runs"]] == [5, 6, 7]
        tests = [run["test_acc"] for run in r["runs"]]
        assert r["test_acc"] == pytest.approx(sum(tests) / 3)
        assert r["test_acc_std"] == pytest.approx(float(np.std(tests, ddof=1)))
        assert r["test_acc_min"] == min(tests)
        assert re.search(rf"^{name}\s+3\s+{r['train_acc']:.3f} ± {r['train_acc_std']:.3f}\s+"
                         rf"{r['test_acc']:.3f} ± {r['test_acc_std']:.3f}", printed, re.M), printed
    # a seed's run equals the single run with that seed
    single = tmp_path / "single"
    assert cli.main(["baselines", "--out", str(single), *BASELINES_TINY, "--methods", "erm", "--seed", "6"]) == 0
    alone = json.loads((single / "results.json").read_text())["methods"]["erm"]["runs"][0]
    assert alone["test_acc"] == results["methods"]["erm"]["runs"][1]["test_acc"]
    assert alone["history"] == results["methods"]["erm"]["runs"][1]["history"]
    assert (out / "table.txt").read_text().strip() in printed
    if importlib.util.find_spec("matplotlib") is not None:  # the plots are optional ('hardtovary[plot]')
        for png in ("accuracy_bars.png", "learning_curves.png"):
            assert (out / png).stat().st_size > 1000
    else:
        assert "plots: skipped (matplotlib is not installed" in printed
