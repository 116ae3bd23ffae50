"""accel/torch/distributed.py on 2 real ranks (gloo, CPU) against the single-process rules and the NumPy oracle.

Two worker processes are started once for the module (``ranks`` fixture) and joined in one gloo process group; each
test sends them a function of this module, runs it on both ranks and gets both results back (or both exceptions).
The single-process side (the oracle, :func:`hardtovary.accel.torch.rules.aggregate`) runs here in the test process.
"""

import os
import queue
import re
import socket
import subprocess
import sys
import traceback
from datetime import timedelta

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hardtovary.accel.torch import distributed as D
from hardtovary.accel.torch import optim as O
from hardtovary.accel.torch import rules as T
from hardtovary.accel.torch.models import load_reference_params, mlp_from_spec
from hardtovary.reference import mlp
from hardtovary.reference import rules as R

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
TIMEOUT = 60  # seconds; a test that leaves one rank waiting in a collective fails instead of hanging
SOLO = None  # in a worker: the group of rank 0 alone

# ---- two ranks --------------------------------------------------------------------------------------------------


def _worker(rank, port, tasks, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT))
    global SOLO
    SOLO = dist.new_group([0])  # a group holding rank 0 only (created by every rank, as torch asks)
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, "ok", fn(*args)))
        except Exception as exc:  # reported to the test, which decides
            results.put((rank, "error", (type(exc).__name__, str(exc), traceback.format_exc())))
    dist.destroy_process_group()


class Ranks:
    """Run a function of this module on both ranks: ``ranks(fn, *args)`` returns ``[result_0, result_1]`` and
    re-raises an exception of either rank; ``ranks.outcomes(fn, *args)`` returns each rank's (status, value)."""

    def __init__(self):
        context = torch.multiprocessing.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.tasks = [context.Queue() for _ in range(WORLD)]
        self.results = context.Queue()
        self.processes = [context.Process(target=_worker, args=(r, port, self.tasks[r], self.results), daemon=True)
                          for r in range(WORLD)]
        for p in self.processes:
            p.start()

    def outcomes(self, fn, *args):
        for q in self.tasks:
            q.put((fn, args))
        got = {}
        for _ in range(WORLD):
            try:
                rank, status, value = self.results.get(timeout=TIMEOUT + 30)
            except queue.Empty:
                raise AssertionError(f"{fn.__name__}: a rank did not answer (ranks answered: {sorted(got)})") from None
            got[rank] = (status, value)
        return [got[r] for r in range(WORLD)]

    def __call__(self, fn, *args):
        outcomes = self.outcomes(fn, *args)
        for rank, (status, value) in enumerate(outcomes):
            if status == "error":
                raise AssertionError(f"rank {rank} raised {value[0]}: {value[1]}\n{value[2]}")
        return [value for _, value in outcomes]

    def close(self):
        for q in self.tasks:
            q.put(None)
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def ranks():
    r = Ranks()
    yield r
    r.close()


def _np(x):
    return x.detach().numpy() if x.dtype == torch.bool else x.detach().to(torch.float64).numpy()


# ---- data -------------------------------------------------------------------------------------------------------

SHAPES = [(4, 3), (5,), (2, 2, 2)]

#: rule options; the SAND-mask always takes the exact route
CASES = [("mean", {}), ("and_mask", {"tau": 0.0}), ("and_mask", {"tau": 0.5}), ("and_mask", {"tau": 1.0}),
         ("geometric_mean", {}), ("geometric_mean", {"flavour": "original", "tau": 0.5}),
         ("geometric_mean", {"flavour": "original"}), ("sand_mask", {"tau": 0.3})]


