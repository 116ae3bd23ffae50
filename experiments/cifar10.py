"""CIFAR-10 memorization and label noise (paper §3.2, Figs. 8, 9, 16, App. B.5), on CIFAR-10 or on scikit-learn's
8x8 digits.

``hardtovary cifar10 --data DIR --experiment memorization`` trains FastResNet for every tau of the grid on the
original labels and on random labels (Fig. 8: train accuracy vs tau; Fig. 16: test accuracy vs tau).
``--experiment label-noise`` trains on labels of which 25% were re-drawn (Fig. 9: train accuracy, accuracy on the
mislabeled portion against the noisy labels, and test accuracy per epoch, with the chance line).

``--dataset digits`` runs the same experiments, commands and run folders on the 1797 8x8 digits that scikit-learn
ships (:mod:`hardtovary.experiments.digits`: split, normalisation) with :class:`~hardtovary.accel.torch.models.
DigitsResNet`, FastResNet sized for 8x8 images, and defaults that fit a CPU (:data:`PROFILES`), where CIFAR-10's
grid is GPU work. ``--seeds N`` trains every trial for N seeds in one run folder; the table and
the figures then give the mean and standard deviation over seeds.

Every example is its own environment (K = batch size = 80). The forward pass runs in train mode on the whole
batch, so BatchNorm statistics are pooled over the 80 "environments" (the authors' code), and the per-example
gradients are the exact gradients through the shared statistics (:func:`hardtovary.accel.torch.optim.
and_mask_backward` with ``semantics="pooled"``). tau = 0 is a plain ``loss.backward()`` of the batch mean, as in
the authors' code (the same gradient as averaging the per-example ones, at a fraction of the cost).

Where the paper and the authors' code differ, and what this module does:

============================  ===============================  ===============================  ==============
setting                       paper                            authors' code                    here
============================  ===============================  ===============================  ==============
LR schedule (memorization)    x0.1 at epochs 40 and 60         one x0.1 at 3/4 of the           code (one at
                                                               iterations (epoch 60 of 80)      3/4 of epochs;
                                                                                                ``--lr-milestones
                                                                                                40,60`` for the
                                                                                                paper's)
LR schedule (label noise)     decay at epoch 60                same (3/4 of 80)                 same
weight decay                  not mentioned                    1e-6, 'before' (coupled Adam)    code
rescaling                     not mentioned                    scale_grad_inverse_sparsity=1    code (on for
                                                                                                tau > 0)
normalisation, augmentation   not mentioned                    ImageNet mean/std, none          code
"randomly shuffled" labels    shuffled                         a fraction of the indices (w/o   code
                                                               replacement) gets a uniform      (randomize_labels)
                                                               label in 0..9 (may equal truth)
label-noise learning rates    Adam 1e-3, AND-mask 5e-3         --                               paper's best
                              (tau = 0.2)                                                       (per trial)
============================  ===============================  ===============================  ==============

Choices of this module where neither source is explicit: the last incomplete batch of an epoch is dropped, so
that every step has exactly K = batch size environments and tau means the same agreement count every step; the
epoch's order is a permutation seeded by ``seed`` and the epoch (so a resumed run sees the same order); accuracies
are measured after each epoch in eval mode (running BatchNorm statistics) over the whole training set, the
mislabeled portion and the test set; the learning rate of epoch ``e`` (0-based) is ``lr * 0.1 ** #{m <= e}``.

Each trial has its own folder ``OUT/trials/<name>/`` with ``checkpoint.pt`` (model, optimizer state, history,
epochs done) and ``history.json``, both written atomically at the end of every epoch, so a killed run resumes at
the last finished epoch; a finished trial is ``OUT/units/<name>.json``. Each epoch's record also holds
``kept_fraction``, the mean over the epoch's steps of the fraction of gradient components the AND-mask kept (None
at tau = 0). The loader uses :mod:`pickle`, as the official "python version" of the data set requires: only load
files from a source you trust.
"""

