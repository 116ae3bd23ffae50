"""Wall time of the CIFAR-10 experiment's training loop (``hardtovary cifar10``) per epoch, plain Adam vs AND-mask.

Writes random images in the official on-disk format (:func:`hardtovary.experiments.cifar10.write_random_cifar10`:
the same shapes as CIFAR-10, nothing to learn), then runs :func:`hardtovary.experiments.cifar10.run` for one epoch
per tau -- data loading, the per-example AND-mask step with pooled BatchNorm, evaluation and checkpoints included
-- and prints seconds per epoch, steps per second, the AND-mask / plain ratio, and what the paper's full grids
would take at that speed (Fig. 8/16: 7 taus x 2 label sets x 80 epochs; Fig. 9: 2 trials x 80 epochs), scaled
from ``--n-train`` to the 50,000 training images.

Run: ``python bench/bench_cifar10_epoch.py [--device cuda] [--n-train 4000] [--taus 0,0.2]``. On CPU use a small
``--n-train`` and ``--width`` (the per-example step is slow there).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from hardtovary.experiments import cifar10

FULL_TRAIN = 50_000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument("--taus", default="0,0.2")
    args = parser.parse_args(argv)
    taus = [float(t) for t in args.taus.split(",")]
    print(f"torch {torch.__version__} on {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory() as tmp:
        data = cifar10.write_random_cifar10(Path(tmp) / "data", n_train=args.n_train, n_test=args.n_test)
        # a one-epoch warm-up run (cuDNN autotuning, allocator) on a few batches, not timed
        cifar10.run(Path(tmp) / "warm", data, taus=taus, epochs=1, n_train=4 * args.batch_size, n_test=10,
                    width=args.width, batch_size=args.batch_size, device=args.device, progress=False)
        results = cifar10.run(Path(tmp) / "run", data, taus=taus, epochs=1, width=args.width,
                              batch_size=args.batch_size, device=args.device, progress=False)
    steps = args.n_train // args.batch_size
    print(f"FastResNet(width={args.width}), batch {args.batch_size} (= environments), {args.n_train} random "
          f"images, 1 epoch = {steps} steps + evaluation")
    print(f"{'trial':28s} {'s/epoch':>9s} {'steps/s':>9s} {'x plain':>8s} {'s/epoch at 50k':>15s}")
    plain = None
    per_full_epoch = {}
    for name, trial in results["trials"].items():
        seconds = trial["seconds"]
        full = seconds * FULL_TRAIN / args.n_train
        per_full_epoch[trial["tau"]] = full
        if trial["tau"] == 0:
            plain = seconds
        ratio = f"{seconds / plain:8.1f}" if plain else f"{'-':>8s}"
        print(f"{name:28s} {seconds:9.2f} {steps / seconds:9.1f} {ratio} {full:15.0f}")
    masked = [s for tau, s in per_full_epoch.items() if tau > 0]
    if masked and 0.0 in per_full_epoch:
        fig8 = 2 * 80 * (per_full_epoch[0.0] + 6 * max(masked))
        fig9 = 80 * (per_full_epoch[0.0] + max(masked))
        print(f"projected at this speed: Fig. 8/16 grid (7 taus x 2 label sets x 80 epochs) {fig8 / 3600:.1f} h, "
              f"Fig. 9 (2 trials x 80 epochs) {fig9 / 3600:.1f} h")


if __name__ == "__main__":
    main()
