"""Activation checkpointing (``torch.utils.checkpoint``, reentrant or not; Hugging Face's
``gradient_checkpointing_enable``) changes what is stored, not what is computed: every technique
trains a checkpointed model exactly as the same model without it.

Two things had to hold: the capture sees the layers inside a reentrant region (its first forward
runs under ``no_grad``, which ``torch.export`` wraps in an opaque submodule), and a recomputation
in the backward does not repeat the forward's side effects (decorrelation updated R a second time
and the gradient was then computed with a different R than the forward used)."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import effcompile
from effcompile.passes.decorrelation import decorrelation_states

TECHNIQUES = {
    "decorrelation": lambda: (effcompile.Decorrelation(input_layers=True, max_overhead=None, lr=0.05),),
    "randomized_vjp": lambda: (effcompile.RandomizedVJP(keep=0.5, multiple=1, estimator="uniform"),),
    "sample_selection": lambda: (effcompile.SampleSelection(keep=0.5),),
    "greedy_stages": lambda: (effcompile.GreedyStages(num_stages=2),),
}
MODES = {"none": None, "non-reentrant": False, "reentrant": True}


class _Checkpointed(nn.Module):
    """Blocks run through ``torch.utils.checkpoint`` in the forward, as users write it (after an
    input layer: a reentrant region whose inputs need no gradient gives its weights none)."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.embed = nn.Linear(16, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)) for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + (block(x) if self.reentrant is None else checkpoint(block, x, use_reentrant=self.reentrant))
        return self.head(x)


def _train(build, batch, loss_fn, technique):
    torch.manual_seed(0)
    model = build()
    model.train()
    inputs, targets = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, *TECHNIQUES[technique](), example_inputs=inputs)
    step = effcompile.train_step(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.05))
    torch.manual_seed(1)
    for _ in range(3):
        step(inputs, targets)
    plan = [(row.layer, row.pass_name, row.action) for row in effcompile.report(model)]
    return model, plan


def _assert_same_training(build_for, batch, loss_fn, technique):
    reference, reference_plan = _train(build_for(None), batch, loss_fn, technique)
    for reentrant in (False, True):
        model, plan = _train(build_for(reentrant), batch, loss_fn, technique)
        assert plan == reference_plan, reentrant  # the capture saw every layer
        for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=f"reentrant={reentrant} {name}")
    if technique == "decorrelation":  # one R update per step, not one more per recomputation
        assert {int(state.updates) for state in decorrelation_states(model).values()} == {3}


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_a_checkpointed_custom_model_trains_as_the_plain_one(technique):
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(3))
    _assert_same_training(lambda reentrant: (lambda: _Checkpointed(reentrant)), ((x,), y), F.cross_entropy, technique)


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_hugging_face_gradient_checkpointing_trains_as_without_it(technique):
    pytest.importorskip("transformers")
    from clients import CLIENTS

    client = CLIENTS["llama"]

    def build_for(reentrant):
        def build():
            model = client.build()
            if reentrant is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # use_cache=True is switched off, said on stdout
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            return model
        return build

    _assert_same_training(build_for, client.batch(8, 1), client.loss, technique)
