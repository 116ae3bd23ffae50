"""Baselines of the synthetic memorization task (paper §3.1, App. B.3), in torch.

Every method trains on the spirals environments with the batching of :mod:`hardtovary.reference.training`: each
optimizer step takes one batch of ``batch_size`` examples from each of ``n_agreement_envs`` environments, grouped
by :func:`~hardtovary.reference.training.permutation_groups` (:func:`~hardtovary.reference.training.epoch_batches`).

Each method (:data:`METHODS`) is an :class:`Algorithm` with one update step (:data:`ALGORITHMS`): :class:`ERM`,
:class:`DomainAdversarial` (``dann``), :class:`IRM`, :class:`AndMask` and :class:`GeometricMean`. L2 is coupled
weight decay of the optimizer (``weight_decay_order 'before'``); L1 adds ``l1 * sum |theta|`` to the loss (after
masking for the AND-mask and the geometric mean).

:func:`train_baseline` is the loop around an algorithm's update: it returns the per-epoch history (train accuracy
of the step's forward passes before each update, as the authors count it; o.o.d. test accuracy in eval mode). With
``early_abort`` a run stops after the first epoch that :func:`hardtovary.reference.training.memorising` calls
memorising (paper App. B.3). :func:`run` trains several methods, each over one or more seeds (initialisation and
batch order; the data stay fixed), into a resumable run folder (``hardtovary baselines``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hardtovary.accel.torch.optim import and_mask_backward, make_optimizer
from hardtovary.experiments.errors import UsageError, usage_errors
from hardtovary.experiments.executors import Unit, run_units
from hardtovary.experiments.runfolder import RunFolder, write_atomic
from hardtovary.experiments.stats import mean_std
from hardtovary.reference import data as _data
from hardtovary.reference import mlp as _mlp
from hardtovary.reference import rules as _rules
from hardtovary.reference import training as _training
from hardtovary.reference.optim import multistep_lr

__all__ = ["METHODS", "DEFAULT_METHODS", "METHOD_PRESETS", "DEFAULT_DATA", "DEFAULT_CONFIG", "BaselineConfig",
           "GradientReversal", "grad_reverse", "irm_penalty", "build_mlp", "DANN", "Algorithm", "Update", "ERM",
           "IRM", "DomainAdversarial", "AndMask", "GeometricMean", "ALGORITHMS", "train_baseline", "method_config",
           "rule_spec", "REFERENCE_RULES", "reference_config", "run", "format_table", "plot_bars"]

DEFAULT_METHODS = ("erm", "dann", "irm", "and_mask")


@dataclass(frozen=True)
class BaselineConfig:
    """Hyperparameters of one baseline run (paper Tables 1 and 2 plus the method-specific knobs).

    ``batch_size`` is per environment; ``n_agreement_envs`` environments per step (None: all training
    environments). ``lr_milestones`` are epochs where the learning rate is multiplied by ``lr_gamma``.
    ``weight_decay`` is L2 (coupled, added to the gradient before the optimizer's moments). ``dann_hidden`` is the
    width of DANN's three 2-layer MLPs (None: ``hidden[0]``). ``irm_anneal_iters`` counts optimizer steps.
    ``tau`` is the threshold of and_mask and geometric_mean; ``flavour`` (None: ``"paper"``) the geometric mean's
    flavour, used by no other method.
    """

    hidden: tuple[int, ...] = (256, 256, 256)
    dropout: float = 0.0
    batch_norm: bool = False
    l1: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    batch_size: int = 128
    n_agreement_envs: int | None = None
    epochs: int = 20
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    seed: int = 0
    tau: float = 1.0
    rescale: bool = False
    flavour: str | None = None
    dann_lambda: float = 1.0
    dann_hidden: int | None = None
    irm_penalty_weight: float = 100.0
    irm_anneal_iters: int = 0
    early_abort: bool = False

    def __post_init__(self):
        hidden = tuple(int(w) for w in self.hidden)
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be non-empty positive widths, got {self.hidden!r}")
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "lr_milestones", tuple(int(m) for m in self.lr_milestones))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        for name in ("l1", "weight_decay", "dann_lambda"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self.batch_size}, {self.epochs}")
        if self.n_agreement_envs is not None and self.n_agreement_envs < 1:
            raise ValueError(f"n_agreement_envs must be >= 1 or None, got {self.n_agreement_envs}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must lie in [0, 1], got {self.tau}")
        if self.flavour is not None and self.flavour not in _rules.FLAVOURS:
            raise ValueError(f"flavour must be None or one of {list(_rules.FLAVOURS)}, got {self.flavour!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not self.irm_penalty_weight >= 0 or self.irm_anneal_iters < 0:
            raise ValueError(f"irm_penalty_weight and irm_anneal_iters must be >= 0, got "
                             f"{self.irm_penalty_weight}, {self.irm_anneal_iters}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Defaults of ``hardtovary baselines``: the data and network of ``hardtovary synthetic``'s defaults, i.e. the
#: authors' 16 environments of 1024 examples and the paper's best AND-mask architecture (3 x 256, batch 128 per
#: environment, 80 epochs).
DEFAULT_DATA = _data.SpiralsConfig(n_train_envs=16, examples_per_env=1024, n_test=2000, n_revolutions=3, n_dims=8,
                                   seed=0)
DEFAULT_CONFIG = BaselineConfig(hidden=(256, 256, 256), batch_size=128, epochs=80, lr=1e-2, seed=0)

#: How each method changes the base configuration in ``hardtovary baselines`` (values from Tables 1 and 2 and
#: the paper's best AND-mask configuration, App. B.3.1).
METHOD_PRESETS = {
    "erm": {"weight_decay": 1e-4, "dropout": 0.0},
    "dann": {"dann_lambda": 1.0, "weight_decay": 1e-4},
    "irm": {"irm_penalty_weight": 100.0, "irm_anneal_iters": 8},
    "and_mask": {"tau": 1.0, "rescale": True, "weight_decay": 1e-4},
    "geometric_mean": {"tau": 1.0, "rescale": True, "weight_decay": 1e-4},
}


def method_config(base: BaselineConfig, method: str, overrides: dict | None = None) -> BaselineConfig:
    """``base`` with the method's preset and then ``overrides`` (explicit user options) applied.

    Only ``geometric_mean`` keeps a ``flavour``, recorded as the one it trains with (``"paper"`` unless
    overridden). The masking methods' options are checked by the oracle's own validation
    (:func:`rule_spec`): the paper's geometric mean with tau != 1 raises ValueError."""
    if method not in METHOD_PRESETS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    changes = {**METHOD_PRESETS[method], **(overrides or {})}
    changes["flavour"] = (changes.get("flavour") or "paper") if method == "geometric_mean" else None
    if method in ("and_mask", "geometric_mean"):
        changes["dropout"] = 0.0  # per-environment gradients run under vmap: no dropout (documented in --help)
    config = dataclasses.replace(base, **changes)
    rule_spec(method, config)
    return config


def rule_spec(method: str, config: BaselineConfig) -> _rules.RuleSpec | None:
    """The rule (a validated :class:`hardtovary.reference.rules.RuleSpec`: ``tau``, and ``flavour`` for the
    geometric mean) with which ``method``, a masking method, trains under ``config``; None for the methods that
    aggregate no per-environment gradients."""
    if method not in ("and_mask", "geometric_mean"):
        return None
    return _rules.RuleSpec(method, **_rules.rule_options(method, config.tau,
                                                         config.flavour if method == "geometric_mean" else None))


#: The methods that the reference training loop trains too (and with it the batched sweeps of
#: :mod:`hardtovary.accel.sweep`), and the rule each one is there: ERM's gradient is the plain mean over environments.
REFERENCE_RULES = {"erm": "mean", "and_mask": "and_mask", "geometric_mean": "geometric_mean"}


def reference_config(method: str, config: BaselineConfig, n_envs: int) -> _training.TrainConfig:
    """``method`` under ``config`` as a configuration of the reference loop
    (:func:`hardtovary.reference.training.train`) on ``n_envs`` training environments.

    It is the same run in every respect but one: the reference MLP with the same initial distribution (the
    authors' Kaiming-normal weights, bias 0.01), the same batches (``epoch_batches`` from
    ``default_rng(seed)``), optimizer, coupled L2, L1 and schedule, and the rule of :data:`REFERENCE_RULES`;
    the initial weights are drawn from NumPy's random stream instead of torch's. Methods outside
    :data:`REFERENCE_RULES`, dropout and BatchNorm raise ValueError."""
    if method not in REFERENCE_RULES:
        raise ValueError(f"method must be one of {list(REFERENCE_RULES)} for the reference loop, got {method!r}")
    if config.dropout or config.batch_norm:
        raise ValueError("the reference loop trains without dropout and BatchNorm")
    masking = method != "erm"
    return dataclasses.replace(
        _batching(config, n_envs), method=REFERENCE_RULES[method], tau=config.tau if masking else 0.0,
        rescale=config.rescale and masking, flavour=config.flavour if method == "geometric_mean" else None,
        hidden=config.hidden, activation="leaky_relu", optimizer=config.optimizer, lr=config.lr,
        momentum=config.momentum, weight_decay=config.weight_decay, weight_decay_order="before", l1=config.l1,
        epochs=config.epochs, lr_milestones=config.lr_milestones, lr_gamma=config.lr_gamma, seed=config.seed)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambd):
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.lambd * grad_output, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``-lambd`` in the backward pass."""
    return _GradReverse.apply(x, float(lambd))


class GradientReversal(nn.Module):
    """The gradient-reversal layer of DANN (Ganin et al. 2016) with coefficient ``lambd``."""

    def __init__(self, lambd: float = 1.0):
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x):
        return grad_reverse(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """IRMv1 penalty of one environment: ``(d/dw R(w * logits) at w = 1)^2`` with ``R`` the mean BCE-with-logits.

    Differentiable (``create_graph=True``), so it can be minimised. It is zero exactly when the classifier's
    scale is optimal for the environment: ``mean((sigmoid(z) - y) * z) = 0``.
    """
    scale = torch.ones((), dtype=logits.dtype, device=logits.device, requires_grad=True)
    risk = F.binary_cross_entropy_with_logits(logits * scale, y)
    (grad,) = torch.autograd.grad(risk, [scale], create_graph=True)
    return grad.pow(2)


def _init_authors(model: nn.Module) -> nn.Module:
    """Kaiming-normal weights (fan_in, leaky_relu gain sqrt 2) and bias 0.01 for every Linear (authors' init)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.constant_(m.bias, _mlp.BIAS_INIT)
    return model


def build_mlp(in_features: int, config: BaselineConfig, out_features: int = 1) -> nn.Sequential:
    """The reference MLP (:func:`hardtovary.accel.torch.models.mlp_from_spec`) with the authors' initialisation
    and, when ``config.dropout > 0``, a ``Dropout`` after every hidden activation."""
    from hardtovary.accel.torch.models import mlp_from_spec

    spec = _mlp.MLPSpec(in_features=in_features, hidden=config.hidden, out_features=out_features,
                        batch_norm=config.batch_norm)
    model = _init_authors(mlp_from_spec(spec, dtype=torch.float32))
    if config.dropout == 0:
        return model
    layers = []
    for layer in model:
        layers.append(layer)
        if isinstance(layer, (nn.LeakyReLU, nn.ReLU, nn.Tanh)):
            layers.append(nn.Dropout(config.dropout))
    return nn.Sequential(*layers)


def _two_layer(n_in: int, width: int, n_out: int, *, final_activation: bool = False) -> nn.Sequential:
    layers = [nn.Linear(n_in, width), nn.LeakyReLU(0.01), nn.Linear(width, n_out)]
    if final_activation:
        layers.append(nn.LeakyReLU(0.01))
    return nn.Sequential(*layers)


class DANN(nn.Module):
    """Embedding, label classifier and domain discriminator, each a 2-layer MLP (``Linear -> LeakyReLU -> Linear``,
    the embedding also ends in a LeakyReLU); the discriminator reads the embedding through
    :class:`GradientReversal`. ``forward`` returns ``(label_logits[N], domain_logits[N, D])``."""

    def __init__(self, in_features: int, n_domains: int, width: int, lambd: float = 1.0):
        super().__init__()
        self.embedding = _two_layer(in_features, width, width, final_activation=True)
        self.classifier = _two_layer(width, width, 1)
        self.discriminator = _two_layer(width, width, n_domains)
        self.reversal = GradientReversal(lambd)
        _init_authors(self)

    def forward(self, x):
        z = self.embedding(x)
        return self.classifier(z).squeeze(-1), self.discriminator(self.reversal(z))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def _bce(logits, y):
    return F.binary_cross_entropy_with_logits(logits.squeeze(-1), y)


def _l1_term(model: nn.Module, l1: float) -> torch.Tensor:
    return l1 * sum(p.abs().sum() for p in model.parameters())


class Update(NamedTuple):
    """What one update step reports: the step's task risk ``mean_e L_e``, the training-mode logits of its inputs
    (before the update, flattened as ``[K * B]``) and the method's own per-step metrics (averaged per epoch)."""

    risk: float
    logits: torch.Tensor
    metrics: dict


class Algorithm:
    """A baseline: its model, its optimizer, and one update step on a batch of ``K`` environments.

    :meth:`update` takes the step's inputs ``X[K, B, in]``, labels ``y[K, B]`` and environment indices
    ``envs[K]``, lets :meth:`backward` put the method's gradients into ``.grad``, and takes the optimizer step
    (L2 is coupled weight decay, added before the optimizer's moments). A subclass builds its model
    (:meth:`build_model`) and computes its gradients (:meth:`backward`)."""

    def __init__(self, config: BaselineConfig, in_features: int, n_envs: int):
        self.config = config
        self.model = self.build_model(in_features, n_envs)
        self.model.train()
        self.optimizer = make_optimizer(self.model.parameters(), config.optimizer, lr=config.lr,
                                        weight_decay=config.weight_decay, weight_decay_order="before",
                                        momentum=config.momentum)
        self.steps = 0  # optimizer steps taken

    def build_model(self, in_features: int, n_envs: int) -> nn.Module:
        return build_mlp(in_features, self.config)

    def backward(self, X: torch.Tensor, y: torch.Tensor, envs: torch.Tensor):
        """Fill ``.grad`` for this step; return ``(risk, training-mode logits [K * B], metrics)``."""
        raise NotImplementedError

    def update(self, X: torch.Tensor, y: torch.Tensor, envs: torch.Tensor) -> Update:
        self.optimizer.zero_grad(set_to_none=True)
        risk, logits, metrics = self.backward(X, y, envs)
        self.optimizer.step()
        self.steps += 1
        return Update(float(risk.detach()), logits.detach(), metrics)

    @torch.no_grad()
    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Logits of ``X[N, in]`` in eval mode (dropout off, BatchNorm's running statistics)."""
        self.model.eval()
        logits = self.model(X).squeeze(-1)
        self.model.train()
        return logits

    def _backward_loss(self, loss: torch.Tensor) -> None:
        """``loss`` plus the L1 term ``l1 * sum |theta|`` (``l1 * sign(theta)`` in the gradient), backward."""
        if self.config.l1 > 0:
            loss = loss + _l1_term(self.model, self.config.l1)
        loss.backward()


class ERM(Algorithm):
    """Empirical risk minimisation: the MLP (LeakyReLU, Kaiming-normal weights, bias 0.01, as the authors') on the
    pooled loss ``mean_e L_e``, with optional dropout (after each hidden activation), L1, L2 and BatchNorm (pooled
    statistics over the step's stacked batch)."""

    def backward(self, X, y, envs):
        logits = self.model(X.reshape(-1, X.shape[-1])).squeeze(-1)
        env_logits = logits.reshape(y.shape)
        risk = F.binary_cross_entropy_with_logits(env_logits, y, reduction="none").mean(dim=1).mean()
        loss, metrics = self.objective(risk, env_logits, y)
        self._backward_loss(loss)
        return risk, logits, metrics

    def objective(self, risk, env_logits, y):
        """The loss to minimise and the step's metrics, given the risk and the logits ``[K, B]``."""
        return risk, {}


class IRM(ERM):
    """IRMv1 (Arjovsky et al. 2019): ``mean_e R^e + lambda_t mean_e ||d R^e(w * Phi) / dw at w=1||^2`` (a dummy
    scalar ``w`` per environment, :func:`irm_penalty`). ``lambda_t = 1`` for the first ``irm_anneal_iters``
    optimizer steps, ``irm_penalty_weight`` afterwards, and, as the official implementation, the loss is divided
    by ``lambda_t`` whenever ``lambda_t > 1``. Risks and penalties are averaged over environments (the official
    code and the convention ``L = mean_e L_e``); the paper's sum differs by the constant factor K."""

    def objective(self, risk, env_logits, y):
        penalty = torch.stack([irm_penalty(env_logits[e], y[e]) for e in range(len(y))]).mean()
        weight = self.config.irm_penalty_weight if self.steps >= self.config.irm_anneal_iters else 1.0
        loss = risk + weight * penalty
        if weight > 1.0:
            loss = loss / weight
        return loss, {"irm_penalty": float(penalty.detach())}


class DomainAdversarial(Algorithm):
    """Domain-adversarial training (DANN, Ganin et al. 2016) with the network :class:`DANN`: its discriminator
    reads the embedding through a :class:`GradientReversal` layer with coefficient ``dann_lambda`` and classifies
    the training environment (``n_train_envs`` classes, cross-entropy over the step's environments). Total loss
    ``L_task + L_domain``: the heads minimise their own losses, the embedding receives ``grad L_task - lambda grad
    L_domain``. Lambda is constant (Ganin's ramp is not used; [choice])."""

    def build_model(self, in_features, n_envs):
        return DANN(in_features, n_envs, self.config.dann_hidden or self.config.hidden[0], self.config.dann_lambda)

    def backward(self, X, y, envs):
        K, B = y.shape
        logits, domain_logits = self.model(X.reshape(K * B, -1))
        domain_loss = F.cross_entropy(domain_logits, envs.repeat_interleave(B))
        risk = F.binary_cross_entropy_with_logits(logits, y.reshape(-1))
        self._backward_loss(risk + domain_loss)
        return risk, logits, {"domain_loss": float(domain_loss.detach())}

    @torch.no_grad()
    def predict(self, X):
        self.model.eval()
        logits = self.model(X)[0]
        self.model.train()
        return logits


class AndMask(Algorithm):
    """The AND-mask through :func:`hardtovary.accel.torch.optim.and_mask_backward`: per-environment gradients of
    the torch engine, the rule per parameter tensor (threshold ``tau``, inverse-sparsity ``rescale``), L1 after
    masking. No dropout: the per-environment gradients run under vmap."""

    rule = "and_mask"

    def __init__(self, config: BaselineConfig, in_features: int, n_envs: int):
        if config.dropout > 0:
            raise ValueError(f"dropout is not supported with {self.rule} (per-environment gradients run under vmap)")
        self.spec = rule_spec(self.rule, config)
        super().__init__(config, in_features, n_envs)

    def backward(self, X, y, envs):
        risk, _ = and_mask_backward(self.model, X, y, _bce, spec=self.spec, rescale=self.config.rescale,
                                    l1=self.config.l1)
        with torch.no_grad():  # accuracy of this step's inputs (BatchNorm: eval mode, no stats update)
            self.model.train(not self.config.batch_norm)
            logits = self.model(X.reshape(-1, X.shape[-1])).squeeze(-1)
            self.model.train()
        return risk, logits, {}


class GeometricMean(AndMask):
    """The geometric mean of the per-environment gradients, in the oracle's two flavours (``flavour``,
    :mod:`hardtovary.reference.rules`): the paper's needs all K signs to agree (tau 1 only), the authors'
    ``"original"`` takes any tau."""

    rule = "geometric_mean"


#: The baselines by name, in the order of the command line's listings.
ALGORITHMS = {"erm": ERM, "dann": DomainAdversarial, "irm": IRM, "and_mask": AndMask, "geometric_mean": GeometricMean}
METHODS = tuple(ALGORITHMS)


def _arrays(data):
    for name in ("X_train", "y_train", "X_test", "y_test"):
        if not hasattr(data, name):
            raise TypeError(f"data must have X_train, y_train, X_test, y_test (a SpiralsTask or "
                            f"training.EnvironmentData), got {type(data).__name__}")
    X = np.asarray(data.X_train)
    y = np.asarray(data.y_train)
    if X.ndim != 3 or y.shape != X.shape[:2]:
        raise ValueError(f"X_train must be [E, n, in] and y_train [E, n], got {X.shape} and {y.shape}")
    return (torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32),
            torch.as_tensor(np.asarray(data.X_test), dtype=torch.float32),
            torch.as_tensor(np.asarray(data.y_test), dtype=torch.float32))


def _batching(config: BaselineConfig, n_envs: int) -> _training.TrainConfig:
    """The batching of ``config`` as a configuration of the reference loop's batches
    (:func:`~hardtovary.reference.training.epoch_batches`): ``batch_size`` examples from each of
    ``n_agreement_envs`` environments (None: all ``n_envs``)."""
    return dataclasses.replace(_training.TrainConfig(), batch_size=config.batch_size,
                               n_agreement_envs=config.n_agreement_envs or n_envs)


def train_baseline(method: str, data, config: BaselineConfig | None = None, *,
                   on_step: Callable[[], None] | None = None,
                   on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``method`` (one of :data:`METHODS`, the :class:`Algorithm` of :data:`ALGORITHMS`) on ``data``
    (``X_train[E, n, in]``, ``y_train[E, n]`` in {0, 1}, ``X_test[N, in]``, ``y_test[N]``; a ``SpiralsTask`` or
    ``EnvironmentData``) and return the per-epoch history.

    Each record: ``epoch`` (1-based), ``lr``, ``train_loss`` (mean over steps of the method's task risk
    ``mean_e L_e``), ``train_acc`` (step forward passes before each update), ``test_acc`` (eval mode) and the
    method's metrics averaged over the epoch's steps (IRM: ``irm_penalty``; DANN: ``domain_loss``). With
    ``config.early_abort`` the last record has ``aborted=True`` when the run stopped early
    (:func:`hardtovary.reference.training.memorising`).
    """
    if method not in ALGORITHMS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    config = config or BaselineConfig()
    X_train, y_train, X_test, y_test = _arrays(data)
    n_envs, n_examples, n_in = X_train.shape
    batching = _batching(config, n_envs)
    _training.check_fits(data, batching)

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    algorithm = ALGORITHMS[method](config, n_in, n_envs)
    history = []
    for epoch in range(config.epochs):
        lr = multistep_lr(config.lr, epoch, config.lr_milestones, config.lr_gamma)
        for group in algorithm.optimizer.param_groups:
            group["lr"] = lr
        risks, metrics, n_correct, n_seen = [], {}, 0, 0
        for envs, rows in _training.epoch_batches(n_envs, n_examples, batching, rng):
            envs_t = torch.as_tensor(envs)
            rows_t = torch.as_tensor(rows)
            y = y_train[envs_t[:, None], rows_t]          # [K, B]
            step = algorithm.update(X_train[envs_t[:, None], rows_t], y, envs_t)
            risks.append(step.risk)
            for name, value in step.metrics.items():
                metrics.setdefault(name, []).append(value)
            n_correct += int(((step.logits > 0).float() == y.reshape(-1)).sum())
            n_seen += y.numel()
            if on_step is not None:
                on_step()
        test_acc = float(((algorithm.predict(X_test) > 0).float() == y_test).float().mean())
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": float(np.mean(risks)), "train_acc": n_correct / n_seen,
                  "test_acc": test_acc, **{name: float(np.mean(values)) for name, values in metrics.items()}}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if config.early_abort and _training.memorising(record["train_acc"], record["test_acc"]):
            record["aborted"] = True
            break
    return history


def steps_per_epoch(data_config: _data.SpiralsConfig, config: BaselineConfig) -> int:
    K = config.n_agreement_envs or data_config.n_train_envs
    return (data_config.examples_per_env // config.batch_size) * (data_config.n_train_envs // K)


# ----------------------------------------------------------------------------------------------------------------
# The experiment: several methods into a resumable run folder
# ----------------------------------------------------------------------------------------------------------------


def run(out: Path, *, data_config: _data.SpiralsConfig = DEFAULT_DATA, base: BaselineConfig = DEFAULT_CONFIG,
        methods=DEFAULT_METHODS, overrides: dict | None = None, seeds: int = 1, fresh: bool = False,
        progress: bool = True, executor=None) -> dict:
    """Train every method with seeds ``base.seed, ..., base.seed + seeds - 1`` (initialisation and batch order; the
    data stay those of ``data_config``), one unit per run saved atomically in ``out/units/<method>-seed<s>.json``,
    resuming from ``out`` where a previous run with the same configuration stopped. Returns and writes
    ``out/results.json`` and ``out/table.txt`` (:func:`format_table`): ``config`` (data, seeds and each method's full
    configuration) and ``methods``: per method
    the mean and sample standard deviation over seeds (0 for one seed) of the final ``train_acc`` and ``test_acc``
    (``train_acc``, ``train_acc_std``, ``test_acc``, ``test_acc_std``), ``test_acc_min``, ``aborted`` (how many runs
    stopped early), ``seconds`` (summed) and ``runs`` (per seed: ``seed``, final accuracies and loss,
    ``epochs_run``, ``aborted``, ``seconds``, ``history``). The runs are units of
    :mod:`~hardtovary.experiments.executors` on ``executor`` (this process when None)."""
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"methods must be some of {list(METHODS)}, got {list(methods)}")
    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise UsageError(f"seeds must be an integer >= 1, got {seeds!r}")
    configs = {m: method_config(base, m, overrides) for m in methods}
    seed_list = [base.seed + s for s in range(seeds)]
    config = {"experiment": "baselines", "data": dataclasses.asdict(data_config), "seeds": seed_list,
              "methods": {m: c.to_dict() for m, c in configs.items()}}
    task = _data.make_spirals_task(data_config)
    with usage_errors():  # the batching of the options against the data, before the run folder is written
        for c in configs.values():
            _training.check_fits(task, _batching(c, data_config.n_train_envs))
    folder = RunFolder(out, config, fresh=fresh)
    units = [Unit(f"{m}-seed{seed}", train_unit, (m, data_config, dataclasses.replace(configs[m], seed=seed)),
                  steps=configs[m].epochs * steps_per_epoch(data_config, configs[m]), label=f"{m}-seed{seed}",
                  shows=("train_acc", "test_acc"))
             for m in methods for seed in seed_list]
    stored = run_units(folder, units, executor, what="runs", progress=progress, where=folder.root)
    runs = {m: [stored[f"{m}-seed{seed}"] for seed in seed_list] for m in methods}
    results = {"config": config, "methods": {m: _summarise(v) for m, v in runs.items()}}
    folder.write_results(results)
    write_atomic(folder.root / "table.txt", lambda f: f.write(format_table(results) + "\n"))
    return results


def train_unit(method: str, data_config: _data.SpiralsConfig, config: BaselineConfig, *, on_step=None,
               on_epoch=None) -> dict:
    """One run of ``method`` with ``config`` (its seed included) on the spirals task of ``data_config``, built here
    so that the unit depends on its arguments only: the record :func:`run` stores per seed."""
    start = time.perf_counter()
    history = train_baseline(method, _data.make_spirals_task(data_config), config, on_step=on_step,
                             on_epoch=on_epoch)
    final = history[-1]
    return {"seed": config.seed, "train_acc": final["train_acc"], "test_acc": final["test_acc"],
            "train_loss": final["train_loss"], "epochs_run": len(history),
            "aborted": bool(final.get("aborted", False)), "seconds": time.perf_counter() - start,
            "history": history}


def _summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over the runs (seeds) of one method; the runs themselves under 'runs'."""
    train, train_std = mean_std([r["train_acc"] for r in runs])
    test, test_std = mean_std([r["test_acc"] for r in runs])
    return {"train_acc": train, "train_acc_std": train_std, "test_acc": test, "test_acc_std": test_std,
            "test_acc_min": float(min(r["test_acc"] for r in runs)),
            "aborted": sum(bool(r["aborted"]) for r in runs), "seconds": float(sum(r["seconds"] for r in runs)),
            "runs": runs}


def format_table(results: dict) -> str:
    """Final train and o.o.d. test accuracy per method, mean ± standard deviation over seeds, as plain text."""
    lines = [f"{'method':<16}{'seeds':>6}{'train acc':>16}{'test acc (o.o.d.)':>19}{'min test':>10}"
             f"{'seconds':>9}"]
    for m, r in results["methods"].items():
        note = f"  ({r['aborted']} stopped early)" if r["aborted"] else ""
        lines.append(f"{m:<16}{len(r['runs']):>6}{r['train_acc']:>9.3f} ± {r['train_acc_std']:.3f}"
                     f"{r['test_acc']:>12.3f} ± {r['test_acc_std']:.3f}{r['test_acc_min']:>10.3f}"
                     f"{r['seconds']:>9.1f}{note}")
    return "\n".join(lines)


def plot_bars(results: dict, path: Path) -> Path | None:
    """Train and o.o.d. test accuracy bars per method, in the manner of the paper's Fig. 6 (y from 0.4 to 1): the
    mean over seeds, with the standard deviation as an error bar and every seed as a dot when there are several.
    Returns the path written, or None when matplotlib is not installed."""
    from hardtovary.experiments.plots import matplotlib_pyplot, save_figure

    plt = matplotlib_pyplot()
    if plt is None:
        return None
    names = list(results["methods"])
    rows = [results["methods"][m] for m in names]
    several = any(len(r["runs"]) > 1 for r in rows)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    for offset, key, label in ((-0.2, "train_acc", "Train"), (0.2, "test_acc", "Test (o.o.d.)")):
        ax.bar(x + offset, [r[key] for r in rows], 0.4, label=label,
               yerr=[r[f"{key}_std"] for r in rows] if several else None, capsize=3)
        if several:
            for i, r in enumerate(rows):
                ax.plot(np.full(len(r["runs"]), x[i] + offset), [run[key] for run in r["runs"]], ".", color="k",
                        ms=3, alpha=0.6)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, names)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
