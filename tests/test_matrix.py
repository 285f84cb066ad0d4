"""Every technique, alone and composed, over zoo × ladder × precision × batch schedule: its *effect*.

Driven by ``tests/settings.py``.  A case trains three steps through ``effcompile.train_step`` with
SGD at lr 0 (weights stay put, so two steps on one batch are two draws of the same gradient) and
asserts what the technique must do — R moves, sketched gradients differ draw to draw and every
compiled graph is rewritten, aux heads are trained by local losses, selection backpropagates k rows
— under fp32 and bf16 autocast, with a fixed batch and after a batch-size change (a partial last
batch), and with the model cast to bf16 after ``transform`` (``model.to(torch.bfloat16)``, as
fine-tuning loops do; the pass state keeps its own dtypes).  The Inductor rung runs the composed MLP (marked slow, still run in CI).
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn as nn

import effcompile
from effcompile.models import example_inputs, get_model

from settings import COMPOSED, SETTINGS, Run

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULES = {"fixed": (16, 16, 16), "changing": (16, 12, 12)}
# name → (autocast dtype, dtype the model and its inputs are cast to after transform)
PRECISIONS = {"fp32": (None, None), "bf16": (torch.bfloat16, None), "bf16-weights": (None, torch.bfloat16)}
TECHNIQUES = [*SETTINGS, "composed"]


def _cases(rungs):
    for technique in TECHNIQUES:
        models = SETTINGS[technique].models if technique in SETTINGS else ("mlp", "cnn")
        for model in models:
            for rung in rungs:
                for precision in PRECISIONS:
                    for schedule in SCHEDULES:
                        if precision == "bf16-weights" and schedule == "fixed":
                            continue  # the changing schedule covers it (CI time)
                        yield pytest.param(technique, model, rung, precision, schedule,
                                           id=f"{technique}-{model}-{rung}-{precision}-{schedule}")


def _configs(technique):
    names = COMPOSED if technique == "composed" else (technique,)
    return [SETTINGS[name].config() for name in names], names


def _batch(rows, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 1, 8, 8, generator=generator), torch.randint(0, 10, (rows,), generator=generator)


def _run(technique, model_name, rung, precision, schedule, joint_log):
    torch.manual_seed(0)
    model = get_model(model_name, num_classes=10, in_channels=1, image_size=8)
    configs, names = _configs(technique)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skips are Plan rows, checked below
        effcompile.transform(model, *configs, example_inputs=example_inputs(model_name, batch_size=16))
    autocast_dtype, weights_dtype = PRECISIONS[precision]
    if weights_dtype is not None:
        model.to(weights_dtype)
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    compiled = rung != "eager"
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), optimizer, compile=compiled, backend=rung)
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    sizes = SCHEDULES[schedule]
    gradients = []
    for index, rows in enumerate(sizes):
        batch = _batch(rows, seed=1 if index else 0)  # the last two steps see one batch: two draws
        if weights_dtype is not None:
            batch = (batch[0].to(weights_dtype), batch[1])
        with autocast:
            loss = step(*batch)
        assert torch.isfinite(loss).all()
        gradients.append({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})
    return Run(model, gradients[-2:], list(joint_log.graphs), list(sizes), compiled, initial), names


def _check(run, names, model_name):
    plan = effcompile.report(run.model)
    for name in names:
        SETTINGS[name].effect(run)
        expected = SETTINGS[name].expected_skips.get(model_name, {})
        for row in plan.for_pass(name).skipped():
            assert row.reason, row
            assert any(pattern in row.layer for pattern in expected), f"unexpected skip {row.layer}: {row.reason}"


@pytest.mark.parametrize("technique, model_name, rung, precision, schedule",
                         list(_cases(("eager", "effcompile_aot_eager"))))
def test_technique_effect(technique, model_name, rung, precision, schedule, joint_log):
    run, names = _run(technique, model_name, rung, precision, schedule, joint_log)
    _check(run, names, model_name)


@pytest.mark.slow
@pytest.mark.parametrize("technique, model_name, rung, precision, schedule",  # the composed model only:
                         [case for case in _cases(("effcompile",))        # each technique alone has its own
                          if case.values[:2] == ("composed", "mlp")])      # Inductor tests (CI time)
def test_technique_effect_through_inductor(technique, model_name, rung, precision, schedule, joint_log):
    run, names = _run(technique, model_name, rung, precision, schedule, joint_log)
    _check(run, names, model_name)
