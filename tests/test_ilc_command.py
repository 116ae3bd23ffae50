"""``hardtovary ilc``: the paper's worked examples, the JSON contract for scripts, and the rule comparison."""

import json

import numpy as np
import pytest

from hardtovary.experiments import cli, ilc


def run_json(capsys, *args):
    assert cli.main(["ilc", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_paper_examples_match_the_printed_numbers(capsys):
    examples = run_json(capsys, "--eps", "0.5")["examples"]
    # Fig. 3 and Fig. 12 (paper.md §3.2, Q5-Q6): I = eps * max curvature ratio, det ratios 5.5125 and 25.5025
    assert examples["fig3"]["inconsistency"] == pytest.approx(0.5 * 20)
    assert examples["fig3"]["determinant_ratio"] == pytest.approx(5.5125)
    assert examples["fig12"]["inconsistency"] == pytest.approx(0.5 * 100)
    assert examples["fig12"]["determinant_ratio"] == pytest.approx(1.01 ** 2 / 4 / 0.01)
    # Remark 2: equal Hessians give eps; a zero curvature facing a positive one gives inf (score and bound)
    assert examples["remark2a"]["inconsistency"] == pytest.approx(0.5)
    assert examples["remark2b"]["inconsistency"] == "inf" and examples["remark2b"]["bound_printed"] == "inf"
    # the erratum: lamA = 1, lamB = 100 gives 100 eps > printed 2 eps (50.5 / 10)^2 = 51.005 eps
    c = examples["prop3_counterexample"]
    assert c["inconsistency"] == pytest.approx(50.0)
    assert c["bound_printed"] == pytest.approx(0.5 * 51.005)
    assert c["bound_corrected"] == pytest.approx(0.5 * 102.01)


def test_examples_table_flags_the_printed_bound_where_it_fails(capsys):
    assert cli.main(["ilc"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["prop3_counterexample"].endswith("VIOLATED")
    assert rows["fig3"].endswith("holds") and rows["fig12"].endswith("holds")


def test_hessians_file_contract(tmp_path, capsys):
    path = tmp_path / "p.npz"
    np.savez(path, H=np.array([[2.0, 1.0, 0.5], [1.0, 4.0, 0.5]]))
    report = run_json(capsys, "--hessians", path, "--eps", "0.1")
    assert report["inconsistency"] == pytest.approx(0.1 * 4.0)  # max ratio 4 / 1 on the second coordinate
    assert report["pair"] == [0, 1]  # the band of environment 0 (curvature 1) seen by environment 1 (curvature 4)
    for key in ("bound_printed", "bound_corrected"):
        assert key in report
    ratio = (1.5 / np.sqrt(2.0)) * (2.5 / 2.0) * (0.5 / 0.5)
    assert report["bound_corrected"] == pytest.approx(4 * 0.1 * ratio ** 2)


def test_full_hessians_with_offsets_and_three_environments_have_no_prop3_bound(tmp_path, capsys):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 4, 4))
    H = np.einsum("kij,klj->kil", A, A) + 0.5 * np.eye(4)
    path = tmp_path / "full.npz"
    np.savez(path, H=H, c=np.array([0.0, 0.1, 0.2]))
    report = run_json(capsys, "--hessians", path, "--eps", "1")
    assert "bound_printed" not in report and report["K"] == 3
    assert report["inconsistency"] >= 1.0


def test_missing_array_in_file_is_reported(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, hessians=np.eye(2)[None])
    assert cli.main(["ilc", "--hessians", str(path)]) == 2
    assert "'H'" in capsys.readouterr().err


def test_bad_eps_is_refused(capsys):
    assert cli.main(["ilc", "--eps", "0"]) == 2
    assert "--eps" in capsys.readouterr().err


def test_patchwork_problem_is_the_regularised_regression():
    problem = ilc.patchwork_problem(0.01)
    theta = np.random.default_rng(1).standard_normal(5)
    X = 3 * np.hstack([np.eye(4), 0.1 * np.ones((4, 1))])
    expected = 0.5 * (X @ theta - 1) ** 2 + 0.005 * theta @ theta
    np.testing.assert_allclose(problem.losses(theta), expected, rtol=1e-12)


def test_rule_comparison_reports_ilc_for_every_rule(tmp_path, capsys):
    # two environments whose minimizers differ on coordinate 0 and agree on coordinate 1
    path = tmp_path / "toy.npz"
    np.savez(path, H=np.array([[1.0, 1.0], [1.0, 2.0]]), mu=np.array([[-1.0, 0.0], [1.0, 0.0]]))
    report = run_json(capsys, "--hessians", path, "--compare", "--n-init", "4", "--steps", "400", "--eta", "0.2")
    rules = report["compare"]["rules"]
    assert set(rules) == {"mean", "and_mask", "geometric_mean"}
    # averaging converges to the pooled minimizer from every start: zero spread
    assert rules["mean"]["stderr"] == pytest.approx(0.0, abs=1e-9)
    assert rules["mean"]["mean_end_point"] == pytest.approx([0.0, 0.0], abs=1e-6)
    # the AND-mask freezes coordinate 0 inside [min mu, max mu] = [-1, 1]: its end points depend on the start
    assert abs(rules["and_mask"]["mean_end_point"][0]) <= 1.0
    for r in rules.values():
        assert r["ilc"] <= -1.0 + 1e-9  # I^eps >= eps = 1


def test_finite_difference_hessians_match_logistic_regression_in_closed_form():
    from hardtovary.reference import mlp

    rng = np.random.default_rng(2)
    spec = mlp.MLPSpec(in_features=3, hidden=())
    params = mlp.init_params(spec, rng)
    X = rng.standard_normal((2, 5, 3))
    Y = rng.integers(0, 2, (2, 5)).astype(float)
    H = ilc.env_hessians_fd(spec, params, X, Y, "bce_with_logits")
    # logistic regression: H_e = mean_b s(1 - s) [x_b, 1][x_b, 1]^T with s = sigmoid(w . x_b + b)
    z = X @ params[0][0] + params[1][0]
    s = 1 / (1 + np.exp(-z))
    Z = np.concatenate([X, np.ones((2, 5, 1))], axis=2)
    expected = np.einsum("kb,kbi,kbj->kij", s * (1 - s), Z, Z) / 5
    np.testing.assert_allclose(H, expected, rtol=1e-6, atol=1e-9)


def test_spirals_mlp_report_has_every_method(capsys):
    report = run_json(capsys, "--spirals-mlp", "--mlp-envs", "2", "--mlp-examples", "8", "--mlp-hidden", "4",
                      "--mlp-epochs", "3", "--eps", "0.1")
    assert set(report["methods"]) == {"mean", "and_mask", "geometric_mean"}
    for r in report["methods"].values():
        # I^eps >= eps for strictly convex local models (the e = e' pairs give eps)
        assert r["inconsistency"] == "inf" or r["inconsistency"] >= 0.1 - 1e-12
        assert r["P"] == 4 * (2 + 2) + 4 + 4 + 1


def test_bounds_are_null_where_a_direction_is_flat_for_both_environments(tmp_path, capsys):
    path = tmp_path / "flat.npz"
    np.savez(path, H=np.array([[0.0, 1.0], [0.0, 2.0]]))
    report = run_json(capsys, "--hessians", path, "--eps", "0.5")
    assert report["inconsistency"] == pytest.approx(0.5 * 2.0)  # the flat direction contributes 0/0 -> 0
    assert report["bound_printed"] is None and report["bound_corrected"] is None
