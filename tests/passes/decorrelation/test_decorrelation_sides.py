"""Where R is applied (``Decorrelation(apply=...)``): the fused weight ``W·R`` or the layer input ``x·Rᵀ``.

Both sides are the same function with the same weight gradient ``δ·zᵀ``; the input side costs
``rows·d·b`` instead of ``|W|·b`` and needs an input that the layer alone reads.  Each test
checks the side against a plain reference written here (``z = x·Rᵀ``, then the original layer).
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.passes.decorrelation import decorrelation_states

pytestmark = pytest.mark.usefixtures("single_thread")


class _Projection(nn.Module):
    """GPT-2 ``Conv1D`` style: W stored in×out, the input viewed to rows, then ``addmm``."""

    def __init__(self, d, out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, out) / math.sqrt(d))
        self.bias = nn.Parameter(torch.zeros(out))

    def forward(self, x):
        rows = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return rows.view(*x.shape[:-1], -1)


class _Residual(nn.Module):
    """Reads its input twice: the layer's input is not its alone."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, x):
        return x + F.linear(x, self.weight)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 96), nn.ReLU(), _Projection(96, 80), nn.Tanh(), _Residual(80), nn.Linear(80, 10))


def _transform(model, rows=8, **config):
    config = {"lr": 0.05, "max_overhead": None, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True, **config), example_inputs=(torch.randn(rows, 24),))
    return {row.layer: row for row in effcompile.report(model) if row.pass_name == "decorrelation"}


def _reference(model, states, x):
    """The network with every decorrelated layer computed as ``layer(x·Rᵀ)``, written plainly."""
    def z(layer, value):
        R = states[layer].matrix[0]
        return value @ R.t()

    params = {name: p for name, p in model.named_parameters()}
    h = F.relu(F.linear(z("0", x), params["0.weight"], params["0.bias"]))
    h = torch.tanh(z("2", h) @ params["2.weight"] + params["2.bias"])
    h = h + F.linear(z("4", h), params["4.weight"])
    return F.linear(z("5", h), params["5.weight"], params["5.bias"])


def test_plan_puts_R_on_the_input_only_where_the_layer_alone_reads_it():
    plan = _transform(_model(), apply="input")
    assert {layer: row.details["apply"] for layer, row in plan.items()} == {
        "0": "input", "2": "input", "4": "weight", "5": "input"}
    assert "read by the layer alone" in plan["4"].details["weight_side"]


def test_auto_picks_the_cheaper_side_by_batch_rows():
    small = _transform(_model(), rows=8)  # 8 rows < every layer's outputs: the input side
    large = _transform(_model(), rows=4096)  # 4096 rows > outputs: the fused weight
    assert small["0"].details["apply"] == small["2"].details["apply"] == "input"
    assert large["0"].details["apply"] == large["2"].details["apply"] == "weight"
    assert small["4"].details["apply"] == "weight" and "weight_side" not in small["4"].details


@pytest.mark.parametrize("side", ["input", "weight"])
def test_each_side_equals_the_plain_reference_while_R_moves(side):
    model = _model()
    _transform(model, apply=side)
    states = decorrelation_states(model)
    reference_model = copy.deepcopy(model)  # parameters for the plain reference, trained alongside
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1)
    for _ in range(5):
        x, target = torch.randn(8, 24), torch.randint(10, (8,))
        before = {layer: state.matrix.clone() for layer, state in states.items()}
        loss = F.cross_entropy(model(x), target)  # updates R, then applies the new R
        expected = F.cross_entropy(_reference(reference_model, states, x), target)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        assert all(not torch.equal(before[layer], state.matrix) for layer, state in states.items())
        optimizer.zero_grad()
        loss.backward()
        reference_model.zero_grad()
        expected.backward()
        for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
            with torch.no_grad():
                q.sub_(0.05 * q.grad)
        optimizer.step()
    # The input side reads the weight as it is; R is applied to the layer's argument.
    first = model[0]
    assert (first.weight is first._parameters["weight"]) == (side == "input")


def test_input_side_applies_in_eval_and_folds_into_the_same_function():
    model = _model()
    _transform(model, apply="input")
    model.train()
    for _ in range(3):
        model(torch.randn(8, 24))
    model.eval()
    x = torch.randn(5, 24)  # a batch size the example did not have
    states = decorrelation_states(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(model, states, x))
        expected = model(x)
        folded = effcompile.fold(model)
        assert not decorrelation_states(folded) and not folded[0]._forward_pre_hooks
        assert type(folded[0]) is nn.Linear
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "effcompile"])
def test_compiled_input_side_matches_eager_under_autocast_and_a_batch_change(backend):
    eager = _model()
    _transform(eager, apply="input")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend)
    torch.manual_seed(2)
    for rows in (8, 8, 5):
        x = torch.randn(rows, 24)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, got = eager(x), compiled(x)
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    for (layer, state), other in zip(decorrelation_states(eager).items(), decorrelation_states(compiled_model).values()):
        assert int(other.updates) == int(state.updates) == 3, layer
        # bf16 activations round differently in fused kernels; R itself is updated in fp32.
        torch.testing.assert_close(other.matrix, state.matrix, rtol=1e-3, atol=1e-4)


def test_block_diagonal_input_side_equals_the_fused_weight():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(70, 40))
    x = torch.randn(6, 70)
    outputs = {}
    for side in ("input", "weight"):
        model = copy.deepcopy(layer)
        _transform_one(model, x, side)
        state = decorrelation_states(model)["0"]
        assert (state.blocks_per_group, state.block) == (3, 24)  # 70 features: padded to 3 blocks of 24
        generator = torch.Generator().manual_seed(1)  # the same R on both sides
        with torch.no_grad():
            state.matrix.add_(0.1 * torch.randn(state.matrix.shape, generator=generator))
        model.eval()
        outputs[side] = model(x)
    torch.testing.assert_close(outputs["input"], outputs["weight"], rtol=1e-5, atol=1e-6)


def _transform_one(model, x, side):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True, apply=side, max_block_size=32, max_overhead=None),
                             example_inputs=(x,))


def test_apply_is_validated():
    with pytest.raises(ValueError, match="apply"):
        effcompile.Decorrelation(input_layers=True, apply="both")
