"""The decorrelation cost model and the overhead budget (``Decorrelation(max_overhead=...)``).

The model's layer work is what torch's FLOP counter counts for a plain training step; the budget's
choice meets the budget, is what the runtime state uses (blocks, update interval), and shrinks
with the budget.
"""

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import effcompile
from effcompile.passes.decorrelation import decorrelation_states
from effcompile.passes.decorrelation.cost import (AUTO_MAX_INTERVAL, allocate, conv_output_positions, ladder, layer_rows,
                                                  predict)

pytestmark = pytest.mark.usefixtures("single_thread")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))


def _x(rows=32):
    return torch.randn(rows, 3, 16, 16)


def test_layer_work_is_what_the_flop_counter_counts():
    model, x = _model(), _x()
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), torch.zeros(32, dtype=torch.long)).sum().backward()
    # Every weight: forward + weight gradient + input gradient (the first conv has no input gradient).
    counted = sum(counter.get_flop_counts()["Global"].values()) // 2
    predicted = 0
    shapes = {"0": (32, 3, 16, 16), "2": (32, 16, 16, 16), "5": (32, 1568), "7": (32, 64)}
    for name, shape in shapes.items():
        layer = model.get_submodule(name)
        conv = getattr(layer, "kernel_size", None)
        if conv is not None:
            from effcompile.passes.analysis.capture import ConvGeometry

            geometry = ConvGeometry(2, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups)
            rows = layer_rows(shape, conv_output_positions(shape, geometry))
        else:
            rows = layer_rows(shape, None)
        predicted += predict(layer.weight.numel(), rows, 1, layer.weight[0].numel(), 1024, 4.0, 1).layer_macs
    first = model[0]
    no_input_gradient = 32 * 16 * 16 * first.weight.numel()
    assert abs(predicted - no_input_gradient - counted) <= 0.01 * counted, (predicted, counted)


def _one_layer(numel, rows, d, budget):
    """The budget's choice for a model of one layer."""
    [cost], within = allocate([ladder(numel, rows, 1, d, 1024, 4.0)], budget)
    return cost, within


@pytest.mark.parametrize("budget", [0.05, 0.3, 1.0])
def test_the_choice_meets_the_budget_and_shrinks_with_it(budget):
    for numel, rows, d in [(64 * 784, 64, 784), (128 * 576, 128 * 64, 576), (10 * 128, 32, 128)]:
        cost, within = _one_layer(numel, rows, d, budget)
        if within:
            assert cost.overhead <= budget
        looser, _ = _one_layer(numel, rows, d, budget * 4)
        assert looser.block >= cost.block or looser.update_every <= cost.update_every


def test_budgeted_plan_is_what_the_runtime_uses_and_R_still_moves():
    # Batch 128: at 32 rows the ops' dispatch alone (cost.DISPATCH_MACS) is above a 0.2 budget.
    model, x = _model(), _x(128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.01, max_overhead=0.2), example_inputs=(x,))
    plan = {row.layer: row for row in effcompile.report(model)}
    unbudgeted = _model()
    effcompile.transform(unbudgeted, effcompile.Decorrelation(input_layers=True, lr=0.01), example_inputs=(x,))
    free = {row.layer: row for row in effcompile.report(unbudgeted)}
    assert float(free["5"].details["overhead"][:-1]) > 0.2  # the budget binds on the wide linear
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), optimizer)
    for _ in range(8):
        step(x, torch.zeros(128, dtype=torch.long))
    assert all("warning" not in row.details for row in plan.values())
    layer_macs, pass_cost = 0, 0
    for layer, state in decorrelation_states(model).items():
        row = plan[layer]
        if row.details["structure"] == "kronecker":  # R_channel ⊗ R_spatial (the budget's choice for a 3x3 conv)
            assert row.details["kronecker"] == f"{state.channels}x{state.channels} ⊗ {state.taps}x{state.taps}"
        else:
            assert row.details["blocks"] == f"{state.blocks_per_group}x{state.block}"
        assert row.details["model_overhead"] == plan["5"].details["model_overhead"]
        every = row.details.get("update_every", 1)
        assert int(state.updates) == math.ceil(8 / every), (layer, int(state.updates), every)
        assert not torch.equal(state.matrix, torch.eye(state.matrix.shape[-1]).expand_as(state.matrix)), layer
    assert plan["5"].details["blocks"] != free["5"].details["blocks"] or "update_every" in plan["5"].details
    assert float(plan["5"].details["model_overhead"][:-1]) <= 0.2  # the model meets the budget