from __future__ import annotations

import functools
import math
import pickle
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hardtovary.experiments.errors import UsageError
from hardtovary.experiments.executors import Unit, run_units
from hardtovary.experiments.progress import note_resume
from hardtovary.experiments.runfolder import RunFolder, write_atomic, write_json_atomic
from hardtovary.experiments.stats import mean_std
from hardtovary.reference.optim import multistep_lr

__all__ = ["CIFAR10", "TRAIN_FILES", "TEST_FILE", "META_FILE", "EXPERIMENTS", "TAUS", "MEAN", "STD", "DATASETS",
           "Profile", "PROFILES", "profile_of", "load_cifar10", "load_data", "write_random_cifar10", "randomize_labels",
           "trials_for", "train_step", "train_trial", "run", "summarize", "format_table", "plot_results"]

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
#: ImageNet mean and standard deviation per channel (R, G, B), on images scaled to [0, 1] (the authors' code).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 10
#: The tau grid of Fig. 8.
TAUS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)
EXPERIMENTS = ("memorization", "label-noise")
#: Label-noise experiment (Fig. 9): 25% of the labels re-drawn; the paper's best settings per method.
NOISE_FRACTION = 0.25
LABEL_NOISE_TAUS = (0.0, 0.2)
LABEL_NOISE_LR = {"baseline": 1e-3, "and_mask": 5e-3}
MEMORIZATION_LR = 5e-4


class Profile(NamedTuple):
    """What differs between the data sets of the experiments: the network (a class of
    :mod:`hardtovary.accel.torch.models`, built as ``model(10, width=width)``) and the defaults of the options."""

    model: str
    epochs: int
    batch_size: int
    width: float
    n_train: int | None        # None: every training image
    memorization_lr: float
    label_noise_taus: tuple
    label_noise_lr: dict       # {"baseline": tau = 0, "and_mask": tau > 0}


#: CIFAR-10: the paper's settings (App. B.5). Digits: sized so that the memorization grid of one seed takes minutes
#: on one CPU core (docs/results.md, "Memorization on the digits", says how they were chosen). 32 examples per step
#: instead of 80, since the exact per-example gradients through pooled BatchNorm cost a backward pass per example
#: over the whole batch (O(K^2) per step); the first 512 training images; one learning rate for every trial, so
#: that the label-noise comparison isolates the mask (the paper's 5x larger rate for the AND-mask came from its own
#: search); tau 0.4 besides the paper's 0.2, since with K = 32 agreement by chance is likelier (random signs pass
#: tau = 0.2 at K = 32 with probability 0.22, at K = 80 with 0.09; tau = 0.4 at K = 32 with 0.02).
PROFILES = {
    "cifar10": Profile("FastResNet", 80, 80, 1.0, None, MEMORIZATION_LR, LABEL_NOISE_TAUS, LABEL_NOISE_LR),
    "digits": Profile("DigitsResNet", 40, 32, 0.5, 512, 5e-3, (0.0, 0.2, 0.4), {"baseline": 5e-3, "and_mask": 5e-3}),
}
DATASETS = tuple(PROFILES)


def profile_of(dataset: str) -> Profile:
    """The :class:`Profile` of ``dataset``; a :class:`UsageError` naming the data sets for any other name."""
    if dataset not in PROFILES:
        raise UsageError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    return PROFILES[dataset]


