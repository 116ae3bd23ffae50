"""Every command's --help reads as a user types: defaults once and as typed, no format escapes, one name per
meaning across commands; list options take negative values."""

import argparse
import re

import pytest

from hardtovary.experiments import cli

#: A Python tuple or list repr, e.g. "(256, 256, 256)" or "['adam', 'sgd']" or "(False, True)".
REPR = re.compile(r"[(\[](?:'[^']*'|-?[\d.e+-]+|True|False|None)(?:, (?:'[^']*'|-?[\d.e+-]+|True|False|None))+,?[)\]]")


def subcommands():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def option_entries(help_text: str) -> list[str]:
    """The help of each option: from a line that starts with '  -' to the next such line or section."""
    entries, current = [], None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith("    "):
            current.append(line)
        else:
            current = None
    return [" ".join(part.strip() for part in entry) for entry in entries]


def default_text(entry: str) -> str:
    """What an option's help says after '(default', where argparse puts the default."""
    return entry.split("(default", 1)[1] if "(default" in entry else ""


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_help_shows_each_default_once_as_typed(name):
    text = subcommands()[name].format_help()
    assert "%%" not in text, name
    entries = option_entries(text)
    assert entries, name
    for entry in entries:
        assert len(re.findall(r"\(default", entry)) <= 1, entry
        assert "(default: None)" not in entry, entry
        assert not REPR.search(default_text(entry)), entry


def test_the_help_check_catches_what_it_is_for():
    """Faults the help check looks for, as argparse prints them: a Python repr as a default, two defaults in one
    entry."""
    bad = ("  --hidden HIDDEN  widths (default: (256, 256, 256))\n"
           "  --tau TAU  threshold (default: 1.0 and 0.5); ignored by mean (default: None)\n")
    entries = option_entries(bad)
    assert REPR.search(default_text(entries[0]))
    assert len(re.findall(r"\(default", entries[1])) == 2


def test_one_name_per_meaning_across_commands():
    options = {name: {flag for a in sub._actions for flag in a.option_strings} for name, sub in subcommands().items()}
    every = set().union(*options.values())
    # other names for meanings that already have one (--l2 is --weight-decay, --hidden-units is --hidden, ...)
    assert not every & {"--l2", "--hidden-units", "--layers", "--mlp-envs", "--mlp-examples", "--mlp-hidden",
                        "--mlp-epochs"}
    for name, sub in subcommands().items():
        for action in sub._actions:
            if "--backend" in action.option_strings:  # the array backend, the same choices everywhere
                assert set(action.choices) == {"auto", "numpy", "cupy"}, name


def test_list_options_take_negative_values():
    args = cli.build_parser().parse_args(["sweep", "--taus", "-1,0"])
    assert args.taus == (-1.0, 0.0)
    if cli.torch_available():
        args = cli.build_parser().parse_args(["gradient-correlation", "--taus", "-1,-0.5,1"])
        assert args.taus == (-1.0, -0.5, 1.0)

