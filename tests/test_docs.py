"""The documentation's promises: every ``hardtovary`` command shown in README.md and docs/*.md parses, every command
is shown at least once, the edge-case table in docs/conventions.md is the oracle's, and every relative link (and
its #anchor) resolves.

How a documented command is judged. ``main(args + ["--help"])`` must exit with status 0: the command exists, and
every value it is given converts (``--epochs x`` exits 2 before ``--help`` is reached). But argparse runs ``--help``
as soon as it meets it and ignores the unknown options it has collected until then, so ``--tagret x --help`` also
exits 0. The same arguments are therefore also parsed, without running anything, by the parser ``main`` builds:
nothing may be left over, and every option must be spelt in full (argparse would take the prefix ``--epoch`` for
``--epochs``, so a documented prefix would break when another option with that prefix is added).
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from hardtovary.experiments import cli
from hardtovary.reference import edge_cases

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Code blocks whose lines are read as shell commands (output is shown in blocks without a language).
SHELL_BLOCKS = ("bash", "sh", "shell", "console", "text")

#: Documented commands that are not parsed, each with the reason. A command with a placeholder ('...', '<name>', or
#: a usage synopsis's '[--option ...]') that is not listed here fails, so that a skip is always a decision.
SKIPPED: dict[str, str] = {}

#: The documents the README must link.
README_LINKS = ("docs/experiments.md", "docs/conventions.md", "docs/results.md", "docs/benchmarks.md",
                "docs/conformance.md")

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
PLACEHOLDER = re.compile(r"\.\.\.|<[^>\s]+>|\[-")
SEPARATORS = {"&&", "||", ";", "|", "&"}


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _logical_lines(block: str):
    """(offset, line) for each command line of a shell block: backslash continuations joined, a '$ ' prompt
    removed; offset is the line's index within the block."""
    pending, start = "", 0
    for index, raw in enumerate(block.splitlines()):
        if not pending:
            start = index
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line.startswith("$ "):
            line = line[2:]
        if line:
            yield start, line


def _segments(line: str):
    """The simple commands of one shell line: split at && || ; | &, comments removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segment: list[str] = []
    for token in lexer:
        if token in SEPARATORS:
            yield segment
            segment = []
        else:
            segment.append(token)
    yield segment


def _hardtovary_arguments(segment: list[str]):
    """The arguments after ``hardtovary`` or ``python -m hardtovary`` (leading VAR=value assignments allowed), or
    None when the segment runs something else."""
    while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", segment[0]):
        segment = segment[1:]
    if segment[:1] == ["hardtovary"]:
        return segment[1:]
    if len(segment) >= 3 and re.fullmatch(r"python3?", segment[0]) and segment[1:3] == ["-m", "hardtovary"]:
        return segment[3:]
    return None


def documented_commands():
    """(where, line, arguments) for every hardtovary command in a shell code block of the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) not in SHELL_BLOCKS:
                continue
            first_line = text.count("\n", 0, match.start(2)) + 1
            for offset, line in _logical_lines(match.group(2)):
                for segment in _segments(line):
                    args = _hardtovary_arguments(segment)
                    if args is not None:
                        found.append((f"{_relative(doc)}:{first_line + offset}", line, args))
    return found


COMMANDS = documented_commands()


def _needs_missing_torch(args) -> bool:
    command = cli.COMMANDS.get(args[0]) if args else None
    return command is not None and command.torch and not cli.torch_available()  # main's own test for stand-ins


def _has_subcommands(parser) -> bool:
    return any(isinstance(action, argparse._SubParsersAction) for action in parser._actions)


def _subparser(parser, name):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("the hardtovary parser has no subcommands")


def test_the_docs_show_commands_and_each_command_at_least_once():
    assert len(COMMANDS) >= 20, COMMANDS
    shown = {args[0] for _, _, args in COMMANDS if args}
    assert set(cli.COMMANDS) <= shown, f"never shown in a shell block of the docs: {set(cli.COMMANDS) - shown}"


