"""Test accuracy against the number of training environments (paper Fig. 15, App. B.4).

For every number of training environments ``n`` and every method, train ``runs`` runs (seeds ``seed + r``) with
:func:`hardtovary.experiments.baselines.train_baseline` on the spirals task with ``n`` environments, record each
run's **maximum o.o.d. test accuracy over epochs**, and report the best over runs (as the paper: "best of 5 runs")
and the mean over runs. The paper sweeps n in {2, 4, ..., 4096} with 5 runs and finds that "the baseline first
succeeds at 1024 environments", while the AND-mask ("Prod-mask") succeeds with few.

Decisions (the paper leaves these open or the CPU budget forces them):

* Data: environment ``e`` of the ``n``-environment task uses seed ``data_seed + e`` (as everywhere in the
  package); the data are the same for every run, the runs differ in initialisation and batching seed.
* ``total_examples``: when given, each environment holds ``total_examples // n`` examples, so the total amount
  of data is bounded as ``n`` grows; otherwise every environment holds ``examples_per_env``. The per-environment
  batch is ``min(batch_size, examples per environment)``.
* Environments per step: the largest divisor of ``n`` that is ``<= max_agreement_envs`` (default 16); for powers
  of two this is ``min(n, 16)``. ``train_baseline`` needs it to divide ``n``.
* Learning rate drops x0.1 at 1/2 and 3/4 of the epochs (as ``hardtovary baselines``); method presets from
  :data:`baselines.METHOD_PRESETS` (erm: L2 1e-4; and_mask: tau 1, rescaling, L2 1e-4).
* The CPU defaults (:data:`DEFAULT_CONFIG`, :data:`DEFAULT_DATA`) are far smaller than the paper's (a 2 x 64
  MLP, 40 epochs, 256 examples per environment, n up to 64, 3 runs): they show the shape of the experiment, not
  the paper's 1024-environment crossover.

Implementations (``implementation``):

* ``"torch"``: every run is its own unit, trained by ``train_baseline`` (every method of ``hardtovary baselines``);
* ``"accel"``: the runs of one number of environments (every method and seed) are one unit, trained together as one
  batched sweep by :func:`hardtovary.accel.sweep.train_sweep` on an array backend (CuPy on a GPU, NumPy
  otherwise), for the methods of :data:`baselines.REFERENCE_RULES` (erm, and_mask, geometric_mean). Each run is
  the reference loop's run of :func:`baselines.reference_config`: the same network, batches and optimizer as the
  torch run with the same seed, with its initial weights drawn from NumPy's random stream instead of torch's.

Run folder: ``config.json``, one unit per run (``units/envs<n>-<method>-run<r>.json``; with ``"accel"`` one per
number of environments, ``units/envs<n>-batched.json``, holding its runs), written atomically (a rerun with the
same options skips them), ``results.json``, ``table.txt`` and ``env_count.png``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from hardtovary.accel.sweep import DTYPES
from hardtovary.experiments import baselines as _bl
from hardtovary.experiments.errors import UsageError
from hardtovary.experiments.executors import Unit, run_units
from hardtovary.experiments.runfolder import RunFolder, write_atomic
from hardtovary.reference import data as _data
from hardtovary.reference import training as _training

DEFAULT_ENVS = (2, 4, 8, 16, 32, 64)
DEFAULT_METHODS = ("erm", "and_mask")
DEFAULT_RUNS = 3
MAX_AGREEMENT_ENVS = 16
IMPLEMENTATIONS = ("torch", "accel")

#: CPU-sized defaults: 256 examples per environment, a 2 x 128 MLP, batch 64 per environment, 40 epochs.
DEFAULT_DATA = dataclasses.replace(_bl.DEFAULT_DATA, examples_per_env=256)
DEFAULT_CONFIG = dataclasses.replace(_bl.DEFAULT_CONFIG, hidden=(128, 128), batch_size=64, epochs=40, lr=1e-2,
                                     lr_milestones=(20, 30))


def agreement_envs(n_envs: int, max_agreement_envs: int = MAX_AGREEMENT_ENVS) -> int:
    """Environments per step: the largest divisor of ``n_envs`` not above ``max_agreement_envs``."""
    if n_envs < 1 or max_agreement_envs < 1:
        raise ValueError(f"n_envs and max_agreement_envs must be >= 1, got {n_envs}, {max_agreement_envs}")
    return max(k for k in range(1, min(n_envs, max_agreement_envs) + 1) if n_envs % k == 0)


def examples_per_env(n_envs: int, examples: int, total_examples: int | None) -> int:
    """Examples per environment: ``total_examples // n_envs`` when given, else ``examples``; at least 2."""
    value = total_examples // n_envs if total_examples is not None else examples
    if value < 2:
        raise UsageError(f"{n_envs} environments leave {value} examples each (need >= 2): "
                         f"raise --total-examples or lower --envs")
    return value


