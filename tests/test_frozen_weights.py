"""Fine-tuning with frozen layers (``requires_grad=False``): a per-layer pass leaves a frozen weight
alone and says so in the Plan.  Decorrelating a frozen layer's input would change what the layer
computes (``W·R`` with ``R`` moving and ``W`` unable to follow); sketching its weight gradient would
sketch a gradient autograd never computes."""

import warnings

import pytest
import torch
import torch.nn as nn

import effcompile
from effcompile.passes.decorrelation import decorrelation_states
from effcompile.plan import Action


def _partly_frozen() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    model[0].requires_grad_(False)  # a frozen "backbone" layer
    return model


def _transform(model, config, rows=32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, config, example_inputs=(torch.randn(rows, 8),))
    return effcompile.report(model)


def _train(model, steps=20):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=generator) @ torch.randn(8, 8, generator=generator)  # correlated inputs
    y = torch.randint(0, 3, (64,), generator=generator)
    step = effcompile.train_step(model, nn.functional.cross_entropy,
                                 torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05))
    for _ in range(steps):
        step(x, y)
    return x


def test_decorrelation_leaves_a_frozen_layer_computing_what_it_did():
    model = _partly_frozen()
    probe = torch.randn(16, 8)
    before = model[0](probe).detach()
    plan = _transform(model, effcompile.Decorrelation(input_layers=True, lr=0.05, max_overhead=None)).for_pass("decorrelation")
    assert plan.row("0").action == Action.SKIP and "frozen weight" in plan.row("0").reason
    assert [plan.row(layer).action for layer in ("2", "4")] == [Action.REWRITE, Action.REWRITE]
    _train(model)
    torch.testing.assert_close(model[0](probe), before, rtol=0, atol=0)
    moved = {key: not torch.equal(state.matrix, torch.eye(state.matrix.shape[-1]).expand_as(state.matrix))
             for key, state in decorrelation_states(model).items()}
    assert moved and all(moved.values()), moved  # the trainable layers' R did learn


def test_randomized_vjp_skips_a_frozen_weight_unless_it_sketches_the_input_gradient():
    plan = _transform(_partly_frozen(), effcompile.RandomizedVJP(keep=0.5, multiple=1)).for_pass("randomized_vjp")
    assert plan.row("0").action == Action.SKIP and "no weight gradient" in plan.row("0").reason
    assert plan.row("2").action == Action.REWRITE
    # grad_input of layer 2 still feeds the (frozen) first layer's input gradient: a sketch there is meaningful
    plan = _transform(_partly_frozen(), effcompile.RandomizedVJP(keep=0.5, multiple=1, target="grad_input",
                                                                 estimator="uniform")).for_pass("randomized_vjp")
    assert plan.row("0").action == Action.REWRITE


def test_greedy_stages_names_the_frozen_blocks_when_no_stack_is_left():
    class _Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            if x.dim() == 2:  # fx cannot trace the root: the block-stack path
                for block in self.blocks:
                    x = torch.relu(block(x))
            return self.head(x)

    model = _Stack()
    model.blocks[0].requires_grad_(False)
    with pytest.raises(effcompile.passes.greedy_stages.StageTraceError,
                       match=r"blocks \(3× Linear; 1 without trainable parameters\)"):
        effcompile.transform(model, effcompile.GreedyStages(num_stages=2), example_inputs=(torch.randn(4, 8),))
