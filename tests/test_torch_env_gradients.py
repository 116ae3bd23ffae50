"""accel/torch/env_gradients.py and models.py against the NumPy oracle (reference/mlp.py)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

from hardtovary.accel.torch import env_gradients as EG
from hardtovary.accel.torch import models as M
from hardtovary.reference import mlp


def bce(z, y):
    return F.binary_cross_entropy_with_logits(z.squeeze(-1), y)


LOSSES = {"bce_with_logits": bce, "cross_entropy": F.cross_entropy}


def _setup(loss, batch_norm, K=4, B=3, seed=0):
    rng = np.random.default_rng(seed)
    out = 1 if loss == "bce_with_logits" else 3
    spec = mlp.MLPSpec(in_features=5, hidden=(7, 6), out_features=out, batch_norm=batch_norm)
    params = mlp.init_params(spec, rng)
    X = rng.standard_normal((K, B, 5))
    Y = rng.integers(0, 2, (K, B)).astype(float) if out == 1 else rng.integers(0, out, (K, B))
    model = M.load_reference_params(M.mlp_from_spec(spec, dtype=torch.float64), params)
    return spec, params, X, Y, model


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("batch_norm,semantics,method", [
    (False, "pooled", "auto"), (False, "per_env", "auto"), (True, "per_env", "auto"),
    (True, "pooled", "loop"), (True, "pooled", "batched"), (True, "pooled", "vjp_vmap")])
def test_env_gradients_match_oracle(loss, batch_norm, semantics, method):
    spec, params, X, Y, model = _setup(loss, batch_norm)
    ref = mlp.env_gradients(spec, params, X, Y, loss=loss, semantics=semantics)
    out = EG.env_gradients(model, torch.tensor(X), torch.tensor(Y), LOSSES[loss], semantics=semantics,
                           pooled_method=method)
    assert len(out.grads) == len(ref.grads)
    for g, r, p in zip(out.grads, ref.grads, model.parameters()):
        assert g.shape == (X.shape[0], *p.shape)
        torch.testing.assert_close(g, torch.tensor(r), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.losses, torch.tensor(ref.losses), rtol=1e-12, atol=1e-14)


def test_pooled_chunked_and_running_stats():
    spec, params, X, Y, model = _setup("bce_with_logits", True, K=5)
    ref = mlp.env_gradients(spec, params, X, Y, loss="bce_with_logits", semantics="pooled")
    out = EG.env_gradients(model, torch.tensor(X), torch.tensor(Y), bce, pooled_method="batched", chunk_size=2)
    for g, r in zip(out.grads, ref.grads):
        torch.testing.assert_close(g, torch.tensor(r))
    running = mlp.update_running_stats(mlp.init_running_stats(spec), ref.bn_stats)
    torch.testing.assert_close(model[1].running_mean, torch.tensor(running[0].mean))
    torch.testing.assert_close(model[1].running_var, torch.tensor(running[0].var))


def test_per_env_running_stats_updated_in_env_order():
    spec, params, X, Y, model = _setup("bce_with_logits", True)
    ref = mlp.env_gradients(spec, params, X, Y, loss="bce_with_logits", semantics="per_env")
    EG.env_gradients(model, torch.tensor(X), torch.tensor(Y), bce, semantics="per_env")
    running = mlp.update_running_stats(mlp.init_running_stats(spec), ref.bn_stats)
    for i, idx in enumerate((1, 4)):
        torch.testing.assert_close(model[idx].running_mean, torch.tensor(running[i].mean))
        torch.testing.assert_close(model[idx].running_var, torch.tensor(running[i].var))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_example_gradients_match_oracle(batch_norm):
    spec, params, X, Y, model = _setup("cross_entropy", batch_norm, K=6, B=1)
    Xn, Yn = X[:, 0], Y[:, 0]
    ref = mlp.example_gradients(spec, params, Xn, Yn, loss="cross_entropy")
    out = EG.example_gradients(model, torch.tensor(Xn), torch.tensor(Yn), F.cross_entropy)
    for g, r in zip(out.grads, ref.grads):
        torch.testing.assert_close(g, torch.tensor(r), rtol=1e-10, atol=1e-12)


def test_float32_engine_close_to_oracle():
    spec, params, X, Y, _ = _setup("bce_with_logits", True)
    model = M.load_reference_params(M.mlp_from_spec(spec), params)
    ref = mlp.env_gradients(spec, params, X, Y, loss="bce_with_logits", semantics="pooled")
    out = EG.env_gradients(model, torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32), bce)
    for g, r in zip(out.grads, ref.grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, torch.tensor(r, dtype=torch.float32), rtol=1e-4, atol=1e-5)


def test_mlp_names_and_bad_input():
    spec = mlp.MLPSpec(in_features=3, hidden=(4, 4), batch_norm=True, activation="tanh")
    model = M.mlp_from_spec(spec)
    assert [n for n, _ in model.named_parameters()] == mlp.param_names(spec)
    X, Y = torch.randn(2, 1, 3), torch.rand(2, 1)
    with pytest.raises(ValueError, match="B >= 2"):
        EG.env_gradients(model, X, Y, bce, semantics="per_env")
    with pytest.raises(ValueError, match="semantics"):
        EG.env_gradients(model, X, Y, bce, semantics="nope")
    with pytest.raises(ValueError):
        EG.env_gradients(model, X, torch.rand(3, 1), bce)
    with pytest.raises(TypeError):
        EG.env_gradients(model, X.numpy(), Y, bce)
    with pytest.raises(ValueError):
        M.load_reference_params(model, [np.zeros(1)] * len(list(model.parameters())))


def test_fastresnet_shape_and_example_gradients_mean():
    torch.manual_seed(0)
    net = M.FastResNet(width=0.0625).double()
    X = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    Y = torch.randint(0, 10, (6,))
    assert net(X).shape == (6, 10)
    assert [p.shape[0] for p in net.parameters()][:1] == [4]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    out = EG.example_gradients(net, X, Y, F.cross_entropy)
    net.load_state_dict(state)
    net.zero_grad()
    F.cross_entropy(net(X), Y).backward()
    for g, p in zip(out.grads, net.parameters()):
        assert g.shape == (6, *p.shape)
        torch.testing.assert_close(g.mean(0), p.grad, rtol=1e-9, atol=1e-12)
    batched = EG.example_gradients(net, X, Y, F.cross_entropy, pooled_method="batched")
    for a, b in zip(out.grads, batched.grads):
        torch.testing.assert_close(a, b)
