"""The randomized VJP's cost model in the Plan (step_change per layer) and profitable_only."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import effcompile
from effcompile.api import plan_of
from effcompile.passes.randomized_vjp.cost import PROFIT_MARGIN, profitable
from effcompile.cost import Work


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


def test_profitable_only_is_validated():
    with pytest.raises(ValueError, match="profitable_only"):
        effcompile.RandomizedVJP(profitable_only="yes")