def _stacks(K, seed, dtype=np.float32, shapes=SHAPES, zeros=0.15):
    """Gradient stacks with exact zeros, wide magnitudes and, in the first component of each, a sign tie."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        G = rng.standard_normal((K, *shape)) * np.exp(rng.uniform(-3, 3, (K, *shape)))
        G[rng.random(G.shape) < zeros] = 0.0
        G.reshape(K, -1)[:, 0] = np.where(np.arange(K) % 2 == 0, 1.5, -0.5)
        out.append(G.astype(dtype))
    return out


def _local(stacks, sizes):
    """Rank r's shard of every stack: rows sizes[0] + ... + sizes[r-1] onwards."""
    r = dist.get_rank()
    start = sum(sizes[:r])
    return [torch.from_numpy(G[start:start + sizes[r]].copy()) for G in stacks]


def _aggregate_on_ranks(stacks, sizes, options, exact):
    aggregated, masks = D.all_reduce_aggregate(_local(stacks, sizes), exact=exact, **options)
    return [_np(a) for a in aggregated], [_np(m) for m in masks], [str(a.dtype) for a in aggregated]


def _check_against_single_process(results, stacks, options, *, bitwise):
    """Both ranks agree bit for bit; masks equal the single-process torch rule's and the oracle's (hard masks);
    values equal the torch rule's bit for bit, or to 1e-6 of the mean magnitude (float32 summation order)."""
    (a0, m0, d0), (a1, m1, d1) = results
    for x, y in zip(a0 + m0, a1 + m1):
        np.testing.assert_array_equal(x, y)
    expected, expected_masks = T.aggregate([torch.from_numpy(G) for G in stacks], **options)
    oracle_values, oracle_masks = R.aggregate([G.astype(np.float64) for G in stacks], **options)
    assert d0 == [str(e.dtype) for e in expected]
    for G, value, mask, e, em, ov, om in zip(stacks, a0, m0, expected, expected_masks, oracle_values, oracle_masks):
        if em.dtype == torch.bool:
            np.testing.assert_array_equal(mask, em.numpy())
            np.testing.assert_array_equal(mask, om)
        else:
            np.testing.assert_array_equal(mask, _np(em))
        if bitwise:
            np.testing.assert_array_equal(value, _np(e))
        else:
            factor = G.size / G.shape[0] / max(mask.sum(), 1) if options.get("rescale") else 1.0
            bound = 1e-6 * (np.abs(_np(e)) + factor * np.abs(G.astype(np.float64)).mean(axis=0))
            assert np.all(np.abs(value - _np(e)) <= bound), np.max(np.abs(value - _np(e)) - bound)
        # and the oracle (float64) to float32 rounding
        np.testing.assert_allclose(value, ov, rtol=1e-5, atol=1e-5 * np.abs(G).max())


# ---- the rules over two ranks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}-{o}" for r, o in CASES])
def test_uneven_shards_equal_single_process(ranks, rule, options, rescale, exact):
    # K_r = 1 and 3: masks bit-identical, values to rounding; exact mode (and the SAND-mask) bit-identical
    stacks = _stacks(4, seed=len(options) + 10 * rescale)
    options = {"rule": rule, "rescale": rescale, **options}
    results = ranks(_aggregate_on_ranks, stacks, [1, 3], options, exact)
    _check_against_single_process(results, stacks, options, bitwise=exact or rule == "sand_mask")


@pytest.mark.parametrize("sizes", [[1, 1], [2, 0], [0, 2]])
@pytest.mark.parametrize("rule,options", CASES, ids=[f"{r}-{o}" for r, o in CASES])
def test_two_environments_are_bit_identical(ranks, rule, options, sizes):
    stacks = _stacks(2, seed=3)
    options = {"rule": rule, "rescale": True, **options}
    results = ranks(_aggregate_on_ranks, stacks, sizes, options, False)
    _check_against_single_process(results, stacks, options, bitwise=True)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_split_any_rule_hypothesis(ranks, data):
    K = data.draw(st.integers(1, 7), label="K")
    k0 = data.draw(st.integers(0, K), label="K_0")
    rule, options = data.draw(st.sampled_from(CASES), label="rule")
    options = {"rule": rule, "rescale": data.draw(st.booleans(), label="rescale"), **options}
    if rule == "and_mask":
        options["tau"] = data.draw(st.sampled_from([0.0, 0.2, 1 / 3, 0.5, 0.6000000000000001, 2 / 3, 1.0]), label="tau")
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    exact = data.draw(st.booleans(), label="exact")
    stacks = _stacks(K, seed=data.draw(st.integers(0, 2**16), label="seed"), dtype=dtype)
    results = ranks(_aggregate_on_ranks, stacks, [k0, K - k0], options, exact)
    _check_against_single_process(results, stacks, options, bitwise=exact or K <= 2 or rule == "sand_mask")


