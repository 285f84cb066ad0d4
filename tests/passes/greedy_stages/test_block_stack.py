"""Greedy stages on models whose root forward torch.fx cannot trace: the block-stack hook path.

Hugging Face GPT-2, Llama and BERT (tiny, random init, ``tests/clients.py``) with dict batches:
the Plan names the stack and the stages, the stage losses fall, and no gradient crosses a cut
(checked against the model with the detach switched off, where it does).
"""

import pathlib
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import effcompile
from effcompile.passes.greedy_stages import GreedyStages, StageTraceError, saved_activation_bytes, staged_model
from effcompile.passes.greedy_stages import block_stack
from effcompile.passes.greedy_stages.block_stack import BlockStagedModel, CUT_KIND, replace_first_tensor
from effcompile.passes.greedy_stages.rewrite import GreedyStagesPass

pytest.importorskip("transformers")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # tests/: the client zoo
from clients import CLIENTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

ROWS = 8
STACKS = {"gpt2": "transformer.h", "llama": "model.layers", "bert": "bert.encoder.layer", "t5": "decoder.block"}
EMBEDDINGS = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight",
              "bert": "bert.embeddings.word_embeddings.weight", "t5": "shared.weight"}


def _staged(name, seed=0, **config):
    torch.manual_seed(seed)
    client = CLIENTS[name]
    model = client.build()
    model.train()
    inputs, targets = client.batch(ROWS, 0)
    effcompile.transform(model, GreedyStages(num_stages=2, **config), example_inputs=inputs)
    return client, model, inputs, targets


def _stage_grads(model, staged, loss_fn, inputs, targets, weights=(1.0, 1.0)):
    """Gradients of w0·L0 + w1·L1 with respect to every trainable parameter (None: no path)."""
    output, aux = staged.run(inputs)
    losses = [loss_fn(replace_first_tensor(output, aux[0]), targets), loss_fn(output, targets)]
    total = weights[0] * losses[0] + weights[1] * losses[1]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}


def _nonzero(grad):
    return grad is not None and bool(grad.abs().sum() > 0)


@pytest.mark.parametrize("name", list(STACKS))
def test_plan_names_the_stack_and_stages_and_both_stage_losses_fall(name):
    client, model, inputs, targets = _staged(name)
    stage_rows = [row for row in effcompile.report(model).for_pass("greedy_stages")
                  if row.layer.startswith(("greedy_stage_heads", "<stage"))]
    assert [row.details["cut_kind"] for row in stage_rows] == [CUT_KIND, CUT_KIND]
    assert all(row.details["stack"] == STACKS[name] for row in stage_rows)
    assert [row.details["blocks"] for row in stage_rows] == [f"{STACKS[name]}.0", f"{STACKS[name]}.1"]
    assert stage_rows[0].details["cut_after"] == f"{STACKS[name]}.0"
    assert stage_rows[0].reason.startswith("fx path not taken")  # not a silent fallback
    shares = [float(row.details["weights_share"].rstrip("%")) for row in stage_rows]
    assert abs(sum(shares) - 100) < 0.5 and min(shares) > 20
    layers = {row.layer: row.details["stage"] for row in effcompile.report(model).for_pass("greedy_stages")}
    assert layers[EMBEDDINGS[name].rpartition(".")[0]] == 0  # embeddings: stage 0

    staged = staged_model(model)
    assert isinstance(staged, BlockStagedModel)
    # every trainable parameter belongs to exactly one stage
    owned = [id(p) for k in range(2) for p in staged.stage_parameters(k)]
    assert len(owned) == len(set(owned)) and set(owned) == {id(p) for p in model.parameters() if p.requires_grad}
    logits = staged.predict(inputs, stage=0)
    assert logits.shape == client.build().eval()(**inputs).logits.shape

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = effcompile.train_step(model, client.loss, optimizer)
    history = []
    for _ in range(10):
        loss = step(inputs, targets)
        assert len(step.stage_losses) == 2 and torch.equal(loss, step.stage_losses[-1])
        history.append([float(value) for value in step.stage_losses])
    for k in range(2):
        first, last = history[0][k], sum(h[k] for h in history[-3:]) / 3  # dropout stays on: a mean
        assert last < 0.9 * first, (name, k, [h[k] for h in history])