def unit_name(n_envs: int, method: str, run: int) -> str:
    return f"envs{n_envs:05d}-{method}-run{run}"


def batched_unit_name(n_envs: int) -> str:
    return f"envs{n_envs:05d}-batched"


def _validate(envs, methods, runs, implementation, dtype):
    envs = tuple(int(n) for n in envs)
    if not envs or min(envs) < 1:
        raise UsageError(f"envs must be positive integers, got {list(envs)}")
    if len(set(envs)) != len(envs):
        raise UsageError(f"envs must not repeat, got {list(envs)}")
    if implementation not in IMPLEMENTATIONS:
        raise UsageError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}")
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    methods = tuple(methods)
    allowed = _bl.REFERENCE_RULES if implementation == "accel" else _bl.METHODS
    bad = [m for m in methods if m not in allowed]
    if bad or not methods:
        raise UsageError(f"methods must be some of {list(allowed)} with implementation {implementation}, got "
                         f"{list(methods)}")
    if int(runs) < 1:
        raise UsageError(f"runs must be >= 1, got {runs}")
    return envs, methods, int(runs)


def summarise(run_maxima) -> dict:
    """``best`` (max over runs of each run's max test accuracy, the paper's statistic), ``mean`` and ``runs``."""
    values = [float(v) for v in run_maxima]
    return {"best": max(values), "mean": float(np.mean(values)), "runs": values}


def run_record(n: int, method: str, run: int, seed: int, history: list[dict], seconds: float) -> dict:
    """What is stored of one run: its maximum o.o.d. test accuracy over epochs (NaN when it diverged before its
    first epoch ended), that epoch, the final accuracies, its time and its history."""
    tests = [h["test_acc"] for h in history]
    return {"n_envs": n, "method": method, "run": run, "seed": seed,
            "max_test_acc": max(tests) if tests else float("nan"),
            "best_epoch": int(np.argmax(tests)) + 1 if tests else 0,
            "final_test_acc": tests[-1] if tests else float("nan"),
            "final_train_acc": history[-1]["train_acc"] if history else float("nan"), "seconds": seconds,
            "history": history}


def train_unit(n: int, method: str, run: int, data_config: _data.SpiralsConfig, config: _bl.BaselineConfig, *,
               on_step=None, on_epoch=None) -> dict:
    """One run of ``method`` on the spirals task of ``data_config`` (its ``n`` environments built here, so that the
    unit depends on its arguments only, in whatever process it runs): the unit stored as :func:`unit_name`."""
    start = time.perf_counter()
    history = _bl.train_baseline(method, _data.make_spirals_task(data_config), config, on_step=on_step,
                                 on_epoch=on_epoch)
    return run_record(n, method, run, config.seed, history, time.perf_counter() - start)