def test_float16_gradients_come_back_in_float16(ranks):
    stacks = [G.astype(np.float16) for G in _stacks(3, seed=5)]
    results = ranks(_aggregate_on_ranks, stacks, [2, 1], {"rule": "and_mask", "tau": 0.5}, False)
    assert results[0][2] == ["torch.float16"] * len(SHAPES)
    expected, masks = T.aggregate([torch.from_numpy(G) for G in stacks], rule="and_mask", tau=0.5)
    for value, mask, e, m in zip(results[0][0], results[0][1], expected, masks):
        np.testing.assert_array_equal(mask, m.numpy())
        np.testing.assert_allclose(value, _np(e), rtol=1e-3, atol=1e-3)


def test_no_host_or_order_dependence_of_masks_at_ties(ranks):
    # every component is an exact tie or one step from it, for K = 10 split 3 / 7 and tau = 0.6 with float noise
    K = 10
    signs = np.array([[1] * 8 + [-1] * 2, [1] * 7 + [-1] * 3, [1] * 5 + [0] * 2 + [-1] * 3]).T.astype(np.float32)
    stacks = [signs * np.linspace(0.5, 2, K, dtype=np.float32)[:, None]]
    options = {"rule": "and_mask", "tau": 2 * 0.8 - 1}
    results = ranks(_aggregate_on_ranks, stacks, [3, 7], options, False)
    np.testing.assert_array_equal(results[0][1][0], [True, False, False])
    _check_against_single_process(results, stacks, options, bitwise=False)


# ---- bad input --------------------------------------------------------------------------------------------------


def _call_all_reduce_aggregate(stacks, sizes, options):
    return D.all_reduce_aggregate(_local(stacks, sizes) if sizes else stacks, **options)


def _errors(outcomes):
    assert [status for status, _ in outcomes] == ["error"] * WORLD, outcomes
    return [value[:2] for _, value in outcomes]


def test_not_initialised_names_the_group():
    with pytest.raises(ValueError, match=r"^group: torch.distributed is not initialised"):
        D.all_reduce_aggregate([torch.ones(1, 2)], rule="mean")
    with pytest.raises(ValueError, match=r"^group: "):
        D.broadcast_parameters(nn.Linear(2, 1))


def test_zero_environments_everywhere_raises_on_every_rank(ranks):
    stacks = [np.zeros((0, *shape), np.float32) for shape in SHAPES]
    for exact in (False, True):
        errors = _errors(ranks.outcomes(_call_all_reduce_aggregate, stacks, [0, 0], {"rule": "and_mask",
                                                                                      "exact": exact}))
        for name, message in errors:
            assert name == "ValueError" and message.startswith("grads: every rank of the group holds zero environments")


def _non_finite_on_rank_1(exact):
    stacks = [torch.ones(2, 3), torch.ones(2, 2)]
    if dist.get_rank() == 1:
        stacks[1][1, 0] = float("nan")
    return D.all_reduce_aggregate(stacks, rule="and_mask", exact=exact)


@pytest.mark.parametrize("exact", [False, True])
def test_non_finite_on_one_rank_raises_on_every_rank(ranks, exact):
    (n0, m0), (n1, m1) = _errors(ranks.outcomes(_non_finite_on_rank_1, exact))
    assert n0 == n1 == "ValueError"
    if exact:  # the gathered stack is checked on every rank: environment 3 of 4
        assert m0 == m1 and m0.startswith("grads[1] must be finite, but 1 entry is not; the first is grads[1][3, 0]")
    else:
        assert m1.startswith("grads[1] must be finite, but 1 entry is not; the first is grads[1][1, 0] = nan")
        assert m0.startswith("grads must be finite on every rank, but 1 other rank(s) of the group hold non-finite")


