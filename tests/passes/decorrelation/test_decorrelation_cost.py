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
from effcompile.passes.decorrelation.cost import choose, conv_output_positions, layer_rows, predict

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


@pytest.mark.parametrize("budget", [0.05, 0.3, 1.0])
def test_the_choice_meets_the_budget_and_shrinks_with_it(budget):
    for numel, rows, d in [(64 * 784, 64, 784), (128 * 576, 128 * 64, 576), (10 * 128, 32, 128)]:
        cost, within = choose(numel, rows, 1, d, 1024, 4.0, budget)
        if within:
            assert cost.overhead <= budget
        looser, _ = choose(numel, rows, 1, d, 1024, 4.0, budget * 4)
        assert looser.block >= cost.block or looser.update_every <= cost.update_every


def test_budgeted_plan_is_what_the_runtime_uses_and_R_still_moves():
    model, x = _model(), _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.Decorrelation(lr=0.01, max_overhead=0.2), example_inputs=(x,))
    plan = {row.layer: row for row in effcompile.report(model)}
    unbudgeted = _model()
    effcompile.transform(unbudgeted, effcompile.Decorrelation(lr=0.01), example_inputs=(x,))
    free = {row.layer: row for row in effcompile.report(unbudgeted)}
    assert float(free["5"].details["overhead"][:-1]) > 0.2  # the budget binds on the wide linear
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), optimizer)
    for _ in range(8):
        step(x, torch.zeros(32, dtype=torch.long))
    for layer, state in decorrelation_states(model).items():
        row = plan[layer]
        assert row.details["blocks"] == f"{state.blocks_per_group}x{state.block}"
        if "warning" not in row.details:
            assert float(row.details["overhead"][:-1]) <= 0.2
        every = row.details.get("update_every", 1)
        assert int(state.updates) == math.ceil(8 / every), (layer, int(state.updates), every)
        assert not torch.equal(state.matrix, torch.eye(state.block).expand_as(state.matrix)), layer
    assert plan["5"].details["blocks"] != free["5"].details["blocks"] or "update_every" in plan["5"].details


def test_max_overhead_is_validated():
    with pytest.raises(ValueError, match="max_overhead"):
        effcompile.Decorrelation(max_overhead=0)
    with pytest.raises(ValueError, match="max_overhead"):
        effcompile.Decorrelation(max_overhead="cheap")
