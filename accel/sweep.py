"""Many runs of the synthetic memorization task trained at once: seeds x hyperparameters, batched over runs.

``train_sweep(data, configs)`` trains R independent MLPs (no BatchNorm) on the same environment-batched data and
returns what R calls of :func:`hardtovary.reference.training.train` return, to float tolerance. Runs that share an
architecture and a batch layout (``hidden``, ``activation``, ``batch_size``, ``n_agreement_envs``, ``loss``) are
trained together: their weights are stacked ``W[R, out, in]``, ``b[R, out]``, a step's environment batches are
``X[R, K, B, in]``, and the per-environment gradients come from one batched backward in the block layout of
:mod:`hardtovary.reference.mlp` (``dW[r, e] = dZ[r, e]^T A[r, e]``, ``[R, K, out, in]``). Everything else may
differ per run: rule (mean / and_mask / geometric_mean / sand_mask, tau, flavour, k, rescaling), optimizer (Adam
or SGD with momentum), learning rate and its milestones, weight decay and its order, L1, epochs and seed.

What a run does is exactly ``reference.training.train``:

- ``rng = numpy.random.default_rng(config.seed)``; ``init_params(spec, rng)`` first; then per epoch the
  reference's own ``epoch_batches`` on that generator (drawn to exhaustion, as the reference's loop does);
- the rule on the per-environment stacks, then ``+ l1 * sign(theta)`` (never masked), then the optimizer step with
  weight decay ``before`` (coupled) or ``after`` (decoupled, AdamW), at the multi-step learning rate of the epoch;
- per epoch a history record with the same keys and meaning: ``epoch``, ``lr``, ``train_loss`` (mean over steps of
  the pooled loss before the update), ``train_acc`` (of those forward passes), ``test_loss`` and ``test_acc`` (o.o.d.
  set), ``kept_fraction``.

Runs stop independently, at the end of an epoch, and are then removed from the batch (the remaining runs keep
going): when their ``epochs`` are done; with ``early_abort=True`` when ``train_acc > 0.97`` while ``test_acc < 0.6``
(paper App. B.3: "stop a trial ... for compute"); and when a run diverges (its gradients or parameters stop
being finite; the reference raises ValueError there, a sweep flags the run and carries on with the others).
The returned :class:`SweepResult` (a ``TrainResult``) says which in ``stopped``.

Precision: float64 by default (matches the reference to rounding); ``dtype="float32"`` runs the batched
forward/backward, the optimizer state and the parameters in float32 for speed. Arrays live on the backend of
:func:`hardtovary.accel.backend.get_backend` (CuPy on a GPU, NumPy otherwise); batch indices are drawn on the host
with NumPy, exactly as the reference draws them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hardtovary.accel import rules as accel_rules
from hardtovary.accel.backend import get_backend, to_numpy
from hardtovary.reference import mlp, optim, training
from hardtovary.reference.rules import RuleSpec
from hardtovary.reference.training import EnvironmentData, TrainConfig, TrainResult

__all__ = ["DTYPES", "SweepResult", "train_sweep", "group_key"]

#: Adam's constants, as reference.training.make_optimizer uses them (torch defaults).
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
#: The precisions of a sweep, the default first.
DTYPES = ("float64", "float32")
#: Upper bound on the elements of one activation array of the batched test-set evaluation.
_EVAL_ELEMENTS = 1 << 24


@dataclass
class SweepResult(TrainResult):
    """A :class:`~hardtovary.reference.training.TrainResult` with why the run stopped.

    ``stopped``: ``"completed"`` (all epochs), ``"early_abort"`` (paper App. B.3's rule) or ``"diverged"`` (non-finite
    gradients or parameters; the parameters are those of the last finite epoch end, the history covers the epochs
    completed before). ``running_stats`` is always None (no BatchNorm).
    """

    stopped: str = "completed"


def group_key(config: TrainConfig) -> tuple:
    """Configurations with equal keys are trained in one batch: same architecture and batch layout."""
    return (tuple(config.hidden), config.activation, config.batch_size, config.n_agreement_envs, config.loss)


def _check_configs(configs) -> list[TrainConfig]:
    if not isinstance(configs, (list, tuple)) or not configs:
        raise ValueError(f"configs must be a non-empty list of TrainConfig, got {configs!r}")
    for i, c in enumerate(configs):
        if not isinstance(c, TrainConfig):
            raise TypeError(f"configs[{i}] must be a TrainConfig, got {type(c).__name__}")
        if c.batch_norm:
            raise ValueError(f"configs[{i}] has batch_norm=True; train_sweep supports MLPs without BatchNorm only "
                             f"(use reference.training.train)")
        if c.loss != "bce_with_logits":
            raise ValueError(f"configs[{i}].loss must be 'bce_with_logits' (the synthetic task), got {c.loss!r}")
    return list(configs)


# --------------------------------------------------------------------------------------------------------------
# The rule: the one place where the aggregation of per-environment stacks is called.
# --------------------------------------------------------------------------------------------------------------


class _RuleGroups:
    """Runs of a batch grouped by their rule (``TrainConfig.rule_spec``: equal specs compute the same), with their
    rescaling flags."""

    def __init__(self, configs: Sequence[TrainConfig]):
        groups: dict[RuleSpec, list[int]] = {}
        for i, c in enumerate(configs):
            groups.setdefault(c.rule_spec, []).append(i)
        self.groups = [(np.asarray(idx), spec) for spec, idx in groups.items()]
        self.rescale = np.array([c.rescale for c in configs], dtype=bool)
        self.n_runs = len(configs)


def _aggregate(xp, grads: list, rule_groups: _RuleGroups) -> tuple[list, np.ndarray]:
    """Apply each run's rule to its per-environment stacks, on the device.

    ``grads``: list (parameter order) of ``[R, K, *shape]`` arrays. Returns ``(values, kept)``: a list of
    ``[R, *shape]`` arrays in the dtype of ``grads``, and the kept fraction per run (NumPy float64 ``[R]``, soft masks
    count their mass, as reference.training).

    Every rule is elementwise over the environment axis except the per-tensor rescaling, so the runs that share rule
    options are aggregated in one call of :func:`hardtovary.accel.rules.aggregate` on the stack
    ``[K, R_group, *shape]`` without rescaling; each run's tensors are then rescaled with that run's own mask
    (``n / n_kept``, a fully masked tensor stays 0), as :func:`hardtovary.reference.rules.rescale_inverse_sparsity`.
    """
    R = rule_groups.n_runs
    values = [xp.empty((R,) + G.shape[2:], dtype=G.dtype) for G in grads]
    kept_sum = xp.zeros(R, dtype=xp.float64)
    for idx, spec in rule_groups.groups:
        rows = xp.asarray(idx)
        stacks = [xp.moveaxis(G[rows], 1, 0) for G in grads]       # [K, R_group, *shape]
        unscaled, masks = accel_rules.aggregate(stacks, spec, rescale=False)
        rescale = xp.asarray(rule_groups.rescale[idx])
        for j, (value, mask) in enumerate(zip(unscaled, masks)):
            n = int(np.prod(value.shape[1:]))
            kept = mask.reshape(len(idx), -1).sum(axis=1, dtype=xp.float64)   # [R_group]
            kept_sum[rows] += kept
            safe = xp.where(kept > 0, kept, 1.0)
            factor = xp.where(rescale, xp.where(kept > 0, n / safe, 0.0), 1.0)
            values[j][rows] = value * factor.reshape((-1,) + (1,) * (value.ndim - 1)).astype(value.dtype)
    total = sum(int(np.prod(G.shape[2:])) for G in grads)
    return values, to_numpy(kept_sum) / total


# --------------------------------------------------------------------------------------------------------------
# The batched MLP (no BatchNorm; block layout, analytic backward as reference.mlp)
# --------------------------------------------------------------------------------------------------------------


class _Net:
    def __init__(self, xp, spec: mlp.MLPSpec):
        self.xp, self.spec = xp, spec

    def activation(self, H):
        xp, s = self.xp, self.spec
        if s.activation == "leaky_relu":
            return xp.where(H > 0, H, s.negative_slope * H)
        if s.activation == "relu":
            return xp.maximum(H, 0)
        return xp.tanh(H)

    def activation_derivative(self, H):
        xp, s = self.xp, self.spec
        if s.activation == "leaky_relu":
            return xp.where(H > 0, 1.0, s.negative_slope).astype(H.dtype)
        if s.activation == "relu":
            return (H > 0).astype(H.dtype)
        return 1 - xp.tanh(H) ** 2

    def forward(self, params: list, A):
        """``A[R, n, in]`` (or ``[n, in]``, shared by all runs) -> logits ``[R, n, out]``, inputs and
        pre-activations of the hidden layers."""
        xp = self.xp
        inputs, pre = [], []
        n_hidden = len(self.spec.hidden)
        for layer in range(n_hidden + 1):
            W, b = params[2 * layer], params[2 * layer + 1]
            Z = xp.matmul(A, xp.swapaxes(W, -1, -2)) + b[:, None, :]
            if layer == n_hidden:
                return Z, inputs, pre
            inputs.append(A)
            pre.append(Z)
            A = self.activation(Z)


def _sigmoid(xp, z):
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _bce(xp, z, y):
    """Per-example BCE with logits (z and y of one shape), as reference.losses."""
    return xp.maximum(z, 0) - z * y + xp.log1p(xp.exp(-xp.abs(z)))


def _env_step(net: _Net, params: list, X, Y):
    """One batched forward/backward on ``X[R, K, B, in]``, ``Y[R, K, B]``.

    Returns ``(grads, loss[R], correct[R])``: grads a list of ``[R, K, *shape]`` stacks (G[r, e] = dL_e/dtheta of
    run r), the pooled loss (mean over environments of L_e) and the number of correct predictions.
    """
    xp = net.xp
    R, K, B, _ = X.shape
    logits, inputs, pre = net.forward(params, X.reshape(R, K * B, -1))
    z = logits[..., 0].reshape(R, K, B)
    per_example = _bce(xp, z, Y)
    loss = per_example.mean(axis=2).mean(axis=1)
    correct = ((z >= 0) == (Y >= 0.5)).reshape(R, -1).sum(axis=1)
    dZ = ((_sigmoid(xp, z) - Y) / B)[..., None]                    # [R, K, B, 1]
    grads = [None] * len(params)
    n_hidden = len(net.spec.hidden)
    last = net.activation(pre[-1]) if n_hidden else X.reshape(R, K * B, -1)
    A_blocks = [a.reshape(R, K, B, -1) for a in inputs] + [last.reshape(R, K, B, -1)]
    for layer in range(n_hidden, -1, -1):
        A = A_blocks[layer]
        grads[2 * layer] = xp.matmul(xp.swapaxes(dZ, -1, -2), A)   # [R, K, out, in]
        grads[2 * layer + 1] = dZ.sum(axis=-2)                     # [R, K, out]
        if layer == 0:
            break
        W = params[2 * layer]
        dA = xp.matmul(dZ.reshape(R, K * B, -1), W)                # [R, K*B, in]
        dZ = (dA * net.activation_derivative(pre[layer - 1])).reshape(R, K, B, -1)
    return grads, loss, correct


def _evaluate(net: _Net, params: list, X, y) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode mean loss and accuracy per run on the shared set ``X[N, in]``, ``y[N]``, in chunks of runs."""
    xp = net.xp
    R, N = params[0].shape[0], X.shape[0]
    width = max(net.spec.hidden + (net.spec.out_features, net.spec.in_features))
    chunk = max(1, _EVAL_ELEMENTS // (N * width))
    losses, accs = [], []
    for start in range(0, R, chunk):
        part = [p[start:start + chunk] for p in params]
        z = net.forward(part, X)[0][..., 0]                        # [r, N]
        losses.append(to_numpy(_bce(xp, z, y[None]).mean(axis=1)))
        accs.append(to_numpy(((z >= 0) == (y[None] >= 0.5)).mean(axis=1)))
    return np.concatenate(losses).astype(np.float64), np.concatenate(accs).astype(np.float64)


# --------------------------------------------------------------------------------------------------------------
# The optimizers, per run
# --------------------------------------------------------------------------------------------------------------


def _per_run(xp, values, dtype, ndim: int):
    """A per-run column ``[R, 1, ...]`` broadcasting against ``[R, *shape]`` arrays of ``ndim`` dims."""
    return xp.asarray(np.asarray(values, dtype=np.float64), dtype=dtype).reshape((-1,) + (1,) * (ndim - 1))


class _Optimizers:
    """Adam (betas 0.9, 0.999, eps 1e-8) and SGD (+momentum) side by side, torch semantics as reference.optim."""

    def __init__(self, xp, configs: Sequence[TrainConfig], params: list, dtype):
        self.xp, self.dtype = xp, dtype
        self.is_adam = np.array([c.optimizer == "adam" for c in configs])
        self.wd = np.array([c.weight_decay for c in configs])
        self.before = np.array([c.weight_decay_order == "before" for c in configs])
        self.momentum = np.array([c.momentum for c in configs])
        self.t = 0
        zeros = [xp.zeros_like(p) for p in params]
        self.exp_avg = zeros if self.is_adam.any() else None
        self.exp_avg_sq = [xp.zeros_like(p) for p in params] if self.is_adam.any() else None
        self.buf = [xp.zeros_like(p) for p in params] if (~self.is_adam).any() else None

    def select(self, keep: np.ndarray) -> None:
        """Keep the runs at positions ``keep`` (compaction after runs stop)."""
        for name in ("is_adam", "wd", "before", "momentum"):
            setattr(self, name, getattr(self, name)[keep])
        k = self.xp.asarray(keep)
        for name in ("exp_avg", "exp_avg_sq", "buf"):
            state = getattr(self, name)
            if state is not None:
                setattr(self, name, [s[k] for s in state])

    def step(self, params: list, grads: list, lr: np.ndarray) -> list:
        xp, dtype = self.xp, self.dtype
        self.t += 1
        t = self.t
        beta1, beta2 = _ADAM_BETAS
        wd_before = np.where(self.before, self.wd, 0.0)
        decay = 1.0 - lr * np.where(self.before, 0.0, self.wd)   # exactly 1.0 without decoupled decay
        step_size = lr / (1 - beta1 ** t)
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** t)
        use_adam, use_sgd = self.is_adam.any(), (~self.is_adam).any()
        new_params = []
        for j, (p, g) in enumerate(zip(params, grads)):
            col = functools.partial(_per_run, xp, dtype=dtype, ndim=p.ndim)
            g = g + col(wd_before) * p
            p_dec = p * col(decay)
            candidates = []
            if use_adam:
                m = beta1 * self.exp_avg[j] + (1 - beta1) * g
                v = beta2 * self.exp_avg_sq[j] + (1 - beta2) * g * g
                denom = xp.sqrt(v) / bias_correction2_sqrt + _ADAM_EPS
                self.exp_avg[j], self.exp_avg_sq[j] = m, v
                candidates.append(p_dec - col(step_size) * (m / denom))
            if use_sgd:
                buf = col(self.momentum) * self.buf[j] + g           # buf = g on the first step (buf starts at 0)
                self.buf[j] = buf
                candidates.append(p_dec - col(lr) * buf)
            if len(candidates) == 2:
                new_params.append(xp.where(col(self.is_adam.astype(np.float64)) > 0, *candidates))
            else:
                new_params.append(candidates[0])
        return new_params


