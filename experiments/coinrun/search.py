"""TPE search of the cloning hyperparameters (paper §3.3, App. B.6, Table 3): one optuna study per method.

The paper tuned each method with a TPE study (Bergstra et al. 2013) of 1024 trials and reports the best runs'
"minimum test loss". Here each method has its study ``coinrun-<method>``, sampled by optuna's ``TPESampler``
(seeded by :func:`sampler_seed`) and stored in ``OUT/study.db`` (SQLite). A trial trains one run
(:func:`hardtovary.experiments.coinrun.cloning.train_run`) in ``OUT/trials/<run key>/`` and its objective is the
run's minimum test KL over the epochs.
Selection therefore uses the test levels, as the paper did: the reported minimum is an optimistic estimate, not a
held-out one.

The search space is :data:`SPACE` (the paper gives no ranges; these contain every row of Table 3): learning rate
log-uniform in [1e-3, 1e-2]; beta1 uniform in [0.1, 0.9]; for ``and_mask`` beta3 uniform in [0.5, 0.99] and tau
uniform in [0.1, 0.8]; weight decay, for both methods, a switch ``weight_decay_on`` (App. B.6: "a search switch")
and, when on, log-uniform in [1e-3, 1e-1]. beta2 = 0.999 and eps = 1e-8 are fixed. Every trial trains with the
same seed ``SEED`` (initialisation and batch order), so trials differ in their hyperparameters only.

Budget and resuming: ``trials`` counts COMPLETE trials per method. A trial whose run diverges (non-finite loss)
is recorded as FAIL and does not count. A search interrupted with Ctrl-C puts the running trial's parameters back
in the queue; one killed outright leaves its trial RUNNING, and the next start marks it FAIL and queues its
parameters again. Either way the queued trial has the same run key and resumes the run from its last finished
epoch. One search at a time per run folder: the start treats every RUNNING trial as left by a killed process.
The sampler's random state is not stored; each start seeds it from SEED, the method and the number of trials its
study holds, so a search is reproducible from its start, a resumed one does not repeat the draws of the first
start, and its later draws are not those an uninterrupted search would have made.

Output: ``OUT/results.json`` (every COMPLETE trial: number, parameters, minimum test KL, run configuration and
history; the counts of failed trials; the best ``top`` per method), ``OUT/table.txt`` (the Table 3-style listing
of the best runs) and the figures of :func:`hardtovary.experiments.coinrun.figures.write_figures` over the best
``top`` runs of each method.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from hardtovary.experiments.coinrun import cloning
from hardtovary.experiments.errors import UsageError, usage_errors
from hardtovary.experiments.executors import Unit, run_units
from hardtovary.experiments.options import install_hint
from hardtovary.experiments.progress import note_resume
from hardtovary.experiments.runfolder import RunFolder, write_atomic
from hardtovary.reference.validate import integer

__all__ = ["Range", "SPACE", "TOP", "STORAGE_FILE", "TABLE_FILE", "require_optuna", "study_name", "suggest",
           "sampler_seed", "recover", "run", "best_trials", "format_table"]


class Range(NamedTuple):
    """One searched hyperparameter: drawn uniformly (``log``: log-uniformly) in [low, high], for ``methods``;
    with ``switch``, first a categorical on/off choice ``<name>_on``, and 0 when off."""

    low: float
    high: float
    log: bool
    methods: tuple
    switch: bool = False


#: The search space (the paper does not give its ranges; these contain Table 3's rows).
SPACE = {
    "lr": Range(1e-3, 1e-2, True, cloning.METHODS),
    "beta1": Range(0.1, 0.9, False, cloning.METHODS),
    "beta3": Range(0.5, 0.99, False, ("and_mask",)),
    "tau": Range(0.1, 0.8, False, ("and_mask",)),
    "weight_decay": Range(1e-3, 1e-1, True, cloning.METHODS, switch=True),
}
#: How many of the best runs per method the listing and the figures show (the main text's "10 best runs").
TOP = 10
STORAGE_FILE = "study.db"
TABLE_FILE = "table.txt"
#: The columns of the listing after the test KL, as in Table 3.
TABLE_COLUMNS = ("lr", "beta1", "beta3", "tau", "weight_decay")


def require_optuna():
    """The ``optuna`` module, or a UsageError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise UsageError(f"the CoinRun search needs optuna, which is not installed; "
                         f"{install_hint('coinrun')}") from None
    return optuna


