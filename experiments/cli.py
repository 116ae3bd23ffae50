"""The ``hardtovary`` command line (also ``python -m hardtovary``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from hardtovary import __version__


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _nonnegative(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None


def _add_synthetic(subparsers) -> None:
    from hardtovary.experiments import synthetic

    d, t = synthetic.DEFAULT_DATA, synthetic.DEFAULT_TRAIN
    p = subparsers.add_parser(
        "synthetic",
        help="synthetic memorization task: averaging vs AND-mask vs geometric mean",
        description=(
            "Train one MLP per method on the spirals memorization task (paper §3.1) with the NumPy reference "
            "implementation (or, with --backend accel, all methods at once as one batched sweep), print final train and o.o.d. test accuracy, and write OUT/results.json "
            "(per method train_acc, test_acc, losses and per-epoch history, plus the full configuration), "
            "OUT/units/<method>.json for each finished method and OUT/learning_curves.png. A run killed "
            "midway resumes from OUT when started again with the same options."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/synthetic"), help="run folder")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")
    p.add_argument("--methods", default=",".join(synthetic.DEFAULT_METHODS),
                   help=f"comma-separated methods, from {', '.join(synthetic.METHOD_PRESETS)}; "
                        "'mean' is averaging (AND-mask with tau = 0)")
    p.add_argument("--tau", type=_fraction, default=None,
                   help="agreement threshold for and_mask / sand_mask (default: 1.0 and 0.5); ignored by mean")
    g = p.add_argument_group("data (spirals, paper §6.1-6.2)")
    g.add_argument("--n-envs", type=_positive_int, default=d.n_train_envs, help="training environments")
    g.add_argument("--examples-per-env", type=_positive_int, default=d.examples_per_env,
                   help="training examples per environment")
    g.add_argument("--n-test", type=_positive_int, default=d.n_test, help="o.o.d. test examples")
    g.add_argument("--n-dims", type=int, default=d.n_dims, help="shortcut dimensions")
    g.add_argument("--n-revolutions", type=float, default=d.n_revolutions, help="spiral revolutions")
    g.add_argument("--shortcut-scale", type=_nonnegative, default=d.shortcut_scale,
                   help="multiplies the shortcut signatures (the paper's variance 0.1 is 0.316)")
    g.add_argument("--data-seed", type=int, default=d.seed, help="environment e uses seed data_seed + e")
    g = p.add_argument_group("model and training (paper Table 1)")
    g.add_argument("--hidden", type=_int_list, default=t.hidden, help="hidden widths, comma-separated")
    g.add_argument("--activation", choices=("leaky_relu", "relu", "tanh"), default=t.activation,
                   help="hidden-layer nonlinearity (LeakyReLU slope 0.01)")
    g.add_argument("--batch-norm", action="store_true", help="BatchNorm1d after each hidden Linear")
    g.add_argument("--bn-semantics", choices=("pooled", "per_env"), default=t.bn_semantics,
                   help="BatchNorm statistics over all environments of a step, or per environment")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=t.optimizer,
                   help="Adam (betas 0.9, 0.999) or SGD with momentum")
    g.add_argument("--lr", type=float, default=t.lr, help="learning rate")
    g.add_argument("--momentum", type=float, default=t.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=_nonnegative, default=t.weight_decay, help="L2 coefficient")
    g.add_argument("--weight-decay-order", choices=("before", "after"), default=t.weight_decay_order,
                   help="before: added to the masked gradient before the moments; after: decoupled")
    g.add_argument("--l1", type=_nonnegative, default=t.l1, help="L1 coefficient (added after masking)")
    g.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=t.rescale,
                   help="inverse-sparsity rescaling per parameter tensor (not applied to mean)")
    g.add_argument("--batch-size", type=_positive_int, default=t.batch_size, help="examples per environment")
    g.add_argument("--n-agreement-envs", type=_positive_int, default=None,
                   help="environments per step (must divide --n-envs; default: all of them)")
    g.add_argument("--epochs", type=_positive_int, default=t.epochs, help="passes over the training data")
    g.add_argument("--lr-milestones", type=_int_list, default=None,
                   help="epochs where the learning rate drops x0.1 (default: at 3/4 of the epochs)")
    g.add_argument("--seed", type=int, default=t.seed, help="seed of initialisation and batching")
    p.add_argument("--backend", choices=synthetic.BACKENDS, default="reference",
                   help="reference: the NumPy oracle, one method after another; accel: all methods trained "
                        "together as one batched sweep (CuPy on a GPU, else NumPy; float64, same results to "
                        "rounding; no --batch-norm)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_synthetic)


def _run_synthetic(args) -> int:
    from hardtovary.experiments import plots, synthetic
    from hardtovary.reference import data

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in synthetic.METHOD_PRESETS]
    if unknown or not methods:
        raise ValueError(f"--methods must name some of {sorted(synthetic.METHOD_PRESETS)}, got {args.methods!r}")
    data_config = data.SpiralsConfig(n_train_envs=args.n_envs, examples_per_env=args.examples_per_env,
                                     n_test=args.n_test, n_revolutions=args.n_revolutions, n_dims=args.n_dims,
                                     seed=args.data_seed, shortcut_scale=args.shortcut_scale)
    milestones = args.lr_milestones if args.lr_milestones is not None else (3 * args.epochs // 4,)
    train_config = dataclasses.replace(
        synthetic.DEFAULT_TRAIN, hidden=args.hidden, activation=args.activation, batch_norm=args.batch_norm,
        bn_semantics=args.bn_semantics, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, weight_decay_order=args.weight_decay_order, l1=args.l1,
        rescale=args.rescale, batch_size=args.batch_size,
        n_agreement_envs=args.n_agreement_envs or args.n_envs, epochs=args.epochs,
        lr_milestones=tuple(m for m in milestones if m >= 1), seed=args.seed)
    overrides = {"tau": args.tau} if args.tau is not None else None
    results = synthetic.run(args.out, data_config=data_config, train_config=train_config, methods=methods,
                            overrides=overrides, fresh=args.fresh, progress=not args.no_progress,
                            backend=args.backend)
    print(synthetic.format_table(results))
    print(f"\nresults: {args.out / 'results.json'}")
    figure = plots.plot_learning_curves(results, args.out / "learning_curves.png")
    print(f"learning curves: {figure}" if figure else
          "learning curves: skipped (matplotlib is not installed; pip install 'hardtovary[plot]')")
    return 0


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"must hold at least one number, got {text!r}")
    return values


def _name_list(choices):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(part.strip() for part in text.split(",") if part.strip())
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"must be comma-separated names from {', '.join(choices)}, got {text!r}")
        return values
    return parse


def _bool_list(text: str) -> tuple[bool, ...]:
    words = {"yes": True, "no": False, "true": True, "false": False, "1": True, "0": False}
    values = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not values or any(v not in words for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated yes/no, got {text!r}")
    return tuple(dict.fromkeys(words[v] for v in values))


def _add_sweep(subparsers) -> None:
    from hardtovary.experiments import sweep

    s, d = sweep.SearchSpace(), sweep.DEFAULT_DATA
    p = subparsers.add_parser(
        "sweep",
        help="random hyperparameter search on the synthetic task (paper Table 1), best configurations over seeds",
        description=(
            "Random search over the paper's Table 1 space (App. B.3; BatchNorm and dropout excluded) on the spirals "
            "memorization task: draw --budget configurations (method, tau, rescaling, hidden units, layers, batch "
            "size, optimizer, learning rate, and one of L2 / L1 / none with its coefficient), train them as batched "
            "sweeps (many runs at once; CuPy on a GPU, else NumPy), rank them by final o.o.d. test accuracy, re-run "
            "the best --top with --seeds fresh seeds, and print a table of mean ± standard deviation (over seeds) "
            "of train and o.o.d. test accuracy. Search trials stop early when train acc > 0.97 while test acc < "
            "0.6 (paper §6.3) unless --no-early-abort. Writes OUT/config.json, OUT/units/search-NNN.json and "
            "OUT/units/seeds-NNN.json (one per batch of runs, atomically), OUT/results.json and OUT/table.txt; a "
            "rerun with the same options resumes, skipping finished batches. The defaults are small (a few minutes on two CPU "
            "cores); --paper-space uses Table 1's 256/512 units, 3/5 layers and batch 64/128/256."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="run folder")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")
    p.add_argument("--budget", type=_positive_int, default=32, help="random-search trials")
    p.add_argument("--top", type=_positive_int, default=3, help="best configurations re-run over seeds (<= budget)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds per re-run configuration")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the search: draws the trials; trial i trains with seed SEED + i")
    p.add_argument("--epochs", type=_positive_int, default=40,
                   help="epochs per run; the learning rate drops x0.1 at 1/2 and 3/4 of them (paper App. B.3)")
    g = p.add_argument_group("search space (paper Table 1; comma-separated values, each drawn uniformly)")
    g.add_argument("--paper-space", action="store_true",
                   help="Table 1's architecture values: --hidden-units 256,512 --layers 3,5 --batch-sizes 64,128,256 "
                        "(overrides those three options; needs --examples-per-env >= 256)")
    g.add_argument("--methods", type=_name_list(sweep.METHODS), default=s.methods,
                   help=f"rules, from {', '.join(sweep.METHODS)} (mean ignores tau and rescaling; geometric_mean "
                        "uses tau = 1)")
    g.add_argument("--hidden-units", type=_int_list, default=s.hidden_units, help="hidden layer widths")
    g.add_argument("--layers", type=_int_list, default=s.layers, help="numbers of hidden layers")
    g.add_argument("--batch-sizes", type=_int_list, default=s.batch_sizes, help="examples per environment per step")
    g.add_argument("--optimizers", type=_name_list(sweep.OPTIMIZERS), default=s.optimizers,
                   help="adam (betas 0.9, 0.999) and/or sgd (momentum 0.9)")
    g.add_argument("--lrs", type=_float_list, default=s.lrs, help="learning rates")
    g.add_argument("--l2", type=_float_list, default=s.l2,
                   help="L2 (coupled weight decay) coefficients, used when the drawn regulariser is L2")
    g.add_argument("--l1", type=_float_list, default=s.l1,
                   help="L1 coefficients, used when the drawn regulariser is L1 (L1 and L2 are never combined)")
    g.add_argument("--taus", type=_float_list, default=s.taus,
                   help="agreement thresholds in [0, 1] (the paper does not give this range)")
    g.add_argument("--rescale", type=_bool_list, default=s.rescale,
                   help="inverse-sparsity rescaling choices, e.g. 'no,yes' or 'yes'")
    g = p.add_argument_group("data (spirals, paper §6.1-6.2)")
    g.add_argument("--n-envs", type=_positive_int, default=d.n_train_envs,
                   help="training environments (all of them agree in every step)")
    g.add_argument("--examples-per-env", type=_positive_int, default=d.examples_per_env,
                   help="training examples per environment")
    g.add_argument("--n-test", type=_positive_int, default=d.n_test, help="o.o.d. test examples")
    g.add_argument("--n-dims", type=int, default=d.n_dims, help="shortcut dimensions")
    g.add_argument("--data-seed", type=int, default=d.seed, help="environment e uses seed data_seed + e")
    g = p.add_argument_group("execution")
    g.add_argument("--runs-per-batch", type=_positive_int, default=32,
                   help="runs trained at once (runs of one architecture); each finished batch is saved")
    g.add_argument("--early-abort", action=argparse.BooleanOptionalAction, default=True,
                   help="stop a search trial when train acc > 0.97 while test acc < 0.6 (paper §6.3)")
    g.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="precision of the batched training")
    g.add_argument("--backend", choices=("auto", "numpy", "cupy"), default=None,
                   help="array backend (default: environment variable HARDTOVARY_BACKEND, else auto: CuPy when a "
                        "GPU is usable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_sweep)


def _run_sweep(args) -> int:
    from hardtovary.experiments import sweep
    from hardtovary.reference import data

    arch = ({"hidden_units": (256, 512), "layers": (3, 5), "batch_sizes": (64, 128, 256)} if args.paper_space else
            {"hidden_units": args.hidden_units, "layers": args.layers, "batch_sizes": args.batch_sizes})
    space = sweep.SearchSpace(methods=args.methods, optimizers=args.optimizers, lrs=args.lrs, l2=args.l2,
                              l1=args.l1, taus=args.taus, rescale=args.rescale, **arch)
    data_config = data.SpiralsConfig(n_train_envs=args.n_envs, examples_per_env=args.examples_per_env,
                                     n_test=args.n_test, n_dims=args.n_dims, seed=args.data_seed)
    results = sweep.run(args.out, space=space, data_config=data_config, budget=args.budget, seeds=args.seeds,
                        top=args.top, epochs=args.epochs, seed=args.seed, runs_per_batch=args.runs_per_batch,
                        early_abort=args.early_abort, dtype=args.dtype, backend=args.backend, fresh=args.fresh,
                        progress=not args.no_progress)
    print(sweep.format_table(results))
    print(f"\nresults: {args.out / 'results.json'}  table: {args.out / 'table.txt'}")
    return 0


def _add_ilc(subparsers) -> None:
    p = subparsers.add_parser(
        "ilc",
        help="exact inconsistency scores and ILC of quadratic problems (paper §2, App. A.2)",
        description=(
            "Without a problem: the paper's worked examples (Fig. 3, Fig. 12, Remark 2, the Prop. 3 "
            "counterexample) with the exact I^eps, the determinant ratio and the Prop. 3 bound as printed (2 eps, "
            "false in general) and corrected (4 eps). With --hessians FILE.npz (H of shape [K, P, P] or [K, P] "
            "for diagonal Hessians; optional mu [K, P] and c [K]) or --patchwork: the exact I^eps of that "
            "problem at its common minimizer (else its pooled minimizer); with --compare also the ILC of "
            "averaging, the AND-mask (tau = 1) and the geometric mean by Monte Carlo over initial points."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--hessians", type=Path, default=None, help="problem file (.npz with H, optional mu, c)")
    source.add_argument("--patchwork", action="store_true",
                        help="the notebook's patchwork regression with an L2 term (--l2) in each environment")
    source.add_argument("--spirals-mlp", action="store_true",
                        help="train a small MLP on spirals with each rule and score its end point with the "
                             "per-environment Hessians (finite differences; local quadratic model)")
    p.add_argument("--l2", type=_nonnegative, default=None,
                   help="L2 coefficient in each environment's loss (default 0.01 for --patchwork, 1e-3 for "
                        "--spirals-mlp)")
    p.add_argument("--mlp-envs", type=_positive_int, default=4, help="--spirals-mlp: training environments")
    p.add_argument("--mlp-examples", type=_positive_int, default=64, help="--spirals-mlp: examples per environment")
    p.add_argument("--mlp-hidden", type=_int_list, default=(16, 16), help="--spirals-mlp: hidden widths")
    p.add_argument("--mlp-epochs", type=_positive_int, default=300, help="--spirals-mlp: full-batch epochs")
    p.add_argument("--eps", type=float, default=1.0, help="band width eps of the inconsistency score (> 0)")
    p.add_argument("--compare", action="store_true", help="ILC of mean, AND-mask and geometric mean")
    p.add_argument("--n-init", type=_positive_int, default=16, help="initial points for --compare")
    p.add_argument("--eta", type=float, default=0.1, help="gradient-descent step size for --compare")
    p.add_argument("--steps", type=_positive_int, default=5000, help="gradient-descent steps for --compare")
    p.add_argument("--init-scale", type=_nonnegative, default=1.0, help="std of the initial points")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial points")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(run=_run_ilc)


def _run_ilc(args) -> int:
    import json

    from hardtovary.experiments import ilc
    from hardtovary.reference import quadratic

    if not args.eps > 0:
        raise ValueError(f"--eps must be > 0, got {args.eps}")
    if args.spirals_mlp:
        report = ilc.spirals_mlp_inconsistency(
            args.eps, n_envs=args.mlp_envs, examples_per_env=args.mlp_examples, hidden=args.mlp_hidden,
            epochs=args.mlp_epochs, l2=1e-3 if args.l2 is None else args.l2, seed=args.seed)
        print(json.dumps(report, indent=2) if args.json else ilc.format_mlp_report(report))
        return 0
    if args.hessians is None and not args.patchwork:
        reports = {}
        for example in ilc.PAPER_EXAMPLES:
            reports[example.name] = {"description": example.description,
                                     **ilc.score_report(quadratic.QuadraticProblem(example.hessians), args.eps)}
        if args.json:
            print(json.dumps({"examples": reports}, indent=2))
        else:
            print(ilc.format_examples(reports))
        return 0
    problem = (ilc.load_problem(args.hessians) if args.hessians else
               ilc.patchwork_problem(0.01 if args.l2 is None else args.l2))
    report = ilc.score_report(problem, args.eps)
    if args.compare:
        report["compare"] = ilc.compare_rules(problem, args.eps, n_init=args.n_init, eta=args.eta,
                                              n_steps=args.steps, init_scale=args.init_scale, seed=args.seed)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(ilc.format_report(report))
    return 0


def _add_conformance(subparsers) -> None:
    from hardtovary.conformance import cli as conformance_cli

    p = subparsers.add_parser(
        "conformance",
        help="check an implementation of the rules, gradients and optimizer steps against the oracle",
        description=(
            "Run the conformance suite against a target named as module:attribute (see README, 'Verify your "
            "implementation'). Built-in targets: hardtovary.conformance.targets:reference (the oracle), "
            "hardtovary.conformance.torch_target:target (hardtovary.accel.torch), and the planted mutants "
            "hardtovary.conformance.mutants:<name>. Exit status 0 exactly when no check fails unexpectedly."))
    conformance_cli.add_arguments(p)
    p.set_defaults(run=conformance_cli.run_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hardtovary",
        description="The AND-mask, the geometric mean of gradients and ILC "
                    "(Parascandolo et al., 'Learning Explanations That Are Hard To Vary', ICLR 2021).")
    parser.add_argument("--version", action="version", version=f"hardtovary {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_synthetic(subparsers)
    _add_sweep(subparsers)
    _add_ilc(subparsers)
    _add_conformance(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, TypeError) as exc:
        print(f"hardtovary {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; finished methods are kept in the run folder and a rerun resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
