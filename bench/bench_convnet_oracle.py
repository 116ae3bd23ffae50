"""The conv oracle's per-example gradients against torch autograd on the same inputs, measured side by side.

Per-example gradients with pooled BatchNorm statistics (every image its own environment, K = N, B = 1; the CIFAR-10
experiment's semantics, paper §3.2), for the two networks of the paper's image experiments at width 1/8:

1. FastResNet (``convnet.fast_resnet(1/8)``), 32x32 images, batch 8, hard labels (10 classes);
2. the CoinRun ResNet-18 (``convnet.resnet18(1/8)``), 64x64 frames, batch 8, soft targets (15 actions).

The oracle (``reference.convnet.example_gradients``, float64, NumPy) against ``accel.torch.env_gradients.
example_gradients`` on the same network (``models.from_spec`` + ``load_reference_params``), images and targets:
float64 with ``pooled_method="loop"`` (one ``autograd.grad`` per example on the retained graph: torch's CPU loop,
the issue's yardstick), the default ``"auto"`` (which resolves to the loop on a CPU), ``"batched"``
(``is_grads_batched``), and the loop in float32 (torch's usual dtype), for information. Each row prints its best of
N wall times and its ratio to the oracle; the float64 rows also print their largest difference from the oracle
relative to the largest gradient (a timing of a wrong answer means nothing). Target: oracle / loop <= 20.

Run: ``OMP_NUM_THREADS=1 python bench/bench_convnet_oracle.py [--repeats 5] [--batch 8] [--width 0.125]``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from timing import best_time

from hardtovary.accel.torch import env_gradients as EG
from hardtovary.accel.torch import models as M
from hardtovary.reference import convnet


def warm_best(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, torch's lazy initialisation
    return best_time(fn, repeats)


def bench(name: str, spec, hw: int, soft: bool, batch: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    params = convnet.init_params(spec, rng)
    X = rng.standard_normal((batch, spec.in_channels, hw, hw))
    n = spec.num_classes
    Y = rng.dirichlet(np.ones(n), size=batch) if soft else rng.integers(0, n, size=batch)

    ours = convnet.example_gradients(spec, params, X, Y)
    t_oracle = warm_best(lambda: convnet.example_gradients(spec, params, X, Y), repeats)
    n_params = sum(p.size for p in params)
    print(f"{name}: {len(params)} tensors, {n_params} parameters, batch {batch}, {hw}x{hw}, "
          f"{'soft targets' if soft else 'hard labels'}, best of {repeats}")
    print(f"  {'route':<40}{'ms':>10}{'oracle / route':>16}{'max rel diff':>14}")
    print(f"  {'oracle (NumPy, float64)':<40}{t_oracle * 1e3:>10.1f}{1.0:>16.2f}")
    ratio_loop = float("nan")
    for dtype, method in ((torch.float64, "loop"), (torch.float64, "auto"), (torch.float64, "batched"),
                          (torch.float32, "loop")):
        model = M.load_reference_params(M.from_spec(spec, dtype=dtype), params)
        Xt = torch.tensor(X, dtype=dtype)
        Yt = torch.tensor(Y, dtype=dtype) if soft else torch.tensor(Y)

        def run(model=model, Xt=Xt, Yt=Yt, method=method):
            return EG.example_gradients(model, Xt, Yt, F.cross_entropy, pooled_method=method)

        t = warm_best(run, repeats)
        label = f"torch {str(dtype).split('.')[-1]} pooled_method={method!r}"
        diff = ""
        if dtype == torch.float64:
            theirs = run().grads
            scale = max(float(np.abs(g).max()) for g in ours.grads)
            diff = f"{max(float(np.abs(a - b.numpy()).max()) for a, b in zip(ours.grads, theirs)) / scale:>14.1e}"
        print(f"  {label:<40}{t * 1e3:>10.1f}{t_oracle / t:>16.2f}{diff}")
        if dtype == torch.float64 and method == "loop":
            ratio_loop = t_oracle / t
    print(f"  oracle / torch float64 loop = {ratio_loop:.2f} (target <= 20)")
    return ratio_loop


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (best is reported)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=float, default=0.125)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), NumPy {np.__version__}")
    bench(f"FastResNet(width={args.width})", convnet.fast_resnet(args.width), 32, False, args.batch, args.repeats)
    bench(f"CoinRun ResNet-18(width={args.width})", convnet.resnet18(args.width), 64, True, args.batch, args.repeats)


if __name__ == "__main__":
    main()