def _too_many_environments():
    return D.all_reduce_aggregate([torch.ones(2**23 + 1, 1)], rule="and_mask")


def test_more_environments_than_float32_counts_exactly_raises_on_every_rank(ranks):
    # 2 x (2^23 + 1) > 2^24 environments: float32 sign sums could round, so the packed mode refuses
    for name, message in _errors(ranks.outcomes(_too_many_environments)):
        assert name == "ValueError" and message.startswith("grads: K = 16777218 environments exceed the integers "
                                                           "torch.float32 holds exactly"), message


@pytest.mark.parametrize("stacks, options, kind, message", [
    ([np.ones((2, 3), np.float32), np.ones((1, 2), np.float32)], {"rule": "mean"}, "ValueError",
     "every gradient stack must have the same number of environments K on axis 0: grads[0] has K=2, grads[1] has K=1"),
    ([np.ones((2, 3), np.float32)], {"rule": "and_mask", "tau": 1.5}, "ValueError", "tau must"),
    ([np.ones((2, 3), np.float32)], {"rule": "and_mask", "exact": 1}, "TypeError", "exact must be a bool, got int 1"),
    ([np.ones((2, 3), np.int64)], {"rule": "and_mask"}, "TypeError", "grads[0] must be a tensor of a real floating"),
    ([], {"rule": "and_mask"}, "ValueError", "grads must hold at least one gradient stack"),
])
def test_bad_arguments_raise_before_the_collective(ranks, stacks, options, kind, message):
    # the same bad call on both ranks: both raise, and the group stays usable (the next test runs on it)
    stacks = [torch.from_numpy(G) for G in stacks]
    for name, text in _errors(ranks.outcomes(_call_all_reduce_aggregate, stacks, None, options)):
        assert name == kind and text.startswith(message), text


# ---- and_mask_backward: training with sharded environments ------------------------------------------------------

SPEC = mlp.MLPSpec(in_features=4, hidden=(8, 6), out_features=1)


def _bce(z, y):
    return F.binary_cross_entropy_with_logits(z.squeeze(-1), y)


def _model(spec, params, dtype=torch.float32):
    return load_reference_params(mlp_from_spec(spec, dtype=dtype), params)


def _env_data(K, B, seed, dtype=torch.float32, in_features=4):
    rng = np.random.default_rng(seed)
    X = torch.tensor(rng.standard_normal((K, B, in_features)), dtype=dtype)
    Y = torch.tensor(rng.integers(0, 2, (K, B)), dtype=dtype)
    return X, Y


def _train_sharded(spec, params, data, sizes, steps, options, lr=0.1, group=None):
    """SGD steps of distributed.and_mask_backward with rank r's shard of every step's environments; the final
    parameters, every step's loss and the last masks."""
    model = _model(spec, params)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    r = dist.get_rank()
    start = sum(sizes[:r])
    losses = []
    for X, Y in data[:steps]:
        loss, masks = D.and_mask_backward(model, X[start:start + sizes[r]], Y[start:start + sizes[r]], _bce,
                                          group=group, **options)
        opt.step()
        losses.append(float(loss))
    return [_np(p) for p in model.parameters()], losses, [_np(m) for m in masks]


def _train_single(spec, params, data, steps, options, lr=0.1):
    model = _model(spec, params)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    options = {k: v for k, v in options.items() if k != "exact"}
    losses = []
    for X, Y in data[:steps]:
        loss, masks = O.and_mask_backward(model, X, Y, _bce, semantics="per_env", **options)
        opt.step()
        losses.append(float(loss))
    return [_np(p) for p in model.parameters()], losses, [_np(m) for m in masks]


