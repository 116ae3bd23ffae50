"""The one prepared script for a GPU machine: check every CuPy path against the NumPy oracle, then time it.

Run on a machine with CuPy and a CUDA device (finishes in well under 5 minutes on one H100/H200)::

    python bench/gpu_check.py                 # checks, then timings; exit 1 on any FAIL, 2 if CuPy is unusable
    python bench/gpu_check.py --numpy-dry-run # the same logic with both sides on NumPy at small sizes (CI, laptops)

1. Checks (one PASS/FAIL line each):
   - rules: every rule x flavour x tau x rescale x dtype (float64/float32/float16), on fresh random inputs with
     exact zeros, sign ties (|S| = tau*K), identical environments (SAND var = 0) and a fully masked tensor:
     ``accel.rules.aggregate`` on the device (fused kernels) vs ``reference.rules.aggregate`` on the host -- masks
     exactly equal, values within the per-dtype tolerance of the conformance suite -- and the kernels vs the xp
     expression on the same device (``use_kernel=False``);
   - non-finite input raises ValueError on the kernel path;
   - quadratic: batched diagonal and SPD inconsistency scores vs ``reference.quadratic`` per problem;
   - sweep: ``accel.sweep.train_sweep`` (float64, five rules/optimizers batched) vs separate reference runs.
2. Timings:
   - each rule kernel at K = 16, P = 50 million float32 against a device-to-device copy of the same stack: bytes
     moved by the kernel (read K*P*4, write the value and the mask), achieved GB/s, copy GB/s (read + write of the
     stack), and the fraction of copy bandwidth (target >= 70%);
   - batched inconsistency scores: problems per second;
   - ``time_sweep()``: ``hardtovary.accel.sweep`` with R = 256 small synthetic runs vs R = 1, and R = 64 runs of the
     paper's size vs R = 1 (runs per second).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from hardtovary.accel import quadratic as accel_quadratic
from hardtovary.accel import rules as accel_rules
from hardtovary.accel.backend import cupy_status, to_numpy
from hardtovary.conformance import tolerances
from hardtovary.reference import quadratic as ref_quadratic
from hardtovary.reference import rules as ref_rules

#: (label, options) for the rule checks; tau values chosen so that ties |S| = tau*K occur at K = 4 and 8.
RULE_CASES = [
    ("mean", dict(rule="mean")),
    ("and_mask tau=0", dict(rule="and_mask", tau=0.0)),
    ("and_mask tau=0.5", dict(rule="and_mask", tau=0.5)),
    ("and_mask tau=1", dict(rule="and_mask", tau=1.0)),
    ("geometric_mean paper", dict(rule="geometric_mean", flavour="paper")),
    ("geometric_mean original tau=1", dict(rule="geometric_mean", flavour="original", tau=1.0)),
    ("geometric_mean original tau=0.5", dict(rule="geometric_mean", flavour="original", tau=0.5)),
    ("sand_mask tau=0.5 k=10", dict(rule="sand_mask", tau=0.5)),
    ("sand_mask tau=0.25 k=3", dict(rule="sand_mask", tau=0.25, k=3.0)),
]
DTYPES = ("float64", "float32", "float16")


class Report:
    def __init__(self):
        self.failed = []
        self.count = 0

    def item(self, name: str, ok: bool, detail: str = "") -> None:
        self.count += 1
        if not ok:
            self.failed.append(name)
        print(f"{'PASS' if ok else 'FAIL'}  {name}{'  ' + detail if detail else ''}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def random_stack(rng, K: int, shape, dtype: str) -> np.ndarray:
    """Gradients with exact zeros, sign ties, identical environments and magnitudes over 6 decades."""
    G = rng.standard_normal((K, *shape)) * np.exp(rng.uniform(-7, 7, (K, *shape)))
    G[rng.random(G.shape) < 0.15] = 0.0
    flat = G.reshape(K, -1)
    P = flat.shape[1]
    if P >= 8:
        # ties: half the environments positive, a quarter negative -> |S| = K/4 at tau = 0.25; K/2 -> |S| = 0
        cols = rng.choice(P, size=max(1, P // 8), replace=False)
        signs = np.ones(K)
        signs[K // 2: K // 2 + K // 4] = -1.0
        flat[:, cols] = np.abs(flat[:, cols]) * signs[:, None] + (flat[:, cols] == 0)
        # identical environments (SAND var = 0)
        same = rng.choice(P, size=max(1, P // 16), replace=False)
        flat[:, same] = flat[0, same]
    return flat.reshape(K, *shape).astype(dtype)


def model_grads(rng, K: int, dtype: str, scale: int = 1) -> list[np.ndarray]:
    shapes = [(7 * scale, 5), (7 * scale,), (3, 4, 5 * scale), (1,), ()]
    grads = [random_stack(rng, K, s, dtype) for s in shapes]
    grads.append(np.zeros((K, 6), dtype=dtype))  # fully masked at tau > 0 (rescaled: exactly 0)
    return grads


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------


def _compare(values, masks, ref_values, ref_masks, grads, options, dtype) -> str:
    """'' when equal (masks exact, values within tolerance), else a description of the first difference."""
    tol = tolerances.for_dtype(dtype)
    K = grads[0].shape[0]
    for i, (v, m, rv, rm, G) in enumerate(zip(values, masks, ref_values, ref_masks, grads)):
        v, m = to_numpy(v), to_numpy(m)
        if v.shape != rv.shape or str(v.dtype) != dtype:
            return f"tensor {i}: shape/dtype {v.shape} {v.dtype}, oracle {rv.shape}, input {dtype}"
        if rm.dtype == bool:
            if m.dtype != bool or not np.array_equal(m, rm):
                return f"tensor {i}: mask differs at {int(np.sum(m != rm))} of {m.size} components"
        else:
            if not np.allclose(m.astype(np.float64), rm, rtol=tol.rtol * 8, atol=1e-6):
                return f"tensor {i}: soft mask max diff {np.max(np.abs(m.astype(float) - rm)):.3g}"
        v64 = v.astype(np.float64)
        if not np.array_equal(v64[rv == 0] if rm.dtype == bool else v64[rm == 0], np.zeros(int(
                np.sum(rv == 0) if rm.dtype == bool else np.sum(rm == 0)))):
            return f"tensor {i}: a component the oracle masks is not exactly 0"
        scale = np.max(np.abs(G.astype(np.float64)), axis=0) if G.size else np.zeros(G.shape[1:])
        if options.get("rescale") and rv.size:
            kept = float(np.sum(rm))
            scale = scale * (rv.size / kept if kept else 0.0)
        ok = np.abs(v64 - rv) <= tol.bound(rv, scale, K)
        if not ok.all():
            j = np.unravel_index(int(np.argmin(ok)), ok.shape) if ok.ndim else ()
            return f"tensor {i}: value {v64[j]!r} vs oracle {rv[j]!r} (K={K})"
    return ""


def check_rules(report: Report, xp, rng, *, use_kernel: bool, scale: int, Ks=(1, 2, 3, 4, 8, 16)) -> None:
    for label, options in RULE_CASES:
        for rescale in (False, True):
            for dtype in DTYPES:
                problems = []
                for K in Ks:
                    host = model_grads(rng, K, dtype, scale)
                    device = [xp.asarray(g) for g in host]
                    opts = dict(options, rescale=rescale)
                    ref_values, ref_masks = ref_rules.aggregate(host, **opts)
                    values, masks = accel_rules.aggregate(device, use_kernel=use_kernel, **opts)
                    problem = _compare(values, masks, ref_values, ref_masks, host, opts, dtype)
                    if not problem and use_kernel:  # the kernel against the xp expression on the same device
                        spec_values, spec_masks = accel_rules.aggregate(device, use_kernel=False, **opts)
                        problem = _compare(values, masks, [to_numpy(v).astype(np.float64) for v in spec_values],
                                           [to_numpy(m) if m.dtype == bool else to_numpy(m).astype(np.float64)
                                            for m in spec_masks], host, opts, dtype)
                        problem = problem and f"kernel vs xp expression: {problem}"
                    if problem:
                        problems.append(f"K={K}: {problem}")
                        break
                report.item(f"rules {label}, rescale={rescale}, {dtype}", not problems, "; ".join(problems))
    # non-finite input is refused on the kernel path too
    for bad in (np.nan, np.inf):
        G = np.ones((3, 5), dtype=np.float32)
        G[1, 2] = bad
        try:
            accel_rules.aggregate([xp.asarray(G)], rule="and_mask", tau=0.5, use_kernel=use_kernel)
            report.item(f"rules refuse {bad} input", False, "no error raised")
        except ValueError as error:
            report.item(f"rules refuse {bad} input", "grads[0][1, 2]" in str(error), str(error)[:80])


def check_quadratic(report: Report, xp, rng) -> None:
    eps = 0.3
    for K, P in ((1, 3), (2, 1), (4, 5), (8, 16)):
        N = 40
        lams = rng.random((N, K, P)) * np.exp(rng.uniform(-3, 3, (N, K, P)))
        lams[rng.random(lams.shape) < 0.1] = 0.0
        lams[: N // 4] = lams[: N // 4, :1]  # equal Hessians: finite scores
        offsets = np.where(rng.random((N, K)) < 0.5, 0.0, rng.standard_normal((N, K)))
        got = to_numpy(accel_quadratic.inconsistency_scores_diagonal(xp.asarray(lams), eps, xp.asarray(offsets)))
        want = np.array([ref_quadratic.inconsistency_score_diagonal(lams[n], eps, offsets[n]).value
                         for n in range(N)])
        report.item(f"quadratic diagonal K={K} P={P}", bool(np.allclose(got, want, rtol=1e-12, atol=0)),
                     f"max rel diff {_rel(got, want):.2g}")
        A = rng.standard_normal((N, K, P, P))
        H = A @ np.swapaxes(A, -1, -2) + 0.05 * np.eye(P)
        got = to_numpy(accel_quadratic.inconsistency_scores(xp.asarray(H), eps))
        want = np.array([ref_quadratic.inconsistency_score(ref_quadratic.QuadraticProblem(H[n]), eps).value
                         for n in range(N)])
        report.item(f"quadratic SPD K={K} P={P}", bool(np.allclose(got, want, rtol=1e-8, atol=0)),
                     f"max rel diff {_rel(got, want):.2g}")
    H = np.stack([np.eye(3), np.diag([1.0, 0.0, 2.0])])[None]
    try:
        accel_quadratic.inconsistency_scores(xp.asarray(H), eps)
        report.item("quadratic refuses a singular Hessian", False, "no error raised")
    except ValueError as error:
        report.item("quadratic refuses a singular Hessian", "reference.quadratic" in str(error))


def check_sweep(report: Report, backend: str) -> None:
    """``accel.sweep.train_sweep`` on ``backend`` in float64 vs ``reference.training.train`` run by run."""
    import dataclasses

    from hardtovary.accel import sweep
    from hardtovary.reference import data, training

    task = data.make_spirals_task(data.SpiralsConfig(n_train_envs=4, examples_per_env=48, n_test=60, n_dims=4))
    env = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    base = training.TrainConfig(hidden=(12, 8), batch_size=8, n_agreement_envs=4, epochs=3, lr_milestones=(2,))
    configs = [dataclasses.replace(base, method=m, tau=t, rescale=r, optimizer=o, seed=s)
               for s, (m, t, r, o) in enumerate([("mean", 0.0, False, "adam"), ("and_mask", 1.0, True, "sgd"),
                                                 ("and_mask", 0.5, False, "adam"),
                                                 ("geometric_mean", 1.0, False, "adam"),
                                                 ("sand_mask", 0.5, True, "adam")])]
    results = sweep.train_sweep(env, configs, backend=backend, dtype="float64")
    for config, result in zip(configs, results):
        want = training.train(env, config)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(result.params, want.params))
        report.item(f"sweep {config.method} tau={config.tau} {config.optimizer} vs reference run",
                    diff <= 1e-8 and result.stopped == "completed", f"max |param diff| {diff:.2g}")


def _rel(got, want) -> float:
    finite = np.isfinite(want)
    if not np.array_equal(np.isfinite(got), finite):
        return np.inf
    if not finite.any():
        return 0.0
    return float(np.max(np.abs(got[finite] - want[finite]) / np.maximum(np.abs(want[finite]), 1e-300)))


# ----------------------------------------------------------------------------------------------------------------
# Timings
# ----------------------------------------------------------------------------------------------------------------


def best_time(xp, fn, repeats: int) -> float:
    """Best wall time of ``fn`` in seconds (CUDA events around each call on CuPy)."""
    fn()  # warm-up (compilation)
    best = np.inf
    for _ in range(repeats):
        if xp is np:
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        else:
            begin, end = xp.cuda.Event(), xp.cuda.Event()
            begin.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, xp.cuda.get_elapsed_time(begin, end) / 1e3)
    return best


def time_rules(xp, K: int, P: int, repeats: int, use_kernel: bool) -> None:
    print(f"\n-- rule kernels: K = {K}, P = {P:,} float32 ({K * P * 4 / 1e9:.2f} GB stack) --")
    G = xp.random.standard_normal((K, P), dtype=np.float32) if xp is not np else \
        np.random.default_rng(0).standard_normal((K, P), dtype=np.float32)
    dst = xp.empty_like(G)

    def copy():
        dst[...] = G

    t_copy = best_time(xp, copy, repeats)
    copy_gbs = 2 * G.nbytes / t_copy / 1e9
    print(f"device copy of the stack: {t_copy * 1e3:.3f} ms, {copy_gbs:.0f} GB/s (read + write)")
    print(f"{'rule':34s} {'ms':>8s} {'GB/s':>8s} {'of copy':>8s}")
    for label, options in RULE_CASES[1:]:
        p = accel_rules.plan(ref_rules.RuleSpec(**options), K)

        def run(p=p):
            accel_rules.stack_rule(G, p, use_kernel=use_kernel)

        t = best_time(xp, run, repeats)
        mask_bytes = 4 if p.entry.soft_mask else 1
        moved = G.nbytes + P * (4 + mask_bytes)
        gbs = moved / t / 1e9
        print(f"{label:34s} {t * 1e3:8.3f} {gbs:8.0f} {gbs / copy_gbs:7.0%}")
    t = best_time(xp, lambda: accel_rules.aggregate([G], rule="and_mask", tau=0.5, rescale=True,
                                                    use_kernel=use_kernel), repeats)
    moved = G.nbytes + P * 5
    print(f"{'aggregate and_mask rescaled (full)':34s} {t * 1e3:8.3f} {moved / t / 1e9:8.0f} "
          f"{moved / t / 1e9 / copy_gbs:7.0%}")
    # Its bound: the kernel's bytes plus the in-place scaling (read and write the value), all at copy bandwidth.
    print(f"  (bound with the scaling pass at copy bandwidth: {moved / (moved + 2 * P * 4):.0%} of copy)")


def time_quadratic(xp, sizes, repeats: int) -> None:
    print("\n-- batched inconsistency scores --")
    rng = np.random.default_rng(1)
    (Nd, Kd, Pd), (Nf, Kf, Pf) = sizes
    lams = xp.asarray(rng.random((Nd, Kd, Pd)))
    t = best_time(xp, lambda: accel_quadratic.inconsistency_scores_diagonal(lams, 0.1), repeats)
    print(f"diagonal N={Nd} K={Kd} P={Pd}: {t * 1e3:.2f} ms, {Nd / t:,.0f} problems/s")
    A = rng.standard_normal((Nf, Kf, Pf, Pf))
    H = xp.asarray(A @ np.swapaxes(A, -1, -2) + 0.1 * np.eye(Pf))
    t = best_time(xp, lambda: accel_quadratic.inconsistency_scores(H, 0.1), repeats)
    print(f"SPD      N={Nf} K={Kf} P={Pf}: {t * 1e3:.2f} ms, {Nf / t:,.0f} problems/s")


def time_sweep(backend: str, settings=((256, (64, 64), 64, (1, 256)), (1024, (256, 256, 256), 128, (1, 64))),
               epochs: int = 1) -> None:
    """R synthetic runs trained at once by hardtovary.accel.sweep vs R = 1 (runs per second), float32, AND-mask.

    ``settings``: (examples per environment, hidden widths, batch size, the Rs) for 16 environments of 18 inputs;
    the second is the paper's synthetic architecture and data size. Only timed, not checked (check_sweep and the
    sweep's tests compare it with reference.training.train).
    """
    print("\n-- sweep --")
    from hardtovary.accel import sweep
    from hardtovary.reference.training import EnvironmentData, TrainConfig

    rng = np.random.default_rng(0)
    for n, hidden, batch, runs in settings:
        E, d = 16, 18
        X = rng.standard_normal((E, n, d))
        y = (rng.random((E, n)) < 0.5).astype(np.float64)
        data = EnvironmentData(X, y, rng.standard_normal((2000, d)), (rng.random(2000) < 0.5).astype(np.float64))
        for R in runs:
            configs = [TrainConfig(method="and_mask", tau=0.5, hidden=hidden, batch_size=batch, n_agreement_envs=16,
                                   epochs=epochs, seed=s) for s in range(R)]
            # warm-up at the same R: CuPy compiles its elementwise kernels per dtype *and* array rank, and the
            # ranks differ between R = 1 (collapsed) and R > 1, and a first call at a new rank compiles for seconds
            sweep.train_sweep(data, configs, backend=backend, dtype="float32")
            start = time.perf_counter()
            sweep.train_sweep(data, configs, backend=backend, dtype="float32")
            t = time.perf_counter() - start
            print(f"16 envs x {n}, hidden {hidden}, batch {batch}, R = {R:4d}: {t:.3f} s, "
                  f"{R / t:,.1f} runs/s ({epochs} epoch(s) each)")


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numpy-dry-run", action="store_true",
                        help="run the checks and timings with both sides on NumPy, at small sizes")
    parser.add_argument("--K", type=int, default=16)
    parser.add_argument("--P", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-timings", action="store_true")
    args = parser.parse_args(argv)

    if args.numpy_dry_run:
        xp, use_kernel, backend = np, False, "numpy"
        P, repeats, scale, Ks = 20_000, 2, 1, (1, 4, 16)
        qsizes = ((200, 4, 8), (20, 4, 8))
        print("NumPy dry run: both sides on NumPy, small sizes (no kernel is exercised)")
    else:
        usable, reason = cupy_status()
        if not usable:
            print(f"CuPy is not usable here: {reason}. Run with --numpy-dry-run to exercise the script's logic.")
            return 2
        import cupy

        xp, use_kernel, backend = cupy, True, "cupy"
        P, repeats, scale, Ks = args.P, args.repeats, 40, (1, 2, 3, 4, 8, 16)
        qsizes = ((100_000, 8, 16), (5_000, 8, 16))
        print(f"{reason}; device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")

    report = Report()
    start = time.perf_counter()
    rng = np.random.default_rng(12345)
    check_rules(report, xp, rng, use_kernel=use_kernel, scale=scale, Ks=Ks)
    check_quadratic(report, xp, rng)
    check_sweep(report, backend)
    print(f"\nchecks: {report.count - len(report.failed)} PASS, {len(report.failed)} FAIL "
          f"({time.perf_counter() - start:.1f} s)")

    if not args.no_timings:
        time_rules(xp, args.K, P, repeats, use_kernel)
        time_quadratic(xp, qsizes, repeats)
        time_sweep(backend, settings=((64, (16,), 16, (1, 8)),) if args.numpy_dry_run else
                   ((256, (64, 64), 64, (1, 256)), (1024, (256, 256, 256), 128, (1, 64))))
    if report.failed:
        print(f"\nFAILED: {', '.join(report.failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
