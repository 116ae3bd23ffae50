"""Procgen's CoinRun as the expert and the labels see it: the environment, its 15 actions grouped into the 6
classes that differ in CoinRun, and the agent's and the coin's positions read from a saved state.

Procgen comes from the PyPI package ``procgen2`` (``import procgen``), installed without its dependencies because
its metadata and gym3's pin ``numpy<2`` although both run with NumPy 2 (README, Quick start). Every environment here
is ``distribution_mode="easy"`` with the default rendering (64x64 RGB frames centred on the agent, backgrounds on).

Actions
-------
Procgen's 15 actions are key combinations: 0 LEFT+DOWN, 1 LEFT, 2 LEFT+UP, 3 DOWN, 4 NOOP, 5 UP, 6 RIGHT+DOWN,
7 RIGHT, 8 RIGHT+UP, 9-14 the keys D, A, W, S, Q, E. In CoinRun the six keys do nothing (bit-identical frames to
NOOP) and DOWN barely matters (it changes the frames in about a third of the states we probed, not the course of
the game), so the expert plans over six classes (:data:`ACTION_CLASSES`): LEFT {LEFT+DOWN, LEFT}, LEFT+UP, NOOP
{DOWN, NOOP, D, A, W, S, Q, E}, UP, RIGHT {RIGHT+DOWN, RIGHT}, RIGHT+UP. It acts with each class's first-named
action (:data:`CLASS_ACTIONS`), and its soft targets spread each class's probability evenly over the class's
actions (:func:`spread_over_actions`), the expert being indifferent between them.
"""

from __future__ import annotations

import importlib.metadata
from typing import NamedTuple

import numpy as np

from hardtovary.experiments.errors import UsageError

#: The distribution that provides ``import procgen``, and the version whose saved states :func:`positions` reads.
PACKAGE = "procgen2"
PACKAGE_VERSION = "0.10.7"
#: How to install it (the README's Quick start has the same line).
INSTALL = ("pip install 'hardtovary[coinrun]' && pip install --no-deps procgen2==0.10.7 gym3==0.3.3 gym==0.26.2 "
           "(from a checkout: '.[coinrun]'; --no-deps because procgen2's and gym3's metadata pin numpy<2, although "
           "both run with NumPy 2)")

NUM_ACTIONS = 15
ACTION_NAMES = ("LEFT+DOWN", "LEFT", "LEFT+UP", "DOWN", "NOOP", "UP", "RIGHT+DOWN", "RIGHT", "RIGHT+UP",
                "D", "A", "W", "S", "Q", "E")
#: The six action classes of CoinRun and Procgen's actions in each (the first is the one the expert plays).
ACTION_CLASSES = {"LEFT": (1, 0), "LEFT+UP": (2,), "NOOP": (4, 3, 9, 10, 11, 12, 13, 14), "UP": (5,),
                  "RIGHT": (7, 6), "RIGHT+UP": (8,)}
CLASS_NAMES = tuple(ACTION_CLASSES)
NUM_CLASSES = len(CLASS_NAMES)
CLASS_ACTIONS = np.array([members[0] for members in ACTION_CLASSES.values()])
#: The class of each of the 15 actions.
ACTION_CLASS = np.empty(NUM_ACTIONS, dtype=np.int64)
for _c, _members in enumerate(ACTION_CLASSES.values()):
    ACTION_CLASS[list(_members)] = _c
#: Frames are 64x64 RGB, uint8.
FRAME_SHAPE = (64, 64, 3)
#: CoinRun's reward for reaching the coin (the only reward; touching a hazard ends the episode with none).
COIN_REWARD = 10.0


def require_procgen():
    """The ``procgen`` module, or a UsageError saying how to install it."""
    try:
        import procgen
    except ImportError as exc:
        raise UsageError(f"CoinRun needs Procgen (the package {PACKAGE} {PACKAGE_VERSION}), which is not "
                         f"installed ({exc}); {INSTALL}") from None
    return procgen


