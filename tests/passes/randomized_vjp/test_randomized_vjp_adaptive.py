"""Adaptive (variance-controlled) keep of the randomized-VJP pass.

The rule: every ``adapt_every`` steps a linear layer's grad_weight keep becomes the smallest
ladder keep whose analytic added variance is at most ``variance_ratio`` × the layer's SGD noise
(both EMAs on the device, fed from the backward through a gradient slot).
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.passes.randomized_vjp import estimators as sketch
from effcompile._compat import unique_graph_count

M, K, N = 64, 16, 12


pytestmark = pytest.mark.usefixtures("single_thread")


def _layer(**config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N, bias=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.RandomizedVJP(adaptive=True, **config), example_inputs=(torch.randn(M, K),))
    return model


def _aligned_batch():
    """Every row contributes the same g xᵀ: the minibatch gradient has no SGD noise."""
    x = torch.randn(1, K).expand(M, K).contiguous()
    g = torch.randn(1, N).expand(M, N).contiguous()
    return x, g


def _noisy_batch():
    """Zero-mean contributions with spread norms: SGD noise ≈ Σ‖c_t‖²."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=generator) * torch.exp(0.5 * torch.randn(M, 1, generator=generator))
    g = torch.randn(M, N, generator=generator)
    return x, g


def _train(model, batch, steps, compiled):
    x, g = batch
    forward = torch.compile(model, backend="effcompile_aot_eager") if compiled else model
    keeps = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        forward(x).backward(g)
        keeps.append(model[0].weight_vjp_state.settings.keep)
    return keeps


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_keep_rises_without_sgd_noise_and_falls_with_it(compiled):
    # The plain estimator: identical rows are sampled with variance, though they have no SGD noise.
    config = dict(keep=0.25, min_keep=0.125, max_keep=0.5, variance_ratio=8.0, adapt_every=4, center=False)
    quiet = _layer(**config)
    assert quiet[0].weight_vjp_state.settings.keep == 0.25  # starts at the rung nearest to keep
    quiet_keeps = _train(quiet, _aligned_batch(), 8, compiled)
    torch._dynamo.reset()
    noisy_keeps = _train(_layer(**config), _noisy_batch(), 8, compiled)
    assert quiet_keeps[3:] == [0.5] * 5  # no SGD noise: every sampled keep adds too much variance
    assert noisy_keeps[3:] == [0.125] * 5  # added variance (M/k − 1)·Σ‖c‖² ≤ 8 × SGD noise at k = 8
    assert all(0.125 <= keep <= 0.5 for keep in quiet_keeps + noisy_keeps)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_centred_estimator_is_exact_on_identical_rows_so_keep_falls(compiled):
    """Centred, identical input rows leave nothing to sample: x_t − x̄ = 0, the estimate is the
    exact mean term, the added variance 0 ≤ τ × 0, and the keep drops to the cheapest rung."""
    model = _layer(keep=0.25, min_keep=0.125, max_keep=0.5, variance_ratio=8.0, adapt_every=4, center=True)
    x, g = _aligned_batch()
    keeps = _train(model, (x, g), 8, compiled)
    assert keeps[3:] == [0.125] * 5
    torch.testing.assert_close(model[0].weight.grad, g.t() @ x, rtol=1e-4, atol=1e-4)


def test_statistics_match_formulas_and_monte_carlo():
    """Ladder entries: the Poisson variance bound, which for zero-mean contributions equals the
    Monte-Carlo variance of the fixed-size estimate (up to n/(n−1) and the ‖D‖² term); last entry:
    the SGD noise ``M/(M−1)(Σ‖c_t‖² − ‖ĝ‖²/M)`` computed from explicit per-row gradients."""
    x, g = _noisy_batch()
    exact = g.t() @ x
    ks = [32, 16, 8]
    statistics = sketch.sketch_statistics(g, x, exact, ks, M, "importance", 0.1)
    rows = torch.einsum("mn,mk->mnk", g, x).double()  # c_t = g_t x_tᵀ
    per_row = M * rows  # u_t: the gradient the mean-of-rows estimate averages
    reference_sgd = per_row.var(0, unbiased=True).sum() / M
    torch.testing.assert_close(statistics[-1].double(), reference_sgd, rtol=1e-4, atol=0)
    for k, bound in zip(ks, statistics[:-1]):
        draws = torch.stack([sketch.sketched_grad_weight(g, x, k, "importance", 0.1) for _ in range(400)])
        empirical = (draws.double() - exact.double()).square().sum((1, 2)).mean()
        # Poisson bound ≥ the fixed-size variance, and close to it for centred contributions.
        assert 0.8 * float(bound) < float(empirical) < 1.1 * float(bound), (k, float(bound), float(empirical))


