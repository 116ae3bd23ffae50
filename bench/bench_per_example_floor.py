"""The floor of exact per-example gradients through pooled BatchNorm (the CIFAR-10 setting, paper §3.2), and how
close each engine of ``example_gradients`` comes to it.

With BatchNorm statistics pooled over the batch, every example's loss depends on every example's input, so the
gradient of example i's loss is a backward pass through the whole batch's graph with the cotangent one-hot at i:
B backward passes for a batch of B, whatever the engine. The floor of one per-example step is therefore one forward
pass and B backward passes, ``t_forward + B * t_backward``, each as long as in a plain training step. It is a floor
in work, not in time: a device that a plain step leaves idle can run B backward passes at once in less than B times
as long (the batched engines on a GPU), so an engine below 1.00 of the floor is using the device better than the
plain step does, not skipping work.

Prints, for FastResNet at ``--width`` on a batch of ``--batch`` 32x32 images: the plain step's forward and
backward, the floor, and per engine (``pooled_method`` loop, batched, vjp_vmap) its time, its ratio to the plain
step and to the floor; best of ``--repeats``, the variants alternated.

Run: ``python bench/bench_per_example_floor.py [--device cpu] [--width 0.25] [--batch 80] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from bench_torch_env_gradients import best_times

from hardtovary.accel.torch.env_gradients import POOLED_METHODS, example_gradients
from hardtovary.accel.torch.models import FastResNet

ENGINES = tuple(m for m in POOLED_METHODS if m != "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device to time on")
    parser.add_argument("--width", type=float, default=0.25, help="FastResNet width multiplier (1 is the paper's)")
    parser.add_argument("--batch", type=int, default=80, help="examples per batch, B (80 in the paper's CIFAR-10 runs)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the best is kept")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = FastResNet(width=args.width).to(device).train()
    X = torch.randn(args.batch, 3, 32, 32, device=device)
    Y = torch.randint(0, 10, (args.batch,), device=device)

    def forward():
        return F.cross_entropy(model(X), Y)

    def plain():
        model.zero_grad(set_to_none=True)
        forward().backward()

    def engine(method):
        return lambda: example_gradients(model, X, Y, F.cross_entropy, pooled_method=method)

    cases = {"forward": forward, "plain step": plain, **{m: engine(m) for m in ENGINES}}
    best = {name: wall for name, (wall, _) in best_times(cases, args.repeats, device).items()}
    t_forward, t_plain = best["forward"], best["plain step"]
    t_backward = t_plain - t_forward
    floor = t_forward + args.batch * t_backward
    print(f"FastResNet width {args.width}, batch {args.batch} of 3x32x32, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; best of {args.repeats}")
    print(f"  forward {1e3 * t_forward:.1f} ms, backward {1e3 * t_backward:.1f} ms, plain step "
          f"{1e3 * t_plain:.1f} ms")
    print(f"  floor: forward + {args.batch} backward passes = {1e3 * floor:.1f} ms = "
          f"{floor / t_plain:.1f} x the plain step")
    print(f"  {'engine':<10}{'ms':>10}{'x plain':>10}{'x floor':>10}")
    for method in ENGINES:
        t = best[method]
        print(f"  {method:<10}{1e3 * t:>10.1f}{t / t_plain:>10.1f}{t / floor:>10.2f}")


if __name__ == "__main__":
    main()
