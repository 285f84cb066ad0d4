"""Every linear/conv of a graph is decorrelated, including layers whose input is computed inside
the module that calls them (observed in the graph by passes/decorrelation/observe.py).

The mixed model holds each kind: functional linears and matmuls on values computed in their own
forward, a functional grouped/dilated conv on a computed value, nn.Conv1d, grouped, depthwise and
dilated nn.Conv2d, nn.MultiheadAttention (packed in_proj and the internal out_proj call) and a
functional linear at the root on a computed value.  Every weight must be a REWRITE row and every
R must move in a few training steps, eager and compiled alike.
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile import _compat
from effcompile._compat import unique_graph_count
from effcompile.plan import Action
from effcompile.passes.decorrelation import decorrelation_states

pytestmark = pytest.mark.usefixtures("single_thread")


class _Gated(nn.Module):
    """F.linear and x @ Wᵀ on a value computed inside this forward (split/cat: Python Tensor methods)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.b = nn.Parameter(torch.zeros(d))
        self.v = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        t = torch.tanh(x) * x
        first, second = t.split(t.shape[-1] // 2, dim=-1)
        t = torch.cat([second, first], dim=-1)
        return F.linear(t, self.w, self.b) + (2 * t) @ self.v.t()


class _FunctionalConv(nn.Module):
    """A grouped, dilated F.conv2d on a value computed inside this forward."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels // 2, 3, 3) / 3)

    def forward(self, x):
        return F.conv2d(torch.relu(x) + 0.1, self.weight, padding=2, dilation=2, groups=2)


class _Mixed(nn.Module):
    def __init__(self, channels=4, d=8):
        super().__init__()
        self.conv1d = nn.Conv1d(channels, channels, 3, padding=1)
        self.grouped = nn.Conv2d(channels, 2 * channels, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(2 * channels, 2 * channels, 3, padding=2, dilation=2, groups=2 * channels)
        self.functional_conv = _FunctionalConv(2 * channels)
        self.proj = nn.Linear(2 * channels, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.gated = _Gated(d)
        self.head = nn.Parameter(torch.randn(3, d) / d ** 0.5)

    def forward(self, x):  # (B, C, L)
        h = F.relu(self.conv1d(x)).unsqueeze(-1).expand(-1, -1, -1, 2)  # (B, C, L, 2)
        h = F.relu(self.depthwise(F.relu(self.grouped(h))))
        h = self.functional_conv(h)
        h = self.proj(h.mean(-1).transpose(1, 2))  # (B, L, d)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = self.gated(h)
        return F.linear(1.5 * h.mean(1), self.head)  # a computed input at the root


WEIGHT_LAYERS = {"conv1d", "grouped", "depthwise", "functional_conv", "proj", "mha.in_proj_weight",
                 "mha.out_proj", "gated.w", "gated.v", "head"}
OBSERVED_IN_GRAPH = {"mha.out_proj": "mha", "gated.w": "gated", "gated.v": "gated",
                     "functional_conv": "functional_conv", "head": "<root>"}


def _batches(steps):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator))
            for _ in range(steps)]


def _train(backend=None, steps=3):
    torch.manual_seed(0)
    model = _Mixed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped layer would warn: none may be skipped
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.05, max_overhead=None), example_inputs=(torch.randn(4, 4, 6),))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = effcompile.train_step(model, F.cross_entropy, optimizer, compile=backend is not None,
                                 backend=backend or "effcompile")
    graphs_before = unique_graph_count()
    torch.manual_seed(2)  # the R update samples rows: same seed, same rows
    losses = torch.stack([step(inputs, targets) for inputs, targets in _batches(steps)])
    return model, losses, unique_graph_count() - graphs_before


@pytest.fixture(scope="module")
def eager_run():
    return _train()


def test_every_weight_layer_is_rewritten(eager_run):
    model, _, _ = eager_run
    plan = effcompile.report(model)
    rows = {row.layer: row for row in plan.for_pass("decorrelation")}
    assert set(rows) == WEIGHT_LAYERS
    assert all(row.action == Action.REWRITE for row in rows.values()), [(r.layer, r.reason) for r in rows.values()]
    assert {layer: row.details["observed_in"] for layer, row in rows.items() if "observed_in" in row.details} \
        == OBSERVED_IN_GRAPH
    assert rows["depthwise"].details["groups"] == 8 and rows["functional_conv"].details["groups"] == 2


def test_every_R_moves_in_eager_training(eager_run):
    model, losses, _ = eager_run
    states = decorrelation_states(model)
    assert set(states) == WEIGHT_LAYERS
    for layer, state in states.items():
        assert int(state.updates) == 3, layer
        assert not torch.allclose(state.matrix, torch.eye(state.matrix.shape[-1]).expand_as(state.matrix)), layer
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize("route", ["c_hook", "python_copy"])
def test_every_redispatch_route_observes_the_attention_like_the_public_one(eager_run, route, monkeypatch):
    """torch 2.11 lacks torch.overrides.redispatch_function: the C hook, or a copy of the composite
    whose dispatch checks are off, must see inside nn.MultiheadAttention's forward just the same."""
    _remove_redispatch_hooks(route, monkeypatch)
    model, losses, _ = _train()
    reference_model, reference_losses, _ = eager_run
    torch.testing.assert_close(losses, reference_losses, rtol=0, atol=0)
    states, reference_states = decorrelation_states(model), decorrelation_states(reference_model)
    assert int(states["mha.out_proj"].updates) == 3
    for layer, state in states.items():
        torch.testing.assert_close(state.matrix, reference_states[layer].matrix, rtol=0, atol=0)


def _remove_redispatch_hooks(route, monkeypatch):
    """Make effcompile see torch as 2.11 does ("python_copy": neither hook) or a version between
    ("c_hook").  Through the compat seam: torch's own hooks stay, since Dynamo calls them."""
    skip_one_hop = _compat.redispatch_hooks()[1]
    if route == "c_hook":
        if skip_one_hop is None:
            pytest.skip("this torch has no C hook to stand in for")
        monkeypatch.setattr(_compat, "redispatch_hooks", lambda: (None, skip_one_hop))
    elif route == "python_copy":
        monkeypatch.setattr(_compat, "redispatch_hooks", lambda: (None, None))


@pytest.mark.parametrize("route", ["native", "python_copy"])
def test_compiled_aot_eager_moves_every_R_like_eager(eager_run, route, monkeypatch):
    _remove_redispatch_hooks(route, monkeypatch)
    torch.compiler.reset()  # a graph traced with the other route must not be reused
    with torch._dynamo.config.patch(error_on_recompile=True):
        model, losses, graphs = _train("effcompile_aot_eager")
    eager_states = decorrelation_states(eager_run[0])
    assert graphs == 1
    for layer, state in decorrelation_states(model).items():
        assert int(state.updates) == 3, layer
        torch.testing.assert_close(state.matrix, eager_states[layer].matrix, rtol=1e-4, atol=1e-5, msg=layer)
    torch.testing.assert_close(losses, eager_run[1], rtol=1e-4, atol=1e-5)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.w = nn.Parameter(torch.randn(3, 8) / 8 ** 0.5)

    def forward(self, x):
        return F.linear(torch.relu(self.mha(x, x, x, need_weights=False)[0]).mean(1), self.w)


@pytest.mark.slow
def test_compiled_inductor_updates_the_out_projection():
    torch.manual_seed(0)
    model = _Attention()
    x = torch.randn(2, 5, 8)
    effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.05, max_overhead=None), example_inputs=(x,))
    compiled = torch.compile(model, backend="effcompile", fullgraph=True)
    for _ in range(2):
        compiled(x).sum().backward()
    for layer in ("mha.out_proj", "w"):
        state = decorrelation_states(model)[layer]
        assert int(state.updates) == 2, layer
        assert not torch.allclose(state.matrix[0], torch.eye(8)), layer


