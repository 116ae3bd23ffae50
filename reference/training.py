"""The reference training loop for environment-batched problems (paper §3.1, App. B.3; authors' run_synthetic.py).

One step of the synthetic memorization task, as the authors run it:

1. take one batch of ``batch_size`` examples from each of ``n_agreement_envs`` training environments; the
   environments are grouped by a random permutation, cycling through all of them before one repeats
   (their ``permutation_groups``); the epoch ends when an environment in the drawn group has no full batch left
   (each environment is shuffled once per epoch and its last partial batch is dropped);
2. per-environment gradients ``G[K, ...]`` of the analytic MLP (:func:`hardtovary.reference.mlp.env_gradients`);
3. the aggregation rule (:func:`hardtovary.reference.rules.aggregate`): mean, AND-mask, geometric mean or
   SAND-mask, with optional inverse-sparsity rescaling per parameter tensor;
4. the L1 term ``l1 * sign(theta)`` added **after** masking (never masked), as the authors' ``add_l1_grads``;
5. the optimizer step (Adam or SGD with momentum), weight decay coupled (``before``: added to the masked gradient
   before the moments, never masked) or decoupled (``after``);
6. the learning rate follows a multi-step schedule over epochs.

Per epoch it records the mean pooled training loss and the training accuracy of the step's forward passes (before
each update, as the authors count them), the accuracy and loss on the o.o.d. test set (eval mode), the learning
rate and the fraction of gradient components the rule kept.

Everything is float64 NumPy; a run is a pure function of its configuration and seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from hardtovary.reference import losses, mlp, optim, rules
from hardtovary.reference import validate as v

OPTIMIZERS = ("adam", "sgd")

#: The early abort of the paper's search (App. B.3): a run that fits its training data (accuracy above the first)
#: while the o.o.d. test accuracy stays below the second is memorising, and is stopped at the end of that epoch.
EARLY_ABORT_TRAIN_ACC = 0.97
EARLY_ABORT_TEST_ACC = 0.6


def memorising(train_acc: float, test_acc: float) -> bool:
    """The early-abort test of App. B.3 (:data:`EARLY_ABORT_TRAIN_ACC`, :data:`EARLY_ABORT_TEST_ACC`)."""
    return train_acc > EARLY_ABORT_TRAIN_ACC and test_acc < EARLY_ABORT_TEST_ACC


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one environment-batched training run (the search space of paper Table 1 and more).

    ``batch_size`` is per environment (as in the authors' code); ``lr_milestones`` are epochs at which the learning
    rate is multiplied by ``lr_gamma`` (torch's MultiStepLR). ``method="mean"`` is plain averaging, identical to the
    AND-mask with ``tau = 0``.

    The rule is ``method`` with ``tau``, ``flavour`` and ``sand_k`` (its ``k``), held as :attr:`rule_spec` and
    validated by it when the configuration is made; ``tau`` is a number in [0, 1] for every method and ignored by
    ``mean``, which takes none.
    """

    method: str = "and_mask"
    tau: float = 1.0
    rescale: bool = False
    flavour: str | None = None
    sand_k: float | None = None
    hidden: tuple[int, ...] = (256, 256, 256)
    activation: str = "leaky_relu"
    batch_norm: bool = False
    bn_semantics: str = "pooled"
    loss: str = "bce_with_logits"
    optimizer: str = "adam"
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 1e-3
    weight_decay_order: str = "before"
    l1: float = 0.0
    batch_size: int = 256
    n_agreement_envs: int = 16
    epochs: int = 150
    lr_milestones: tuple[int, ...] = field(default=())
    lr_gamma: float = 0.1
    seed: int = 0

    def __post_init__(self):
        v.choice(self.method, "method", tuple(rules.REGISTRY))
        v.in_range(self.tau, "tau", 0.0, 1.0)
        if not isinstance(self.rescale, bool):
            raise TypeError(f"rescale must be a bool, got {type(self.rescale).__name__} {self.rescale!r}")
        # The rule's options are validated once, here: refused when the configuration is made, never while training.
        object.__setattr__(self, "_rule_spec", rules.RuleSpec(
            self.method, **rules.rule_options(self.method, self.tau, self.flavour, self.sand_k)))
        v.choice(self.optimizer, "optimizer", OPTIMIZERS)
        v.positive(self.lr, "lr")
        v.in_range(self.momentum, "momentum", 0.0, 0.999999)
        v.positive(self.weight_decay, "weight_decay", allow_zero=True)
        v.choice(self.weight_decay_order, "weight_decay_order", ("before", "after"))
        v.positive(self.l1, "l1", allow_zero=True)
        v.integer(self.batch_size, "batch_size", low=1)
        v.integer(self.n_agreement_envs, "n_agreement_envs", low=1)
        v.integer(self.epochs, "epochs", low=1)
        for m in self.lr_milestones:
            v.integer(m, "lr_milestones entry", low=1)
        v.positive(self.lr_gamma, "lr_gamma")
        v.integer(self.seed, "seed", low=0)

    @property
    def rule_spec(self) -> rules.RuleSpec:
        """The configured rule: ``RuleSpec(method, tau, flavour, sand_k)``, without tau for ``mean``."""
        return self._rule_spec

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EnvironmentData:
    """Training environments and an o.o.d. test set.

    ``X_train[E, n, in]`` and ``y_train[E, n, ...]`` (one row block per training environment, all environments the
    same size), ``X_test[N, in]``, ``y_test[N, ...]``.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self):
        X = v.finite(v.float_array(self.X_train, "X_train", min_ndim=3), "X_train")
        y = v.finite(np.asarray(self.y_train), "y_train")
        Xt = v.finite(v.float_array(self.X_test, "X_test", min_ndim=2), "X_test")
        yt = v.finite(np.asarray(self.y_test), "y_test")
        if X.ndim != 3:
            raise ValueError(f"X_train must have shape [E, n, in], got {X.shape}")
        if y.shape[:2] != X.shape[:2]:
            raise ValueError(f"y_train must start with X_train's [E, n] = {X.shape[:2]}, got shape {y.shape}")
        if Xt.ndim != 2 or Xt.shape[1] != X.shape[2]:
            raise ValueError(f"X_test must have shape [N, {X.shape[2]}], got {Xt.shape}")
        if yt.shape[0] != Xt.shape[0]:
            raise ValueError(f"y_test must have {Xt.shape[0]} rows like X_test, got shape {yt.shape}")


@dataclass
class TrainResult:
    """Final parameters, BatchNorm running statistics (or None) and the per-epoch history."""

    params: list
    running_stats: object
    history: list = field(default_factory=list)

    @property
    def final(self) -> dict:
        return self.history[-1]


def permutation_groups(n_envs: int, group_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yield groups of ``group_size`` environment indices forever, cycling through a fresh random permutation of
    all ``n_envs`` environments before any repeats (the authors' ``permutation_groups``)."""
    while True:
        yield from rng.permutation(n_envs).reshape(-1, group_size)