@pytest.mark.parametrize("sizes, options, bitwise", [
    ([1, 1], {"rule": "and_mask", "tau": 1.0, "rescale": True, "l1": 1e-3}, True),
    ([1, 3], {"rule": "and_mask", "tau": 0.5}, False),
    ([3, 2], {"rule": "geometric_mean", "rescale": True}, False),
    ([2, 2], {"rule": "geometric_mean", "flavour": "original", "tau": 0.5}, False),
    ([1, 3], {"rule": "and_mask", "tau": 0.5, "exact": True}, True),
    ([0, 3], {"rule": "and_mask", "tau": 0.5, "rescale": True}, False),
    ([4, 0], {"rule": "sand_mask", "tau": 0.5, "rescale": True}, True),
])
def test_sharded_training_reaches_the_single_process_parameters(ranks, sizes, options, bitwise):
    rng = np.random.default_rng(0)
    params = mlp.init_params(SPEC, rng)
    data = [_env_data(sum(sizes), 8, seed) for seed in range(5)]
    results = ranks(_train_sharded, SPEC, params, data, sizes, 5, options)
    expected, expected_losses, expected_masks = _train_single(SPEC, params, data, 5, options)
    for got, losses, masks in results:
        for p, e in zip(got, expected):
            if bitwise:
                np.testing.assert_array_equal(p, e)
            else:
                np.testing.assert_allclose(p, e, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
        if bitwise:
            for m, e in zip(masks, expected_masks):
                np.testing.assert_array_equal(m, e)
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_array_equal(a, b)  # the ranks never drift apart


def test_one_rank_group_is_the_single_process_step(ranks):
    # rank 0 alone (a one-rank group) holds all K = 3 environments: the very single-process step, bit for bit
    rng = np.random.default_rng(1)
    params = mlp.init_params(SPEC, rng)
    data = [_env_data(3, 8, seed) for seed in range(3)]
    options = {"rule": "and_mask", "tau": 0.5, "rescale": True}
    got = ranks(_train_solo, SPEC, params, data, options)[0]
    expected = _train_single(SPEC, params, data, 3, options)
    for a, b in zip(got[0] + got[2], expected[0] + expected[2]):
        np.testing.assert_array_equal(a, b)


def _train_solo(spec, params, data, options):
    if dist.get_rank() != 0:
        return None
    return _train_sharded(spec, params, data, [3], 3, options, group=SOLO)


def _batch_norm_step(semantics):
    spec = mlp.MLPSpec(in_features=4, hidden=(6,), out_features=1, batch_norm=True)
    model = _model(spec, mlp.init_params(spec, np.random.default_rng(0)))
    X, Y = _env_data(4, 5, seed=2)
    r = dist.get_rank()
    D.and_mask_backward(model, X[2 * r:2 * r + 2], Y[2 * r:2 * r + 2], _bce, tau=0.5, semantics=semantics)
    return [_np(p.grad) for p in model.parameters()]


def test_batch_norm_per_env_shards_exactly_and_pooled_is_refused(ranks):
    spec = mlp.MLPSpec(in_features=4, hidden=(6,), out_features=1, batch_norm=True)
    model = _model(spec, mlp.init_params(spec, np.random.default_rng(0)))
    X, Y = _env_data(4, 5, seed=2)
    O.and_mask_backward(model, X, Y, _bce, tau=0.5, semantics="per_env")
    for grads in ranks(_batch_norm_step, "per_env"):
        for g, p in zip(grads, model.parameters()):
            np.testing.assert_allclose(g, _np(p.grad), rtol=1e-5, atol=1e-7)
    for name, message in _errors(ranks.outcomes(_batch_norm_step, "pooled")):
        assert name == "ValueError" and message.startswith("semantics='pooled' with training-mode BatchNorm is not")


def _broadcast():
    torch.manual_seed(dist.get_rank())  # a different model on each rank
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(dist.get_rank() + 1.0)
    D.broadcast_parameters(model)
    return [_np(t) for t in [*model.parameters(), *model.buffers()]]


def test_broadcast_parameters_copies_rank_0(ranks):
    r0, r1 = ranks(_broadcast)
    torch.manual_seed(0)
    expected = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    expected[1].running_mean.fill_(1.0)
    for a, b, e in zip(r0, r1, [*expected.parameters(), *expected.buffers()]):
        np.testing.assert_array_equal(a, _np(e))
        np.testing.assert_array_equal(b, _np(e))


def test_shard_covers_the_environments_in_rank_order():
    for n_envs in range(0, 9):
        for world in range(1, 5):
            shards = [D.shard(n_envs, r, world) for r in range(world)]
            assert [i for s in shards for i in range(n_envs)[s]] == list(range(n_envs))
            sizes = [s.stop - s.start for s in shards]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match=r"^rank must"):
        D.shard(4, 2, 2)
    with pytest.raises(TypeError, match=r"^world_size must be an integer"):
        D.shard(4, 0, 2.0)


