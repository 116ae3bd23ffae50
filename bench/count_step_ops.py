"""How many kernels each variant of the torch AND-mask step launches: the floor of a launch-bound GPU step.

On a GPU the synthetic MLP step (K = 16 environments of 256 examples, 3 x 256, ``bench_torch_env_gradients.py``
(a)) moves little data, so its time is set by the kernels it launches, one after another, each costing the host
its dispatch and the device its launch latency, rather than by arithmetic. This script counts, on the CPU (the
ATen operators a step dispatches are the same on any device), the operators that reach a backend kernel in one step
of each variant, apart from the views that only change metadata, and turns the counts into the launch-bound time
of the GPU:

    time ~ kernels x (cost per kernel)

with the cost per kernel taken from the authors' loop as measured on the H200 on 2026-11-28 (11.9 ms,
``bench/results/nvidia-h200-2026-11-28/torch_env_gradients.txt``). The same measurement's second number, our vmap
engine at 6.3 ms, checks the model before it predicts the others. A step replayed as a CUDA graph
(``compile="reduce-overhead"``) pays the dispatch once for the whole graph, so its floor is the device time of its
kernels, far below this estimate: the `speed` step of ``bench/gpu_session.sh`` measures it.

Counting uses ``torch.utils._python_dispatch.TorchDispatchMode`` (the hook torch's own tools count operators
with; a private module of torch, so a torch upgrade may move it).

Run: ``python bench/count_step_ops.py``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_torch_env_gradients import BASELINE, bce, mlp_problem, mlp_steps, our_step, plain_step  # noqa: E402

#: Operators that only make a new view of existing memory (no kernel on any device).
VIEWS = frozenset({"view", "_unsafe_view", "t", "transpose", "permute", "expand", "as_strided", "unsqueeze",
                   "squeeze", "select", "slice", "detach", "alias", "_reshape_alias", "unbind", "split",
                   "split_with_sizes", "lift_fresh", "unflatten", "view_as", "reshape", "diagonal", "narrow"})
#: The H200 measurements of 2026-11-28 that calibrate and check the model (ms per step).
H200_AUTHORS_MS = 11.9
H200_VMAP_MS = 6.3


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> int:
        return sum(n for name, n in self.counts.items() if name not in VIEWS)

    def views(self) -> int:
        return sum(n for name, n in self.counts.items() if name in VIEWS)


def count(step) -> OperatorCount:
    """The operators of one call of ``step``, after a warm-up call (workspaces, caches)."""
    step()
    with OperatorCount() as counter:
        step()
    return counter


def variants():
    """The steps of ``bench_torch_env_gradients.py`` (a), on the CPU, with the packed rule and the plain step."""
    model, X, Y = mlp_problem(torch.device("cpu"))
    return {
        **mlp_steps(model, X, Y),
        "ours, linear, packed rule (CUDA)": lambda: our_step(model, X, Y, bce, 1.0, pack=True),
        "plain backward (floor)": lambda: plain_step(model, X, Y, bce),
    }


def main() -> int:
    torch.set_num_threads(1)
    counts = {name: count(step) for name, step in variants().items()}
    per_kernel_ms = H200_AUTHORS_MS / counts[BASELINE].kernels()
    print(f"torch {torch.__version__}; one AND-mask step of the synthetic MLP (K = 16 x 256, 3 x 256)")
    print(f"launch-bound model: {per_kernel_ms * 1e3:.1f} us per kernel, from the authors' loop on the H200 "
          f"({H200_AUTHORS_MS} ms, 2026-11-28)")
    print(f"{'variant':34s} {'kernels':>8s} {'views':>6s} {'model ms':>9s} {'x authors':>10s}")
    for name, c in counts.items():
        ms = c.kernels() * per_kernel_ms
        print(f"{name:34s} {c.kernels():8d} {c.views():6d} {ms:9.2f} {H200_AUTHORS_MS / ms:9.1f}x")
    vmap = counts["ours, engine vmap"].kernels() * per_kernel_ms
    print(f"check: the model gives the vmap engine {vmap:.2f} ms; measured on the H200 {H200_VMAP_MS} ms")
    top = counts["ours, engine linear (auto)"].counts.most_common(8)
    print("the linear engine's most frequent operators: " + ", ".join(f"{name} {n}" for name, n in top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
