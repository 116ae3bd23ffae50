"""The ``hardtovary`` command line (also ``python -m hardtovary``)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import sys
from pathlib import Path

from hardtovary import __version__
from hardtovary.experiments import runtime
from hardtovary.reference import optim


class UsageError(Exception):
    """Bad input on the command line: :func:`main` prints it as one line, ``hardtovary COMMAND: error: ...``, and
    returns exit status 2, without a traceback."""


def install_hint(extra: str) -> str:
    """How to install the optional part ``extra``, from PyPI or from a checkout of the repository."""
    return f"pip install 'hardtovary[{extra}]' (from a checkout: pip install '.[{extra}]')"


def _figures_line(label: str, paths) -> str:
    """``label: path, path`` for the figures written, or why none were (``paths`` holds None without matplotlib)."""
    written = [str(path) for path in paths if path]
    if written:
        return f"{label}: {', '.join(written)}"
    return f"{label}: skipped (matplotlib is not installed; {install_hint('plot')})"


def _shown(value) -> str:
    """A default as one types it: lists comma-separated (``256,256,256``), booleans in lists as yes/no."""
    if isinstance(value, (tuple, list)):
        return ",".join(("yes" if v else "no") if isinstance(v, bool) else str(v) for v in value)
    return str(value)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default as one types it; none for plain flags, and none for options whose default is None
    (their help says what happens when they are left out)."""

    def _get_help_string(self, action):
        text = action.help or ""
        plain_flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if ("%(default)" in text or plain_flag or not action.option_strings
                or action.default is None or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: {_shown(action.default).replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reads a word starting with a minus sign and a digit as a value, so that list options
    take negative entries (``--taus -1,0``); argparse before Python 3.13 reads only single numbers such as ``-1``
    that way and takes ``-1,0`` for an unknown option. No option of ours looks like a negative number."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _nonnegative(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None


def _widths(text: str) -> tuple[int, ...]:
    """Hidden-layer widths of one MLP: at least one positive integer (no option here means a model without hidden
    layers)."""
    values = _int_list(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be one or more positive widths, comma-separated, got {text!r}")
    return values


#: The help of every --hidden option (one MLP's widths).
_HIDDEN_HELP = "hidden widths, comma-separated; at least one (none is an error)"

#: The help of every --lr-milestones option, after what its default is.
_MILESTONES_HELP = "; each m in 1..EPOCHS-1 (the rate drops from epoch m + 1 on), others are an error"


def _lr_milestones(given, epochs: int):
    """``--lr-milestones`` checked against ``--epochs``: a milestone below 1 (dropped) or at or beyond the last
    epoch (never reached) is an error. None stays None: the command's default."""
    if given is None:
        return None
    bad = [m for m in given if not 1 <= m < epochs]
    if bad:
        raise UsageError(f"--lr-milestones must lie in 1..{epochs - 1} with --epochs {epochs} (a milestone m lowers "
                         f"the rate from epoch m + 1 on), got {','.join(map(str, bad))}")
    return tuple(given)


def _add_flavour_option(group, tau_source: str) -> None:
    """``--flavour``, the geometric mean's flavour (one help text for every command that trains it)."""
    from hardtovary.reference import rules

    group.add_argument("--flavour", choices=rules.FLAVOURS, default=None,
                       help="geometric_mean's flavour: 'paper' is 0 unless all K signs agree, so it takes tau 1 only "
                            "(paper §2.3 (i)); 'original' is the authors' code: kept where the AND-mask at "
                            f"{tau_source} keeps, sign of the arithmetic mean, 1e-10 inside the log (default: paper; "
                            "an error when --methods has no geometric_mean)")


def _check_flavour(methods, flavour) -> None:
    if flavour is not None and "geometric_mean" not in methods:
        raise UsageError("--flavour applies only to geometric_mean, which --methods does not include")


def _check_rule_options(methods, tau, flavour) -> None:
    """Refuse, before anything runs, a ``--tau`` / ``--flavour`` that a method in ``methods`` would not train with.
    What is valid is the oracle's decision (:func:`hardtovary.reference.rules.aggregate_arguments`); the wording
    is the command line's."""
    from hardtovary.reference import rules

    _check_flavour(methods, flavour)
    for method in methods:
        if method not in rules.RULES:  # erm, dann and irm aggregate no per-environment gradients
            continue
        try:
            rules.aggregate_arguments(
                method, **rules.rule_options(method, tau, flavour if method == "geometric_mean" else None))
        except ValueError as exc:
            hint = ("; pass --flavour original, or leave geometric_mean out of --methods"
                    if method == "geometric_mean" and flavour in (None, "paper") else "")
            raise UsageError(f"--tau {tau:g} with {method}: {exc}{hint}") from None


def _check_array_backend(name) -> None:
    """Check, before any work, that the array backend asked for (``--backend``, else ``HARDTOVARY_BACKEND``) can run
    here (:func:`hardtovary.accel.backend.get_backend`)."""
    from hardtovary.accel.backend import ENV_VAR, get_backend

    try:
        get_backend(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:
        source = "--backend" if name is not None else f"environment variable {ENV_VAR}"
        raise UsageError(f"{source}: {exc}") from None


def _add_run_folder_options(parser, default: str) -> None:
    """``--out`` (the run folder, default ``default``) and ``--fresh``."""
    parser.add_argument("--out", type=Path, default=Path(default), help="run folder")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")


def _add_spirals_options(parser, d) -> None:
    """The spirals data options (paper §6.1-6.2) with the defaults of the SpiralsConfig ``d``."""
    g = parser.add_argument_group("data (spirals, paper §6.1-6.2)")
    g.add_argument("--n-envs", type=_positive_int, default=d.n_train_envs, help="training environments")
    g.add_argument("--examples-per-env", type=_positive_int, default=d.examples_per_env,
                   help="training examples per environment")
    g.add_argument("--n-test", type=_positive_int, default=d.n_test, help="o.o.d. test examples")
    g.add_argument("--n-dims", type=int, default=d.n_dims, help="shortcut dimensions")
    g.add_argument("--n-revolutions", type=float, default=d.n_revolutions, help="spiral revolutions")
    g.add_argument("--shortcut-scale", type=_nonnegative, default=d.shortcut_scale,
                   help="multiplies the shortcut signatures (the paper's variance 0.1 is 0.316)")
    g.add_argument("--data-seed", type=int, default=d.seed, help="environment e uses seed data_seed + e")


def _spirals_config(args):
    """The SpiralsConfig of the options added by :func:`_add_spirals_options`."""
    from hardtovary.reference import data

    return data.SpiralsConfig(n_train_envs=args.n_envs, examples_per_env=args.examples_per_env, n_test=args.n_test,
                              n_revolutions=args.n_revolutions, n_dims=args.n_dims, seed=args.data_seed,
                              shortcut_scale=args.shortcut_scale)


def _add_array_backend_option(parser, condition: str = "") -> None:
    """``--backend``: the array backend of hardtovary.accel (one meaning in every command that has it)."""
    from hardtovary.accel.backend import ENV_VAR, NAMES

    parser.add_argument("--backend", choices=NAMES, default=None,
                        help=f"{condition}array backend of the batched training: numpy, cupy, or auto (CuPy when a GPU "
                             f"is usable) (default: environment variable {ENV_VAR}, else auto)")


def _add_synthetic(subparsers) -> None:
    from hardtovary.experiments import synthetic

    d, t = synthetic.DEFAULT_DATA, synthetic.DEFAULT_TRAIN
    p = subparsers.add_parser(
        "synthetic",
        help="synthetic memorization task: averaging vs AND-mask vs geometric mean",
        description=(
            "Train one MLP per method on the spirals memorization task (paper §3.1) with the NumPy reference "
            "implementation (or, with --implementation accel, all methods at once as one batched sweep), print "
            "final train and o.o.d. test accuracy with the tau and flavour each method trained with, and write "
            "OUT/results.json (per method train_acc, test_acc, losses and per-epoch history, plus the full "
            "configuration), OUT/units/<method>.json for each finished method and OUT/learning_curves.png. A run "
            "killed midway resumes from OUT when started again with the same options."),
        formatter_class=_HelpFormatter)
    _add_run_folder_options(p, "runs/synthetic")
    p.add_argument("--methods", default=",".join(synthetic.DEFAULT_METHODS),
                   help=f"comma-separated methods, from {', '.join(synthetic.METHOD_PRESETS)}; "
                        "'mean' is averaging (AND-mask with tau = 0)")
    presets = ", ".join(f"{m} {preset['tau']:g}" for m, preset in synthetic.METHOD_PRESETS.items() if m != "mean")
    p.add_argument("--tau", type=_fraction, default=None,
                   help=f"agreement threshold of every masking method (default: each method's preset: {presets}); "
                        "ignored by mean; geometric_mean takes tau != 1 only with --flavour original")
    _add_flavour_option(p, "--tau")
    _add_spirals_options(p, d)
    g = p.add_argument_group("model and training (paper Table 1)")
    g.add_argument("--hidden", type=_widths, default=t.hidden, help=_HIDDEN_HELP)
    g.add_argument("--activation", choices=("leaky_relu", "relu", "tanh"), default=t.activation,
                   help="hidden-layer nonlinearity (LeakyReLU slope 0.01)")
    g.add_argument("--batch-norm", action="store_true", help="BatchNorm1d after each hidden Linear")
    g.add_argument("--bn-semantics", choices=("pooled", "per_env"), default=t.bn_semantics,
                   help="BatchNorm statistics over all environments of a step, or per environment")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=t.optimizer,
                   help="Adam (betas 0.9, 0.999) or SGD with momentum")
    g.add_argument("--lr", type=float, default=t.lr, help="learning rate")
    g.add_argument("--momentum", type=float, default=t.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=_nonnegative, default=t.weight_decay, help="L2 coefficient")
    g.add_argument("--weight-decay-order", choices=("before", "after"), default=t.weight_decay_order,
                   help="before: added to the masked gradient before the moments; after: decoupled")
    g.add_argument("--l1", type=_nonnegative, default=t.l1, help="L1 coefficient (added after masking)")
    g.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=t.rescale,
                   help="inverse-sparsity rescaling per parameter tensor (not applied to mean)")
    g.add_argument("--batch-size", type=_positive_int, default=t.batch_size, help="examples per environment")
    g.add_argument("--n-agreement-envs", type=_positive_int, default=None,
                   help="environments per step (must divide --n-envs; default: all of them)")
    g.add_argument("--epochs", type=_positive_int, default=t.epochs, help="passes over the training data")
    g.add_argument("--lr-milestones", type=_int_list, default=None,
                   help="epochs where the learning rate drops x0.1 (default: one at 3/4 of the epochs)"
                        + _MILESTONES_HELP)
    g.add_argument("--seed", type=int, default=t.seed, help="seed of initialisation and batching")
    p.add_argument("--implementation", choices=synthetic.IMPLEMENTATIONS, default="reference",
                   help="reference: the NumPy oracle, one method after another; accel: all methods trained "
                        "together as one batched sweep on the array --backend (float64, same results to rounding; "
                        "no --batch-norm)")
    _add_array_backend_option(p, "with --implementation accel: ")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_synthetic, interrupted="finished methods are kept in {out}; the same command resumes")


def _run_synthetic(args) -> int:
    from hardtovary.experiments import plots, synthetic

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in synthetic.METHOD_PRESETS]
    if unknown or not methods:
        raise UsageError(f"--methods must name some of {sorted(synthetic.METHOD_PRESETS)}, got {args.methods!r}")
    _check_rule_options(methods, args.tau, args.flavour)
    if args.implementation == "accel":
        _check_array_backend(args.backend)
    elif args.backend is not None:
        raise UsageError("--backend applies only with --implementation accel (the reference runs on NumPy)")
    data_config = _spirals_config(args)
    milestones = _lr_milestones(args.lr_milestones, args.epochs)
    if milestones is None:
        milestones = tuple(m for m in (3 * args.epochs // 4,) if m >= 1)
    train_config = dataclasses.replace(
        synthetic.DEFAULT_TRAIN, hidden=args.hidden, activation=args.activation, batch_norm=args.batch_norm,
        bn_semantics=args.bn_semantics, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, weight_decay_order=args.weight_decay_order, l1=args.l1,
        rescale=args.rescale, batch_size=args.batch_size,
        n_agreement_envs=args.n_agreement_envs or args.n_envs, epochs=args.epochs,
        lr_milestones=milestones, seed=args.seed)
    overrides = {k: v for k, v in (("tau", args.tau), ("flavour", args.flavour)) if v is not None}
    results = synthetic.run(args.out, data_config=data_config, train_config=train_config, methods=methods,
                            overrides=overrides, fresh=args.fresh, progress=not args.no_progress,
                            implementation=args.implementation, backend=args.backend)
    print(synthetic.format_table(results))
    print(f"\nresults: {args.out / 'results.json'}")
    figure = plots.plot_learning_curves({m: [r["history"]] for m, r in results["methods"].items()},
                                        args.out / "learning_curves.png")
    print(_figures_line("learning curves", [figure]))
    return 0


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"must hold at least one number, got {text!r}")
    return values


def _name_list(choices):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(part.strip() for part in text.split(",") if part.strip())
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"must be comma-separated names from {', '.join(choices)}, got {text!r}")
        return values
    return parse


