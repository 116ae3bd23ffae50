"""Datasets of the paper and of the authors' repository, in plain NumPy.

Three problems live here:

* the **spirals memorization dataset** of the synthetic experiment (paper §3.1, App. B.2), bit-identical to the
  authors' generator ``get_spirals_dataset``, plus a task builder that assembles the training environments and
  the o.o.d. test set the way the authors' ``run_synthetic.py`` does;
* the **patchwork linear regression** of the authors' notebook ``linear_regression_ilc.ipynb``: four
  environments of one example each, where averaging gradients reaches a patchwork solution;
* the **two-sigmoid toy** of App. A.1 (Fig. 10): a two-unit sigmoid network fitting a piecewise-linear target
  on two environments A = [0, 0.5) and B = [0.5, 1].

Shapes follow the project's convention: environments are the first axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from .validate import choice, finite, float_array, integer, positive, real_number

__all__ = [
    "PAPER_SHORTCUT_SCALE",
    "TEST_SEED",
    "spirals",
    "SpiralsConfig",
    "SpiralsTask",
    "make_spirals_task",
    "patchwork_regression",
    "patchwork_env_losses",
    "patchwork_env_gradients",
    "TWO_SIGMOID_ENVS",
    "two_sigmoid_theta_star",
    "two_sigmoid_theta_tilde",
    "two_sigmoid_model",
    "two_sigmoid_target",
    "two_sigmoid_env_grid",
    "two_sigmoid_env_losses",
]

# ---------------------------------------------------------------------------------------------------------------
# Spirals memorization dataset (paper §3.1, App. B.2; the authors' get_spirals_dataset)
# ---------------------------------------------------------------------------------------------------------------

#: ``shortcut_scale`` that gives the paper's shortcut distribution N(0, 0.1), reading 0.1 as a variance
#: (App. B.2; the authors' code draws N(0, 1), i.e. scale 1).
PAPER_SHORTCUT_SCALE = math.sqrt(0.1)

#: Seed of the o.o.d. test set in the authors' ``run_synthetic.py``.
TEST_SEED = 2**32 - 1

_MAX_SEED = 2**32 - 1  # numpy.random.RandomState accepts seeds in [0, 2**32 - 1]


def _spirals_env(env, n_envs: int):
    """Validate ``env``: the string ``"test"`` or an integer in [0, n_envs)."""
    if isinstance(env, str):
        return choice(env, "env", {"test"})
    return integer(env, "env", low=0, high=n_envs - 1)


def spirals(n_examples, n_revolutions, env, n_envs, n_dims, seed, shortcut_scale=1.0):
    """One environment (or the test set) of the spirals memorization dataset (paper App. B.2).

    Bit-identical to the authors' ``get_spirals_dataset(n_examples, n_rotations=n_revolutions, env, n_envs,
    n_dims_signatures=n_dims, seed)`` when ``shortcut_scale == 1``: the same ``numpy.random.RandomState(seed)``
    calls in the same order and the same floating-point operations in the same order.

    Generative process (code label 1 is the paper's class +1 and carries the +shortcut):

    1. ``rng = RandomState(seed)``; ``signatures_matrix = rng.randn(n_envs, n_dims)``: one shortcut vector per
       environment, drawn even for the test set (so ``n_envs`` changes the test set through the RNG stream).
    2. radius ``r ~ U(0.08, 1)``, angle ``2 * n_revolutions * pi * r``; label ``l ~ U{0, 1}``; angle += ``pi * l``
       (class 1 is the other spiral arm); then radius noise ``U(-0.02, 0.02)`` is added *after* the angle is
       computed, so the final radius lies in [0.06, 1.02].
    3. mechanism ``(cos(angle) * r, sin(angle) * r)``, each column divided by its standard deviation over this
       dataset (population std, ``ddof=0``); the standardisation is in the code only, not in the paper.
    4. shortcut: training environment ``env`` uses ``signatures_matrix[env] * (2l - 1)``, the *identical* vector
       for every example of class 1 and its negation for class 0 (no per-example noise); the test set draws
       ``rng.randn(n_examples, n_dims)``, independent of the label, so every test example is its own domain.
    5. ``X = [mechanism | shortcut] * [1, 1, shortcut_scale, ...]`` cast to float32; ``y = l`` as float32.

    The same ``seed`` with a different training ``env`` gives the same spirals and labels and only a different
    shortcut row; the authors' task uses seed ``base + env`` for environment ``env`` (see ``make_spirals_task``).

    Paper vs code: the paper draws shortcut components from N(0, 0.1) and does not say
    whether 0.1 is a variance or a std; the code draws N(0, 1). ``shortcut_scale`` multiplies the shortcut
    columns: 1.0 is the code, ``PAPER_SHORTCUT_SCALE = sqrt(0.1)`` the paper read as a variance, 0.1 the paper
    read as a std, 0.0 removes the shortcut. The scaling is applied in float64 to the finished shortcut block just
    before the float32 cast (one rounding), so scale 1.0 stays bit-identical to the authors' generator. The paper
    also uses d_S = 32 and 1280 examples per environment, where the code defaults are 8 and 1024.

    Args:
        n_examples: number of examples, an integer >= 2 (the standardisation needs two points).
        n_revolutions: turns of each spiral arm over the radius range, a real number > 0 (the code's
            ``n_rotations``, 3 by default in the authors' task).
        env: an integer in [0, n_envs) for a training environment, or the string ``"test"``.
        n_envs: number of training environments (rows of the signature matrix), an integer >= 1.
        n_dims: shortcut dimension d_S, an integer >= 0 (0 gives the bare 2-D spirals; no shortcut columns).
        seed: RandomState seed, an integer in [0, 2**32 - 1]. (The authors' ``seed=None`` default, entropy from
            the OS, is not offered: the oracle is deterministic.)
        shortcut_scale: real number >= 0 multiplying the shortcut columns.

    Returns:
        ``(X, y)``: ``X`` float32 of shape ``[n_examples, 2 + n_dims]`` (columns 0-1 the standardised spiral
        coordinates, the rest the shortcut), ``y`` float32 of shape ``[n_examples]`` with values in {0, 1}.

    Raises:
        TypeError / ValueError for arguments of the wrong type or out of range, ValueError if a mechanism column
        has zero standard deviation (impossible in practice for n_revolutions > 0 and n_examples >= 2).
    """
    n_examples = integer(n_examples, "n_examples", low=2)
    n_revolutions = positive(n_revolutions, "n_revolutions")
    n_envs = integer(n_envs, "n_envs", low=1)
    env = _spirals_env(env, n_envs)
    n_dims = integer(n_dims, "n_dims", low=0)
    seed = integer(seed, "seed", low=0, high=_MAX_SEED)
    shortcut_scale = positive(shortcut_scale, "shortcut_scale", allow_zero=True)

    rng = np.random.RandomState(seed)
    signatures_matrix = rng.randn(n_envs, n_dims)

    radii = rng.uniform(0.08, 1, n_examples)
    angles = 2 * n_revolutions * np.pi * radii  # ((2 * n_rev) * pi) * radii, as the authors' expression
    labels = rng.randint(0, 2, n_examples)
    angles = angles + np.pi * labels
    radii += rng.uniform(-0.02, 0.02, n_examples)  # radius noise after the angle
    xs = np.cos(angles) * radii
    ys = np.sin(angles) * radii

    if env == "test":
        signatures = rng.randn(n_examples, n_dims)
    else:
        signs = (labels * 2 - 1).reshape(1, -1).T  # [n, 1] of -1 / +1
        signatures = signatures_matrix[env] * signs

    mechanisms = np.stack((xs, ys), axis=1)
    std = mechanisms.std(axis=0)
    if not np.all(std > 0):
        raise ValueError(f"spiral coordinates have zero standard deviation {std}; cannot standardise")
    mechanisms /= std

    signatures = signatures * shortcut_scale  # exact for 1.0: the authors' values are kept bit for bit
    inputs = np.hstack((mechanisms, signatures))
    return inputs.astype(np.float32), labels.astype(np.float32)


@dataclass(frozen=True)
class SpiralsConfig:
    """Settings of the synthetic memorization task; the defaults are the authors' ``run_synthetic.py`` defaults.

    The paper's settings (App. B.2) differ: 32 environments of 1280 examples, d_S = 32 and shortcut variance 0.1;
    ``SpiralsConfig.paper()`` returns them. The test set has 2000 examples in both (App. B.2's "training
    dataset of 2000 examples" is almost certainly the test set: the code's n_test is 2000).

    Fields are validated on construction (TypeError / ValueError naming the field).
    """

    n_train_envs: int = 16
    examples_per_env: int = 1024
    n_test: int = 2000
    n_revolutions: float = 3
    n_dims: int = 8
    seed: int = 0
    shortcut_scale: float = 1.0

    def __post_init__(self):
        n_train_envs = integer(self.n_train_envs, "n_train_envs", low=1)
        integer(self.examples_per_env, "examples_per_env", low=2)
        integer(self.n_test, "n_test", low=2)
        positive(self.n_revolutions, "n_revolutions")
        integer(self.n_dims, "n_dims", low=0)
        # Environment e uses seed + e, which RandomState must accept for every e.
        integer(self.seed, "seed", low=0, high=_MAX_SEED - (n_train_envs - 1))
        positive(self.shortcut_scale, "shortcut_scale", allow_zero=True)

    @classmethod
    def paper(cls, seed: int = 0) -> SpiralsConfig:
        """The paper's settings (App. B.2): 32 environments x 1280 examples, d_S = 32, shortcut N(0, 0.1) read as
        a variance; the number of revolutions is not given in the paper, so the code's 3 is kept."""
        return cls(n_train_envs=32, examples_per_env=1280, n_test=2000, n_revolutions=3, n_dims=32, seed=seed,
                   shortcut_scale=PAPER_SHORTCUT_SCALE)


@dataclass(frozen=True)
class SpiralsTask:
    """Training environments and o.o.d. test set of the spirals task (all float32).

    Attributes:
        config: the ``SpiralsConfig`` that built it.
        X_train: ``[n_train_envs, examples_per_env, 2 + n_dims]``.
        y_train: ``[n_train_envs, examples_per_env]``, values in {0, 1}.
        X_test: ``[n_test, 2 + n_dims]``.
        y_test: ``[n_test]``, values in {0, 1}.
    """

    config: SpiralsConfig
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def make_spirals_task(config: SpiralsConfig | None = None) -> SpiralsTask:
    """Build the spirals task as the authors' ``run_synthetic.py`` does.

    Training environment ``e`` (0 <= e < n_train_envs) is ``spirals(examples_per_env, n_revolutions, e,
    n_train_envs, n_dims, seed=config.seed + e, shortcut_scale)``: a fresh RandomState per environment, whose
    signature matrix has ``n_train_envs`` rows and whose row ``e`` is used. The test set is ``spirals(n_test,
    n_revolutions, "test", n_train_envs, n_dims, seed=TEST_SEED = 2**32 - 1, shortcut_scale)``, the same for
    every ``config.seed``.

    Args:
        config: a ``SpiralsConfig``; ``None`` means the defaults.

    Returns:
        A ``SpiralsTask`` with the arrays stacked environment-first.
    """
    if config is None:
        config = SpiralsConfig()
    if not isinstance(config, SpiralsConfig):
        raise TypeError(f"config must be a SpiralsConfig, got {type(config).__name__}")
    c = config
    X_train = np.empty((c.n_train_envs, c.examples_per_env, 2 + c.n_dims), dtype=np.float32)
    y_train = np.empty((c.n_train_envs, c.examples_per_env), dtype=np.float32)
    for e in range(c.n_train_envs):
        X_train[e], y_train[e] = spirals(c.examples_per_env, c.n_revolutions, e, c.n_train_envs, c.n_dims,
                                         c.seed + e, c.shortcut_scale)
    X_test, y_test = spirals(c.n_test, c.n_revolutions, "test", c.n_train_envs, c.n_dims, TEST_SEED,
                             c.shortcut_scale)
    return SpiralsTask(config=c, X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test)


# ---------------------------------------------------------------------------------------------------------------
# Patchwork linear regression (authors' notebook linear_regression_ilc.ipynb)
# ---------------------------------------------------------------------------------------------------------------


def patchwork_regression():
    """The notebook's linear-regression toy: ``X = 3 * [I_4 | 0.1 * 1]``, ``y = 1``.

    Row k of ``X`` is environment k's single example: feature k (value 3) is seen only by environment k, feature
    4 (value 3 * 0.1, i.e. the float ``0.30000000000000004``) by every environment. Averaging the environments'
    gradients converges to the patchwork solution ~[0.319, 0.319, 0.319, 0.319, 0.126]; the AND-mask and the
    geometric mean to ~[0, 0, 0, 0, 3], the only feature shared by all environments.

    Returns:
        ``(X, y)``: ``X`` float64 ``[4, 5]``, ``y`` float64 ``[4]`` of ones.
    """
    X = 3.0 * np.hstack((np.eye(4), 0.1 * np.ones((4, 1))))
    y = np.ones(4)
    return X, y


def _linear_problem(theta, X, y):
    """Validate ``theta [P]``, ``X [K, P]``, ``y [K]`` (real floating, finite, matching) and return them."""
    X = finite(float_array(X, "X"), "X")
    if X.ndim != 2 or X.shape[0] < 1:
        raise ValueError(f"X must have shape [K, P] with K >= 1, got shape {X.shape}")
    theta = finite(float_array(theta, "theta"), "theta")
    if theta.shape != (X.shape[1],):
        raise ValueError(f"theta must have shape [P] = ({X.shape[1]},) to match X {X.shape}, got {theta.shape}")
    y = finite(float_array(y, "y"), "y")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape [K] = ({X.shape[0]},) to match X {X.shape}, got {y.shape}")
    return theta.astype(np.float64), X.astype(np.float64), y.astype(np.float64)


def patchwork_env_losses(theta, X, y):
    """Per-environment squared losses ``L_k(theta) = 0.5 * (X[k] . theta - y[k])**2`` (as in the notebook).

    Each environment holds one example (a row of ``X``). The pooled loss is the mean of the returned vector.

    Args:
        theta: float ``[P]``; X: float ``[K, P]``; y: float ``[K]``; all finite.

    Returns:
        float64 ``[K]``.
    """
    theta, X, y = _linear_problem(theta, X, y)
    residual = X @ theta - y
    return 0.5 * residual**2


def patchwork_env_gradients(theta, X, y):
    """Per-environment gradients ``G[k] = (X[k] . theta - y[k]) * X[k]`` of ``patchwork_env_losses``.

    Args:
        theta: float ``[P]``; X: float ``[K, P]``; y: float ``[K]``; all finite.

    Returns:
        float64 gradient stack ``G[K, P]`` (environments first).
    """
    theta, X, y = _linear_problem(theta, X, y)
    residual = X @ theta - y
    return residual[:, None] * X


# ---------------------------------------------------------------------------------------------------------------
# Two-sigmoid toy (paper §2.1, App. A.1, Fig. 10)
# ---------------------------------------------------------------------------------------------------------------

#: The two environments of App. A.1 as intervals of x: A = [0, 0.5) (half-open) and B = [0.5, 1] (closed).
TWO_SIGMOID_ENVS = {"A": (0.0, 0.5), "B": (0.5, 1.0)}


def two_sigmoid_theta_star(theta2=-50.0):
    """The pooled fit theta* = (100, theta2, 100, -75, 1, 1) of App. A.1 (float64 [6]).

    The text uses theta2 = -50, Fig. 10's caption -45; -45 is the better fit.
    """
    theta2 = real_number(theta2, "theta2")
    return np.array([100.0, theta2, 100.0, -75.0, 1.0, 1.0])


def two_sigmoid_theta_tilde(theta2=-50.0):
    """The perturbed point theta~* of App. A.1: theta* with theta6 = -0.5 (float64 [6])."""
    theta = two_sigmoid_theta_star(theta2)
    theta[5] = -0.5
    return theta


def two_sigmoid_model(theta, x):
    """``f_theta(x) = theta5 * sigmoid(theta1 x + theta2) + theta6 * sigmoid(theta3 x + theta4)`` (App. A.1).

    The paper's theta1..theta6 are ``theta[0]..theta[5]`` here. The sigmoid is ``scipy.special.expit``, which
    saturates to exactly 0 or 1 without overflow warnings.

    Args:
        theta: float ``[6]``, finite.
        x: float array of any shape, finite.

    Returns:
        float64 array of the shape of ``x``.
    """
    theta = finite(float_array(theta, "theta"), "theta")
    if theta.shape != (6,):
        raise ValueError(f"theta must have shape (6,), got {theta.shape}")
    x = finite(float_array(x, "x"), "x").astype(np.float64)
    t = theta.astype(np.float64)
    return t[4] * expit(t[0] * x + t[1]) + t[5] * expit(t[2] * x + t[3])


def two_sigmoid_target(x):
    """The piecewise-linear target f*: [0, 1] -> [0, 2] of App. A.1.

    ``f*(x)`` is 0 on [0, 0.4), ``10 (x - 0.4)`` on [0.4, 0.5), 1 on [0.5, 0.7), ``1 + 10 (x - 0.7)`` on
    [0.7, 0.8) and 2 on [0.8, 1]; continuous, computed as ``clip(10 (x - 0.4), 0, 1) + clip(10 (x - 0.7), 0, 1)``.

    Args:
        x: float array of any shape with entries in [0, 1].

    Returns:
        float64 array of the shape of ``x``.

    Raises:
        ValueError if an entry lies outside [0, 1], where f* is not defined.
    """
    x = finite(float_array(x, "x"), "x").astype(np.float64)
    outside = (x < 0) | (x > 1)
    if outside.any():
        raise ValueError(f"x must lie in [0, 1] where f* is defined, got {x[outside].ravel()[0]} among others")
    return np.clip(10.0 * (x - 0.4), 0.0, 1.0) + np.clip(10.0 * (x - 0.7), 0.0, 1.0)


def two_sigmoid_env_grid(env, n_grid=10_000):
    """Uniform grid of environment ``env`` (``"A"`` = [0, 0.5) or ``"B"`` = [0.5, 1]): the ``n_grid`` cell midpoints.

    The midpoints ``a + (i + 1/2) (b - a) / n_grid`` make the grid mean the midpoint-rule estimate of
    ``(1 / (b - a)) * integral_a^b``; they never touch the interval ends, so A's open end does not matter.

    Returns:
        float64 ``[n_grid]``, increasing.
    """
    env = choice(env, "env", TWO_SIGMOID_ENVS)
    n_grid = integer(n_grid, "n_grid", low=1)
    a, b = TWO_SIGMOID_ENVS[env]
    return a + (np.arange(n_grid) + 0.5) * ((b - a) / n_grid)


def two_sigmoid_env_losses(theta, n_grid=10_000):
    """Per-environment MSE ``(L_A, L_B)`` of the two-sigmoid model against f* (App. A.1).

    ``L_e(theta) = mean over the grid of env e of (f_theta(x) - f*(x))**2``, on the ``n_grid`` cell midpoints of
    each interval (``two_sigmoid_env_grid``). With the default 10 000 points this reproduces independently
    computed reference values (the paper prints none): L_A(theta*) = 4.609e-2, L_B(theta*) = 7.06e-3,
    L_B(theta~*) = 1.0623 for theta2 = -50 and 3.192e-3, 3.193e-3, 1.0584 for theta2 = -45; the midpoint rule is
    converged there to about 5 digits.

    Args:
        theta: float ``[6]``, finite.
        n_grid: grid points per environment, an integer >= 1.

    Returns:
        ``(L_A, L_B)`` as Python floats.
    """
    losses = []
    for env in ("A", "B"):
        x = two_sigmoid_env_grid(env, n_grid)
        residual = two_sigmoid_model(theta, x) - two_sigmoid_target(x)
        losses.append(float(np.mean(residual**2)))
    return losses[0], losses[1]
