"""FSDP2 (``fully_shard``) on CPU over gloo, two real processes: what each pass does with a sharded model.

Sample selection trains a sharded model: each rank selects k rows of its own batch, FSDP reduces
the selected rows' gradients, the loss falls and the ranks' full parameters stay identical.  The
passes not made to work with DTensor parameters refuse with ``NotImplementedError`` naming the pass
(in ``train_step`` after sharding, in ``transform`` on an already sharded model) instead of
failing inside torch with a mixed Tensor/DTensor error.
"""

import warnings

import pytest
import torch
import torch.nn as nn

import effcompile
from effcompile.passes import PASSES
from gloo_ranks import run_ranks
from settings import SETTINGS

WORLD = 2


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)


def _batch(rank, step):
    generator = torch.Generator().manual_seed(100 * rank + step)  # each rank its own data
    return torch.randn(16, 16, generator=generator), torch.randint(0, 4, (16,), generator=generator)


def _one_pass(name, rank):
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, SETTINGS[name].config(), example_inputs=(_batch(rank, 0)[0],))
    _shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    try:
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), optimizer)
    except NotImplementedError as error:
        return {"refused": str(error)}
    x, y = _batch(rank, 1)
    losses = [float(step(x, y)) for _ in range(6)]
    full = {key: value.full_tensor().detach() for key, value in model.state_dict().items() if hasattr(value, "full_tensor")}
    return {"losses": losses, "parameters": full}


def _sharded_first(rank):
    model = _mlp()
    _shard(model)
    try:
        effcompile.transform(model, effcompile.Decorrelation(), example_inputs=(_batch(rank, 0)[0],))
    except NotImplementedError as error:
        return str(error)
    return ""


def _rank_results(rank):
    results = {name: _one_pass(name, rank) for name in SETTINGS}
    results["sharded_first"] = _sharded_first(rank)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_rank_results, tmp_path_factory.mktemp("fsdp2"), WORLD)


def test_sample_selection_trains_a_sharded_model_and_ranks_agree(ranks):
    rank0, rank1 = (results["sample_selection"] for results in ranks)
    assert "refused" not in rank0, rank0
    losses = rank0["losses"]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses  # trains: falls every step
    assert rank0["parameters"]
    for key, value in rank0["parameters"].items():
        torch.testing.assert_close(value, rank1["parameters"][key], rtol=0, atol=0)


@pytest.mark.parametrize("name", [name for name in SETTINGS if PASSES[name].sharded_parameters_unsupported])
def test_other_passes_refuse_sharded_parameters_by_name(name, ranks):
    for results in ranks:
        assert "FSDP2" in results[name]["refused"] and f"{name}:" in results[name]["refused"]


def test_transform_of_an_already_sharded_model_refuses_before_changing_it(ranks):
    assert all("decorrelation:" in results["sharded_first"] for results in ranks)
