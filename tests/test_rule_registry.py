"""Adding a rule takes one oracle function and one entry per backend (``hardtovary.reference.rules`` module
docstring, "How to add a rule"). "Sign of the mean", ``value = sign(mean_e G[e])`` with every component kept and no
tau, is added here for the duration of each test through exactly those entry points, and every backend, the
reference training loop and the batched sweep then compute it."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hardtovary.accel import rules as A
from hardtovary.accel.sweep import train_sweep
from hardtovary.accel.torch import rules as T
from hardtovary.conformance import checks, registry, runner  # importing checks registers the built-in ones
from hardtovary.conformance.accel_target import AccelTarget
from hardtovary.conformance.targets import ReferenceTarget, reference
from hardtovary.conformance.torch_target import TorchTarget
from hardtovary.reference import data, training
from hardtovary.reference import rules as R

BUILT_IN = ("mean", "and_mask", "geometric_mean", "sand_mask")


# -- the rule, once per backend ------------------------------------------------------------------------------------

def sign_of_mean(G, spec):
    """The oracle: a validated float64 stack G[K, *shape] -> (value, mask)."""
    return np.sign(R.mean_gradient(G)), np.ones(G.shape[1:], dtype=bool)


def sign_of_mean_block(g, p, cdt, xp):
    """accel: a [K, C] block of NumPy or CuPy, in the compute dtype; NaN where the sum is not finite."""
    total = g.astype(cdt, copy=False).sum(axis=0)
    value = xp.where(xp.isfinite(total), xp.sign(total), cdt.type(np.nan))
    return value.astype(cdt, copy=False), xp.ones(total.shape, dtype=bool)


def sign_of_mean_torch(G, mean, spec):
    """torch: the validated stack and its mean in the compute dtype."""
    return torch.sign(mean), torch.ones(G.shape[1:], dtype=torch.bool, device=G.device)


@pytest.fixture
def oracle_only(monkeypatch):
    monkeypatch.setitem(R.REGISTRY, "sign_mean", R.Rule(sign_of_mean))
    return R.RuleSpec("sign_mean")


@pytest.fixture
def sign_mean(oracle_only, monkeypatch):
    monkeypatch.setitem(A.REGISTRY, "sign_mean", A.AccelRule(sign_of_mean_block))
    monkeypatch.setitem(T.REGISTRY, "sign_mean", sign_of_mean_torch)
    return oracle_only


# -- the tests -----------------------------------------------------------------------------------------------------

def test_the_spec_takes_the_new_rule_with_the_options_its_entry_declares(sign_mean):
    assert sign_mean == R.RuleSpec("sign_mean", 0) == R.RuleSpec(rule="sign_mean", tau=0.0)
    assert (sign_mean.tau, sign_mean.flavour, sign_mean.k, sign_mean.threshold(7)) == (0.0, None, None, 0)
    with pytest.raises(ValueError, match=r"tau must be None or 0 for rule='sign_mean'"):
        R.RuleSpec("sign_mean", 0.5)
    with pytest.raises(ValueError, match=r"flavour applies only to rule='geometric_mean', got flavour='paper' "
                                         r"with rule='sign_mean'"):
        R.RuleSpec("sign_mean", flavour="paper")
    with pytest.raises(ValueError, match=r"k applies only to rule='sand_mask'"):
        R.RuleSpec("sign_mean", k=3.0)
    assert R.rule_options("sign_mean", 0.7) == {}  # a caller that always has a tau: dropped, as for mean
    assert R.RULES == BUILT_IN


@pytest.mark.parametrize("rescale", [False, True])
def test_every_backend_computes_the_signs_worked_out_by_hand(sign_mean, rescale):
    # means per column: 1.5, -1.5, -0.5, 0, 0 and (second tensor) 2/3, -1/3
    cases = [(np.array([[1.0, -2.0, 3.0, 0.5, 0.0], [2.0, -1.0, -4.0, -0.5, 0.0]]), [1.0, -1.0, -1.0, 0.0, 0.0]),
             (np.array([[[1.0, -1.0]], [[0.0, 0.0]], [[1.0, 0.0]]]), [[1.0, -1.0]])]
    for G, expected in cases:  # every component kept: rescaling changes nothing
        stacks = [G]
        outputs = [R.aggregate(stacks, sign_mean, rescale=rescale),
                   R.aggregate(stacks, rule="sign_mean", rescale=rescale)]
        for dtype in (np.float64, np.float32, np.float16):
            outputs.append(A.aggregate([G.astype(dtype) for G in stacks], sign_mean, rescale=rescale))
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            values, masks = T.aggregate([torch.from_numpy(G).to(dtype) for G in stacks], rule="sign_mean",
                                        rescale=rescale)
            outputs.append(([v.to(torch.float64).numpy() for v in values], [m.numpy() for m in masks]))
        for values, masks in outputs:
            assert np.asarray(values[0], dtype=np.float64).tolist() == expected
            assert masks[0].dtype == bool and masks[0].all() and masks[0].shape == np.shape(expected)


def test_the_backends_agree_on_random_stacks(sign_mean):
    rng = np.random.default_rng(3)
    for K in range(1, 9):
        grads = [rng.standard_normal((K, 6, 5)), rng.standard_normal((K, 7))]
        grads[0][:, 0] = 0.0
        oracle, _ = R.aggregate(grads, sign_mean, rescale=True)
        accel, _ = A.aggregate(grads, sign_mean, rescale=True)
        torch_values, _ = T.aggregate([torch.from_numpy(G) for G in grads], sign_mean, rescale=True)
        for o, a, t in zip(oracle, accel, torch_values):
            np.testing.assert_array_equal(a, o)
            np.testing.assert_array_equal(t.numpy(), o)
        assert np.all(oracle[0][0] == 0.0) and set(np.unique(oracle[1])) <= {-1.0, 1.0}


def test_the_training_loops_take_the_new_rule_unchanged(sign_mean):
    """TrainConfig, the reference loop and the batched sweep know rules only through the spec."""
    task = data.make_spirals_task(data.SpiralsConfig(n_train_envs=4, examples_per_env=24, n_test=20, n_dims=4))
    env = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    config = training.TrainConfig(method="sign_mean", tau=0.8, hidden=(6,), batch_size=8, n_agreement_envs=2,
                                  epochs=2, lr=1e-2, seed=5)
    assert config.rule_spec == sign_mean  # tau is a number for every method, and the rule takes none
    reference = training.train(env, config)
    (batched,) = train_sweep(env, [config], backend="numpy")
    assert reference.history[-1]["kept_fraction"] == 1.0
    for a, b in zip(batched.params, reference.params):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_a_backend_without_an_entry_refuses_the_rule(oracle_only):
    G = np.ones((2, 3))
    assert R.aggregate([G], oracle_only)[0][0].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(NotImplementedError, match=r"'sign_mean' has no entry in hardtovary.accel.rules.REGISTRY"):
        A.aggregate([G], oracle_only)
    with pytest.raises(NotImplementedError, match=r"'sign_mean' has no entry in hardtovary.accel.torch.rules"):
        T.aggregate([torch.from_numpy(G)], rule="sign_mean")


# -- the conformance entry -------------------------------------------------------------------------------------------

@pytest.fixture
def sign_mean_checks(sign_mean):
    saved = dict(registry.CHECKS)
    yield checks.register_rule("sign_mean")
    registry.CHECKS.clear()
    registry.CHECKS.update(saved)


@pytest.mark.slow
def test_one_conformance_entry_checks_the_new_rule_on_every_target(sign_mean_checks):
    dtypes = ("float64", "float32", "float16")
    assert sign_mean_checks == ([f"agg.oracle.sign_mean.{r}.{d}" for r in ("plain", "rescaled") for d in dtypes]
                                + [f"agg.prop.{p}.sign_mean.{d}" for p in ("permutation", "sign_flip") for d in dtypes])
    selected = ["agg.oracle.sign_mean", "agg.prop.permutation.sign_mean", "agg.prop.sign_flip.sign_mean",
                "agg.special.k1"]
    for target in (reference, AccelTarget("numpy"), TorchTarget()):
        results = runner.run_suite(target, checks=selected, max_examples=5)
        assert [r.verdict for r in results] == ["pass"] * 13, [(r.check_id, r.message) for r in results]
        # the edge case runs the new rule too: 22 cases of the built-in rules, and sign_mean plain and rescaled
        (k1,) = [r for r in results if r.check_id == "agg.special.k1"]
        assert k1.compared == 24

    class Flipped(ReferenceTarget):
        def aggregate(self, grads, *, rule, **options):
            values = super().aggregate(grads, rule=rule, **options)
            return [-v for v in values] if rule == "sign_mean" else values

    (result,) = runner.run_suite(Flipped(), checks=["agg.oracle.sign_mean.plain.float64"], max_examples=5)
    assert result.verdict == "FAIL"