class CIFAR10(NamedTuple):
    """``X_*`` float32 ``[N, 3, 32, 32]`` (normalised; ``[N, 1, 8, 8]`` for the digits), ``y_*`` int64 ``[N]``,
    ``classes`` the label names."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError) as exc:
        raise UsageError(f"{path} is not a CIFAR-10 python batch (cannot unpickle it: {exc})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} is not a CIFAR-10 python batch (a pickled dict), got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise UsageError(f"{path} is not a CIFAR-10 python batch: it has no {key!r} entry")
    data = np.asarray(batch["data"])
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError):
        raise UsageError(f"{path}: 'labels' must be a list of integers") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UsageError(f"{path}: 'data' must have shape [N, 3072], got {data.shape}")
    if data.dtype != np.uint8:
        raise UsageError(f"{path}: 'data' must be uint8, got {data.dtype}")
    if labels.shape != (data.shape[0],):
        raise UsageError(f"{path}: 'labels' must hold one label per row of 'data' ({data.shape[0]}), "
                         f"got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise UsageError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    return data, labels


def _normalise(data: np.ndarray) -> np.ndarray:
    """uint8 rows ``[N, 3072]`` (1024 red, 1024 green, 1024 blue, each 32x32 row-major) -> float32
    ``[N, 3, 32, 32]``, ``(x / 255 - MEAN) / STD`` per channel."""
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(MEAN, dtype=np.float32)[None, :, None, None]
    std = np.asarray(STD, dtype=np.float32)[None, :, None, None]
    return (x - mean) / std


def load_cifar10(directory, *, n_train: int | None = None, n_test: int | None = None) -> CIFAR10:
    """Load the CIFAR-10 "python version" batches from ``directory`` (``data_batch_1`` .. ``data_batch_5``,
    ``test_batch``, ``batches.meta``: the official archive ``cifar-10-python.tar.gz`` unpacked, i.e. its
    ``cifar-10-batches-py/`` folder). ``n_train`` / ``n_test`` keep the first examples only (quick runs).

    Raises FileNotFoundError naming the directory and every missing file, UsageError (a ValueError) for malformed
    files.
    """
    directory = Path(directory)
    expected = (*TRAIN_FILES, TEST_FILE, META_FILE)
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 data directory {directory} lacks {', '.join(missing)} (expected {', '.join(expected)}). "
            "Download the official 'CIFAR-10 python version' archive (cifar-10-python.tar.gz, "
            "https://www.cs.toronto.edu/~kriz/cifar.html), unpack it (tar xzf cifar-10-python.tar.gz) and pass "
            "the resulting cifar-10-batches-py/ folder as --data.")
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{name} must be a positive integer or None, got {value!r}")
    meta = _unpickle(directory / META_FILE)
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        raise UsageError(f"{directory / META_FILE}: 'label_names' must list {NUM_CLASSES} class names")
    classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)

    parts, labels, have = [], [], 0
    for name in TRAIN_FILES:
        if n_train is not None and have >= n_train:
            break
        data, y = _read_batch(directory / name)
        parts.append(data)
        labels.append(y)
        have += len(y)
    train_data, y_train = np.concatenate(parts), np.concatenate(labels)
    test_data, y_test = _read_batch(directory / TEST_FILE)
    if n_train is not None:
        if n_train > len(y_train):
            raise UsageError(f"n_train = {n_train} exceeds the {len(y_train)} training examples in {directory}")
        train_data, y_train = train_data[:n_train], y_train[:n_train]
    if n_test is not None:
        if n_test > len(y_test):
            raise UsageError(f"n_test = {n_test} exceeds the {len(y_test)} test examples in {directory}")
        test_data, y_test = test_data[:n_test], y_test[:n_test]
    return CIFAR10(_normalise(train_data), y_train, _normalise(test_data), y_test, classes)


def load_data(dataset: str, data_dir=None, *, n_train: int | None = None, n_test: int | None = None) -> CIFAR10:
    """The data of ``dataset``: CIFAR-10 from ``data_dir`` (:func:`load_cifar10`), or the digits, which need no
    ``data_dir`` (:func:`hardtovary.experiments.digits.load_digits`)."""
    profile_of(dataset)
    if dataset == "digits":
        if data_dir is not None:
            raise UsageError("--data is for CIFAR-10 only: the digits come with scikit-learn")
        from hardtovary.experiments.digits import load_digits

        return load_digits(n_train=n_train, n_test=n_test)
    if data_dir is None:
        raise UsageError("--data DIR (the unpacked cifar-10-batches-py/) is required with --dataset cifar10")
    return load_cifar10(data_dir, n_train=n_train, n_test=n_test)


def randomize_labels(labels, fraction: float, rng: np.random.Generator, num_classes: int = NUM_CLASSES):
    """The authors' label randomisation: ``round(fraction * N)`` indices, drawn without replacement, get a label
    drawn uniformly from ``0..num_classes-1`` (which may equal the true one). Returns ``(new_labels,
    changed_mask)``; ``changed_mask`` (the "mislabeled portion") marks the indices whose label actually changed.
    ``fraction = 1`` gives the random labels of the memorization experiment (about 90% changed)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d integer array, got shape {labels.shape} dtype {labels.dtype}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    n = labels.shape[0]
    count = int(round(fraction * n))
    chosen = rng.choice(n, size=count, replace=False)
    new = labels.astype(np.int64, copy=True)
    new[chosen] = rng.integers(0, num_classes, size=count)
    return new, new != labels


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------


