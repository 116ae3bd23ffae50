"""``hardtovary ilc``: exact inconsistency scores and the ILC of quadratic problems
(:mod:`hardtovary.experiments.ilc`)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from hardtovary.experiments import ilc, options
from hardtovary.experiments.errors import UsageError, usage_errors
from hardtovary.reference import quadratic

#: eps of the inconsistency score when --eps is not given; the paper's examples always use it (their table is in
#: units of eps, which does not depend on it).
ILC_EPS = 1.0

#: The options that apply only with some of --hessians, --patchwork, --spirals-mlp and --compare, and with which;
#: giving one without them is an error (it would change nothing).
SCOPE = {
    "eps": ("--hessians", "--patchwork", "--spirals-mlp"),
    "compare": ("--hessians", "--patchwork"),
    "weight_decay": ("--patchwork", "--spirals-mlp"),
    "n_envs": ("--spirals-mlp",), "examples_per_env": ("--spirals-mlp",), "hidden": ("--spirals-mlp",),
    "epochs": ("--spirals-mlp",),
    "seed": ("--compare", "--spirals-mlp"),
    "n_init": ("--compare",), "eta": ("--compare",), "steps": ("--compare",), "init_scale": ("--compare",),
}


def default_of(function, name: str):
    """The default of ``function``'s parameter ``name``: the value an option left out takes, when the command
    passes on only the options given."""
    return inspect.signature(function).parameters[name].default


def add_arguments(parser) -> None:
    compare, mlp = ilc.compare_rules, ilc.spirals_mlp_setup
    options.describe(parser, (
        "Without a problem: the paper's worked examples (Fig. 3, Fig. 12, Remark 2, the Prop. 3 "
        "counterexample) with the exact I^eps in units of eps, the determinant ratio and the Prop. 3 bound as "
        "printed (2 eps, false in general) and corrected (4 eps). With --hessians FILE.npz (H of shape "
        "[K, P, P] or [K, P] for diagonal Hessians; optional mu [K, P] and c [K]) or --patchwork: the exact "
        "I^eps of that problem at theta*, its common minimizer when all mu_e are equal, else its pooled "
        "minimizer (where averaging converges; the output names the point and --json gives it as theta_star); "
        "with --compare also the ILC of averaging, the AND-mask (tau = 1) and the geometric mean by Monte "
        "Carlo over initial points, where 'converged' counts the gradient-descent runs whose step fell to "
        f"{ilc.CONVERGENCE_TOL:g} within --steps (the others are scored where they stopped). An option that "
        "does not apply to the problem chosen is an error."))
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hessians", type=Path, default=None, help="problem file (.npz with H, optional mu, c)")
    source.add_argument("--patchwork", action="store_true",
                        help="the notebook's patchwork regression with an L2 term (--weight-decay) in each "
                             "environment")
    source.add_argument("--spirals-mlp", action="store_true",
                        help="train a small MLP on spirals with each rule and score its end point with the "
                             "per-environment Hessians (finite differences; local quadratic model)")
    parser.add_argument("--eps", type=options.positive_float, default=None,
                        help=f"band width eps of the inconsistency score, > 0 (default: {ILC_EPS:g}; needs a "
                             "problem)")
    parser.add_argument("--weight-decay", type=options.nonnegative, default=None,
                        help=f"L2 coefficient in each environment's loss (default: "
                             f"{default_of(ilc.patchwork_problem, 'l2'):g} for --patchwork, "
                             f"{default_of(mlp, 'l2'):g} for --spirals-mlp)")
    g = parser.add_argument_group("--spirals-mlp")
    g.add_argument("--n-envs", type=options.positive_int, default=None,
                   help=f"training environments (default: {default_of(mlp, 'n_envs')})")
    g.add_argument("--examples-per-env", type=options.positive_int, default=None,
                   help=f"examples per environment (default: {default_of(mlp, 'examples_per_env')})")
    g.add_argument("--hidden", type=options.widths, default=None,
                   help=f"{options.HIDDEN_HELP} (default: {options.shown(default_of(mlp, 'hidden'))})")
    g.add_argument("--epochs", type=options.positive_int, default=None,
                   help=f"full-batch epochs (default: {default_of(mlp, 'epochs')})")
    g = parser.add_argument_group("--compare (with --hessians or --patchwork)")
    g.add_argument("--compare", action="store_true", help="ILC of mean, AND-mask and geometric mean")
    g.add_argument("--n-init", type=options.positive_int, default=None,
                   help=f"initial points (default: {default_of(compare, 'n_init')})")
    g.add_argument("--eta", type=options.positive_float, default=None,
                   help=f"gradient-descent step size (default: {default_of(compare, 'eta'):g})")
    g.add_argument("--steps", type=options.positive_int, default=None,
                   help=f"gradient-descent steps per run, at most (default: {default_of(compare, 'n_steps')})")
    g.add_argument("--init-scale", type=options.nonnegative, default=None,
                   help=f"std of the initial points (default: {default_of(compare, 'init_scale'):g})")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"seed of the initial points of --compare, or of the data and initialisation of "
                             f"--spirals-mlp (default: {default_of(compare, 'seed')})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (--spirals-mlp, --compare)")


def check_scope(args) -> None:
    """Refuse an option that does not apply to the problem chosen (:data:`SCOPE`), and a negative --seed."""
    chosen = {"--hessians": args.hessians is not None, "--patchwork": args.patchwork,
              "--spirals-mlp": args.spirals_mlp, "--compare": args.compare}
    for dest, scope in SCOPE.items():
        value = getattr(args, dest)
        if value not in (None, False) and not any(chosen[flag] for flag in scope):
            why = ("; the paper's examples are reported in units of eps (I/eps), which does not depend on it"
                   if dest == "eps" else "")
            raise UsageError(f"--{dest.replace('_', '-')} applies only with {' or '.join(scope)}{why}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")


def run(args) -> int:
    check_scope(args)
    eps = ILC_EPS if args.eps is None else args.eps
    progress = not args.no_progress
    if args.spirals_mlp:
        setup = options.given(n_envs=args.n_envs, examples_per_env=args.examples_per_env, hidden=args.hidden,
                              epochs=args.epochs, l2=args.weight_decay, seed=args.seed)
        with usage_errors():
            ilc.spirals_mlp_setup(**setup)
        report = ilc.spirals_mlp_inconsistency(eps, progress=progress, **setup)
        print(json.dumps(report, indent=2) if args.json else ilc.format_mlp_report(report))
        return 0
    if args.hessians is None and not args.patchwork:
        reports = {}
        for example in ilc.PAPER_EXAMPLES:
            reports[example.name] = {"description": example.description,
                                     **ilc.score_report(quadratic.QuadraticProblem(example.hessians), ILC_EPS)}
        if args.json:
            print(json.dumps({"examples": reports}, indent=2))
        else:
            print(ilc.format_examples(reports))
        return 0
    if args.hessians is not None:
        try:
            problem = ilc.load_problem(args.hessians)
        except OSError as exc:
            raise UsageError(f"--hessians {args.hessians}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(f"--hessians: {exc}") from None
    else:
        problem = ilc.patchwork_problem(**options.given(l2=args.weight_decay))
    report = ilc.score_report(problem, eps)
    if args.compare:
        report["compare"] = ilc.compare_rules(problem, eps, progress=progress, **options.given(
            n_init=args.n_init, eta=args.eta, n_steps=args.steps, init_scale=args.init_scale, seed=args.seed))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(ilc.format_report(report))
    return 0
