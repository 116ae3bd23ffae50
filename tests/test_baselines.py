"""Baselines of the synthetic task (DANN's gradient reversal, IRMv1, ERM, AND-mask in torch) and the gradient
correlations of Fig. 7, with their command-line subcommands."""

import dataclasses
import importlib.util
import json
import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hardtovary.experiments import baselines as bl  # noqa: E402
from hardtovary.experiments import cli  # noqa: E402
from hardtovary.experiments import gradient_correlation as gc  # noqa: E402
from hardtovary.reference import data  # noqa: E402

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


def test_irm_anneals_then_applies_the_full_penalty(tiny_task):
    config = dataclasses.replace(bl.method_config(TINY, "irm"), irm_penalty_weight=1e4, irm_anneal_iters=4,
                                 epochs=3)
    history = bl.train_baseline("irm", tiny_task, config)
    assert all("irm_penalty" in r and r["irm_penalty"] >= 0 for r in history)


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
