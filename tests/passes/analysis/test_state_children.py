"""Pass state attached to an nn.Sequential model (and subclasses) never runs as a layer.

A Sequential's forward calls every child in order; the aux heads of greedy stages and the sample
selector are children of the root.  These tests build the same MLP as ``nn.Sequential``, as a
subclass that inherits its forward and as a subclass with its own forward that iterates ``self``,
and check that each technique trains it, that the model's own output is the plain MLP's, that
``torch.save`` round-trips it, and that ``fold`` restores the original class.
"""

import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile

pytestmark = pytest.mark.usefixtures("single_thread")


class InheritsForward(nn.Sequential):
    pass


class IteratesSelf(nn.Sequential):
    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x


CLASSES = [nn.Sequential, InheritsForward, IteratesSelf]
CONFIGS = {
    "greedy_stages": lambda: effcompile.GreedyStages(num_stages=2),
    "sample_selection": lambda: effcompile.SampleSelection(keep=0.5, strategy="loss"),
}


def _mlp(cls):
    torch.manual_seed(0)
    return cls(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _transformed(cls, technique):
    model = _mlp(cls)
    inputs = torch.randn(8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, CONFIGS[technique](), example_inputs=inputs)
    return model, inputs


@pytest.mark.parametrize("technique", list(CONFIGS))
@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_sequential_runs_its_layers_only_and_trains(cls, technique):
    model, inputs = _transformed(cls, technique)
    assert isinstance(model, cls) and len(model) == 5 and isinstance(model[-1], nn.Linear)
    assert any(name not in dict(_mlp(cls).named_children()) for name, _ in model.named_children())  # state attached
    plain = _mlp(cls)
    with torch.no_grad():  # a check of the output, not training (which goes through train_step)
        torch.testing.assert_close(model(inputs), plain(inputs))

    targets = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.Adam(model.parameters(), lr=3e-2))
    losses = [float(step(inputs, targets)) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("technique", list(CONFIGS))
def test_pickle_round_trip_and_fold_restore_the_class(technique):
    model, inputs = _transformed(InheritsForward, technique)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(model) and len(loaded) == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model(inputs))
    assert loaded.state_dict().keys() == model.state_dict().keys()

    effcompile.fold(model, inplace=True)
    assert type(model) is InheritsForward
    assert dict(model.named_children()).keys() == {"0", "1", "2", "3", "4"}


def test_compiled_selection_step_on_a_sequential_subclass():
    model, inputs = _transformed(IteratesSelf, "sample_selection")
    targets = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.Adam(model.parameters(), lr=3e-2), compile=True,
                                 backend="effcompile_aot_eager")
    losses = [float(step(inputs, targets)) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0], losses
