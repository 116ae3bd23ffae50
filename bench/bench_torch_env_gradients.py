"""The AND-mask step in torch: the authors' per-environment loop against accel/torch, measured side by side.

(a) Synthetic MLP (K = 16 environments of 256 examples, 18 inputs, 3 hidden layers of 256, BCE with logits).
    Baseline, the authors' loop: one forward over the stacked batch, then one ``torch.autograd.grad(env_loss,
    params, retain_graph=True)`` per environment, then the AND-mask (float mask of ``|mean sign| >= tau``) and the
    masked mean. Ours: ``env_gradients`` + ``rules.aggregate`` with each engine (``vmap``; ``linear``, what
    ``engine="auto"`` picks for this model; ``linear`` into preallocated ``out`` stacks; ``linear`` under each
    ``torch.compile`` mode asked, whose first call, the compile, is timed apart). ``plain backward`` is one pooled
    forward and backward of the mean loss, the floor of any exact engine here. Every variant's ``.grad`` is checked
    against the baseline's before it is timed (a mismatch is printed, not raised). The variants alternate within
    each repeat and the best time of each is kept (the machine is shared). Target: ours / authors >= 10 on the CPU
    and on a GPU.
(b) FastResNet, batch of 80 CIFAR-sized images, every example its own environment, pooled BatchNorm statistics
    (the authors' CIFAR-10 setting): the same loop pattern vs ``example_gradients`` with each exact pooled engine
    (``loop``, ``batched``). On CPU with few repeats (slow); on the GPU as well when ``torch.cuda.is_available()``.

Run: ``python bench/bench_torch_env_gradients.py [--repeats 20] [--threads 1,2] [--compile MODES]
[--cuda-compile reduce-overhead] [--resnet-repeats 1] [--resnet-width 1.0] [--skip-resnet] [--devices cpu,cuda]``.
Prints best-of-N wall times (ms) and, on the CPU, process CPU times, each with the ratio authors / variant, the
load average, and a closing summary with the ratios of (a) on every device and thread count of the run.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F

from hardtovary.accel.torch import env_gradients as EG
from hardtovary.accel.torch import rules as R
from hardtovary.accel.torch.models import FastResNet, mlp_from_spec
from hardtovary.reference.mlp import MLPSpec

BASELINE = "authors' loop"

_compiled = set()  # (mode, device type) whose compile this run has timed


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> tuple:
    """(wall, CPU) seconds of ``fn()``; CPU time is the process's, over all its threads."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def best_times(fns: dict, repeats: int, device) -> dict:
    """Best (wall, CPU) times of each of ``fns`` over ``repeats`` rounds (each minimum taken on its own); within a
    round every function runs once, in turn, so that a busy spell of the shared machine hits all of them. On a
    loaded machine the wall time of a long call is more likely to include time the process waited for a core than
    a short call's, which favours the short one; the CPU time counts only the time it ran (at 1 thread the most
    robust measure; with more threads it includes threads that spin waiting for each other)."""
    for fn in fns.values():
        _timed(fn, device)  # warm-up
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = _timed(fn, device)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def authors_step(model, X, Y, env_loss, tau):
    """The authors' pattern (``and_mask_utils.get_grads``, rewritten here, not copied): one forward over the stacked
    environments, one ``autograd.grad(retain_graph=True)`` per environment, a float32 mask of the mean sign."""
    K, B = X.shape[:2]
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(X.reshape(K * B, *X.shape[2:]))
    out = out.view(K, B, -1)
    per_env = [torch.autograd.grad(env_loss(out[e], Y[e]), params, retain_graph=True) for e in range(K)]
    for i, p in enumerate(params):
        G = torch.stack([g[i] for g in per_env])
        mask = (torch.mean(torch.sign(G), dim=0).abs() >= tau).to(torch.float32)
        p.grad = mask * G.mean(dim=0)


