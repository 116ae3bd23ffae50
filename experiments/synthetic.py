"""The synthetic memorization experiment (paper §3.1, App. B) on the reference implementation.

``hardtovary synthetic`` trains one MLP per method on the spirals task -- averaging (tau = 0), the AND-mask and the
geometric mean by default -- and reports final training accuracy and o.o.d. test accuracy. A shortcut-only
classifier is perfect on the training environments and at chance on the test set; only a model that learned the
spirals generalises.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tqdm import tqdm

from hardtovary.experiments.errors import usage_errors
from hardtovary.experiments.progress import note_resume, show_epoch, start_unit
from hardtovary.experiments.runfolder import RunFolder
from hardtovary.reference import data, training

#: The methods of the default comparison and how each one changes the base configuration.
METHOD_PRESETS = {
    "mean": {"method": "mean", "tau": 0.0, "rescale": False},
    "and_mask": {"method": "and_mask", "tau": 1.0},
    "geometric_mean": {"method": "geometric_mean", "tau": 1.0},
    "sand_mask": {"method": "sand_mask", "tau": 0.5},
}
DEFAULT_METHODS = ("mean", "and_mask", "geometric_mean")
#: Implementations that ``run`` can train with: the NumPy oracle, or the batched sweep of hardtovary.accel.
IMPLEMENTATIONS = ("reference", "accel")

#: The authors' code defaults for the data (16 environments of 1024 examples, 8 shortcut dimensions) and the
#: paper's best AND-mask configuration (App. B.3.1: tau = 1, 3 x 256, batch 128, Adam 1e-2, L2 1e-4), with
#: inverse-sparsity rescaling on and 80 epochs (learning rate x0.1 at epoch 60).
DEFAULT_DATA = data.SpiralsConfig(n_train_envs=16, examples_per_env=1024, n_test=2000, n_revolutions=3,
                                  n_dims=8, seed=0)
DEFAULT_TRAIN = training.TrainConfig(hidden=(256, 256, 256), batch_size=128, n_agreement_envs=16, epochs=80,
                                     lr=1e-2, weight_decay=1e-4, weight_decay_order="before", rescale=True,
                                     lr_milestones=(60,), seed=0)


def method_config(base: training.TrainConfig, name: str, overrides: dict | None = None) -> training.TrainConfig:
    """The configuration of method ``name``: the base configuration with the method's preset applied, then any
    user overrides (for instance an explicit ``tau``, or ``flavour`` for the geometric mean).

    ``mean`` takes no tau, rescaling or flavour; only ``geometric_mean`` takes a flavour, recorded as the one it
    trains with (``"paper"`` unless overridden). The rule's options are checked by the oracle's own validation
    when the configuration is made (``TrainConfig.rule_spec``, a :class:`hardtovary.reference.rules.RuleSpec`): the
    paper's geometric mean with tau != 1 raises ValueError instead of training with tau 1.
    """
    if name not in METHOD_PRESETS:
        raise ValueError(f"method must be one of {sorted(METHOD_PRESETS)}, got {name!r}")
    changes = dict(METHOD_PRESETS[name])
    ignored = {"mean": ("tau", "rescale", "flavour"), "geometric_mean": ()}.get(name, ("flavour",))
    changes.update({k: val for k, val in (overrides or {}).items() if k not in ignored})
    if name == "geometric_mean":
        changes["flavour"] = changes.get("flavour") or "paper"
    return dataclasses.replace(base, **changes)


def run(out: Path, *, data_config: data.SpiralsConfig = DEFAULT_DATA,
        train_config: training.TrainConfig = DEFAULT_TRAIN, methods=DEFAULT_METHODS,
        overrides: dict | None = None, fresh: bool = False, progress: bool = True,
        implementation: str = "reference", backend: str | None = None) -> dict:
    """Run every method, resuming from ``out`` where a previous run with the same configuration stopped.

    ``implementation="reference"`` trains the methods one after another with
    :func:`hardtovary.reference.training.train`; ``implementation="accel"`` trains the unfinished ones together as
    one sweep (:func:`hardtovary.accel.sweep.train_sweep`, float64; no BatchNorm) on the array ``backend``
    (``"numpy"``, ``"cupy"`` or ``"auto"``; None reads ``HARDTOVARY_BACKEND``, see
    :func:`hardtovary.accel.backend.get_backend`), with the same results to rounding. The implementation is not
    part of the run folder's configuration (either one resumes the other's folder); each unit records the
    ``implementation`` and the array ``backend`` that produced it. With ``accel``, ``seconds`` is the sweep's wall
    time divided by the number of methods it trained.

    Returns the results dictionary that is also written to ``out/results.json``: ``config`` (data, base training
    configuration and each method's full configuration) and ``methods`` (per method ``train_acc``, ``test_acc``,
    ``train_loss``, ``test_loss``, ``seconds`` and the per-epoch ``history``).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}")
    if implementation == "reference" and backend is not None:
        raise ValueError(f"backend applies only to implementation='accel', got backend={backend!r}")
    configs = {name: method_config(train_config, name, overrides) for name in methods}
    config = {"experiment": "synthetic", "data": dataclasses.asdict(data_config),
              "methods": {name: c.to_dict() for name, c in configs.items()}}
    task = data.make_spirals_task(data_config)
    env_data = training.EnvironmentData(task.X_train, task.y_train, task.X_test, task.y_test)
    with usage_errors():  # the batching of the options against the data, before the run folder is written
        for c in configs.values():
            training.check_fits(env_data, c)
    folder = RunFolder(out, config, fresh=fresh)
    n_envs, n_examples = task.X_train.shape[:2]

    todo = [name for name in methods if folder.finished(name) is None]
    note_resume(len(methods) - len(todo), len(methods), "methods", folder.root)
    total = sum(configs[n].epochs * training.steps_per_epoch(n_envs, n_examples, configs[n]) for n in todo)
    results = {"config": config, "methods": {}}
    if implementation == "accel":
        return _run_accel(folder, env_data, configs, methods, todo, total, results, progress, backend)
    with tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True) as bar:
        for name in methods:
            stored = folder.finished(name)
            if stored is None:
                start_unit(bar, name)
                start = time.perf_counter()

                show = show_epoch(bar)
                outcome = training.train(env_data, configs[name], on_step=lambda: bar.update(1), on_epoch=show)
                final = outcome.final
                stored = {"train_acc": final["train_acc"], "test_acc": final["test_acc"],
                          "train_loss": final["train_loss"], "test_loss": final["test_loss"],
                          "seconds": time.perf_counter() - start, "implementation": "reference",
                          "backend": "numpy", "history": outcome.history}
                folder.save(name, stored)
            results["methods"][name] = stored
            folder.write_results(results)
    return results


