"""Fig. 7's shortcut side (paper §3.1, App. B.3.5): the floor that the shortcut gap q puts under rho(shortcut), the
separability of mechanism and shortcut components, the initialisations and the training before the measurement,
and their command-line options. The mask, Pearson and the label-independent part are tested in test_baselines.py."""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hardtovary.experiments import cli
from hardtovary.experiments import gradient_correlation as gc

TINY = ["--seeds", "2", "--taus=-1,0,1", "--hidden", "8,8", "--n-envs", "4", "--batch-size", "16", "--n-dims", "3",
        "--no-progress"]


def np_pearson(x, y):
    return float(np.corrcoef(x, y)[0, 1])


# ---- the floor under rho(shortcut) -------------------------------------------------------------------------------

def test_pearson_floor_by_hand():
    assert gc.pearson_floor(0.0) == 1.0
    assert gc.pearson_floor(0.6) == pytest.approx(0.8)  # a 3-4-5 triangle
    assert gc.pearson_floor(0.8) == pytest.approx(0.6)
    assert gc.pearson_floor(1.0) == -1.0 and gc.pearson_floor(3.0) == -1.0
    assert math.isnan(gc.pearson_floor(float("nan")))
    with pytest.raises(ValueError, match="q must be >= 0"):
        gc.pearson_floor(-0.1)


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9])
def test_the_floor_is_reached_and_never_crossed(q):
    # Independent route: build the extreme D by geometry (g + D tangent to the ball of radius q|g| around g), then
    # search random directions of the same centred norm by brute force; numpy's corrcoef judges both.
    rng = np.random.default_rng(0)
    n = 3
    g = rng.standard_normal(n)
    gc_ = g - g.mean()
    u = rng.standard_normal(n)
    u -= u.mean()
    u -= (u @ gc_) / (gc_ @ gc_) * gc_  # centred and orthogonal to g's centred part
    u /= np.linalg.norm(u)
    norm = np.linalg.norm(gc_)
    extreme = -q * q * gc_ + q * math.sqrt(1 - q * q) * norm * u  # |extreme| = q |g|, angle arcsin(q)
    assert np.linalg.norm(extreme) == pytest.approx(q * norm)
    assert np_pearson(g + extreme, g) == pytest.approx(gc.pearson_floor(q), abs=1e-12)
    directions = rng.standard_normal((20000, n))
    directions -= directions.mean(axis=1, keepdims=True)
    directions *= q * norm / np.linalg.norm(directions, axis=1, keepdims=True)
    moved = gc_ + directions  # centred rows: Pearson's r is their cosine with g's centred part
    rs = moved @ gc_ / (np.linalg.norm(moved, axis=1) * norm)
    assert rs.min() >= gc.pearson_floor(q) - 1e-12
    assert rs.min() == pytest.approx(gc.pearson_floor(q), abs=2e-3)  # the search gets close: the bound is tight


def test_shortcut_gap_is_the_centred_norm_ratio_over_the_kept_components():
    # K = 4 environments, 6 components; component 5 has one dissenting environment, so tau = 1 drops it.
    G = torch.tensor([[1.0, -2.0, 3.0, 0.5, 4.0, 1.0],
                      [2.0, -1.0, 2.0, 0.7, 1.0, 1.0],
                      [1.5, -3.0, 1.0, 0.2, 2.0, 1.0],
                      [0.5, -2.0, 2.0, 0.6, 3.0, -1.0]], dtype=torch.float64)
    short = torch.tensor([[1.0, -1.0, 2.5, 0.1, 2.0, 9.0]], dtype=torch.float64).expand(4, 6)
    sets = {"original": G, "shortcut": short, "mechanism": G.flip(1), "null": torch.zeros(4, 6, dtype=torch.float64)}
    curves = gc.correlation_curves(sets, (0.0, 1.0))
    m, s = G.mean(0).numpy(), short[0].numpy()
    for i, kept in enumerate((slice(None), slice(0, 5))):
        x, y = m[kept], s[kept]
        d = (x - y) - (x - y).mean()
        expected = np.sqrt((d ** 2).sum()) / np.sqrt(((y - y.mean()) ** 2).sum())
        assert curves["shortcut_gap"][i] == pytest.approx(expected)
        assert curves["shortcut_floor"][i] == pytest.approx(math.sqrt(1 - expected ** 2) if expected < 1 else -1.0)
        assert curves["shortcut"][i] >= curves["shortcut_floor"][i] - 1e-12
    # fewer than 3 kept components: no gap, as no correlation
    two = {k: v[:, :2] for k, v in sets.items()}
    assert math.isnan(gc.correlation_curves(two, (1.0,))["shortcut_gap"][0])


