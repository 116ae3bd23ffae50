"""Random hyperparameter search on the synthetic memorization task (paper §3.1, App. B.3, Table 1).

``hardtovary sweep`` draws ``budget`` configurations from the search space, trains them as batched sweeps
(:func:`hardtovary.accel.sweep.train_sweep`), ranks them by final o.o.d. test accuracy (the paper's selection:
"the best run was re-run with 50 seeds"), re-runs the best ``top`` distinct configurations (a configuration drawn
twice is re-run once) with ``seeds`` fresh seeds, and
reports mean and standard deviation over those seeds of the final train and o.o.d. test accuracy.

The search space is Table 1 without what the sweep does not train (BatchNorm, dropout): hidden units, hidden
layers, batch size (per environment), optimizer (Adam (0.9, 0.999) or SGD with momentum 0.9), learning rate, and
a regulariser chosen first among {L2, L1, none} then its coefficient (never both), plus the rule: method, its
agreement threshold tau (the paper does not give tau's range) and inverse-sparsity rescaling. The defaults shrink
the architecture and data so that a search finishes in minutes on two CPU cores; ``paper_space()`` is Table 1.

Sampling: one ``numpy.random.default_rng(seed)`` draws every trial's fields in a fixed order, so a search is a pure
function of its options. Trial i trains with seed ``seed + i``; the re-runs of the best configurations use seeds
``RERUN_SEED_OFFSET + seed + s`` (s = 0 .. seeds - 1), disjoint from the search's. The early abort of paper App. B.3
(train acc > 0.97 while test acc < 0.6) applies to the search trials only, not to the re-runs, whose statistics
cover full training.

Run folder: ``config.json`` (every option that changes results), ``units/search-NNN.json`` and
``units/seeds-NNN.json`` (one per batch of runs trained together, written atomically when the batch finishes),
``results.json`` (the table's data) and ``table.txt``. A rerun with the same options skips the finished batches.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hardtovary.accel.sweep import DTYPES
from hardtovary.experiments.errors import UsageError
from hardtovary.experiments.executors import Unit, run_units
from hardtovary.experiments.runfolder import RunFolder, write_atomic
from hardtovary.experiments.stats import mean_std
from hardtovary.reference import data, optim, rules, training

#: Methods the search can draw, and the rule options each one takes.
METHODS = ("and_mask", "mean", "geometric_mean", "sand_mask")
OPTIMIZERS = ("adam", "sgd")
#: Re-run seeds start here (plus the search seed), far from the search trials' seeds.
RERUN_SEED_OFFSET = 1_000_000


@dataclass(frozen=True)
class SearchSpace:
    """The values each hyperparameter is drawn from, uniformly. ``l2`` and ``l1`` are the coefficients of the
    regulariser chosen first, uniformly among {L2, L1, none} (paper Table 1: "never combined"). ``flavour`` is one
    value, not drawn: the geometric mean's flavour; the paper's fixes its tau at 1 (the only threshold the oracle
    accepts for it), the ``"original"`` one draws tau from ``taus`` like the masks."""

    hidden_units: tuple[int, ...] = (32, 64)
    layers: tuple[int, ...] = (2, 3)
    batch_sizes: tuple[int, ...] = (32, 64)
    optimizers: tuple[str, ...] = OPTIMIZERS
    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    l2: tuple[float, ...] = (1e-5, 1e-4, 1e-3)
    l1: tuple[float, ...] = (1e-6, 1e-5, 1e-4)
    taus: tuple[float, ...] = (0.5, 0.75, 1.0)
    rescale: tuple[bool, ...] = (False, True)
    methods: tuple[str, ...] = ("and_mask", "mean")
    flavour: str = "paper"

    def __post_init__(self):
        for name in ("hidden_units", "layers", "batch_sizes", "optimizers", "lrs", "l2", "l1", "taus", "rescale",
                     "methods"):
            values = tuple(getattr(self, name))
            if not values:
                raise ValueError(f"search space {name} must hold at least one value, got none")
            object.__setattr__(self, name, values)
        for name in ("hidden_units", "layers", "batch_sizes"):
            bad = [x for x in getattr(self, name) if not isinstance(x, (int, np.integer)) or x < 1]
            if bad:
                raise ValueError(f"search space {name} must hold positive integers, got {bad}")
        for name, allowed in (("optimizers", OPTIMIZERS), ("methods", METHODS)):
            bad = [x for x in getattr(self, name) if x not in allowed]
            if bad:
                raise ValueError(f"search space {name} must be among {list(allowed)}, got {bad}")
        if any(not (x > 0 and math.isfinite(x)) for x in self.lrs):
            raise ValueError(f"search space lrs must be positive, got {list(self.lrs)}")
        for name in ("l2", "l1"):
            if any(not (x >= 0 and math.isfinite(x)) for x in getattr(self, name)):
                raise ValueError(f"search space {name} must be >= 0, got {list(getattr(self, name))}")
        if any(not 0.0 <= x <= 1.0 for x in self.taus):
            raise ValueError(f"search space taus must lie in [0, 1], got {list(self.taus)}")
        if self.flavour not in rules.FLAVOURS:
            raise ValueError(f"flavour must be one of {list(rules.FLAVOURS)}, got {self.flavour!r}")


@dataclass(frozen=True)
class Architecture:
    """The architecture values a search draws from: hidden units, hidden layers and batch sizes (per
    environment)."""

    hidden_units: tuple[int, ...]
    layers: tuple[int, ...]
    batch_sizes: tuple[int, ...]

    def __post_init__(self):
        for name in ("hidden_units", "layers", "batch_sizes"):
            values = tuple(getattr(self, name))
            if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                                 for v in values):
                raise ValueError(f"{name} must be a non-empty list of positive integers, got {list(values)}")
            object.__setattr__(self, name, tuple(int(v) for v in values))


#: Table 1's architecture values (paper App. B.3), for ``hardtovary sweep`` and ``hardtovary baselines-search``.
PAPER_ARCHITECTURE = Architecture(hidden_units=(256, 512), layers=(3, 5), batch_sizes=(64, 128, 256))


def paper_space(**changes) -> SearchSpace:
    """Table 1 of the paper (App. B.3) for what the sweep trains: :data:`PAPER_ARCHITECTURE` and the default
    optimizer, learning-rate and regulariser values, with ``changes`` applied."""
    return dataclasses.replace(SearchSpace(**dataclasses.asdict(PAPER_ARCHITECTURE)), **changes)


#: Small data so that the default search runs in a few minutes on two CPU cores (paper: 32 x 1280, d_S = 32).
DEFAULT_DATA = data.SpiralsConfig(n_train_envs=4, examples_per_env=512, n_test=1000, n_revolutions=3, n_dims=8,
                                  seed=0)


def sample_trials(space: SearchSpace, budget: int, *, epochs: int, n_agreement_envs: int,
                  seed: int = 0) -> list[training.TrainConfig]:
    """``budget`` configurations drawn from ``space``; trial i has seed ``seed + i``. The learning rate drops x0.1
    at 1/2 and 3/4 of the epochs (paper App. B.3)."""
    rng = np.random.default_rng(seed)
    milestones = optim.paper_milestones(epochs)
    pick = lambda values: values[int(rng.integers(len(values)))]  # noqa: E731
    trials = []
    for i in range(budget):
        method, units, layers = pick(space.methods), pick(space.hidden_units), pick(space.layers)
        batch, optimizer, lr = pick(space.batch_sizes), pick(space.optimizers), pick(space.lrs)
        regulariser = pick(("l2", "l1", "none"))
        l2, l1 = pick(space.l2), pick(space.l1)
        tau, rescale = pick(space.taus), pick(space.rescale)
        if method == "mean":
            tau, rescale = 0.0, False
        elif method == "geometric_mean" and space.flavour == "paper":
            tau = 1.0                                            # the paper's geometric mean needs all K signs
        trials.append(training.TrainConfig(
            method=method, tau=float(tau), rescale=bool(rescale), hidden=(int(units),) * int(layers),
            flavour=space.flavour if method == "geometric_mean" else None,
            optimizer=optimizer, lr=float(lr), momentum=0.9,
            weight_decay=float(l2) if regulariser == "l2" else 0.0, weight_decay_order="before",
            l1=float(l1) if regulariser == "l1" else 0.0, batch_size=int(batch), n_agreement_envs=n_agreement_envs,
            epochs=epochs, lr_milestones=milestones, seed=seed + i))
    return trials


def _batches(configs: list[training.TrainConfig], runs_per_batch: int) -> list[list[int]]:
    """Indices of ``configs`` in batches of at most ``runs_per_batch`` that share an architecture, in a
    deterministic order (groups by first appearance)."""
    from hardtovary.accel.sweep import group_key

    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(group_key(c), []).append(i)
    return [idx[s:s + runs_per_batch] for idx in groups.values() for s in range(0, len(idx), runs_per_batch)]


def _summary(config: training.TrainConfig) -> dict:
    return {"method": config.method, "tau": config.tau, "flavour": config.flavour, "rescale": config.rescale,
            "hidden_units": config.hidden[0], "layers": len(config.hidden), "batch_size": config.batch_size,
            "optimizer": config.optimizer, "lr": config.lr, "l2": config.weight_decay, "l1": config.l1,
            "seed": config.seed}


def train_batch(data_config: data.SpiralsConfig, configs: list, labels: list[dict], *, early_abort: bool, backend,
                dtype: str, on_step=None, on_epoch=None) -> dict:
    """One unit: ``configs`` trained together by :func:`hardtovary.accel.sweep.train_sweep` on the spirals task of
    ``data_config`` (built here, so that the unit depends on its arguments only). Returns ``{"runs": one record per
    config (its label, final metrics, why it stopped and its history), "seconds"}``; ``on_step`` is called once per
    run-epoch."""
    from hardtovary.accel.sweep import train_sweep

    task = data.make_spirals_task(data_config)
    env_data = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    start = time.perf_counter()
    outcomes = train_sweep(env_data, configs, backend=backend, dtype=dtype, early_abort=early_abort,
                           on_epoch=(lambda i, r: on_step()) if on_step is not None else None)
    runs = []
    for config, label, out in zip(configs, labels, outcomes):
        final = out.final if out.history else {}
        runs.append({**label, **_summary(config), "stopped": out.stopped, "epochs_run": len(out.history),
                     "train_acc": final.get("train_acc", math.nan), "test_acc": final.get("test_acc", math.nan),
                     "train_loss": final.get("train_loss", math.nan), "test_loss": final.get("test_loss", math.nan),
                     "history": out.history})
    return {"runs": runs, "seconds": time.perf_counter() - start}


def _train_units(folder: RunFolder, phase: str, data_config, configs: list, labels: list[dict], *,
                 runs_per_batch: int, early_abort: bool, backend, dtype: str, executor, progress: bool) -> list[dict]:
    """Train ``configs`` in batches, each the unit ``<phase>-NNN`` (:func:`train_batch`) on ``executor``;
    finished units are read back, not retrained. Returns one record per config, in order."""
    from hardtovary.accel.backend import get_backend

    batches = _batches(configs, runs_per_batch)
    on_gpu = get_backend(backend).name == "cupy"  # resolved where the driver runs: name cupy for GPU workers
    units = [Unit(f"{phase}-{b:03d}", train_batch, (data_config, [configs[i] for i in idx], [labels[i] for i in idx]),
                  steps=sum(configs[i].epochs for i in idx), label=f"{phase}-{b:03d} ({len(idx)} runs)", gpu=on_gpu,
                  options={"early_abort": early_abort, "backend": backend, "dtype": dtype})
             for b, idx in enumerate(batches)]
    stored = run_units(folder, units, executor, what=f"{phase} batches", progress=progress, where=folder.root)
    records: list[dict | None] = [None] * len(configs)
    for unit, idx in zip(units, batches):
        for i, run in zip(idx, stored[unit.name]["runs"]):
            records[i] = run
    return records


def _rank_key(record: dict):
    """Best first: highest final o.o.d. test accuracy, then highest train accuracy, then trial number."""
    test = record["test_acc"] if record["test_acc"] == record["test_acc"] else -1.0
    train = record["train_acc"] if record["train_acc"] == record["train_acc"] else -1.0
    return (-test, -train, record["trial"])


def _distinct_best(ranked: list[dict], trials: list, top: int) -> list[dict]:
    """The first ``top`` records of ``ranked`` whose hyperparameters (all but the seed) differ from every one chosen
    before: a small search space draws the same configuration more than once, and re-running it again over the
    same seeds would only repeat numbers. Fewer than ``top`` when the search drew fewer distinct ones."""
    chosen, seen = [], set()
    for record in ranked:
        key = tuple(sorted((k, v) for k, v in _summary(trials[record["trial"]]).items() if k != "seed"))
        if key not in seen:
            seen.add(key)
            chosen.append(record)
            if len(chosen) == top:
                break
    return chosen


def run(out: Path, *, space: SearchSpace = SearchSpace(), data_config: data.SpiralsConfig = DEFAULT_DATA,
        budget: int = 32, seeds: int = 3, top: int = 3, epochs: int = 40, seed: int = 0,
        runs_per_batch: int = 32, early_abort: bool = True, dtype: str = DTYPES[0], backend=None,
        fresh: bool = False, progress: bool = True, executor=None) -> dict:
    """Search, re-run the best, and return (and write to ``out/results.json``) the results.

    Returns ``{"config", "search": [one record per trial, best first, without history], "best": [per re-run
    configuration: rank, trial, hyperparameters, the search's test accuracy, train_acc_mean/std and
    test_acc_mean/std over the seeds (sample std, 0 for one seed), n_seeds, stopped counts]}``.
    """
    for name, value, low in (("budget", budget, 1), ("seeds", seeds, 1), ("top", top, 1), ("epochs", epochs, 1),
                             ("runs_per_batch", runs_per_batch, 1), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    if top > budget:
        raise UsageError(f"top must be at most budget ({budget}), got {top}")
    too_big = [b for b in space.batch_sizes if b > data_config.examples_per_env]
    if too_big:
        raise UsageError(f"batch sizes {too_big} exceed the {data_config.examples_per_env} examples per environment")
    n_envs = data_config.n_train_envs
    config = {"experiment": "sweep", "data": dataclasses.asdict(data_config), "space": dataclasses.asdict(space),
              "budget": budget, "seeds": seeds, "top": top, "top_distinct": True, "epochs": epochs, "seed": seed,
              "runs_per_batch": runs_per_batch, "early_abort": early_abort, "dtype": dtype}
    folder = RunFolder(out, config, fresh=fresh)
    trials = sample_trials(space, budget, epochs=epochs, n_agreement_envs=n_envs, seed=seed)
    settings = {"runs_per_batch": runs_per_batch, "backend": backend, "dtype": dtype, "executor": executor,
                "progress": progress}
    search = _train_units(folder, "search", data_config, trials, [{"trial": i} for i in range(budget)],
                          early_abort=early_abort, **settings)
    ranked = sorted(search, key=_rank_key)
    best = _distinct_best(ranked, trials, top)
    reruns, labels = [], []
    for rank, record in enumerate(best):
        for s in range(seeds):
            reruns.append(dataclasses.replace(trials[record["trial"]], seed=RERUN_SEED_OFFSET + seed + s))
            labels.append({"rank": rank + 1, "trial": record["trial"]})
    repeated = _train_units(folder, "seeds", data_config, reruns, labels, early_abort=False, **settings)

    rows = []
    for rank, record in enumerate(best):
        runs = [r for r in repeated if r["rank"] == rank + 1]
        train_mean, train_std = mean_std([r["train_acc"] for r in runs])
        test_mean, test_std = mean_std([r["test_acc"] for r in runs])
        hyper = {k: v for k, v in _summary(trials[record["trial"]]).items() if k != "seed"}
        rows.append({"rank": rank + 1, "trial": record["trial"], **hyper,
                     "search_test_acc": record["test_acc"], "train_acc_mean": train_mean,
                     "train_acc_std": train_std, "test_acc_mean": test_mean, "test_acc_std": test_std,
                     "n_seeds": len(runs), "diverged": sum(r["stopped"] == "diverged" for r in runs)})
    results = {"config": config,
               "search": [{k: v for k, v in r.items() if k != "history"} for r in ranked],
               "best": rows}
    folder.write_results(results)
    write_atomic(folder.root / "table.txt", lambda f: f.write(format_table(results) + "\n"))
    return results


def _coefficient(value: float) -> str:
    return f"{value:.0e}" if value else "-"


def format_table(results: dict) -> str:
    """The best configurations, one row each: hyperparameters and mean ± std over seeds of the final accuracies."""
    n_search = len(results["search"])
    aborted = sum(r["stopped"] == "early_abort" for r in results["search"])
    head = (f"{'rank':>4} {'method':<15}{'tau':>5} {'flavour':<8} {'resc':<5}{'units':>6}{'layers':>7}{'batch':>6}"
            f" {'opt':<5}"
            f"{'lr':>7}{'l2':>8}{'l1':>8}{'search test':>12}{'train acc (mean±std)':>22}"
            f"{'test acc o.o.d. (mean±std)':>28}{'seeds':>6}")
    lines = [f"search: {n_search} trials ({aborted} stopped early, paper App. B.3); best re-run over seeds:", head]
    for r in results["best"]:
        lines.append(
            f"{r['rank']:>4} {r['method']:<15}{r['tau']:>5.2f} {r['flavour'] or '-':<8} "
            f"{('yes' if r['rescale'] else 'no'):<5}"
            f"{r['hidden_units']:>6}{r['layers']:>7}{r['batch_size']:>6} {r['optimizer']:<5}{r['lr']:>7.0e}"
            f"{_coefficient(r['l2']):>8}{_coefficient(r['l1']):>8}{r['search_test_acc']:>12.3f}"
            f"{r['train_acc_mean']:>14.3f} ± {r['train_acc_std']:.3f}"
            f"{r['test_acc_mean']:>20.3f} ± {r['test_acc_std']:.3f}{r['n_seeds']:>6}")
    return "\n".join(lines)