def _bool_list(text: str) -> tuple[bool, ...]:
    words = {"yes": True, "no": False, "true": True, "false": False, "1": True, "0": False}
    values = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not values or any(v not in words for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated yes/no, got {text!r}")
    return tuple(dict.fromkeys(words[v] for v in values))


def _add_sweep(subparsers) -> None:
    from hardtovary.experiments import sweep

    s, d = sweep.SearchSpace(), sweep.DEFAULT_DATA
    p = subparsers.add_parser(
        "sweep",
        help="random hyperparameter search on the synthetic task (paper Table 1), best configurations over seeds",
        description=(
            "Random search over the paper's Table 1 space (App. B.3; BatchNorm and dropout excluded) on the spirals "
            "memorization task: draw --budget configurations (method, tau, rescaling, width, depth, batch "
            "size, optimizer, learning rate, and one of L2 / L1 / none with its coefficient), train them as batched "
            "sweeps (many runs at once; CuPy on a GPU, else NumPy), rank them by final o.o.d. test accuracy, re-run "
            "the best --top with --seeds fresh seeds, and print a table of mean ± standard deviation (over seeds) "
            "of train and o.o.d. test accuracy. Search trials stop early when train acc > 0.97 while test acc < "
            "0.6 (paper §6.3) unless --no-early-abort. Writes OUT/config.json, OUT/units/search-NNN.json and "
            "OUT/units/seeds-NNN.json (one per batch of runs, atomically), OUT/results.json and OUT/table.txt; a "
            "rerun with the same options resumes, skipping finished batches. The defaults are small (a few minutes "
            "on two CPU cores); --paper-space uses Table 1's widths, depths and batch sizes. Options named in the "
            "plural are the values of the search space; the singular ones of the other commands set one value."),
        formatter_class=_HelpFormatter)
    _add_run_folder_options(p, "runs/sweep")
    p.add_argument("--budget", type=_positive_int, default=32, help="random-search trials")
    p.add_argument("--top", type=_positive_int, default=3, help="best configurations re-run over seeds (<= budget)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds per re-run configuration")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the search: draws the trials; trial i trains with seed SEED + i")
    p.add_argument("--epochs", type=_positive_int, default=40,
                   help="epochs per run; the learning rate drops x0.1 at 1/2 and 3/4 of them (paper App. B.3)")
    g = p.add_argument_group("search space (paper Table 1; comma-separated values, each drawn uniformly)")
    g.add_argument("--paper-space", action="store_true",
                   help=f"Table 1's architecture values: {_paper_architecture_options(sweep.PAPER_ARCHITECTURE)} "
                        "(overrides those three options; needs --examples-per-env >= 256)")
    g.add_argument("--methods", type=_name_list(sweep.METHODS), default=s.methods,
                   help=f"rules, from {', '.join(sweep.METHODS)} (mean ignores tau and rescaling; geometric_mean "
                        "uses tau 1, or draws from --taus with --flavour original)")
    _add_flavour_option(g, "the drawn tau")
    g.add_argument("--widths", type=_int_list, default=s.hidden_units, help="hidden-layer widths (all layers alike)")
    g.add_argument("--depths", type=_int_list, default=s.layers, help="numbers of hidden layers")
    g.add_argument("--batch-sizes", type=_int_list, default=s.batch_sizes, help="examples per environment per step")
    g.add_argument("--optimizers", type=_name_list(sweep.OPTIMIZERS), default=s.optimizers,
                   help="adam (betas 0.9, 0.999) and/or sgd (momentum 0.9)")
    g.add_argument("--lrs", type=_float_list, default=s.lrs, help="learning rates")
    g.add_argument("--weight-decays", type=_float_list, default=s.l2,
                   help="L2 (coupled weight decay) coefficients, used when the drawn regulariser is L2")
    g.add_argument("--l1s", type=_float_list, default=s.l1,
                   help="L1 coefficients, used when the drawn regulariser is L1 (L1 and L2 are never combined)")
    g.add_argument("--taus", type=_float_list, default=s.taus,
                   help="agreement thresholds in [0, 1] (the paper does not give this range)")
    g.add_argument("--rescales", type=_bool_list, default=s.rescale,
                   help="inverse-sparsity rescaling choices, e.g. 'no,yes' or 'yes'")
    _add_spirals_options(p, d)
    g = p.add_argument_group("execution")
    g.add_argument("--runs-per-batch", type=_positive_int, default=32,
                   help="runs trained at once (runs of one architecture); each finished batch is saved")
    g.add_argument("--early-abort", action=argparse.BooleanOptionalAction, default=True,
                   help="stop a search trial when train acc > 0.97 while test acc < 0.6 (paper §6.3)")
    g.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="precision of the batched training")
    _add_array_backend_option(g)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_sweep, interrupted="finished batches of runs are kept in {out}; the same command resumes")


