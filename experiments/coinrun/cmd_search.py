"""``hardtovary coinrun search``: TPE search of each cloning method's hyperparameters with optuna
(:mod:`hardtovary.experiments.coinrun.search`)."""

from __future__ import annotations

from hardtovary.experiments import executors, options
from hardtovary.experiments.coinrun import cloning, figures, search
from hardtovary.experiments.coinrun.cmd_train import add_cloning_options
from hardtovary.experiments.errors import usage_errors


def add_arguments(parser) -> None:
    space = "; ".join(f"{name} {'log-' if r.log else ''}uniform in [{r.low:g}, {r.high:g}]"
                      f"{' behind an on/off switch' if r.switch else ''}"
                      f"{'' if r.methods == cloning.METHODS else ' (' + ', '.join(r.methods) + ' only)'}"
                      for name, r in search.SPACE.items())
    options.describe(parser, (
        "TPE search (optuna, paper App. B.6) of the cloning hyperparameters of each method: one study per method "
        f"in OUT/study.db, each trial one run in OUT/trials/<run>/, its objective the minimum test KL over the "
        f"epochs (the test levels select, as in the paper). Space: {space}. Prints and writes (OUT/table.txt) a "
        "Table 3-style listing of the best runs per method, writes OUT/results.json (every complete trial with its "
        "history) and the figures over the best runs. --trials counts complete trials per method: a search "
        "started again with the same options resumes, and a larger --trials extends it."))
    add_cloning_options(parser)
    parser.add_argument("--trials", type=options.positive_int, required=True,
                        help="complete trials per method (the paper ran 1024)")
    parser.add_argument("--top", type=options.positive_int, default=search.TOP,
                        help="best runs per method in the listing and the figures")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the TPE sampler and of every trial's run (initialisation, batch order), >= 0")
    parser.add_argument("--parallel-trials", type=options.positive_int, default=1,
                        help="trials TPE draws at a time, run at once by the executor (the draws depend on it, not "
                             "on the executor or --workers; 1: the sequential search)")
    parser.set_defaults(interrupted="finished trials and the running trial's finished epochs are kept in {out}; the "
                                    "same command resumes")


def run(args) -> int:
    with usage_errors():
        executor = executors.make_executor(args)
    results = search.run(args.out, args.labels, methods=args.methods, trials=args.trials, epochs=args.epochs,
                         width=args.width, batch_size=args.batch_size, top=args.top, seed=args.seed,
                         device=args.device, fresh=args.fresh, progress=not args.no_progress, executor=executor,
                         parallel_trials=args.parallel_trials)
    print(search.format_table(results))
    print(f"\nresults: {args.out / 'results.json'}, listing: {args.out / search.TABLE_FILE}")
    written = figures.write_figures(search.best_trials(results), args.out)
    print(options.figures_line("figures", written))
    return 0
