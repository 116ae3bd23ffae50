"""``hardtovary cifar10``: memorization and label noise with the per-example AND-mask, on CIFAR-10 or on
scikit-learn's 8x8 digits (``--dataset digits``; :mod:`hardtovary.experiments.cifar10`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hardtovary.experiments import cifar10, digits, executors, options
from hardtovary.experiments.errors import UsageError

# The defaults that --help states come from the profiles, so that it cannot drift from them.
_CIFAR10, _DIGITS = cifar10.PROFILES["cifar10"], cifar10.PROFILES["digits"]


def _number(x: float) -> str:
    """A learning rate as one types it: ``5e-4``, ``1e-3``."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _typed(value) -> str:
    """A number or a list of numbers as one types it: ``1``, ``0.5``, ``0,0.2``."""
    if isinstance(value, tuple):
        return ",".join(_typed(v) for v in value)
    return f"{value:g}"


def _defaults(field: str) -> str:
    """``default: X; digits Y`` of one :class:`~hardtovary.experiments.cifar10.Profile` field."""
    return f"default: {_typed(getattr(_CIFAR10, field))}; digits {_typed(getattr(_DIGITS, field))}"


def _learning_rates(p: cifar10.Profile) -> str:
    rates = {p.memorization_lr, *p.label_noise_lr.values()}
    if len(rates) == 1:
        return f"{_number(p.memorization_lr)} throughout"
    return (f"{_number(p.memorization_lr)} memorization; label-noise {_number(p.label_noise_lr['baseline'])} for "
            f"tau 0, {_number(p.label_noise_lr['and_mask'])} otherwise")


def add_arguments(parser) -> None:
    options.describe(parser, (
        "Train FastResNet on CIFAR-10 with every example its own environment (pooled BatchNorm, paper §3.2). "
        f"memorization: the tau grid on original and random labels; label-noise: {cifar10.NOISE_FRACTION:.0%} of "
        f"the labels re-drawn, Adam (tau 0, lr {_number(_CIFAR10.label_noise_lr['baseline'])}) vs AND-mask "
        f"(tau {_CIFAR10.label_noise_taus[-1]:g}, lr {_number(_CIFAR10.label_noise_lr['and_mask'])}). Prints a "
        "table and writes OUT/results.json, OUT/units/<trial>.json, "
        "OUT/trials/<trial>/{checkpoint.pt,history.json} (every epoch, atomically) and the figures; a killed run "
        "resumes at the last finished epoch when started again with the same options. Needs the 'CIFAR-10 python "
        "version' batches (cifar-10-batches-py/) in --data. "
        f"--dataset digits runs the same experiments on a CPU, on the {digits.N_IMAGES} 8x8 digits that scikit-learn "
        f"ships (no download; the 'digits' extra), with FastResNet sized for 8x8 and its own defaults: "
        f"{_DIGITS.epochs} epochs, batches of {_DIGITS.batch_size}, width {_DIGITS.width:g}, the first "
        f"{_DIGITS.n_train} of {digits.N_TRAIN} training images, lr {_learning_rates(_DIGITS)}, label-noise taus "
        f"{', '.join(f'{t:g}' for t in _DIGITS.label_noise_taus)}."))
    parser.add_argument("--dataset", choices=cifar10.DATASETS, default="cifar10",
                        help="cifar10 (from --data) or digits (scikit-learn's 8x8 digits)")
    parser.add_argument("--data", type=Path, default=None,
                        help="CIFAR-10 only: folder with data_batch_1..5, test_batch, batches.meta")
    parser.add_argument("--experiment", choices=cifar10.EXPERIMENTS, default="memorization", help="which figure")
    parser.add_argument("--taus", type=options.float_list, default=None,
                        help=f"comma-separated taus (default: {_typed(cifar10.TAUS)} for memorization; for "
                             f"label-noise {_typed(_CIFAR10.label_noise_taus)}, digits "
                             f"{_typed(_DIGITS.label_noise_taus)}); 0 is plain Adam")
    parser.add_argument("--epochs", type=options.positive_int, default=None,
                        help=f"passes over the training data ({_defaults('epochs')})")
    parser.add_argument("--n-train", type=options.positive_int, default=None,
                        help=f"use the first N training images (default: all; digits {_DIGITS.n_train} of "
                             f"{digits.N_TRAIN})")
    parser.add_argument("--n-test", type=options.positive_int, default=None,
                        help="use the first N test images (default: all)")
    parser.add_argument("--width", type=options.positive_float, default=None,
                        help=f"channel multiplier of the network ({_defaults('width')})")
    parser.add_argument("--batch-size", type=options.positive_int, default=None,
                        help=f"examples (= environments) per step ({_defaults('batch_size')})")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate of every trial (default: {_learning_rates(_CIFAR10)}; digits "
                             f"{_learning_rates(_DIGITS)})")
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
