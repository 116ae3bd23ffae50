"""The distributed AND-mask on this CPU: bytes per parameter per step against plain DDP, and 2 ranks against 1.

(a) Bytes. Every collective the step makes is counted as it is called (``torch.distributed.all_reduce`` and
    ``all_gather`` wrapped on each rank; DDP buckets through a counting comm hook around DDP's own
    ``allreduce_hook``), summed over one step and divided by the number of parameters P: the size of what each rank
    hands to its collectives (a ring all-reduce moves about twice that over the wire, for every row alike). Rows:
    plain DDP, the packed all_reduce of each rule, the exact mode (all_gather of the K = 16 stacks), and the DDP
    AND-mask hook.
(b) Time. One AND-mask step (per-environment gradients of K = 16 environments of B examples, the rule, Adam) of
    the synthetic MLP (paper App. B.3.1: 3 x 256, 10 inputs): on 1 process with the single-process
    ``accel.torch.optim.and_mask_backward`` (all 16 environments) against 2 gloo ranks with
    ``accel.torch.distributed.and_mask_backward`` (8 each; packed and exact), one thread per process, the phases
    alternated; best of ``--repeats``. Ideal is 2x on 2 free cores.

Run: ``OMP_NUM_THREADS=1 python bench/bench_distributed.py [--repeats 10] [--batch 128]``.
"""

import argparse
import gc
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_time  # noqa: E402

from hardtovary.accel.torch import distributed as D  # noqa: E402
from hardtovary.accel.torch import optim as O  # noqa: E402
from hardtovary.accel.torch.models import mlp_from_spec  # noqa: E402
from hardtovary.reference.mlp import MLPSpec  # noqa: E402

K, WORLD = 16, 2
SPEC = MLPSpec(in_features=10, hidden=(256, 256, 256), out_features=1)
RULES = [("mean", {"rule": "mean"}), ("and_mask", {"rule": "and_mask", "tau": 1.0}),
         ("geometric_mean paper", {"rule": "geometric_mean"}),
         ("geometric_mean original", {"rule": "geometric_mean", "flavour": "original", "tau": 0.5})]


def bce(z, y):
    return F.binary_cross_entropy_with_logits(z.squeeze(-1), y)


class Counter:
    """Bytes each rank hands to all_reduce / all_gather, and gets back, while counting is on (the functions are
    wrapped in place on the torch.distributed module, where the code under test and DDP's allreduce_hook look them
    up)."""

    def __init__(self):
        self.sent = self.received = 0
        self.on = False
        all_reduce, all_gather = dist.all_reduce, dist.all_gather

        def counted_all_reduce(tensor, *args, **kwargs):
            if self.on:
                self.sent += tensor.nbytes
                self.received += tensor.nbytes
            return all_reduce(tensor, *args, **kwargs)

        def counted_all_gather(tensor_list, tensor, *args, **kwargs):
            if self.on:
                self.sent += tensor.nbytes
                self.received += sum(t.nbytes for t in tensor_list)
            return all_gather(tensor_list, tensor, *args, **kwargs)

        dist.all_reduce, dist.all_gather = counted_all_reduce, counted_all_gather

    def measure(self, fn) -> tuple[int, int]:
        """(bytes sent, bytes received) by this rank's collectives during ``fn()``."""
        self.sent = self.received = 0
        self.on = True
        fn()
        self.on = False
        return self.sent, self.received


def data(n_envs, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_envs, batch, SPEC.in_features, generator=g),
            torch.randint(0, 2, (n_envs, batch), generator=g).float())


def model_and_optimizer():
    torch.manual_seed(0)
    model = mlp_from_spec(SPEC)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def ddp_bytes(counter, hook, state, batch):
    """Bytes per step of a DDP model (one environment per rank) whose buckets go through ``hook``: the second step,
    after DDP rebuilt its buckets."""
    model = nn.parallel.DistributedDataParallel(mlp_from_spec(SPEC))
    model.register_comm_hook(state, hook)
    X, Y = data(1, batch, seed=dist.get_rank())
    counter.measure(lambda: bce(model(X[0]), Y[0]).backward())
    measured = counter.measure(lambda: bce(model(X[0]), Y[0]).backward())
    # a DDP model with a Python comm hook still alive at destroy_process_group() can abort the process at exit
    # (docs/distributed.md): free it now
    model = None
    gc.collect()
    return measured


def worker(rank, port, args, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    counter = Counter()
    model, opt = model_and_optimizer()
    P = sum(p.numel() for p in model.parameters())
    X, Y = data(K, args.batch)
    mine = D.shard(K, rank, WORLD)
    rows = {"P": P}

    def step(**options):
        return lambda: D.and_mask_backward(model, X[mine], Y[mine], bce, **options)

    rows["plain DDP (allreduce_hook)"] = ddp_bytes(counter, default_hooks.allreduce_hook, dist.group.WORLD,
                                                   args.batch)
    for name, options in RULES:
        rows[f"packed {name}"] = counter.measure(step(**options))
    rows[f"exact and_mask (K = {K})"] = counter.measure(step(rule="and_mask", exact=True))
    rows[f"exact sand_mask (K = {K})"] = counter.measure(step(rule="sand_mask", tau=0.5))
    for name, options in RULES[1:3]:
        rows[f"DDP hook {name}"] = ddp_bytes(counter, D.and_mask_hook, D.AndMaskHookState.create(**options),
                                             args.batch)

    def single():
        O.and_mask_backward(model, X, Y, bce, rule="and_mask", tau=1.0, semantics="per_env")
        opt.step()

    def sharded(exact):
        D.and_mask_backward(model, X[mine], Y[mine], bce, rule="and_mask", tau=1.0, exact=exact)
        opt.step()

    packed = torch.zeros(2 * P + 3)  # the AND-mask's buffer: sum g, S, and the tail

    def phases():
        yield "1 process, K = 16", single, rank == 0
        yield "2 ranks packed, 8 + 8", lambda: sharded(False), True
        yield "2 ranks exact, 8 + 8", lambda: sharded(True), True
        yield "  its all_reduce alone (8 B/param)", lambda: dist.all_reduce(packed), True

    times = {name: float("inf") for name, _, _ in phases()}
    for _ in range(args.repeats):  # alternate the phases: the machine's load falls on all of them alike
        for name, fn, runs_here in phases():
            dist.barrier()
            if runs_here:
                times[name] = min(times[name], best_time(fn, 1))
    if rank == 0:
        out.put((rows, times))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128, help="examples per environment")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.SimpleQueue()
    mp.start_processes(worker, args=(port, args, out), nprocs=WORLD, start_method="spawn")
    rows, times = out.get()
    P = rows.pop("P")
    print(f"(a) bytes per parameter per step in each rank's collectives, MLP {SPEC.in_features}-256-256-256-1 "
          f"(P = {P}), {WORLD} ranks, float32 gradients")
    print(f"  {'':<32}{'sent':>8}{'received':>10}  received / plain DDP's")
    ddp = rows["plain DDP (allreduce_hook)"][1]
    for name, (sent, received) in rows.items():
        print(f"  {name:<32}{sent / P:>8.3f}{received / P:>10.3f}  {received / ddp:>5.2f}x")
    print(f"(b) one AND-mask step (tau 1, Adam), K = {K} environments x B = {args.batch}, one thread per process, "
          f"best of {args.repeats}")
    base = times["1 process, K = 16"]
    for name, value in times.items():
        ratio = f"  speed-up {base / value:>4.2f}x" if not name.startswith(" ") else ""
        print(f"  {name:<36}{value * 1e3:>8.1f} ms{ratio}")


if __name__ == "__main__":
    main()