def _paper_architecture_options(arch: dict) -> str:
    """Table 1's architecture values as the search commands' options, e.g. ``--widths 256,512 ...``."""
    return (f"--widths {_shown(arch['hidden_units'])} --depths {_shown(arch['layers'])} "
            f"--batch-sizes {_shown(arch['batch_sizes'])}")


def _run_sweep(args) -> int:
    from hardtovary.experiments import sweep

    _check_flavour(args.methods, args.flavour)
    _check_array_backend(args.backend)
    arch = (sweep.PAPER_ARCHITECTURE if args.paper_space else
            {"hidden_units": args.widths, "layers": args.depths, "batch_sizes": args.batch_sizes})
    space = sweep.SearchSpace(methods=args.methods, optimizers=args.optimizers, lrs=args.lrs, l2=args.weight_decays,
                              l1=args.l1s, taus=args.taus, rescale=args.rescales, flavour=args.flavour or "paper",
                              **arch)
    results = sweep.run(args.out, space=space, data_config=_spirals_config(args), budget=args.budget, seeds=args.seeds,
                        top=args.top, epochs=args.epochs, seed=args.seed, runs_per_batch=args.runs_per_batch,
                        early_abort=args.early_abort, dtype=args.dtype, backend=args.backend, fresh=args.fresh,
                        progress=not args.no_progress)
    print(sweep.format_table(results))
    print(f"\nresults: {args.out / 'results.json'}  table: {args.out / 'table.txt'}")
    return 0


