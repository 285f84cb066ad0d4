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


class _CountsEveryK(nn.Module):
    """A module with the schedule protocol: its work (counting a call) is due every ``k`` calls."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.calls, self.due = k, 0, None
        self.register_buffer("done", torch.zeros((), dtype=torch.int64))

    def schedule(self):
        return self.k, self.calls

    def begin_scheduled_call(self):
        self.calls, self.due = self.calls + 1, self.calls % self.k == 0

    def end_scheduled_call(self):
        self.due = None

    def forward(self, x):
        if self.due:
            self.done.add_(1)
        return x


def test_scheduled_steps_compile_one_graph_per_pattern_of_due_modules():
    from effcompile.compiling import scheduled

    model = nn.Sequential(nn.Linear(6, 3), _CountsEveryK(2), _CountsEveryK(4))
    backend = _CountingBackend()
    step = scheduled(model, torch.compile(lambda x: model(x).sum(), backend=backend))
    for _ in range(12):
        step(torch.randn(5, 6))
    assert [int(model[1].done), int(model[2].done)] == [6, 3]
    assert backend.graphs == 3  # both due, the 2-step one alone, neither
    assert model[1].due is None  # outside the step the modules are told nothing


def test_too_many_schedule_patterns_leave_the_step_as_it_is():
    from effcompile.compiling import MAX_SCHEDULE_PATTERNS, scheduled

    model = nn.Sequential(*[_CountsEveryK(k) for k in (2, 3, 5)])  # 2·2·2 patterns over 30 calls
    assert 2 ** 3 > MAX_SCHEDULE_PATTERNS

    def step(x):
        return model(x)

    assert scheduled(model, step) is step
    assert scheduled(nn.Sequential(_CountsEveryK(1)), step) is step  # due every call: nothing to schedule
