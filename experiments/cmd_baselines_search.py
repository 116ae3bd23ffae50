"""``hardtovary baselines-search``: a random search per baseline over the paper's Tables 1 and 2, the best
re-run over seeds (:mod:`hardtovary.experiments.baselines_search`)."""

from __future__ import annotations

from hardtovary.experiments import baselines, executors, options, sweep
from hardtovary.experiments import baselines_search as bs
from hardtovary.experiments.errors import usage_errors


def add_arguments(parser) -> None:
    d, a = baselines.DEFAULT_DATA, bs.SMALL_ARCH
    options.describe(parser, (
        "For each method, a random search of --budget trials over the paper's space (App. B.3): Table 1 for "
        "erm (with batch norm and dropout), dann (width only; fixed 2-layer nets) and and_mask (plus tau in "
        "{0.5, 0.75, 1} and rescaling on/off; the tau range is an assumption, the paper gives none); Table 2 "
        "for irm (penalty weight, annealing iterations, learning rate up to 1). L1 and L2 are never combined. "
        f"Trials stop early when {options.early_abort_rule()} (paper App. B.3); they are ranked by final "
        "o.o.d. test accuracy, and the best of each method is re-run with --seeds fresh seeds (no early "
        "abort). Prints per method the best configuration and mean ± std over seeds of train and o.o.d. test "
        "accuracy. Writes OUT/config.json, OUT/units/search-<method>-NNN.json and "
        "OUT/units/seeds-<method>-NNN.json (atomically, one per run), OUT/results.json and OUT/table.txt; a "
        "rerun with the same options resumes, skipping finished runs."))
    options.add_run_folder_options(parser, "runs/baselines_search")
    parser.add_argument("--methods", type=options.name_list(baselines.METHODS), default=baselines.DEFAULT_METHODS,
                        help=f"comma-separated, from {', '.join(baselines.METHODS)} (geometric_mean: and_mask's "
                             "space, tau 1, or and_mask's taus with --flavour original)")
    options.add_flavour_option(parser, "the drawn tau")
    parser.add_argument("--budget", type=options.positive_int, default=4, help="random-search trials per method")
    parser.add_argument("--seeds", type=options.positive_int, default=3,
                        help="seeds of the best configuration's re-run")
    options.add_search_seed_and_epochs(parser)
    g = parser.add_argument_group("architecture values of the search (comma-separated, each drawn uniformly)")
    g.add_argument("--paper-space", action="store_true",
                   help=f"Table 1's values: {options.paper_architecture_options(sweep.PAPER_ARCHITECTURE)} "
                        "(overrides those three options)")
    g.add_argument("--widths", type=options.int_list, default=a.hidden_units,
                   help="hidden-layer widths (all layers alike)")
    g.add_argument("--depths", type=options.int_list, default=a.layers, help="numbers of hidden layers (not dann)")
    g.add_argument("--batch-sizes", type=options.int_list, default=a.batch_sizes,
                   help="examples per environment per step")
    g.add_argument("--n-agreement-envs", type=options.positive_int, default=None,
                   help="environments per step (must divide --n-envs; default: all of them)")
    options.add_spirals_options(parser, d)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    executors.add_executor_options(parser, "runs")
    parser.set_defaults(interrupted="finished runs are kept in {out}; the same command resumes")


def run(args) -> int:
    with usage_errors():
        options.check_flavour(args.methods, args.flavour)
        executor = executors.make_executor(args)
        arch = sweep.PAPER_ARCHITECTURE if args.paper_space else sweep.Architecture(
            hidden_units=args.widths, layers=args.depths, batch_sizes=args.batch_sizes)
        data_config = options.spirals_config(args)
    results = bs.run(args.out, methods=args.methods, budget=args.budget, seeds=args.seeds, epochs=args.epochs,
                     seed=args.seed, arch=arch, data_config=data_config, n_agreement_envs=args.n_agreement_envs,
                     flavour=args.flavour or "paper", fresh=args.fresh, progress=not args.no_progress,
                     executor=executor)
    print(bs.format_table(results))
    print(f"\nresults: {args.out / 'results.json'}  table: {args.out / 'table.txt'}")
    return 0