#: eps of the inconsistency score when --eps is not given; the paper's examples always use it (their table is in
#: units of eps, which does not depend on it).
_ILC_EPS = 1.0

#: The ilc options that apply only with some of --hessians, --patchwork, --spirals-mlp and --compare, and with which;
#: giving one without them is an error (it would change nothing).
_ILC_SCOPE = {
    "eps": ("--hessians", "--patchwork", "--spirals-mlp"),
    "compare": ("--hessians", "--patchwork"),
    "weight_decay": ("--patchwork", "--spirals-mlp"),
    "n_envs": ("--spirals-mlp",), "examples_per_env": ("--spirals-mlp",), "hidden": ("--spirals-mlp",),
    "epochs": ("--spirals-mlp",),
    "seed": ("--compare", "--spirals-mlp"),
    "n_init": ("--compare",), "eta": ("--compare",), "steps": ("--compare",), "init_scale": ("--compare",),
}


def _default_of(function, name: str):
    """The default of ``function``'s parameter ``name``: the value an option left out takes, when the command
    passes on only the options given."""
    import inspect

    return inspect.signature(function).parameters[name].default


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_ilc(subparsers) -> None:
    from hardtovary.experiments import ilc

    compare, mlp = ilc.compare_rules, ilc.spirals_mlp_inconsistency
    p = subparsers.add_parser(
        "ilc",
        help="exact inconsistency scores and ILC of quadratic problems (paper §2, App. A.2)",
        description=(
            "Without a problem: the paper's worked examples (Fig. 3, Fig. 12, Remark 2, the Prop. 3 "
            "counterexample) with the exact I^eps in units of eps, the determinant ratio and the Prop. 3 bound as "
            "printed (2 eps, false in general) and corrected (4 eps). With --hessians FILE.npz (H of shape "
            "[K, P, P] or [K, P] for diagonal Hessians; optional mu [K, P] and c [K]) or --patchwork: the exact "
            "I^eps of that problem at theta*, its common minimizer when all mu_e are equal, else its pooled "
            "minimizer (where averaging converges; the output names the point and --json gives it as theta_star); "
            "with --compare also the ILC of averaging, the AND-mask (tau = 1) and the geometric mean by Monte "
            "Carlo over initial points, where 'converged' counts the gradient-descent runs whose step fell to "
            f"{ilc.CONVERGENCE_TOL:g} within --steps (the others are scored where they stopped). An option that "
            "does not apply to the problem chosen is an error."),
        formatter_class=_HelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--hessians", type=Path, default=None, help="problem file (.npz with H, optional mu, c)")
    source.add_argument("--patchwork", action="store_true",
                        help="the notebook's patchwork regression with an L2 term (--weight-decay) in each "
                             "environment")
    source.add_argument("--spirals-mlp", action="store_true",
                        help="train a small MLP on spirals with each rule and score its end point with the "
                             "per-environment Hessians (finite differences; local quadratic model)")
    p.add_argument("--eps", type=_positive_float, default=None,
                   help=f"band width eps of the inconsistency score, > 0 (default: {_ILC_EPS:g}; needs a problem)")
    p.add_argument("--weight-decay", type=_nonnegative, default=None,
                   help=f"L2 coefficient in each environment's loss (default: "
                        f"{_default_of(ilc.patchwork_problem, 'l2'):g} for --patchwork, "
                        f"{_default_of(mlp, 'l2'):g} for --spirals-mlp)")
    g = p.add_argument_group("--spirals-mlp")
    g.add_argument("--n-envs", type=_positive_int, default=None,
                   help=f"training environments (default: {_default_of(mlp, 'n_envs')})")
    g.add_argument("--examples-per-env", type=_positive_int, default=None,
                   help=f"examples per environment (default: {_default_of(mlp, 'examples_per_env')})")
    g.add_argument("--hidden", type=_widths, default=None,
                   help=f"{_HIDDEN_HELP} (default: {_shown(_default_of(mlp, 'hidden'))})")
    g.add_argument("--epochs", type=_positive_int, default=None,
                   help=f"full-batch epochs (default: {_default_of(mlp, 'epochs')})")
    g = p.add_argument_group("--compare (with --hessians or --patchwork)")
    g.add_argument("--compare", action="store_true", help="ILC of mean, AND-mask and geometric mean")
    g.add_argument("--n-init", type=_positive_int, default=None,
                   help=f"initial points (default: {_default_of(compare, 'n_init')})")
    g.add_argument("--eta", type=_positive_float, default=None,
                   help=f"gradient-descent step size (default: {_default_of(compare, 'eta'):g})")
    g.add_argument("--steps", type=_positive_int, default=None,
                   help=f"gradient-descent steps per run, at most (default: {_default_of(compare, 'n_steps')})")
    g.add_argument("--init-scale", type=_nonnegative, default=None,
                   help=f"std of the initial points (default: {_default_of(compare, 'init_scale'):g})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the initial points of --compare, or of the data and initialisation of --spirals-mlp "
                        f"(default: {_default_of(compare, 'seed')})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--spirals-mlp, --compare)")
    p.set_defaults(run=_run_ilc)


def _check_ilc_scope(args) -> None:
    """Refuse an ilc option that does not apply to the problem chosen (:data:`_ILC_SCOPE`)."""
    chosen = {"--hessians": args.hessians is not None, "--patchwork": args.patchwork,
              "--spirals-mlp": args.spirals_mlp, "--compare": args.compare}
    for dest, scope in _ILC_SCOPE.items():
        value = getattr(args, dest)
        if value not in (None, False) and not any(chosen[flag] for flag in scope):
            why = ("; the paper's examples are reported in units of eps (I/eps), which does not depend on it"
                   if dest == "eps" else "")
            raise UsageError(f"--{dest.replace('_', '-')} applies only with {' or '.join(scope)}{why}")


def _run_ilc(args) -> int:
    import json

    from hardtovary.experiments import ilc
    from hardtovary.reference import quadratic

    _check_ilc_scope(args)
    eps = _ILC_EPS if args.eps is None else args.eps
    progress = not args.no_progress
    if args.spirals_mlp:
        given = {"n_envs": args.n_envs, "examples_per_env": args.examples_per_env, "hidden": args.hidden,
                 "epochs": args.epochs, "l2": args.weight_decay, "seed": args.seed}
        report = ilc.spirals_mlp_inconsistency(eps, progress=progress,
                                               **{k: v for k, v in given.items() if v is not None})
        print(json.dumps(report, indent=2) if args.json else ilc.format_mlp_report(report))
        return 0
    if args.hessians is None and not args.patchwork:
        reports = {}
        for example in ilc.PAPER_EXAMPLES:
            reports[example.name] = {"description": example.description,
                                     **ilc.score_report(quadratic.QuadraticProblem(example.hessians), _ILC_EPS)}
        if args.json:
            print(json.dumps({"examples": reports}, indent=2))
        else:
            print(ilc.format_examples(reports))
        return 0
    if args.hessians is not None:
        try:
            problem = ilc.load_problem(args.hessians)
        except OSError as exc:
            raise UsageError(f"--hessians {args.hessians}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(f"--hessians: {exc}") from None
    else:
        problem = ilc.patchwork_problem(**({} if args.weight_decay is None else {"l2": args.weight_decay}))
    report = ilc.score_report(problem, eps)
    if args.compare:
        given = {"n_init": args.n_init, "eta": args.eta, "n_steps": args.steps, "init_scale": args.init_scale,
                 "seed": args.seed}
        report["compare"] = ilc.compare_rules(problem, eps, progress=progress,
                                              **{k: v for k, v in given.items() if v is not None})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(ilc.format_report(report))
    return 0


def _add_conformance(subparsers) -> None:
    from hardtovary.conformance import cli as conformance_cli

    p = subparsers.add_parser(
        "conformance",
        help="check an implementation of the rules, gradients and optimizer steps against the oracle",
        description=(
            "Run the conformance suite against a target named as module:attribute (imported with the current "
            "directory first on the path) or path/to/file.py:attribute (see README, 'Verify your implementation'). "
            "Built-in targets: hardtovary.conformance.targets:reference (the oracle), "
            "hardtovary.conformance.torch_target:target (hardtovary.accel.torch), "
            "hardtovary.conformance.accel_target:target (hardtovary.accel.rules) and the planted mutants "
            "hardtovary.conformance.mutants:<name>. Exit status 0 exactly when no check fails unexpectedly and at "
            "least one check compared values; 1 otherwise; 2 for usage errors."))
    conformance_cli.add_arguments(p)
    p.set_defaults(run=conformance_cli.run_from_args, interrupted="no verdict was reached")


def _add_cifar10(subparsers) -> None:
    from hardtovary.experiments import cifar10

    p = subparsers.add_parser(
        "cifar10",
        help="CIFAR-10 memorization (Figs. 8, 16) and label noise (Fig. 9) with the per-example AND-mask",
        description=(
            "Train FastResNet on CIFAR-10 with every example its own environment (pooled BatchNorm, paper §3.2). "
            "memorization: the tau grid on original and random labels; label-noise: 25% of the labels re-drawn, "
            "Adam (tau 0, lr 1e-3) vs AND-mask (tau 0.2, lr 5e-3). Prints a table and writes OUT/results.json, "
            "OUT/units/<trial>.json, OUT/trials/<trial>/{checkpoint.pt,history.json} (every epoch, atomically) "
            "and the figures; a killed run resumes at the last finished epoch when started again with the same "
            "options. Needs the 'CIFAR-10 python version' batches (cifar-10-batches-py/) in --data."),
        formatter_class=_HelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with data_batch_1..5, test_batch, batches.meta")
    p.add_argument("--experiment", choices=cifar10.EXPERIMENTS, default="memorization", help="which figure")
    p.add_argument("--taus", type=_float_list, default=None,
                   help="comma-separated taus (default: 0,0.05,0.1,0.2,0.4,0.6,0.8 for memorization, 0,0.2 for "
                        "label-noise); 0 is plain Adam")
    p.add_argument("--epochs", type=_positive_int, default=80, help="passes over the training data")
    p.add_argument("--n-train", type=_positive_int, default=None, help="use the first N training images")
    p.add_argument("--n-test", type=_positive_int, default=None, help="use the first N test images")
    p.add_argument("--width", type=float, default=1.0, help="FastResNet channel multiplier")
    p.add_argument("--batch-size", type=_positive_int, default=80, help="examples (= environments) per step")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of every trial (default: 5e-4 memorization; label-noise 1e-3 for tau 0, "
                        "5e-3 otherwise)")
    p.add_argument("--lr-milestones", type=_int_list, default=None,
                   help="epochs where the LR drops x0.1 (default: one at 3/4 of the epochs, the authors' code; "
                        "the paper's text says 40,60 for memorization)" + _MILESTONES_HELP)
    p.add_argument("--weight-decay", type=_nonnegative, default=1e-6, help="L2 added before Adam's moments")
    p.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=True,
                   help="inverse-sparsity rescaling of the masked gradient (tau > 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of labels, initialisation and batch order")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/cifar10-EXPERIMENT)")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args) -> int:
        if args.taus is not None and any(not 0.0 <= t <= 1.0 for t in args.taus):
            raise UsageError(f"--taus must lie in [0, 1], got {_shown(args.taus)}")
        milestones = _lr_milestones(args.lr_milestones, args.epochs)
        out = args.out = args.out or Path(f"runs/cifar10-{args.experiment}")  # the interrupt note names it too
        try:
            results = cifar10.run(out, args.data, experiment=args.experiment, taus=args.taus, epochs=args.epochs,
                                  n_train=args.n_train, n_test=args.n_test, width=args.width,
                                  batch_size=args.batch_size, lr=args.lr, lr_milestones=milestones,
                                  weight_decay=args.weight_decay, rescale=args.rescale, seed=args.seed,
                                  device=args.device, fresh=args.fresh, progress=not args.no_progress)
        except FileNotFoundError as exc:
            print(f"hardtovary cifar10: error: {exc}", file=sys.stderr)
            return 2
        print(cifar10.format_table(results))
        print(f"\nresults: {out / 'results.json'}")
        print(_figures_line("figures", cifar10.plot_results(results, out)))
        return 0

    p.set_defaults(run=run, interrupted="finished epochs of each trial are kept in {out}; the same command resumes "
                                        "at the last one")


def _add_baselines(subparsers) -> None:
    from hardtovary.experiments import baselines

    d, c = baselines.DEFAULT_DATA, baselines.DEFAULT_CONFIG
    p = subparsers.add_parser(
        "baselines",
        help="synthetic task baselines: ERM (dropout/L1/L2/BatchNorm), DANN, IRM, AND-mask (torch)",
        description=(
            "Train each method in torch on the spirals memorization task (paper §3.1, App. B.3) with the "
            "reference batching (one batch per environment per step), print final train and o.o.d. test "
            "accuracy (mean ± std over --seeds), and write OUT/config.json, OUT/units/<method>-seed<s>.json (one "
            "per finished run, atomically), OUT/results.json, OUT/table.txt, OUT/accuracy_bars.png (Fig. 6 style) and "
            "OUT/learning_curves.png (Fig. 14 style). A rerun with the same options resumes. "
            "Per-method presets: erm and dann L2 1e-4; irm penalty 100 after 8 annealing steps; and_mask / "
            "geometric_mean tau 1 with rescaling and L2 1e-4; options given explicitly override them."),
        formatter_class=_HelpFormatter)
    _add_run_folder_options(p, "runs/baselines")
    p.add_argument("--methods", type=_name_list(baselines.METHODS), default=baselines.DEFAULT_METHODS,
                   help=f"comma-separated, from {', '.join(baselines.METHODS)}")
    p.add_argument("--epochs", type=_positive_int, default=c.epochs, help="passes over the training data")
    _add_spirals_options(p, d)
    g = p.add_argument_group("model and training (defaults: each method's preset)")
    g.add_argument("--hidden", type=_widths, default=c.hidden, help=_HIDDEN_HELP)
    g.add_argument("--batch-size", type=_positive_int, default=c.batch_size, help="examples per environment")
    g.add_argument("--n-agreement-envs", type=_positive_int, default=None,
                   help="environments per step (must divide --n-envs; default: all of them)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=c.optimizer, help="Adam or SGD + momentum 0.9")
    g.add_argument("--lr", type=float, default=c.lr, help="learning rate (x0.1 at 1/2 and 3/4 of the epochs)")
    g.add_argument("--seed", type=int, default=c.seed, help="seed of initialisation and batching")
    g.add_argument("--seeds", type=_positive_int, default=1,
                   help="runs per method, with seeds --seed .. --seed + N - 1 (the data stay fixed); the table "
                        "gives mean ± std over them")
    g.add_argument("--dropout", type=float, default=None,
                   help="dropout after each hidden activation (erm, irm; and_mask and geometric_mean ignore it)")
    g.add_argument("--batch-norm", action="store_true", help="BatchNorm1d after each hidden Linear (not dann)")
    g.add_argument("--l1", type=_nonnegative, default=None, help="L1 coefficient")
    g.add_argument("--weight-decay", type=_nonnegative, default=None,
                   help="L2 coefficient (coupled weight decay, added before the optimizer's moments)")
    g.add_argument("--tau", type=_fraction, default=None,
                   help="and_mask / geometric_mean threshold; geometric_mean takes tau != 1 only with --flavour "
                        "original")
    _add_flavour_option(g, "--tau")
    g.add_argument("--dann-lambda", type=_nonnegative, default=None, help="gradient-reversal coefficient")
    g.add_argument("--penalty-weight", type=_nonnegative, default=None, help="IRMv1 penalty weight")
    g.add_argument("--anneal-iters", type=int, default=None, help="IRM steps with penalty weight 1")
    g.add_argument("--early-abort", action="store_true",
                   help="stop a run when train acc > 0.97 while test acc < 0.6 (paper App. B.3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_baselines, interrupted="finished runs are kept in {out}; the same command resumes")


def _run_baselines(args) -> int:
    from hardtovary.experiments import baselines, plots

    _check_rule_options(args.methods, args.tau, args.flavour)
    data_config = _spirals_config(args)
    milestones = optim.paper_milestones(args.epochs)
    base = dataclasses.replace(baselines.DEFAULT_CONFIG, hidden=args.hidden, batch_size=args.batch_size,
                               n_agreement_envs=args.n_agreement_envs, optimizer=args.optimizer, lr=args.lr,
                               seed=args.seed, epochs=args.epochs, lr_milestones=milestones,
                               batch_norm=args.batch_norm, early_abort=args.early_abort)
    named = {"dropout": args.dropout, "l1": args.l1, "weight_decay": args.weight_decay, "tau": args.tau,
             "flavour": args.flavour,
             "dann_lambda": args.dann_lambda, "irm_penalty_weight": args.penalty_weight,
             "irm_anneal_iters": args.anneal_iters}
    overrides = {k: v for k, v in named.items() if v is not None}
    results = baselines.run(args.out, data_config=data_config, base=base, methods=args.methods,
                            overrides=overrides, seeds=args.seeds, fresh=args.fresh, progress=not args.no_progress)
    print(baselines.format_table(results))
    print(f"\nresults: {args.out / 'results.json'}")
    bars = baselines.plot_bars(results, args.out / "accuracy_bars.png")
    curves = plots.plot_learning_curves({m: [run["history"] for run in r["runs"]]
                                         for m, r in results["methods"].items()}, args.out / "learning_curves.png")
    print(_figures_line("plots", [bars, curves]))
    return 0


def _add_baselines_search(subparsers) -> None:
    from hardtovary.experiments import baselines, baselines_search as bs

    d, a = baselines.DEFAULT_DATA, bs.SMALL_ARCH

    def run_it(args) -> int:
        _check_flavour(args.methods, args.flavour)
        arch = bs.PAPER_ARCH if args.paper_space else bs.Architecture(
            hidden_units=args.widths, layers=args.depths, batch_sizes=args.batch_sizes)
        results = bs.run(args.out, methods=args.methods, budget=args.budget, seeds=args.seeds, epochs=args.epochs,
                         seed=args.seed, arch=arch, data_config=_spirals_config(args),
                         n_agreement_envs=args.n_agreement_envs, flavour=args.flavour or "paper", fresh=args.fresh,
                         progress=not args.no_progress)
        print(bs.format_table(results))
        print(f"\nresults: {args.out / 'results.json'}  table: {args.out / 'table.txt'}")
        return 0

    p = subparsers.add_parser(
        "baselines-search",
        help="random search per baseline (ERM, DANN, IRM, AND-mask; paper Tables 1-2), best re-run over seeds",
        description=(
            "For each method, a random search of --budget trials over the paper's space (App. B.3): Table 1 for "
            "erm (with batch norm and dropout), dann (width only; fixed 2-layer nets) and and_mask (plus tau in "
            "{0.5, 0.75, 1} and rescaling on/off; the tau range is an assumption, the paper gives none); Table 2 "
            "for irm (penalty weight, annealing iterations, learning rate up to 1). L1 and L2 are never combined. "
            "Trials stop early when train acc > 0.97 while test acc < 0.6 (paper §6.3); they are ranked by final "
            "o.o.d. test accuracy, and the best of each method is re-run with --seeds fresh seeds (no early "
            "abort). Prints per method the best configuration and mean ± std over seeds of train and o.o.d. test "
            "accuracy. Writes OUT/config.json, OUT/units/search-<method>-NNN.json and "
            "OUT/units/seeds-<method>-NNN.json (atomically, one per run), OUT/results.json and OUT/table.txt; a "
            "rerun with the same options resumes, skipping finished runs."),
        formatter_class=_HelpFormatter)
    _add_run_folder_options(p, "runs/baselines_search")
    p.add_argument("--methods", type=_name_list(baselines.METHODS), default=baselines.DEFAULT_METHODS,
                   help=f"comma-separated, from {', '.join(baselines.METHODS)} (geometric_mean: and_mask's space, "
                        "tau 1, or and_mask's taus with --flavour original)")
    _add_flavour_option(p, "the drawn tau")
    p.add_argument("--budget", type=_positive_int, default=4, help="random-search trials per method")
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds of the best configuration's re-run")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the search: draws the trials; trial i trains with seed SEED + i")
    p.add_argument("--epochs", type=_positive_int, default=40,
                   help="epochs per run; the learning rate drops x0.1 at 1/2 and 3/4 of them (paper App. B.3)")
    g = p.add_argument_group("architecture values of the search (comma-separated, each drawn uniformly)")
    g.add_argument("--paper-space", action="store_true",
                   help=f"Table 1's values: {_paper_architecture_options(dataclasses.asdict(bs.PAPER_ARCH))} "
                        "(overrides those three options)")
    g.add_argument("--widths", type=_int_list, default=a.hidden_units, help="hidden-layer widths (all layers alike)")
    g.add_argument("--depths", type=_int_list, default=a.layers, help="numbers of hidden layers (not dann)")
    g.add_argument("--batch-sizes", type=_int_list, default=a.batch_sizes, help="examples per environment per step")
    g.add_argument("--n-agreement-envs", type=_positive_int, default=None,
                   help="environments per step (must divide --n-envs; default: all of them)")
    _add_spirals_options(p, d)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_it, interrupted="finished runs are kept in {out}; the same command resumes")


def _add_gradient_correlation(subparsers) -> None:
    from hardtovary.experiments import gradient_correlation as gc

    d, c = gc.DEFAULT_DATA, gc.GradientCorrelationConfig()
    p = subparsers.add_parser(
        "gradient-correlation",
        help="gradient correlations with the mechanism and shortcut signals against the threshold (Fig. 7)",
        description=(
            "For randomly initialised MLPs (one per seed) on the spirals environments, correlate the masked "
            "average gradient of the original data with the average gradients of the mechanism-only and "
            "shortcut-only data (paper §3.1, Fig. 7, App. B.3.5): AND-mask for tau >= 0, XOR-mask (keep iff "
            "|a_j| <= 1 - |tau|) for tau < 0. Prints mean ± std over seeds per tau and writes OUT/results.json, "
            "OUT/table.txt and OUT/gradient_correlation.png. See hardtovary.experiments.gradient_correlation for "
            "the choices the paper leaves open."),
        formatter_class=_HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/gradient_correlation"), help="output folder")
    p.add_argument("--seeds", type=_positive_int, default=c.n_seeds, help="weight seeds (0 .. N-1)")
    p.add_argument("--taus", type=_float_list, default=c.taus, help="thresholds in [-1, 1], comma-separated")
    p.add_argument("--hidden", type=_widths, default=c.hidden, help=_HIDDEN_HELP)
    p.add_argument("--remove-label-independent", action="store_true",
                   help="subtract the average gradient on label-independent inputs (all input columns permuted) "
                        "before correlating")
    g = p.add_argument_group("data (spirals, paper §6.1-6.2; one batch = one whole environment)")
    g.add_argument("--n-envs", type=_positive_int, default=d.n_train_envs, help="environments")
    g.add_argument("--batch-size", type=_positive_int, default=d.examples_per_env, help="examples per environment")
    g.add_argument("--n-dims", type=int, default=d.n_dims, help="shortcut dimensions")
    g.add_argument("--shortcut-scale", type=_nonnegative, default=d.shortcut_scale,
                   help="multiplies the shortcut signatures (the paper's variance 0.1 is 0.316)")
    g.add_argument("--data-seed", type=int, default=d.seed, help="environment e uses seed data_seed + e")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_gradient_correlation,
                   interrupted="this command writes its results only at the end, and does not resume")


def _run_gradient_correlation(args) -> int:
    from hardtovary.experiments import gradient_correlation as gc
    from hardtovary.experiments.runfolder import write_atomic

    data_config = dataclasses.replace(gc.DEFAULT_DATA, n_train_envs=args.n_envs, examples_per_env=args.batch_size,
                                      n_dims=args.n_dims, shortcut_scale=args.shortcut_scale, seed=args.data_seed)
    config = gc.GradientCorrelationConfig(hidden=args.hidden, n_seeds=args.seeds, taus=args.taus, data=data_config,
                                          remove_label_independent=args.remove_label_independent)
    results = gc.run(config, out=args.out, progress=not args.no_progress)
    table = gc.format_table(results)
    print(table)
    write_atomic(args.out / "table.txt", lambda f: f.write(table + "\n"))
    print(f"\nresults: {args.out / 'results.json'}  table: {args.out / 'table.txt'}")
    print(_figures_line("plot", [gc.plot_curves(results, args.out / "gradient_correlation.png")]))
    return 0


def _add_env_count(subparsers) -> None:
    from hardtovary.experiments import baselines, env_count as ec

    d, c = ec.DEFAULT_DATA, ec.DEFAULT_CONFIG

    def positive_ints(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
        return values

    p = subparsers.add_parser(
        "env-count",
        help="max o.o.d. test accuracy against the number of training environments (Fig. 15, App. B.4)",
        description=(
            "For each number of training environments in --envs and each method, train --runs runs (seeds SEED, "
            "SEED+1, ...) on the spirals task with the torch baselines, record each run's maximum o.o.d. test "
            "accuracy over epochs and report the best over runs (the paper's statistic, best of 5) and the mean. "
            "Prints a table (rows: environments; columns: methods, best / mean) and writes OUT/config.json, "
            "OUT/units/envs<N>-<method>-run<R>.json (one per run, atomically), OUT/results.json, OUT/table.txt and "
            "OUT/env_count.png (log2 x axis, Fig. 15 style). A rerun with the same options resumes, skipping "
            "finished runs. Environments per step: the largest divisor of N not above --max-agreement-envs "
            "(min(N, 16) for powers of two). The defaults are CPU-sized (about 4 minutes on two cores: 2 x 128 "
            "MLP, 40 epochs, 256 examples per environment, N up to 64, 3 runs); the paper uses N = 2 .. 4096, "
            "5 runs and finds the baseline first succeeds at 1024 environments."),
        formatter_class=_HelpFormatter)
    _add_run_folder_options(p, "runs/env_count")
    p.add_argument("--envs", type=positive_ints, default=ec.DEFAULT_ENVS,
                   help="comma-separated numbers of training environments (each >= 1; paper: 2,4,...,4096)")
    p.add_argument("--methods", type=_name_list(baselines.METHODS), default=ec.DEFAULT_METHODS,
                   help=f"comma-separated, from {', '.join(baselines.METHODS)} (paper: baseline and AND-mask)")
    p.add_argument("--runs", type=_positive_int, default=ec.DEFAULT_RUNS, help="runs (seeds) per cell; paper: 5")
    p.add_argument("--examples-per-env", type=_positive_int, default=d.examples_per_env,
                   help="training examples per environment (ignored when --total-examples is given)")
    p.add_argument("--total-examples", type=_positive_int, default=None,
                   help="bound the total data: examples per environment = TOTAL // N (must leave >= 2)")
    p.add_argument("--max-agreement-envs", type=_positive_int, default=ec.MAX_AGREEMENT_ENVS,
                   help="at most this many environments per step (the largest divisor of N not above it)")
    g = p.add_argument_group("data and training (per-method presets as in 'hardtovary baselines')")
    g.add_argument("--n-test", type=_positive_int, default=d.n_test, help="o.o.d. test examples")
    g.add_argument("--n-dims", type=int, default=d.n_dims, help="shortcut dimensions")
    g.add_argument("--shortcut-scale", type=_nonnegative, default=d.shortcut_scale,
                   help="multiplies the shortcut signatures (the paper's variance 0.1 is 0.316)")
    g.add_argument("--data-seed", type=int, default=d.seed, help="environment e uses seed data_seed + e")
    g.add_argument("--hidden", type=_widths, default=c.hidden, help=_HIDDEN_HELP)
    g.add_argument("--batch-size", type=_positive_int, default=c.batch_size,
                   help="examples per environment per step (capped at the examples per environment)")
    g.add_argument("--epochs", type=_positive_int, default=c.epochs,
                   help="passes over the training data (LR x0.1 at 1/2 and 3/4 of them)")
    g.add_argument("--lr", type=float, default=c.lr, help="learning rate (Adam)")
    g.add_argument("--tau", type=_fraction, default=None,
                   help="and_mask / geometric_mean threshold (default: the preset, 1); geometric_mean takes tau != 1 "
                        "only with --flavour original")
    _add_flavour_option(g, "--tau")
    g.add_argument("--seed", type=int, default=c.seed, help="run r uses seed SEED + r (initialisation, batching)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args) -> int:
        _check_rule_options(args.methods, args.tau, args.flavour)
        data_config = dataclasses.replace(d, examples_per_env=args.examples_per_env, n_test=args.n_test,
                                          n_dims=args.n_dims, shortcut_scale=args.shortcut_scale,
                                          seed=args.data_seed)
        milestones = optim.paper_milestones(args.epochs)
        base = dataclasses.replace(c, hidden=args.hidden, batch_size=args.batch_size, epochs=args.epochs,
                                   lr=args.lr, lr_milestones=milestones, seed=args.seed)
        overrides = {k: v for k, v in (("tau", args.tau), ("flavour", args.flavour)) if v is not None}
        results = ec.run(args.out, envs=args.envs, methods=args.methods, runs=args.runs, data_config=data_config,
                         base=base, total_examples=args.total_examples,
                         max_agreement_envs=args.max_agreement_envs, overrides=overrides, fresh=args.fresh,
                         progress=not args.no_progress)
        print(ec.format_table(results))
        print(f"\nresults: {args.out / 'results.json'}  table: {args.out / 'table.txt'}")
        print(_figures_line("plot", [ec.plot(results, args.out / "env_count.png")]))
        return 0

    p.set_defaults(run=run, interrupted="finished runs are kept in {out}; the same command resumes")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hardtovary",
        description="The AND-mask, the geometric mean of gradients and ILC "
                    "(Parascandolo et al., 'Learning Explanations That Are Hard To Vary', ICLR 2021).")
    parser.add_argument("--version", action="version", version=f"hardtovary {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_synthetic(subparsers)
    _add_sweep(subparsers)
    _add_ilc(subparsers)
    _add_conformance(subparsers)
    torch_commands = {"baselines": _add_baselines, "baselines-search": _add_baselines_search,
                      "gradient-correlation": _add_gradient_correlation, "cifar10": _add_cifar10,
                      "env-count": _add_env_count}
    for name, add in torch_commands.items():
        if torch_available():
            add(subparsers)
        else:
            _add_needs_torch(subparsers, name)
    for command in subparsers.choices.values():
        if "-" in command.prefix_chars:  # not the stand-ins for torch commands, which take every word as it is
            runtime.add_threads_option(command)
    return parser


def torch_available() -> bool:
    """Whether PyTorch can be imported (the commands built on hardtovary.accel.torch need it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def _add_needs_torch(subparsers, name: str) -> None:
    """A stand-in for a command built on PyTorch when torch is not installed: it says how to install it."""
    # no option prefix: every argument (--help included) lands in `rest`, and the command explains itself
    p = subparsers.add_parser(name, help=f"(needs PyTorch: {install_hint('torch')})", add_help=False,
                              prefix_chars="\x00")
    p.add_argument("rest", nargs="*", help="ignored")

    def refuse(args) -> int:
        print(f"hardtovary {name}: this command needs PyTorch (torch >= 2.1), which is not installed; "
              f"{install_hint('torch')}", file=sys.stderr)
        return 2

    p.set_defaults(run=refuse)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with runtime.limited_threads(runtime.resolve_threads(getattr(args, "threads", None))):
            status = args.run(args)
        sys.stdout.flush()  # a reader that stopped early (`| head`) shows here, as BrokenPipeError
        return status
    except (UsageError, ValueError, TypeError) as exc:
        print(f"hardtovary {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader has what it wanted; nothing to say. Point stdout at devnull so that the interpreter's last
        # flush does not fail again (Python docs, signal module, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2
    except KeyboardInterrupt:
        note = getattr(args, "interrupted", None)
        where = {"out": getattr(args, "out", None)}
        print(f"\ninterrupted{'; ' + note.format(**where) if note else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