@pytest.mark.slow
def test_the_floor_holds_on_real_gradients_for_every_tau():
    X = torch.randn(4, 32, 5, generator=torch.Generator().manual_seed(1))
    y = (torch.rand(4, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    sets = gc.gradient_sets(gc._model(5, (16, 16), seed=0), X, y, 2, torch.Generator().manual_seed(0))
    taus = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0)
    for centre in (False, True):
        curves = gc.correlation_curves(sets, taus, remove_label_independent=centre)
        for rho, floor in zip(curves["shortcut"], curves["shortcut_floor"]):
            if not math.isnan(rho):
                assert rho >= floor - 1e-9


# ---- what fair-coin signs would keep ------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [5, 8])
def test_coin_keep_fraction_is_the_mask_applied_to_every_sign_pattern(K):
    # Brute force: all 2^K sign patterns, equally likely, each a column of G; the mask itself judges them.
    patterns = torch.tensor([[1.0 if (n >> e) & 1 else -1.0 for n in range(2 ** K)] for e in range(K)])
    taus = [-1.0, -0.75, -0.6, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.8, 1.0]
    for tau in taus:
        kept = float(gc.threshold_mask(patterns, tau).double().mean())
        assert gc.coin_keep_fraction(tau, K) == pytest.approx(kept, abs=1e-15), tau


def test_coin_keep_fraction_by_hand():
    assert gc.coin_keep_fraction(1.0, 16) == 2.0 ** -15  # all 16 signs equal: 2 of 2^16 patterns
    assert gc.coin_keep_fraction(0.0, 16) == 1.0
    # tau = 0.5, K = 16: |2p - 16| >= 8, i.e. p <= 4 or p >= 12: 2 (1 + 16 + 120 + 560 + 1820) = 5034 patterns
    assert gc.coin_keep_fraction(0.5, 16) == 5034 / 2 ** 16
    assert gc.coin_keep_fraction(-1.0, 16) == math.comb(16, 8) / 2 ** 16  # XOR at -1: exactly S = 0
    assert gc.coin_keep_fraction(-1.0, 5) == 0.0  # odd K: S is never 0
    with pytest.raises(ValueError, match="tau must lie in"):
        gc.coin_keep_fraction(1.5, 4)


# ---- separability --------------------------------------------------------------------------------------------------

def test_separability_by_hand():
    # K = 3 environments, 4 components; r_j = |mean_e M[e, j]| / (sample std over e of S[e, j])
    null = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mech = null + torch.tensor([[-2.0, 0.1, 0.3, 5.0], [-2.0, 0.1, 0.3, 5.0], [-2.0, 0.1, 0.3, 5.0]])
    short = null + torch.tensor([[1.0, 1.0, 0.0, 7.0], [2.0, -1.0, 0.0, 7.0], [3.0, 0.0, 0.0, 7.0]])
    sets = {"mechanism": mech, "shortcut": short, "null": null}
    # components 2 and 3 have no spread over environments and are left out; r = [2 / 1, 0.1 / 1]
    out = gc.separability(sets)
    assert out["median"] == pytest.approx(1.05)
    assert out["fraction_ge_1"] == 0.5
    flat = {k: v[:, 2:] for k, v in sets.items()}
    assert all(math.isnan(v) for v in gc.separability(flat).values())


# ---- initialisations and the stage of training ---------------------------------------------------------------------

def test_the_initialisations():
    authors, torch_default = gc._model(40, (64, 64), seed=3), gc._model(40, (64, 64), seed=3, init="torch")
    for model in (authors, torch_default):
        assert [type(m).__name__ for m in model] == ["Linear", "LeakyReLU", "Linear", "LeakyReLU", "Linear"]
    linears = [m for m in authors if isinstance(m, torch.nn.Linear)]
    assert all(torch.all(m.bias == 0.01) for m in linears)
    # Kaiming normal: std sqrt(2 / fan_in)
    assert linears[0].weight.std().item() == pytest.approx(math.sqrt(2 / 40), rel=0.05)
    # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, std 1/sqrt(3 fan_in)
    for m in (m for m in torch_default if isinstance(m, torch.nn.Linear)):
        bound = 1 / math.sqrt(m.in_features)
        assert m.weight.abs().max() <= bound and m.bias.abs().max() <= bound
    first = torch_default[0].weight
    assert first.std().item() == pytest.approx(1 / math.sqrt(3 * 40), rel=0.05)


def plain_env_grads(model, X, y):
    """One autograd.grad per environment on its own forward: ``[K, P]``."""
    rows = []
    for e in range(X.shape[0]):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(X[e]).squeeze(-1), y[e])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