def _run_accel(folder: RunFolder, env_data, configs: dict, methods, todo: list, total: int, results: dict,
               progress: bool, backend: str | None) -> dict:
    """The unfinished methods as one sweep of :func:`hardtovary.accel.sweep.train_sweep`; units saved after it."""
    from hardtovary.accel.backend import get_backend
    from hardtovary.accel.sweep import train_sweep

    if todo:
        array_backend = get_backend(backend)
        with tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True) as bar:
            start_unit(bar, f"sweep of {len(todo)}")

            def show(index, record, bar=bar):
                bar.set_postfix(method=todo[index], epoch=record["epoch"], test=f"{record['test_acc']:.3f}")

            start = time.perf_counter()
            outcomes = train_sweep(env_data, [configs[n] for n in todo], backend=array_backend, on_epoch=show,
                                   on_step=bar.update)
            seconds = (time.perf_counter() - start) / len(todo)
        for name, outcome in zip(todo, outcomes):
            final = outcome.final
            folder.save(name, {"train_acc": final["train_acc"], "test_acc": final["test_acc"],
                               "train_loss": final["train_loss"], "test_loss": final["test_loss"],
                               "seconds": seconds, "implementation": "accel", "backend": array_backend.name,
                               "history": outcome.history})
    for name in methods:
        results["methods"][name] = folder.finished(name)
    folder.write_results(results)
    return results


def format_table(results: dict) -> str:
    """The final accuracies as a plain-text table, one row per method, with the tau and flavour each method
    trained with (mean takes no tau: it shows 0, the AND-mask threshold it equals)."""
    lines = [f"{'method':<16}{'tau':>6}  {'flavour':<9}{'train acc':>9}{'test acc (o.o.d.)':>19}{'seconds':>9}"]
    for name, r in results["methods"].items():
        config = results["config"]["methods"][name]
        lines.append(f"{name:<16}{config['tau']:>6.2f}  {config['flavour'] or '-':<9}{r['train_acc']:>9.3f}"
                     f"{r['test_acc']:>19.3f}{r['seconds']:>9.1f}")
    return "\n".join(lines)