# ---- the DDP comm hook ------------------------------------------------------------------------------------------

HOOK_SPEC = mlp.MLPSpec(in_features=6, hidden=(40, 30), out_features=1)


def _ddp_steps(options, steps, bucket_cap_mb):
    params = mlp.init_params(HOOK_SPEC, np.random.default_rng(0))
    model = _model(HOOK_SPEC, params)
    twin = _model(HOOK_SPEC, params)  # the same parameters without DDP: this rank's plain gradient
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
    state = D.AndMaskHookState.create(**options, group=ddp.process_group)
    seen = []

    def recording(state: D.AndMaskHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        seen.append((step, bucket.index(), len(bucket.parameters())))
        return D.and_mask_hook(state, bucket)

    ddp.register_comm_hook(state, recording)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    out = []
    for step in range(steps):
        X, Y = _env_data(WORLD, 8, seed=100 + step, in_features=6)
        x, y = X[dist.get_rank()], Y[dist.get_rank()]
        opt.zero_grad()
        _bce(ddp(x), y).backward()
        twin.zero_grad()
        _bce(twin(x), y).backward()
        out.append(([_np(p.grad) for p in model.parameters()], [_np(p.grad) for p in twin.parameters()]))
        opt.step()
        with torch.no_grad():  # the twin follows the DDP model's parameters
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)
    return out, seen


HOOK_CASES = [{"rule": "and_mask", "tau": 1.0, "rescale": True}, {"rule": "and_mask", "tau": 0.0},
              {"rule": "geometric_mean", "rescale": True}, {"rule": "geometric_mean", "flavour": "original",
                                                            "tau": 0.5, "rescale": True}, {"rule": "mean"}]


@pytest.mark.parametrize("options", HOOK_CASES, ids=[str(o) for o in HOOK_CASES])
def test_ddp_hook_equals_the_single_process_rule_also_after_buckets_are_rebuilt(ranks, options):
    # small buckets: several per step, rebuilt by DDP after the first iteration; K = 2 environments (one per rank),
    # so the hook's values are bit-identical to the single-process rule on the ranks' plain gradients
    results = ranks(_ddp_steps, options, 3, 0.004)
    (steps0, seen0), (steps1, _) = results
    assert len({index for step, index, _ in seen0 if step == 2}) >= 2, seen0
    assert [n for step, _, n in seen0 if step == 0] != [n for step, _, n in seen0 if step == 2], "no rebuild seen"
    for (ddp_grads0, local0), (ddp_grads1, local1) in zip(steps0, steps1):
        stacks = [torch.from_numpy(np.stack([a, b]).astype(np.float32)) for a, b in zip(local0, local1)]
        expected, _ = T.aggregate(stacks, **options)
        for g0, g1, e in zip(ddp_grads0, ddp_grads1, expected):
            np.testing.assert_array_equal(g0, _np(e))
            np.testing.assert_array_equal(g1, _np(e))


