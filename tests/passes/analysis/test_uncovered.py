"""Every weight a contraction reads gets a Plan row in each per-layer pass: rewritten, or a SKIP
row that says why (``passes/analysis/uncovered.py``).  A recurrent layer, a transposed
convolution, an ``einsum``/``bmm``/bilinear weight or a ``W @ x`` left operand left exact without
a row would be a silent no-op; elementwise reads and lookups are not layers and get none."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import effcompile
from effcompile.plan import Action


class _Head(nn.Module):
    """``body`` then a linear head the passes do rewrite (the transform is not empty)."""

    def __init__(self, body: nn.Module, features: int):
        super().__init__()
        self.body, self.head = body, nn.Linear(features, 3)

    def forward(self, x):
        out = self.body(x)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out.flatten(1))


class _Functional(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x):
        if self.form == "einsum":
            return torch.einsum("bi,oi->bo", x, self.w)
        if self.form == "bmm":
            return torch.bmm(x.unsqueeze(1), self.w.expand(x.shape[0], 6, 6)).squeeze(1)
        return (self.w @ x.T).T  # the parameter as the left operand


@torch.library.custom_op("effcompile_tests::experts_matmul", mutates_args=())
def _experts_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A user's (or a library's) custom op over a 3-D weight: Hugging Face MoE experts' grouped GEMM."""
    return torch.bmm(x, w)


@_experts_matmul.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], x.shape[1], w.shape[2])


class _Experts(nn.Module):
    """Two experts on halves of the batch, their (experts, out, in) weight read transposed."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 6, 6) / 3)

    def forward(self, x):
        return _experts_matmul(x.view(2, -1, 6), self.w.transpose(-2, -1)).reshape(x.shape[0], 6)


class _LastStep(nn.Module):
    """A recurrent module whose last time step feeds the head."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.rnn = cell

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


CONSTRUCTS = {
    # name: (body, example input, the body's Plan key, the reason's words)
    "lstm": (lambda: _LastStep(nn.LSTM(6, 6, batch_first=True)), (4, 5, 6), "body.rnn", "fused aten.lstm"),
    "gru": (lambda: _LastStep(nn.GRU(6, 6, batch_first=True, num_layers=2)), (4, 5, 6), "body.rnn", "fused aten.gru"),
    "lstm_cell": (lambda: nn.LSTMCell(6, 6), (4, 6), "body", "aten.lstm_cell"),
    "conv_transpose": (lambda: nn.ConvTranspose2d(2, 3, 3), (4, 2, 4, 4), "body", "transposed convolution"),
    "einsum": (lambda: _Functional("einsum"), (4, 6), "body.w", "einsum against a parameter"),
    "bmm": (lambda: _Functional("bmm"), (4, 6), "body.w", "not a recognised layer form"),
    "left_operand": (lambda: _Functional("left"), (4, 6), "body.w", "not its weight operand"),
    "custom_op": (_Experts, (4, 6), "body.w", "custom op effcompile_tests::experts_matmul"),
}
def _parametrized(kind: str):
    def build() -> nn.Module:
        from torch.nn.utils import parametrizations, parametrize

        layer = nn.Linear(6, 6)
        if kind == "weight_norm":
            return parametrizations.weight_norm(layer)
        if kind == "spectral_norm":
            return parametrizations.spectral_norm(layer)
        parametrize.register_parametrization(layer, "weight", nn.Identity())  # even the identity: a computed weight
        return layer

    return build


PARAMETRIZED = "computed by a parametrization"
CONSTRUCTS.update({
    "weight_norm": (_parametrized("weight_norm"), (4, 6), "body", PARAMETRIZED),
    "spectral_norm": (_parametrized("spectral_norm"), (4, 6), "body", PARAMETRIZED),  # not its power iteration's mv
    "identity_parametrization": (_parametrized("identity"), (4, 6), "body", PARAMETRIZED),
})
PASSES = {
    "decorrelation": lambda: effcompile.Decorrelation(input_layers=True, max_overhead=None),
    "randomized_vjp": lambda: effcompile.RandomizedVJP(keep=0.5, multiple=1, estimator="uniform"),
}


