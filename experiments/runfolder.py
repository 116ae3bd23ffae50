"""Run folders: results written atomically, so that a killed run can be resumed without losing finished work.

A run folder holds ``config.json`` (the full configuration of the run) and one JSON file per finished unit of work
(``units/<name>.json``). Files are written to a temporary name in the same folder and renamed into place
(``os.replace`` is atomic on POSIX), so a reader never sees a half-written file. Re-running with the same
configuration skips the units that are already there; a different configuration is refused unless the caller
asks to start afresh. ``results.json`` (:func:`write_results`) also records the installation and thread settings
that produced it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from hardtovary.experiments import runtime
from hardtovary.experiments.errors import UsageError

RESULTS_FILE = "results.json"


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Create a new file beside ``path`` for writing; returns its descriptor and path. Unlike
    ``tempfile.mkstemp``, which creates files readable by their owner only (mode 0600), the mode is 0666 less the
    umask, the mode that ``open(path, "w")`` would give."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def write_atomic(path: Path, write, *, binary: bool = False) -> None:
    """Create ``path`` atomically: ``write(file)`` fills a temporary file in the same folder, which is flushed to
    disk and renamed into place, so a reader never sees a half-written file. The file's mode respects the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`write_atomic`)."""

    def write(f):
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")

    write_atomic(path, write)


def write_results(folder: Path, results: dict) -> Path:
    """Write ``folder/results.json``: ``results`` plus, under ``"runtime"``, the installation and thread settings
    that produced them (:func:`hardtovary.experiments.runtime.describe`). Returns the file's path."""
    path = Path(folder) / RESULTS_FILE
    write_json_atomic(path, {**results, "runtime": runtime.describe()})
    return path


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


class RunFolder:
    """A folder for one run: its configuration and its finished units of work."""

    def __init__(self, root, config: dict, *, fresh: bool = False):
        self.root = Path(root)
        config_path = self.root / "config.json"
        if fresh and self.root.exists():
            shutil.rmtree(self.root)
        if config_path.exists():
            stored = read_json(config_path)
            if stored != json.loads(json.dumps(config)):
                raise UsageError(
                    f"run folder {self.root} holds a run with a different configuration; "
                    f"pass another --out folder, or --fresh to delete it and start again"
                )
        else:
            write_json_atomic(config_path, config)
        self.config = config

    def unit_path(self, name: str) -> Path:
        return self.root / "units" / f"{name}.json"

    def finished(self, name: str):
        """The stored result of unit ``name``, or None when it has not finished."""
        path = self.unit_path(name)
        return read_json(path) if path.exists() else None

    def save(self, name: str, result) -> None:
        write_json_atomic(self.unit_path(name), result)

    def write_results(self, results: dict) -> Path:
        """:func:`write_results` into this run folder."""
        return write_results(self.root, results)
