"""The synthetic memorization task (paper §3.1, App. B.3) with its environments sharded across torch.distributed ranks.

Launch it with torchrun (docs/distributed.md; multi-node with ``--nnodes`` and ``--rdzv-endpoint``)::

    torchrun --standalone --nproc-per-node 2 -m hardtovary.experiments.distributed_synthetic --method and_mask

Without torchrun (no ``RANK`` in the environment) it runs as one rank. Every rank builds the same data and draws the
same batches as the reference loop (:func:`hardtovary.reference.training.epoch_batches`, same seed, the same
initial parameters as :func:`hardtovary.reference.mlp.init_params`, then broadcast from rank 0); of each step's K
environments rank r takes ``shard(K, r, world size)``, and the AND-mask step over all of them is
:func:`hardtovary.accel.torch.distributed.and_mask_backward` (packed statistics, or ``--exact``). So the parameters
do not depend on the number of ranks, up to float summation order (bit for bit with ``--exact`` or K <= 2). Rank 0
evaluates in eval mode and prints the final accuracies; ``--save`` writes them with the parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

from hardtovary.experiments import cmd_synthetic, options, runtime, synthetic
from hardtovary.experiments.errors import UsageError, usage_errors

PROG = "hardtovary.experiments.distributed_synthetic"


def _rank() -> int:
    """This process's rank as torchrun announces it (0 without torchrun), before the process group exists."""
    return int(os.environ.get("RANK", "0"))


class _Parser(options.Parser):
    """One line for a bad option, printed by rank 0 only (every rank parses the same options)."""

    def error(self, message):
        if _rank() == 0:
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    d, t = synthetic.DEFAULT_DATA, synthetic.DEFAULT_TRAIN
    parser = _Parser(prog=PROG)
    options.describe(parser, (
        "Train one MLP on the spirals memorization task (paper §3.1) with each step's environments sharded across "
        "the ranks of torch.distributed (launch with torchrun; without it, one rank), and print the final train and "
        "o.o.d. test accuracy on rank 0."))
    parser.add_argument("--method", choices=tuple(synthetic.METHOD_PRESETS), default="and_mask",
                        help="aggregation rule; 'mean' is averaging (AND-mask with tau = 0)")
    parser.add_argument("--tau", type=options.fraction, default=None,
                        help="agreement threshold (default: the method's preset, as 'hardtovary synthetic')")
    options.add_flavour_option(parser, "--tau")
    parser.add_argument("--exact", action="store_true",
                        help="all-gather the gradient stacks and apply the single-process rule (bit-identical, K "
                             "times the bytes; the SAND-mask always does)")
    options.add_spirals_options(parser, d)
    cmd_synthetic.add_training_options(parser, t, sharded=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (gloo) or cuda (nccl; rank r on GPU LOCAL_RANK)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="parameters' dtype")
    parser.add_argument("--save", default=None, metavar="PATH",
                        help="rank 0 writes the final parameters and accuracies here (torch.save)")
    runtime.add_threads_option(parser)
    # what hardtovary synthetic's configurations() reads and this command fixes: one method, per-environment
    # BatchNorm statistics (the only ones that shard), the reference's settings otherwise
    parser.set_defaults(bn_semantics="per_env", implementation="reference", backend=None)
    return parser


def configurations(args):
    """The data and training configuration of the options, validated as ``hardtovary synthetic`` does."""
    from hardtovary.reference import data, training

    args.methods = args.method
    _, data_config, base, overrides = cmd_synthetic.configurations(args)
    config = synthetic.method_config(base, args.method, overrides)
    task = data.make_spirals_task(data_config)
    training.check_fits(training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test), config)
    if config.batch_norm and config.batch_size < 2:
        raise UsageError("--batch-norm needs --batch-size >= 2 (per-environment batch statistics)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device here")
    return task, config