def our_step(model, X, Y, loss_fn, tau, pack=None, **options):
    out = EG.env_gradients(model, X, Y, loss_fn, **options)
    values, _ = R.aggregate(out.grads, rule="and_mask", tau=tau, pack=pack)
    for p, v in zip(model.parameters(), values):
        p.grad = v


def plain_step(model, X, Y, loss_fn):
    """One pooled forward and backward of the mean loss: the work every exact per-environment engine repeats."""
    K, B = X.shape[:2]
    model.zero_grad()
    loss_fn(model(X.reshape(K * B, *X.shape[2:])).view(K * B, -1), Y.reshape(K * B)).backward()


def _disagreement(model, fn, expected) -> str | None:
    """None where ``fn()`` leaves the baseline's ``.grad`` in every parameter (float tolerance), else what differs.
    Reported, not raised: on a GPU a reduction order may flip the mask of a component whose sign sum sits at the
    threshold, and one such component must not cost a device session its remaining measurements."""
    fn()
    bad, total, worst = 0, 0, 0.0
    for p, e in zip(model.parameters(), expected):
        close = torch.isclose(p.grad, e, rtol=1e-4, atol=1e-6)
        bad, total = bad + int((~close).sum()), total + close.numel()
        worst = max(worst, float((p.grad - e).abs().max()))
    return None if bad == 0 else f"{bad} of {total} components differ from the baseline's (largest by {worst:.3g})"


def bce(z, y):
    return F.binary_cross_entropy_with_logits(z.squeeze(-1), y)


def mlp_problem(device) -> tuple:
    """(a)'s problem on ``device``: ``(model, X, Y)``, the 3 x 256 MLP and K = 16 environments of 256 examples."""
    torch.manual_seed(0)
    model = mlp_from_spec(MLPSpec(in_features=18, hidden=(256, 256, 256))).to(device)
    X = torch.randn(16, 256, 18, device=device)
    Y = torch.randint(0, 2, (16, 256), device=device).float()
    return model, X, Y


def mlp_steps(model, X, Y) -> dict:
    """The eager AND-mask steps of (a): the authors' loop and each engine of ours, by name."""
    out = [torch.empty(X.shape[0], *p.shape, device=X.device) for p in model.parameters()]
    return {
        BASELINE: lambda: authors_step(model, X, Y, bce, 1.0),
        "ours, engine vmap": lambda: our_step(model, X, Y, bce, 1.0, engine="vmap"),
        "ours, engine linear (auto)": lambda: our_step(model, X, Y, bce, 1.0),
        "ours, linear, preallocated out": lambda: our_step(model, X, Y, bce, 1.0, out=out),
    }


def bench_mlp(device, repeats: int, compile_modes) -> dict:
    """Times (a) on ``device``; returns the ratio authors / variant of each variant of ours."""
    model, X, Y = mlp_problem(device)
    fns = mlp_steps(model, X, Y)
    fns[BASELINE]()
    expected = [p.grad.clone() for p in model.parameters()]
    notes = []
    for mode in compile_modes:
        name = f"ours, linear, compile={mode}"
        fn = fns[name] = (lambda mode=mode: our_step(model, X, Y, bce, 1.0, compile=mode))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            try:
                seconds = _timed(fn, device)[0]
            except Exception as error:  # one failing mode must not end the run: the others are still measured
                notes.append(f"    {name}: FAILED, {type(error).__name__}: {str(error).splitlines()[0]}")
                del fns[name]
                continue
        unavailable = [str(w.message) for w in caught if "unavailable" in str(w.message)]
        if unavailable:
            notes.append(f"    {name}: {unavailable[0]}")
        elif (mode, device.type) not in _compiled:  # at another thread count the compiled engine is reused
            _compiled.add((mode, device.type))
            notes.append(f"    {name}: first call, the compile, {seconds:.1f} s")
    for name, fn in fns.items():
        problem = None if name == BASELINE else _disagreement(model, fn, expected)
        if problem:
            notes.append(f"    {name}: CHECK FAILED, {problem}")
    fns["plain backward (floor)"] = lambda: plain_step(model, X, Y, bce)
    best = best_times(fns, repeats, device)
    cpu = device.type == "cpu"
    threads = f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}" if cpu else ""
    print(f"(a) MLP K=16 B=256 3x256 [{device}{threads}], best of {repeats}, {_load()}")
    print(f"    {'':46s} {'wall ms':>9s} {'ratio':>7s}" + (f" {'CPU ms':>9s} {'ratio':>7s}" if cpu else ""))
    (base_wall, base_cpu) = best[BASELINE]
    for name, (wall, cpu_s) in best.items():
        print(f"    {name:46s} {wall * 1e3:9.2f} {base_wall / wall:6.2f}x"
              + (f" {cpu_s * 1e3:9.2f} {base_cpu / cpu_s:6.2f}x" if cpu else ""))
    for note in notes:
        print(note)
    return {name: (base_wall / wall, base_cpu / cpu_s if cpu else None) for name, (wall, cpu_s) in best.items()
            if name.startswith("ours")}