def test_eval_mode_leaves_R_alone_and_matches_the_folded_model():
    torch.manual_seed(0)
    model = _Attention()
    x = torch.randn(2, 5, 8)
    effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.05, max_overhead=None), example_inputs=(x,))
    model(x)  # one training update, so R ≠ I
    model.eval()
    before = {layer: state.matrix.clone() for layer, state in decorrelation_states(model).items()}
    out = model(x)
    for layer, state in decorrelation_states(model).items():
        torch.testing.assert_close(state.matrix, before[layer])
    torch.testing.assert_close(effcompile.fold(model)(x), out, rtol=1e-5, atol=1e-6)


def test_the_update_sees_the_computed_input():
    """R of a functional linear on t = tanh(x)·x follows the statistics of t, not of x."""
    torch.manual_seed(0)
    model = _Gated(6)
    x = torch.randn(32, 6)
    effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.05, kappa=0.3, max_overhead=None), example_inputs=(x,))
    state = decorrelation_states(model)["w"]
    R = state.matrix[0].clone()
    model(x)
    t = torch.tanh(x) * x
    t = torch.cat([t[:, 3:], t[:, :3]], dim=-1)
    z = t @ R.T
    second_moment = z.T @ z / z.shape[0]
    C = second_moment - torch.diag(torch.diag(second_moment))
    v = torch.diag(second_moment) - 1
    expected = R - 0.05 * ((1 - 0.3) * C @ R + 0.3 * torch.diag(v) @ R)
    torch.testing.assert_close(state.matrix[0], expected, rtol=0, atol=1e-6)