@pytest.mark.parametrize("rule", gc.TRAIN_RULES)
def test_one_training_step_is_adams_first_step_on_the_rule(rule):
    # Adam's first step from zero moments is -lr * g / (|g| + eps) (bias corrections cancel): -lr * sign(g) where
    # |g| >> eps, and exactly 0 where the update is 0 (masked).
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4, 16, 5, generator=gen, dtype=torch.float64)
    y = (torch.rand(4, 16, generator=gen) > 0.5).double()
    model = gc._model(5, (8,), seed=1).double()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    G = plain_env_grads(model, X, y)
    if rule == "mean":
        update = G.mean(0)
    else:
        agree = torch.sign(G).sum(0).abs() == G.shape[0]
        assert 0 < int(agree.sum()) < G.shape[1]  # the mask matters here
        update = torch.where(agree, G.mean(0), torch.zeros(()))
    gc.train(model, X, y, rule, 1)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = -gc.TRAIN_LR * update / (update.abs() + 1e-8)
    torch.testing.assert_close(after - before, expected, rtol=1e-6, atol=1e-12)
    assert torch.equal(after[update == 0], before[update == 0])


def test_zero_training_steps_leave_the_model_and_a_bad_rule_is_refused():
    model = gc._model(5, (8,), seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    X, y = torch.randn(2, 4, 5), torch.ones(2, 4)
    gc.train(model, X, y, "and_mask", 0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="rule must be one of"):
        gc.train(model, X, y, "sum", 1)


def test_run_measures_after_the_training_steps():
    # run's curves are those of a model trained by `train` for train_steps, on the data of the config
    from hardtovary.reference import data

    config = gc.GradientCorrelationConfig(hidden=(8,), n_seeds=1, taus=(0.0, 0.5), init="torch", train_steps=3,
                                          train_rule="and_mask", data=data.SpiralsConfig(
                                              n_train_envs=3, examples_per_env=16, n_test=2, n_dims=2))
    task = data.make_spirals_task(config.data)
    X, y = torch.as_tensor(task.X_train), torch.as_tensor(task.y_train)
    model = gc.train(gc._model(4, (8,), seed=0, init="torch"), X, y, "and_mask", 3)
    by_hand = gc.correlation_curves(gc.gradient_sets(model, X, y, 2, torch.Generator().manual_seed(0)), (0.0, 0.5))
    results = gc.run(config)
    for key in ("mechanism", "shortcut", "shortcut_gap"):
        assert results[key]["per_seed"][0] == pytest.approx(by_hand[key])
    at_init = gc.run(gc.GradientCorrelationConfig(**{**config.__dict__, "train_steps": 0}))
    assert at_init["shortcut"]["per_seed"][0] != pytest.approx(by_hand["shortcut"])


@pytest.mark.parametrize("field, value", [("init", "xavier"), ("train_steps", -1), ("train_steps", 1.5),
                                          ("train_steps", True), ("train_rule", "sum")])
def test_the_config_names_a_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        gc.GradientCorrelationConfig(**{field: value})


# ---- the command ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_command_reports_gap_floor_and_separability_and_records_init_and_training(tmp_path, capsys):
    out = tmp_path / "gc"
    assert cli.main(["gradient-correlation", "--out", str(out), *TINY, "--init", "torch", "--train-steps", "2",
                     "--train-rule", "and_mask"]) == 0
    printed = capsys.readouterr().out
    assert "q(short)" in printed and "floor" in printed and "coin" in printed and "separability r" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["coin"] == [gc.coin_keep_fraction(tau, 4) for tau in (-1.0, 0.0, 1.0)]
    assert {k: results["config"][k] for k in ("init", "train_steps", "train_rule", "train_lr")} == {
        "init": "torch", "train_steps": 2, "train_rule": "and_mask", "train_lr": gc.TRAIN_LR}
    assert len(results["separability"]["median"]) == 2
    for rho, floor in zip(results["shortcut"]["per_seed"], results["shortcut_floor"]["per_seed"]):
        assert all(r >= f - 1e-9 for r, f in zip(rho, floor) if r is not None)
    # the table's floor column is the mean of the per-seed floors
    rows = (out / "table.txt").read_text().strip().splitlines()[1:]
    assert [float(row.split()[-1]) for row in rows] == pytest.approx(results["shortcut_floor"]["mean"], abs=5e-4)


def test_the_default_is_the_paper_stage_with_the_authors_init(tmp_path):
    out = tmp_path / "gc"
    assert cli.main(["gradient-correlation", "--out", str(out), *TINY]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["init"], config["train_steps"], config["train_rule"]) == ("authors", 0, "mean")


@pytest.mark.parametrize("argv, named", [
    (["--train-rule", "mean"], "--train-rule"),
    (["--train-steps", "-1"], "--train-steps"),
    (["--init", "xavier"], "--init"),
    (["--train-rule", "max", "--train-steps", "1"], "--train-rule"),
])
def test_bad_options_are_one_error_line_naming_the_argument(tmp_path, capsys, argv, named):
    out = tmp_path / "gc"
    try:
        status = cli.main(["gradient-correlation", "--out", str(out), *TINY, *argv])
    except SystemExit as exc:  # argparse's own checks (choices) exit after the usage lines
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("hardtovary gradient-correlation: error: ") and named in errors[0], err
    assert not out.exists()
