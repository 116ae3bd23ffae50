"""Where the independent units of work of a command run: in this process, in a local process pool, or on a Ray
cluster (``--executor``, ``--workers``, ``--ray-address``; :func:`add_executor_options`).

The run folder stays the single source of truth, whatever the executor (:func:`run_units`):

* the driver (the process that runs the command) lists the units and skips those the folder already holds;
* it hands the others to the executor, and writes each result into the folder itself, atomically, as it
  completes: one writer, so the workers need no shared filesystem;
* a killed driver resumes from what the folder holds when started again;
* a unit is a module-level function of its arguments only (its seed among them), so its result does not depend on
  the executor, the number of workers or the order in which units finish.

A unit's function is called as ``function(*args, on_step=..., on_epoch=...)``. In this process the callbacks advance the
progress bar step by step (``on_step()``, or ``on_step(n)`` for n steps at once) and show each epoch's record (its
fields named by the unit's ``shows``); in a pool or on Ray they are None and the bar advances by the unit's ``steps``
when the unit completes. A worker process that dies (killed, out of memory) is replaced and its unit run again, up to
``retries`` times; an exception raised by the unit itself is not retried: it is a bug or bad input, and it stops the
command with its traceback.

Ray core is used rather than Ray Tune: the commands draw their own configurations and keep their own resumable
run folder, so all they need from a cluster is to run functions where there are free CPUs and GPUs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm import tqdm

from hardtovary.experiments import runtime
from hardtovary.experiments.errors import UsageError
from hardtovary.experiments.options import fraction, positive_int
from hardtovary.experiments.progress import note_resume, start_unit

__all__ = ["EXECUTORS", "Unit", "Store", "LocalExecutor", "RayExecutor", "add_executor_options", "make_executor",
           "run_units"]

#: The executors ``--executor`` names.
EXECUTORS = ("local", "ray")
#: Times a unit is run again after its worker process died.
RETRIES = 2
#: The share of a GPU a unit that computes on one asks of a Ray cluster: four small runs at once per GPU.
GPUS_PER_UNIT = 0.25
RAY_INSTALL = "pip install 'hardtovary[ray]' (from a checkout: '.[ray]')"


@dataclass(frozen=True)
class Unit:
    """One independent piece of work: ``function(*args, on_step=..., on_epoch=..., **options)`` returns its
    JSON-ready result, stored under ``name``. ``steps`` weighs it on the progress bar, where ``label`` names it and
    the fields ``shows`` of each epoch's record are shown. On a Ray cluster it asks for ``cpus`` CPUs and, when it
    computes on a GPU (``gpu``), the executor's share of one (``--gpus-per-unit``), so that small runs share a
    GPU."""

    name: str
    function: Callable
    args: tuple = ()
    steps: int = 1
    label: str = ""
    shows: tuple = ()
    cpus: float = 1.0
    gpu: bool = False
    options: dict = field(default_factory=dict)  # keyword arguments of ``function`` besides on_step


class Store(Protocol):
    """Where results live: :class:`~hardtovary.experiments.runfolder.RunFolder` is one."""

    def finished(self, name: str) -> Any: ...

    def save(self, name: str, result) -> None: ...


def _call(function, args, options, threads):
    """A unit in a worker process: bounded to the driver's threads, as every command bounds its own."""
    with runtime.limited_threads(threads):
        return function(*args, on_step=None, on_epoch=None, **options)


class LocalExecutor:
    """Units in this process (``workers == 1``, with step-by-step progress) or in a pool of ``workers``
    processes started fresh (``spawn``: safe with torch and CUDA, which do not survive a fork)."""

    name = "local"

    def __init__(self, workers: int = 1, threads: int = runtime.DEFAULT_THREADS, retries: int = RETRIES):
        if workers < 1:
            raise UsageError(f"--workers must be >= 1, got {workers}")
        self.workers, self.threads, self.retries = workers, threads, retries

    def run(self, units: list[Unit], on_step: Callable | None = None,
            on_epoch: Callable | None = None) -> Iterator[tuple[Unit, Any]]:
        """Each unit with its result, as they complete; the callbacks reach the units only in this process."""
        if self.workers == 1:
            for unit in units:
                yield unit, unit.function(*unit.args, on_step=on_step, on_epoch=on_epoch, **unit.options)
            return
        pending, attempts = list(units), {unit.name: 0 for unit in units}
        while pending:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(self.workers, len(pending)), mp_context=context) as pool:
                futures = {pool.submit(_call, u.function, u.args, u.options, self.threads): u for u in pending}
                pending = []
                try:
                    for future in concurrent.futures.as_completed(futures):
                        unit = futures[future]
                        try:
                            result = future.result()
                        except concurrent.futures.process.BrokenProcessPool:
                            pending.append(self._again(unit, attempts))
                            continue
                        yield unit, result
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise

    def _again(self, unit: Unit, attempts: dict) -> Unit:
        attempts[unit.name] += 1
        if attempts[unit.name] > self.retries:
            raise RuntimeError(f"unit {unit.name}: its worker process died {attempts[unit.name]} times")
        print(f"a worker process died; running {unit.name} again ({attempts[unit.name]} of {self.retries})",
              file=sys.stderr)
        return unit


