"""FSDP2 (``fully_shard``) on CPU over gloo, two real processes: what each pass does with a sharded model.

``transform`` first, then ``fully_shard``, then ``train_step``.  Decorrelation, the randomized VJP
(eager, and compiled composed with decorrelation) and sample selection train a sharded model: the
loss falls, the ranks' full parameters (and R matrices) stay identical, and each technique's effect
shows — R moves, sketched gradients differ draw to draw, each rank backpropagates k rows of its
own batch.  Greedy stages (its stages call submodules outside the root's FSDP forward) refuses in
``train_step`` with ``NotImplementedError`` naming it, and ``transform`` of an already sharded
model refuses for every pass (layers are found on a graph of plain parameters) — never a mixed
Tensor/DTensor error from inside torch.
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


def _full(tensor):
    return tensor.full_tensor().detach() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def _one_pass(name, rank, configs=None, compile=False):
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, *(configs or (SETTINGS[name].config(),)), example_inputs=(_batch(rank, 0)[0],))
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    _shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    try:
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), optimizer, compile=compile,
                                     backend="effcompile_aot_eager")
    except NotImplementedError as error:
        return {"refused": str(error)}
    x, y = _batch(rank, 1)
    draws = []
    for _ in range(2):  # lr 0: two draws of the gradient of one batch
        step(x, y)
        draws.append({n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
    optimizer.param_groups[0]["lr"] = 0.5
    losses = [float(step(x, y)) for _ in range(6)]
    state = {key: _full(value) for key, value in model.state_dict().items()}
    return {"losses": losses, "state": state, "initial": initial, "draws": draws}


def _sharded_first(rank):
    refusals = {}
    for name in SETTINGS:
        model = _mlp()
        _shard(model)
        try:
            effcompile.transform(model, SETTINGS[name].config(), example_inputs=(_batch(rank, 0)[0],))
        except NotImplementedError as error:
            refusals[name] = str(error)
    return refusals


def _rank_results(rank):
    results = {name: _one_pass(name, rank) for name in SETTINGS}
    results["composed_compiled"] = _one_pass(
        "composed", rank, (effcompile.Decorrelation(), effcompile.RandomizedVJP(keep=0.25, multiple=1)), compile=True)
    results["sharded_first"] = _sharded_first(rank)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_rank_results, tmp_path_factory.mktemp("fsdp2"), WORLD)


TRAINED = [name for name in SETTINGS if not PASSES[name].sharded_parameters_unsupported] + ["composed_compiled"]


@pytest.mark.parametrize("name", TRAINED)
def test_pass_trains_a_sharded_model_and_ranks_agree(name, ranks):
    rank0, rank1 = (results[name] for results in ranks)
    assert "refused" not in rank0, rank0
    losses = rank0["losses"]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses  # trains: falls every step
    for key, value in rank0["state"].items():  # parameters and pass state (R, counters) alike
        torch.testing.assert_close(value, rank1["state"][key], rtol=0, atol=0, msg=key)


def test_decorrelation_moves_R_identically_on_every_rank(ranks):
    for name in ("decorrelation", "composed_compiled"):
        state, initial = ranks[0][name]["state"], ranks[0][name]["initial"]
        matrices = [key for key in state if key.endswith("_decorrelation.matrix")]
        assert matrices and all(not torch.equal(state[key], initial[key]) for key in matrices), name


def test_randomized_vjp_gradients_are_sampled_under_fsdp(ranks):
    """Two draws of the reduced (full) gradient of one batch differ: the sketch ran on the
    unsharded weights inside forward, eagerly and compiled."""
    for name in ("randomized_vjp", "composed_compiled"):
        first, second = ranks[0][name]["draws"]
        weights = [key for key in first if key.endswith("weight")]
        assert weights and all(not torch.equal(first[key], second[key]) for key in weights), name


def test_sample_selection_draws_another_subset_each_step(ranks):
    first, second = ranks[0]["sample_selection"]["draws"]
    assert any(not torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("name", [name for name in SETTINGS if PASSES[name].sharded_parameters_unsupported])
def test_other_passes_refuse_sharded_parameters_by_name(name, ranks):
    for results in ranks:
        assert "FSDP2" in results[name]["refused"] and f"{name}:" in results[name]["refused"]


def test_transform_of_an_already_sharded_model_refuses_before_changing_it(ranks):
    for results in ranks:
        assert set(results["sharded_first"]) == set(SETTINGS)
        assert all("transform the plain model, then fully_shard" in message
                   for message in results["sharded_first"].values())
