"""``hardtovary ilc``: exact inconsistency scores of quadratic problems and the ILC of averaging, the AND-mask and
the geometric mean (paper §2, App. A.2).

Three uses:

- the paper's worked examples (Fig. 3, Fig. 12, Remark 2, the Prop. 3 counterexample) with the exact I^eps, the
  determinant ratio and both versions of the Prop. 3 bound;
- a user-supplied problem from an ``.npz`` file (``H`` of shape [K, P, P] or [K, P] for diagonal Hessians,
  optional ``mu`` [K, P] and ``c`` [K]), scored at its common minimizer when all ``mu_e`` are equal, else at its
  pooled minimizer (where averaging converges); the report names the point and gives it as ``theta_star``;
- the ILC of the three aggregation rules on a problem: gradient descent with each rule from random initial points,
  and the exact I^eps of the point each run reaches (Monte Carlo over the initialisation, with its standard error).
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hardtovary.experiments.errors import UsageError
from hardtovary.reference import consistency, quadratic

#: ``compare_rules`` counts a gradient-descent run as converged when a step's norm falls to this (the ``tol`` of
#: :func:`hardtovary.reference.consistency.gradient_descent`).
CONVERGENCE_TOL = 1e-12


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    hessians: np.ndarray  # [K, P] diagonal


#: The paper's worked examples: diagonal two-environment problems with a common minimizer at 0.
PAPER_EXAMPLES = (
    Example("fig3", "Fig. 3: H_A = diag(0.05, 1), H_B = diag(1, 0.05)", np.array([[0.05, 1.0], [1.0, 0.05]])),
    Example("fig12", "Fig. 12: H_A = diag(0.01, 1), H_B = diag(1, 0.01)", np.array([[0.01, 1.0], [1.0, 0.01]])),
    Example("remark2a", "Remark 2(a): H_A = H_B", np.array([[0.3, 2.0], [0.3, 2.0]])),
    Example("remark2b", "Remark 2(b): lamA_1 = 0 < lamB_1", np.array([[0.0, 1.0], [1.0, 1.0]])),
    Example("prop3_counterexample", "erratum: P = 1, lamA = 1, lamB = 100", np.array([[1.0], [100.0]])),
)


def _finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def score_report(problem: quadratic.QuadraticProblem, eps: float) -> dict:
    """The exact I^eps of ``problem`` at ``theta_star``, the attaining pair and direction, and the Prop. 3 bounds
    where they are defined (K = 2, diagonal Hessians).

    ``theta_star`` is the common minimizer when every environment has the same one (``theta_star_is`` =
    ``"common_minimizer"``), else the pooled minimizer, the point that averaging converges to
    (``"pooled_minimizer"``); the report gives both."""
    theta_star = problem.common_minimizer()
    kind = "common_minimizer"
    if theta_star is None:
        kind = "pooled_minimizer"
        try:
            theta_star = problem.pooled_minimizer()
        except ValueError as error:
            raise UsageError(f"the environments' minimizers differ, so the score is taken at the pooled minimizer, "
                             f"but {error}") from None
    score = quadratic.inconsistency_score(problem, eps, theta_star=theta_star)
    report = {"K": problem.K, "P": problem.P, "eps": eps, "theta_star": [float(t) for t in theta_star],
              "theta_star_is": kind, "inconsistency": _finite_or_none(score.value),
              "inconsistency_over_eps": _finite_or_none(score.value / eps), "pair": list(score.pair),
              "direction": None if score.direction is None else [float(d) for d in score.direction],
              "method": score.method}
    if problem.K == 2 and problem.diagonal:
        lams = np.diagonal(problem.H, axis1=1, axis2=2)
        report["determinant_ratio"] = _finite_or_none(quadratic.determinant_ratio(lams))
        report["bound_printed"] = _finite_or_none(quadratic.prop3_bound_printed(lams[0], lams[1], eps))
        report["bound_corrected"] = _finite_or_none(quadratic.prop3_bound_corrected(lams[0], lams[1], eps))
    return report


#: The first bytes of an ``.npz`` file (a zip archive) and of an ``.npy`` file (one array).
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


def load_problem(path) -> quadratic.QuadraticProblem:
    """Read ``H`` ([K, P, P] or [K, P]) and optional ``mu`` [K, P] and ``c`` [K] from an ``.npz`` file (as written
    by ``numpy.savez``).

    Never unpickles: arrays of Python objects are refused. A path that is missing or a folder raises
    ``FileNotFoundError`` / ``IsADirectoryError``; a file that is not a readable ``.npz`` of numeric arrays (an
    ``.npy`` file, a damaged archive, object arrays, a missing ``H``) raises ``ValueError`` naming the path."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic.startswith(_NPY_MAGIC):
        raise ValueError(f"{path} is an .npy file (one array); save H (and mu, c) into one .npz file with "
                         f"numpy.savez(path, H=H, mu=mu, c=c)")
    if not magic.startswith(_ZIP_MAGIC):
        raise ValueError(f"{path} is not an .npz file (numpy.savez writes a zip archive; this file does not start "
                         f"like one)")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "H" not in f:
                raise ValueError(f"{path} must hold an array named 'H' of shape [K, P, P] or [K, P]; "
                                 f"it holds {sorted(f.files)}")
            arrays = {name: f[name] for name in ("H", "mu", "c") if name in f}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ValueError(f"{path} is a damaged .npz file ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        raise ValueError(f"{path} holds arrays of Python objects, which are never loaded (they would be "
                         f"unpickled); save H, mu and c as numeric arrays") from None
    return quadratic.QuadraticProblem(arrays["H"], arrays.get("mu"), arrays.get("c"))


def patchwork_problem(l2: float = 0.01) -> quadratic.QuadraticProblem:
    """The patchwork regression of the authors' notebook ``linear_regression_ilc.ipynb`` with an L2 term in every
    environment's loss, ``L_e = 1/2 (x_e . theta - 1)^2 + l2/2 ||theta||^2``: a quadratic with
    ``H_e = x_e x_e^T + l2 I``, minimizer ``mu_e = H_e^{-1} x_e`` and minimum ``c_e = 1/2 - 1/2 x_e . mu_e``; strictly
    convex for ``l2 > 0``."""
    from hardtovary.reference import data

    X, y = data.patchwork_regression()
    H = np.einsum("ki,kj->kij", X, X) + l2 * np.eye(X.shape[1])
    mu = np.stack([np.linalg.solve(H[e], y[e] * X[e]) for e in range(len(X))])
    c = 0.5 * y ** 2 - 0.5 * np.einsum("ki,ki->k", y[:, None] * X, mu)
    return quadratic.QuadraticProblem(H, mu, c)


RULES = {"mean": {"rule": "mean"}, "and_mask": {"rule": "and_mask", "tau": 1.0},
         "geometric_mean": {"rule": "geometric_mean"}}


def compare_rules(problem: quadratic.QuadraticProblem, eps: float, *, n_init: int = 16, eta: float = 0.1,
                  n_steps: int = 5000, init_scale: float = 1.0, seed: int = 0, progress: bool = False) -> dict:
    """ILC of averaging, the AND-mask (tau = 1) and the geometric mean on ``problem`` (paper eq. (2)).

    Each rule runs gradient descent from ``n_init`` initial points ``theta_0 ~ N(0, init_scale^2 I)``; the exact
    I^eps of each end point is computed and ILC = -mean, with its standard error. Also reports the mean end point,
    its pooled loss and how many runs converged: a step norm <= ``tol`` (:data:`CONVERGENCE_TOL`) before
    ``n_steps``; a run that did not converge is scored where it stopped (the AND-mask can keep oscillating across a
    sign boundary). ``progress`` shows a bar over the runs (tqdm, on stderr).
    """
    from tqdm import tqdm

    results = {}
    bar = tqdm(total=len(RULES) * n_init, disable=not progress, unit="run", dynamic_ncols=True)
    for name, rule in RULES.items():
        rng = np.random.default_rng(seed)
        ends, converged = [], []
        bar.set_description(name)

        def algorithm(theta0, rule=rule, ends=ends, converged=converged):
            run = consistency.gradient_descent(problem.gradients, theta0, eta, n_steps, tol=CONVERGENCE_TOL,
                                               return_trajectory=True, **rule)
            ends.append(run.theta)
            converged.append(run.converged)
            bar.update(1)
            return run.theta

        estimate = consistency.ilc_monte_carlo(
            algorithm, lambda r: init_scale * r.standard_normal(problem.P),
            lambda theta: quadratic.inconsistency_score(problem, eps, theta_star=theta).value, n_init, rng)
        mean_end = np.mean(ends, axis=0)
        results[name] = {"ilc": _finite_or_none(estimate.value), "stderr": _finite_or_none(estimate.stderr),
                         "mean_end_point": [float(t) for t in mean_end],
                         "pooled_loss_at_mean_end": float(problem.pooled_loss(mean_end)),
                         "converged": int(sum(converged))}
    bar.close()
    return {"eps": eps, "n_init": n_init, "eta": eta, "n_steps": n_steps, "tol": CONVERGENCE_TOL, "rules": results}


def _as_float(x):
    """Undo :func:`_finite_or_none` for display: "inf" -> inf; None stays None."""
    return None if x is None else float(x)


def _fmt(x, width=12, digits=4):
    x = _as_float(x)
    return f"{'undefined':>{width}}" if x is None else f"{x:>{width}.{digits}g}"


def format_examples(reports: dict) -> str:
    """The paper's worked examples as a table, in units of eps, with whether the printed Prop. 3 bound holds."""
    lines = [f"{'example':<22}{'I/eps':>12}{'det ratio':>12}{'printed/eps':>12}{'corrected/eps':>14}  printed bound"]
    for name, r in reports.items():
        value, printed, corrected = (_as_float(r.get(k)) for k in ("inconsistency", "bound_printed",
                                                                   "bound_corrected"))
        holds = "n/a" if printed is None else ("holds" if value <= printed else "VIOLATED")
        scale = 1 / r["eps"]
        lines.append(f"{name:<22}{_fmt(value * scale)}{_fmt(r.get('determinant_ratio'))}"
                     f"{_fmt(None if printed is None else printed * scale)}"
                     f"{_fmt(None if corrected is None else corrected * scale, 14)}  {holds}")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """One problem's score (and rule comparison) as text."""
    where = {"common_minimizer": "the common minimizer of the environments",
             "pooled_minimizer": "the pooled minimizer (the environments' minimizers differ; averaging converges "
                                 "there)"}[report["theta_star_is"]]
    point = ", ".join(f"{t:.4g}" for t in report["theta_star"])
    lines = [f"K = {report['K']}, P = {report['P']}, eps = {report['eps']}",
             f"theta* = [{point}]: {where}",
             f"I^eps(theta*) = {report['inconsistency']}  (I/eps = {report['inconsistency_over_eps']}), "
             f"attained by the pair (e, e') = {tuple(report['pair'])} [{report['method']}]"]
    if "bound_printed" in report:
        lines.append(f"Prop. 3 bound: printed {report['bound_printed']}, corrected {report['bound_corrected']}")
    if "compare" in report:
        c = report["compare"]
        n = c["n_init"]
        lines.append(f"\n{'rule':<16}{'ILC':>14}{'stderr':>12}{'converged':>11}   mean end point")
        for name, r in c["rules"].items():
            point = ", ".join(f"{t:.3f}" for t in r["mean_end_point"])
            lines.append(f"{name:<16}{_fmt(r['ilc'], 14)}{_fmt(r['stderr'])}{r['converged']:>6}/{n:<4}   [{point}]")
        lines.append(f"ILC = -mean I^eps over the end points of gradient descent from {n} initial points. converged: "
                     f"runs whose step norm fell to {c['tol']:g} within {c['n_steps']} steps; the others are scored "
                     f"where they stopped (the AND-mask can oscillate across a sign boundary).")
    return "\n".join(lines)


def flat_env_gradients(spec, params, X, Y, loss: str):
    """Per-environment gradients of an MLP as one matrix ``[K, P]`` (parameters flattened in order)."""
    from hardtovary.reference import mlp

    out = mlp.env_gradients(spec, params, X, Y, loss=loss)
    return np.concatenate([g.reshape(g.shape[0], -1) for g in out.grads], axis=1)


def env_hessians_fd(spec, params, X, Y, loss: str, step: float = 1e-5, on_column=None) -> np.ndarray:
    """Per-environment Hessians ``[K, P, P]`` of an MLP by central finite differences of the analytic
    per-environment gradients (column j from ``theta +- step e_j``), symmetrised. ``on_column()``, when given, is
    called after each column."""
    shapes = [p.shape for p in params]
    theta = np.concatenate([p.ravel() for p in params])
    splits = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]

    def unflatten(t):
        return [part.reshape(s) for part, s in zip(np.split(t, splits), shapes)]

    K, P = X.shape[0], theta.size
    H = np.empty((K, P, P))
    for j in range(P):
        shift = np.zeros(P)
        shift[j] = step
        H[:, :, j] = (flat_env_gradients(spec, unflatten(theta + shift), X, Y, loss)
                      - flat_env_gradients(spec, unflatten(theta - shift), X, Y, loss)) / (2 * step)
        if on_column is not None:
            on_column()
    return (H + H.transpose(0, 2, 1)) / 2


