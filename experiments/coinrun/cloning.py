"""Behavioural cloning of the CoinRun expert (paper §3.3, App. B.6): a ResNet-18 policy trained on a label folder
with Adam or the temporal AND-mask Adam (Algorithm 1), its KL divergence to the expert on unseen test levels.

Policy and loss
    ``from_spec(resnet18(width, num_classes=15))`` (paper App. B.6: ResNet-18; 15 logits, Procgen's actions), in
    float32. A frame enters as ``uint8 [N, 64, 64, 3]`` and is fed as ``float32 [N, 3, 64, 64] / 255`` (no other
    normalisation). The loss is the cross-entropy with the expert's action distribution as soft targets, averaged
    over the batch; it differs from KL(pi* || pi_hat) by the expert's entropy only (paper §3.3), and the metrics
    report the KL itself, ``CE - H(pi*)`` with ``0 log 0 = 0``.

Methods (:data:`METHODS`)
    ``adam``: ``torch.optim.Adam(lr, betas=(beta1, beta2), eps)``, with bias correction as usual.
    ``and_mask``: :class:`hardtovary.accel.torch.optim.TemporalAndMaskAdam` (Algorithm 1: Adam whose first moment
    is masked where the exponential average ``a`` of the gradient signs, with rate ``beta3``, has ``|a| < tau``;
    no bias correction, as printed). ``beta3`` and ``tau`` belong to ``and_mask`` only: giving them to ``adam`` is
    an error rather than silently ignored.

Weight decay
    Decoupled, the same switch for both methods (App. B.6: "a second independent update after the AND-mask
    routine", also offered to Adam): every step ``theta <- theta - lr_t * weight_decay * theta_t`` with ``theta_t``
    the parameters before the step, on every parameter (BatchNorm's and biases included); ``weight_decay = 0`` is
    off. It never passes through the moments or the mask. With Adam this is exactly ``torch.optim.AdamW``
    (Loshchilov and Hutter's decoupled weight decay).

Batching
    App. B.6: "each iteration uses one batch from one random level, visiting every level once per epoch". Read
    here as: each epoch, every training level's states are shuffled and cut into batches of ``batch_size`` (a last
    batch of a single state is dropped, since BatchNorm needs two; a shorter last batch is kept), and the (level,
    batch) pairs of all levels are shuffled together. Every step therefore sees one level, with BatchNorm's
    statistics of that level only, and every state of every level is visited once per epoch. The orders come from
    ``numpy.random.default_rng([seed, epoch])``, so a resumed run sees the same batches.

Schedule and metrics
    The learning rate drops x0.1 at 1/2 and 3/4 of the epochs (App. B.6; :func:`hardtovary.reference.optim.
    paper_milestones`). After every epoch, in eval mode (running BatchNorm statistics): ``train_kl`` and
    ``test_kl`` (mean KL over the states of the split), ``train_class_acc`` and ``test_class_acc`` (how often the
    policy's most probable action class, summing its probabilities within CoinRun's six classes, is the
    expert's), the mean training loss of the epoch's steps, the learning rate, the seconds, and for ``and_mask``
    ``kept_fraction``, the mean over the epoch's steps of the fraction of parameters the mask kept.

:func:`run` (``hardtovary coinrun train``) trains several runs, e.g. each method with each seed: each is a unit of a
:class:`~hardtovary.experiments.runfolder.RunFolder` ``OUT``, trained in ``OUT/runs/<name>/``. A run lives in its
own folder: ``checkpoint.pt`` (model, optimizer state, history, epochs done, seconds) and
``history.json``, written atomically after every epoch; a killed run resumes at the last finished epoch and, on a
CPU, ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hardtovary.experiments.coinrun import game, labels
from hardtovary.experiments.errors import UsageError
from hardtovary.experiments.executors import Unit, run_units
from hardtovary.experiments.options import install_hint
from hardtovary.experiments.progress import note_resume
from hardtovary.experiments.runfolder import RunFolder, write_atomic, write_json_atomic
from hardtovary.experiments.stats import mean_std
from hardtovary.reference.optim import multistep_lr, paper_milestones
from hardtovary.reference.validate import choice, in_range, integer, positive

__all__ = ["METHODS", "DEFAULT_HYPERPARAMETERS", "EPOCHS", "BATCH_SIZE", "WIDTH", "CloningConfig", "Diverged",
           "CloningData", "method_config", "load_data", "to_input", "entropy", "kl_divergence", "class_accuracy",
           "epoch_batches", "lr_at", "decay_weights", "make_model", "make_optimizer", "train_step", "train_run",
           "load_data_cached", "epochs_done", "require_torch", "resolve_device", "min_test_kl", "best_runs",
           "by_method", "label_folder_config", "run", "run_unit", "summarize", "format_table", "steps_per_epoch"]

METHODS = ("adam", "and_mask")
#: Each method's default hyperparameters. ``and_mask``: the best run of the paper's TPE search (Table 3, row 1).
#: ``adam``: Kingma and Ba's recommended values (torch's defaults), no weight decay: the paper publishes no Adam
#: hyperparameters, and these are the untuned baseline a reader would run first; ``hardtovary coinrun search``
#: tunes both methods alike.
DEFAULT_HYPERPARAMETERS = {
    "adam": {"lr": 1e-3, "beta1": 0.9, "weight_decay": 0.0},
    "and_mask": {"lr": 0.0078, "beta1": 0.21, "beta3": 0.79, "tau": 0.36, "weight_decay": 0.057},
}
#: Defaults sized for a CPU: about 30 epochs as Fig. 18 shows; the paper gives no batch size; a quarter of
#: ResNet-18's channels (width 1 is the paper's network, for a GPU).
EPOCHS = 30
BATCH_SIZE = 64
WIDTH = 0.25
BETA2 = 0.999
EPS = 1e-8
#: States per forward pass when evaluating (no gradients; only memory depends on it).
EVAL_BATCH = 512
#: The keys of an epoch's record in a run's history.
RECORD_KEYS = ("epoch", "lr", "train_loss", "train_kl", "test_kl", "train_class_acc", "test_class_acc",
               "kept_fraction", "seconds")


class Diverged(UsageError):
    """The training loss became non-finite: the hyperparameters are too aggressive for the run. The ``train``
    stage reports it as bad input (one line, exit status 2); the search records the trial as failed."""


@dataclasses.dataclass(frozen=True)
class CloningConfig:
    """Everything that determines one cloning run (JSON-able with :meth:`to_dict`). Validated on construction:
    ValueError/TypeError naming the field. ``beta3`` and ``tau`` are required by ``and_mask`` and refused by
    ``adam``; ``weight_decay = 0`` turns the decoupled decay off."""

    method: str
    lr: float
    beta1: float
    beta2: float = BETA2
    eps: float = EPS
    beta3: float | None = None
    tau: float | None = None
    weight_decay: float = 0.0
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    width: float = WIDTH
    seed: int = 0

    def __post_init__(self):
        choice(self.method, "method", METHODS)
        positive(self.lr, "lr")
        for name in ("beta1", "beta2"):
            _beta(getattr(self, name), name)
        positive(self.eps, "eps")
        positive(self.weight_decay, "weight_decay", allow_zero=True)
        integer(self.epochs, "epochs", low=1)
        if integer(self.batch_size, "batch_size") < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm needs two states per batch), got {self.batch_size}")
        positive(self.width, "width")
        integer(self.seed, "seed", low=0)
        if self.method == "and_mask":
            if self.beta3 is None or self.tau is None:
                raise ValueError("and_mask needs beta3 and tau")
            _beta(self.beta3, "beta3")
            in_range(self.tau, "tau", 0.0, 1.0)
        elif self.beta3 is not None or self.tau is not None:
            raise ValueError(f"beta3 and tau apply only to and_mask, not to {self.method}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short name unique to this configuration: ``<method>-<12 hex digits of its hash>``."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
        return f"{self.method}-{digest[:12]}"


def _beta(value, name: str) -> float:
    value = in_range(value, name, 0.0, 1.0)
    if value == 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return value


def method_config(method: str, **given) -> CloningConfig:
    """The configuration of ``method``: its :data:`DEFAULT_HYPERPARAMETERS`, then ``given`` (None values are left
    out, so a caller passes its options as they are)."""
    choice(method, "method", METHODS)
    return CloningConfig(method=method, **{**DEFAULT_HYPERPARAMETERS[method],
                                           **{k: v for k, v in given.items() if v is not None}})


# ----------------------------------------------------------------------------------------------------------------
# data and metrics
# ----------------------------------------------------------------------------------------------------------------


class CloningData(NamedTuple):
    """A label folder's states stacked per split: frames uint8 ``[N, 64, 64, 3]``, targets float32 ``[N, 15]``,
    the level index (position in ``*_levels``) and the expert's action class of each state; the level seeds."""

    train_frames: np.ndarray
    train_targets: np.ndarray
    train_level: np.ndarray
    train_classes: np.ndarray
    test_frames: np.ndarray
    test_targets: np.ndarray
    test_classes: np.ndarray
    train_levels: list
    test_levels: list


