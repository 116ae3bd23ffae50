"""Benchmark: a sweep of R runs (hardtovary.accel.sweep.train_sweep) against R sequential reference runs.

Not a test. Both are timed side by side in this process on the same configurations (mixed methods, taus, learning
rates, optimizers, seeds; one architecture), best of ``--repeats``; the sweep's results are checked against the
reference ones before timing is reported. Prints time per run of each and their ratio. On a machine without a GPU
the sweep runs on NumPy (``--backend numpy``); on a GPU pass ``--backend cupy`` (the reference always runs on the
CPU).

    python bench/bench_sweep.py                       # R = 64, 4 environments x 64 examples, 2 x 32 hidden
    python bench/bench_sweep.py --runs 64 --epochs 5 --dtype float32
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import numpy as np

from hardtovary.accel.backend import get_backend
from hardtovary.accel.sweep import train_sweep
from hardtovary.reference import data, training

METHODS = (("mean", 0.0), ("and_mask", 1.0), ("and_mask", 0.5), ("geometric_mean", 1.0), ("sand_mask", 0.5))


def configs(n_runs: int, args) -> list[training.TrainConfig]:
    base = training.TrainConfig(hidden=(args.width,) * args.layers, batch_size=args.batch_size,
                                n_agreement_envs=args.n_envs, epochs=args.epochs,
                                lr_milestones=(args.epochs // 2,) if args.epochs >= 2 else ())
    out = []
    for r in range(n_runs):
        method, tau = METHODS[r % len(METHODS)]
        out.append(dataclasses.replace(
            base, method=method, tau=tau, rescale=bool(r % 2) and method != "mean", seed=r,
            optimizer="adam" if r % 3 else "sgd", lr=(1e-3, 1e-2, 1e-1)[r % 3],
            weight_decay=(0.0, 1e-4)[r % 2], weight_decay_order=("before", "after")[(r // 2) % 2],
            l1=1e-5 if r % 7 == 0 else 0.0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=64)
    p.add_argument("--n-envs", type=int, default=4)
    p.add_argument("--examples-per-env", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--backend", default="numpy")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    task = data.make_spirals_task(data.SpiralsConfig(n_train_envs=args.n_envs, examples_per_env=args.examples_per_env,
                                                     n_test=args.n_test, n_dims=8))
    env = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    cfgs = configs(args.runs, args)
    backend = get_backend(args.backend)

    def sweep():
        out = train_sweep(env, cfgs, backend=backend, dtype=args.dtype)
        if backend.name == "cupy":
            backend.xp.cuda.Device().synchronize()
        return out

    def sequential():
        return [training.train(env, c) for c in cfgs]

    swept, ref = sweep(), sequential()                     # warm-up, and the check
    err = max(float(np.max(np.abs(a - b))) for s, r in zip(swept, ref) for a, b in zip(s.params, r.params))
    hist = max(abs(x[k] - y[k]) for s, r in zip(swept, ref) for x, y in zip(s.history, r.history) for k in x)
    times = {"sweep": [], "reference": []}
    for _ in range(args.repeats):                          # interleaved, so both see the same machine load
        for name, fn in (("sweep", sweep), ("reference", sequential)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    steps = training.steps_per_epoch(args.n_envs, args.examples_per_env, cfgs[0]) * args.epochs
    print(f"machine: {platform.processor() or platform.machine()}, backend {backend.name}, dtype {args.dtype}")
    print(f"R = {args.runs} runs, {args.n_envs} envs x {args.examples_per_env} examples, hidden "
          f"{args.layers} x {args.width}, batch {args.batch_size}/env, {args.epochs} epochs ({steps} steps/run), "
          f"best of {args.repeats}")
    print(f"max |params sweep - reference| = {err:.2e}, max |history difference| = {hist:.2e}")
    for name in ("reference", "sweep"):
        print(f"{name:>9}: {best[name]:8.3f} s total, {1e3 * best[name] / args.runs:8.2f} ms per run")
    print(f"ratio (reference / sweep, time per run): {best['reference'] / best['sweep']:.2f}x")


if __name__ == "__main__":
    main()