def _model(construct: str) -> nn.Module:
    build, shape, _, _ = CONSTRUCTS[construct]
    torch.manual_seed(0)
    body = build()
    features = body(torch.randn(*shape))
    features = features[0] if isinstance(features, tuple) else features
    return _Head(body, features[0].numel())


@pytest.mark.parametrize("pass_name", list(PASSES))
@pytest.mark.parametrize("construct", list(CONSTRUCTS))
def test_an_unsupported_contraction_is_a_warned_skip_row(construct, pass_name):
    _, shape, key, words = CONSTRUCTS[construct]
    model = _model(construct)
    with pytest.warns(UserWarning, match=f"{pass_name}: skipped 1 layer"):
        effcompile.transform(model, PASSES[pass_name](), example_inputs=(torch.randn(*shape),))
    rows = effcompile.report(model).for_pass(pass_name)
    assert rows.row(key).action == Action.SKIP and words in rows.row(key).reason, rows.row(key).reason
    assert rows.row("head").action == Action.REWRITE
    assert {row.layer for row in rows} == {key, "head"}  # one row per layer: a module's weights are one row


def test_composed_passes_each_say_the_skip_after_a_rewrite_made_weight_a_property():
    """Decorrelation first turns ``head.weight`` into the property ``W·R``; the randomized VJP planned
    after it still finds the parameters (no ``get_parameter`` on a property) and says the skip."""
    _, shape, key, _ = CONSTRUCTS["lstm"]
    model = _model("lstm")
    with pytest.warns(UserWarning, match="randomized_vjp: skipped 1 layer"):
        effcompile.transform(model, PASSES["decorrelation"](), PASSES["randomized_vjp"](),
                             example_inputs=(torch.randn(*shape),))
    plan = effcompile.report(model)
    assert [(row.pass_name, row.action) for row in plan if row.layer == key] == \
        [("decorrelation", Action.SKIP), ("randomized_vjp", Action.SKIP)]
    assert [row.action for row in plan if row.layer == "head"] == [Action.REWRITE, Action.REWRITE]


@pytest.mark.parametrize("construct", ["lstm", "conv_transpose", "einsum"])
def test_a_skipped_weight_keeps_its_exact_gradient_while_the_head_is_sketched(construct):
    """The skip row tells the truth: the body's gradient is plain backprop's; the head's is sampled."""
    _, shape, _, _ = CONSTRUCTS[construct]
    model, reference = _model(construct), _model(construct)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, PASSES["randomized_vjp"](), example_inputs=(torch.randn(*shape),))
    x = torch.randn(8, *shape[1:])
    reference(x).square().sum().backward()
    heads = []
    for _ in range(2):
        model.zero_grad()
        model(x).square().sum().backward()
        for (name, parameter), exact in zip(model.body.named_parameters(), reference.body.parameters()):
            torch.testing.assert_close(parameter.grad, exact.grad, msg=name)
        heads.append(model.head.weight.grad.clone())
    assert not torch.equal(*heads), "the head's gradient is exact: the pass did nothing"


class _NotLayers(nn.Module):
    """Rank-2+ parameters read elementwise or by lookup: a position embedding, a class token, an embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.pos = nn.Parameter(torch.zeros(1, 5, 6))
        self.cls = nn.Parameter(torch.zeros(1, 1, 6))
        self.unused = nn.Linear(6, 6)  # defined, never called
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        tokens = self.embed(ids) + self.pos
        tokens = torch.cat([self.cls.expand(ids.shape[0], -1, -1), tokens], dim=1)
        return self.head(tokens[:, 0] + tokens[:, 1:].mean(1))


@pytest.mark.parametrize("pass_name", list(PASSES))
def test_elementwise_reads_and_lookups_are_not_layers_but_an_unused_linear_is_said(pass_name):
    model = _NotLayers()
    with pytest.warns(UserWarning, match="skipped 1 layer"):
        effcompile.transform(model, PASSES[pass_name](), example_inputs=(torch.randint(0, 11, (4, 5)),))
    rows = effcompile.report(model).for_pass(pass_name)
    assert {row.layer for row in rows} == {"head", "unused"}
    assert "not used as a linear/conv weight" in rows.row("unused").reason