def _init_process_group(device: str):
    """torchrun's process group (``env://``), or a one-rank group without torchrun."""
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def train(task, config, *, exact: bool, device, dtype):
    """Train on this rank's shards of every step's environments; returns the model and the number of steps."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from hardtovary.accel.torch import distributed as D
    from hardtovary.accel.torch.models import load_reference_params, mlp_from_spec
    from hardtovary.accel.torch.optim import make_optimizer
    from hardtovary.reference import mlp, training
    from hardtovary.reference import optim as reference_optim

    rank, world = dist.get_rank(), dist.get_world_size()
    env_data = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    rng = np.random.default_rng(config.seed)  # the reference loop's stream: initial parameters, then batches
    spec = training.model_spec(env_data, config)
    model = load_reference_params(mlp_from_spec(spec, dtype=dtype, device=device), mlp.init_params(spec, rng))
    D.broadcast_parameters(model)
    opt = make_optimizer(model.parameters(), config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                         weight_decay_order=config.weight_decay_order, momentum=config.momentum)
    X_train = torch.as_tensor(task.X_train, dtype=dtype, device=device)
    y_train = torch.as_tensor(task.y_train, dtype=dtype, device=device)
    n_envs, n_examples = task.X_train.shape[:2]

    def bce(logits, y):
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), y)

    steps = 0
    for epoch in range(config.epochs):
        for group in opt.param_groups:
            group["lr"] = reference_optim.multistep_lr(config.lr, epoch, config.lr_milestones, config.lr_gamma)
        for envs, rows in training.epoch_batches(n_envs, n_examples, config, rng):
            mine = D.shard(len(envs), rank, world)
            e = torch.as_tensor(envs[mine], device=device)[:, None]
            r = torch.as_tensor(rows[mine], device=device)
            D.and_mask_backward(model, X_train[e, r], y_train[e, r], bce, spec=config.rule_spec,
                                rescale=config.rescale, l1=config.l1, semantics="per_env", exact=exact)
            opt.step()
            steps += 1
    return model, steps


def accuracy(model, X, y) -> float:
    """Accuracy of the model in eval mode (BatchNorm: this rank's running statistics) on ``X[N, in]``, ``y[N]``."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(X).squeeze(-1)
    model.train()
    return float(((logits > 0) == (y > 0.5)).to(torch.float64).mean())


def run(args) -> int:
    import torch
    import torch.distributed as dist

    with usage_errors():
        task, config = configurations(args)
    rank, world = _init_process_group(args.device)
    try:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if args.device == "cuda" else "cpu")
        dtype = getattr(torch, args.dtype)
        start = time.perf_counter()
        model, steps = train(task, config, exact=args.exact, device=device, dtype=dtype)
        seconds = time.perf_counter() - start
        if rank == 0:
            flat = torch.as_tensor(task.X_train.reshape(-1, task.X_train.shape[-1]), dtype=dtype, device=device)
            train_acc = accuracy(model, flat, torch.as_tensor(task.y_train.reshape(-1), device=device))
            test_acc = accuracy(model, torch.as_tensor(task.X_test, dtype=dtype, device=device),
                                torch.as_tensor(task.y_test, device=device))
            rule = config.rule_spec
            print(f"{args.method} (tau {rule.tau:g}{', ' + rule.flavour if rule.flavour else ''}) on {world} "
                  f"rank(s), {config.n_agreement_envs} environments per step: train acc {train_acc:.3f}, "
                  f"test acc (o.o.d.) {test_acc:.3f}; {steps} steps in {seconds:.1f} s")
            if args.save:
                torch.save({"params": {name: p.detach().cpu() for name, p in model.named_parameters()},
                            "train_acc": train_acc, "test_acc": test_acc, "world_size": world, "steps": steps,
                            "exact": args.exact, "config": config.to_dict(),
                            "data": dataclasses.asdict(task.config)}, args.save)
    finally:
        dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with runtime.limited_threads(runtime.resolve_threads(args.threads)):
            return run(args)
    except UsageError as exc:
        if _rank() == 0:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