@pytest.mark.parametrize("name", list(STACKS))
def test_no_gradient_crosses_the_cut(name, monkeypatch):
    client, model, inputs, targets = _staged(name)
    model.eval()  # dropout off: gradients comparable between calls
    staged = staged_model(model)
    stage0 = {n for n, p in model.named_parameters() if any(p is q for q in staged.stage_parameters(0))}
    stage1 = {n for n, p in model.named_parameters() if any(p is q for q in staged.stage_parameters(1))}
    assert EMBEDDINGS[name] in stage0

    only_last = _stage_grads(model, staged, client.loss, inputs, targets, weights=(0.0, 1.0))
    assert not any(_nonzero(only_last[n]) for n in stage0)  # the last stage's loss never reaches stage 0
    assert any(_nonzero(only_last[n]) for n in stage1)
    only_first = _stage_grads(model, staged, client.loss, inputs, targets, weights=(1.0, 0.0))
    assert not any(_nonzero(only_first[n]) for n in stage1)
    both = _stage_grads(model, staged, client.loss, inputs, targets)
    for n in stage0:  # zeroing stage 1's loss leaves stage 0's gradients unchanged
        a, b = both[n], only_first[n]
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-7), n

    # The step: the embedding's gradient is that of stage 0's aux loss alone.
    step = effcompile.train_step(model, client.loss, torch.optim.SGD(model.parameters(), lr=0.0))
    step(inputs, targets)
    embedding = dict(model.named_parameters())[EMBEDDINGS[name]]
    assert torch.allclose(embedding.grad, only_first[EMBEDDINGS[name]], atol=1e-7)

    # Control: without the detach at the cut (and for tied weights), stage 1's loss reaches stage 0.
    monkeypatch.setattr(block_stack, "_detach_all", lambda value: (value, None))
    monkeypatch.setattr(staged, "_owners", {})
    leaked = _stage_grads(model, staged, client.loss, inputs, targets, weights=(0.0, 1.0))
    assert any(_nonzero(leaked[n]) for n in stage0)


def test_encoder_output_and_position_bias_reach_the_later_stage_detached(monkeypatch):
    """T5: every decoder block receives the encoder's output and the relative position bias made
    before the cut.  The later stage reads them detached (the Plan names the blocks), so its loss
    leaves the encoder without gradient; without those pre-hooks it would reach it."""
    client, model, inputs, targets = _staged("t5")
    model.eval()
    last = [row for row in effcompile.report(model).for_pass("greedy_stages") if row.layer == "<stage 1>"][0]
    assert last.details["side_inputs_detached"] == "decoder.block.1 (2)"
    staged = staged_model(model)
    encoder = [n for n, _ in model.named_parameters() if n.startswith("encoder.")]
    only_last = _stage_grads(model, staged, client.loss, inputs, targets, weights=(0.0, 1.0))
    assert encoder and not any(_nonzero(only_last[n]) for n in encoder)
    only_first = _stage_grads(model, staged, client.loss, inputs, targets, weights=(1.0, 0.0))
    assert any(_nonzero(only_first[n]) for n in encoder)  # the encoder trains on stage 0's loss
    # Control: side inputs passed as they are carry stage 1's loss back into the encoder.
    monkeypatch.setattr(block_stack._SideInputs, "__call__", lambda self, module, args, kwargs: None)
    leaked = _stage_grads(model, staged, client.loss, inputs, targets, weights=(0.0, 1.0))
    assert any(_nonzero(leaked[n]) for n in encoder)


