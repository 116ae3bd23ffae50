"""The label folder of the CoinRun experiment: one file per level, written atomically, read back validated.

Layout of a label folder ``LABELS/``::

    config.json                the configuration that made it (levels, states, expert settings, Procgen version)
    results.json               what the labelling measured (the expert's success rates, time per decision)
    train/level_<seed>.npz     one file per training level
    test/level_<seed>.npz      one file per test level

A level file holds ``frames`` (uint8 ``[S, 64, 64, 3]``, the frames the expert saw), ``targets`` (float32
``[S, 15]``, the expert's action distribution, rows summing to 1), ``class_values`` (float32 ``[S, 6]``, the
planner's value of each action class), the level seed, the episodes played and solved (the first one greedy, the
others with exploration) and a JSON ``meta`` string (the package and version that rendered the frames, and
hardtovary's version). A level is a unit of work: a file that exists is finished, so a killed labelling run
resumes by skipping it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hardtovary.experiments.coinrun import game
from hardtovary.experiments.errors import UsageError
from hardtovary.experiments.runfolder import RunFolder, read_json, write_atomic

#: The format of label folders this version writes and reads.
FORMAT = 1
SPLITS = ("train", "test")
CONFIG_FILE = "config.json"


class LevelLabels(NamedTuple):
    """The labelled states of one level."""

    level: int
    frames: np.ndarray        # uint8 [S, 64, 64, 3]
    targets: np.ndarray       # float32 [S, 15], the expert's action distribution
    class_values: np.ndarray  # float32 [S, 6], the planner's value of each action class
    episodes: int             # episodes played on the level
    solved: int               # of which the agent reached the coin
    greedy_solved: bool       # whether the first, greedy, episode reached the coin
    meta: dict                # {"package", "version", "hardtovary", "seconds", ...}

    @property
    def expert_classes(self) -> np.ndarray:
        """The expert's preferred action class of each state (argmax of the class probabilities), ``[S]``."""
        return np.argmax(game.class_probabilities(self.targets), axis=-1)


def level_path(folder, split: str, level: int) -> Path:
    return Path(folder) / split / f"level_{int(level)}.npz"


def write_level(path, labels: LevelLabels) -> None:
    """Write one level's labels to ``path`` atomically."""
    arrays = dict(frames=np.asarray(labels.frames, dtype=np.uint8),
                  targets=np.asarray(labels.targets, dtype=np.float32),
                  class_values=np.asarray(labels.class_values, dtype=np.float32),
                  level=np.int64(labels.level), episodes=np.int64(labels.episodes), solved=np.int64(labels.solved),
                  greedy_solved=np.bool_(labels.greedy_solved), meta=np.str_(json.dumps(labels.meta)))
    write_atomic(Path(path), lambda f: np.savez_compressed(f, **arrays), binary=True)


