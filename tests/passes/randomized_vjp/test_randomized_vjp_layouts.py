"""The randomized VJP on every dense weight layout users write, not only ``nn.Linear``.

``x @ self.p`` with ``p`` stored in×out, GPT-2's ``Conv1D`` (``addmm(b, x.view(-1, nx), W)`` with
``W`` in×out), ``x @ self.q.t()`` (out×in) and ``F.linear`` in a custom module: each weight's
grad_weight GEMM is sampled in the compiled joint graph (records per layer), draws differ, and the
mean of the draws is the exact gradient.  Before, the first three were skipped ("only linear and
conv layers have a sketched backward").  Eager training sketches the same layers through a mode
around the forward of the module that uses each weight (``eager_scope.py``): the same z-tests run
eagerly, with no compilation.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.plan import Action

pytestmark = pytest.mark.usefixtures("single_thread")
DRAWS = 60


class Conv1D(nn.Module):
    """GPT-2's layer: weight stored (in, out), ``addmm`` over the flattened tokens."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * nx ** -0.5)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], -1)


class Layouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(16, 32) / 4)        # x @ p       (in×out)
        self.c_fc = Conv1D(32, 32)                           # addmm(b, x, W) (in×out)
        self.q = nn.Parameter(torch.randn(24, 32) / 6)        # x @ q.t()   (out×in)
        self.w = nn.Parameter(torch.randn(10, 24) / 5)        # F.linear    (out×in)

    def forward(self, x):  # x: (batch, tokens, 16)
        h = torch.tanh(x @ self.p)
        h = torch.tanh(self.c_fc(h))
        h = torch.tanh(h @ self.q.t())
        return F.linear(h, self.w).mean(1)


WEIGHTS = ("p", "c_fc.weight", "q", "w")


def _model():
    torch.manual_seed(0)
    return Layouts()


def _batch(rows=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, 16, generator=generator), torch.randint(0, 10, (rows,), generator=generator)


def _gradient(model):
    parameters = dict(model.named_parameters())  # attribute reads of a sketched weight are for compiled code
    return [parameters[name].grad.detach().float().clone() for name in WEIGHTS]


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _draws(config, dtype=None, *more_configs, compiled=True):
    model = _model()
    x, y = _batch()
    effcompile.transform(model, config, *more_configs, example_inputs=(x,))
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0),
                                 compile=compiled, backend="effcompile_aot_eager")
    samples = []
    for _ in range(DRAWS):
        with _autocast(dtype):
            step(x, y)
        samples.append(_gradient(model))
    reference = _model()
    with _autocast(dtype):
        F.cross_entropy(reference(x), y).backward()
    return model, samples, _gradient(reference)


def _assert_unbiased(samples, exact, dtype):
    """‖mean − exact‖² against tr(Cov)/N per weight (see test_randomized_vjp_coverage)."""
    for index, name in enumerate(WEIGHTS):
        draws = torch.stack([sample[index].flatten() for sample in samples])
        reference = exact[index].flatten()
        error = float((draws.mean(0) - reference).pow(2).sum())
        expected = float(draws.var(0).sum()) / draws.shape[0]
        rounding = 0.0 if dtype is None else float((2e-2 * reference.norm()) ** 2)
        assert error <= 2.5 * expected + rounding + 1e-12, (name, error, expected)
        assert float(draws.var(0).sum()) > 1e-4 * float(reference.pow(2).sum()), name  # sampled, not exact


def test_every_layout_is_planned():
    model = _model()
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25), example_inputs=(_batch()[0],))
    plan = effcompile.report(model)
    assert {row.layer: row.action for row in plan} == {
        "p": Action.REWRITE, "c_fc": Action.REWRITE, "q": Action.REWRITE, "w": Action.REWRITE}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
def test_every_layout_samples_grad_weight_unbiased_eagerly(dtype, joint_log):
    """No compilation: x @ p, Conv1D's addmm, x @ q.t() and F.linear run as SketchedLinear inside
    the scope mode; the mean of the draws is the exact gradient and no graph was compiled."""
    model, samples, exact = _draws(effcompile.RandomizedVJP(keep=0.25), dtype, compiled=False)
    plan = effcompile.report(model)
    assert {row.layer: row.details.get("eager_scope") for row in plan} == {
        "p": "<root>", "c_fc": "c_fc", "q": "<root>", "w": "<root>"}
    assert not joint_log.graphs
    _assert_unbiased(samples, exact, dtype)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
def test_every_layout_samples_grad_weight_unbiased(dtype, joint_log):
    _, samples, exact = _draws(effcompile.RandomizedVJP(keep=0.25), dtype)
    records = joint_log.all("randomized_vjp")
    assert {(r.layer, r.gemm) for r in records} == {(layer, "grad_weight") for layer in ("p", "c_fc", "q", "w")}
    assert all(r.k == 32 and r.n == 128 for r in records), records  # 4 tokens × 32 samples, keep 0.25
    _assert_unbiased(samples, exact, dtype)


@pytest.mark.parametrize("config, gemms", [
    (effcompile.RandomizedVJP(keep=0.5, estimator="sketch", multiple=1),
     {(layer, "grad_weight") for layer in ("p", "c_fc", "q", "w")}),
    (effcompile.RandomizedVJP(keep=0.5, target="both", multiple=1),  # grad_input exists below the first layer
     {(layer, "grad_weight") for layer in ("p", "c_fc", "q", "w")} | {(layer, "grad_input") for layer in ("c_fc", "q", "w")}),
], ids=["sketch", "both_targets"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_other_estimators_and_grad_input_on_every_layout(config, gemms, compiled, joint_log):
    _, samples, exact = _draws(config, compiled=compiled)
    if compiled:
        assert {(r.layer, r.gemm) for r in joint_log.all("randomized_vjp")} == gemms
    _assert_unbiased(samples, exact, None)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))


