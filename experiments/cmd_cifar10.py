"""``hardtovary cifar10``: memorization and label noise with the per-example AND-mask, on CIFAR-10 or on
scikit-learn's 8x8 digits (``--dataset digits``; :mod:`hardtovary.experiments.cifar10`)."""

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
        "options. Needs the 'CIFAR-10 python version' batches (cifar-10-batches-py/) in --data. "
        "--dataset digits runs the same experiments on a CPU, on the 1797 8x8 digits that scikit-learn "
        "ships (no download; the 'digits' extra), with FastResNet sized for 8x8 and its own defaults: 40 epochs, "
        "batches of 32, width 0.5, the first 512 of 1438 training images, lr 5e-3 for every trial, label-noise "
        "taus 0, 0.2, 0.4."))
    parser.add_argument("--dataset", choices=cifar10.DATASETS, default="cifar10",
                        help="cifar10 (from --data) or digits (scikit-learn's 8x8 digits)")
    parser.add_argument("--data", type=Path, default=None,
                        help="CIFAR-10 only: folder with data_batch_1..5, test_batch, batches.meta")
    parser.add_argument("--experiment", choices=cifar10.EXPERIMENTS, default="memorization", help="which figure")
    parser.add_argument("--taus", type=options.float_list, default=None,
                        help="comma-separated taus (default: 0,0.05,0.1,0.2,0.4,0.6,0.8 for memorization; for "
                             "label-noise 0,0.2, digits 0,0.2,0.4); 0 is plain Adam")
    parser.add_argument("--epochs", type=options.positive_int, default=None,
                        help="passes over the training data (default: 80; digits 40)")
    parser.add_argument("--n-train", type=options.positive_int, default=None,
                        help="use the first N training images (default: all; digits 512 of 1438)")
    parser.add_argument("--n-test", type=options.positive_int, default=None,
                        help="use the first N test images (default: all)")
    parser.add_argument("--width", type=options.positive_float, default=None,
                        help="channel multiplier of the network (default: 1; digits 0.5)")
    parser.add_argument("--batch-size", type=options.positive_int, default=None,
                        help="examples (= environments) per step (default: 80; digits 32)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate of every trial (default: 5e-4 memorization; label-noise 1e-3 for tau "
                             "0, 5e-3 otherwise; digits 5e-3 throughout)")
    parser.add_argument("--lr-milestones", type=options.int_list, default=None,
                        help="epochs where the LR drops x0.1 (default: one at 3/4 of the epochs, the authors' code; "
                             "the paper's text says 40,60 for memorization)" + options.MILESTONES_HELP)
    parser.add_argument("--weight-decay", type=options.nonnegative, default=1e-6,
                        help="L2 added before Adam's moments")
    parser.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=True,
                        help="inverse-sparsity rescaling of the masked gradient (tau > 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of labels, initialisation and batch order")
    parser.add_argument("--seeds", type=options.positive_int, default=1,
                        help="train every trial with the seeds SEED..SEED+N-1; the table and figures give mean ± std")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/DATASET-EXPERIMENT)")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    executors.add_executor_options(parser, "trials")
    parser.set_defaults(interrupted="finished epochs of each trial are kept in {out}; the same command resumes at "
                                    "the last one")


def run(args) -> int:
    if args.taus is not None and any(not 0.0 <= t <= 1.0 for t in args.taus):
        raise UsageError(f"--taus must lie in [0, 1], got {options.shown(args.taus)}")
    epochs = cifar10.PROFILES[args.dataset].epochs if args.epochs is None else args.epochs
    milestones = options.lr_milestones(args.lr_milestones, epochs)
    if (args.dataset == "cifar10") != (args.data is not None):
        raise UsageError("--data DIR (the unpacked cifar-10-batches-py/) is required with --dataset cifar10"
                         if args.dataset == "cifar10" else "--data is for CIFAR-10 only: the digits come with "
                         "scikit-learn")
    out = args.out = args.out or Path(f"runs/{args.dataset}-{args.experiment}")  # the interrupt note names it too
    executor = executors.make_executor(args)
    try:
        results = cifar10.run(out, args.data, dataset=args.dataset, experiment=args.experiment, taus=args.taus,
                              epochs=epochs, n_train=args.n_train, n_test=args.n_test, width=args.width,
                              batch_size=args.batch_size, lr=args.lr, lr_milestones=milestones,
                              weight_decay=args.weight_decay, rescale=args.rescale, seed=args.seed, seeds=args.seeds,
                              device=args.device, fresh=args.fresh, progress=not args.no_progress,
                              executor=executor)
    except FileNotFoundError as exc:  # --data lacks the batches (load_cifar10 names them and where to get them)
        raise UsageError(str(exc)) from None
    print(cifar10.format_table(results))
    print(f"\nresults: {out / 'results.json'}")
    print(options.figures_line("figures", cifar10.plot_results(results, out)))
    return 0
