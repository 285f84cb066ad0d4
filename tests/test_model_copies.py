"""What training scripts do to a model besides training it: ``copy.deepcopy`` it, ``torch.save``
the whole module and load it in another process, keep an EMA copy (``AveragedModel``).  Every
technique's transformed model survives each, and the copy computes what the model computes."""

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import effcompile

TECHNIQUES = {
    "decorrelation": lambda: (effcompile.Decorrelation(input_layers=True, max_overhead=None),),
    "randomized_vjp": lambda: (effcompile.RandomizedVJP(keep=0.5, multiple=1),),
    "sample_selection": lambda: (effcompile.SampleSelection(keep=0.5),),
    "greedy_stages": lambda: (effcompile.GreedyStages(num_stages=2),),
    # the randomized VJP's class generated over decorrelation's generated class
    "composed": lambda: (effcompile.Decorrelation(input_layers=True, max_overhead=None), effcompile.RandomizedVJP(keep=0.5, multiple=1),
                         effcompile.SampleSelection(keep=0.5)),
}


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 3, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator)


def _trained(technique):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, *TECHNIQUES[technique](), example_inputs=(x,))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1))
    for rows in (32, 32, 20):  # a partial batch: the selection's size changes
        step(x[:rows], y[:rows])
        ema.update_parameters(model)
    return model, ema


def _eval_output(model):
    model.eval()
    with torch.no_grad():
        return model(_data()[0])


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_deepcopy_and_ema_copy(technique):
    model, ema = _trained(technique)
    copied = copy.deepcopy(model)
    assert torch.equal(_eval_output(copied), _eval_output(model))
    assert type(copied[0]) is type(model[0])  # the rewritten class, not a fresh one
    averaged = _eval_output(ema)
    assert torch.isfinite(averaged).all() and not torch.equal(averaged, _eval_output(model))
    copied.train()
    step = effcompile.train_step(copied, F.cross_entropy, torch.optim.SGD(copied.parameters(), lr=0.1))
    assert torch.isfinite(step(*_data()))  # the copy trains with the technique


@pytest.mark.parametrize("technique", ["decorrelation", "randomized_vjp", "composed"])
def test_torch_save_of_the_module_loads_in_a_fresh_process(technique, tmp_path):
    """The passes' generated classes have no import path; they pickle by the recipe that made them."""
    model, _ = _trained(technique)
    torch.save(model, tmp_path / "model.pt")
    torch.save(_data()[0], tmp_path / "x.pt")
    expected = _eval_output(model)
    script = textwrap.dedent(f"""
        import torch
        model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)
        model.eval()
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / 'x.pt')!r}))
        torch.save((out, type(model[0]).__name__), {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    out, name = torch.load(tmp_path / "out.pt")
    assert torch.equal(out, expected) and name == type(model[0]).__name__
