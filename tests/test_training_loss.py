"""``effcompile.training_loss``: the technique as a loss, for trainers that own backward and the
optimizer (``transformers.Trainer.compute_loss``, Lightning, a loop with accumulation or clipping).

Each step-owning configuration is trained twice from the same weights and seeds — by
``train_step`` and by a plain loop around ``training_loss`` — and must end at the same
parameters with the same reported losses: the objective's backward is the step's gradient.
Greedy stages sums disjoint stage losses (the step backpropagates them one by one); selection
backpropagates its weighted subset.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.models import get_model

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = {
    "greedy_stages": lambda: (effcompile.GreedyStages(num_stages=3),),
    "selection_forward_reuse": lambda: (effcompile.SampleSelection(keep=0.25, strategy="loss"),),
    "selection_gradmatch": lambda: (effcompile.SampleSelection(keep=0.25, strategy="gradmatch", nnls_iterations=10),),
    "stages_with_selection": lambda: (effcompile.GreedyStages(num_stages=2),
                                      effcompile.SampleSelection(keep=0.5, strategy="random")),
    "decorrelation": lambda: (effcompile.Decorrelation(input_layers=True),),
}


def _model(configs, name="mlp", **kwargs):
    torch.manual_seed(0)
    model = get_model(name, **kwargs)
    x = torch.randn(16, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, *configs, example_inputs=(x,))
    return model


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator))
            for _ in range(3)]


def _by_train_step(model, compiled=False):
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                                 compile=compiled, backend="effcompile_aot_eager")
    torch.manual_seed(5)
    return [float(step(x, y)) for x, y in _batches()]


def _by_training_loss(model, compiled=False):
    objective = effcompile.training_loss(model, nn.CrossEntropyLoss(), compile=compiled, backend="effcompile_aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(5)
    reported = []
    for x, y in _batches():  # the trainer's own loop
        optimizer.zero_grad()
        objective(x, y).backward()
        optimizer.step()
        reported.append(float(objective.reported_loss))
    return reported


@pytest.mark.parametrize("name", list(CONFIGS))
def test_objective_backward_is_the_steps_gradient(name):
    model = _model(CONFIGS[name]())
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "training forward outside train_step" warning either
        stepped, looped = _by_train_step(model), _by_training_loss(twin)
    assert stepped == pytest.approx(looped, rel=1e-6)
    for (key, value), other in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=key)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), _model(CONFIGS[name]()).parameters()))


def test_compiled_objective_matches_the_compiled_step():
    model = _model(CONFIGS["stages_with_selection"](), "cnn", widths=(8, 16))
    twin = copy.deepcopy(model)
    assert _by_train_step(model, True) == pytest.approx(_by_training_loss(twin, True), rel=1e-5)
    for value, other in zip(model.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5)


def test_objective_exposes_the_passes_records():
    model = _model(CONFIGS["stages_with_selection"]())
    objective = effcompile.training_loss(model, F.cross_entropy)
    x, y = _batches()[0]
    loss = objective(x, y)
    assert len(objective.stage_losses) == 2 and objective.reported_loss is objective.stage_losses[-1]
    # the backpropagated loss is the sum of the stages' weighted subset losses
    torch.testing.assert_close(loss.detach(), torch.stack(objective.stage_subset_losses).sum())
    selection = _model(CONFIGS["selection_forward_reuse"]())
    objective = effcompile.training_loss(selection, F.cross_entropy)
    objective(x, y)
    index, weights = objective.last_selection
    assert index.shape == (4,) and torch.allclose(weights, torch.full((4,), 0.25))


def test_plain_passes_give_the_plain_loss():
    model = _model(CONFIGS["decorrelation"]())
    objective = effcompile.training_loss(model, F.cross_entropy)
    x, y = _batches()[0]
    model.eval()  # no R update: the same forward twice
    torch.testing.assert_close(objective(x, y), F.cross_entropy(model(x), y))


def test_gradient_accumulation_over_micro_batches_gives_the_full_batch_gradient():
    """What a trainer with ``gradient_accumulation_steps=2`` does with the objective: half-weighted
    backwards of two micro-batches leave the greedy stages' full-batch gradient (mean losses, no
    batch-coupled layer), per stage."""
    model = _model(CONFIGS["greedy_stages"]())
    objective = effcompile.training_loss(model, F.cross_entropy)
    x, y = _batches()[0]
    objective(x, y).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for part in (slice(0, 8), slice(8, 16)):
        (objective(x[part], y[part]) / 2).backward()
    for accumulated, expected in zip((p.grad for p in model.parameters()), full):
        torch.testing.assert_close(accumulated, expected, rtol=1e-5, atol=1e-6)
