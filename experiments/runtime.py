"""The software a command runs on: how many threads its numerical libraries may use, and what to record about them.

Thread bound. NumPy's and SciPy's BLAS (OpenBLAS) and torch's intra-op pool (OpenMP) start one thread per core.
The experiments multiply small matrices, where extra threads gain little, and on a machine with other work running
they compete with it for the cores and wait for each other (``bench/bench_threads.py`` measures both). Every
``hardtovary`` command therefore bounds them, by default to :data:`DEFAULT_THREADS`; ``--threads N`` or the
environment variable ``HARDTOVARY_THREADS`` changes the bound, and 0 leaves the libraries' own defaults.
:func:`limited_threads` applies it with ``threadpoolctl`` to the pools already loaded (torch's intra-op pool is one
of them: an OpenMP pool), and through the usual variables (``OMP_NUM_THREADS``, ...) to libraries loaded later.

Runtime record. :func:`describe` is what every ``results.json`` carries under ``"runtime"``: Python, NumPy, SciPy
and torch versions, each BLAS/OpenMP library with its version and thread count, and the thread settings. Results
of the same command differ between installations because floating-point libraries round differently and training
is chaotic: the record says which installation produced a number.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import sys

import threadpoolctl

from hardtovary import __version__
from hardtovary.experiments.errors import UsageError

THREADS_ENV_VAR = "HARDTOVARY_THREADS"
# One thread by default: next to other work (shared machines, CI, a process pool) one thread per process ran every
# command's workload faster than one thread per core, and on an idle machine the loss is small; --threads 0 lifts
# the bound (bench/bench_threads.py; docs/benchmarks.md).
DEFAULT_THREADS = 1
# Read by OpenMP runtimes, OpenBLAS, MKL and torch when they start: they bound libraries loaded inside the block.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def parse_threads(text: str) -> int:
    """A thread bound from its text (the type of ``--threads``): an integer >= 0, where 0 means no bound."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (0: the libraries' own defaults), got {text!r}")
    return value


def resolve_threads(option: int | None) -> int:
    """The bound in force: ``option`` when given, else ``$HARDTOVARY_THREADS`` when set, else DEFAULT_THREADS."""
    if option is not None:
        return option
    text = os.environ.get(THREADS_ENV_VAR, "").strip()
    if not text:
        return DEFAULT_THREADS
    try:
        return parse_threads(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"environment variable {THREADS_ENV_VAR} {exc}") from None


def add_threads_option(parser) -> None:
    """Add ``--threads`` to a command's parser (read it with :func:`resolve_threads`)."""
    parser.add_argument("--threads", type=parse_threads, default=None, metavar="N",
                        help=f"threads of the BLAS and OpenMP pools (NumPy, SciPy, torch); 0: the libraries' own "
                             f"defaults (default: ${THREADS_ENV_VAR}, else {DEFAULT_THREADS})")


@contextlib.contextmanager
def limited_threads(threads: int):
    """Bound the BLAS and OpenMP thread pools to ``threads`` inside the block; 0 changes nothing. torch's intra-op
    pool is an OpenMP pool (and its MKL follows it), so it is bounded too. Restores the previous settings on exit,
    except in libraries first loaded inside the block."""
    if threads == 0:
        yield
        return
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in _THREAD_VARIABLES})
    try:
        with threadpoolctl.threadpool_limits(limits=threads):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


#: Optional libraries whose versions are recorded when the command imported them: module -> the name recorded
#: (procgen's distribution is procgen2; scikit-learn supplies the digits of ``cifar10 --dataset digits``).
_OPTIONAL = {"cupy": "cupy", "procgen": "procgen2", "optuna": "optuna", "sklearn": "scikit-learn"}


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """The installation and thread settings that produced a result (JSON-ready), without importing anything new:
    torch's thread count only when the command imported torch."""
    import numpy

    torch = sys.modules.get("torch")
    pools = [{key: info.get(key) for key in ("user_api", "internal_api", "prefix", "version", "threading_layer",
                                              "architecture", "num_threads")}
             for info in threadpoolctl.threadpool_info()]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {"hardtovary": __version__, "numpy": numpy.__version__, "scipy": _distribution_version("scipy"),
                     "torch": _distribution_version("torch"), "threadpoolctl": threadpoolctl.__version__,
                     **{label: str(getattr(sys.modules[module], "__version__", "")).strip() or None
                        for module, label in _OPTIONAL.items() if module in sys.modules}},
        "threads": {"variables": {name: os.environ.get(name) for name in (THREADS_ENV_VAR,
                                                                                *_THREAD_VARIABLES)},
                    "torch": torch.get_num_threads() if torch is not None else None,
                    "pools": pools},
    }
