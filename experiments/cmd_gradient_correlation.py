"""``hardtovary gradient-correlation``: correlations of the masked gradient with the mechanism and shortcut
signals against the threshold, Fig. 7 (:mod:`hardtovary.experiments.gradient_correlation`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hardtovary.experiments import gradient_correlation as gc
from hardtovary.experiments import options
from hardtovary.experiments.errors import UsageError, usage_errors
from hardtovary.experiments.runfolder import write_atomic


def add_arguments(parser) -> None:
    d, c = gc.DEFAULT_DATA, gc.GradientCorrelationConfig()
    options.describe(parser, (
        "For randomly initialised MLPs (one per seed) on the spirals environments, correlate the masked "
        "average gradient of the original data with the average gradients of the mechanism-only and "
        "shortcut-only data (paper §3.1, Fig. 7, App. B.3.5): AND-mask for tau >= 0, XOR-mask (keep iff "
        "|a_j| <= 1 - |tau|) for tau < 0. Prints mean ± std over seeds per tau and writes OUT/results.json, "
        "OUT/table.txt and OUT/gradient_correlation.png; q(short) and floor: the part of the masked gradient the "
        "shortcut-only data lack, relative to theirs, and the least rho(shortcut) it allows. See "
        "hardtovary.experiments.gradient_correlation for the choices the paper leaves open."))
    parser.add_argument("--out", type=Path, default=Path("runs/gradient_correlation"), help="output folder")
    parser.add_argument("--seeds", type=options.positive_int, default=c.n_seeds, help="weight seeds (0 .. N-1)")
    parser.add_argument("--taus", type=options.float_list, default=c.taus,
                        help="thresholds in [-1, 1], comma-separated")
    parser.add_argument("--hidden", type=options.widths, default=c.hidden, help=options.HIDDEN_HELP)
    parser.add_argument("--remove-label-independent", action="store_true",
                        help="subtract the average gradient on label-independent inputs (all input columns "
                             "permuted) before correlating")
    parser.add_argument("--init", choices=gc.INITS, default=c.init,
                        help="weights: the authors' (Kaiming-normal, bias 0.01) or PyTorch's nn.Linear default "
                             "(logits near 0, a small label-independent gradient)")
    parser.add_argument("--train-steps", type=int, default=c.train_steps,
                        help=f"full-batch Adam steps (lr {gc.TRAIN_LR}) on all environments before measuring; 0: "
                             "at the initialisation, as App. B.3.5")
    parser.add_argument("--train-rule", choices=gc.TRAIN_RULES, default=None,
                        help=f"the update of those steps: the mean of the environments' gradients, or their "
                             f"AND-masked mean at tau 1; needs --train-steps > 0 (default: {c.train_rule})")
    g = parser.add_argument_group("data (spirals, paper App. B.2; one batch = one whole environment)")
    g.add_argument("--n-envs", type=options.positive_int, default=d.n_train_envs, help="environments")
    g.add_argument("--batch-size", type=options.positive_int, default=d.examples_per_env,
                   help="examples per environment")
    g.add_argument("--n-dims", type=int, default=d.n_dims, help="shortcut dimensions")
    g.add_argument("--shortcut-scale", type=options.nonnegative, default=d.shortcut_scale,
                   help="multiplies the shortcut signatures (the paper's variance 0.1 is 0.316)")
    g.add_argument("--data-seed", type=int, default=d.seed, help="environment e uses seed data_seed + e")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(interrupted="this command writes its results only at the end, and does not resume")


def run(args) -> int:
    if args.train_steps < 0:
        raise UsageError(f"--train-steps must be >= 0, got {args.train_steps}")
    if args.train_rule is not None and args.train_steps == 0:
        raise UsageError("--train-rule applies only with --train-steps > 0 (without training nothing uses it)")
    with usage_errors():
        data_config = dataclasses.replace(gc.DEFAULT_DATA, n_train_envs=args.n_envs,
                                          examples_per_env=args.batch_size, n_dims=args.n_dims,
                                          shortcut_scale=args.shortcut_scale, seed=args.data_seed)
        config = gc.GradientCorrelationConfig(hidden=args.hidden, n_seeds=args.seeds, taus=args.taus,
                                              data=data_config, remove_label_independent=args.remove_label_independent,
                                              init=args.init, train_steps=args.train_steps,
                                              **options.given(train_rule=args.train_rule))
    results = gc.run(config, out=args.out, progress=not args.no_progress)
    table = gc.format_table(results)
    print(table)
    print(gc.format_separability(results))
    write_atomic(args.out / "table.txt", lambda f: f.write(table + "\n"))
    print(f"\nresults: {args.out / 'results.json'}  table: {args.out / 'table.txt'}")
    print(options.figures_line("plot", [gc.plot_curves(results, args.out / "gradient_correlation.png")]))
    return 0
