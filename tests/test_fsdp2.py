"""FSDP2 (``fully_shard``) on CPU over gloo, two real processes: what each pass does with a sharded model.

``transform`` first, then ``fully_shard``, then ``train_step``.  Every pass trains a sharded
model: the loss falls, the ranks' full parameters (and R matrices) stay identical, and each
technique's effect shows — R moves, sketched gradients differ draw to draw, each rank
backpropagates k rows of its own batch, greedy stages keep their stage losses apart.

Greedy stages run as the root's forward (``WrapperForward``: the fx stages call the model's
modules piece by piece) with one backward of the stage losses.  With the same data on both ranks a
sharded run must end exactly where the unsharded model ends — fx stages eager and compiled,
``training_loss`` too, and Hugging Face GPT-2 on the block-stack path with its tied embedding
(its earlier-stage owner is recognised in the unsharded parameter FSDP2 swaps in), eager and
compiled.  ``transform`` of an already sharded model refuses for every
pass (layers are found on a graph of plain parameters) — never a mixed Tensor/DTensor error from
inside torch.
"""

import functools
import importlib.util
import sys
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


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _parity_case(model_name, configs, by="step", compile=False):
    """Three steps on the same data on every rank, sharded (``by``: ``train_step`` or a loop around
    ``training_loss``) and not (``train_step``): both full states."""
    # FSDP2's hooks break the graph at every sharded block, so the blocks' own frames are compiled
    # per model; many models in one process would exhaust Dynamo's recompile limit for them.
    torch.compiler.reset()
    from clients import CLIENTS

    if model_name == "mlp":
        build, loss_fn = _mlp, nn.CrossEntropyLoss()
        batches = [_batch(0, step) for step in range(1, 4)]
        example, shard = (batches[0][0],), _shard
    else:
        client = CLIENTS[model_name]
        build, loss_fn = lambda: (torch.manual_seed(0), _no_dropout(client.build().train()))[1], client.loss
        batches = [client.batch(8, seed) for seed in range(1, 4)]
        example = batches[0][0]

        def shard(model):
            from torch.distributed.fsdp import fully_shard

            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
    states = []
    for sharded in (False, True):
        model = build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            effcompile.transform(model, *configs, example_inputs=example)
        if sharded:
            shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
        options = dict(compile=compile, backend="effcompile_aot_eager")
        try:
            if by == "step" or not sharded:  # the reference: the unsharded model's train_step
                step = effcompile.train_step(model, loss_fn, optimizer, **options)
            else:
                objective = effcompile.training_loss(model, loss_fn, **options)
                step = lambda x, y: (optimizer.zero_grad(), objective(x, y).backward(), optimizer.step())  # noqa: E731
        except NotImplementedError as error:
            return {"refused": str(error)}
        torch.manual_seed(7)
        for x, y in batches:
            step(x, y)
        states.append({key: _full(value) for key, value in model.state_dict().items()})
    return {"unsharded": states[0], "sharded": states[1]}


# "model configs by mode" per case; ``by`` is ``step`` (train_step) or ``loss`` (a loop around
# training_loss).
# GPT-2 runs the block-stack path; its Conv1D weights are read by addmm inside the block (the
# observed path of decorrelation); selection calls the root's forward itself inside the trainer's
# objective (a nested root call).
_PARITY_CASES = """mlp stages step eager | mlp stages step compiled | mlp stages loss eager |
    mlp stages_with_selection loss compiled | mlp selection loss eager | gpt2 stages step eager |
    gpt2 stages loss eager | gpt2 stages step compiled | gpt2 decorrelation step eager |
    gpt2 decorrelation step compiled | gpt2 selection loss eager | gpt2 gradmatch loss compiled"""
PARITY = {"-".join(words): (words[0], words[1], words[2], words[3] == "compiled")
          for words in (case.split() for case in _PARITY_CASES.split("|"))}
PARITY_CONFIGS = {
    "stages": lambda: (effcompile.GreedyStages(num_stages=2),),
    "stages_with_selection": lambda: (effcompile.GreedyStages(num_stages=2),
                                      effcompile.SampleSelection(keep=0.5, strategy="random")),
    "selection": lambda: (effcompile.SampleSelection(keep=0.5, strategy="loss"),),
    "decorrelation": lambda: (effcompile.Decorrelation(input_layers=True),),
    "gradmatch": lambda: (effcompile.SampleSelection(keep=0.5, strategy="gradmatch", nnls_iterations=5),),
}


def _gpt2_sketch_draws(compile):
    """GPT-2 (Conv1D weights: the randomized VJP's eager scope mode, or the compiled rewrite),
    per-block ``fully_shard``: two draws of one batch's reduced gradient at lr 0."""
    from clients import CLIENTS
    from torch.distributed.fsdp import fully_shard

    client = CLIENTS["gpt2"]
    torch.compiler.reset()  # as in _parity_case
    torch.manual_seed(0)
    model = client.build().train()
    inputs, targets = client.batch(8, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25, multiple=1), example_inputs=inputs)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    step = effcompile.train_step(model, client.loss, torch.optim.SGD(model.parameters(), lr=0.0), compile=compile,
                                 backend="effcompile_aot_eager")
    draws = []
    for _ in range(2):
        step(inputs, targets)
        draws.append({name: _full(p.grad) for name, p in model.named_parameters() if p.grad is not None})
    return draws


def _sharded_run(name):
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, SETTINGS[name].config(), example_inputs=(_batch(0, 0)[0],))
    _shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optimizer, effcompile.train_step(model, nn.CrossEntropyLoss(), optimizer)


