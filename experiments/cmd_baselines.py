"""``hardtovary baselines``: ERM, DANN, IRM, the AND-mask and the geometric mean in torch on the synthetic task
(:mod:`hardtovary.experiments.baselines`)."""

from __future__ import annotations

import dataclasses

from hardtovary.experiments import baselines, executors, options
from hardtovary.experiments.errors import usage_errors
from hardtovary.reference import optim


def add_arguments(parser) -> None:
    d, c = baselines.DEFAULT_DATA, baselines.DEFAULT_CONFIG
    options.describe(parser, (
        "Train each method in torch on the spirals memorization task (paper §3.1, App. B.3) with the "
        "reference batching (one batch per environment per step), print final train and o.o.d. test "
        "accuracy (mean ± std over --seeds), and write OUT/config.json, OUT/units/<method>-seed<s>.json (one "
        "per finished run, atomically), OUT/results.json, OUT/table.txt, OUT/accuracy_bars.png (Fig. 6 style) and "
        "OUT/learning_curves.png (Fig. 14 style). A rerun with the same options resumes. "
        "Per-method presets: erm and dann L2 1e-4; irm penalty 100 after 8 annealing steps; and_mask / "
        "geometric_mean tau 1 with rescaling and L2 1e-4; options given explicitly override them."))
    options.add_run_folder_options(parser, "runs/baselines")
    parser.add_argument("--methods", type=options.name_list(baselines.METHODS), default=baselines.DEFAULT_METHODS,
                        help=f"comma-separated, from {', '.join(baselines.METHODS)}")
    parser.add_argument("--epochs", type=options.positive_int, default=c.epochs, help="passes over the training data")
    options.add_spirals_options(parser, d)
    g = parser.add_argument_group("model and training (defaults: each method's preset)")
    g.add_argument("--hidden", type=options.widths, default=c.hidden, help=options.HIDDEN_HELP)
    g.add_argument("--batch-size", type=options.positive_int, default=c.batch_size, help="examples per environment")
    g.add_argument("--n-agreement-envs", type=options.positive_int, default=None,
                   help="environments per step (must divide --n-envs; default: all of them)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=c.optimizer, help="Adam or SGD + momentum 0.9")
    g.add_argument("--lr", type=float, default=c.lr, help="learning rate (x0.1 at 1/2 and 3/4 of the epochs)")
    g.add_argument("--seed", type=int, default=c.seed, help="seed of initialisation and batching")
    g.add_argument("--seeds", type=options.positive_int, default=1,
                   help="runs per method, with seeds --seed .. --seed + N - 1 (the data stay fixed); the table "
                        "gives mean ± std over them")
    g.add_argument("--dropout", type=float, default=None,
                   help="dropout after each hidden activation (erm, irm; and_mask and geometric_mean ignore it)")
    g.add_argument("--batch-norm", action="store_true", help="BatchNorm1d after each hidden Linear (not dann)")
    g.add_argument("--l1", type=options.nonnegative, default=None, help="L1 coefficient")
    g.add_argument("--weight-decay", type=options.nonnegative, default=None,
                   help="L2 coefficient (coupled weight decay, added before the optimizer's moments)")
    g.add_argument("--tau", type=options.fraction, default=None,
                   help="and_mask / geometric_mean threshold; geometric_mean takes tau != 1 only with --flavour "
                        "original")
    options.add_flavour_option(g, "--tau")
    g.add_argument("--dann-lambda", type=options.nonnegative, default=None, help="gradient-reversal coefficient")
    g.add_argument("--penalty-weight", type=options.nonnegative, default=None, help="IRMv1 penalty weight")
    g.add_argument("--anneal-iters", type=int, default=None, help="IRM steps with penalty weight 1")
    g.add_argument("--early-abort", action="store_true",
                   help=f"stop a run when {options.early_abort_rule()} (paper App. B.3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    executors.add_executor_options(parser, "runs")
    parser.set_defaults(interrupted="finished runs are kept in {out}; the same command resumes")


def configurations(args):
    """The data, the base configuration and the per-method overrides of the options; every method's configuration
    is built from them once here, so that what it refuses is refused before the run."""
    options.check_rule_options(args.methods, args.tau, args.flavour)
    data_config = options.spirals_config(args)
    base = dataclasses.replace(baselines.DEFAULT_CONFIG, hidden=args.hidden, batch_size=args.batch_size,
                               n_agreement_envs=args.n_agreement_envs, optimizer=args.optimizer, lr=args.lr,
                               seed=args.seed, epochs=args.epochs, lr_milestones=optim.paper_milestones(args.epochs),
                               batch_norm=args.batch_norm, early_abort=args.early_abort)
    overrides = options.given(dropout=args.dropout, l1=args.l1, weight_decay=args.weight_decay, tau=args.tau,
                              flavour=args.flavour, dann_lambda=args.dann_lambda,
                              irm_penalty_weight=args.penalty_weight, irm_anneal_iters=args.anneal_iters)
    for method in args.methods:
        baselines.method_config(base, method, overrides)
    return data_config, base, overrides


def run(args) -> int:
    from hardtovary.experiments import plots

    with usage_errors():
        data_config, base, overrides = configurations(args)
        executor = executors.make_executor(args)
    results = baselines.run(args.out, data_config=data_config, base=base, methods=args.methods,
                            overrides=overrides, seeds=args.seeds, fresh=args.fresh, progress=not args.no_progress,
                            executor=executor)
    print(baselines.format_table(results))
    print(f"\nresults: {args.out / 'results.json'}")
    bars = baselines.plot_bars(results, args.out / "accuracy_bars.png")
    curves = plots.plot_learning_curves({m: [run["history"] for run in r["runs"]]
                                         for m, r in results["methods"].items()}, args.out / "learning_curves.png")
    print(options.figures_line("plots", [bars, curves]))
    return 0
