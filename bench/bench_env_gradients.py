"""Per-environment gradients of the reference MLP against one pooled gradient, measured side by side.

The synthetic MLP of the paper (K = 16 environments of 256 examples, 18 inputs, 3 hidden layers of 256, one logit,
BCE with logits): one call of ``env_gradients`` (the K per-environment gradient stacks) should cost about one
forward and backward pass of the pooled batch (``pooled_gradient``), not K of them. Target: ratio <= 1.5.

Run: ``python bench/bench_env_gradients.py [--repeats N]``. Prints best-of-N times and their ratios; BatchNorm
rows are for information (pooled BatchNorm couples the environments and costs O(K) more by construction).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hardtovary.reference import mlp


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(K: int, B: int, hidden, batch_norm: bool, semantics: str, repeats: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    spec = mlp.MLPSpec(in_features=18, hidden=tuple(hidden), batch_norm=batch_norm)
    params = mlp.init_params(spec, rng)
    X = rng.standard_normal((K, B, 18))
    Y = rng.integers(0, 2, (K, B)).astype(float)
    t_env = best_time(lambda: mlp.env_gradients(spec, params, X, Y, loss="bce_with_logits",
                                                semantics=semantics), repeats)
    t_pooled = best_time(lambda: mlp.pooled_gradient(spec, params, X, Y, loss="bce_with_logits",
                                                     semantics=semantics), repeats)
    return t_env, t_pooled


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions (best is reported)")
    args = parser.parse_args(argv)
    rows = [("no BatchNorm", 16, 256, False, "pooled"),
            ("BatchNorm, per_env", 16, 256, True, "per_env"),
            ("BatchNorm, pooled (K=4)", 4, 256, True, "pooled")]
    print(f"{'case':<26}{'K':>4}{'B':>5}{'env_gradients ms':>18}{'pooled_gradient ms':>20}{'ratio':>8}")
    for name, K, B, bn, semantics in rows:
        t_env, t_pooled = measure(K, B, (256, 256, 256), bn, semantics, args.repeats)
        print(f"{name:<26}{K:>4}{B:>5}{1e3 * t_env:>18.1f}{1e3 * t_pooled:>20.1f}{t_env / t_pooled:>8.2f}")
    print("target: ratio <= 1.5 without BatchNorm (K = 16, B = 256)")


if __name__ == "__main__":
    main()