def package_version() -> str | None:
    """The installed version of :data:`PACKAGE`, or None."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def make_env(level: int, num: int = 1):
    """``num`` copies of CoinRun level ``level`` (``num_levels=1``: every episode replays that level), easy mode.
    The copies are stepped together (``act`` takes ``num`` actions) and can be put into any saved state of the
    same level (``set_state``), after which they replay it exactly."""
    procgen = require_procgen()
    # num_threads=0 steps the copies in the calling thread: the labelling parallelises over processes instead
    return procgen.ProcgenGym3Env(num=num, env_name="coinrun", num_levels=1, start_level=int(level),
                                  distribution_mode="easy", rand_seed=int(level), num_threads=0)


def spread_over_actions(class_probs: np.ndarray) -> np.ndarray:
    """Class probabilities ``[..., 6]`` as probabilities over Procgen's 15 actions ``[..., 15]``: each class's
    probability split evenly among its actions."""
    class_probs = np.asarray(class_probs, dtype=np.float64)
    sizes = np.array([len(members) for members in ACTION_CLASSES.values()], dtype=np.float64)
    return (class_probs / sizes)[..., ACTION_CLASS]


def class_probabilities(action_probs: np.ndarray) -> np.ndarray:
    """Probabilities over the 15 actions ``[..., 15]`` summed within each class: ``[..., 6]``."""
    action_probs = np.asarray(action_probs)
    out = np.zeros(action_probs.shape[:-1] + (NUM_CLASSES,), dtype=action_probs.dtype)
    for c, members in enumerate(ACTION_CLASSES.values()):
        out[..., c] = action_probs[..., list(members)].sum(axis=-1)
    return out


# ---- positions from a saved state -----------------------------------------------------------------------------

class Positions(NamedTuple):
    """Where the agent and the coin are, in tiles (x to the right, y up)."""

    agent_x: float
    agent_y: float
    coin_x: float
    coin_y: float


#: Procgen's serialisation version of the states read below (the first int of a state; 0.10.7 writes 0).
STATE_VERSION = 0
_GOAL_TILE = 1      # CoinRun's grid value of the coin
_ENTITY_FIELDS = 31


class _Reader:
    """Little-endian 4-byte fields and length-prefixed strings, read in order from a saved state."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.offset = 0

    def ints(self, count: int, dtype: str = "<i4") -> np.ndarray:
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += 4 * count
        return out

    def int(self) -> int:
        return int(self.ints(1)[0])

    def skip(self, fields: int) -> None:
        self.offset += 4 * fields

    def string(self) -> bytes:
        size = self.int()
        self.offset += size
        return bytes(self.data[self.offset - size:self.offset])

    def skip_random_generator(self) -> None:
        self.skip(1)     # is_seeded
        self.string()    # the generator's state as text


def positions(state: bytes) -> Positions:
    """The agent's and the coin's positions in a CoinRun state from ``get_state()``.

    The expert's horizon value needs how far the coin still is, which a frame centred on the agent does not
    show. A state is Procgen's serialisation of the game (``Game::serialize`` then ``BasicAbstractGame::
    serialize`` in procgen 0.10.7), read here in order: the header (version, game name, 12 option ints, 5 ints,
    two random generators, reward/done/complete, 12 ints), the grid step, the entities (a count and 31 four-byte
    fields each, x and y first; the agent is entity 0), 24 fields of game settings with a third random generator
    among them, 9 more, and the grid (width, height, size, one int per tile, row-major from the bottom), in which
    the coin is the tile of value 1. Raises ValueError for a state that does not read as CoinRun's.
    """
    reader = _Reader(state)
    try:
        if reader.int() != STATE_VERSION:
            raise ValueError("unknown serialisation version")
        if reader.string() != b"coinrun":
            raise ValueError("not a CoinRun state")
        reader.skip(12 + 5)
        reader.skip_random_generator()
        reader.skip_random_generator()
        reader.skip(3 + 12 + 1)
        count = reader.int()
        agent = reader.ints(count * _ENTITY_FIELDS, "<f4")[:2]
        reader.skip(2 + 3 + 3 + 6 + 2 + 3)
        reader.skip_random_generator()
        reader.skip(3 + 6)
        width, height, size = reader.ints(3)
        if count < 1 or width < 1 or height < 1 or size != width * height:
            raise ValueError(f"{count} entities, a grid of {width}x{height} with {size} tiles")
        goal = np.flatnonzero(reader.ints(int(size)) == _GOAL_TILE)
        if goal.size != 1:
            raise ValueError(f"{goal.size} coins")
    except ValueError as exc:
        raise ValueError(f"the state does not read as a CoinRun state of {PACKAGE} {PACKAGE_VERSION}: {exc}") from None
    coin_y, coin_x = divmod(int(goal[0]), int(width))
    return Positions(float(agent[0]), float(agent[1]), coin_x + 0.5, coin_y + 0.5)
