"""Every technique on the real-client zoo (``tests/clients.py``): Hugging Face models with dict
batches, torchvision and timm models with image tensors.

Per model × technique: ``transform`` with the dict batch, every weight layer handled (a skip only
where ``clients.py`` says why), the technique's effect from ``tests/settings.py`` (R moves,
sketched gradients differ draw to draw, selection backpropagates k sequences), and learning: the training loss of a fixed batch
falls through ``train_step``.  The randomized VJP trains compiled (``effcompile_aot_eager``).
"""

import math
import warnings

import pytest
import torch

import effcompile
from effcompile.passes.decorrelation import decorrelation_states

from clients import CLIENTS
from settings import SETTINGS, Run

pytestmark = pytest.mark.usefixtures("single_thread")

TECHNIQUES = ("decorrelation", "randomized_vjp", "sample_selection")
ROWS = 8


def _cases():
    for technique in TECHNIQUES:
        for name in CLIENTS:
            yield pytest.param(technique, name, id=f"{technique}-{name}")


def _client(name):
    client = CLIENTS[name]
    pytest.importorskip(client.library, reason=f"{name} needs {client.library} (see tests/clients.py)")
    return client


def _transformed(technique, name):
    torch.manual_seed(0)
    client = _client(name)
    model = client.build()
    model.train()
    inputs, _ = client.batch(ROWS, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skips are Plan rows, checked below
        effcompile.transform(model, SETTINGS[technique].config(), example_inputs=inputs)
    return client, model


@pytest.mark.parametrize("technique, name", list(_cases()))
def test_technique_handles_every_layer_and_learns(technique, name, joint_log):
    client, model = _transformed(technique, name)
    plan = effcompile.report(model)
    for row in plan.for_pass(technique):
        if not row.applied:
            assert any(pattern in row.layer for pattern in client.expected_skips), f"unexpected skip {row.layer}: {row.reason}"
    assert len(plan.for_pass(technique).applied()) >= 8  # every projection and MLP layer of two blocks

    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    compiled = technique == "randomized_vjp"
    step = effcompile.train_step(model, client.loss, optimizer, compile=compiled, backend="effcompile_aot_eager")
    inputs, targets = client.batch(ROWS, 1)
    gradients = []
    for _ in range(2):  # lr 0: two draws of the gradient of one batch
        step(inputs, targets)
        gradients.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    SETTINGS[technique].effect(Run(model, gradients, list(joint_log.graphs), [ROWS, ROWS], compiled, initial))

    for group in optimizer.param_groups:
        group["lr"] = client.lr
    losses = [float(step(inputs, targets)) for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses  # dropout stays on: compare a mean


@pytest.mark.parametrize("name", list(CLIENTS))
def test_randomized_vjp_samples_every_layer_in_eager_training(name, joint_log):
    """No compilation: every planned layer's weight gradient differs draw to draw on one batch —
    ``nn.Linear``/conv owners through their own forward, GPT-2's ``Conv1D`` (addmm), attention's
    packed projections and Swin's ``F.linear`` through the mode around the forward that uses them
    (the Plan's ``eager_scope``).  One SGD step first, so zero-initialised heads and residual norms
    (torchvision's ViT head, LeViT's branch norms) pass gradient to every layer.  Uniform sampling:
    importance sampling keeps, with certainty, the few rows that carry a gradient living on a few
    tokens (the last ViT block below a class-token head) and is then legitimately exact."""
    torch.manual_seed(0)
    client = _client(name)
    model = client.build()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.RandomizedVJP(keep=0.5, multiple=1, estimator="uniform"),
                             example_inputs=client.batch(ROWS, 0)[0])
    rows = effcompile.report(model).for_pass("randomized_vjp").applied()
    assert all(row.details["eager"] == "yes" for row in rows)
    optimizer = torch.optim.SGD(model.parameters(), lr=client.lr)
    step = effcompile.train_step(model, client.loss, optimizer)
    inputs, targets = client.batch(ROWS, 1)
    step(inputs, targets)
    optimizer.param_groups[0]["lr"] = 0.0
    draws = []
    for _ in range(3):
        step(inputs, targets)
        draws.append([model.get_submodule(row.spec.owner_path)._parameters[row.spec.attr].grad.clone() for row in rows])
    assert not joint_log.graphs
    # A layer whose gradient is zero on this batch (LeViT's one-token downsampling query) is left out.
    live = [(row.layer, grads) for row, *grads in zip(rows, *draws) if grads[0].abs().max() > 0]
    exact = [layer for layer, grads in live if all(torch.equal(grads[0], g) for g in grads[1:])]
    assert len(live) >= 8 and not exact, exact


CONFIGS = {
    "decorrelation": lambda: (effcompile.Decorrelation(input_layers=True),),
    "randomized_vjp": lambda: (effcompile.RandomizedVJP(keep=0.5, multiple=1),),
    "gradmatch": lambda: (effcompile.SampleSelection(keep=0.5, strategy="gradmatch"),),
    "decorrelation+randomized_vjp": lambda: (effcompile.Decorrelation(input_layers=True), effcompile.RandomizedVJP(keep=0.5, multiple=1)),
    "greedy_stages": lambda: (effcompile.GreedyStages(num_stages=2),),
}


@pytest.mark.parametrize("technique", list(CONFIGS))
@pytest.mark.parametrize("name", list(CLIENTS))
def test_bf16_autocast_and_a_partial_last_batch(name, technique):
    """What a user's loop meets: bf16 autocast and a last batch smaller than the one the model was
    transformed with, eagerly.  Both steps give finite losses, every trained weight moves, and the
    gradients come back in the parameters' dtype (fp32)."""
    client = _client(name)
    if technique == "gradmatch" and client.no_gradmatch:
        pytest.skip(f"{name}: {client.no_gradmatch}")
    torch.manual_seed(0)
    model = client.build()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, *CONFIGS[technique](), example_inputs=client.batch(ROWS, 0)[0])
    step = effcompile.train_step(model, client.loss, torch.optim.SGD(model.parameters(), lr=1e-3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for rows in (ROWS, ROWS - 3):
        inputs, targets = client.batch(rows, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(float(step(inputs, targets)))
    assert all(map(math.isfinite, losses)), losses
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) >= len(grads) // 2, (len(moved), len(grads))


@pytest.mark.parametrize("name", list(CLIENTS))
def test_greedy_stages_cut_the_model_and_every_stage_learns(name):
    """GreedyStages(2): on a model whose root forward torch.fx cannot trace the Plan shows the
    block-stack hook path (aux head over the model's output shape, the user's loss unchanged), on
    the others the fx stage cut; both stage losses fall through train_step."""
    torch.manual_seed(0)
    client = _client(name)
    model = client.build()
    model.train()
    effcompile.transform(model, effcompile.GreedyStages(num_stages=2), example_inputs=client.batch(ROWS, 0)[0])
    stages = [row for row in effcompile.report(model).for_pass("greedy_stages") if "cut_kind" in row.details]
    kinds = [row.details["cut_kind"] for row in stages]
    if client.cut_kind == "fx":
        assert stages and "block-stack hooks" not in kinds, kinds
    else:
        assert kinds == [client.cut_kind] * 2, kinds
    optimizer = torch.optim.Adam(model.parameters(), lr=client.lr)
    step = effcompile.train_step(model, client.loss, optimizer)
    inputs, targets = client.batch(ROWS, 1)
    history = []
    for _ in range(10):
        step(inputs, targets)
        history.append([float(loss) for loss in step.stage_losses])
    assert all(torch.isfinite(torch.tensor(history)).flatten())
    for k in range(2):
        assert sum(h[k] for h in history[-3:]) / 3 < 0.9 * history[0][k], (k, [h[k] for h in history])


@pytest.mark.parametrize("name", list(CLIENTS))
def test_gradmatch_selects_by_the_users_loss_and_learns(name):
    """Gradient matching with the client's own loss over its own output (a ``ModelOutput``'s logits
    per token for the language models, per image for the classifiers): the proxy error is that
    loss's gradient at the head output (``output_errors``), the matched rows are distinct, their
    weights non-negative, and training on them lowers the batch's loss.  (The kernel against
    autograd's per-sample head gradients: tests/passes/sample_selection/test_selectors.py.)"""
    torch.manual_seed(0)
    client = _client(name)
    model = client.build()
    model.train()
    config = effcompile.SampleSelection(keep=0.5, strategy="gradmatch")
    example = client.batch(ROWS, 0)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if client.no_gradmatch:
            with pytest.raises(ValueError, match=client.no_gradmatch):
                effcompile.transform(model, config, example_inputs=example)
            return
        effcompile.transform(model, config, example_inputs=example)
    step = effcompile.train_step(model, client.loss, torch.optim.Adam(model.parameters(), lr=client.lr))
    inputs, targets = client.batch(ROWS, 1)
    losses = [float(step(inputs, targets)) for _ in range(10)]
    index, weights = step.last_selection
    assert index.shape == (ROWS // 2,) and index.unique().numel() == ROWS // 2
    assert (weights >= 0).all() and float(weights.sum()) > 0
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses


def _without_stochastic_layers(model):
    """Dropout and stochastic depth off (eager and compiled steps draw their masks differently)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) or type(module).__name__ == "StochasticDepth":
            module.p = 0.0
        if isinstance(getattr(module, "drop_prob", None), float):  # Hugging Face and timm drop path
            module.drop_prob = 0.0
        if isinstance(getattr(module, "dropout", None), float):  # functional dropout (T5's attention weights)
            module.dropout = 0.0
    return model


@pytest.mark.parametrize("name", [name for name, client in CLIENTS.items() if client.cut_kind == "block-stack hooks"])
def test_compiled_block_stack_stages_are_one_graph_equal_to_eager(name):
    """Greedy stages on the block-stack hook path, compiled: the model's forward with its cuts,
    the aux heads and every stage loss in one graph, and the parameters after two steps equal the
    eager step's — also for GPT-2, whose tied embedding the later stage reads detached.  The eager
    arm trains a deep copy, so the copy keeps the tied parameter's owner."""
    import copy

    from effcompile._compat import unique_graph_count

    torch.manual_seed(0)
    client = _client(name)
    model = _without_stochastic_layers(client.build())
    model.train()
    effcompile.transform(model, effcompile.GreedyStages(num_stages=2), example_inputs=client.batch(ROWS, 0)[0])
    inputs, targets = client.batch(ROWS, 1)
    trained = {}
    for compiled, arm in ((False, copy.deepcopy(model)), (True, model)):
        step = effcompile.train_step(arm, client.loss, torch.optim.SGD(arm.parameters(), lr=client.lr), compile=compiled,
                                     backend="effcompile_aot_eager")
        graphs = unique_graph_count()
        for _ in range(2):
            step(inputs, targets)
        if compiled:
            assert unique_graph_count() - graphs == 1
        trained[compiled] = {n: p.detach() for n, p in arm.named_parameters()}
    for name_, value in trained[False].items():
        torch.testing.assert_close(trained[True][name_], value, rtol=1e-5, atol=1e-6, msg=name_)


def _stage_gradients_of_recorded_selections(model, client, inputs, targets, selections):
    """Reference for stages + selection on the hook path, written plainly: the model's forward with
    its cuts, each stage's per-sample losses of the client's loss, and each stage's weighted loss
    of the rows it selected, summed and backpropagated."""
    from effcompile.passes.greedy_stages import staged_model
    from effcompile.passes.greedy_stages.block_stack import replace_first_tensor
    from effcompile.passes.sample_selection.selectors import per_sample_loss_fn

    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a training forward outside train_step, on purpose
        output, aux = staged_model(model).run(inputs)
    per_sample = per_sample_loss_fn(client.loss)
    outputs = [replace_first_tensor(output, a) for a in aux] + [output]
    total = sum((per_sample(out, targets)[index] * weights).sum() for out, (index, weights) in zip(outputs, selections))
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_stages_select_their_own_rows_on_the_block_stack_path(name, compiled, joint_log):
    """GreedyStages(2) + SampleSelection on a model torch.fx cannot trace (the block-stack hook path):
    each stage selects k of B rows by its own per-sample loss and backpropagates only their weighted
    loss — the gradients equal that reference, and differ from backpropagating the whole batch.
    Compiled, the stages' backward runs on the selected rows (the row-sparse joint pass)."""
    torch.manual_seed(0)
    client = _client(name)
    model = _without_stochastic_layers(client.build())
    model.train()
    effcompile.transform(model, effcompile.GreedyStages(num_stages=2), effcompile.SampleSelection(keep=0.5, strategy="loss"),
                         example_inputs=client.batch(ROWS, 0)[0])
    assert {row.details["cut_kind"] for row in effcompile.report(model).for_pass("greedy_stages")
            if "cut_kind" in row.details} == {"block-stack hooks"}
    step = effcompile.train_step(model, client.loss, torch.optim.SGD(model.parameters(), lr=0.0), compile=compiled,
                                 backend="effcompile_aot_eager")
    selector = effcompile.passes.sample_selection.selector_of(model)
    selections = []
    record = selector.record
    selector.record = lambda index, weights: (selections.append((index, weights)), record(index, weights))
    inputs, targets = client.batch(ROWS, 1)
    step(inputs, targets)
    step(inputs, targets)  # the history of per-sample losses exists from the second step on
    SETTINGS["sample_selection"].effect(Run(model, [], list(joint_log.graphs), [ROWS, ROWS], compiled, {}))
    stepped = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert [index.numel() for index, _ in selections[-2:]] == [ROWS // 2] * 2
    reference = _stage_gradients_of_recorded_selections(model, client, inputs, targets, selections[-2:])
    assert stepped.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(stepped[key], value, rtol=1e-4, atol=1e-6, msg=key)
    whole = [(torch.arange(ROWS), torch.full((ROWS,), 1.0 / ROWS))] * 2
    full = _stage_gradients_of_recorded_selections(model, client, inputs, targets, whole)
    assert any(not torch.allclose(full[key], value, atol=1e-5) for key, value in reference.items())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_compiled_decorrelation_of_a_causal_lm_has_no_graph_break(name):
    """A decoder's KV cache (``use_cache=True`` by default) broke the compiled decorrelated step on
    its lazily initialised layers (5 graphs for GPT-2, 9 for Llama); a training step passes
    ``use_cache=False``, so the step is one graph per R-update variant (update step, other steps)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from effcompile._compat import unique_graph_count

    torch.manual_seed(0)
    client = CLIENTS[name]
    model = client.build()
    model.train()
    assert model.config.use_cache  # the user's configuration, left as it is
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True), example_inputs=client.batch(ROWS, 0)[0])
    step = effcompile.train_step(model, client.loss, torch.optim.Adam(model.parameters(), lr=1e-3), compile=True,
                                 backend="effcompile_aot_eager")
    counters.clear()
    graphs = unique_graph_count()
    for _ in range(3):
        step(*client.batch(ROWS, 1))
    assert unique_graph_count() - graphs <= 2 and not counters["graph_break"], dict(counters["graph_break"])
    assert model.config.use_cache


def test_users_own_compiled_loop_with_the_kv_cache_on_is_one_graph():
    """``torch.compile(model)`` in the user's own loop, ``use_cache`` left on and R updated every
    other step: with the update in a torch.cond, the KV cache's first update (an exception the
    model's Python catches) ended the graph there and every step recompiled (Qwen2: 15 graphs in
    20 steps).  The masked update leaves one graph, as for the plain model."""
    from torch._dynamo.utils import counters

    from effcompile._compat import unique_graph_count

    torch.manual_seed(0)
    client = CLIENTS["llama"]
    model = client.build()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.Decorrelation(update_every=2, max_overhead=None),
                             example_inputs=client.batch(ROWS, 0)[0])
    compiled = torch.compile(model, backend="effcompile_aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    inputs, targets = client.batch(ROWS, 1)
    counters.clear()
    graphs = unique_graph_count()
    for _ in range(4):
        client.loss(compiled(**inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert unique_graph_count() - graphs == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert {int(state.updates) for state in decorrelation_states(model).values()} == {2}  # steps 1 and 3


@pytest.mark.parametrize("name, strategy", [("gpt2", "random"), ("llama", "random"), ("gpt2", "gradmatch")])
def test_compiled_selection_runs_every_weight_gradient_on_the_selected_sequences(name, strategy, joint_log):
    """Forward reuse on a causal LM: the row-sparse backward follows the per-sequence loss (vmapped
    cross entropy: new_zeros/scatter_add), dropout and residual adds down to every projection.
    gradmatch: the next-token loss's gradient at the LM head (torch.func.grad) is in the same graph."""
    torch.manual_seed(0)
    client = CLIENTS[name]
    model = client.build()
    inputs, targets = client.batch(ROWS, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.SampleSelection(keep=0.5, strategy=strategy), example_inputs=inputs)
    step = effcompile.train_step(model, client.loss, torch.optim.Adam(model.parameters(), lr=1e-2), compile=True,
                                 backend="effcompile_aot_eager")
    step(inputs, targets)
    gemms = [r for r in joint_log.all("row_sparse_backward") if r.op == "aten.mm.default"]
    projections = 8  # at least: 2 blocks × (attention in/out, MLP up/down); each has 2 backward GEMMs
    assert len(gemms) >= 2 * projections - 1, [r.op for r in joint_log.all("row_sparse_backward")]
    assert all(r.kept_rows * 2 == r.rows for r in gemms)  # half the sequences' tokens
