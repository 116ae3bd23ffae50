"""``hardtovary sweep``: random search over the paper's Table 1 on the synthetic task, trained as batched sweeps
(:mod:`hardtovary.experiments.sweep`)."""

from __future__ import annotations

import argparse
import dataclasses

from hardtovary.accel.sweep import DTYPES
from hardtovary.experiments import executors, options, sweep
from hardtovary.experiments.errors import usage_errors


def add_arguments(parser) -> None:
    s, d = sweep.SearchSpace(), sweep.DEFAULT_DATA
    options.describe(parser, (
        "Random search over the paper's Table 1 space (App. B.3; BatchNorm and dropout excluded) on the spirals "
        "memorization task: draw --budget configurations (method, tau, rescaling, width, depth, batch "
        "size, optimizer, learning rate, and one of L2 / L1 / none with its coefficient), train them as batched "
        "sweeps (many runs at once; CuPy on a GPU, else NumPy), rank them by final o.o.d. test accuracy, re-run "
        "the best --top with --seeds fresh seeds, and print a table of mean ± standard deviation (over seeds) "
        f"of train and o.o.d. test accuracy. Search trials stop early when {options.early_abort_rule()} "
        "(paper App. B.3) unless --no-early-abort. Writes OUT/config.json, OUT/units/search-NNN.json and "
        "OUT/units/seeds-NNN.json (one per batch of runs, atomically), OUT/results.json and OUT/table.txt; a "
        "rerun with the same options resumes, skipping finished batches. The defaults are small (a few minutes "
        "on two CPU cores); --paper-space uses Table 1's widths, depths and batch sizes. Options named in the "
        "plural are the values of the search space; the singular ones of the other commands set one value."))
    options.add_run_folder_options(parser, "runs/sweep")
    parser.add_argument("--budget", type=options.positive_int, default=32, help="random-search trials")
    parser.add_argument("--top", type=options.positive_int, default=3,
                        help="best configurations re-run over seeds (<= budget)")
    parser.add_argument("--seeds", type=options.positive_int, default=3, help="seeds per re-run configuration")
    options.add_search_seed_and_epochs(parser)
    g = parser.add_argument_group("search space (paper Table 1; comma-separated values, each drawn uniformly)")
    g.add_argument("--paper-space", action="store_true",
                   help=f"Table 1's architecture values: "
                        f"{options.paper_architecture_options(sweep.PAPER_ARCHITECTURE)} (overrides those three "
                        "options; needs --examples-per-env >= 256)")
    g.add_argument("--methods", type=options.name_list(sweep.METHODS), default=s.methods,
                   help=f"rules, from {', '.join(sweep.METHODS)} (mean ignores tau and rescaling; geometric_mean "
                        "uses tau 1, or draws from --taus with --flavour original)")
    options.add_flavour_option(g, "the drawn tau")
    g.add_argument("--widths", type=options.int_list, default=s.hidden_units,
                   help="hidden-layer widths (all layers alike)")
    g.add_argument("--depths", type=options.int_list, default=s.layers, help="numbers of hidden layers")
    g.add_argument("--batch-sizes", type=options.int_list, default=s.batch_sizes,
                   help="examples per environment per step")
    g.add_argument("--optimizers", type=options.name_list(sweep.OPTIMIZERS), default=s.optimizers,
                   help="adam (betas 0.9, 0.999) and/or sgd (momentum 0.9)")
    g.add_argument("--lrs", type=options.float_list, default=s.lrs, help="learning rates")
    g.add_argument("--weight-decays", type=options.float_list, default=s.l2,
                   help="L2 (coupled weight decay) coefficients, used when the drawn regulariser is L2")
    g.add_argument("--l1s", type=options.float_list, default=s.l1,
                   help="L1 coefficients, used when the drawn regulariser is L1 (L1 and L2 are never combined)")
    g.add_argument("--taus", type=options.float_list, default=s.taus,
                   help="agreement thresholds in [0, 1] (the paper does not give this range)")
    g.add_argument("--rescales", type=options.bool_list, default=s.rescale,
                   help="inverse-sparsity rescaling choices, e.g. 'no,yes' or 'yes'")
    options.add_spirals_options(parser, d)
    g = parser.add_argument_group("execution")
    g.add_argument("--runs-per-batch", type=options.positive_int, default=32,
                   help="runs trained at once (runs of one architecture); each finished batch is saved")
    g.add_argument("--early-abort", action=argparse.BooleanOptionalAction, default=True,
                   help=f"stop a search trial when {options.early_abort_rule()} (paper App. B.3)")
    options.add_dtype_option(g)
    options.add_array_backend_option(g)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    executors.add_executor_options(parser, "batches of runs")
    parser.set_defaults(interrupted="finished batches of runs are kept in {out}; the same command resumes")


def run(args) -> int:
    with usage_errors():
        options.check_flavour(args.methods, args.flavour)
        options.check_array_backend(args.backend)
        executor = executors.make_executor(args)
        arch = (dataclasses.asdict(sweep.PAPER_ARCHITECTURE) if args.paper_space else
                {"hidden_units": args.widths, "layers": args.depths, "batch_sizes": args.batch_sizes})
        space = sweep.SearchSpace(methods=args.methods, optimizers=args.optimizers, lrs=args.lrs,
                                  l2=args.weight_decays, l1=args.l1s, taus=args.taus, rescale=args.rescales,
                                  flavour=args.flavour or "paper", **arch)
        data_config = options.spirals_config(args)
    results = sweep.run(args.out, space=space, data_config=data_config, budget=args.budget, seeds=args.seeds,
                        top=args.top, epochs=args.epochs, seed=args.seed, runs_per_batch=args.runs_per_batch,
                        early_abort=args.early_abort, dtype=args.dtype or DTYPES[0], backend=args.backend,
                        fresh=args.fresh, progress=not args.no_progress, executor=executor)
    print(sweep.format_table(results))
    print(f"\nresults: {args.out / 'results.json'}  table: {args.out / 'table.txt'}")
    return 0
