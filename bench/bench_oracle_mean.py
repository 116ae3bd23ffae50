"""The oracle's mean over environments (exact in sign) against NumPy's plain mean, and its share of a training step.

``reference.rules.mean_gradient`` sums in float64, bounds the rounding error, and recomputes exactly the components
whose sign the float sum cannot prove (reference/rules.py, "The mean over environments"). Printed side by side,
best of N, in the same run (the machine is shared and noisy; only the ratios mean something):

1. a stack ``G[K, P]`` of Gaussian float64 gradients: ``mean_gradient(G)`` (which also validates G: a finiteness
   check and a float64 copy) against ``G.mean(axis=0)`` alone and with the same validation done in NumPy;
2. one step of the reference training loop with the Quick start's model (3 x 256 MLP, K = 16 environments,
   batch 128 per environment): ``aggregate(rule="mean")`` on the step's gradient stacks (validation included),
   the plain NumPy mean of the same stacks, and ``mlp.env_gradients`` (the forward and backward passes that
   produce them).

Run: ``OMP_NUM_THREADS=1 python bench/bench_oracle_mean.py [--K 16] [--P 70000] [--repeats 20]``.
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import best_time

from hardtovary.experiments import synthetic
from hardtovary.reference import data, mlp, rules, training


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--K", type=int, default=16)
    parser.add_argument("--P", type=int, default=70000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    G = np.random.default_rng(0).standard_normal((args.K, args.P))
    plain = best_time(lambda: G.mean(axis=0), args.repeats)
    validated = best_time(lambda: bool(np.isfinite(G).all()) and G.astype(np.float64).mean(axis=0), args.repeats)
    oracle = best_time(lambda: rules.mean_gradient(G), args.repeats)
    print(f"stack [{args.K}, {args.P}] float64, best of {args.repeats}")
    print(f"  G.mean(axis=0)                              {plain * 1e3:8.3f} ms   1.00")
    print(f"  isfinite, float64 copy, G.mean(axis=0)      {validated * 1e3:8.3f} ms   {validated / plain:.2f}")
    print(f"  rules.mean_gradient                         {oracle * 1e3:8.3f} ms   {oracle / plain:.2f}")

    config = synthetic.method_config(synthetic.DEFAULT_TRAIN, "mean")
    task = data.make_spirals_task(synthetic.DEFAULT_DATA)
    env = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    rng = np.random.default_rng(0)
    spec = training.model_spec(env, config)
    params = mlp.init_params(spec, rng)
    group, rows = next(iter(training.epoch_batches(*task.X_train.shape[:2], config, rng)))
    X, y = env.X_train[group[:, None], rows], env.y_train[group[:, None], rows]

    def step():
        return mlp.env_gradients(spec, params, X, y, loss=config.loss, semantics=config.bn_semantics)

    stacks = step().grads
    forward_backward = best_time(step, args.repeats)
    aggregate = best_time(lambda: rules.aggregate(stacks, rule="mean"), args.repeats)
    numpy_mean = best_time(lambda: [G.mean(axis=0) for G in stacks], args.repeats)
    n = sum(G[0].size for G in stacks)
    print(f"training step, {len(stacks)} stacks, K = {stacks[0].shape[0]}, {n} parameters, best of {args.repeats}")
    print(f"  mlp.env_gradients                 {forward_backward * 1e3:8.3f} ms")
    print(f"  NumPy mean of the stacks          {numpy_mean * 1e3:8.3f} ms   {numpy_mean / forward_backward:6.1%}")
    print(f"  aggregate(rule='mean') (oracle)   {aggregate * 1e3:8.3f} ms   {aggregate / forward_backward:6.1%}")


if __name__ == "__main__":
    main()
