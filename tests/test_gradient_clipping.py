"""``train_step(max_grad_norm=...)``: gradient clipping inside every step owner.  The plain step
equals a loop written by hand with ``clip_grad_norm_``; sample selection clips what it
backpropagated; greedy stages clip each stage (body and aux head) on its own."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile

MAX_NORM = 0.05


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)


def _norm(parameters) -> float:
    return math.sqrt(sum(float(p.grad.square().sum()) for p in parameters if p.grad is not None))


def test_the_plain_step_is_the_hand_written_clipped_step():
    model, reference = _mlp(), _mlp()
    x, y = _batch()
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                                 max_grad_norm=MAX_NORM)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        step(x, y)
        optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        optimizer.step()
        assert float(step.grad_norm) == pytest.approx(float(norm), rel=1e-6) and float(norm) > MAX_NORM
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)


def test_sample_selection_clips_the_gradient_it_backpropagated():
    model = _mlp()
    effcompile.transform(model, effcompile.SampleSelection(keep=0.5), example_inputs=(_batch()[0],))
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.0),
                                 max_grad_norm=MAX_NORM)
    step(*_batch())
    assert float(step.grad_norm) > MAX_NORM  # it had to clip...
    assert _norm(model.parameters()) == pytest.approx(MAX_NORM, rel=1e-4)  # ...and did


def test_greedy_stages_clip_each_stage_on_its_own():
    model = _mlp()
    effcompile.transform(model, effcompile.GreedyStages(num_stages=2), example_inputs=(_batch()[0],))
    staged = effcompile.passes.greedy_stages.staged_model(model)
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.0),
                                 max_grad_norm=MAX_NORM)
    step(*_batch())
    assert len(step.stage_grad_norms) == 2 and all(float(norm) > MAX_NORM for norm in step.stage_grad_norms)
    for k in range(2):
        assert _norm(staged.stage_parameters(k)) == pytest.approx(MAX_NORM, rel=1e-4)
    # one global clip would have left the whole model at MAX_NORM, not each stage
    assert _norm(model.parameters()) == pytest.approx(math.sqrt(2) * MAX_NORM, rel=1e-4)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "1"])
def test_an_invalid_max_grad_norm_is_refused(bad):
    model = _mlp()
    with pytest.raises(ValueError, match="max_grad_norm must be a positive finite number"):
        effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=bad)


# ------------------------------------------------------------------------------ float16 loss scaling
def _fp16_step(model, **kwargs):
    return effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                                 grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), **kwargs)


def test_the_plain_step_with_a_grad_scaler_is_the_hand_written_scaled_loop():
    model, reference = _mlp(), _mlp()
    x, y = _batch()
    step = _fp16_step(model, max_grad_norm=MAX_NORM)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            step(x, y)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(reference(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        scaler.step(optimizer)
        scaler.update()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("config", [effcompile.SampleSelection(keep=0.5), effcompile.GreedyStages(num_stages=2)],
                         ids=["sample_selection", "greedy_stages"])
def test_step_owners_scale_every_backward_and_skip_an_overflowing_step(config):
    """The step owners backpropagate the scaled loss (the unscaled gradient is what clipping sees:
    exactly ``MAX_NORM``), and a step whose scaled gradient overflows is skipped with the scale halved."""
    model = _mlp()
    x, y = _batch()
    effcompile.transform(model, config, example_inputs=(x,))
    step = _fp16_step(model, max_grad_norm=MAX_NORM)
    with torch.autocast("cpu", dtype=torch.float16):
        step(x, y)
    groups = ([effcompile.passes.greedy_stages.staged_model(model).stage_parameters(k) for k in range(2)]
              if isinstance(config, effcompile.GreedyStages) else [list(model.parameters())])
    for group in groups:  # unscaled before clipping: a scaled gradient would have been clipped from 1024x
        assert _norm(group) == pytest.approx(MAX_NORM, rel=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    overflowing = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                                        grad_scaler=scaler)
    with torch.autocast("cpu", dtype=torch.float16):
        overflowing(x * float("inf"), y)  # non-finite gradients: the step is skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0 ** 9


def test_a_grad_scaler_must_be_a_grad_scaler():
    model = _mlp()
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), grad_scaler=2.0)