def trials_for(experiment: str, taus=None, lr: float | None = None, seed: int = 0, dataset: str = "cifar10") -> dict:
    """The trials of an experiment: ``{name: {"labels", "noise_fraction", "tau", "lr", "seed"}}``.
    memorization: every tau x {original, random} labels; label-noise: every tau on 25%-noisy labels. The default
    taus and learning rates are the data set's (:data:`PROFILES`; CIFAR-10: lr 5e-4 for memorization, label noise
    at tau 0 and 0.2 with lr 1e-3 for tau = 0 and 5e-3 otherwise, the paper's best). ``lr`` overrides."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {list(EXPERIMENTS)}, got {experiment!r}")
    profile = profile_of(dataset)
    taus = tuple(TAUS if experiment == "memorization" else profile.label_noise_taus) if taus is None else tuple(taus)
    if not taus or any(not 0.0 <= float(t) <= 1.0 for t in taus):
        raise ValueError(f"taus must be a non-empty list of values in [0, 1], got {taus!r}")
    if seed < 0:
        raise UsageError(f"seed must be an integer >= 0, got {seed!r}")
    trials = {}
    if experiment == "memorization":
        for labels, fraction in (("original", 0.0), ("random", 1.0)):
            for tau in taus:
                trials[f"{labels}-tau{float(tau):g}-seed{seed}"] = {
                    "labels": labels, "noise_fraction": fraction, "tau": float(tau),
                    "lr": profile.memorization_lr if lr is None else float(lr), "seed": int(seed)}
    else:
        for tau in taus:
            default = profile.label_noise_lr["baseline" if float(tau) == 0 else "and_mask"]
            trials[f"noisy-tau{float(tau):g}-seed{seed}"] = {
                "labels": "noisy", "noise_fraction": NOISE_FRACTION, "tau": float(tau),
                "lr": default if lr is None else float(lr), "seed": int(seed)}
    return trials


def train_step(model, optimizer, X, Y, *, tau: float, rescale: bool):
    """One step on a batch of images ``X[B, C, H, W]``, ``Y[B]``: every example its own environment, BatchNorm
    pooled over the batch. tau = 0: plain backward of the mean loss; tau > 0: per-example AND-mask. Returns the mean
    loss (float) and the fraction of gradient components the mask kept (None at tau = 0)."""
    import torch.nn.functional as F

    from hardtovary.accel.torch.optim import and_mask_backward

    optimizer.zero_grad(set_to_none=True)
    kept = None
    if tau == 0:
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
    else:
        loss, masks = and_mask_backward(model, X[:, None], Y[:, None], F.cross_entropy, rule="and_mask", tau=tau,
                                        rescale=rescale, semantics="pooled")
        kept = float(sum(m.sum() for m in masks)) / sum(m.numel() for m in masks)
    optimizer.step()
    return float(loss.detach()), kept


def _accuracy(model, X, y, device, batch: int = 500) -> float | None:
    import torch

    if len(y) == 0:
        return None
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch):
            xb = torch.as_tensor(X[start:start + batch], device=device)
            pred = model(xb).argmax(1).cpu().numpy()
            correct += int((pred == y[start:start + batch]).sum())
    return correct / len(y)


def _save_checkpoint(path: Path, obj) -> None:
    import torch

    write_atomic(path, lambda f: torch.save(obj, f), binary=True)


def lr_at(base: float, epoch: int, milestones) -> float:
    """Learning rate of 0-based ``epoch``: ``base * 0.1 ** #{m in milestones: m <= epoch}``."""
    return multistep_lr(base, epoch, milestones, 0.1)


