"""The randomized VJP on every dense weight layout users write, not only ``nn.Linear``.

``x @ self.p`` with ``p`` stored in×out, GPT-2's ``Conv1D`` (``addmm(b, x.view(-1, nx), W)`` with
``W`` in×out), ``x @ self.q.t()`` (out×in) and ``F.linear`` in a custom module: each weight's
grad_weight GEMM is sampled in the compiled joint graph (records per layer), draws differ, and the
mean of the draws is the exact gradient.  Before, the first three were skipped ("only linear and
conv layers have a sketched backward").
"""

import contextlib

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


def _draws(config, dtype=None, *more_configs):
    model = _model()
    x, y = _batch()
    effcompile.transform(model, config, *more_configs, example_inputs=(x,))
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0),
                                 compile=True, backend="effcompile_aot_eager")
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
def test_other_estimators_and_grad_input_on_every_layout(config, gemms, joint_log):
    _, samples, exact = _draws(config)
    assert {(r.layer, r.gemm) for r in joint_log.all("randomized_vjp")} == gemms
    _assert_unbiased(samples, exact, None)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))


def test_attention_out_proj_is_sketched_compiled_and_never_silently_exact_eager(joint_log):
    """MHA reads ``out_proj.weight`` in its own forward and never calls ``out_proj``: an eager
    sketched nn.Linear forward would never run.  The Plan says compiled only, eager training raises,
    compiled training samples it."""
    torch.manual_seed(0)
    model, (x, y) = _Attention(), _batch()
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25), example_inputs=(x,))
    rows = {row.layer: row for row in effcompile.report(model)}
    assert rows["mha.out_proj"].action == Action.REWRITE and rows["mha.out_proj"].details["eager"] == "compiled only"
    assert rows["head"].details["eager"] == "yes"
    with pytest.raises(RuntimeError, match="compiled training"):
        F.cross_entropy(model(x), y).backward()
    F.cross_entropy(torch.compile(model, backend="effcompile_aot_eager")(x), y).backward()
    assert ("mha.out_proj", "grad_weight") in {(r.layer, r.gemm) for r in joint_log.all("randomized_vjp")}


def test_every_layout_samples_the_rows_selection_kept(joint_log):
    """Composed with sample selection (forward reuse): the row-sparse backward gathers the selected
    rows first (for in×out weights as columns of t(X)), the sketch then samples those rows."""
    selection = effcompile.SampleSelection(keep=0.5, strategy="random")  # weighted 1/k: unbiased for the batch
    _, samples, exact = _draws(effcompile.RandomizedVJP(keep=0.5, multiple=1), None, selection)
    records = joint_log.all("randomized_vjp")
    assert {(r.layer, r.gemm) for r in records} == {(layer, "grad_weight") for layer in ("p", "c_fc", "q", "w")}
    assert all(r.n == 64 and r.k == 32 for r in records), records  # 16 of 32 samples × 4 tokens, then half
    assert sum(graph["row_sparse_backward"].rewrites for graph in joint_log.graphs) > 0
    _assert_unbiased(samples, exact, None)