def test_tied_embedding_is_owned_by_stage_0_and_read_detached_by_the_last():
    client, model, inputs, targets = _staged("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    row = next(r for r in effcompile.report(model) if r.layer == "transformer.wte")
    assert row.details["stage"] == 0 and "read detached" in row.details["shared"]
    model.eval()
    grads = _stage_grads(model, staged_model(model), client.loss, inputs, targets, weights=(0.0, 1.0))
    assert not _nonzero(grads["transformer.wte.weight"])


def test_user_cuts_and_bad_cuts():
    _, model, _, _ = _staged("llama", cuts=("model.layers.0",))
    row = next(r for r in effcompile.report(model) if r.layer == "greedy_stage_heads.0")
    assert row.details["cut_after"] == "model.layers.0"
    with pytest.raises(ValueError, match="valid cuts"):
        _staged("llama", cuts=("model.norm",))
    with pytest.raises(ValueError, match="fewer than num_stages"):
        torch.manual_seed(0)
        client = CLIENTS["llama"]
        effcompile.transform(client.build(), GreedyStages(num_stages=3), example_inputs=client.batch(ROWS, 0)[0])


def test_refusals_are_clear():
    client, model, inputs, targets = _staged("bert")
    staged = staged_model(model)
    with pytest.raises(NotImplementedError, match="block-stack hook path"):
        staged.stage(0)
    with pytest.raises(NotImplementedError, match="block-stack hook path"):
        saved_activation_bytes(model, inputs, targets, client.loss)
    rows = list(effcompile.report(model).for_pass("greedy_stages"))
    with pytest.raises(ValueError, match="multi-process stage runtime"):
        GreedyStagesPass().replan(model, rows, GreedyStages(num_stages=2), inputs)


class _Untraceable(nn.Module):
    """A root forward fx cannot trace (a branch on a traced value) and no block stack."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.dim() == 2:
            x = x * 2
        return self.b(torch.relu(self.a(x)))


def test_no_stack_raises_the_real_reasons():
    with pytest.raises(StageTraceError, match=r"no block stack.*fx path was tried first.*cannot trace the root"):
        effcompile.transform(_Untraceable(), GreedyStages(num_stages=2), example_inputs=(torch.randn(4, 4),))


class _FoldedMixer(nn.Module):
    """A root forward fx cannot trace whose largest stack (a patch mixer, as MobileViT's) runs on
    the batch folded with the patches, ``(B·4, N, C)``: no aux head maps that to ``(B, classes)``.
    The stack of conv stages before it, ``(B, C, H, W)``, is cut instead."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                     for _ in range(3)])
        self.mixer = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8))
                                    for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if x.dim() == 4:  # a Python branch on a traced value: the fx path fails
            x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 3, 5, 1).reshape(b * 4, -1, c)
        for block in self.mixer:
            tokens = tokens + block(tokens)
        return self.head(tokens.reshape(b, -1, c).mean(1))


def test_a_stack_that_folds_the_batch_is_passed_over_with_its_reason():
    torch.manual_seed(0)
    model = _FoldedMixer()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    effcompile.transform(model, GreedyStages(num_stages=2), example_inputs=(x,))
    rows = [row for row in effcompile.report(model).for_pass("greedy_stages") if "cut_kind" in row.details]
    assert [row.details["stack"] for row in rows] == ["stages", "stages"]
    assert rows[0].op == "pool_channels_first"
    assert rows[0].details["stacks_passed_over"].startswith("mixer: greedy_stages: no aux head maps a hidden state "
                                                            "(32, 16, 8)")
    step = effcompile.train_step(model, nn.functional.cross_entropy, torch.optim.Adam(model.parameters(), lr=1e-2))
    history = []
    for _ in range(12):
        step(x, y)
        history.append([float(loss) for loss in step.stage_losses])
    assert all(history[-1][k] < 0.9 * history[0][k] for k in range(2)), history