def _resume(name, rank, directory):
    """Three steps, a checkpoint, three more; then a fresh sharded model loads the checkpoint and
    takes the last three again.  Returns both loss runs and the checkpoint's path."""
    path = f"{directory}/{name}-rank{rank}.pt"
    batches = [_batch(rank, step) for step in range(6)]
    model, optimizer, step = _sharded_run(name)
    losses = [float(step(*batch)) for batch in batches[:3]]
    effcompile.save_checkpoint(path, model, optimizer, extra={"step": 3})
    full_state = {key: _full(value) for key, value in model.state_dict().items()}
    losses += [float(step(*batch)) for batch in batches[3:]]
    model, optimizer, step = _sharded_run(name)
    extra = effcompile.load_checkpoint(path, model, optimizer)
    resumed = [float(step(*batch)) for batch in batches[3:]]
    return {"uninterrupted": losses[3:], "resumed": resumed, "extra": extra, "path": path, "saved_state": full_state}


def _rank_results(rank, directory):
    results = {name: _one_pass(name, rank) for name in SETTINGS}
    results["composed_compiled"] = _one_pass(
        "composed", rank, (effcompile.Decorrelation(input_layers=True), effcompile.RandomizedVJP(keep=0.25, multiple=1)), compile=True)
    results["sharded_first"] = _sharded_first(rank)
    results["resume"] = {name: _resume(name, rank, directory) for name in SETTINGS}
    if "transformers" in sys.modules or importlib.util.find_spec("transformers") is not None:
        cases = PARITY
    else:
        cases = {name: case for name, case in PARITY.items() if case[0] == "mlp"}
    results["parity"] = {name: _parity_case(model, PARITY_CONFIGS[configs](), by, compile)
                         for name, (model, configs, by, compile) in cases.items()}
    if cases is PARITY:
        results["gpt2_sketch"] = {compile: _gpt2_sketch_draws(compile) for compile in (False, True)}
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fsdp2")
    return run_ranks(functools.partial(_rank_results, directory=str(directory)), directory, WORLD)


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


@pytest.mark.parametrize("case", list(PARITY))
def test_sharded_step_owners_end_where_the_unsharded_model_ends(case, ranks):
    """Same data on both ranks: FSDP2's reduce-scatter averages equal gradients, so the sharded run
    must match the unsharded one — every gradient arrived (the root's own parameters, the aux
    heads, a tied embedding read detached by the later stage) and no stage's leaked.  Compiled
    block-stack stages need the cut hooks to run after FSDP2's (without that, the compiled
    backward read a resharded block weight and failed)."""
    if PARITY[case][0] != "mlp":
        pytest.importorskip("transformers")
    for results in ranks:
        outcome = results["parity"][case]
        assert "refused" not in outcome, outcome
        for key, value in outcome["unsharded"].items():
            torch.testing.assert_close(outcome["sharded"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_randomized_vjp_samples_gpt2_conv1d_weights_under_fsdp(compile, ranks):
    """Every weight's reduced gradient differs draw to draw: the sketch ran on the unsharded
    Conv1D weights that FSDP2 swaps in (eager: the scope mode recognises them)."""
    pytest.importorskip("transformers")
    first, second = ranks[0]["gpt2_sketch"][compile]
    weights = [name for name in first if name.endswith("weight") and ".h." in name]
    assert weights and all(not torch.equal(first[name], second[name]) for name in weights)


def test_a_pass_without_sharded_support_is_refused_by_name(monkeypatch):
    """The guard every pass gets until it is tested under FSDP2 (today every pass is)."""
    from effcompile import api

    model = nn.Sequential(nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True), example_inputs=(torch.randn(8, 4),))
    monkeypatch.setattr(api, "_first_sharded", lambda module: "0.weight")
    monkeypatch.setattr(PASSES["decorrelation"], "sharded_parameters_unsupported", "not yet")
    with pytest.raises(NotImplementedError, match=r"FSDP2.*'0.weight'.*decorrelation: not yet"):
        effcompile.train_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1))


def test_transform_of_an_already_sharded_model_refuses_before_changing_it(ranks):
    for results in ranks:
        assert set(results["sharded_first"]) == set(SETTINGS)
        assert all("transform the plain model, then fully_shard" in message
                   for message in results["sharded_first"].values())


@pytest.mark.parametrize("name", list(SETTINGS))
def test_checkpoint_of_a_sharded_model_resumes_exactly(name, ranks):
    """``save_checkpoint`` gathers the shards (model and Adam state), ``load_checkpoint`` cuts them
    again for a fresh sharded model: the resumed run repeats the uninterrupted losses exactly."""
    for results in ranks:
        resume = results["resume"][name]
        assert resume["resumed"] == resume["uninterrupted"] and resume["extra"] == {"step": 3}


def test_checkpoint_of_a_sharded_model_loads_into_the_unsharded_model(ranks):
    """The file holds full tensors: a plain (unsharded, one-process) model transformed the same way
    loads it and holds exactly the sharded model's full state, pass state included."""
    resume = ranks[0]["resume"]["decorrelation"]
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, SETTINGS["decorrelation"].config(), example_inputs=(_batch(0, 0)[0],))
    effcompile.load_checkpoint(resume["path"], model, restore_rng=False)
    state = model.state_dict()
    assert any(key.endswith("_decorrelation.matrix") for key in state)
    for key, value in resume["saved_state"].items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