def read_level(path) -> LevelLabels:
    """One level's labels, checked: shapes, dtypes, targets that are distributions. UsageError naming the file
    for one that is not a level file of this format."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            labels = LevelLabels(int(data["level"]), data["frames"], data["targets"], data["class_values"],
                                 int(data["episodes"]), int(data["solved"]), bool(data["greedy_solved"]),
                                 json.loads(str(data["meta"])))
    except (OSError, KeyError, ValueError) as exc:
        raise UsageError(f"{path} is not a CoinRun level file of this version ({type(exc).__name__}: {exc})") from None
    S = labels.frames.shape[0]
    problems = []
    if labels.frames.dtype != np.uint8 or labels.frames.shape[1:] != game.FRAME_SHAPE:
        problems.append(f"frames must be uint8 [S, 64, 64, 3], got {labels.frames.dtype} {labels.frames.shape}")
    if labels.targets.shape != (S, game.NUM_ACTIONS):
        problems.append(f"targets must be [{S}, {game.NUM_ACTIONS}], got {labels.targets.shape}")
    elif not (np.all(labels.targets >= 0) and np.allclose(labels.targets.sum(axis=1), 1.0, atol=1e-5)):
        problems.append("targets rows must be probability distributions")
    if labels.class_values.shape != (S, game.NUM_CLASSES):
        problems.append(f"class_values must be [{S}, {game.NUM_CLASSES}], got {labels.class_values.shape}")
    if problems:
        raise UsageError(f"{path}: " + "; ".join(problems))
    return labels


def open_folder(folder, config: dict, *, fresh: bool = False) -> RunFolder:
    """Create or reopen a label folder for ``config`` (its ``config.json`` gets the format added). A folder made
    with another version of the Procgen package is refused by name (its frames would be rendered differently),
    any other difference of configuration by :class:`RunFolder`; ``fresh`` deletes the folder first."""
    config = {"format": FORMAT, **config}
    path = Path(folder) / CONFIG_FILE
    if path.exists() and not fresh:
        stored = read_json(path)
        if stored.get("package") != config.get("package") or stored.get("version") != config.get("version"):
            raise UsageError(f"{folder} holds labels rendered by {stored.get('package')} {stored.get('version')}, "
                             f"this machine has {config.get('package')} {config.get('version')}: pass another --out "
                             f"folder, or --fresh to delete it and label again")
    return RunFolder(folder, config, fresh=fresh)


def read_config(folder) -> dict:
    """``config.json`` of a label folder; UsageError when the folder is not one, or one of another format."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise UsageError(f"{folder} is not a CoinRun label folder (no {CONFIG_FILE}); make one with "
                         f"'hardtovary coinrun label --out {folder}'")
    config = read_json(path)
    if config.get("format") != FORMAT:
        raise UsageError(f"{folder} holds labels of format {config.get('format')!r}, made by hardtovary "
                         f"{config.get('hardtovary', '?')}; this version reads format {FORMAT}: label again into a "
                         f"new folder")
    return config


def load_split(folder, split: str) -> list[LevelLabels]:
    """Every level of ``split`` ("train" or "test") in a label folder, in level order. UsageError for a folder
    that is not a label folder, a split with no finished level, or a level file that does not read."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    config = read_config(folder)
    levels = config.get(f"{split}_levels", [])
    present = [level for level in levels if level_path(folder, split, level).exists()]
    if not present:
        raise UsageError(f"{folder} has no finished {split} level yet (of {len(levels)}); run or resume "
                         f"'hardtovary coinrun label --out {folder}'")
    return [read_level(level_path(folder, split, level)) for level in present]


def stack(levels: list[LevelLabels]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All states of ``levels`` in one array each: frames ``[N, 64, 64, 3]``, targets ``[N, 15]`` and the level
    index (position in ``levels``) of each state ``[N]``."""
    frames = np.concatenate([lv.frames for lv in levels])
    targets = np.concatenate([lv.targets for lv in levels])
    index = np.concatenate([np.full(len(lv.frames), i) for i, lv in enumerate(levels)])
    return frames, targets, index


def write_random_labels(folder, *, train_levels, test_levels, states: int, test_states: int = 1,
                        seed: int = 0) -> Path:
    """A label folder in the real format with random frames and random targets (for tests and trying the
    cloning without Procgen): ``config.json`` and one file per level. Returns the folder."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    open_folder(folder, {"package": "random", "version": None, "train_levels": [int(x) for x in train_levels],
                         "test_levels": [int(x) for x in test_levels], "states": states, "test_states": test_states})
    for split, levels, count in (("train", train_levels, states), ("test", test_levels, test_states)):
        for level in levels:
            values = rng.uniform(0, game.COIN_REWARD, size=(count, game.NUM_CLASSES))
            z = np.exp(values - values.max(axis=1, keepdims=True))
            write_level(level_path(folder, split, level), LevelLabels(
                int(level), rng.integers(0, 256, size=(count, *game.FRAME_SHAPE), dtype=np.uint8),
                game.spread_over_actions(z / z.sum(axis=1, keepdims=True)), values, 1, 0, False,
                {"package": "random", "version": None}))
    return folder