def spirals_mlp_setup(*, n_envs: int = 4, examples_per_env: int = 64, n_dims: int = 2, hidden=(16, 16),
                      epochs: int = 300, l2: float = 1e-3, seed: int = 0):
    """The spirals task and the training that :func:`spirals_mlp_inconsistency` scores: ``(SpiralsConfig, the
    shared TrainConfig, {method: TrainConfig})``, validated (a ValueError names what they refuse)."""
    from hardtovary.experiments import synthetic
    from hardtovary.reference import data, training

    data_config = data.SpiralsConfig(n_train_envs=n_envs, examples_per_env=examples_per_env, n_test=1000,
                                     n_dims=n_dims, seed=seed)
    base = training.TrainConfig(hidden=tuple(hidden), batch_size=examples_per_env, n_agreement_envs=n_envs,
                                epochs=epochs, lr=1e-2, weight_decay=l2, rescale=True, seed=seed)
    return data_config, base, {name: synthetic.method_config(base, name) for name in synthetic.DEFAULT_METHODS}


def spirals_mlp_inconsistency(eps: float = 0.01, *, progress: bool = False, **setup) -> dict:
    """I^eps at the solutions that averaging, the AND-mask and the geometric mean reach on a small spirals task
    (``setup``: the options of :func:`spirals_mlp_setup`).

    Each method trains the same small MLP (reference implementation, Adam 1e-2, coupled L2 ``l2``, all
    environments per step, full batches). At the end point theta* the per-environment Hessians come from finite
    differences of the analytic gradients; the local model of environment e is the quadratic with Hessian
    ``H_e+ + l2 I`` (``H_e+``: negative eigenvalues clipped to 0; ``l2 I``: the training's L2 term, which makes every
    environment strictly convex) and theta* as its minimizer, so ``I^eps = eps max_{e != e'} lambda_max((H_e+ +
    l2 I)^-1 (H_e'+ + l2 I))``. This treats theta* as every environment's minimizer: the report gives the largest
    per-environment gradient norm and the negative curvature that was clipped, so that one can judge it.
    ``progress`` shows a bar over the training steps and the finite-difference Hessian columns (tqdm, on stderr).
    """
    from tqdm import tqdm

    from hardtovary.experiments.progress import show_epoch, start_unit
    from hardtovary.reference import data, mlp, training

    data_config, base, configs = spirals_mlp_setup(**setup)
    task = data.make_spirals_task(data_config)
    env_data = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    n_envs, examples_per_env, l2 = data_config.n_train_envs, data_config.examples_per_env, base.weight_decay
    spec = training.model_spec(env_data, base)
    n_params = sum(int(np.prod(shape)) for shape in mlp.param_shapes(spec))
    steps = base.epochs * training.steps_per_epoch(n_envs, examples_per_env, base)
    bar = tqdm(total=len(configs) * (steps + n_params), disable=not progress, unit="step", dynamic_ncols=True)
    results = {}
    for name, config in configs.items():
        start_unit(bar, f"{name}: training")
        run = training.train(env_data, config, on_step=lambda: bar.update(1), on_epoch=show_epoch(bar))
        X, Y = env_data.X_train.astype(np.float64), env_data.y_train.astype(np.float64)
        start_unit(bar, f"{name}: Hessians")
        H = env_hessians_fd(spec, run.params, X, Y, config.loss, on_column=lambda: bar.update(1))
        w, V = np.linalg.eigh(H)
        negative = -np.minimum(w, 0).sum(axis=1) / np.abs(w).sum(axis=1)
        H_local = np.einsum("kij,kj,klj->kil", V, np.maximum(w, 0), V) + l2 * np.eye(H.shape[1])
        score = quadratic.inconsistency_score(quadratic.QuadraticProblem(H_local), eps)
        grads = flat_env_gradients(spec, run.params, X, Y, config.loss)
        results[name] = {"train_acc": run.final["train_acc"], "test_acc": run.final["test_acc"],
                         "inconsistency": _finite_or_none(score.value),
                         "inconsistency_over_eps": _finite_or_none(score.value / eps), "pair": list(score.pair),
                         "max_env_gradient_norm": float(np.linalg.norm(grads, axis=1).max()),
                         "clipped_negative_curvature": float(negative.max()), "P": int(H.shape[1])}
    bar.close()
    return {"eps": eps, "l2": l2, "n_envs": n_envs, "examples_per_env": examples_per_env, "hidden": list(base.hidden),
            "epochs": base.epochs, "methods": results}


def format_mlp_report(report: dict) -> str:
    """:func:`spirals_mlp_inconsistency` as a table."""
    lines = [f"{report['n_envs']} environments x {report['examples_per_env']} examples, hidden {report['hidden']}, "
             f"{report['epochs']} epochs, L2 {report['l2']}, eps {report['eps']}; I^eps at each method's end point "
             f"theta*, of local quadratic models that take theta* as every environment's minimizer",
             f"{'method':<16}{'train acc':>10}{'test acc':>10}{'I/eps':>12}{'max |g_e|':>11}{'clipped neg.':>14}"]
    for name, r in report["methods"].items():
        lines.append(f"{name:<16}{r['train_acc']:>10.3f}{r['test_acc']:>10.3f}{_fmt(r['inconsistency_over_eps'])}"
                     f"{r['max_env_gradient_norm']:>11.3g}{r['clipped_negative_curvature']:>14.3f}")
    return "\n".join(lines)