class RayExecutor:
    """Units as Ray tasks on the cluster at ``address`` (``auto``: the one this machine belongs to), or on a local
    cluster of ``workers`` CPUs started here when ``address`` is None. Ray re-runs a task whose worker died
    (``max_retries``), not one that raised."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None,
                 threads: int = runtime.DEFAULT_THREADS, retries: int = RETRIES, gpus_per_unit: float = GPUS_PER_UNIT):
        try:
            import ray
        except ImportError:
            raise UsageError(f"--executor ray needs Ray, which is not installed; {RAY_INSTALL}") from None
        self.ray, self.threads, self.retries, self.gpus_per_unit = ray, threads, retries, gpus_per_unit
        if not ray.is_initialized():
            try:
                if address is None:
                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=True)
                else:
                    ray.init(address=address, log_to_driver=True)
            except ConnectionError as exc:
                raise UsageError(f"--ray-address {address}: cannot connect to a Ray cluster ({exc})") from None

    def run(self, units: list[Unit], on_step: Callable | None = None,
            on_epoch: Callable | None = None) -> Iterator[tuple[Unit, Any]]:
        ray = self.ray
        remote = ray.remote(_call)
        refs = {remote.options(num_cpus=u.cpus, num_gpus=self.gpus_per_unit if u.gpu else 0,
                               max_retries=self.retries)
                .remote(u.function, u.args, u.options, self.threads): u for u in units}
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                unit = refs.pop(done[0])
                yield unit, ray.get(done[0])
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise


def add_executor_options(parser, what: str, local_workers: str = "1: in this process") -> None:
    """``--executor``, ``--workers``, ``--ray-address``, ``--gpus-per-unit``: where the command's ``what`` (its
    units) run; ``local_workers`` says the local default (:func:`make_executor` takes it)."""
    g = parser.add_argument_group("executor")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help=f"where the {what} run: local (this machine) or ray (a Ray cluster)")
    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help=f"{what} run at once: with --executor local, processes ({local_workers} when not "
                        f"given); with ray, the CPUs of the local cluster started when --ray-address is not given "
                        f"(every CPU when not given)")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="with --executor ray: the cluster to join, e.g. 'auto' or 'ray://HOST:10001' (default: "
                        "start a local cluster)")
    g.add_argument("--gpus-per-unit", type=_gpu_share, default=None, metavar="FRACTION",
                   help=f"with --executor ray: the share of a GPU each of the {what} that computes on one asks for, "
                        f"in (0, 1] (default: {GPUS_PER_UNIT})")


def _gpu_share(text: str) -> float:
    value = fraction(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def make_executor(args, local_workers: int = 1):
    """The executor the options ask for (``local_workers`` processes when --workers is not given); the Ray options
    without --executor ray are an error, not ignored."""
    threads = runtime.resolve_threads(getattr(args, "threads", None))
    if args.executor == "ray":
        share = GPUS_PER_UNIT if args.gpus_per_unit is None else args.gpus_per_unit
        return RayExecutor(args.ray_address, args.workers, threads, gpus_per_unit=share)
    for option, value in (("--ray-address", args.ray_address), ("--gpus-per-unit", args.gpus_per_unit)):
        if value is not None:
            raise UsageError(f"{option} needs --executor ray")
    return LocalExecutor(args.workers or local_workers, threads)


def run_units(store: Store, units: Iterable[Unit], executor=None, *, what: str = "units", progress: bool = True,
              where=None) -> dict:
    """Run the units ``store`` has not finished on ``executor`` (this process when None; elsewhere the units with
    the most ``steps`` are handed out first), saving each result in ``store`` as it completes; returns every
    unit's stored result by name, in the order of ``units``. ``what``
    names the units in messages; ``where`` is the folder named when a resumed run reuses units."""
    units = list(units)
    names = [unit.name for unit in units]
    if len(set(names)) != len(names):
        raise ValueError(f"unit names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    executor = executor or LocalExecutor()
    stored = {name: store.finished(name) for name in names}  # read once: a store may read whole files
    todo = [unit for unit in units if stored[unit.name] is None]
    note_resume(len(units) - len(todo), len(units), what, where)
    in_process = isinstance(executor, LocalExecutor) and executor.workers == 1
    if not in_process:  # longest first: the long units do not start last and leave the other workers idle
        todo.sort(key=lambda unit: -unit.steps)
    with tqdm(total=sum(unit.steps for unit in todo), disable=not progress, unit="step", dynamic_ncols=True) as bar:
        started = iter(todo)
        current = next(started, None)
        if in_process and current is not None:
            start_unit(bar, current.label)

        def show(record):
            bar.set_postfix(epoch=record["epoch"], **{key: f"{record[key]:.3g}" for key in current.shows})

        callbacks = ((lambda n=1: bar.update(n)), show) if in_process else (None, None)
        done_steps = 0
        for unit, result in executor.run(todo, *callbacks):
            store.save(unit.name, result)
            stored[unit.name] = store.finished(unit.name)  # as a resumed run will read it back
            done_steps += unit.steps
            bar.update(done_steps - bar.n)  # the rest of a unit that stopped early, or all of one done elsewhere
            if in_process:
                current = next(started, None)
                if current is not None:
                    start_unit(bar, current.label)
            else:
                bar.set_description(f"{unit.label} done")
    return stored