def test_sampled_estimate_gives_the_same_sgd_noise_in_expectation():
    x, g = _noisy_batch()
    exact = g.t() @ x
    reference = sketch.sketch_statistics(g, x, exact, [16], M, "importance", 0.1)[-1]
    estimates = torch.stack([sketch.sketch_statistics(g, x, sketch.sketched_grad_weight(g, x, 16, "importance", 0.1),
                                                      [16], 16, "importance", 0.1)[-1] for _ in range(200)])
    # ‖ĝ_S‖² − V_S is unbiased for ‖ĝ‖² (up to the Poisson bound's slack): the noise estimate stays close.
    assert abs(float(estimates.mean()) / float(reference) - 1) < 0.05


def test_each_keep_change_recompiles_once_and_revisits_reuse_the_cache():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N), nn.Tanh(), nn.Linear(N, 3))
    x = torch.randn(M, K) * torch.logspace(-1, 1, M)[:, None]
    y = torch.randint(0, 3, (M,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.RandomizedVJP(adaptive=True, keep=0.125, variance_ratio=0.3,
                                                             adapt_every=3), example_inputs=(x,))
    forward = torch.compile(model, backend="effcompile_aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    before = unique_graph_count()
    visited = set()
    for _ in range(30):
        visited.add((model[0].weight_vjp_state.settings.keep, model[2].weight_vjp_state.settings.keep))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        optimizer.step()
    graphs = unique_graph_count() - before
    ladder = effcompile.RandomizedVJP(adaptive=True).keep_ladder
    # One compiled graph per distinct keep vector visited: bounded by len(ladder)^layers, and
    # each adaptation (every adapt_every steps) can add at most one.
    assert len(visited) >= 2, visited
    assert graphs == len(visited) <= min(len(ladder) ** 2, 1 + 30 // 3)


def test_state_is_checkpointed_reported_and_survives_deepcopy():
    model = _layer(keep=0.25, variance_ratio=8.0, adapt_every=2, center=False)
    _train(model, _aligned_batch(), 2, compiled=False)
    state = model[0].weight_vjp_state
    assert state.settings.keep == 1.0 and int(state.level) == 0 and int(state.updates) == 2
    checkpoint = model.state_dict()
    assert {"0.weight_vjp_state.statistics", "0.weight_vjp_state.level"} <= set(checkpoint)
    restored = _layer(keep=0.25, variance_ratio=8.0, adapt_every=2, center=False)
    restored.load_state_dict(checkpoint)
    assert restored[0].weight_vjp_state.settings.keep == 1.0
    row = effcompile.report(model).row("0")
    assert row.details["keep"] == 1.0 and row.details["k_rows"] == f"{M}/{M}"
    # Aligned rows: the SGD noise is ~0 (what remains is the Poisson slack of the sampled steps).
    assert float(row.details["sgd_noise"]) < 1e-2 * float(checkpoint["0.weight_vjp_state.statistics"][-2])
    clone = copy.deepcopy(_layer(keep=0.25, variance_ratio=8.0, adapt_every=2))
    _train(clone, _noisy_batch(), 2, compiled=False)  # the copy's own hook folds and adapts
    assert int(clone[0].weight_vjp_state.updates) == 2 and clone[0].weight_vjp_state.settings.keep == 0.125
    assert effcompile.fold(clone)[0].__class__ is nn.Linear and "0.weight_vjp_state.level" not in effcompile.fold(clone).state_dict()


def test_adaptive_estimate_stays_unbiased():
    x, g = _noisy_batch()
    model = _layer(keep=0.25, adapt_every=1000)
    exact = g.t() @ x
    draws = []
    for _ in range(300):
        model.zero_grad(set_to_none=True)
        model(x).backward(g)
        draws.append(model[0].weight.grad.clone())
    draws = torch.stack(draws)
    bound = 5.0 * draws.std(0) / math.sqrt(len(draws)) + 1e-6
    assert ((draws.mean(0) - exact).abs() <= bound).all()


@pytest.mark.parametrize("field,value", [("variance_ratio", 0.0), ("min_keep", 2.0), ("max_keep", 0.0),
                                         ("adapt_every", 0), ("ema_decay", 1.0)])
def test_config_validates_adaptive_fields(field, value):
    with pytest.raises(ValueError, match=rf"RandomizedVJP\.{field}="):
        effcompile.RandomizedVJP(adaptive=True, **{field: value})


def test_config_rejects_adaptive_sketch_estimator():
    with pytest.raises(ValueError, match=r"RandomizedVJP\.adaptive="):
        effcompile.RandomizedVJP(adaptive=True, estimator="sketch")