def _attention_draws(compiled, *more_configs):
    torch.manual_seed(0)
    model, (x, y) = _Attention(), _batch()
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25), *more_configs, example_inputs=(x,))
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0),
                                 compile=compiled, backend="effcompile_aot_eager")
    names = ("mha.in_proj_weight", "mha.out_proj.weight")
    samples = []
    for _ in range(DRAWS):
        step(x, y)
        parameters = dict(model.named_parameters())
        samples.append([parameters[name].grad.detach().clone() for name in names])
    torch.manual_seed(0)
    reference = _Attention()
    F.cross_entropy(reference(x), y).backward()
    exact = [reference.get_parameter(name).grad for name in names]
    return model, samples, exact


def _assert_attention_unbiased(samples, exact):
    for index in range(len(exact)):
        draws = torch.stack([sample[index].flatten() for sample in samples])
        error = float((draws.mean(0) - exact[index].flatten()).pow(2).sum())
        expected = float(draws.var(0).sum()) / draws.shape[0]
        assert error <= 2.5 * expected + 1e-12, (index, error, expected)
        assert float(draws.var(0).sum()) > 1e-4 * float(exact[index].pow(2).sum()), index  # sampled, not exact


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_attention_projections_are_sketched_unbiased(compiled, joint_log):
    """MHA reads ``in_proj_weight`` and ``out_proj.weight`` inside ``F.multi_head_attention_forward``
    and never calls ``out_proj``: eagerly the mode around MHA's forward re-enters the composite and
    sketches both ``linear`` ops; compiled, the joint graph's GEMMs are rewritten."""
    model, samples, exact = _attention_draws(compiled)
    rows = {row.layer: row for row in effcompile.report(model)}
    assert rows["mha.out_proj"].action == Action.REWRITE and rows["mha.out_proj"].details["eager_scope"] == "mha"
    assert rows["mha.in_proj_weight"].details["eager_scope"] == "mha"
    assert rows["head"].details["eager"] == "yes" and "eager_scope" not in rows["head"].details  # its own forward
    if compiled:
        assert {("mha.in_proj_weight", "grad_weight"), ("mha.out_proj", "grad_weight")} <= {
            (r.layer, r.gemm) for r in joint_log.all("randomized_vjp")}
    else:
        assert not joint_log.graphs
    _assert_attention_unbiased(samples, exact)


def test_attention_composes_with_decorrelation_eagerly():
    """Decorrelation observes out_proj's input inside the same composite: both modes see the
    ``linear``; R moves and the fused weight's gradient is still sketched without bias."""
    model, samples, exact = _attention_draws(False, effcompile.Decorrelation(input_layers=True, lr=1e-3, update_every=1))
    assert all(not torch.equal(samples[0][i], samples[1][i]) for i in range(2))
    states = [m for m in model.modules() if type(m).__name__ == "DecorrelationState"]
    assert states and all(int(state.updates) > 0 for state in states)


class _Unhandled(nn.Module):
    """A weight the captured graph multiplies (``x @ w``), called in a form the eager sketch does not
    take apart (``Tensor.__rmatmul__``, the weight first)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 10) / 4)

    def forward(self, x):
        return self.w.__rmatmul__(x).mean(1)


def test_eager_use_the_sketch_cannot_handle_raises_instead_of_exact_gradient():
    model, (x, y) = _Unhandled(), _batch()
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25), example_inputs=(x,))
    assert effcompile.report(model).row("w").action == Action.REWRITE
    with pytest.raises(RuntimeError, match="in a form the eager sketch handles"):
        F.cross_entropy(model(x), y).backward()
    model.eval()
    assert model(x).shape == (32, 10)  # inference is untouched
    with torch.no_grad():
        model.train()
        assert model(x).shape == (32, 10)


def test_weight_read_outside_the_forward_is_the_parameter():
    """get_parameter, logging ``.grad`` or weight decay by attribute read the weight outside the
    forward that uses it: they get the parameter, and the next forward still samples."""
    model, (x, y) = _Attention(), _batch()
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25), example_inputs=(x,))
    assert model.mha.out_proj.weight is model.get_parameter("mha.out_proj.weight")
    draws = []
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        draws.append(model.get_parameter("mha.in_proj_weight").grad.clone())
    assert not torch.equal(*draws)


class _InPlaceAfterTokens(nn.Module):
    """Swin-v2's position-bias MLP pattern: ``Linear → ReLU(inplace=True)`` on a 3-D activation
    (for such an input ``F.linear`` returns a view of its 2-D product)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):  # x: (batch, tokens, 16)
        return self.head(self.relu(self.fc(x))).mean(1)


@pytest.mark.parametrize("memory_mode", [False, True], ids=["sketch", "memory-mode"])
def test_an_in_place_op_after_an_eagerly_sketched_linear_on_tokens(memory_mode):
    torch.manual_seed(0)
    model, x, y = _InPlaceAfterTokens(), *_batch()
    reference = copy.deepcopy(model)
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.5, multiple=1, memory_mode=memory_mode),
                         example_inputs=(x,))
    torch.testing.assert_close(model(x), reference(x))  # the in-place ReLU ran on the sketched layer's output
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0))
    draws = []
    for _ in range(2):
        step(x, y)
        draws.append(model.fc.weight.grad.clone())
    assert not torch.equal(draws[0], draws[1]), "fc's weight gradient is sampled, not exact"