class _Untraced(nn.Module):
    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.randn(4, 4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return x @ (self.v * 0.5) + self.lin(x)


def test_a_weight_reaching_a_layer_through_other_ops_is_a_skip_row_not_silence():
    model = _Untraced()
    with pytest.warns(UserWarning, match="skipped 1 layer"):
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True), example_inputs=(torch.randn(2, 4),))
    plan = effcompile.report(model)
    assert plan.row("lin").action == Action.REWRITE
    assert plan.row("v").action == Action.SKIP and "does not follow" in plan.row("v").reason


class _Hidden(nn.Module):
    """A functional linear on a computed value, run where no TorchFunctionMode can see it."""

    def __init__(self, hide):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.hide = hide

    def forward(self, x):
        t = torch.relu(x)
        if self.hide:
            with torch._C.DisableTorchFunction():
                return F.linear(t, self.w)
        return torch.ops.aten.linear(t, self.w)  # torch.ops calls are observed too


def test_an_unseen_use_of_an_observed_weight_raises_instead_of_skipping_the_update():
    for hide in (False, True):
        model = _Hidden(hide)
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True), example_inputs=(torch.randn(2, 4),))
        assert effcompile.report(model).row("w").details["observed_in"] == "<root>"
        if hide:
            with pytest.raises(RuntimeError, match="no linear/conv/matmul used it"):
                model(torch.randn(2, 4))
        else:
            model(torch.randn(2, 4))
            assert int(decorrelation_states(model)["w"].updates) == 1


def test_einsum_against_a_parameter_is_a_skip_row():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.e = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return self.lin(x) + torch.einsum("bi,oi->bo", x, self.e)

    model = Mixed()
    with pytest.warns(UserWarning, match="skipped 1 layer"):
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True), example_inputs=(torch.randn(2, 4),))
    assert effcompile.report(model).row("e").action == Action.SKIP
    assert "einsum" in effcompile.report(model).row("e").reason


def test_composes_with_the_randomized_vjp_marker_on_observed_weights(joint_log):
    """The randomized VJP wraps W·R in its marker op; the observer follows it (compiled aot_eager)."""
    torch.manual_seed(0)
    model = _Attention()
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer w keeps all of its 2 rows: exact, and says so
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.05, max_overhead=None), effcompile.RandomizedVJP(keep=0.5),
                             example_inputs=(x,))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        step = effcompile.train_step(model, lambda out, _: out.sum(), optimizer, compile=True,
                                     backend="effcompile_aot_eager")
        for _ in range(2):
            step(x, None)
    for layer, state in decorrelation_states(model).items():
        assert int(state.updates) == 2, layer
    assert {"mha.in_proj_weight", "mha.out_proj"} <= {record.layer for record in joint_log.all("randomized_vjp")}