def train_trial(folder: Path, data: CIFAR10, trial: dict, *, epochs: int, width: float, batch_size: int,
                milestones, weight_decay: float, rescale: bool, device: str = "cpu", dataset: str = "cifar10",
                on_step=None, on_epoch=None) -> dict:
    """Train one trial, resuming from ``folder/checkpoint.pt``, with the network of ``dataset``'s profile. Returns
    ``{"history", "final", "seconds", "n_mislabeled"}``. ``history`` has one record per epoch: ``epoch`` (1-based),
    ``lr``, ``train_loss``, ``train_acc`` (against the labels trained on), ``mislabeled_acc`` (against the noisy
    labels; None without mislabeled examples), ``mislabeled_true_acc`` (against the true labels), ``test_acc``,
    ``kept_fraction`` (mean over the epoch's steps; None at tau = 0)."""
    import torch

    from hardtovary.accel.torch import models
    from hardtovary.accel.torch.optim import make_optimizer

    folder = Path(folder)
    n = len(data.y_train)
    if batch_size < 2 or batch_size > n:
        raise UsageError(f"batch_size must lie in 2..{n} (BatchNorm needs 2 rows; one full batch of the {n} "
                         f"training examples), got {batch_size}")
    seed = trial["seed"]
    labels, changed = randomize_labels(data.y_train, trial["noise_fraction"], np.random.default_rng(seed))
    torch.manual_seed(seed)
    model = getattr(models, PROFILES[dataset].model)(NUM_CLASSES, width=width).to(device)
    optimizer = make_optimizer(model.parameters(), "adam", lr=trial["lr"], weight_decay=weight_decay,
                               weight_decay_order="before")
    history, seconds, done = [], 0.0, 0
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, seconds, done = state["history"], state["seconds"], state["epochs_done"]
    X_train = torch.as_tensor(data.X_train)
    Y_train = torch.as_tensor(labels)
    steps = n // batch_size
    for epoch in range(done, epochs):
        start = time.perf_counter()
        lr = lr_at(trial["lr"], epoch, milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        model.train()
        losses, kept = [], []
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            loss, kept_step = train_step(model, optimizer, X_train[idx].to(device), Y_train[idx].to(device),
                                         tau=trial["tau"], rescale=rescale)
            losses.append(loss)
            if kept_step is not None:
                kept.append(kept_step)
            if on_step is not None:
                on_step()
        model.eval()
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": float(np.mean(losses)),
                  "train_acc": _accuracy(model, data.X_train, labels, device),
                  "mislabeled_acc": _accuracy(model, data.X_train[changed], labels[changed], device),
                  "mislabeled_true_acc": _accuracy(model, data.X_train[changed], data.y_train[changed], device),
                  "test_acc": _accuracy(model, data.X_test, data.y_test, device),
                  "kept_fraction": float(np.mean(kept)) if kept else None}
        history.append(record)
        seconds += time.perf_counter() - start
        _save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "history": history, "seconds": seconds, "epochs_done": epoch + 1})
        write_json_atomic(folder / "history.json", history)
        if on_epoch is not None:
            on_epoch(record)
    return {"history": history, "final": history[-1] if history else None, "seconds": seconds,
            "n_mislabeled": int(changed.sum())}


