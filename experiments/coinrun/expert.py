"""The expert of the CoinRun experiment: Monte-Carlo planning on saved states.

The paper's expert is PPO trained for 400M steps (App. B.6), whose weights are not public; ours plans instead.
CoinRun is deterministic given a saved state and the actions, so from the state of a decision the planner tries
each of the 6 action classes (:data:`~.game.ACTION_CLASSES`): it restores the state in ``6 * rollouts`` copies of
the level, holds each class's action for ``hold`` frames in ``rollouts`` copies, then lets every copy follow the
heuristic policy (:data:`HEURISTIC`, random macro-actions that favour running and jumping right) for ``depth``
frames. A rollout's return, in CoinRun's reward units, is

* ``10 * gamma**t`` if it reaches the coin at frame t (counted from the decision),
* 0 if it dies first (a saw, an enemy or lava ends the episode with no reward),
* ``10 * gamma**(T + dx / AGENT_SPEED)`` if it is still going at the horizon T = hold + depth, where dx is the
  horizontal distance left to the coin (read from the saved state, :func:`~.game.positions`): the return of
  running straight there.

A class's value is the **best** return of its rollouts: each rollout is an action sequence that achieves its
return, so the best one is what the expert knows it can get after that class. The soft target is a softmax of
the class values at ``temperature`` (reward units), spread evenly over each class's actions
(:func:`~.game.spread_over_actions`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hardtovary.experiments.coinrun import game
from hardtovary.reference.validate import in_range, integer, positive

#: The heuristic rollout policy: probability of each action class, in CLASS_NAMES order (LEFT, LEFT+UP, NOOP, UP,
#: RIGHT, RIGHT+UP), each draw held for ``hold`` frames. Alone it solves about 70% of easy levels.
HEURISTIC = np.array([0.05, 0.05, 0.10, 0.10, 0.35, 0.35])
#: The agent's top horizontal speed, tiles per frame (CoinRun reaches it after a few frames of running).
AGENT_SPEED = 0.25


@dataclass(frozen=True)
class ExpertSettings:
    """How the expert plans and explores; every field is recorded with the labels."""

    rollouts: int = 8           # heuristic rollouts per action class
    depth: int = 96             # frames of each rollout after the class's hold
    hold: int = 4               # frames each decision (and each heuristic macro-action) holds its action
    gamma: float = 0.99         # discount per frame
    temperature: float = 0.25   # of the softmax over class values, in reward units
    epsilon: float = 0.2        # probability of a random action class per decision, after the first episode

    def __post_init__(self):
        for name in ("rollouts", "depth", "hold"):
            object.__setattr__(self, name, integer(getattr(self, name), name, low=1))
        object.__setattr__(self, "gamma", in_range(self.gamma, "gamma", 0.0, 1.0))
        object.__setattr__(self, "temperature", positive(self.temperature, "temperature"))
        object.__setattr__(self, "epsilon", in_range(self.epsilon, "epsilon", 0.0, 1.0))

    def to_dict(self) -> dict:
        return asdict(self)


def soft_targets(values: np.ndarray, temperature: float) -> np.ndarray:
    """The expert's action distribution ``[15]`` from class values ``[6]``: ``softmax(values / temperature)``,
    spread evenly over each class's actions."""
    z = (np.asarray(values, dtype=np.float64) - np.max(values)) / temperature
    p = np.exp(z)
    return game.spread_over_actions(p / p.sum())


def horizon_return(dx: float, frames: int, gamma: float) -> float:
    """The return of a rollout still going after ``frames`` frames with ``dx`` tiles left to the coin."""
    return game.COIN_REWARD * gamma ** (frames + abs(dx) / AGENT_SPEED)


class Planner:
    """The planner of one level: ``6 * rollouts`` copies of the level, restored to each decision's state."""

    def __init__(self, level: int, settings: ExpertSettings, rng: np.random.Generator):
        self.settings = settings
        self.rng = rng
        self.copies = game.NUM_CLASSES * settings.rollouts
        self.env = game.make_env(level, self.copies)

    def class_values(self, state: bytes) -> np.ndarray:
        """The value of each action class ``[6]`` at the saved ``state`` (module docstring)."""
        s = self.settings
        env, n = self.env, self.copies
        env.set_state([state] * n)
        first_actions = np.repeat(game.CLASS_ACTIONS, s.rollouts)
        returns = np.zeros(n)
        ended = np.zeros(n, dtype=bool)
        horizon = s.hold + s.depth
        actions = first_actions
        for t in range(horizon):
            if t >= s.hold and (t - s.hold) % s.hold == 0:
                actions = game.CLASS_ACTIONS[self.rng.choice(game.NUM_CLASSES, size=n, p=HEURISTIC)]
            env.act(actions)
            reward, _, first = env.observe()
            # an episode that ends restarts the level at once (`first` marks the new episode's first frame);
            # the reward of the ending step is the coin's, or 0 for a death or the time limit
            ending = first & ~ended
            returns[ending] = reward[ending] * s.gamma ** (t + 1)
            ended |= ending
            if ended.all():
                break
        if not ended.all():
            states = env.get_state()
            for i in np.flatnonzero(~ended):
                where = game.positions(states[i])
                returns[i] = horizon_return(where.coin_x - where.agent_x, horizon, s.gamma)
        return returns.reshape(game.NUM_CLASSES, s.rollouts).max(axis=1)
