"""Tests of effcompile/api.py's step guard: a technique that lives in ``train_step`` warns when the
model is trained in the user's own loop instead (it would silently train as plain backprop)."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile

pytestmark = pytest.mark.usefixtures("single_thread")

STEP_OWNERS = {
    "greedy_stages": lambda: effcompile.GreedyStages(num_stages=2),
    "sample_selection": lambda: effcompile.SampleSelection(keep=0.5, strategy="loss"),
}


def _model(config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, config, example_inputs=x)
    return model, x, y


def _outside_step_warnings(record):
    return [w for w in record if "outside it" in str(w.message)]


@pytest.mark.parametrize("technique", list(STEP_OWNERS))
def test_a_training_forward_outside_train_step_warns_once(technique):
    model, x, y = _model(STEP_OWNERS[technique]())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(x)  # no backward can follow: nothing to warn about
        model.eval()
        model(x)  # evaluation
        model.train()
        assert not _outside_step_warnings(record)
        F.cross_entropy(model(x), y).backward()
        F.cross_entropy(model(x), y).backward()
    warned = _outside_step_warnings(record)
    assert len(warned) == 1 and technique in str(warned[0].message) and "train_step" in str(warned[0].message)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("technique", list(STEP_OWNERS))
def test_train_step_and_fold_do_not_warn(technique, compiled):
    model, x, y = _model(STEP_OWNERS[technique]())
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), compile=compiled,
                                 backend="effcompile_aot_eager")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            step(x, y)
        effcompile.fold(model, inplace=True)
        F.cross_entropy(model(x), y).backward()  # a plain model again: plain training is what it does
    assert not _outside_step_warnings(record)


def test_passes_that_live_in_the_forward_do_not_warn():
    model, x, y = _model(effcompile.Decorrelation(input_layers=True, lr=0.01))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        F.cross_entropy(model(x), y).backward()
    assert not _outside_step_warnings(record)


def test_training_batch_turns_the_kv_cache_off_only_where_the_forward_takes_it():
    from effcompile.inputs import training_batch

    class Decoder(nn.Module):
        def forward(self, input_ids, use_cache=None):
            return input_ids

    batch = {"input_ids": torch.zeros(2, 3)}
    assert training_batch(Decoder())(batch) == {**batch, "use_cache": False}
    assert training_batch(Decoder())({**batch, "use_cache": True})["use_cache"] is True  # the user's choice stands
    x = torch.zeros(2, 3)
    assert training_batch(Decoder())(x) is x  # positional batches are passed as they are
    assert training_batch(nn.Linear(3, 3))(batch) is batch
