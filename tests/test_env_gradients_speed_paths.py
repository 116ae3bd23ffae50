"""The fast paths of accel/torch/env_gradients.py: the linear engine, preallocated ``out`` stacks and the compiled
engine. Each is checked against the vmap engine (to float tolerance) and against an independent route, one plain
backward pass per environment; the options' validation and the eager fallback where torch.compile is unavailable."""

import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F
from torch import nn

from hardtovary.accel.torch import env_gradients as EG
from hardtovary.accel.torch import models as M
from hardtovary.accel.torch.optim import and_mask_backward
from hardtovary.reference import mlp


def bce(z, y):
    return F.binary_cross_entropy_with_logits(z.squeeze(-1), y)


def _loop_of_backward_passes(model, X, Y, loss_fn):
    """G[e] by one plain forward and backward per environment (the route that needs no engine)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for e in range(X.shape[0]):
        rows.append(torch.autograd.grad(loss_fn(model(X[e]), Y[e]), params))
    return [torch.stack([r[i] for r in rows]) for i in range(len(params))]


def _assert_stacks(got, expected, **tolerance):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g, e, **tolerance)


# Networks the linear engine runs: every activation, a negative LeakyReLU slope (backward from the input), a
# LeakyReLU slope of 0, a Linear without bias, a frozen weight, an activation before the first Linear, one after
# the last, and activations in a row (only one right after a Linear may overwrite its input).
def _networks():
    yield "mlp_leaky_relu", M.mlp_from_spec(mlp.MLPSpec(in_features=5, hidden=(7, 6))), None
    yield "mlp_relu", M.mlp_from_spec(mlp.MLPSpec(in_features=5, hidden=(7, 6), activation="relu")), None
    yield "mlp_tanh", M.mlp_from_spec(mlp.MLPSpec(in_features=5, hidden=(7, 6), activation="tanh",
                                                  out_features=3)), 3
    net = nn.Sequential(nn.Linear(5, 7), nn.LeakyReLU(-0.3), nn.Linear(7, 4, bias=False), nn.LeakyReLU(0.0),
                        nn.Linear(4, 3), nn.ReLU())
    net[0].weight.requires_grad_(False)
    yield "mixed_frozen_no_bias", net, 3
    yield "leading_activation", nn.Sequential(nn.Tanh(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 1)), None
    yield "stacked_activations", nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Tanh(), nn.LeakyReLU(0.2),
                                               nn.Linear(7, 1)), None


NETWORKS = {name: (net, classes) for name, net, classes in _networks()}


def _case(name, K=4, B=3, dtype=torch.float64, seed=0):
    """One of NETWORKS (the same module at every call, as a training loop has; converted to ``dtype`` in place)
    with environment batches of K x B."""
    torch.manual_seed(seed)
    net, classes = NETWORKS[name]
    net = net.to(dtype)
    X = torch.randn(K, B, 5, dtype=dtype)
    Y = torch.randint(0, 2, (K, B)).to(dtype) if classes is None else torch.randint(0, classes, (K, B))
    return net, X, Y, (bce if classes is None else F.cross_entropy)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_linear_engine_equals_vmap_engine_and_a_loop_of_backward_passes(name):
    net, X, Y, loss_fn = _case(name)
    X_before = X.clone()
    assert EG._resolve_engine(net, X, "pooled", "auto", None, None, False) == "linear"
    linear = EG.env_gradients(net, X, Y, loss_fn, engine="linear")
    vmapped = EG.env_gradients(net, X, Y, loss_fn, engine="vmap")
    assert torch.equal(X, X_before)  # the in-place activations never touch the caller's X
    _assert_stacks(linear.grads, vmapped.grads, rtol=1e-12, atol=1e-14)
    _assert_stacks(linear.grads, _loop_of_backward_passes(net, X, Y, loss_fn), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(linear.losses, vmapped.losses, rtol=1e-14, atol=0)
    for semantics in EG.SEMANTICS:  # without BatchNorm both semantics run the same engine
        auto = EG.env_gradients(net, X, Y, loss_fn, semantics=semantics)
        _assert_stacks(auto.grads, linear.grads, rtol=0, atol=0)


def test_linear_engine_float32_against_the_oracle_and_the_loop():
    spec = mlp.MLPSpec(in_features=5, hidden=(16, 16, 16))
    rng = np.random.default_rng(3)
    params = mlp.init_params(spec, rng)
    X, Y = rng.standard_normal((6, 8, 5)), rng.integers(0, 2, (6, 8)).astype(float)
    ref = mlp.env_gradients(spec, params, X, Y, loss="bce_with_logits", semantics="per_env")
    net = M.load_reference_params(M.mlp_from_spec(spec), params)
    Xt, Yt = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    out = EG.env_gradients(net, Xt, Yt, bce, engine="linear")
    _assert_stacks(out.grads, [torch.tensor(r, dtype=torch.float32) for r in ref.grads], rtol=1e-4, atol=1e-6)
    _assert_stacks(out.grads, _loop_of_backward_passes(net, Xt, Yt, bce), rtol=1e-5, atol=1e-7)


def test_results_do_not_alias_the_workspace_and_shapes_may_change():
    net, X, Y, loss_fn = _case("mlp_leaky_relu", K=4, B=3)
    first = EG.env_gradients(net, X, Y, loss_fn)
    kept = [g.clone() for g in first.grads]
    net2, X2, Y2, _ = _case("mlp_leaky_relu", K=5, B=2, seed=1)  # the same module, other shapes
    assert net2 is net
    _, X1, Y1, _ = _case("mlp_leaky_relu", K=4, B=3, seed=1)  # the same shapes: the workspace is reused
    EG.env_gradients(net, X1, Y1, loss_fn)
    _assert_stacks(first.grads, kept, rtol=0, atol=0)
    second = EG.env_gradients(net, X2, Y2, loss_fn)
    third = EG.env_gradients(net, X, Y, loss_fn)
    _assert_stacks(first.grads, kept, rtol=0, atol=0)
    _assert_stacks(third.grads, kept, rtol=0, atol=0)
    _assert_stacks(second.grads, _loop_of_backward_passes(net, X2, Y2, loss_fn), rtol=1e-12, atol=1e-14)


def test_inference_mode_and_back():
    net, X, Y, loss_fn = _case("mlp_relu")
    expected = _loop_of_backward_passes(net, X, Y, loss_fn)
    with torch.inference_mode():
        inside = EG.env_gradients(net, X, Y, loss_fn, engine="linear")
    outside = EG.env_gradients(net, X, Y, loss_fn, engine="linear")  # the workspace of inference mode is not reused
    _assert_stacks(inside.grads, expected, rtol=1e-12, atol=1e-14)
    _assert_stacks(outside.grads, expected, rtol=1e-12, atol=1e-14)


def test_threads_share_a_model():
    net, X, Y, loss_fn = _case("mlp_tanh", K=6, B=5)
    expected = EG.env_gradients(net, X, Y, loss_fn, engine="vmap").grads
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(EG.env_gradients(net, X, Y, loss_fn, engine="linear").grads)
        except Exception as error:  # a thread's exception would be lost: the test's thread asserts on it
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for grads in results:
        _assert_stacks(grads, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("engine", ["linear", "vmap"])
def test_out_receives_the_stacks(engine):
    net, X, Y, loss_fn = _case("mixed_frozen_no_bias")
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    out = [torch.full((X.shape[0], *p.shape), float("nan"), dtype=p.dtype) for _, p in named]
    result = EG.env_gradients(net, X, Y, loss_fn, engine=engine, out=out)
    assert all(g is o for g, o in zip(result.grads, out))
    _assert_stacks(out, _loop_of_backward_passes(net, X, Y, loss_fn), rtol=1e-12, atol=1e-14)


def test_out_with_pooled_batch_norm_is_a_copy_of_the_result():
    spec = mlp.MLPSpec(in_features=5, hidden=(7,), batch_norm=True)
    net = M.mlp_from_spec(spec, dtype=torch.float64)
    X, Y = torch.randn(3, 4, 5, dtype=torch.float64), torch.randint(0, 2, (3, 4)).double()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    expected = EG.env_gradients(net, X, Y, bce).grads
    net.load_state_dict(state)
    out = [torch.empty(3, *p.shape, dtype=p.dtype) for p in net.parameters()]
    EG.env_gradients(net, X, Y, bce, out=out)
    _assert_stacks(out, expected, rtol=0, atol=0)


def test_bad_out_is_named():
    net, X, Y, loss_fn = _case("mlp_leaky_relu")
    good = [torch.empty(X.shape[0], *p.shape, dtype=p.dtype) for p in net.parameters()]
    with pytest.raises(ValueError, match=r"out must be a list of 6 tensors .* got list of length 5"):
        EG.env_gradients(net, X, Y, loss_fn, out=good[:5])
    with pytest.raises(ValueError, match=r"out\[1\] \(0.bias\) must be a contiguous tensor \(4, 7\)"):
        EG.env_gradients(net, X, Y, loss_fn, out=[good[0], torch.empty(4, 6, dtype=torch.float64), *good[2:]])
    with pytest.raises(ValueError, match=r"out\[0\] .* got \(4, 7, 5\) torch.float32"):
        EG.env_gradients(net, X, Y, loss_fn, out=[good[0].float(), *good[1:]])
    with pytest.raises(ValueError, match=r"out\[0\] .* not contiguous"):
        EG.env_gradients(net, X, Y, loss_fn, out=[torch.empty(4, 5, 7, dtype=torch.float64).transpose(1, 2),
                                                  *good[1:]])


class _MyLinear(nn.Linear):
    pass


def _ineligible():
    hooked = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1))
    hooked[1].register_forward_hook(lambda module, args, output: output * 2)
    yield "hook", hooked
    yield "subclass", nn.Sequential(_MyLinear(5, 3), nn.ReLU(), nn.Linear(3, 1))
    yield "other activation", nn.Sequential(nn.Linear(5, 3), nn.GELU(), nn.Linear(3, 1))
    yield "eval BatchNorm", M.mlp_from_spec(mlp.MLPSpec(in_features=5, hidden=(3,), batch_norm=True)).eval()
    yield "not Sequential", nn.ModuleList([nn.Linear(5, 1)])


@pytest.mark.parametrize("name,net", list(_ineligible()))
def test_auto_leaves_other_models_to_vmap_and_linear_refuses_them(name, net):
    X = torch.randn(3, 4, 5)
    assert EG.linear_plan(net) is None
    assert EG._resolve_engine(net, X, "pooled", "auto", None, None, False) == "vmap"
    with pytest.raises(ValueError, match="engine='linear' needs an nn.Sequential"):
        EG._resolve_engine(net, X, "pooled", "linear", None, None, False)


def test_hooks_still_run_under_auto():
    net = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    X, Y = torch.randn(3, 4, 5, dtype=torch.float64), torch.randint(0, 2, (3, 4)).double()
    plain = EG.env_gradients(net, X, Y, bce).grads
    net[1].register_forward_hook(lambda module, args, output: output * 2)
    hooked = EG.env_gradients(net, X, Y, bce).grads
    _assert_stacks(hooked, _loop_of_backward_passes(net, X, Y, bce), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(hooked[-1], plain[-1])


def test_engine_and_compile_options_are_validated():
    net, X, Y, loss_fn = _case("mlp_leaky_relu")
    with pytest.raises(ValueError, match=r"^engine must be one of \['auto', 'linear', 'vmap'\], got 'fast'$"):
        EG.env_gradients(net, X, Y, loss_fn, engine="fast")
    with pytest.raises(ValueError, match=r"^compile must be None or one of \['default', .*\], got 'turbo'$"):
        EG.env_gradients(net, X, Y, loss_fn, compile="turbo")
    with pytest.raises(ValueError, match=r"^compile must be None or one of .* got True$"):
        EG.env_gradients(net, X, Y, loss_fn, compile=True)
    with pytest.raises(ValueError, match="chunk_size bounds the vmap engines' memory; engine='linear'"):
        EG.env_gradients(net, X, Y, loss_fn, engine="linear", chunk_size=2)
    with pytest.raises(ValueError, match="compile='default' compiles the linear engine, but engine='vmap'"):
        EG.env_gradients(net, X, Y, loss_fn, engine="vmap", compile="default")
    assert EG._resolve_engine(net, X, "pooled", "auto", None, 2, False) == "vmap"  # chunk_size asks for vmap
    with pytest.raises(ValueError, match="compile='default' applies to rows that do not interact, but this call "
                                         "has force_coupled=True"):
        EG.env_gradients(net, X, Y, loss_fn, force_coupled=True, compile="default")
    bn = M.mlp_from_spec(mlp.MLPSpec(in_features=5, hidden=(3,), batch_norm=True))
    with pytest.raises(ValueError, match="engine='linear' applies to rows .* training-mode BatchNorm"):
        EG.env_gradients(bn, X.float(), Y.float(), loss_fn, engine="linear")
    with pytest.raises(ValueError, match="engine='linear' needs .* X of shape \\[K, B, features\\]"):
        EG.env_gradients(nn.Sequential(nn.Linear(5, 1)), X[..., None, :], Y[..., None], loss_fn, engine="linear")


def test_and_mask_backward_passes_the_engine_on():
    net, X, Y, loss_fn = _case("mlp_relu")
    steps = {}
    for engine in ("linear", "vmap"):
        and_mask_backward(net, X, Y, loss_fn, tau=0.5, engine=engine)
        steps[engine] = [p.grad.clone() for p in net.parameters()]
    _assert_stacks(steps["linear"], steps["vmap"], rtol=1e-12, atol=1e-14)


def test_compile_falls_back_to_eager_with_a_warning_where_unavailable(monkeypatch):
    net, X, Y, loss_fn = _case("mlp_leaky_relu")
    expected = EG.env_gradients(net, X, Y, loss_fn).grads
    monkeypatch.setattr(EG, "_compiled", {})
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.warns(RuntimeWarning, match="compile='default' is unavailable here .*; the linear engine runs eagerly"):
        got = EG.env_gradients(net, X, Y, loss_fn, compile="default")
    _assert_stacks(got.grads, expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the next call is quiet
        EG.env_gradients(net, X, Y, loss_fn, compile="default")


def test_compile_falls_back_when_the_backend_fails(monkeypatch):
    net, X, Y, loss_fn = _case("mlp_tanh")
    expected = EG.env_gradients(net, X, Y, loss_fn).grads

    def failing_compile(fn, mode):
        def compiled(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(fn, RuntimeError("no working C++ compiler\ndetails"), None)
        return compiled

    monkeypatch.setattr(EG, "_compiled", {})
    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.warns(RuntimeWarning, match=r"compile='reduce-overhead' is unavailable here \(RuntimeError: no "
                                            r"working C\+\+ compiler\); the linear engine runs eagerly"):
        got = EG.env_gradients(net, X, Y, loss_fn, compile="reduce-overhead")
    _assert_stacks(got.grads, expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp_tanh", "mixed_frozen_no_bias"])
def test_compiled_engine_equals_eager(name):
    net, X, Y, loss_fn = _case(name, K=4, B=6, dtype=torch.float32)
    eager = EG.env_gradients(net, X, Y, loss_fn)
    out = [torch.empty(4, *p.shape) for p in net.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # compiled here, not the fallback
        compiled = EG.env_gradients(net, X, Y, loss_fn, compile="default")
        into = EG.env_gradients(net, X, Y, loss_fn, compile="default", out=out)
    _assert_stacks(compiled.grads, eager.grads, rtol=1e-5, atol=1e-6)
    _assert_stacks(compiled.grads, _loop_of_backward_passes(net, X, Y, loss_fn), rtol=1e-5, atol=1e-6)
    assert all(g is o for g, o in zip(into.grads, out))
    _assert_stacks(out, compiled.grads, rtol=0, atol=0)
    torch.testing.assert_close(compiled.losses, eager.losses)