def test_when_no_stack_fits_the_error_gives_every_stacks_reason():
    model = _FoldedMixer()
    with pytest.raises(ValueError, match=r"'mixer' has 2 blocks, fewer than num_stages=4.*other block stacks do not "
                                         r"fit either: stages: .*'stages' has 3 blocks"):
        effcompile.transform(model, GreedyStages(num_stages=4), example_inputs=(torch.randn(4, 3, 8, 8),))


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4)])
        self.head = nn.Linear(8, 3)

    def forward(self, x, scale=None):
        return self.head(self.blocks(x))


def test_fx_path_takes_dict_batches_by_parameter_name():
    torch.manual_seed(0)
    model = _Chain()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, GreedyStages(num_stages=2), example_inputs={"x": x})
    row = next(r for r in effcompile.report(model) if r.layer == "greedy_stage_heads.0")
    assert row.details["cut_kind"] in ("module", "node")  # the fx path, not the hook path
    staged = staged_model(model)
    assert staged.input_names == ["x"]
    assert torch.allclose(staged.forward(*staged.positional({"x": x})), model(x))
    step = effcompile.train_step(model, nn.functional.cross_entropy, torch.optim.Adam(model.parameters(), lr=1e-2))
    losses = [[float(v) for v in (step({"x": x}, y), *step.stage_losses)] for _ in range(10)]
    assert losses[-1][1] < losses[0][1] and losses[-1][2] < losses[0][2]
    with pytest.raises(ValueError, match="keyword inputs"):
        step({"z": x}, y)


class _TupleBlock(nn.Module):
    """An older-transformers-style layer: returns ``(hidden, attention-like extra)``."""

    def __init__(self, width):
        super().__init__()
        self.fc, self.norm = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, hidden, mask=None):
        out = hidden + torch.tanh(self.fc(self.norm(hidden)))
        return out, out.mean(-1)