def train_batched_unit(n: int, data_config: _data.SpiralsConfig, runs: list[tuple[str, int]], configs: list, *,
                       backend, dtype: str, on_step=None, on_epoch=None) -> dict:
    """The runs ``runs`` (``(method, run)`` pairs) with their reference-loop ``configs`` trained together by
    :func:`hardtovary.accel.sweep.train_sweep` on the spirals task of ``data_config`` (built here): the unit
    stored as :func:`batched_unit_name`, ``{"n_envs", "backend", "dtype", "seconds", "runs": {unit_name: the
    run's record}}``, each run's ``seconds`` its share of the unit's. ``on_step(n)`` is called after every batched
    step with the n runs it advanced; ``on_epoch`` is not used (the runs' epochs interleave)."""
    from hardtovary.accel.backend import get_backend
    from hardtovary.accel.sweep import train_sweep

    array_backend = get_backend(backend)
    task = _data.make_spirals_task(data_config)
    env_data = _training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    start = time.perf_counter()
    outcomes = train_sweep(env_data, configs, backend=array_backend, dtype=dtype, on_step=on_step)
    seconds = time.perf_counter() - start
    records = {}
    for (method, r), config, outcome in zip(runs, configs, outcomes):
        records[unit_name(n, method, r)] = {**run_record(n, method, r, config.seed, outcome.history,
                                                         seconds / len(runs)), "stopped": outcome.stopped}
    return {"n_envs": n, "backend": array_backend.name, "dtype": dtype, "seconds": seconds, "runs": records}


def run(out: Path, *, envs=DEFAULT_ENVS, methods=DEFAULT_METHODS, runs: int = DEFAULT_RUNS,
        data_config: _data.SpiralsConfig = DEFAULT_DATA, base: _bl.BaselineConfig = DEFAULT_CONFIG,
        total_examples: int | None = None, max_agreement_envs: int = MAX_AGREEMENT_ENVS,
        overrides: dict | None = None, implementation: str = "torch", backend=None, dtype: str = DTYPES[0],
        fresh: bool = False, progress: bool = True, executor=None) -> dict:
    """Train every (envs, method, run) unit into the resumable run folder ``out`` and return (and write as
    ``out/results.json``) ``{"config", "envs": {str(n): {method: {"best", "mean", "runs", "examples_per_env",
    "n_agreement_envs"}}}}``. The units (one per run, or with ``implementation="accel"`` one per number of
    environments, on the array ``backend`` in ``dtype``) run on :mod:`~hardtovary.experiments.executors`'s
    ``executor`` (this process when None). ``data_config`` gives everything of the data but the number of
    environments and (with ``total_examples``) the examples per environment; ``base`` the training settings
    before each method's preset, with the run seed ``base.seed + r``."""
    envs, methods, runs = _validate(envs, methods, runs, implementation, dtype)
    if total_examples is not None and total_examples < 1:
        raise UsageError(f"total_examples must be >= 1, got {total_examples}")
    plans = {}
    for n in envs:
        epe = examples_per_env(n, data_config.examples_per_env, total_examples)
        data_n = dataclasses.replace(data_config, n_train_envs=n, examples_per_env=epe)
        K = agreement_envs(n, max_agreement_envs)
        configs = {m: _bl.method_config(dataclasses.replace(base, n_agreement_envs=K,
                                                            batch_size=min(base.batch_size, epe)), m, overrides)
                   for m in methods}
        plans[n] = (data_n, K, configs)
    config = {"experiment": "env_count", "envs": list(envs), "methods": list(methods), "runs": runs,
              "total_examples": total_examples, "max_agreement_envs": max_agreement_envs,
              "implementation": implementation, "data": dataclasses.asdict(data_config),
              "train": {m: _bl.method_config(base, m, overrides).to_dict() for m in methods}}
    if implementation == "accel":
        config["dtype"] = dtype
    folder = RunFolder(out, config, fresh=fresh)
    pairs = [(m, r) for m in methods for r in range(runs)]  # the (method, run) of every environment count
    units = (_batched_units(plans, pairs, base.seed, backend, dtype) if implementation == "accel" else
             [_run_unit(n, m, r, plans[n], base.seed) for n in envs for m, r in pairs])
    finished = run_units(folder, units, executor, what="runs" if implementation == "torch" else "environment counts",
                         progress=progress, where=folder.root)
    stored = ({name: record for unit in finished.values() for name, record in unit["runs"].items()}
              if implementation == "accel" else finished)

    results = {"config": config, "envs": {}}
    for n in envs:
        data_n, K, _ = plans[n]
        results["envs"][str(n)] = {
            m: {**summarise(stored[unit_name(n, m, r)]["max_test_acc"] for r in range(runs)),
                "examples_per_env": data_n.examples_per_env, "n_agreement_envs": K}
            for m in methods}
    folder.write_results(results)
    table = format_table(results)
    write_atomic(Path(out) / "table.txt", lambda f: f.write(table + "\n"))
    return results