# --------------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------------


def train_sweep(data: EnvironmentData, configs: list[TrainConfig], *, backend=None, dtype: str = DTYPES[0],
                early_abort: bool = False,
                on_epoch: Callable[[int, dict], None] | None = None,
                on_step: Callable[[int], None] | None = None) -> list[SweepResult]:
    """Train every configuration, batched over runs; returns one :class:`SweepResult` per configuration, in order.

    data: the environments and the o.o.d. test set (``y`` in [0, 1], one logit, BCE with logits).
    configs: ``TrainConfig``s without BatchNorm and with ``loss="bce_with_logits"``; runs with equal
        :func:`group_key` are trained together, groups one after another.
    backend: a name for :func:`~hardtovary.accel.backend.get_backend` (``"numpy"``, ``"cupy"``, ``"auto"``), a
        ``Backend``, or None (``HARDTOVARY_BACKEND`` / auto).
    dtype: ``"float64"`` (default; equal to the reference to rounding) or ``"float32"``.
    early_abort: stop a run at the end of an epoch where ``train_acc > 0.97`` and ``test_acc < 0.6`` (paper App. B.3).
    on_epoch(index, record): after every epoch of run ``configs[index]`` with that epoch's history record.
    on_step(n_runs): after every batched step, with the number of runs it advanced.

    Parameters are returned as float64 NumPy arrays in reference.mlp's layout; history records as
    reference.training.train writes them.
    """
    configs = _check_configs(configs)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if not isinstance(data, EnvironmentData):
        raise TypeError(f"data must be an EnvironmentData, got {type(data).__name__}")
    if not isinstance(early_abort, (bool, np.bool_)):
        raise TypeError(f"early_abort must be a bool, got {early_abort!r}")
    for c in configs:
        training.check_fits(data, c)
    be = backend if hasattr(backend, "xp") else get_backend(backend)
    xp = be.xp
    X_train = xp.asarray(np.asarray(data.X_train, dtype=dtype))
    y_train = xp.asarray(np.asarray(data.y_train, dtype=dtype))
    X_test = xp.asarray(np.asarray(data.X_test, dtype=dtype))
    y_test = xp.asarray(np.asarray(data.y_test, dtype=dtype))
    if y_train.ndim != 2 or y_test.ndim != 1:
        raise ValueError(f"train_sweep needs binary targets y_train[E, n] and y_test[N] (one logit), got shapes "
                         f"{tuple(y_train.shape)} and {tuple(y_test.shape)}")

    results: list[SweepResult | None] = [None] * len(configs)
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(group_key(c), []).append(i)
    # Diverging runs overflow before they are dropped at the end of the epoch; that is reported, not warned.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for indices in groups.values():
            _train_group(data, xp, dtype, X_train, y_train, X_test, y_test, configs, indices, results,
                         early_abort, on_epoch, on_step)
    return results


