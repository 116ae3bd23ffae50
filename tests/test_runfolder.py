"""Run-folder files: atomic writes with the mode the umask asks for, and results.json with its runtime record."""

import importlib.metadata
import json
import os
import stat
import sys

import numpy as np
import pytest

from hardtovary.experiments.runfolder import RunFolder, write_atomic, write_json_atomic, write_results


@pytest.fixture
def umask():
    """Set the process umask for one test, and restore it afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX")
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o000, 0o666)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    write_atomic(tmp_path / "table.txt", lambda f: f.write("x\n"))
    write_atomic(tmp_path / "blob.bin", lambda f: f.write(b"\0"), binary=True)
    write_json_atomic(tmp_path / "units" / "a.json", {"a": 1})
    RunFolder(tmp_path / "run", {"seed": 0}).write_results({"methods": {}})
    for path in (tmp_path / "table.txt", tmp_path / "blob.bin", tmp_path / "units" / "a.json",
                 tmp_path / "run" / "config.json", tmp_path / "run" / "results.json"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    (tmp_path / "old.json").write_text('{"kept": true}')

    def fail(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "new.json", fail)
    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "old.json", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]
    assert json.loads((tmp_path / "old.json").read_text()) == {"kept": True}


def test_results_json_records_the_runtime(tmp_path):
    path = write_results(tmp_path / "out", {"methods": {"mean": {"test_acc": 0.5}}})
    assert path == tmp_path / "out" / "results.json"
    stored = json.loads(path.read_text())
    assert stored["methods"] == {"mean": {"test_acc": 0.5}}
    runtime = stored["runtime"]
    assert runtime["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    versions = runtime["versions"]
    assert versions["numpy"] == np.__version__ == importlib.metadata.version("numpy")
    assert versions["scipy"] == importlib.metadata.version("scipy")
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    assert versions["torch"] == torch_version
    pools = runtime["threads"]["pools"]
    assert any(p["internal_api"] in ("openblas", "mkl", "blis") and p["num_threads"] >= 1 for p in pools), pools
    assert "filepath" not in json.dumps(runtime)  # no local paths in a file that gets shared