def epoch_batches(n_envs: int, n_examples: int, config: TrainConfig,
                  rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(env_indices[K], example_indices[K, B])`` for one epoch of environment-batched training.

    Each environment is shuffled once per epoch and cut into ``n_examples // batch_size`` full batches (the last
    partial batch is dropped, like a DataLoader with ``drop_last=True``). Groups of ``n_agreement_envs``
    environments come from :func:`permutation_groups`; the epoch ends at the first group holding an environment
    whose batches are used up.
    """
    B, K = config.batch_size, config.n_agreement_envs
    n_batches = n_examples // B
    orders = [rng.permutation(n_examples) for _ in range(n_envs)]
    used = np.zeros(n_envs, dtype=int)
    for group in permutation_groups(n_envs, K, rng):
        if np.any(used[group] >= n_batches):
            return
        rows = np.stack([orders[e][used[e] * B:(used[e] + 1) * B] for e in group])
        used[group] += 1
        yield group, rows


def steps_per_epoch(n_envs: int, n_examples: int, config: TrainConfig) -> int:
    """Number of optimizer steps in one epoch of :func:`epoch_batches`."""
    return (n_examples // config.batch_size) * (n_envs // config.n_agreement_envs)


def check_fits(data: EnvironmentData, config: TrainConfig) -> None:
    """Raise ValueError unless ``config``'s groups of environments divide ``data``'s training environments and its
    batch fits in one environment."""
    n_envs, n_examples = data.X_train.shape[:2]
    if n_envs % config.n_agreement_envs:
        raise ValueError(f"n_agreement_envs={config.n_agreement_envs} must divide the number of training "
                         f"environments {n_envs}")
    if config.batch_size > n_examples:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {n_examples} examples per environment")


def model_spec(data: EnvironmentData, config: TrainConfig, out_features: int = 1) -> mlp.MLPSpec:
    """The MLP of the configuration for the data's input width."""
    return mlp.MLPSpec(in_features=data.X_train.shape[2], hidden=tuple(config.hidden), out_features=out_features,
                       activation=config.activation, batch_norm=config.batch_norm)


def make_optimizer(config: TrainConfig, params: list):
    """Adam (betas 0.9, 0.999) or SGD with momentum, with the configured weight decay and its order."""
    if config.optimizer == "adam":
        return optim.Adam(params, weight_decay=config.weight_decay,
                          weight_decay_order=config.weight_decay_order)
    return optim.SGD(params, momentum=config.momentum, weight_decay=config.weight_decay,
                     weight_decay_order=config.weight_decay_order)


def aggregate_gradients(G: list, config: TrainConfig) -> tuple[list, list]:
    """Apply the configured rule (:attr:`TrainConfig.rule_spec`) to the per-environment stacks, rescaled if
    configured."""
    return rules.aggregate(G, config.rule_spec, rescale=config.rescale)