def write_random_cifar10(directory, *, n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Path:
    """Write uniformly random images and labels in the official "python version" layout (``data_batch_1`` ..
    ``data_batch_5``, ``test_batch``, ``batches.meta``) into ``directory`` and return it: a stand-in with the real
    data set's shapes for timings and smoke runs on machines without the real files (it teaches nothing).
    ``n_train`` is split over the five training batches as evenly as possible."""
    directory = Path(directory)
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 5:
            raise ValueError(f"{name} must be an integer >= 5, got {value!r}")
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [len(part) for part in np.array_split(np.arange(n_train), len(TRAIN_FILES))]
    for name, size in zip((*TRAIN_FILES, TEST_FILE), (*sizes, n_test)):
        batch = {b"batch_label": b"random", b"labels": rng.integers(0, NUM_CLASSES, size).tolist(),
                 b"data": rng.integers(0, 256, (size, 3 * 32 * 32), dtype=np.uint8),
                 b"filenames": [b"random.png"] * size}
        write_atomic(directory / name, lambda f, batch=batch: pickle.dump(batch, f), binary=True)
    meta = {b"label_names": [f"random{i}".encode() for i in range(NUM_CLASSES)], b"num_vis": 3 * 32 * 32}
    write_atomic(directory / META_FILE, lambda f: pickle.dump(meta, f), binary=True)
    return directory


def run(out, data_dir=None, *, dataset: str = "cifar10", experiment: str = "memorization", taus=None,
        epochs: int | None = None, n_train=None, n_test=None, width: float | None = None,
        batch_size: int | None = None, lr: float | None = None, lr_milestones=None, weight_decay: float = 1e-6,
        rescale: bool = True, seed: int = 0, seeds: int = 1, device: str | None = None, fresh: bool = False,
        progress: bool = True, executor=None) -> dict:
    """Run every trial of ``experiment`` on ``dataset`` for the seeds ``seed .. seed + seeds - 1`` (resuming from
    ``out``) and write ``out/results.json``: ``config`` and ``trials`` (per trial its settings, ``final`` record,
    ``history`` and ``seconds``). ``data_dir`` is CIFAR-10's folder (None for the digits). ``epochs``,
    ``n_train``, ``width``, ``batch_size`` None take the data set's defaults (:data:`PROFILES`).
    ``lr_milestones`` None means one at 3/4 of the epochs (the authors' code). The trials are units of
    :mod:`~hardtovary.experiments.executors` on ``executor`` (this process when None); each checkpoints every
    epoch into ``out/trials/<trial>/``, which a worker on another machine reaches only through a shared
    filesystem (without one, a trial interrupted there starts again from its first epoch)."""
    import torch

    out = Path(out)
    profile = profile_of(dataset)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"seeds must be an integer >= 1, got {seeds!r}")
    data_dir = None if data_dir is None else str(data_dir)
    epochs = profile.epochs if epochs is None else epochs
    n_train = profile.n_train if n_train is None else n_train
    width = profile.width if width is None else width
    batch_size = profile.batch_size if batch_size is None else batch_size
    trials = {name: trial for s in range(seed, seed + seeds)
              for name, trial in trials_for(experiment, taus, lr, s, dataset).items()}
    milestones = tuple(int(m) for m in ((3 * epochs // 4,) if lr_milestones is None else lr_milestones)
                       if int(m) >= 1)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {"dataset": dataset, "epochs": int(epochs), "width": float(width), "batch_size": int(batch_size),
                "lr_milestones": list(milestones), "weight_decay": float(weight_decay), "rescale": bool(rescale),
                "n_train": n_train, "n_test": n_test}
    config = {"experiment": experiment, **settings, "trials": trials}
    data = _load_data_once(dataset, data_dir, n_train, n_test)
    folder = RunFolder(out, config, fresh=fresh)
    steps = len(data.y_train) // batch_size
    todo = {}
    for name in trials:
        if folder.finished(name) is None:
            ckpt = out / "trials" / name / "checkpoint.pt"
            done = torch.load(ckpt, map_location="cpu", weights_only=False)["epochs_done"] if ckpt.exists() else 0
            todo[name] = done
    for name, done in todo.items():
        if done:
            note_resume(done, epochs, f"epochs of trial {name}", folder.root)
    options = {"dataset": dataset, "data_dir": data_dir, "n_train": n_train,
               "n_test": n_test, "epochs": epochs, "width": width, "batch_size": batch_size, "milestones": milestones,
               "weight_decay": weight_decay, "rescale": rescale, "device": device}
    units = [Unit(name, trial_unit, (str(out / "trials" / name), trial), steps=(epochs - todo.get(name, 0)) * steps,
                  label=name, shows=("train_acc", "test_acc"), gpu=device.startswith("cuda"), options=options)
             for name, trial in trials.items()]
    stored = run_units(folder, units, executor, what="trials", progress=progress, where=folder.root)
    results = {"config": config, "trials": stored}
    folder.write_results(results)
    return results


@functools.lru_cache(maxsize=1)
def _load_data_once(dataset: str, data_dir: str | None, n_train, n_test) -> CIFAR10:
    """:func:`load_data`, read once per process: the driver and every trial a process runs share it (CIFAR-10's
    batches take seconds to read; the trials never write into the arrays, they copy the labels they change)."""
    return load_data(dataset, data_dir, n_train=n_train, n_test=n_test)


def trial_unit(folder: str, trial: dict, *, dataset: str, data_dir: str | None, n_train, n_test, on_step=None,
               on_epoch=None, **settings) -> dict:
    """One trial as a unit of :mod:`~hardtovary.experiments.executors`: the data loaded where the unit runs (so
    that a worker receives a path, not the arrays), :func:`train_trial` checkpointing into ``folder``, and the
    record stored for the trial."""
    data = _load_data_once(dataset, data_dir, n_train, n_test)
    return {**trial, **train_trial(Path(folder), data, trial, dataset=dataset, on_step=on_step, on_epoch=on_epoch,
                                   **settings)}


#: The final-record fields summarised over seeds.
SUMMARY_KEYS = ("train_acc", "mislabeled_acc", "test_acc", "kept_fraction")


def summarize(results: dict) -> list[dict]:
    """The trials grouped over seeds: one row per (labels, tau, lr), in the order of the trials, with ``seeds``
    (how many), and per field of :data:`SUMMARY_KEYS` the mean and sample standard deviation of the final records
    (``{key}_mean``, ``{key}_std``; None where the field is None, e.g. no mislabeled examples, tau = 0's
    kept fraction), ``seconds_mean`` and ``histories`` (the seeds' per-epoch records)."""
    groups: dict = {}
    for r in results["trials"].values():
        groups.setdefault((r["labels"], r["tau"], r["lr"]), []).append(r)
    rows = []
    for (labels, tau, lr), runs in groups.items():
        row = {"labels": labels, "tau": tau, "lr": lr, "seeds": len(runs),
               "seconds_mean": mean_std([r["seconds"] for r in runs])[0],
               "histories": [r["history"] for r in runs]}
        for key in SUMMARY_KEYS:
            values = [(r["final"] or {}).get(key) for r in runs]
            mean, std = (None, None) if None in values else mean_std(values)
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        rows.append(row)
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_mean_std(row: dict, key: str) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    return "-" if mean is None else f"{mean:.3f} ± {std:.3f}"


def format_table(results: dict) -> str:
    """Final accuracies, one row per trial; with several seeds, then their mean ± std per setting."""
    lines = [f"{'trial':<26}{'labels':>9}{'tau':>6}{'lr':>9}{'train acc':>11}{'mislabeled acc':>16}"
             f"{'test acc':>10}{'kept':>7}{'seconds':>9}"]
    for name, r in results["trials"].items():
        f = r["final"] or {}
        lines.append(f"{name:<26}{r['labels']:>9}{r['tau']:>6.2f}{r['lr']:>9.0e}{_fmt(f.get('train_acc')):>11}"
                     f"{_fmt(f.get('mislabeled_acc')):>16}{_fmt(f.get('test_acc')):>10}"
                     f"{_fmt(f.get('kept_fraction')):>7}{r['seconds']:>9.1f}")
    rows = summarize(results)
    if any(row["seeds"] > 1 for row in rows):
        lines += ["", "mean ± std over seeds (sample std)",
                  f"{'labels':<9}{'tau':>6}{'lr':>9}{'seeds':>6}{'train acc':>16}{'mislabeled acc':>16}"
                  f"{'test acc':>16}{'kept':>16}"]
        for row in rows:
            lines.append(f"{row['labels']:<9}{row['tau']:>6.2f}{row['lr']:>9.0e}{row['seeds']:>6}"
                         + "".join(f"{_fmt_mean_std(row, key):>16}" for key in SUMMARY_KEYS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------------


def plot_results(results: dict, out) -> list[Path]:
    """Figures in the manner of the paper, as PNGs in ``out``: memorization -> ``fig8_train_acc_vs_tau.png``
    (train accuracy vs tau, original and random labels) and ``fig16_test_acc_vs_tau.png``; label-noise ->
    ``fig9_label_noise.png`` (train accuracy, accuracy on the mislabeled portion against the noisy labels and test
    accuracy per epoch, chance line). With several seeds: their mean, with error bars (memorization) or a band
    (label noise) of one standard deviation. Returns the paths written ([] without matplotlib)."""
    from hardtovary.experiments.plots import matplotlib_pyplot, save_figure

    plt = matplotlib_pyplot()
    if plt is None:
        return []
    out = Path(out)
    rows = summarize(results)
    seeds = max(row["seeds"] for row in rows)
    where = f"{results['config'].get('dataset', 'cifar10')}, " + (f"mean ± std over {seeds} seeds" if seeds > 1
                                                                  else "one seed")
    written = []
    if results["config"]["experiment"] == "memorization":
        taus = sorted({row["tau"] for row in rows})
        for key, filename, title in (("train_acc", "fig8_train_acc_vs_tau.png", "training accuracy"),
                                     ("test_acc", "fig16_test_acc_vs_tau.png", "test accuracy")):
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            for labels in ("original", "random"):
                points = {row["tau"]: row for row in rows if row["labels"] == labels}
                ax.errorbar([str(t) for t in taus], [points[t][f"{key}_mean"] if t in points else math.nan
                                                     for t in taus],
                            yerr=[points[t][f"{key}_std"] if t in points else math.nan for t in taus], marker="o",
                            capsize=3, label=f"{labels} labels")
            ax.axhline(1 / NUM_CLASSES, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("tau")
            ax.set_ylabel(title)
            ax.set_title(where, fontsize=9)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            written.append(save_figure(fig, out / filename))
    else:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), sharey=True)
        panels = (("train_acc", "training accuracy (noisy labels)"),
                  ("mislabeled_acc", "mislabeled portion (noisy labels)"), ("test_acc", "test accuracy"))
        last = 1
        for row in rows:
            n = min(len(h) for h in row["histories"])
            epochs = [record["epoch"] for record in row["histories"][0][:n]]
            last = max([last, *epochs])
            name = "Adam" if row["tau"] == 0 else f"AND-mask (tau={row['tau']:g})"
            for ax, (key, _) in zip(axes, panels):
                values = np.array([[math.nan if record[key] is None else record[key] for record in h[:n]]
                                   for h in row["histories"]])
                mean = values.mean(axis=0)
                (line,) = ax.plot(epochs, mean, label=name)
                if row["seeds"] > 1:
                    std = values.std(axis=0, ddof=1)
                    ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        for ax, (_, title) in zip(axes, panels):
            ax.plot([0, last], [1 / NUM_CLASSES] * 2, color="grey", ls="--", lw=1, label="Random")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"accuracy ({where})")
        axes[2].legend(loc="best")
        fig.tight_layout()
        written.append(save_figure(fig, out / "fig9_label_noise.png"))
    return written
