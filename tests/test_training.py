"""The reference training loop: batching, the order of rule / L1 / weight decay, determinism, and the notebook's
patchwork regression (the authors' notebook linear_regression_ilc.ipynb)."""

import dataclasses

import numpy as np
import pytest

from hardtovary.reference import data, mlp, training


def tiny_config(**changes):
    base = training.TrainConfig(hidden=(8,), batch_size=4, n_agreement_envs=4, epochs=2, lr=1e-2, seed=3)
    return dataclasses.replace(base, **changes)


def tiny_spirals(n_envs=4, n=12, n_dims=3):
    task = data.make_spirals_task(data.SpiralsConfig(n_train_envs=n_envs, examples_per_env=n, n_test=20,
                                                     n_dims=n_dims, seed=1))
    return training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)


# -- batching -----------------------------------------------------------------------------------------------------

def test_permutation_groups_cycle_through_every_environment_before_repeating():
    rng = np.random.default_rng(0)
    groups = training.permutation_groups(12, 3, rng)
    for _ in range(5):
        cycle = np.concatenate([next(groups) for _ in range(4)])
        assert sorted(cycle.tolist()) == list(range(12))


@pytest.mark.parametrize("n_envs,agree", [(4, 4), (8, 2), (6, 3)])
def test_epoch_batches_use_each_example_at_most_once_and_drop_the_last_partial_batch(n_envs, agree):
    config = tiny_config(batch_size=5, n_agreement_envs=agree)
    n = 17  # 3 full batches of 5, 2 examples dropped
    seen = {e: [] for e in range(n_envs)}
    steps = 0
    for group, rows in training.epoch_batches(n_envs, n, config, np.random.default_rng(1)):
        assert len(set(group.tolist())) == agree and rows.shape == (agree, 5)
        for e, r in zip(group, rows):
            seen[int(e)].extend(r.tolist())
        steps += 1
    assert steps == training.steps_per_epoch(n_envs, n, config) == 3 * (n_envs // agree)
    for e in range(n_envs):
        assert len(seen[e]) == 15 and len(set(seen[e])) == 15


def test_configuration_rejects_groups_that_do_not_divide_the_environments():
    with pytest.raises(ValueError, match="n_agreement_envs=3 must divide"):
        training.train(tiny_spirals(n_envs=4), tiny_config(n_agreement_envs=3))


@pytest.mark.parametrize("field,value,error,match", [
    ("tau", 1.5, ValueError, "tau"), ("tau", True, TypeError, "tau"), ("method", "median", ValueError, "method"),
    ("optimizer", "rmsprop", ValueError, "optimizer"), ("lr", 0.0, ValueError, "lr"),
    ("weight_decay_order", "during", ValueError, "weight_decay_order"), ("batch_size", 0, ValueError, "batch_size"),
    ("flavour", "paper", ValueError, "flavour"),
])
def test_bad_configuration_names_the_field(field, value, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**{field: value})


def test_the_paper_geometric_mean_refuses_a_tau_it_would_not_train_with():
    """The paper flavour is defined only for unanimous signs (tau = 1): another tau is refused, never replaced."""
    with pytest.raises(ValueError, match="flavour='original'"):
        tiny_config(method="geometric_mean", tau=0.5)
    assert tiny_config(method="geometric_mean", tau=0.5, flavour="original").tau == 0.5
    assert tiny_config(method="geometric_mean", tau=1.0).tau == 1.0


def test_the_configuration_holds_its_rule_as_one_spec():
    """TrainConfig.rule_spec: method with tau, flavour and sand_k; mean takes no tau, whatever tau says."""
    RuleSpec = training.rules.RuleSpec
    assert tiny_config(method="mean", tau=0.7).rule_spec == RuleSpec("mean", None)
    assert tiny_config(method="and_mask", tau=0.5).rule_spec == RuleSpec("and_mask", 0.5)
    assert tiny_config(method="geometric_mean", tau=1.0).rule_spec == RuleSpec("geometric_mean", 1.0, "paper")
    assert (tiny_config(method="geometric_mean", tau=0.5, flavour="original").rule_spec
            == RuleSpec("geometric_mean", 0.5, "original"))
    assert tiny_config(method="sand_mask", tau=0.25).rule_spec == RuleSpec("sand_mask", 0.25, None, 10.0)
    assert tiny_config(method="sand_mask", tau=0.25, sand_k=3).rule_spec == RuleSpec("sand_mask", 0.25, None, 3.0)
    with pytest.raises(ValueError, match="k must be > 0"):  # refused when the configuration is made
        tiny_config(method="sand_mask", sand_k=-1.0)
    with pytest.raises(ValueError, match="k applies only to rule='sand_mask'"):
        tiny_config(method="and_mask", sand_k=3.0)
    with pytest.raises(ValueError, match="flavour applies only to rule='geometric_mean'"):
        tiny_config(method="mean", flavour="original")


@pytest.mark.parametrize("config, keywords", [
    ({"method": "mean", "tau": 0.7, "rescale": True}, {"rule": "mean", "rescale": True}),
    ({"method": "and_mask", "tau": 0.5, "rescale": True}, {"rule": "and_mask", "tau": 0.5, "rescale": True}),
    ({"method": "geometric_mean", "tau": 0.5, "flavour": "original"},
     {"rule": "geometric_mean", "tau": 0.5, "flavour": "original"}),
    ({"method": "sand_mask", "tau": 0.25, "sand_k": 3.0, "rescale": True},
     {"rule": "sand_mask", "tau": 0.25, "k": 3.0, "rescale": True}),
])
def test_aggregate_gradients_applies_the_configured_rule(config, keywords):
    rng = np.random.default_rng(2)
    G = [rng.standard_normal((4, 3, 2)), rng.standard_normal((4, 5))]
    G[0][:2, 0] = 0.0
    values, masks = training.aggregate_gradients(G, tiny_config(**config))
    want_values, want_masks = training.rules.aggregate(G, **keywords)
    for a, b in zip(values + masks, want_values + want_masks):
        np.testing.assert_array_equal(a, b)


def test_check_fits_names_what_does_not_fit():
    env_data = tiny_spirals(n_envs=4, n=12)
    training.check_fits(env_data, tiny_config(n_agreement_envs=2, batch_size=12))
    with pytest.raises(ValueError, match="n_agreement_envs=3 must divide the number of training environments 4"):
        training.check_fits(env_data, tiny_config(n_agreement_envs=3))
    with pytest.raises(ValueError, match="batch_size=13 exceeds the 12 examples per environment"):
        training.check_fits(env_data, tiny_config(batch_size=13))


# -- what the loop does ---------------------------------------------------------------------------------------------

def test_training_is_deterministic_per_seed_and_records_every_epoch():
    env_data = tiny_spirals()
    a = training.train(env_data, tiny_config())
    b = training.train(env_data, tiny_config())
    c = training.train(env_data, tiny_config(seed=4))
    assert [r["epoch"] for r in a.history] == [1, 2]
    assert a.history == b.history
    assert all(np.array_equal(p, q) for p, q in zip(a.params, b.params))
    assert not all(np.array_equal(p, q) for p, q in zip(a.params, c.params))
    for r in a.history:
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and 0 <= r["kept_fraction"] <= 1


def conflicting_environments():
    """Two environments holding the same single input with opposite labels: every per-environment BCE gradient
    component is (sigmoid(z) - y) dz/dtheta, with opposite signs in the two environments (sigmoid(z) - 1 < 0 <
    sigmoid(z)), so the AND-mask with tau = 1 masks every component."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((1, 1, 3))
    X_train = np.concatenate([X, X])
    y_train = np.array([[1.0], [0.0]])
    return training.EnvironmentData(X_train, y_train, X[0], y_train[0])


def initial_params(env_data, config):
    return mlp.init_params(training.model_spec(env_data, config), np.random.default_rng(config.seed))


@pytest.mark.parametrize("activation", ["leaky_relu", "tanh"])
def test_l1_term_is_added_after_the_mask_and_is_never_masked(activation):
    env_data = conflicting_environments()
    config = tiny_config(hidden=(5,), activation=activation, method="and_mask", tau=1.0, optimizer="sgd",
                         momentum=0.0, weight_decay=0.0, l1=0.01, lr=0.1, n_agreement_envs=2, epochs=1, batch_size=1)
    theta0 = initial_params(env_data, config)
    result = training.train(env_data, config)
    assert result.history[0]["kept_fraction"] == 0.0
    for p0, p1 in zip(theta0, result.params):
        np.testing.assert_allclose(p1, p0 - 0.1 * 0.01 * np.sign(p0), rtol=0, atol=1e-15)


def test_coupled_weight_decay_acts_on_masked_coordinates():
    env_data = conflicting_environments()
    config = tiny_config(hidden=(5,), method="and_mask", tau=1.0, optimizer="sgd", momentum=0.0, weight_decay=0.05,
                         weight_decay_order="before", lr=0.1, n_agreement_envs=2, epochs=1, batch_size=1)
    theta0 = initial_params(env_data, config)
    result = training.train(env_data, config)
    for p0, p1 in zip(theta0, result.params):
        np.testing.assert_allclose(p1, p0 * (1 - 0.1 * 0.05), rtol=1e-14, atol=1e-15)


def test_averaging_moves_where_the_and_mask_does_not():
    env_data = conflicting_environments()
    config = tiny_config(hidden=(5,), method="mean", tau=0.0, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                         lr=0.1, n_agreement_envs=2, epochs=1, batch_size=1)
    theta0 = initial_params(env_data, config)
    result = training.train(env_data, config)
    assert result.history[0]["kept_fraction"] == 1.0
    assert max(np.abs(p1 - p0).max() for p0, p1 in zip(theta0, result.params)) > 1e-4


def test_batch_norm_run_tracks_running_statistics_and_evaluates_in_eval_mode():
    env_data = tiny_spirals()
    result = training.train(env_data, tiny_config(batch_norm=True, bn_semantics="pooled"))
    assert result.running_stats is not None
    loss, acc = training.evaluate(training.model_spec(env_data, tiny_config(batch_norm=True)), result.params,
                                  env_data.X_test, env_data.y_test, "bce_with_logits", result.running_stats)
    assert acc == result.history[-1]["test_acc"] and loss == result.history[-1]["test_loss"]


# -- the patchwork regression of the authors' notebook linear_regression_ilc.ipynb ---------------------------------

def ridge_fixed_point():
    """The stationary point of GD on the mean loss with decoupled weight decay 0.01: solves
    (X^T X / K + 0.01 I) theta = X^T y / K in closed form (independent of the training loop)."""
    X = 3 * np.hstack([np.eye(4), 0.1 * np.ones((4, 1))])
    y = np.ones(4)
    return np.linalg.solve(X.T @ X / 4 + 0.01 * np.eye(5), X.T @ y / 4)


@pytest.mark.slow
def test_averaging_converges_to_the_ridge_fixed_point():
    theta = training.train_patchwork_regression("mean", lr_decay=1.0, n_iters=20000)
    np.testing.assert_allclose(theta, ridge_fixed_point(), rtol=0, atol=1e-5)


def test_averaging_reaches_the_patchwork_solution_with_the_notebook_settings():
    for seed in range(3):
        theta = training.train_patchwork_regression("mean", seed=seed)
        # the notebook's printed result, ~[0.319, 0.319, 0.319, 0.319, 0.126]; after 1000 steps the slow direction
        # (shared feature vs the four private ones) still remembers the random initialisation
        np.testing.assert_allclose(theta[:4], 0.319, atol=3e-3)
        assert abs(theta[4] - 0.126) < 0.025, theta


@pytest.mark.parametrize("method", ["and_mask", "geometric_mean"])
def test_and_mask_and_geometric_mean_reach_the_invariant_solution(method):
    for seed in range(3):
        theta = training.train_patchwork_regression(method, seed=seed)
        # only the feature shared by every environment is used; its fixed point 0.3 (0.3 t - 1) + 0.01 t = 0 is 3
        # (the frozen private weights, |theta_i| < 0.05 after weight decay, move it: mean_e 0.3 (3 theta_e + 0.3 t - 1)
        # + 0.01 t = 0 gives t = 3 - 9 mean(theta_i))
        assert np.all(np.abs(theta[:4]) < 0.05), theta
        assert abs(theta[4] - (3.0 - 9 * np.mean(theta[:4]))) < 0.02, theta
