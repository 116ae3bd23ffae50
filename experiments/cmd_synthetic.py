"""``hardtovary synthetic``: averaging, the AND-mask and the geometric mean on the spirals memorization task
(:mod:`hardtovary.experiments.synthetic`)."""

from __future__ import annotations

import argparse
import dataclasses

from hardtovary.experiments import options, synthetic
from hardtovary.experiments.errors import UsageError, usage_errors


def add_arguments(parser) -> None:
    d, t = synthetic.DEFAULT_DATA, synthetic.DEFAULT_TRAIN
    options.describe(parser, (
        "Train one MLP per method on the spirals memorization task (paper §3.1) with the NumPy reference "
        "implementation (or, with --implementation accel, all methods at once as one batched sweep), print "
        "final train and o.o.d. test accuracy with the tau and flavour each method trained with, and write "
        "OUT/results.json (per method train_acc, test_acc, losses and per-epoch history, plus the full "
        "configuration), OUT/units/<method>.json for each finished method and OUT/learning_curves.png. A run "
        "killed midway resumes from OUT when started again with the same options."))
    options.add_run_folder_options(parser, "runs/synthetic")
    parser.add_argument("--methods", default=",".join(synthetic.DEFAULT_METHODS),
                        help=f"comma-separated methods, from {', '.join(synthetic.METHOD_PRESETS)}; "
                             "'mean' is averaging (AND-mask with tau = 0)")
    presets = ", ".join(f"{m} {preset['tau']:g}" for m, preset in synthetic.METHOD_PRESETS.items() if m != "mean")
    parser.add_argument("--tau", type=options.fraction, default=None,
                        help=f"agreement threshold of every masking method (default: each method's preset: "
                             f"{presets}); ignored by mean; geometric_mean takes tau != 1 only with --flavour "
                             "original")
    options.add_flavour_option(parser, "--tau")
    options.add_spirals_options(parser, d)
    add_training_options(parser, t)
    parser.add_argument("--implementation", choices=synthetic.IMPLEMENTATIONS, default="reference",
                        help="reference: the NumPy oracle, one method after another; accel: all methods trained "
                             "together as one batched sweep on the array --backend (float64, same results to "
                             "rounding; no --batch-norm)")
    options.add_array_backend_option(parser, "with --implementation accel: ")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(interrupted="finished methods are kept in {out}; the same command resumes")


def add_training_options(parser, t, *, sharded: bool = False) -> None:
    """The model and training options of the synthetic task (paper Table 1), with defaults from the
    ``TrainConfig`` ``t``: for ``hardtovary synthetic`` and, ``sharded``, for the torchrun entry point
    (:mod:`~hardtovary.experiments.distributed_synthetic`), whose environments are split across ranks and whose
    BatchNorm statistics can only be per environment."""
    g = parser.add_argument_group("model and training (paper Table 1)")
    g.add_argument("--hidden", type=options.widths, default=t.hidden, help=options.HIDDEN_HELP)
    g.add_argument("--activation", choices=("leaky_relu", "relu", "tanh"), default=t.activation,
                   help="hidden-layer nonlinearity (LeakyReLU slope 0.01)")
    if sharded:
        g.add_argument("--batch-norm", action="store_true",
                       help="BatchNorm1d after each hidden Linear, statistics per environment (pooled statistics "
                            "across ranks are not offered)")
    else:
        g.add_argument("--batch-norm", action="store_true", help="BatchNorm1d after each hidden Linear")
        g.add_argument("--bn-semantics", choices=("pooled", "per_env"), default=t.bn_semantics,
                       help="BatchNorm statistics over all environments of a step, or per environment")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=t.optimizer,
                   help="Adam (betas 0.9, 0.999) or SGD with momentum")
    g.add_argument("--lr", type=float, default=t.lr, help="learning rate")
    g.add_argument("--momentum", type=float, default=t.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=options.nonnegative, default=t.weight_decay, help="L2 coefficient")
    g.add_argument("--weight-decay-order", choices=("before", "after"), default=t.weight_decay_order,
                   help="before: added to the masked gradient before the moments; after: decoupled")
    g.add_argument("--l1", type=options.nonnegative, default=t.l1, help="L1 coefficient (added after masking)")
    g.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=t.rescale,
                   help="inverse-sparsity rescaling per parameter tensor (not applied to mean)")
    g.add_argument("--batch-size", type=options.positive_int, default=t.batch_size,
                   help="examples per environment")
    g.add_argument("--n-agreement-envs", type=options.positive_int, default=None,
                   help="environments per step" + (", sharded across the ranks" if sharded else "")
                        + " (must divide --n-envs; default: all of them)")
    g.add_argument("--epochs", type=options.positive_int, default=t.epochs, help="passes over the training data")
    g.add_argument("--lr-milestones", type=options.int_list, default=None,
                   help="epochs where the learning rate drops x0.1 (default: one at 3/4 of the epochs)"
                        + options.MILESTONES_HELP)
    g.add_argument("--seed", type=int, default=t.seed, help="seed of initialisation and batching")


def configurations(args):
    """The methods, data configuration, base training configuration and rule overrides of the options, validated:
    every method's configuration is built."""
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in synthetic.METHOD_PRESETS]
    if unknown or not methods:
        raise UsageError(f"--methods must name some of {sorted(synthetic.METHOD_PRESETS)}, got {args.methods!r}")
    options.check_rule_options(methods, args.tau, args.flavour)
    if args.implementation == "accel":
        options.check_array_backend(args.backend)
        if args.batch_norm:
            raise UsageError("--batch-norm applies only with --implementation reference (the batched sweep trains "
                             "MLPs without BatchNorm)")
    elif args.backend is not None:
        raise UsageError("--backend applies only with --implementation accel (the reference runs on NumPy)")
    data_config = options.spirals_config(args)
    milestones = options.lr_milestones(args.lr_milestones, args.epochs)
    if milestones is None:
        milestones = tuple(m for m in (3 * args.epochs // 4,) if m >= 1)
    train_config = dataclasses.replace(
        synthetic.DEFAULT_TRAIN, hidden=args.hidden, activation=args.activation, batch_norm=args.batch_norm,
        bn_semantics=args.bn_semantics, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, weight_decay_order=args.weight_decay_order, l1=args.l1,
        rescale=args.rescale, batch_size=args.batch_size, n_agreement_envs=args.n_agreement_envs or args.n_envs,
        epochs=args.epochs, lr_milestones=milestones, seed=args.seed)
    overrides = options.given(tau=args.tau, flavour=args.flavour)
    for method in methods:
        synthetic.method_config(train_config, method, overrides)
    return methods, data_config, train_config, overrides


def run(args) -> int:
    from hardtovary.experiments import plots

    with usage_errors():
        methods, data_config, train_config, overrides = configurations(args)
    results = synthetic.run(args.out, data_config=data_config, train_config=train_config, methods=methods,
                            overrides=overrides, fresh=args.fresh, progress=not args.no_progress,
                            implementation=args.implementation, backend=args.backend)
    print(synthetic.format_table(results))
    print(f"\nresults: {args.out / 'results.json'}")
    figure = plots.plot_learning_curves({m: [r["history"]] for m, r in results["methods"].items()},
                                        args.out / "learning_curves.png")
    print(options.figures_line("learning curves", [figure]))
    return 0
