"""Random hyperparameter search of the synthetic-task baselines (paper §3.1, App. B.3).

``hardtovary baselines-search``: for each method, draw ``budget`` configurations from that method's space, train
them with :func:`hardtovary.experiments.baselines.train_baseline` with the paper's early abort (train acc > 0.97
while test acc < 0.6), rank them by final o.o.d. test accuracy (ties: train accuracy, then trial number), re-run
the best one with ``seeds`` fresh seeds (no early abort) and report mean ± std (sample std, 0 for one seed) over
those seeds of the final train and o.o.d. test accuracy.

Spaces (each value drawn uniformly, :func:`sample_trials`):

``erm``  (Table 1)
    hidden units, hidden layers, batch size, optimizer, learning rate, batch norm, dropout, and a regulariser
    drawn first among {L2, L1, none}, then its coefficient (never both).
``dann``  (Table 1)
    as ``erm`` without batch norm and dropout, and without hidden layers: DANN's three nets are fixed 2-layer
    MLPs (paper App. B.3), only their width is drawn. The gradient-reversal coefficient stays 1 (not searched).
``and_mask`` / ``geometric_mean``  (Table 1, "the AND-mask used the same ranges")
    as ``erm`` without batch norm and dropout (the paper's best had neither; per-environment gradients run under
    vmap, which does not support dropout), plus tau and rescaling on/off. [ASSUMPTION] tau in {0.5, 0.75, 1.0}:
    the paper does not give tau's range. ``geometric_mean`` in the paper's flavour (the default) uses tau = 1, the
    only threshold the oracle accepts for it; in the ``"original"`` flavour it draws tau like ``and_mask``.
``irm``  (Table 2 only)
    hidden units, hidden layers, batch size, optimizer, batch norm, penalty weight {10, 100, 1000}, annealing
    iterations {0, 1, 2, 4, 8} (optimizer steps) and learning rate {1e-3, 1e-2, 1e-1, 1}; no L1/L2/dropout.

The architecture values default to a small space (:data:`SMALL_ARCH`) so that a default search finishes in a few
minutes on two CPU cores; :data:`hardtovary.experiments.sweep.PAPER_ARCHITECTURE` is Table 1's (256/512 units,
3/5 layers, batch 64/128/256).

Determinism: method m's trials are drawn by ``numpy.random.default_rng([seed, index of m in baselines.METHODS])``
in a fixed field order, so they do not depend on which other methods are searched. Trial i trains with seed
``seed + i``; the re-runs use ``sweep.RERUN_SEED_OFFSET + seed + s``. The learning rate drops x0.1 at 1/2 and 3/4
of the epochs (paper App. B.3).

Run folder: ``config.json``, ``units/search-<method>-NNN.json`` (one per trial) and ``units/seeds-<method>-NNN.json``
(one per re-run seed), each written atomically when it finishes; ``results.json`` and ``table.txt``. A rerun with
the same options skips the finished units.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from hardtovary.experiments import baselines as _bl
from hardtovary.experiments.errors import UsageError
from hardtovary.experiments.executors import Unit, run_units
from hardtovary.experiments.runfolder import RunFolder, write_atomic
from hardtovary.experiments.stats import mean_std
from hardtovary.experiments.sweep import RERUN_SEED_OFFSET, Architecture, _rank_key
from hardtovary.reference import data as _data
from hardtovary.reference import optim
from hardtovary.reference import rules as _rules

__all__ = ["TABLE1", "TABLE2", "AND_MASK_TAUS", "SMALL_ARCH", "sample_trials", "trial_config", "run",
           "format_table"]

#: Table 1 (paper App. B.3) without the architecture values (see :class:`Architecture`).
TABLE1 = {"optimizer": ("adam", "sgd"), "lr": (1e-3, 1e-2, 1e-1), "batch_norm": (True, False),
          "dropout": (0.0, 0.5), "l2": (1e-5, 1e-4, 1e-3), "l1": (1e-6, 1e-5, 1e-4)}
#: Table 2 (IRM) without the architecture values.
TABLE2 = {"optimizer": ("adam", "sgd"), "batch_norm": (True, False), "penalty_weight": (10.0, 100.0, 1000.0),
          "anneal_iters": (0, 1, 2, 4, 8), "lr": (1e-3, 1e-2, 1e-1, 1.0)}
#: [ASSUMPTION] the paper does not give the range of the AND-mask threshold.
AND_MASK_TAUS = (0.5, 0.75, 1.0)
RESCALE = (False, True)

#: The keys of a trial's hyperparameters, per method.
KEYS = {
    "erm": ("hidden_units", "layers", "batch_size", "optimizer", "lr", "batch_norm", "dropout", "l2", "l1"),
    "dann": ("hidden_units", "batch_size", "optimizer", "lr", "l2", "l1"),
    "and_mask": ("hidden_units", "layers", "batch_size", "optimizer", "lr", "l2", "l1", "tau", "rescale"),
    "irm": ("hidden_units", "layers", "batch_size", "optimizer", "batch_norm", "penalty_weight", "anneal_iters",
            "lr"),
}
KEYS["geometric_mean"] = (*KEYS["and_mask"], "flavour")


#: The architecture values of a default search: small, so that it finishes in a few minutes on two CPU cores.
SMALL_ARCH = Architecture(hidden_units=(32, 64), layers=(2, 3), batch_sizes=(64, 128))


def sample_trials(method: str, budget: int, *, arch: Architecture = SMALL_ARCH, seed: int = 0,
                  flavour: str = "paper") -> list[dict]:
    """``budget`` hyperparameter dicts for ``method`` (keys :data:`KEYS` ``[method]``), drawn from its space.
    ``flavour`` is the geometric mean's (recorded in its trials): the paper's fixes tau at 1."""
    if method not in KEYS:
        raise ValueError(f"method must be one of {list(KEYS)}, got {method!r}")
    if flavour not in _rules.FLAVOURS:
        raise ValueError(f"flavour must be one of {list(_rules.FLAVOURS)}, got {flavour!r}")
    rng = np.random.default_rng([seed, _bl.METHODS.index(method)])
    pick = lambda values: values[int(rng.integers(len(values)))]  # noqa: E731
    trials = []
    for _ in range(budget):
        t = {"hidden_units": int(pick(arch.hidden_units))}
        if method != "dann":
            t["layers"] = int(pick(arch.layers))
        t["batch_size"] = int(pick(arch.batch_sizes))
        if method == "irm":
            t["optimizer"] = pick(TABLE2["optimizer"])
            t["batch_norm"] = bool(pick(TABLE2["batch_norm"]))
            t["penalty_weight"] = float(pick(TABLE2["penalty_weight"]))
            t["anneal_iters"] = int(pick(TABLE2["anneal_iters"]))
            t["lr"] = float(pick(TABLE2["lr"]))
        else:
            t["optimizer"] = pick(TABLE1["optimizer"])
            t["lr"] = float(pick(TABLE1["lr"]))
            if method == "erm":
                t["batch_norm"] = bool(pick(TABLE1["batch_norm"]))
                t["dropout"] = float(pick(TABLE1["dropout"]))
            regulariser = pick(("l2", "l1", "none"))
            t["l2"] = float(pick(TABLE1["l2"])) if regulariser == "l2" else 0.0
            t["l1"] = float(pick(TABLE1["l1"])) if regulariser == "l1" else 0.0
            if method in ("and_mask", "geometric_mean"):
                tau, rescale = float(pick(AND_MASK_TAUS)), bool(pick(RESCALE))
                paper_geometric_mean = method == "geometric_mean" and flavour == "paper"
                t["tau"], t["rescale"], t["flavour"] = (1.0 if paper_geometric_mean else tau), rescale, flavour
        trials.append({k: t[k] for k in KEYS[method]})
    return trials


def trial_config(method: str, hyper: dict, *, epochs: int, seed: int, early_abort: bool,
                 n_agreement_envs: int | None = None) -> _bl.BaselineConfig:
    """The :class:`~hardtovary.experiments.baselines.BaselineConfig` of one trial (no method preset applied: every
    knob the space does not draw keeps the BaselineConfig default, e.g. DANN lambda 1)."""
    milestones = optim.paper_milestones(epochs)
    units = hyper["hidden_units"]
    kw = dict(hidden=(units,) * hyper.get("layers", 1), batch_size=hyper["batch_size"],
              optimizer=hyper["optimizer"], lr=hyper["lr"], batch_norm=hyper.get("batch_norm", False),
              dropout=hyper.get("dropout", 0.0), weight_decay=hyper.get("l2", 0.0), l1=hyper.get("l1", 0.0),
              epochs=epochs, lr_milestones=milestones, seed=seed, early_abort=early_abort, momentum=0.9,
              n_agreement_envs=n_agreement_envs)
    if method == "dann":
        kw["dann_hidden"] = units
    if method == "irm":
        kw.update(irm_penalty_weight=hyper["penalty_weight"], irm_anneal_iters=hyper["anneal_iters"])
    if method in ("and_mask", "geometric_mean"):
        kw.update(tau=hyper["tau"], rescale=hyper["rescale"], flavour=hyper.get("flavour"))
    return _bl.BaselineConfig(**kw)


def _check_int(name, value, low):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")


def run(out: Path, *, methods=_bl.DEFAULT_METHODS, budget: int = 4, seeds: int = 3, epochs: int = 40,
        seed: int = 0, arch: Architecture = SMALL_ARCH, data_config: _data.SpiralsConfig = _bl.DEFAULT_DATA,
        n_agreement_envs: int | None = None, flavour: str = "paper", fresh: bool = False,
        progress: bool = True, executor=None) -> dict:
    """Search each method (``flavour``: the geometric mean's, see :func:`sample_trials`), re-run its best trial
    over ``seeds`` seeds; return and write ``out/results.json``:
    ``{"config", "methods": {method: {"search": [trial records, best first], "best": {trial, hyper,
    search_test_acc, train_acc_mean/std, test_acc_mean/std, n_seeds, runs}}}}``; also ``out/table.txt``. The
    runs are units of :mod:`~hardtovary.experiments.executors` on ``executor`` (this process when None)."""
    methods = tuple(methods)
    bad = [m for m in methods if m not in KEYS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise UsageError(f"methods must be distinct names from {list(KEYS)}, got {list(methods)}")
    for name, value, low in (("budget", budget, 1), ("seeds", seeds, 1), ("epochs", epochs, 1), ("seed", seed, 0)):
        _check_int(name, value, low)
    too_big = [b for b in arch.batch_sizes if b > data_config.examples_per_env]
    if too_big:
        raise UsageError(f"batch sizes {too_big} exceed the {data_config.examples_per_env} examples per environment")
    K = n_agreement_envs or data_config.n_train_envs
    if data_config.n_train_envs % K:
        raise UsageError(f"n_agreement_envs={K} must divide the number of training environments "
                         f"{data_config.n_train_envs}")
    config = {"experiment": "baselines-search", "data": dataclasses.asdict(data_config), "methods": list(methods),
              "budget": budget, "seeds": seeds, "epochs": epochs, "seed": seed, "arch": dataclasses.asdict(arch),
              "n_agreement_envs": n_agreement_envs, "and_mask_taus": list(AND_MASK_TAUS), "flavour": flavour}
    trials = {m: sample_trials(m, budget, arch=arch, seed=seed, flavour=flavour) for m in methods}
    folder = RunFolder(out, config, fresh=fresh)

    def unit(name, method, hyper, cfg, label):
        return Unit(name, search_unit, (method, data_config, hyper, cfg, label),
                    steps=cfg.epochs * _bl.steps_per_epoch(data_config, cfg), label=name,
                    shows=("train_acc", "test_acc"))

    def configs(m):
        return [trial_config(m, hyper, epochs=epochs, seed=seed + i, early_abort=True,
                             n_agreement_envs=n_agreement_envs) for i, hyper in enumerate(trials[m])]

    # the search trials of every method, then the re-runs of each method's best: two rounds of independent units
    search = run_units(folder, [unit(f"search-{m}-{i:03d}", m, hyper, cfg, {"trial": i}) for m in methods
                                for i, (hyper, cfg) in enumerate(zip(trials[m], configs(m)))],
                       executor, what="search runs", progress=progress, where=folder.root)
    ranked = {m: sorted((search[f"search-{m}-{i:03d}"] for i in range(budget)), key=_rank_key) for m in methods}
    reruns = run_units(folder, [unit(f"seeds-{m}-{s:03d}", m, ranked[m][0]["hyper"],
                                     trial_config(m, ranked[m][0]["hyper"], epochs=epochs,
                                                  seed=RERUN_SEED_OFFSET + seed + s, early_abort=False,
                                                  n_agreement_envs=n_agreement_envs),
                                     {"trial": ranked[m][0]["trial"]}) for m in methods for s in range(seeds)],
                       executor, what="re-runs", progress=progress, where=folder.root)
    results = {"config": config, "methods": {}}
    for m in methods:
        best = ranked[m][0]
        runs = [reruns[f"seeds-{m}-{s:03d}"] for s in range(seeds)]
        train_mean, train_std = mean_std([r["train_acc"] for r in runs])
        test_mean, test_std = mean_std([r["test_acc"] for r in runs])
        results["methods"][m] = {
            "search": [{k: v for k, v in r.items() if k != "history"} for r in ranked[m]],
            "best": {"trial": best["trial"], "hyper": best["hyper"], "search_test_acc": best["test_acc"],
                     "train_acc_mean": train_mean, "train_acc_std": train_std,
                     "test_acc_mean": test_mean, "test_acc_std": test_std, "n_seeds": len(runs),
                     "runs": [{k: r[k] for k in ("seed", "train_acc", "test_acc")} for r in runs]}}
    folder.write_results(results)
    write_atomic(folder.root / "table.txt", lambda f: f.write(format_table(results) + "\n"))
    return results


def search_unit(method: str, data_config: _data.SpiralsConfig, hyper: dict, config: _bl.BaselineConfig,
                label: dict, *, on_step=None, on_epoch=None) -> dict:
    """One run of a search trial or a re-run: ``method`` with ``config`` (the trial's ``hyper`` resolved, its seed
    included) on the spirals task of ``data_config``; ``label`` (the trial number) is stored with it.

    Subnormal floats are flushed to zero during the run, and the setting restored after. Table 2's lr = 1 drives
    some IRM runs into subnormal weights, which CPUs process ~25x slower (an epoch went from 0.25 s to 6 s). The
    flag is per process in torch, so it is set here, in whatever process runs the unit, and switched off again
    after (hypothesis and NumPy code later in the process need subnormals)."""
    import torch

    start = time.perf_counter()
    torch.set_flush_denormal(True)
    try:
        history = _bl.train_baseline(method, _data.make_spirals_task(data_config), config, on_step=on_step,
                                     on_epoch=on_epoch)
    finally:
        torch.set_flush_denormal(False)
    final = history[-1]
    return {**label, "hyper": hyper, "seed": config.seed, "train_acc": final["train_acc"],
            "test_acc": final["test_acc"], "train_loss": final["train_loss"],
            "aborted": bool(final.get("aborted", False)), "epochs_run": len(history),
            "seconds": time.perf_counter() - start, "history": history}


def _value(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "-" if v == 0 else f"{v:g}"
    return str(v)


def format_table(results: dict) -> str:
    """One block per method: its best configuration and mean ± std over seeds of final train / o.o.d. test acc."""
    blocks = []
    for m, r in results["methods"].items():
        aborted = sum(t["aborted"] for t in r["search"])
        b = r["best"]
        hyper = "  ".join(f"{k}={_value(v)}" for k, v in b["hyper"].items())
        blocks.append("\n".join([
            f"{m}: {len(r['search'])} trials ({aborted} aborted early), best = trial {b['trial']} "
            f"(search test acc {b['search_test_acc']:.3f})",
            f"  config: {hyper}",
            f"  {'seeds':>5}  {'train acc (mean ± std)':>24}  {'test acc o.o.d. (mean ± std)':>30}",
            f"  {b['n_seeds']:>5}  {b['train_acc_mean']:>16.3f} ± {b['train_acc_std']:.3f}"
            f"  {b['test_acc_mean']:>22.3f} ± {b['test_acc_std']:.3f}"]))
    return "\n\n".join(blocks)
