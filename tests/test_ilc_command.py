"""``hardtovary ilc``: the paper's worked examples, the JSON contract for scripts, and the rule comparison."""

import json

import numpy as np
import pytest

from hardtovary.experiments import cli, ilc


def run_json(capsys, *args):
    assert cli.main(["ilc", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_paper_examples_match_the_printed_numbers(capsys):
    examples = run_json(capsys)["examples"]  # at eps = 1: I^eps is in units of eps
    # the paper's Fig. 3 and Fig. 12: I = eps * max curvature ratio, det ratios 5.5125 and 25.5025
    assert examples["fig3"]["inconsistency"] == pytest.approx(20)
    assert examples["fig3"]["determinant_ratio"] == pytest.approx(5.5125)
    assert examples["fig12"]["inconsistency"] == pytest.approx(100)
    assert examples["fig12"]["determinant_ratio"] == pytest.approx(1.01 ** 2 / 4 / 0.01)
    # Remark 2: equal Hessians give eps; a zero curvature facing a positive one gives inf (score and bound)
    assert examples["remark2a"]["inconsistency"] == pytest.approx(1)
    assert examples["remark2b"]["inconsistency"] == "inf" and examples["remark2b"]["bound_printed"] == "inf"
    # the erratum: lamA = 1, lamB = 100 gives 100 eps > printed 2 eps (50.5 / 10)^2 = 51.005 eps
    c = examples["prop3_counterexample"]
    assert c["inconsistency"] == pytest.approx(100.0)
    assert c["bound_printed"] == pytest.approx(51.005)
    assert c["bound_corrected"] == pytest.approx(102.01)


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
    with pytest.raises(SystemExit) as exc:
        cli.main(["ilc", "--patchwork", "--eps", "0"])
    assert exc.value.code == 2 and "--eps" in capsys.readouterr().err


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
    report = run_json(capsys, "--spirals-mlp", "--n-envs", "2", "--examples-per-env", "8", "--hidden", "4",
                      "--epochs", "3", "--eps", "0.1", "--no-progress")
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


def test_the_score_names_its_point_when_the_minimizers_differ(tmp_path, capsys):
    path = tmp_path / "apart.npz"
    np.savez(path, H=np.array([[1.0, 1.0], [3.0, 1.0]]), mu=np.array([[-1.0, 0.0], [1.0, 2.0]]))
    report = run_json(capsys, "--hessians", path, "--eps", "0.1")
    # the pooled minimizer solves mean_e H_e theta = mean_e H_e mu_e: ((-1 + 3) / 4, (0 + 2) / 2)
    assert report["theta_star_is"] == "pooled_minimizer"
    assert report["theta_star"] == pytest.approx([0.5, 1.0])
    assert cli.main(["ilc", "--hessians", str(path), "--eps", "0.1"]) == 0
    assert "theta* = [0.5, 1]: the pooled minimizer" in capsys.readouterr().out
    same = tmp_path / "same.npz"
    np.savez(same, H=np.array([[1.0, 1.0], [3.0, 1.0]]), mu=np.array([[0.5, -2.0], [0.5, -2.0]]))
    report = run_json(capsys, "--hessians", same)
    assert report["theta_star_is"] == "common_minimizer" and report["theta_star"] == [0.5, -2.0]


def test_the_comparison_explains_its_converged_column(capsys):
    assert cli.main(["ilc", "--patchwork", "--compare", "--n-init", "2", "--steps", "50", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "converged" in text.splitlines()[-5]  # the table's head
    note = text.splitlines()[-1]
    assert note.startswith("ILC = -mean I^eps") and "converged: runs whose step norm fell to 1e-12 within 50" in note


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def _object_npz(folder):
    np.savez(folder / "p.npz", H=np.array([np.eye(2), "x"], dtype=object))
    return folder / "p.npz"


def _truncated_npz(folder):
    np.savez(folder / "p.npz", H=np.eye(3)[None].repeat(2, axis=0))
    (folder / "p.npz").write_bytes((folder / "p.npz").read_bytes()[:200])
    return folder / "p.npz"


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing.npz", "No such file"),
    (lambda d: d, "Is a directory"),
    (lambda d: (np.save(d / "H.npy", np.eye(2)[None]), d / "H.npy")[1], "is an .npy file"),
    (lambda d: _write(d / "junk.npz", b"\x80\x04not numpy at all" * 10), "not an .npz"),
    (_truncated_npz, "damaged"),
    (_object_npz, "never loaded"),
], ids=["missing", "folder", "npy", "junk", "truncated", "objects"])
def test_bad_hessians_files_are_one_line_errors(tmp_path, capsys, make, words):
    assert cli.main(["ilc", "--hessians", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert words in err and "--hessians" in err, err
    assert "allow_pickle" not in err  # numpy's advice to unpickle is never passed on


@pytest.mark.parametrize("options, named", [
    (["--compare"], "--compare"),
    (["--eps", "0.5"], "--eps"),
    (["--patchwork", "--steps", "10"], "--steps"),
    (["--patchwork", "--hidden", "4"], "--hidden"),
    (["--spirals-mlp", "--compare"], "--compare"),
    (["--weight-decay", "0.1"], "--weight-decay"),
    (["--seed", "3"], "--seed"),
])
def test_options_that_would_change_nothing_are_refused(capsys, options, named):
    assert cli.main(["ilc", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hardtovary ilc: error: {named} applies only with"), err


def test_spirals_mlp_shows_progress_unless_asked_not_to(capsys):
    options = ["ilc", "--spirals-mlp", "--n-envs", "2", "--examples-per-env", "8", "--hidden", "3", "--epochs", "2"]
    assert cli.main(options) == 0
    err = capsys.readouterr().err
    assert "geometric_mean: Hessians" in err and "100%" in err
    assert cli.main([*options, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