@pytest.mark.parametrize("where, line, args", COMMANDS, ids=[f"{w} {' '.join(a)[:60]}" for w, _, a in COMMANDS])
def test_documented_command_parses(where, line, args, capsys):
    if line in SKIPPED:
        pytest.skip(SKIPPED[line])
    assert not PLACEHOLDER.search(line), (
        f"{where}: '{line}' has a placeholder; write a value that parses, or list the line in SKIPPED with a reason")
    if _needs_missing_torch(args):
        pytest.skip(f"'hardtovary {args[0]}' needs torch, which this interpreter lacks")

    # 1. through main, as a user would run it, with --help appended: exit 0
    with pytest.raises(SystemExit) as done:
        cli.main([*args, "--help"])
    err = capsys.readouterr().err
    assert done.value.code == 0, f"{where}: 'hardtovary {' '.join(args)} --help' exited {done.value.code}: {err}"

    if not args or args[0].startswith("-"):
        return  # 'hardtovary --help', 'hardtovary --version': no command to parse further

    # 2. the same arguments through the parser main builds, without running: nothing unknown, nothing abbreviated
    parser = cli.build_parser(commands=[args[0]])
    try:
        _, unknown = parser.parse_known_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{where}: '{line}' does not parse: {capsys.readouterr().err}") from exc
    assert not unknown, f"{where}: '{line}': not options of 'hardtovary {args[0]}': {unknown}"
    command = _subparser(parser, args[0])
    words = args[1:]
    if _has_subcommands(command) and words and not words[0].startswith("-"):  # a command with stages (coinrun)
        command, words = _subparser(command, words[0]), words[1:]
    options = command._option_string_actions
    for word in words:
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            assert name in options, f"{where}: '{line}': {name} is not spelt as an option of 'hardtovary {args[0]}'"


def test_conventions_show_the_oracles_edge_case_table_exactly():
    text = (ROOT / "docs" / "conventions.md").read_text()
    table = edge_cases.markdown_table()
    assert f"\n{table}\n" in text, ("docs/conventions.md must contain hardtovary.reference.edge_cases.markdown_table() "
                                    "verbatim: paste its output again")



def _first_python_block(path: Path, heading: str) -> str:
    section = path.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"{_relative(path)}: no python block under {heading!r}"
    return match.group(1)


def test_readme_adapter_example_is_the_guides_which_the_tests_run():
    # tests/test_conformance_torch.py runs the guide's block; the README shows the same code, so it must not drift
    readme = _first_python_block(ROOT / "README.md", "## Verify your implementation")
    guide = _first_python_block(ROOT / "docs" / "conformance.md", "## An adapter in twenty lines")
    assert readme == guide, "README.md's adapter example differs from docs/conformance.md's: copy the guide's block"

# ---- links ----------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"(`+).*?\1", re.S)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file: lower case, punctuation other than '-' and '_'
    dropped, spaces to '-', and -1, -2, ... for repeats."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def links(doc: Path):
    return LINK.findall(_prose(doc.read_text()))


@pytest.mark.parametrize("doc", DOCS, ids=_relative)
def test_every_relative_link_resolves(doc):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{_relative(doc)}: broken links: {broken}"


def test_readme_links_every_guide():
    targets = {target.partition("#")[0] for target in links(ROOT / "README.md")}
    missing = [path for path in README_LINKS if path not in targets]
    assert not missing, f"README.md does not link {missing}"


# ---- tables ---------------------------------------------------------------------------------------------------

def _cells(row: str) -> int:
    """The number of cells GitHub sees in a table row: every '|' that is not escaped separates cells, inside code
    spans too."""
    return len(re.findall(r"(?<!\\)\|", row.strip().strip("|"))) + 1


def _tables(text: str):
    """(first line, rows) of each markdown table outside code blocks."""
    lines = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text).splitlines()
    index = 0
    while index < len(lines) - 1:
        if lines[index].startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[index + 1].strip()):
            start = index
            while index < len(lines) and lines[index].startswith("|"):
                index += 1
            yield start + 1, lines[start:index]
        else:
            index += 1


def _ragged_rows(text: str):
    for first, rows in _tables(text):
        header = _cells(rows[0])
        for offset, row in enumerate(rows):
            if _cells(row) != header:
                yield first + offset, row


@pytest.mark.parametrize("doc", DOCS, ids=_relative)
def test_every_table_row_has_as_many_cells_as_its_header(doc):
    # The edge-case table is judged on its own, below.
    text = doc.read_text().replace(edge_cases.markdown_table(), "")
    ragged = [f"line {n}: {row[:80]}" for n, row in _ragged_rows(text)]
    assert not ragged, f"{_relative(doc)}: an unescaped '|' splits these rows (write \\| in a cell): {ragged}"


def test_the_edge_case_table_renders_as_two_columns():
    assert not list(_ragged_rows(edge_cases.markdown_table()))