def _train_group(data, xp, dtype, X_train, y_train, X_test, y_test, configs, indices, results, early_abort,
                 on_epoch, on_step) -> None:
    first = configs[indices[0]]
    spec = training.model_spec(data, first)
    net = _Net(xp, spec)
    n_envs, n_examples = data.X_train.shape[:2]
    K, B = first.n_agreement_envs, first.batch_size

    rngs = [np.random.default_rng(configs[i].seed) for i in indices]
    inits = [mlp.init_params(spec, rng) for rng in rngs]          # init first, as the reference
    params = [xp.asarray(np.stack([p[j] for p in inits]), dtype=dtype) for j in range(len(inits[0]))]
    active = list(indices)                                        # run index of each batch position
    histories = {i: [] for i in indices}
    opt = _Optimizers(xp, [configs[i] for i in active], params, dtype)
    rule_groups = _RuleGroups([configs[i] for i in active])
    epoch = 0
    while active:
        act_configs = [configs[i] for i in active]
        pos = {i: n for n, i in enumerate(active)}
        lr = np.array([optim.multistep_lr(c.lr, epoch, c.lr_milestones, c.lr_gamma) for c in act_configs])
        batches = [list(training.epoch_batches(n_envs, n_examples, c, rngs[indices.index(i)]))
                   for i, c in zip(active, act_configs)]
        n_steps = len(batches[0])
        groups_np = np.stack([[b[s][0] for b in batches] for s in range(n_steps)])       # [S, R, K]
        rows_np = np.stack([[b[s][1] for b in batches] for s in range(n_steps)])         # [S, R, K, B]
        groups_dev, rows_dev = xp.asarray(groups_np), xp.asarray(rows_np)
        R = len(active)
        epoch_start = [p.copy() for p in params]                  # what a run that diverges this epoch returns
        step_losses, kept = [], []
        correct = xp.zeros(R, dtype=xp.int64)
        diverged = np.zeros(R, dtype=bool)
        for s in range(n_steps):
            g_idx, r_idx = groups_dev[s][:, :, None], rows_dev[s]
            X = X_train[g_idx, r_idx]                                                     # [R, K, B, in]
            Y = y_train[g_idx, r_idx]                                                     # [R, K, B]
            grads, loss, n_correct = _env_step(net, params, X, Y)
            bad = np.zeros(R, dtype=bool)
            for G in grads:
                bad |= ~to_numpy(xp.isfinite(G.reshape(R, -1)).all(axis=1))
            if bad.any():                       # the oracle refuses non-finite gradients: flag, feed zeros
                diverged |= bad
                grads = [xp.where(_per_run(xp, (~bad).astype(np.float64), dtype, G.ndim) > 0, G, 0) for G in grads]
            update, kept_fraction = _aggregate(xp, grads, rule_groups)
            l1 = np.array([c.l1 for c in act_configs])
            if l1.any():
                update = [u + _per_run(xp, l1, dtype, p.ndim) * xp.sign(p) for u, p in zip(update, params)]
            params = opt.step(params, update, lr)
            step_losses.append(to_numpy(loss).astype(np.float64))
            kept.append(kept_fraction)
            correct = correct + n_correct
            if on_step is not None:
                on_step(R)
        for p in params:
            diverged |= ~to_numpy(xp.isfinite(p.reshape(R, -1)).all(axis=1))
        test_loss, test_acc = _evaluate(net, params, X_test, y_test)
        train_loss = np.mean(np.stack(step_losses), axis=0)
        train_acc = to_numpy(correct) / (n_steps * K * B)
        kept_mean = np.mean(np.stack(kept), axis=0)
        stop = {}
        for n, i in enumerate(active):
            if diverged[n]:
                stop[i] = "diverged"
                continue
            record = {"epoch": epoch + 1, "lr": float(lr[n]), "train_loss": float(train_loss[n]),
                      "train_acc": float(train_acc[n]), "test_loss": float(test_loss[n]),
                      "test_acc": float(test_acc[n]), "kept_fraction": float(kept_mean[n])}
            histories[i].append(record)
            if on_epoch is not None:
                on_epoch(i, record)
            if epoch + 1 >= configs[i].epochs:
                stop[i] = "completed"
            elif early_abort and training.memorising(record["train_acc"], record["test_acc"]):
                stop[i] = "early_abort"
        if stop:
            for i, why in stop.items():
                source = epoch_start if why == "diverged" else params
                final = [to_numpy(p[pos[i]]).astype(np.float64) for p in source]
                results[i] = SweepResult(params=final, running_stats=None, history=histories[i], stopped=why)
            keep = np.array([n for n, i in enumerate(active) if i not in stop], dtype=np.int64)
            active = [active[n] for n in keep]
            if active:
                k = xp.asarray(keep)
                params = [p[k] for p in params]
                opt.select(keep)
                rule_groups = _RuleGroups([configs[i] for i in active])
        epoch += 1
