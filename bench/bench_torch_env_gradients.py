"""The AND-mask step in torch: the authors' per-environment loop against accel/torch, measured side by side.

(a) Synthetic MLP (K = 16 environments of 256 examples, 18 inputs, 3 hidden layers of 256, BCE with logits):
    authors' pattern = one forward over the stacked batch, then one ``torch.autograd.grad(env_loss, params,
    retain_graph=True)`` per environment, then the AND-mask (float mask of ``|mean sign| >= tau``) and the masked
    mean; ours = ``env_gradients`` (vmap over the environment axis; pooled == per_env without BatchNorm) +
    ``rules.aggregate``. Target: ratio >= 10 on CPU.
(b) FastResNet, batch of 80 CIFAR-sized images, every example its own environment, pooled BatchNorm statistics
    (the authors' CIFAR-10 setting): the same loop pattern vs ``example_gradients`` with each exact pooled engine
    (``loop``, ``batched``). On CPU with few repeats (slow); on the GPU as well when ``torch.cuda.is_available()``.

Run: ``python bench/bench_torch_env_gradients.py [--repeats 5] [--resnet-repeats 1] [--resnet-width 1.0]
[--skip-resnet] [--threads N] [--devices cpu,cuda]``. Prints best-of-N times (ms) and the ratio authors / ours.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from hardtovary.accel.torch import env_gradients as EG
from hardtovary.accel.torch import rules as R
from hardtovary.accel.torch.models import FastResNet, mlp_from_spec
from hardtovary.reference.mlp import MLPSpec


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


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


def our_step(model, X, Y, loss_fn, tau, **options):
    out = EG.env_gradients(model, X, Y, loss_fn, **options)
    values, _ = R.aggregate(out.grads, rule="and_mask", tau=tau)
    for p, v in zip(model.parameters(), values):
        p.grad = v


def bench_mlp(device, repeats: int):
    torch.manual_seed(0)
    model = mlp_from_spec(MLPSpec(in_features=18, hidden=(256, 256, 256))).to(device)
    X = torch.randn(16, 256, 18, device=device)
    Y = torch.randint(0, 2, (16, 256), device=device).float()

    def bce(z, y):
        return F.binary_cross_entropy_with_logits(z.squeeze(-1), y)

    t_auth = best_time(lambda: authors_step(model, X, Y, bce, 1.0), repeats, device)
    t_ours = best_time(lambda: our_step(model, X, Y, bce, 1.0), repeats, device)
    print(f"(a) MLP K=16 B=256 [{device}]: authors {t_auth * 1e3:8.1f} ms   ours {t_ours * 1e3:8.1f} ms   "
          f"ratio {t_auth / t_ours:5.1f}x")


def bench_resnet(device, repeats: int, width: float):
    torch.manual_seed(0)
    net = FastResNet(width=width).to(device)
    X = torch.randn(80, 3, 32, 32, device=device)
    Y = torch.randint(0, 10, (80,), device=device)
    Xe, Ye = X[:, None], Y[:, None]
    t_auth = best_time(lambda: authors_step(net, Xe, Ye, F.cross_entropy, 1.0), repeats, device)
    line = f"(b) FastResNet(width={width}) N=80 per-example pooled [{device}]: authors {t_auth * 1e3:9.1f} ms"
    for method in ("loop", "batched"):
        t = best_time(lambda method=method: our_step(net, Xe, Ye, F.cross_entropy, 1.0, pooled_method=method),
                      repeats, device)
        line += f"   ours[{method}] {t * 1e3:9.1f} ms ({t_auth / t:4.2f}x)"
    print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resnet-repeats", type=int, default=1)
    parser.add_argument("--resnet-width", type=float, default=1.0)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--devices", default="cpu,cuda",
                        help="comma-separated torch devices to time on (cuda is skipped where unavailable)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    devices = [torch.device(d) for d in args.devices.split(",")
               if d.strip() and (not d.startswith("cuda") or torch.cuda.is_available())]
    for device in devices:
        bench_mlp(device, args.repeats)
        if not args.skip_resnet:
            bench_resnet(device, args.resnet_repeats if device.type == "cpu" else max(args.repeats, 3),
                         args.resnet_width)


if __name__ == "__main__":
    main()
