"""``hardtovary coinrun train``: clone the expert of a label folder with Adam and the temporal AND-mask, each
method with each seed (:mod:`hardtovary.experiments.coinrun.cloning`)."""

from __future__ import annotations

from pathlib import Path

from hardtovary.experiments import executors, options
from hardtovary.experiments.coinrun import cloning, figures
from hardtovary.experiments.errors import usage_errors


def _defaults(key: str) -> str:
    return ", ".join(f"{method} {values[key]:g}" for method, values in cloning.DEFAULT_HYPERPARAMETERS.items()
                     if key in values)


def add_cloning_options(parser) -> None:
    """``--labels``, ``--out``, ``--methods``, ``--epochs``, ``--width``, ``--batch-size``, ``--device``,
    ``--fresh`` and ``--no-progress``: what the train and the search stages share."""
    parser.add_argument("--labels", type=Path, required=True, help="label folder ('hardtovary coinrun label')")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--methods", type=options.name_list(cloning.METHODS), default=cloning.METHODS,
                        help="comma-separated methods: adam, and_mask (the temporal AND-mask Adam, Algorithm 1)")
    parser.add_argument("--epochs", type=options.positive_int, default=cloning.EPOCHS,
                        help="passes over the training states; the learning rate drops x0.1 at 1/2 and 3/4 of them")
    parser.add_argument("--width", type=options.positive_float, default=cloning.WIDTH,
                        help="ResNet-18 channel multiplier (1: the paper's network)")
    parser.add_argument("--batch-size", type=options.positive_int, default=cloning.BATCH_SIZE,
                        help="states per step, all from one level; at least 2")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    executors.add_executor_options(parser, "runs")


def add_arguments(parser) -> None:
    options.describe(parser, (
        "Behavioural cloning of the CoinRun expert (paper §3.3, App. B.6): a ResNet-18 policy learns the expert's "
        "action distribution on the training levels of a label folder, with Adam and with the temporal AND-mask "
        "Adam (Algorithm 1), each with each seed; KL(expert || policy) on the unseen test levels. Prints per "
        "method the mean ± std over seeds of the minimum and final test KL, the final train KL and the class "
        "accuracy, and writes OUT/results.json, OUT/runs/<method>-seed<s>/{checkpoint.pt,history.json} (every "
        "epoch, atomically) and the figures (Fig. 18-style KL curves, minimum test KL per run); a killed run "
        "resumes at its last finished epoch when started again with the same options. Defaults are sized for a "
        "CPU; the and_mask hyperparameters default to the paper's best (Table 3, row 1)."))
    add_cloning_options(parser)
    parser.add_argument("--seeds", type=options.int_list, default=(0, 1, 2),
                        help="comma-separated seeds (initialisation and batch order), integers >= 0")
    parser.add_argument("--lr", type=options.positive_float, default=None,
                        help=f"learning rate of every method (default: {_defaults('lr')})")
    parser.add_argument("--beta1", type=float, default=None,
                        help=f"first-moment rate in [0, 1) of every method (default: {_defaults('beta1')})")
    parser.add_argument("--beta3", type=float, default=None,
                        help=f"and_mask: rate in [0, 1) of the sign average (default: {_defaults('beta3')})")
    parser.add_argument("--tau", type=options.fraction, default=None,
                        help=f"and_mask: keep where |sign average| >= tau (default: {_defaults('tau')})")
    parser.add_argument("--weight-decay", type=options.nonnegative, default=None,
                        help=f"decoupled weight decay of every method, 0 is off (default: {_defaults('weight_decay')})")
    parser.set_defaults(interrupted="finished epochs of each run are kept in {out}; the same command resumes at the "
                                    "last one")


def configurations(args) -> dict:
    """``{"<method>-seed<s>": CloningConfig}`` of the options; ValueError for a combination a configuration
    refuses."""
    if not args.seeds:
        raise ValueError("--seeds must list at least one seed")
    if "and_mask" not in args.methods and (args.beta3 is not None or args.tau is not None):
        raise ValueError("--beta3 and --tau apply only to and_mask, which --methods does not include")
    configs = {}
    for method in args.methods:
        mask_options = dict(beta3=args.beta3, tau=args.tau) if method == "and_mask" else {}
        for seed in args.seeds:
            configs[f"{method}-seed{seed}"] = cloning.method_config(
                method, lr=args.lr, beta1=args.beta1, weight_decay=args.weight_decay, epochs=args.epochs,
                batch_size=args.batch_size, width=args.width, seed=seed, **mask_options)
    return configs


def run(args) -> int:
    with usage_errors():
        configs = configurations(args)
        executor = executors.make_executor(args)
    results = cloning.run(args.out, args.labels, configs, device=args.device, fresh=args.fresh,
                          progress=not args.no_progress, executor=executor)
    print(cloning.format_table(results["summary"]))
    print(f"\nresults: {args.out / 'results.json'}")
    runs_by_method = cloning.by_method(results["runs"].values())
    print(options.figures_line("figures", figures.write_figures(runs_by_method, args.out)))
    return 0
