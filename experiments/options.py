"""What the commands' parsers share: the help formatter, the parser, argument types, option groups and the checks
of options against each other. Importing this module imports no experiment, so listing the commands stays fast;
the helpers import what they need when a command adds its options."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hardtovary.experiments.errors import UsageError

#: The help of every --hidden option (one MLP's widths).
HIDDEN_HELP = "hidden widths, comma-separated; at least one (none is an error)"

#: The help of every --lr-milestones option, after what its default is.
MILESTONES_HELP = "; each m in 1..EPOCHS-1 (the rate drops from epoch m + 1 on), others are an error"


def install_hint(extra: str) -> str:
    """How to install the optional part ``extra``, from PyPI or from a checkout of the repository."""
    return f"pip install 'hardtovary[{extra}]' (from a checkout: pip install '.[{extra}]')"


def figures_line(label: str, paths) -> str:
    """``label: path, path`` for the figures written, or why none were (``paths`` holds None without matplotlib)."""
    written = [str(path) for path in paths if path]
    if written:
        return f"{label}: {', '.join(written)}"
    return f"{label}: skipped (matplotlib is not installed; {install_hint('plot')})"


def shown(value) -> str:
    """A default as one types it: lists comma-separated (``256,256,256``), booleans in lists as yes/no."""
    if isinstance(value, (tuple, list)):
        return ",".join(("yes" if v else "no") if isinstance(v, bool) else str(v) for v in value)
    return str(value)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default as one types it; none for plain flags, and none for options whose default is None
    (their help says what happens when they are left out)."""

    def _get_help_string(self, action):
        text = action.help or ""
        plain_flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if ("%(default)" in text or plain_flag or not action.option_strings
                or action.default is None or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: {shown(action.default).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that reads a word starting with a minus sign and a digit as a value, so that list options
    take negative entries (``--taus -1,0``); argparse before Python 3.13 reads only single numbers such as ``-1``
    that way and takes ``-1,0`` for an unknown option. No option of ours looks like a negative number."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")


def describe(parser, description: str) -> None:
    """Give a command's parser its description, and the help formatter that shows defaults as typed."""
    parser.description = description
    parser.formatter_class = HelpFormatter


# ---- argument types ------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def nonnegative(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None


def positive_ints(text: str) -> tuple[int, ...]:
    """One or more positive integers, comma-separated."""
    values = int_list(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return values


def widths(text: str) -> tuple[int, ...]:
    """Hidden-layer widths of one MLP: at least one positive integer (no option here means a model without hidden
    layers)."""
    values = int_list(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be one or more positive widths, comma-separated, got {text!r}")
    return values


def float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"must hold at least one number, got {text!r}")
    return values


def name_list(choices):
    """The type of an option that takes some of ``choices``, comma-separated."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(part.strip() for part in text.split(",") if part.strip())
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"must be comma-separated names from {', '.join(choices)}, got {text!r}")
        return values

    return parse


def bool_list(text: str) -> tuple[bool, ...]:
    words = {"yes": True, "no": False, "true": True, "false": False, "1": True, "0": False}
    values = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not values or any(v not in words for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated yes/no, got {text!r}")
    return tuple(dict.fromkeys(words[v] for v in values))


def level_range(text: str) -> range:
    """Procgen level seeds as ``START:STOP`` (``STOP`` excluded, as Python's ranges), ``0 <= START < STOP <=
    2**31 - 1`` (Procgen's seeds are 32-bit signed integers)."""
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be START:STOP (e.g. 0:64, STOP excluded), got {text!r}") from None
    if not 0 <= start < stop <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"must be START:STOP with 0 <= START < STOP <= 2147483647, got {text!r}")
    return range(start, stop)


# ---- option groups -------------------------------------------------------------------------------------------------


def add_run_folder_options(parser, default: str) -> None:
    """``--out`` (the run folder, default ``default``) and ``--fresh``."""
    parser.add_argument("--out", type=Path, default=Path(default), help="run folder")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")


def add_spirals_options(parser, d) -> None:
    """The spirals data options (paper App. B.2) with the defaults of the SpiralsConfig ``d``."""
    g = parser.add_argument_group("data (spirals, paper §6.1-6.2)")
    g.add_argument("--n-envs", type=positive_int, default=d.n_train_envs, help="training environments")
    g.add_argument("--examples-per-env", type=positive_int, default=d.examples_per_env,
                   help="training examples per environment")
    g.add_argument("--n-test", type=positive_int, default=d.n_test, help="o.o.d. test examples")
    g.add_argument("--n-dims", type=int, default=d.n_dims, help="shortcut dimensions")
    g.add_argument("--n-revolutions", type=float, default=d.n_revolutions, help="spiral revolutions")
    g.add_argument("--shortcut-scale", type=nonnegative, default=d.shortcut_scale,
                   help="multiplies the shortcut signatures (the paper's variance 0.1 is 0.316)")
    g.add_argument("--data-seed", type=int, default=d.seed, help="environment e uses seed data_seed + e")


def add_search_seed_and_epochs(parser) -> None:
    """``--seed`` and ``--epochs`` of the random searches."""
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the search: draws the trials; trial i trains with seed SEED + i")
    parser.add_argument("--epochs", type=positive_int, default=40,
                        help="epochs per run; the learning rate drops x0.1 at 1/2 and 3/4 of them (paper App. B.3)")


def spirals_config(args):
    """The SpiralsConfig of the options added by :func:`add_spirals_options` (validated by SpiralsConfig)."""
    from hardtovary.reference import data

    return data.SpiralsConfig(n_train_envs=args.n_envs, examples_per_env=args.examples_per_env, n_test=args.n_test,
                              n_revolutions=args.n_revolutions, n_dims=args.n_dims, seed=args.data_seed,
                              shortcut_scale=args.shortcut_scale)


def add_flavour_option(group, tau_source: str) -> None:
    """``--flavour``, the geometric mean's flavour (one help text for every command that trains it)."""
    from hardtovary.reference import rules

    group.add_argument("--flavour", choices=rules.FLAVOURS, default=None,
                       help="geometric_mean's flavour: 'paper' is 0 unless all K signs agree, so it takes tau 1 only "
                            "(paper §2.3 (i)); 'original' is the authors' code: kept where the AND-mask at "
                            f"{tau_source} keeps, sign of the arithmetic mean, 1e-10 inside the log (default: paper; "
                            "an error when --methods has no geometric_mean)")


def add_array_backend_option(parser, condition: str = "") -> None:
    """``--backend``: the array backend of hardtovary.accel (one meaning in every command that has it)."""
    from hardtovary.accel.backend import ENV_VAR, NAMES

    parser.add_argument("--backend", choices=NAMES, default=None,
                        help=f"{condition}array backend of the batched training: numpy, cupy, or auto (CuPy when a GPU "
                             f"is usable) (default: environment variable {ENV_VAR}, else auto)")


def add_dtype_option(parser, condition: str = "") -> None:
    """``--dtype``: the precision of the batched training of hardtovary.accel (None when not given: the first of
    :data:`hardtovary.accel.sweep.DTYPES`, or an error where the option does not apply)."""
    from hardtovary.accel.sweep import DTYPES

    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help=f"{condition}precision of the batched training (default {DTYPES[0]}: equal to the "
                             "reference to rounding)")


def early_abort_rule() -> str:
    """The early abort of App. B.3 in words, ``train acc > 0.97 while test acc < 0.6``, from the thresholds of
    :func:`hardtovary.reference.training.memorising`."""
    from hardtovary.reference.training import EARLY_ABORT_TEST_ACC, EARLY_ABORT_TRAIN_ACC

    return f"train acc > {EARLY_ABORT_TRAIN_ACC:g} while test acc < {EARLY_ABORT_TEST_ACC:g}"


def paper_architecture_options(arch) -> str:
    """Table 1's architecture values (:data:`hardtovary.experiments.sweep.PAPER_ARCHITECTURE`) as the search
    commands' options, e.g. ``--widths 256,512 ...``."""
    return (f"--widths {shown(arch.hidden_units)} --depths {shown(arch.layers)} "
            f"--batch-sizes {shown(arch.batch_sizes)}")


def given(**values) -> dict:
    """The options given: those of ``values`` that are not None (None means left out, the default applies)."""
    return {name: value for name, value in values.items() if value is not None}


# ---- checks of options against each other ------------------------------------------------------------------------


def lr_milestones(given, epochs: int):
    """``--lr-milestones`` checked against ``--epochs``: a milestone below 1 (dropped) or at or beyond the last
    epoch (never reached) is an error. None stays None: the command's default."""
    if given is None:
        return None
    bad = [m for m in given if not 1 <= m < epochs]
    if bad:
        raise UsageError(f"--lr-milestones must lie in 1..{epochs - 1} with --epochs {epochs} (a milestone m lowers "
                         f"the rate from epoch m + 1 on), got {','.join(map(str, bad))}")
    return tuple(given)


def check_flavour(methods, flavour) -> None:
    if flavour is not None and "geometric_mean" not in methods:
        raise UsageError("--flavour applies only to geometric_mean, which --methods does not include")


def check_rule_options(methods, tau, flavour) -> None:
    """Refuse, before anything runs, a ``--tau`` / ``--flavour`` that a method in ``methods`` would not train with.
    What is valid is the oracle's decision (:class:`hardtovary.reference.rules.RuleSpec`); the wording is the
    command line's."""
    from hardtovary.reference import rules

    check_flavour(methods, flavour)
    for method in methods:
        if method not in rules.RULES:  # erm, dann and irm aggregate no per-environment gradients
            continue
        try:
            rules.RuleSpec(method, **rules.rule_options(method, tau, flavour if method == "geometric_mean" else None))
        except ValueError as exc:
            hint = ("; pass --flavour original, or leave geometric_mean out of --methods"
                    if method == "geometric_mean" and flavour in (None, "paper") else "")
            raise UsageError(f"--tau {tau:g} with {method}: {exc}{hint}") from None


def check_array_backend(name) -> None:
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
