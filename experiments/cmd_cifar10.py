"""``hardtovary cifar10``: CIFAR-10 memorization and label noise with the per-example AND-mask
(:mod:`hardtovary.experiments.cifar10`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hardtovary.experiments import cifar10, executors, options
from hardtovary.experiments.errors import UsageError


def add_arguments(parser) -> None:
    options.describe(parser, (
        "Train FastResNet on CIFAR-10 with every example its own environment (pooled BatchNorm, paper §3.2). "
        "memorization: the tau grid on original and random labels; label-noise: 25% of the labels re-drawn, "
        "Adam (tau 0, lr 1e-3) vs AND-mask (tau 0.2, lr 5e-3). Prints a table and writes OUT/results.json, "
        "OUT/units/<trial>.json, OUT/trials/<trial>/{checkpoint.pt,history.json} (every epoch, atomically) "
        "and the figures; a killed run resumes at the last finished epoch when started again with the same "
        "options. Needs the 'CIFAR-10 python version' batches (cifar-10-batches-py/) in --data."))
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with data_batch_1..5, test_batch, batches.meta")
    parser.add_argument("--experiment", choices=cifar10.EXPERIMENTS, default="memorization", help="which figure")
    parser.add_argument("--taus", type=options.float_list, default=None,
                        help="comma-separated taus (default: 0,0.05,0.1,0.2,0.4,0.6,0.8 for memorization, 0,0.2 "
                             "for label-noise); 0 is plain Adam")
    parser.add_argument("--epochs", type=options.positive_int, default=80, help="passes over the training data")
    parser.add_argument("--n-train", type=options.positive_int, default=None, help="use the first N training images")
    parser.add_argument("--n-test", type=options.positive_int, default=None, help="use the first N test images")
    parser.add_argument("--width", type=float, default=1.0, help="FastResNet channel multiplier")
    parser.add_argument("--batch-size", type=options.positive_int, default=80,
                        help="examples (= environments) per step")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate of every trial (default: 5e-4 memorization; label-noise 1e-3 for tau "
                             "0, 5e-3 otherwise)")
    parser.add_argument("--lr-milestones", type=options.int_list, default=None,
                        help="epochs where the LR drops x0.1 (default: one at 3/4 of the epochs, the authors' code; "
                             "the paper's text says 40,60 for memorization)" + options.MILESTONES_HELP)
    parser.add_argument("--weight-decay", type=options.nonnegative, default=1e-6,
                        help="L2 added before Adam's moments")
    parser.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=True,
                        help="inverse-sparsity rescaling of the masked gradient (tau > 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of labels, initialisation and batch order")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/cifar10-EXPERIMENT)")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    executors.add_executor_options(parser, "trials")
    parser.set_defaults(interrupted="finished epochs of each trial are kept in {out}; the same command resumes at "
                                    "the last one")


def run(args) -> int:
    if args.taus is not None and any(not 0.0 <= t <= 1.0 for t in args.taus):
        raise UsageError(f"--taus must lie in [0, 1], got {options.shown(args.taus)}")
    milestones = options.lr_milestones(args.lr_milestones, args.epochs)
    out = args.out = args.out or Path(f"runs/cifar10-{args.experiment}")  # the interrupt note names it too
    executor = executors.make_executor(args)
    try:
        results = cifar10.run(out, args.data, experiment=args.experiment, taus=args.taus, epochs=args.epochs,
                              n_train=args.n_train, n_test=args.n_test, width=args.width,
                              batch_size=args.batch_size, lr=args.lr, lr_milestones=milestones,
                              weight_decay=args.weight_decay, rescale=args.rescale, seed=args.seed,
                              device=args.device, fresh=args.fresh, progress=not args.no_progress,
                              executor=executor)
    except FileNotFoundError as exc:  # --data lacks the batches (load_cifar10 names them and where to get them)
        raise UsageError(str(exc)) from None
    print(cifar10.format_table(results))
    print(f"\nresults: {out / 'results.json'}")
    print(options.figures_line("figures", cifar10.plot_results(results, out)))
    return 0