def _ladders():
    """A wide layer that dominates the pass's cost and two small ones (MACs at batch 32)."""
    wide = ladder(512 * 2304, 32 * 16, 1, 2304, 1024, 4.0)
    small = ladder(64 * 27, 32 * 256, 1, 27, 1024, 4.0)
    head = ladder(10 * 64, 32, 1, 64, 1024, 4.0)
    return [wide, small, head]


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5])
def test_allocation_meets_the_model_budget_by_making_the_dominant_layer_cheaper(budget):
    ladders = _ladders()
    chosen, within = allocate(ladders, budget)
    assert within
    total = sum(cost.pass_cost for cost in chosen) / sum(cost.layer_cost for cost in chosen)
    assert total <= budget
    wide, small, head = chosen
    assert wide.block < ladders[0][0].block or wide.update_every > 1  # the wide layer paid
    assert (small.block, small.update_every) == (ladders[1][0].block, 1)  # the cheap layer keeps its full R
    # The head's own overhead is far above the budget (rows 32 < its block), yet the model meets it.
    assert head.overhead > budget or head is ladders[2][0]


def test_allocation_is_monotone_in_the_budget_and_reports_an_unreachable_one():
    ladders = _ladders()
    tight, _ = allocate(ladders, 0.05)
    loose, _ = allocate(ladders, 0.5)
    assert sum(c.pass_cost for c in tight) < sum(c.pass_cost for c in loose)
    cheapest, within = allocate(ladders, 1e-6)
    assert not within and [c.pass_cost for c in cheapest] == [rungs[-1].pass_cost for rungs in ladders]
    for rungs in ladders:  # every ladder rung is strictly cheaper than the one before
        assert all(b.pass_cost < a.pass_cost for a, b in zip(rungs, rungs[1:]))


def test_max_overhead_is_validated():
    with pytest.raises(ValueError, match="max_overhead"):
        effcompile.Decorrelation(input_layers=True, max_overhead=0)
    with pytest.raises(ValueError, match="max_overhead"):
        effcompile.Decorrelation(input_layers=True, max_overhead="cheap")


def test_dispatch_keeps_small_layers_dense_and_splits_wide_ones():
    """Each added op costs DISPATCH_MACS: two 64-blocks save a 128-wide layer (R on its input) fewer
    MACs at batch 32 than their block plumbing costs, so its ladder never splits it; a 1024-wide
    layer still splits."""
    small = ladder(128 * 128, 32, 1, 128, 1024, 4.0, limited=True, sides=("weight", "input"))
    assert [cost.block for cost in small] == [128] * len(small) and small[-1].update_every == AUTO_MAX_INTERVAL
    wide = ladder(1024 * 1024, 32, 1, 1024, 1024, 4.0, limited=True)
    assert min(cost.block for cost in wide) < 1024
    assert all(cost.layer_cost > cost.layer_macs for cost in small)  # the layer's own ops count too


def _decorrelation_after(steps, **config):
    """(the Plan row, the state, mean |corr| after ``steps`` training forwards) for one linear
    layer on strongly correlated inputs."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 3)
    batch = lambda: torch.randn(64, 1) + 0.5 * torch.randn(64, 48)  # noqa: E731
    x = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(layer, effcompile.Decorrelation(input_layers=True, lr=0.02, **config), example_inputs=(x,))
    state = decorrelation_states(layer)["<root>"]
    for _ in range(steps):
        layer(batch())
    return effcompile.report(layer)[0], state, float(state.off_diagonal_correlation(x))


def test_a_budget_interval_takes_a_proportionally_longer_step(monkeypatch):
    # The budget updates this layer every k-th step: each update then takes k times the
    # configured step, so R decorrelates about as fast per training step as updating every step.
    every = _decorrelation_after(0)[0].details["update_every"]
    steps = 8 * every
    every_step = _decorrelation_after(steps, max_overhead=None)[2]
    row, state, budgeted = _decorrelation_after(steps)
    assert every > 1 and row.details["lr"] == pytest.approx(0.02 * every) and state.lr == pytest.approx(0.02 * every)
    assert budgeted == pytest.approx(every_step, rel=0.25)
    from effcompile.passes.decorrelation import state as state_module

    monkeypatch.setattr(state_module, "update_lr", lambda lr, every, configured: lr)
    assert _decorrelation_after(steps)[2] > 1.5 * every_step  # the configured step, k times fewer times
    # An interval the config asked for keeps the configured step.
    row, state, _ = _decorrelation_after(1, max_overhead=None, update_every=4)
    assert "lr" not in row.details and state.lr == 0.02
