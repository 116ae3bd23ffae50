"""``hardtovary env-count``: maximum o.o.d. test accuracy against the number of training environments, Fig. 15
(:mod:`hardtovary.experiments.env_count`)."""

from __future__ import annotations

import dataclasses

from hardtovary.accel.sweep import DTYPES
from hardtovary.experiments import baselines, executors, options
from hardtovary.experiments import env_count as ec
from hardtovary.experiments.errors import UsageError, usage_errors
from hardtovary.reference import optim


def add_arguments(parser) -> None:
    d, c = ec.DEFAULT_DATA, ec.DEFAULT_CONFIG
    options.describe(parser, (
        "For each number of training environments in --envs and each method, train --runs runs (seeds SEED, "
        "SEED+1, ...) on the spirals task with the torch baselines, record each run's maximum o.o.d. test "
        "accuracy over epochs and report the best over runs (the paper's statistic, best of 5) and the mean. "
        "Prints a table (rows: environments; columns: methods, best / mean) and writes OUT/config.json, "
        "OUT/units/envs<N>-<method>-run<R>.json (one per run, atomically), OUT/results.json, OUT/table.txt and "
        "OUT/env_count.png (log2 x axis, Fig. 15 style). A rerun with the same options resumes, skipping "
        "finished runs. Environments per step: the largest divisor of N not above --max-agreement-envs "
        "(min(N, 16) for powers of two). The defaults are CPU-sized (about 4 minutes on two cores: 2 x 128 "
        "MLP, 40 epochs, 256 examples per environment, N up to 64, 3 runs); the paper uses N = 2 .. 4096, "
        "5 runs and finds the baseline first succeeds at 1024 environments."))
    options.add_run_folder_options(parser, "runs/env_count")
    parser.add_argument("--envs", type=options.positive_ints, default=ec.DEFAULT_ENVS,
                        help="comma-separated numbers of training environments (each >= 1; paper: 2,4,...,4096)")
    parser.add_argument("--methods", type=options.name_list(baselines.METHODS), default=ec.DEFAULT_METHODS,
                        help=f"comma-separated, from {', '.join(baselines.METHODS)} (paper: baseline and AND-mask)")
    parser.add_argument("--runs", type=options.positive_int, default=ec.DEFAULT_RUNS,
                        help="runs (seeds) per cell; paper: 5")
    parser.add_argument("--examples-per-env", type=options.positive_int, default=d.examples_per_env,
                        help="training examples per environment (ignored when --total-examples is given)")
    parser.add_argument("--total-examples", type=options.positive_int, default=None,
                        help="bound the total data: examples per environment = TOTAL // N (must leave >= 2)")
    parser.add_argument("--max-agreement-envs", type=options.positive_int, default=ec.MAX_AGREEMENT_ENVS,
                        help="at most this many environments per step (the largest divisor of N not above it)")
    g = parser.add_argument_group("data and training (per-method presets as in 'hardtovary baselines')")
    g.add_argument("--n-test", type=options.positive_int, default=d.n_test, help="o.o.d. test examples")
    g.add_argument("--n-dims", type=int, default=d.n_dims, help="shortcut dimensions")
    g.add_argument("--shortcut-scale", type=options.nonnegative, default=d.shortcut_scale,
                   help="multiplies the shortcut signatures (the paper's variance 0.1 is 0.316)")
    g.add_argument("--data-seed", type=int, default=d.seed, help="environment e uses seed data_seed + e")
    g.add_argument("--hidden", type=options.widths, default=c.hidden, help=options.HIDDEN_HELP)
    g.add_argument("--batch-size", type=options.positive_int, default=c.batch_size,
                   help="examples per environment per step (capped at the examples per environment)")
    g.add_argument("--epochs", type=options.positive_int, default=c.epochs,
                   help="passes over the training data (LR x0.1 at 1/2 and 3/4 of them)")
    g.add_argument("--lr", type=float, default=c.lr, help="learning rate (Adam)")
    g.add_argument("--tau", type=options.fraction, default=None,
                   help="and_mask / geometric_mean threshold (default: the preset, 1); geometric_mean takes tau != 1 "
                        "only with --flavour original")
    options.add_flavour_option(g, "--tau")
    g.add_argument("--seed", type=int, default=c.seed, help="run r uses seed SEED + r (initialisation, batching)")
    parser.add_argument("--implementation", choices=ec.IMPLEMENTATIONS, default="torch",
                        help="torch: each run its own unit, trained by the torch baselines (every method); accel: "
                             "the runs of each number of environments trained together as one batched sweep on the "
                             "array --backend (CuPy on a GPU; erm, and_mask and geometric_mean; the same runs with "
                             "their initial weights drawn from NumPy's random stream)")
    options.add_array_backend_option(parser, "with --implementation accel: ")
    options.add_dtype_option(parser, "with --implementation accel: ")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    executors.add_executor_options(parser, "runs (with --implementation accel: environment counts)")
    parser.set_defaults(interrupted="finished runs are kept in {out}; the same command resumes")


def configurations(args):
    """The data (all but the number of environments), the training before each method's preset, and the rule
    overrides of the options; each method's configuration is built once here to refuse bad options early."""
    options.check_rule_options(args.methods, args.tau, args.flavour)
    data_config = dataclasses.replace(ec.DEFAULT_DATA, examples_per_env=args.examples_per_env, n_test=args.n_test,
                                      n_dims=args.n_dims, shortcut_scale=args.shortcut_scale, seed=args.data_seed)
    base = dataclasses.replace(ec.DEFAULT_CONFIG, hidden=args.hidden, batch_size=args.batch_size,
                               epochs=args.epochs, lr=args.lr, lr_milestones=optim.paper_milestones(args.epochs),
                               seed=args.seed)
    overrides = options.given(tau=args.tau, flavour=args.flavour)
    for method in args.methods:
        baselines.method_config(base, method, overrides)
    return data_config, base, overrides


def check_implementation(args) -> None:
    """``--backend`` and ``--dtype`` belong to the accel implementation, whose methods are fewer."""
    if args.implementation == "accel":
        bad = [m for m in args.methods if m not in baselines.REFERENCE_RULES]
        if bad:
            raise UsageError(f"--implementation accel trains {', '.join(baselines.REFERENCE_RULES)}; "
                             f"{', '.join(bad)} need --implementation torch")
        options.check_array_backend(args.backend)
    elif args.backend is not None or args.dtype is not None:
        raise UsageError("--backend and --dtype apply only with --implementation accel")


def run(args) -> int:
    with usage_errors():
        data_config, base, overrides = configurations(args)
        check_implementation(args)
        executor = executors.make_executor(args)
    results = ec.run(args.out, envs=args.envs, methods=args.methods, runs=args.runs, data_config=data_config,
                     base=base, total_examples=args.total_examples, max_agreement_envs=args.max_agreement_envs,
                     overrides=overrides, implementation=args.implementation, backend=args.backend,
                     dtype=args.dtype or DTYPES[0], fresh=args.fresh, progress=not args.no_progress,
                     executor=executor)
    print(ec.format_table(results))
    print(f"\nresults: {args.out / 'results.json'}  table: {args.out / 'table.txt'}")
    print(options.figures_line("plot", [ec.plot(results, args.out / "env_count.png")]))
    return 0
