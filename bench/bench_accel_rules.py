"""accel.rules (NumPy backend) against the oracle, on the CPU, with the bandwidth floor for context.

K = 16 environments x P = 1e6 float32 coordinates (one stack), and a model-like list of tensors of about the
same total size. For each rule (AND-mask, geometric mean, SAND-mask), printed side by side, best of N:

- ``reference.rules.aggregate`` (the oracle: float64, several passes, int64 sign stacks);
- ``accel.rules.aggregate`` on NumPy (float32, cache-sized blocks, one read of the stack from memory);
- the bandwidth floor: ``G.sum(axis=0)`` (one read of the stack) and ``G.copy()`` (a read and a write of it).

Ratios are measured in the same run (the machine is shared and noisy; absolute times are for context only).

Run: ``python bench/bench_accel_rules.py [--K 16] [--P 1000000] [--repeats 5] [--block ELEMENTS]``.
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import best_time

from hardtovary.accel import rules as accel
from hardtovary.reference import rules as reference

CASES = [
    ("and_mask tau=0.5", dict(rule="and_mask", tau=0.5)),
    ("and_mask tau=0.5 rescaled", dict(rule="and_mask", tau=0.5, rescale=True)),
    ("geometric_mean paper", dict(rule="geometric_mean")),
    ("geometric_mean original tau=0.5", dict(rule="geometric_mean", flavour="original", tau=0.5)),
    ("sand_mask tau=0.5", dict(rule="sand_mask", tau=0.5)),
]

#: A small MLP/CNN-like list of parameter shapes, about 1e6 coordinates in all.
MODEL_SHAPES = [(512, 784), (512,), (512, 512), (512,), (256, 512), (256,), (10, 256), (10,), (64, 3, 3, 3),
                (64,), (128, 64, 3, 3), (128,)]


def run(grads, repeats, label):
    nbytes = sum(g.nbytes for g in grads)
    print(f"\n== {label}: {len(grads)} tensor(s), K = {grads[0].shape[0]}, {nbytes / 1e6:.0f} MB float32 ==")
    floor_sum = best_time(lambda: [g.sum(axis=0) for g in grads], repeats)
    floor_copy = best_time(lambda: [g.copy() for g in grads], repeats)
    print(f"bandwidth floor: G.sum(axis=0) {floor_sum * 1e3:8.2f} ms ({nbytes / floor_sum / 1e9:5.1f} GB/s read),"
          f"  G.copy() {floor_copy * 1e3:8.2f} ms")
    print(f"{'rule':36s} {'reference ms':>13s} {'accel ms':>10s} {'ref/accel':>10s} {'accel/sum-floor':>16s}")
    for name, options in CASES:
        t_ref = best_time(lambda options=options: reference.aggregate(grads, **options), max(1, repeats // 2))
        t_acc = best_time(lambda options=options: accel.aggregate(grads, **options), repeats)
        print(f"{name:36s} {t_ref * 1e3:13.1f} {t_acc * 1e3:10.1f} {t_ref / t_acc:9.1f}x {t_acc / floor_sum:15.1f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--K", type=int, default=16)
    parser.add_argument("--P", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block", type=int, default=None, help="override accel.rules.NUMPY_BLOCK_ELEMENTS")
    args = parser.parse_args(argv)
    if args.block:
        accel.NUMPY_BLOCK_ELEMENTS = args.block
    print(f"numpy {np.__version__}; accel block = {accel.NUMPY_BLOCK_ELEMENTS} elements")
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((args.K, args.P), dtype=np.float32)
    stack[rng.random(stack.shape) < 0.05] = 0.0
    run([stack], args.repeats, f"one stack [{args.K}, {args.P}]")
    model = [rng.standard_normal((args.K, *shape), dtype=np.float32) for shape in MODEL_SHAPES]
    run(model, args.repeats, "model-like list")


if __name__ == "__main__":
    main()