def load_data(folder) -> CloningData:
    """Both splits of a label folder (:func:`hardtovary.experiments.coinrun.labels.load_split`). UsageError for a
    folder that is not one, and for a training level with fewer than two states (a batch needs two)."""
    train, test = labels.load_split(folder, "train"), labels.load_split(folder, "test")
    for lv in train:
        if len(lv.frames) < 2:
            raise UsageError(f"{folder}: training level {lv.level} has {len(lv.frames)} state(s); cloning needs at "
                             f"least 2 per training level (BatchNorm needs two per batch)")
    train_frames, train_targets, train_level = labels.stack(train)
    test_frames, test_targets, _ = labels.stack(test)
    return CloningData(train_frames, train_targets, train_level, np.concatenate([lv.expert_classes for lv in train]),
                       test_frames, test_targets, np.concatenate([lv.expert_classes for lv in test]),
                       [lv.level for lv in train], [lv.level for lv in test])


def to_input(frames):
    """uint8 frames ``[N, 64, 64, 3]`` (a torch tensor) -> the network's input, float32 ``[N, 3, 64, 64]`` / 255."""
    import torch

    return frames.permute(0, 3, 1, 2).to(torch.float32) / 255.0


def entropy(targets: np.ndarray) -> np.ndarray:
    """H(p) of each row of ``targets [..., A]`` in nats, float64, with ``0 log 0 = 0``."""
    p = np.asarray(targets, dtype=np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def kl_divergence(targets: np.ndarray, log_probs: np.ndarray) -> np.ndarray:
    """KL(p || q) of each row, float64: the cross-entropy ``-sum p log q`` minus the entropy H(p), where
    ``log_probs`` holds ``log q`` (terms with ``p = 0`` count 0 even where ``log q = -inf``)."""
    p = np.asarray(targets, dtype=np.float64)
    log_q = np.asarray(log_probs, dtype=np.float64)
    cross_entropy = -np.sum(np.where(p > 0, p * np.where(p > 0, log_q, 0.0), 0.0), axis=-1)
    return cross_entropy - entropy(p)


def class_accuracy(log_probs: np.ndarray, expert_classes: np.ndarray) -> float:
    """How often the policy's most probable action class (its action probabilities summed within each of
    CoinRun's six classes, :func:`hardtovary.experiments.coinrun.game.class_probabilities`) is the expert's."""
    predicted = np.argmax(game.class_probabilities(np.exp(log_probs)), axis=-1)
    return float(np.mean(predicted == np.asarray(expert_classes)))


def epoch_batches(level_index: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of 0-based ``epoch``, in order: arrays of state indices, each from one level. Every level's
    states are shuffled and cut into batches of ``batch_size`` (a last batch of one state is dropped), and all
    levels' batches are shuffled together, by ``numpy.random.default_rng([seed, epoch])``."""
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for level in np.unique(level_index):
        states = rng.permutation(np.flatnonzero(level_index == level))
        batches += [batch for batch in np.array_split(states, range(batch_size, len(states), batch_size))
                    if len(batch) >= 2]
    return [batches[i] for i in rng.permutation(len(batches))]


def lr_at(config: CloningConfig, epoch: int) -> float:
    """The learning rate of 0-based ``epoch``: x0.1 at 1/2 and 3/4 of the epochs (App. B.6)."""
    return multistep_lr(config.lr, epoch, paper_milestones(config.epochs))


# ----------------------------------------------------------------------------------------------------------------
# model, optimizer, step
# ----------------------------------------------------------------------------------------------------------------


def require_torch():
    """The ``torch`` module, or a UsageError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise UsageError(f"CoinRun cloning needs PyTorch (torch >= 2.1), which is not installed; "
                         f"{install_hint('torch')}") from None
    return torch


def resolve_device(device: str | None) -> str:
    """``device`` checked (UsageError for one torch does not know or cannot use here); None: ``cuda`` when
    available, else ``cpu``."""
    torch = require_torch()
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise UsageError(f"--device {device}: {str(exc).splitlines()[0]}") from None
    return device


def make_model(config: CloningConfig, device: str = "cpu"):
    """The policy of ``config``, initialised from ``torch.manual_seed(config.seed)``: ResNet-18 with 15 logits."""
    import torch

    from hardtovary.accel.torch.models import from_spec
    from hardtovary.reference.convnet import resnet18

    torch.manual_seed(config.seed)
    return from_spec(resnet18(config.width, num_classes=game.NUM_ACTIONS), dtype=torch.float32, device=device)


def make_optimizer(params, config: CloningConfig):
    """``torch.optim.Adam`` (method ``adam``) or ``TemporalAndMaskAdam`` without bias correction (``and_mask``),
    both without weight decay (:func:`decay_weights` applies it)."""
    import torch

    from hardtovary.accel.torch.optim import TemporalAndMaskAdam

    if config.method == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    return TemporalAndMaskAdam(params, config.lr, beta1=config.beta1, beta2=config.beta2, beta3=config.beta3,
                               tau=config.tau, eps=config.eps)


def decay_weights(params, factor: float) -> None:
    """The decoupled weight decay ``theta <- theta - factor * theta`` (``factor = lr_t * weight_decay``). Called
    before the optimizer's step, whose update does not depend on theta, so the decay acts on the pre-step
    parameters, as AdamW's."""
    import torch

    if factor != 0:
        with torch.no_grad():
            for p in params:
                p.mul_(1.0 - factor)


def train_step(model, optimizer, x, targets, *, lr: float, weight_decay: float):
    """One step on a batch of one level: the soft cross-entropy of ``model(x)`` against ``targets [B, 15]`` (mean
    over the batch), its gradient, the decoupled weight decay and the optimizer's update. Returns the loss."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss = -(targets * torch.log_softmax(model(x), dim=1)).sum(dim=1).mean()
    loss.backward()
    decay_weights(model.parameters(), lr * weight_decay)
    optimizer.step()
    return loss.detach()


def _log_probs(model, frames, device: str) -> np.ndarray:
    """The policy's log-probabilities (float64 ``[N, 15]``) of uint8 ``frames`` (a tensor), in eval mode."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(frames), EVAL_BATCH):
            x = to_input(frames[start:start + EVAL_BATCH].to(device))
            out.append(torch.log_softmax(model(x), dim=1).double().cpu().numpy())
    return np.concatenate(out)


def _evaluate(model, frames, targets, classes, device: str) -> tuple[float, float]:
    """Mean KL to the expert and class accuracy over one split."""
    log_probs = _log_probs(model, frames, device)
    return float(np.mean(kl_divergence(targets, log_probs))), class_accuracy(log_probs, classes)


# ----------------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------------


def _save_checkpoint(path: Path, obj) -> None:
    import torch

    write_atomic(path, lambda f: torch.save(obj, f), binary=True)


def _load_checkpoint(path: Path, device: str = "cpu"):
    import torch

    return torch.load(path, map_location=device, weights_only=False)


def epochs_done(folder) -> int:
    """The epochs a run folder's checkpoint holds (0 without one)."""
    path = Path(folder) / "checkpoint.pt"
    return _load_checkpoint(path)["epochs_done"] if path.exists() else 0


def train_run(folder, data: CloningData, config: CloningConfig, *, device: str = "cpu", on_step=None,
              on_epoch=None) -> dict:
    """Train one run in ``folder``, resuming from its ``checkpoint.pt``. Returns ``{"config", "history",
    "seconds", "min_test_kl"}``; ``history`` holds one record per epoch (:data:`RECORD_KEYS`; ``epoch`` 1-based,
    ``kept_fraction`` None for adam). ``on_step()`` after each step, ``on_epoch(record)`` after each epoch's
    checkpoint. Raises :class:`Diverged` when the loss becomes non-finite, UsageError when the folder holds a run
    of another configuration."""
    import torch

    folder, checkpoint = Path(folder), Path(folder) / "checkpoint.pt"
    model = make_model(config, device)
    optimizer = make_optimizer(model.parameters(), config)
    history, seconds, done = [], 0.0, 0
    if checkpoint.exists():
        state = _load_checkpoint(checkpoint, device)
        if state["config"] != config.to_dict():
            raise UsageError(f"{folder} holds a run of another configuration; remove it or use another folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, seconds, done = state["history"], state["seconds"], state["epochs_done"]
    train_frames = torch.from_numpy(data.train_frames).to(device)
    train_targets = torch.from_numpy(data.train_targets).to(device)
    test_frames = torch.from_numpy(data.test_frames)
    n_params = sum(p.numel() for p in model.parameters())
    for epoch in range(done, config.epochs):
        start = time.perf_counter()
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        losses, kept = [], []
        for batch in epoch_batches(data.train_level, config.batch_size, config.seed, epoch):
            index = torch.from_numpy(batch).to(device)
            loss = float(train_step(model, optimizer, to_input(train_frames[index]), train_targets[index], lr=lr,
                                    weight_decay=config.weight_decay))
            if not math.isfinite(loss):
                raise Diverged(f"{config.method} run {config.key()} diverged in epoch {epoch + 1} (training loss "
                               f"{loss}); lower the learning rate")
            losses.append(loss)
            if config.method == "and_mask":
                kept.append(float(sum(m.sum() for m in optimizer.last_masks)) / n_params)
            if on_step is not None:
                on_step()
        train_kl, train_acc = _evaluate(model, train_frames, data.train_targets, data.train_classes, device)
        test_kl, test_acc = _evaluate(model, test_frames, data.test_targets, data.test_classes, device)
        seconds_epoch = time.perf_counter() - start
        record = dict(zip(RECORD_KEYS, (epoch + 1, lr, float(np.mean(losses)), train_kl, test_kl, train_acc,
                                        test_acc, float(np.mean(kept)) if kept else None, seconds_epoch)))
        history.append(record)
        seconds += seconds_epoch
        _save_checkpoint(checkpoint, {"config": config.to_dict(), "model": model.state_dict(),
                                      "optimizer": optimizer.state_dict(), "history": history, "seconds": seconds,
                                      "epochs_done": epoch + 1})
        write_json_atomic(folder / "history.json", history)
        if on_epoch is not None:
            on_epoch(record)
    return {"config": config.to_dict(), "history": history, "seconds": seconds, "min_test_kl": min_test_kl(history)}


def min_test_kl(history) -> float:
    """The minimum test KL over a run's epochs: the paper's "minimum test loss" (§3.3)."""
    return min(record["test_kl"] for record in history)


def best_runs(runs, top: int | None = None) -> list:
    """``runs`` (dicts with a ``history``) ordered by their minimum test KL, lowest first; the first ``top``."""
    return sorted(runs, key=lambda run: min_test_kl(run["history"]))[:top]


# ----------------------------------------------------------------------------------------------------------------
# several runs: hardtovary coinrun train
# ----------------------------------------------------------------------------------------------------------------


def label_folder_config(folder, data: CloningData) -> dict:
    """What a run folder records of the label folder it learns from: its ``labels.json`` and the levels read (a
    labelling still under way may have finished only some), not its path."""
    return {**labels.read_config(folder), "train_levels_read": data.train_levels,
            "test_levels_read": data.test_levels}


def steps_per_epoch(data: CloningData, config: CloningConfig) -> int:
    return len(epoch_batches(data.train_level, config.batch_size, config.seed, 0))


def run(out, labels_folder, configs: dict, *, device: str | None = None, fresh: bool = False,
        progress: bool = True, executor=None) -> dict:
    """Train every run of ``configs`` (``{name: CloningConfig}``) on the label folder ``labels_folder``, each a
    unit of the run folder ``out`` (resumed: finished runs are reused, a killed one resumes at its last epoch) on
    ``executor`` (:mod:`~hardtovary.experiments.executors`; this process when None), and write
    ``out/results.json``: ``config``, ``runs`` (per name the :func:`train_run` outcome) and ``summary``
    (:func:`summarize`). Returns the results."""
    out = Path(out)
    device = resolve_device(device)
    data = load_data_cached(labels_folder)
    folder = RunFolder(out, {"labels": label_folder_config(labels_folder, data),
                             "runs": {name: config.to_dict() for name, config in configs.items()}}, fresh=fresh)
    todo = {name: epochs_done(out / "runs" / name) for name in configs if folder.finished(name) is None}
    for name, done in todo.items():
        if done:
            note_resume(done, configs[name].epochs, f"epochs of run {name}", folder.root)
    units = [Unit(name, run_unit, (str(out / "runs" / name), str(labels_folder), config),
                  steps=(config.epochs - todo.get(name, 0)) * steps_per_epoch(data, config), label=name,
                  shows=("train_kl", "test_kl"), gpu=device.startswith("cuda"), options={"device": device})
             for name, config in configs.items()]
    results = {"config": folder.config,
               "runs": run_units(folder, units, executor, what="runs", progress=progress, where=folder.root)}
    results["summary"] = summarize(results["runs"].values())
    folder.write_results(results)
    return results


def run_unit(run_folder: str, labels_folder: str, config: CloningConfig, *, device: str, on_step=None,
             on_epoch=None) -> dict:
    """One run as a unit of :mod:`~hardtovary.experiments.executors`: the label folder read where the unit runs
    (a path travels, not the frames), :func:`train_run` checkpointing into ``run_folder``."""
    return train_run(run_folder, load_data_cached(labels_folder), config, device=device, on_step=on_step,
                     on_epoch=on_epoch)


def load_data_cached(folder) -> CloningData:
    """:func:`load_data`, read once per process while the folder's level files stay as they are: the paper's
    label folder holds about 0.8 GB of frames, and a process runs many units from it."""
    paths = [Path(folder) / labels.CONFIG_FILE, *(path for split in labels.SPLITS
                                                 for path in sorted((Path(folder) / split).glob("level_*.npz")))]
    files = tuple((str(path), path.stat().st_mtime_ns) for path in paths if path.exists())
    return _load_data_of(str(folder), files)


@functools.lru_cache(maxsize=1)
def _load_data_of(folder: str, files: tuple) -> CloningData:
    return load_data(folder)


#: The columns of the summary: name -> (what of a run's history it holds, its format in the table).
SUMMARY_COLUMNS = {
    "min_test_kl": (min_test_kl, ".4e"),
    "final_test_kl": (lambda history: history[-1]["test_kl"], ".4e"),
    "final_train_kl": (lambda history: history[-1]["train_kl"], ".4e"),
    "final_test_class_acc": (lambda history: history[-1]["test_class_acc"], ".3f"),
}


def summarize(runs) -> dict:
    """Per method, over its runs (e.g. seeds): the number of runs and ``[mean, std]`` (sample std, 0 for one
    run) of each of :data:`SUMMARY_COLUMNS`."""
    return {method: {"runs": len(group),
                     **{column: list(mean_std([value(r["history"]) for r in group]))
                        for column, (value, _) in SUMMARY_COLUMNS.items()}}
            for method, group in by_method(runs).items()}


def by_method(runs) -> dict:
    """``runs`` (dicts with a ``config``) grouped by method, in the order of :data:`METHODS`."""
    runs = list(runs)
    groups = {method: [r for r in runs if r["config"]["method"] == method] for method in METHODS}
    return {method: group for method, group in groups.items() if group}


def format_table(summary: dict) -> str:
    """The summary as a table, one row per method: mean ± std over its runs."""
    lines = [f"{'method':<10}{'runs':>5}" + "".join(f"{column.replace('_', ' '):>24}" for column in SUMMARY_COLUMNS)]
    for method, row in summary.items():
        cells = "".join(f"{format(row[column][0], fmt):>13} ± {format(row[column][1], '.1e'):<8}"
                        for column, (_, fmt) in SUMMARY_COLUMNS.items())
        lines.append(f"{method:<10}{row['runs']:>5}{cells.rstrip()}")
    return "\n".join(lines)