class _TupleStack(nn.Module):
    """Root forward fx cannot trace; blocks return tuples; the output is a tuple ``(logits,)``."""

    def __init__(self, vocab=11, width=16, depth=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(_TupleBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, vocab)

    def forward(self, ids, mask=None):
        if ids.dim() == 2:  # a branch on a traced value: torch.fx cannot trace this root
            hidden = self.embed(ids)
        for layer in self.layers:
            hidden, _ = layer(hidden, mask)
        return (self.out(hidden),)


def test_tuple_block_outputs_and_tuple_model_outputs():
    torch.manual_seed(0)
    model = _TupleStack()
    ids = torch.randint(0, 11, (4, 6))

    def loss_fn(output, targets):
        return nn.functional.cross_entropy(output[0].flatten(0, 1), targets.flatten())

    effcompile.transform(model, GreedyStages(num_stages=2), example_inputs={"ids": ids, "mask": torch.ones(4, 6)})
    row = next(r for r in effcompile.report(model) if r.layer == "greedy_stage_heads.0")
    assert row.details["cut_kind"] == CUT_KIND and row.details["cut_after"] == "layers.1"  # balanced: 2 + 2 blocks
    staged = staged_model(model)
    outputs = staged.stage_outputs({"ids": ids})
    assert isinstance(outputs[0], tuple) and outputs[0][0].shape == (4, 6, 11)
    grads = _stage_grads(model, staged, loss_fn, {"ids": ids}, ids, weights=(0.0, 1.0))
    assert not _nonzero(grads["embed.weight"]) and not _nonzero(grads["layers.0.fc.weight"])
    assert _nonzero(grads["layers.2.fc.weight"])
    step = effcompile.train_step(model, loss_fn, torch.optim.Adam(model.parameters(), lr=1e-2))
    history = [[float(v) for v in (step({"ids": ids}, ids), *step.stage_losses)] for _ in range(10)]
    assert history[-1][1] < history[0][1] and history[-1][2] < history[0][2]


def test_negligible_stage_warns():
    torch.manual_seed(0)
    model = _TupleStack(depth=4)
    ids = torch.randint(0, 11, (4, 6))
    with pytest.warns(UserWarning, match="negligible"):
        effcompile.transform(model, GreedyStages(num_stages=2, cuts=("layers.2",), min_stage_share=0.4),
                             example_inputs=(ids,))
    rows = [r for r in effcompile.report(model) if r.details.get("warning") == "negligible stage"]
    assert [r.layer for r in rows] == ["<stage 1>"]


class _TokenClassifier(nn.Module):
    """A token stack with a classifier head that reads the first position (``pool=False``, a CLS
    token) or the mean of all positions (``pool=True``, Swin-style); fx cannot trace the root."""

    def __init__(self, pool, width=16, depth=4):
        super().__init__()
        self.pool = pool
        self.embed = nn.Linear(4, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
                                    for _ in range(depth))
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        if x.dim() == 3:  # a branch on a traced value: torch.fx cannot trace this root
            hidden = self.embed(x)
        for layer in self.layers:
            hidden = hidden + layer(hidden)
        return self.out(hidden.mean(1) if self.pool else hidden[:, 0])


@pytest.mark.parametrize("pool", [False, True], ids=["cls", "mean"])
def test_aux_head_reads_the_sequence_the_way_the_models_own_head_does(pool):
    """The aux head of a token sequence follows the model's head, read off the example forward:
    the first position for a CLS classifier, the mean of all positions for a pooled one (HF Swin).
    The stage-0 loss then reaches every position of the cut's hidden state only when pooling."""
    torch.manual_seed(0)
    model = _TokenClassifier(pool)
    x, y = torch.randn(8, 6, 4), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, GreedyStages(num_stages=2), example_inputs=(x,))
    row = next(r for r in effcompile.report(model) if r.layer == "greedy_stage_heads.0")
    assert row.op == ("pool_tokens" if pool else "first_token")
    hidden = torch.randn(8, 6, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(model.greedy_stage_heads[0](hidden).sum(), hidden)
    assert bool(grad[:, 1:].abs().sum() > 0) == pool


def test_hugging_face_swin_gets_a_mean_pooled_aux_head():
    client = CLIENTS["hf_swin"]
    torch.manual_seed(0)
    model = client.build()
    inputs, _ = client.batch(ROWS, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, GreedyStages(num_stages=2), example_inputs=inputs)
    assert next(r for r in effcompile.report(model) if r.layer == "greedy_stage_heads.0").op == "pool_tokens"


class _GroupsOfLayers(nn.Module):
    """Funnel's layout: a ModuleList of ModuleLists that the forward loops over (never calls), a
    pooling step between the groups, and a branch fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.groups = nn.ModuleList([nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if x.dim() == 3:
            x = x.mean(1)
        for index, group in enumerate(self.groups):
            if index:
                x = x * 0.5  # between the groups, as Funnel pools
            for layer in group:
                x = torch.tanh(layer(x))
        return self.head(x)


def test_a_stack_of_module_lists_is_cut_between_their_layers():
    torch.manual_seed(0)
    model, x, y = _GroupsOfLayers(), torch.randn(16, 8), torch.randint(0, 3, (16,))
    effcompile.transform(model, GreedyStages(num_stages=2), example_inputs=(x,))
    staged = staged_model(model)
    assert staged.plan.stack.blocks == ["groups.0.0", "groups.0.1", "groups.1.0", "groups.1.1"]
    first = {id(p) for p in staged.stage_parameters(0)}
    assert id(model.groups[0][0].weight) in first and id(model.head.weight) not in first
    loss_fn = nn.CrossEntropyLoss()
    only_last = _stage_grads(model, staged, loss_fn, x, y, weights=(0.0, 1.0))
    assert not _nonzero(only_last["groups.0.0.weight"]) and _nonzero(only_last["head.weight"])
    step = effcompile.train_step(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1))
    losses = [float(step(x, y)) for _ in range(30)]
    assert losses[-1] < losses[0]