def evaluate(spec: mlp.MLPSpec, params: list, X: np.ndarray, y: np.ndarray, loss: str,
             running_stats=None) -> tuple[float, float]:
    """Mean loss and accuracy of the model in eval mode on ``X[N, in]``, ``y[N, ...]``."""
    logits = mlp.predict(spec, params, X, running_stats)
    return (float(np.mean(losses.loss_per_example(loss, logits, y))),
            float(np.mean(losses.predictions_correct(loss, logits, y))))


def train(data: EnvironmentData, config: TrainConfig, *,
          on_step: Callable[[], None] | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train the configured MLP on environment-batched data and return parameters and per-epoch history.

    ``on_step()`` is called after every optimizer step (for progress bars) and ``on_epoch(record)`` after every
    epoch with that epoch's history record: ``epoch`` (1-based), ``lr``, ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc``, ``kept_fraction`` (mean over steps of the fraction of gradient components whose
    mask is on; soft masks count their mass).
    """
    check_fits(data, config)
    rng = np.random.default_rng(config.seed)
    spec = model_spec(data, config)
    params = mlp.init_params(spec, rng)
    running = mlp.init_running_stats(spec) if spec.batch_norm else None
    opt = make_optimizer(config, params)
    n_envs, n_examples = data.X_train.shape[:2]
    result = TrainResult(params=params, running_stats=running)

    for epoch in range(config.epochs):
        lr = optim.multistep_lr(config.lr, epoch, config.lr_milestones, config.lr_gamma)
        step_losses, kept, n_correct, n_seen = [], [], 0, 0
        for group, rows in epoch_batches(n_envs, n_examples, config, rng):
            X = data.X_train[group[:, None], rows]
            y = data.y_train[group[:, None], rows]
            out = mlp.env_gradients(spec, params, X, y, loss=config.loss, semantics=config.bn_semantics)
            update, masks = aggregate_gradients(out.grads, config)
            if config.l1 > 0:
                update = [u + l1 for u, l1 in zip(update, optim.l1_gradient(params, config.l1))]
            params = opt.step(params, update, lr)
            if running is not None:
                running = mlp.update_running_stats(running, out.bn_stats)
            step_losses.append(float(np.mean(out.losses)))
            kept.append(sum(float(np.sum(m)) for m in masks) / sum(m.size for m in masks))
            n_correct += int(np.sum(losses.predictions_correct(config.loss, out.logits, y)))
            n_seen += int(np.prod(out.logits.shape[:2]))
            if on_step is not None:
                on_step()
        test_loss, test_acc = evaluate(spec, params, data.X_test, data.y_test, config.loss, running)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": float(np.mean(step_losses)),
                  "train_acc": n_correct / n_seen, "test_loss": test_loss, "test_acc": test_acc,
                  "kept_fraction": float(np.mean(kept))}
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    result.params, result.running_stats = params, running
    return result


def train_patchwork_regression(method: str, *, tau: float = 1.0, lr: float = 0.3, lr_decay: float = 0.9995,
                               weight_decay: float = 0.01, n_iters: int = 1000, init_scale: float = 0.1,
                               seed: int = 0, X: np.ndarray | None = None,
                               y: np.ndarray | None = None) -> np.ndarray:
    """Full-batch gradient descent on the authors' patchwork linear regression (``linear_regression_ilc.ipynb``).

    Each row of ``X`` is one environment with loss ``0.5 (x . theta - y)^2``. Every iteration first decays the
    learning rate (``lr *= lr_decay``), then steps ``theta -= lr * rule(G)`` and applies decoupled weight decay
    ``theta -= weight_decay * lr * theta``, for ``n_iters + 1`` iterations from ``theta_0 ~ init_scale * N(0, I)``.
    ``method`` is ``"mean"``, ``"and_mask"`` (threshold ``tau``) or ``"geometric_mean"`` (paper flavour).

    Returns the final ``theta[P]``. With the defaults, averaging converges to the patchwork solution
    ``~[0.319, 0.319, 0.319, 0.319, 0.126]`` and the AND-mask (tau = 1) and geometric mean to ``~[0, 0, 0, 0, 3]``.
    """
    from hardtovary.reference import data

    v.choice(method, "method", ("mean", "and_mask", "geometric_mean"))
    if X is None:
        X, y = data.patchwork_regression()
    theta = init_scale * np.random.default_rng(seed).standard_normal(X.shape[1])
    extra = {"tau": tau} if method == "and_mask" else {}
    for _ in range(v.integer(n_iters, "n_iters", low=0) + 1):
        lr *= lr_decay
        G = data.patchwork_env_gradients(theta, X, y)
        (step,), _ = rules.aggregate([G], rule=method, **extra)
        theta = theta - lr * step
        theta = theta - weight_decay * lr * theta
    return theta