def study_name(method: str) -> str:
    return f"coinrun-{method}"


def suggest(trial, method: str) -> dict:
    """The hyperparameters of ``method`` drawn for ``trial`` from :data:`SPACE`, as keyword arguments of
    :func:`hardtovary.experiments.coinrun.cloning.method_config`."""
    params = {}
    for name, r in SPACE.items():
        if method not in r.methods:
            continue
        if r.switch and not trial.suggest_categorical(f"{name}_on", (False, True)):
            params[name] = 0.0
        else:
            params[name] = trial.suggest_float(name, r.low, r.high, log=r.log)
    return params


def sampler_seed(seed: int, method: str, trials: int) -> int:
    """The seed of ``method``'s TPE sampler when its study holds ``trials`` trials: from ``seed``, the method and
    that count, so that a resumed search does not draw again the points its first start drew."""
    return int(np.random.SeedSequence([seed, cloning.METHODS.index(method), trials]).generate_state(1)[0])


def recover(study) -> int:
    """Mark the trials a killed search left RUNNING as FAIL and queue their parameters again; how many."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params)
    return len(stale)


def _complete(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _failed(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


def trial_unit(run_folder: str, labels_folder: str, config, *, device: str, on_step=None, on_epoch=None) -> dict:
    """One trial's run as a unit of :mod:`~hardtovary.experiments.executors`
    (:func:`hardtovary.experiments.coinrun.cloning.run_unit`); a run that diverged is the result
    ``{"diverged": why}``, which the study records as a failed trial, rather than an error that stops the search."""
    try:
        return cloning.run_unit(run_folder, labels_folder, config, device=device, on_step=on_step,
                                on_epoch=on_epoch)
    except cloning.Diverged as exc:
        return {"diverged": str(exc)}


def _run_batch(study, method: str, size: int, folder: RunFolder, labels_folder, data, settings: dict, device: str,
               executor, progress: bool) -> None:
    """Ask ``size`` trials of ``study`` at once, train their runs as units on ``executor``, tell their values.
    Ctrl-C marks the asked trials FAIL and queues their parameters again; a kill leaves them RUNNING
    (:func:`recover`)."""
    from optuna.trial import TrialState

    asked = []
    for _ in range(size):
        trial = study.ask()
        config = cloning.method_config(method, **suggest(trial, method), **settings)
        trial.set_user_attr("run", config.key())
        asked.append((trial, config))
    units = {}
    for trial, config in asked:
        key = config.key()
        run_folder = folder.root / "trials" / key
        epochs_left = config.epochs - cloning.epochs_done(run_folder)
        units[key] = Unit(key, trial_unit, (str(run_folder), str(labels_folder), config),
                          steps=epochs_left * cloning.steps_per_epoch(data, config),
                          label=f"{method} trial {trial.number}", shows=("train_kl", "test_kl"),
                          gpu=device.startswith("cuda"), options={"device": device})
    try:
        outcomes = run_units(folder, units.values(), executor, what="runs", progress=progress, where=folder.root)
    except KeyboardInterrupt:
        for trial, _ in asked:
            study.enqueue_trial(trial.params)
            study.tell(trial, state=TrialState.FAIL)
        raise
    for trial, config in asked:
        outcome = outcomes[config.key()]
        if "diverged" in outcome:
            tqdm.write(f"{method} trial {trial.number}: {outcome['diverged']}; recorded as failed", file=sys.stderr)
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, outcome["min_test_kl"])


def run(out, labels_folder, *, methods=cloning.METHODS, trials: int, epochs: int = cloning.EPOCHS,
        width: float = cloning.WIDTH, batch_size: int = cloning.BATCH_SIZE, top: int = TOP, seed: int = 0,
        device: str | None = None, fresh: bool = False, progress: bool = True, executor=None,
        parallel_trials: int = 1) -> dict:
    """Search each of ``methods`` until its study holds ``trials`` COMPLETE trials (resuming ``out``), then write
    ``out/results.json`` and ``out/table.txt``. Returns the results: ``config``, and per method ``complete``,
    ``failed``, ``trials`` (every COMPLETE trial, in trial order) and ``best`` (the ``top`` best trials' numbers).
    UsageError when a round of trials completes none (every run diverged).

    TPE draws ``parallel_trials`` trials at a time, before it knows the values of any of them (optuna's "constant
    liar" keeps them apart), and their runs are units on ``executor`` (this process when None). The draws depend on
    ``parallel_trials``, not on the executor or its workers; 1, the default, is the sequential search."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out = Path(out)
    device = cloning.resolve_device(device)
    settings = dict(epochs=epochs, batch_size=batch_size, width=width, seed=seed)
    with usage_errors():  # refuse bad settings before anything runs
        for method in methods:
            cloning.method_config(method, **settings)
        parallel_trials = integer(parallel_trials, "parallel_trials", low=1)
    data = cloning.load_data_cached(labels_folder)  # the trials run in this process read the same copy
    folder = RunFolder(out, {"labels": cloning.label_folder_config(labels_folder, data), **settings,
                             "space": {name: r._asdict() for name, r in SPACE.items()}}, fresh=fresh)
    storage = f"sqlite:///{(out / STORAGE_FILE).resolve()}"
    studies = {method: optuna.create_study(storage=storage, study_name=study_name(method), direction="minimize",
                                           load_if_exists=True) for method in methods}
    for method, study in studies.items():
        study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(seed, method, len(study.trials)),
                                                   constant_liar=True)
    requeued = sum(recover(study) for study in studies.values())
    done = sum(min(len(_complete(study)), trials) for study in studies.values())
    note_resume(done, trials * len(methods), "trials", folder.root)
    if requeued:
        tqdm.write(f"resuming: {requeued} trial(s) left running by a killed search, queued again", file=sys.stderr)
    for method, study in studies.items():
        while len(_complete(study)) < trials:
            before = len(_complete(study))
            for start in range(0, trials - before, parallel_trials):
                _run_batch(study, method, min(parallel_trials, trials - before - start), folder, labels_folder, data,
                           settings, device, executor, progress)
            if len(_complete(study)) == before:
                raise UsageError(f"no {method} trial of the last {trials - before} completed (every run "
                                 f"diverged); see {out / STORAGE_FILE}")
    results = {"config": folder.config,
               "methods": {method: _method_results(study, folder, top) for method, study in studies.items()}}
    folder.write_results(results)
    write_atomic(out / TABLE_FILE, lambda f: f.write(format_table(results) + "\n"))
    return results


def _method_results(study, folder: RunFolder, top: int) -> dict:
    records = []
    for trial in _complete(study):
        outcome = folder.finished(trial.user_attrs["run"])
        records.append({"number": trial.number, "params": trial.params, "min_test_kl": trial.value,
                        "run": trial.user_attrs["run"], **outcome})
    return {"complete": len(records), "failed": _failed(study), "trials": records,
            "best": [r["number"] for r in cloning.best_runs(records, top)]}


def best_trials(results: dict) -> dict:
    """``{method: [trial record, ...]}``: the best trials of each method, best first (``results["methods"][m]
    ["best"]``)."""
    out = {}
    for method, r in results["methods"].items():
        by_number = {t["number"]: t for t in r["trials"]}
        out[method] = [by_number[n] for n in r["best"]]
    return out


def format_table(results: dict) -> str:
    """Table 3-style listing: per method its best trials, best first, with the minimum test KL and the
    hyperparameters (``-`` where the method has none)."""
    header = f"{'method':<10}{'trial':>6}{'test KL':>12}" + "".join(f"{c.replace('_', ' '):>14}" for c in TABLE_COLUMNS)
    lines = [header]
    for method, records in best_trials(results).items():
        for r in records:
            cells = "".join(f"{'-' if r['config'][c] is None else format(r['config'][c], '.3g'):>14}"
                            for c in TABLE_COLUMNS)
            lines.append(f"{method:<10}{r['number']:>6}{r['min_test_kl']:>12.4e}{cells}")
    return "\n".join(lines)