def _hook_non_finite():
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 1))
    D.register_and_mask_hook(ddp, rule="and_mask", tau=1.0, rescale=True)
    x = torch.ones(4, 3)
    x[0, 1] = float("nan") if dist.get_rank() == 1 else 1.0  # rank 1: NaN in the weight's gradient column 1
    ddp(x).sum().backward()
    return [_np(p.grad) for p in ddp.parameters()]


def test_ddp_hook_propagates_non_finite_gradients_as_nan_on_every_rank(ranks):
    # a NaN's sign sum is NaN, which a mask test would silently drop; the hook cannot raise, so it gives NaN
    for weight, bias in ranks(_hook_non_finite):
        assert np.isnan(weight[0, 1]) and np.isfinite(np.delete(weight, 1)).all() and np.isfinite(bias).all()


def _hook_refuses(options):
    model = nn.parallel.DistributedDataParallel(nn.Linear(2, 1))
    D.register_and_mask_hook(model, **options)


def test_ddp_hook_refuses_the_sand_mask_and_bad_options(ranks):
    (name, message), _ = _errors(ranks.outcomes(_hook_refuses, {"rule": "sand_mask"}))
    assert name == "ValueError" and message.startswith("rule 'sand_mask' has no packed statistics for the DDP hook")
    (name, message), _ = _errors(ranks.outcomes(_hook_refuses, {"rule": "and_mask", "tau": 2}))
    assert name == "ValueError" and message.startswith("tau must")
    with pytest.raises(TypeError, match=r"^ddp_model must be a torch.nn.parallel.DistributedDataParallel"):
        D.register_and_mask_hook(nn.Linear(2, 1), rule="and_mask")


def test_hook_module_keeps_real_annotations():
    # DDP refuses a hook whose annotations are strings (from __future__ import annotations)
    assert D.and_mask_hook.__annotations__["bucket"] is dist.GradBucket
    assert not re.search(r"^from __future__ import", open(D.__file__).read(), re.M)


# ---- launch with torchrun ---------------------------------------------------------------------------------------


LAUNCH = ["-m", "hardtovary.experiments.distributed_synthetic", "--n-envs", "4", "--examples-per-env", "64",
          "--n-test", "64", "--hidden", "16,16", "--batch-size", "16", "--epochs", "2", "--tau", "0.5"]


def _launch(prefix, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *prefix, *LAUNCH, "--save", str(out)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out), done.stdout


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_rank(tmp_path):
    # 2 ranks under torchrun (4 environments per step, 2 on each) against the same command without torchrun
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two, printed = _launch(torchrun, tmp_path / "two.pt")
    one, _ = _launch([], tmp_path / "one.pt")
    assert printed.count("test acc") == 1 and "on 2 rank(s)" in printed, printed  # rank 0 prints
    assert (two["world_size"], one["world_size"], two["steps"]) == (2, 1, 8)
    for name, value in one["params"].items():
        torch.testing.assert_close(two["params"][name], value, rtol=1e-5, atol=1e-6)
    assert abs(two["test_acc"] - one["test_acc"]) <= 2 / 64


@pytest.mark.parametrize("argv, message", [
    (["--n-envs", "4", "--n-agreement-envs", "3"], "n_agreement_envs=3 must divide the number of training "
                                                   "environments 4"),
    (["--method", "geometric_mean", "--tau", "0.5"], "--tau 0.5 with geometric_mean: "),
    (["--batch-norm", "--batch-size", "1"], "--batch-norm needs --batch-size >= 2"),
    (["--tau", "2"], "argument --tau: "),
    (["--lr-milestones", "9", "--epochs", "3"], "--lr-milestones must lie in 1..2"),
])
def test_entry_point_bad_options_are_one_line_errors(argv, message, capsys, monkeypatch):
    from hardtovary.experiments import distributed_synthetic

    monkeypatch.delenv("RANK", raising=False)
    try:
        status = distributed_synthetic.main(argv)
    except SystemExit as exc:  # the parser's own errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith(f"{distributed_synthetic.PROG}: error: {message}"), err
    assert not dist.is_initialized()
