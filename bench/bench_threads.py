"""BLAS/OpenMP threads: the commands' workloads with the thread bound and without it, idle and under a load.

Each case runs with 1 thread (``hardtovary``'s default) and with no bound (``--threads 0``: the libraries' own
pools, one thread per core, as before the bound existed), alternately, ``--repeats`` times each; the medians are
printed with their ratio. The first case is the command itself as a fresh process; the others time the workloads of
the commands in this process under :func:`hardtovary.experiments.runtime.limited_threads`. All of that is done on
the machine as it is ("idle"), next to a concurrent NumPy job that multiplies matrices with its own default BLAS
threads ("blas"), and next to one pure-Python busy loop per core ("busy"); the loads are subprocesses started here.

Run: ``python bench/bench_threads.py [--repeats 5] [--cases command,synthetic,...] [--loads idle,blas,busy]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import threadpoolctl

from hardtovary.experiments import runtime

BLAS_LOAD = ("import numpy as np\n"
             "a = np.random.default_rng(0).standard_normal((400, 400))\n"
             "while True:\n"
             "    a = np.tanh(a @ a)\n")
BUSY_LOAD = "while True:\n    pass\n"
LOADS = ("idle", "blas", "busy")


def in_process(work):
    """A timed function of the thread bound that runs ``work()`` in this process under that bound."""

    def run(threads: int) -> float:
        with runtime.limited_threads(threads):
            start = time.perf_counter()
            work()
            return time.perf_counter() - start

    return run


def command_case():
    """The command of the issue, ``hardtovary synthetic --methods mean --epochs 4``, as a fresh process (imports and
    data included) with ``--threads 1`` and ``--threads 0``."""

    def run(threads: int) -> float:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hardtovary", "synthetic", "--methods", "mean", "--epochs", "4",
                            "--out", out, "--no-progress", "--threads", str(threads)], check=True,
                           stdout=subprocess.DEVNULL, env=load_free_environment())
            return time.perf_counter() - start

    return "hardtovary synthetic --methods mean --epochs 4", run


def synthetic_case():
    """The reference training loop of ``hardtovary synthetic --methods mean`` (default data and MLP), one epoch."""
    from hardtovary.experiments import synthetic
    from hardtovary.reference import data, training

    task = data.make_spirals_task(synthetic.DEFAULT_DATA)
    env_data = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    config = synthetic.method_config(dataclasses.replace(synthetic.DEFAULT_TRAIN, epochs=1, lr_milestones=()),
                                     "mean")
    return "synthetic mean, 1 epoch (reference)", in_process(lambda: training.train(env_data, config))


def ilc_case():
    """``hardtovary ilc --spirals-mlp`` with 60 instead of 300 epochs (training, FD Hessians, scores)."""
    from hardtovary.experiments import ilc

    return "ilc --spirals-mlp, 60 epochs", in_process(lambda: ilc.spirals_mlp_inconsistency(epochs=60))


def accel_case():
    """The accel path of ``hardtovary synthetic`` (three methods as one NumPy sweep), one epoch."""
    from hardtovary.accel.sweep import train_sweep
    from hardtovary.experiments import synthetic
    from hardtovary.reference import data, training

    task = data.make_spirals_task(synthetic.DEFAULT_DATA)
    env_data = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    base = dataclasses.replace(synthetic.DEFAULT_TRAIN, epochs=1, lr_milestones=())
    configs = [synthetic.method_config(base, m) for m in synthetic.DEFAULT_METHODS]
    return "accel sweep of 3 methods, 1 epoch", in_process(lambda: train_sweep(env_data, configs, backend="numpy"))


def baselines_case():
    """``hardtovary baselines --methods erm`` (torch MLP 3 x 256, default data), one epoch."""
    from hardtovary.experiments import baselines
    from hardtovary.reference import data

    task = data.make_spirals_task(baselines.DEFAULT_DATA)
    config = dataclasses.replace(baselines.DEFAULT_CONFIG, epochs=1, lr_milestones=())
    return "baselines erm, 1 epoch (torch)", in_process(lambda: baselines.train_baseline("erm", task, config))


def cifar10_case():
    """Two steps of ``hardtovary cifar10`` on the CPU: FastResNet(width 0.25), batch 80, per-example AND-mask."""
    import torch

    from hardtovary.accel.torch.models import FastResNet
    from hardtovary.experiments import cifar10

    generator = torch.Generator().manual_seed(0)
    X = torch.randn(80, 3, 32, 32, generator=generator)
    Y = torch.randint(0, 10, (80,), generator=generator)
    model = FastResNet(width=0.25)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def steps():
        for _ in range(2):
            cifar10.train_step(model, optimizer, X, Y, tau=0.2, rescale=True)

    return "cifar10 2 steps, width 0.25 (torch)", in_process(steps)


CASES = {"command": command_case, "synthetic": synthetic_case, "ilc": ilc_case, "accel": accel_case,
         "baselines": baselines_case, "cifar10": cifar10_case}


def load_free_environment() -> dict:
    """This process's environment without thread settings: a child starts with its libraries' defaults."""
    return {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", runtime.THREADS_ENV_VAR)}


def start_load(kind: str) -> list[subprocess.Popen]:
    """The load ``kind`` as subprocesses with the libraries' default thread pools."""
    if kind == "idle":
        return []
    code, count = (BLAS_LOAD, 1) if kind == "blas" else (BUSY_LOAD, os.cpu_count() or 1)
    return [subprocess.Popen([sys.executable, "-c", code], env=load_free_environment()) for _ in range(count)]


def stop_load(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        p.kill()
        p.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timings per case, bound and load")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated, from {', '.join(LOADS)}")
    args = parser.parse_args(argv)
    cases = [CASES[c.strip()]() for c in args.cases.split(",") if c.strip()]
    loads = [k.strip() for k in args.loads.split(",") if k.strip()]
    pools = ", ".join(f"{p['internal_api']} {p['version']} ({p['num_threads']} threads)"
                      for p in threadpoolctl.threadpool_info())
    print(f"{os.cpu_count()} CPUs; numpy {np.__version__}; pools: {pools}; medians of {args.repeats}")
    print(f"{'case':46s} {'load':5s} {'1 thread s':>11s} {'no bound s':>11s} {'no bound / 1':>13s}")
    for name, fn in cases:
        fn(1)  # warm-up: caches, lazy imports, allocator
        for kind in loads:
            processes = start_load(kind)
            try:
                time.sleep(0.5 if processes else 0)  # let the load start
                samples = {1: [], 0: []}
                for _ in range(args.repeats):
                    for threads, times in samples.items():
                        times.append(fn(threads))
            finally:
                stop_load(processes)
            bound, free = statistics.median(samples[1]), statistics.median(samples[0])
            print(f"{name:46s} {kind:5s} {bound:11.2f} {free:11.2f} {free / bound:12.2f}x", flush=True)


if __name__ == "__main__":
    main()
