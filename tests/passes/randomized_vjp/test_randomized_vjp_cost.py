"""The randomized VJP's cost model in the Plan (step_change per layer) and profitable_only."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import effcompile
from effcompile.api import plan_of
from effcompile.passes.randomized_vjp.cost import PROFIT_MARGIN, profitable
from effcompile.cost import Work
from effcompile.models import example_inputs, get_model


def _model() -> nn.Module:
    # Two wide layers whose weight-gradient GEMMs dominate, and a 10-class head that is all fixed cost.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


_INPUTS = (torch.randn(256, 2048),)


def _grads(model: nn.Module, seed: int):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(*_INPUTS), torch.arange(256) % 10).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if name.endswith("weight")}


def test_every_sketched_layer_shows_its_share_of_the_step():
    model = effcompile.transform(_model(), effcompile.RandomizedVJP(keep=0.25), example_inputs=_INPUTS)
    changes = {row.layer: float(row.details["step_change"].rstrip("%")) for row in plan_of(model).applied()}
    assert changes["0"] < changes["2"] < 0 < changes["4"]  # the wide layers save, the head costs


def test_profitable_only_leaves_the_layers_that_would_cost_exact():
    model = effcompile.transform(_model(), effcompile.RandomizedVJP(keep=0.25, profitable_only=True),
                                 example_inputs=_INPUTS)
    rows = {row.layer: row for row in plan_of(model)}
    assert rows["0"].applied and rows["2"].applied
    assert not rows["4"].applied and rows["4"].details["skipped_by"] == "profitable_only"
    assert "profitable_only" in rows["4"].reason
    first, second = _grads(model, 1), _grads(model, 2)
    assert torch.equal(first["4.weight"], second["4.weight"])  # exact: the same gradient every draw
    assert not torch.equal(first["0.weight"], second["0.weight"])  # sketched: draws differ
    exact = _model()
    assert torch.allclose(first["4.weight"], _grads(exact, 1)["4.weight"], atol=1e-6)


def test_profitable_only_warns_when_no_layer_pays():
    small = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match="left every layer exact"):
        effcompile.transform(small, effcompile.RandomizedVJP(profitable_only=True), example_inputs=(torch.randn(32, 16),))
    assert not any(row.applied for row in plan_of(small))


def test_a_saving_must_clear_the_margin():
    gross = 1e9
    assert profitable(Work(macs=-gross, bytes=0, ops=0))
    assert not profitable(Work(macs=-gross, ops=(1 - PROFIT_MARGIN / 2) * gross / (1 << 18)))
    assert not profitable(Work(macs=0, ops=1))


def test_compiled_prediction_is_shown_beside_the_eager_one():
    model = effcompile.transform(_model(), effcompile.RandomizedVJP(keep=0.25), example_inputs=_INPUTS)
    for row in plan_of(model).applied():
        assert "step_change" in row.details and "step_change_compiled" in row.details
    # Compiled, the scores and the centring fuse into one pass over X and one over G, and the
    # fixed cost per layer is the host sampler's: the same sketch is predicted cheaper.
    assert effcompile.predicted_step(model, compiled=True) < effcompile.predicted_step(model) < 1


def _vit_plan(profitable_only):
    torch.manual_seed(0)
    model = get_model("vit_tiny", depth=1, embed_dim=192, num_heads=3)
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25, profitable_only=profitable_only),
                         example_inputs=example_inputs("vit_tiny", 64))
    return plan_of(model).for_pass("randomized_vjp")


def test_profitable_only_compiled_keeps_the_layers_a_compiled_step_pays_for():
    # At this size the eager step pays for no sketch (each layer's scoring and centring read X
    # four times and dispatch ~55 ops); compiled, the statistics fuse into one pass over X and one
    # over G, and both MLP layers pay (`python -m benchmarks cost_model --compile` measures the
    # choice; passes/randomized_vjp/README.md).
    with pytest.warns(UserWarning, match="left every layer exact"):
        assert not _vit_plan(True).applied()
    compiled = _vit_plan("compiled")
    assert {row.layer for row in compiled.applied()} == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    skipped = compiled.row("head")
    assert skipped.details["skipped_by"] == "profitable_only" and "compiled step" in skipped.reason


@pytest.mark.parametrize("value", ["yes", "inductor", 1, None])
def test_profitable_only_is_validated(value):
    with pytest.raises(ValueError, match="profitable_only"):
        effcompile.RandomizedVJP(profitable_only=value)