def _run_unit(n: int, method: str, r: int, plan, seed: int) -> Unit:
    data_n, _, configs = plan
    cfg = dataclasses.replace(configs[method], seed=seed + r)
    return Unit(unit_name(n, method, r), train_unit, (n, method, r, data_n, cfg),
                steps=cfg.epochs * _bl.steps_per_epoch(data_n, cfg), label=f"{n} envs {method} run {r}",
                shows=("train_acc", "test_acc"))


def _batched_units(plans: dict, runs: list, seed: int, backend, dtype: str) -> list[Unit]:
    """One unit per number of environments: its ``runs`` (each a (method, run) pair) as reference-loop
    configurations, trained together."""
    from hardtovary.accel.backend import get_backend

    on_gpu = get_backend(backend).name == "cupy"  # resolved where the driver runs, as hardtovary sweep does
    units = []
    for n, (data_n, _, configs) in plans.items():
        reference = [_bl.reference_config(m, dataclasses.replace(configs[m], seed=seed + r), n) for m, r in runs]
        steps = sum(c.epochs * _training.steps_per_epoch(n, data_n.examples_per_env, c) for c in reference)
        units.append(Unit(batched_unit_name(n), train_batched_unit, (n, data_n, runs, reference), steps=steps,
                          label=f"{n} envs ({len(runs)} runs)", gpu=on_gpu,
                          options={"backend": backend, "dtype": dtype}))
    return units


def format_table(results: dict) -> str:
    """Rows: number of training environments; columns: per method the best (over runs) and mean max o.o.d. test
    accuracy, as ``best / mean``."""
    methods = results["config"]["methods"]
    runs = results["config"]["runs"]
    lines = [f"max o.o.d. test accuracy over epochs: best / mean of {runs} runs",
             f"{'envs':>6}{'ex/env':>8}{'K':>4}" + "".join(f"{m:>18}" for m in methods)]
    for n, row in results["envs"].items():
        first = row[methods[0]]
        lines.append(f"{int(n):>6}{first['examples_per_env']:>8}{first['n_agreement_envs']:>4}"
                     + "".join(f"{row[m]['best']:>10.3f} / {row[m]['mean']:.3f}" for m in methods))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path | None:
    """Best-of-runs max test accuracy against the number of environments (log2 x axis), one line per method, with
    the mean as a dashed line (in the manner of Fig. 15). None when matplotlib is not installed."""
    from hardtovary.experiments.plots import matplotlib_pyplot, save_figure

    plt = matplotlib_pyplot()
    if plt is None:
        return None
    envs = [int(n) for n in results["envs"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, m in enumerate(results["config"]["methods"]):
        color = f"C{i}"
        ax.plot(envs, [results["envs"][str(n)][m]["best"] for n in envs], "o-", color=color, label=f"{m} (best)")
        ax.plot(envs, [results["envs"][str(n)][m]["mean"] for n in envs], "--", color=color, alpha=0.6,
                label=f"{m} (mean)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(envs, [str(n) for n in envs])
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0.4, 1.02)
    ax.set_xlabel("number of training environments")
    ax.set_ylabel("max test accuracy (o.o.d.)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
