"""Tests of effcompile.compiling: every model's compiled training step has a Dynamo cache of its own."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile

pytestmark = pytest.mark.usefixtures("single_thread")


class _CountingBackend:
    """A Dynamo backend that runs the captured graph as is and counts the graphs it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def _model(index: int) -> nn.Module:
    # A class of its own per model: Dynamo's guard on the model's type fails for every new one,
    # as it does for users who train several architectures (or transformed copies) in one process.
    cls = type(f"Net{index}", (nn.Sequential,), {})
    return cls(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)


@pytest.mark.parametrize("config", [None, effcompile.SampleSelection(keep=0.5, strategy="loss")],
                         ids=["plain", "sample_selection"])
def test_every_model_compiles_past_dynamos_recompile_limit(config):
    """Dynamo allows 8 graphs per code object; a step built by train_step must still compile for a
    model past the 8th (it fell back to eager when all steps shared one code object)."""
    limit = torch._dynamo.config.recompile_limit
    inputs, targets = _batch()
    for index in range(limit + 2):
        torch.manual_seed(index)
        model = _model(index)
        if config is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                effcompile.transform(model, config, example_inputs=inputs)
        backend = _CountingBackend()
        step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                                     compile=True, backend=backend)
        step(inputs, targets)
        assert backend.graphs >= 1, f"model {index} ran eager"


def test_a_second_step_for_the_same_model_reuses_the_compiled_graph():
    inputs, targets = _batch()
    model = _model(0)
    backend = _CountingBackend()
    for _ in range(2):
        step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                                     compile=True, backend=backend)
        step(inputs, targets)
    assert backend.graphs == 1
