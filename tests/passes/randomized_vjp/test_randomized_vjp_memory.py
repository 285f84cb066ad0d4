"""Memory mode of the randomized-VJP pass: grad_weight rows chosen in the forward, only they are saved."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.plan import Action
from effcompile.passes.randomized_vjp import estimators as sketch

DRAWS = 300


pytestmark = pytest.mark.usefixtures("single_thread")


def _transform(model, x, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return effcompile.transform(model, effcompile.RandomizedVJP(memory_mode=True, **config), example_inputs=(x,))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))


def _data(tokens=None):
    generator = torch.Generator().manual_seed(3)
    shape = (64, 12) if tokens is None else (16, tokens, 12)
    scale = torch.logspace(-1, 1, 64).reshape(shape[:-1])[..., None]
    return torch.randn(shape, generator=generator) * scale, torch.randint(0, 5, (64,), generator=generator)


def _loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y)


def _gradients(model, forward, x, y):
    model.zero_grad(set_to_none=True)
    _loss(forward(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("path,tokens", [("eager", None), ("compiled", None), ("eager", 4)])
def test_memory_mode_is_unbiased(path, tokens):
    x, y = _data(tokens)
    reference = _mlp()
    exact = _gradients(reference, reference, x, y)
    model = _transform(_mlp(), x, keep=0.25)
    forward = model if path == "eager" else torch.compile(model, backend="effcompile_aot_eager")
    # The scores change every step (the ‖g‖ EMA moves): unbiasedness holds for every such draw.
    draws = torch.stack([_gradients(model, forward, x, y) for _ in range(DRAWS)])
    bound = 5.0 * draws.std(0) / math.sqrt(DRAWS) + 1e-6
    assert ((draws.mean(0) - exact).abs() <= bound).all(), float(((draws.mean(0) - exact).abs() / bound).max())
    assert draws.std(0).max() > 0
    assert int(model[0].weight_vjp_state.updates) == DRAWS
    assert model[0].weight_vjp_state.position_grad_norms.shape == (1 if tokens is None else tokens,)


def _saved_activation_bytes(model, x, y):
    """Bytes autograd saves for backward, parameters excluded (they are resident anyway)."""
    parameters = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).sum()  # sum saves nothing: only the layer's own saved tensors count
    loss.backward()
    return sum(saved)


def test_memory_mode_saves_only_the_sampled_input_rows():
    m, k_in, n = 512, 256, 64
    x, y = torch.randn(m, k_in), None
    torch.manual_seed(0)
    exact = nn.Sequential(nn.Linear(k_in, n))
    sketched = _transform(copy.deepcopy(exact), x, keep=0.25)
    k = sketch.round_budget(m, 0.25, 8)
    exact_bytes = _saved_activation_bytes(exact, x, y)
    sketched_bytes = _saved_activation_bytes(sketched, x, y)
    assert exact_bytes == m * k_in * 4  # X (M×K float32)
    # X[idx] − x̄ (k×K float32), x̄ (K float32), the indices (int64) and the weights 1/π (float32).
    assert sketched_bytes == k * k_in * 4 + k_in * 4 + k * 8 + k * 4
    assert exact_bytes / sketched_bytes > 0.95 * m / k


def test_memory_mode_compiles_without_recompiles_and_trains():
    x, y = _data()
    model = _transform(_mlp(), x, keep=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        step = effcompile.train_step(model, _loss, optimizer, compile=True, backend="effcompile_aot_eager")
        losses = [float(step(x, y)) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0]


def test_memory_mode_plans_linear_layers_and_skips_convolutions_with_reason():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="skipped 1 layer"):
        effcompile.transform(model, effcompile.RandomizedVJP(keep=0.5, memory_mode=True, multiple=2),
                             example_inputs=(torch.randn(8, 1, 4, 4),))
    plan = effcompile.report(model)
    assert plan.row("0").action == Action.SKIP and "memory_mode" in plan.row("0").reason
    assert plan.row("2").details["memory_mode"] == "yes" and plan.row("2").details["k_rows"] == "4/8"
    assert type(effcompile.fold(model)[2]) is nn.Linear


@pytest.mark.parametrize("config", [dict(target="both"), dict(estimator="sketch"), dict(adaptive=True)])
def test_memory_mode_config_combinations_are_rejected(config):
    with pytest.raises(ValueError, match=r"RandomizedVJP\.memory_mode="):
        effcompile.RandomizedVJP(memory_mode=True, **config)
