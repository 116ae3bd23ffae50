"""Executors: a sweep of small synthetic runs in this process, in a local pool of 2 processes and on a local Ray
cluster of 2 CPUs, in one run; the ratio to the in-process time and the overhead per unit.

Each unit is one run of ``hardtovary baselines``' ERM on the spirals task (a 2 x 32 MLP, 4 environments of 64
examples, ``--epochs`` epochs): the small independent runs of a search or a seed sweep. ``start`` is the wall time
of ``workers`` units that do nothing: starting the processes (and, for Ray, its local cluster), which a sweep pays
once. A local pool is started afresh by every call, so the timed sweep pays its own start and ``wall`` is its time;
Ray's cluster stays up between calls, so its ``wall`` adds the start measured before. The overhead per unit is
``(wall * workers - work - start * workers) / units``, where ``work`` is the sum of the units' own times as each
measured itself: what shipping arguments and results and writing the run folder add per unit. Run folders go to a
temporary directory.

Run: ``python bench/bench_executors.py [--units 64] [--epochs 4] [--executors local1,local2,ray2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

from hardtovary.experiments import baselines, executors, runtime
from hardtovary.experiments.executors import LocalExecutor, Unit, run_units
from hardtovary.experiments.runfolder import RunFolder
from hardtovary.reference import data

CASES = {"local1": ("this process", 1), "local2": ("local pool of 2", 2), "ray2": ("Ray, 2 CPUs", 2)}


def make_units(count: int, epochs: int) -> list[Unit]:
    data_config = data.SpiralsConfig(n_train_envs=4, examples_per_env=64, n_test=256, n_dims=3)
    base = dataclasses.replace(baselines.DEFAULT_CONFIG, hidden=(32, 32), batch_size=32, epochs=epochs)
    return [Unit(f"erm-seed{s}", baselines.train_unit, ("erm", data_config, dataclasses.replace(base, seed=s)),
                 label=f"seed {s}") for s in range(count)]


def nothing(*, on_step=None, on_epoch=None) -> dict:
    return {}


def executor_for(case: str):
    if case == "ray2":
        return executors.RayExecutor(workers=2, threads=1)
    return LocalExecutor(CASES[case][1], threads=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--executors", default="local1,local2,ray2")
    args = parser.parse_args()
    cases = args.executors.split(",")
    units = make_units(args.units, args.epochs)
    print(f"{args.units} units (ERM, 2 x 32 MLP, {args.epochs} epochs each); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    print(f"{'executor':<18}{'start s':>9}{'wall s':>9}{'work s':>9}{'vs in-process':>15}{'overhead/unit ms':>18}")
    walls, records = {}, {}
    with runtime.limited_threads(1):
        for case in cases:
            workers = CASES[case][1]
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                executor = executor_for(case)
                run_units(RunFolder(out, {"bench": "start"}), [Unit(f"nothing{i}", nothing) for i in range(workers)],
                          executor, progress=False)
                startup = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                results = run_units(RunFolder(out, {"bench": case}), units, executor, progress=False)
                wall = time.perf_counter() - start + (startup if case == "ray2" else 0.0)
            if case == "ray2":
                executor.ray.shutdown()
            work = sum(r["seconds"] for r in results.values())
            walls[case] = wall
            records[case] = {"start_s": startup, "wall_s": wall, "work_s": work, "workers": workers,
                             "overhead_per_unit_ms": 1e3 * (wall * workers - work - startup * workers) / len(units)}
            ratio = walls[cases[0]] / wall
            print(f"{CASES[case][0]:<18}{startup:>9.2f}{wall:>9.2f}{work:>9.2f}{ratio:>14.2f}x"
                  f"{records[case]['overhead_per_unit_ms']:>18.1f}", flush=True)
    print(json.dumps({"units": len(units), "epochs": args.epochs, "cases": records,
                      "runtime": runtime.describe()["versions"]}), file=sys.stderr)


if __name__ == "__main__":
    main()