def bench_resnet(device, repeats: int, width: float):
    torch.manual_seed(0)
    net = FastResNet(width=width).to(device)
    X = torch.randn(80, 3, 32, 32, device=device)
    Y = torch.randint(0, 10, (80,), device=device)
    Xe, Ye = X[:, None], Y[:, None]
    fns = {BASELINE: lambda: authors_step(net, Xe, Ye, F.cross_entropy, 1.0)}
    for method in ("loop", "batched"):
        fns[f"ours[{method}]"] = (lambda method=method: our_step(net, Xe, Ye, F.cross_entropy, 1.0,
                                                                 pooled_method=method))
    best = {name: wall for name, (wall, _) in best_times(fns, repeats, device).items()}
    print(f"(b) FastResNet(width={width}) N=80 per-example pooled [{device}]: "
          + "   ".join(f"{name} {t * 1e3:9.1f} ms ({best[BASELINE] / t:4.2f}x)" for name, t in best.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="rounds of (a); (b) takes --resnet-repeats on CPU")
    parser.add_argument("--resnet-repeats", type=int, default=1)
    parser.add_argument("--resnet-width", type=float, default=1.0)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}",
                        help="comma-separated CPU thread counts (torch.set_num_threads) to time (a) at on the CPU; "
                             "the last one is kept for the rest")
    parser.add_argument("--compile", default="", help="comma-separated torch.compile modes of (a) on the CPU")
    parser.add_argument("--cuda-compile", default="reduce-overhead",
                        help="comma-separated torch.compile modes of (a) on CUDA (reduce-overhead: CUDA graphs)")
    parser.add_argument("--devices", default="cpu,cuda",
                        help="comma-separated torch devices to time on (cuda is skipped where unavailable)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {_load()}")
    requested = [d.strip() for d in args.devices.split(",") if d.strip()]
    devices = [torch.device(d) for d in requested if not d.startswith("cuda") or torch.cuda.is_available()]
    summary = []
    for device in devices:
        modes = [m for m in (args.cuda_compile if device.type == "cuda" else args.compile).split(",") if m.strip()]
        for n in threads if device.type == "cpu" else [None]:
            if n is not None:
                torch.set_num_threads(n)
            ratios = bench_mlp(device, args.repeats, modes)
            where = f"{device}" + (f" {n} thread{'s' if n > 1 else ''}" if n is not None else "")
            summary.append(f"{where}: " + ", ".join(
                f"{name.removeprefix('ours, ')} {wall:.2f}x" + (f" (CPU time {cpu:.2f}x)" if cpu else "")
                for name, (wall, cpu) in ratios.items()))
        if not args.skip_resnet:
            bench_resnet(device, args.resnet_repeats if device.type == "cpu" else max(args.repeats, 3),
                         args.resnet_width)
    summary += [f"{d}: not available here" for d in requested if torch.device(d) not in devices]
    print(f"summary (a), ours against the authors' loop ({_load()}):")
    for line in summary:
        print(f"    {line}")


if __name__ == "__main__":
    main()
