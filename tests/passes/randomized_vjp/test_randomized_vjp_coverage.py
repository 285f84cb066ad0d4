"""Never silently exact: the randomized VJP is really applied in every case users meet, or fails loudly.

Each case trains through ``effcompile.train_step(compile=True)`` (SGD with lr 0, so the weights stay
put and every step draws a fresh gradient of the same batch) and requires: the joint pass rewrote
the backward GEMMs of every compiled graph, two draws differ, and the mean of the draws is the
exact gradient (a z-test).  Before this file the bf16/fp16, batch-change and ``dynamic=True`` cases
trained with exact gradients without a word.
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.passes.randomized_vjp import joint_rewrite

pytestmark = pytest.mark.usefixtures("single_thread")
DRAWS = 60
LAYER_SIZES = (64 * 32, 64 * 64, 10 * 64)  # the three weights, in _gradient's order


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _batch(rows, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 32, generator=generator), torch.randint(0, 10, (rows,), generator=generator)


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _gradient(model):
    return torch.cat([model[i].weight.grad.flatten().float() for i in (0, 2, 4)])


def _exact(x, y, dtype):
    model = _mlp()
    with _autocast(dtype):
        F.cross_entropy(model(x), y).backward()
    return _gradient(model)


def _assert_unbiased(samples, exact, dtype):
    """Per layer: ``‖mean − exact‖²`` against its expectation for an unbiased estimator, ``tr(Cov)/N``.

    Over thousands of coordinates the ratio concentrates near 1 (heavy-tailed importance weights
    make per-coordinate z-tests fragile; the sum is not); a bias adds ``‖bias‖²``, which does not
    shrink with N.  Low-precision runs may differ from the autocast reference by rounding only.
    """
    for layer, (draws, reference) in enumerate(zip(samples.split(LAYER_SIZES, 1), exact.split(LAYER_SIZES))):
        error = float((draws.mean(0) - reference).pow(2).sum())
        expected = float(draws.var(0).sum()) / draws.shape[0]
        rounding = 0.0 if dtype is None else float((2e-2 * reference.norm()) ** 2)
        assert error <= 2.5 * expected + rounding + 1e-12, (layer, error, expected)


CASES = {
    "fp32": dict(),
    "bf16_autocast": dict(dtype=torch.bfloat16),
    "fp16_autocast": dict(dtype=torch.float16),
    "batch_change": dict(batches=(64, 40, 64)),
    "dynamic": dict(dynamic=True, batches=(48, 64)),
    "with_selection": dict(selection=True),
    "with_selection_batch_change": dict(selection=True, batches=(64, 40, 64)),
    "bf16_batch_change": dict(dtype=torch.bfloat16, batches=(64, 40, 64)),
}


def _run(joint_log, backend, dtype=None, batches=(64,), dynamic=None, selection=False):
    model = _mlp()
    configs = [effcompile.RandomizedVJP(keep=0.25)]
    if selection:  # random subsets weighted 1/k: the composed estimate stays unbiased for the batch gradient
        configs.append(effcompile.SampleSelection(keep=0.5, strategy="random"))
    effcompile.transform(model, *configs, example_inputs=(_batch(64)[0],))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    if dynamic is None:
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), optimizer, compile=True, backend=backend)
    else:  # the user's own loop around torch.compile(dynamic=True)
        forward = torch.compile(model, backend=backend, dynamic=dynamic)

        def step(x, y):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(forward(x), y).backward()

    for rows in batches[:-1]:
        with _autocast(dtype):
            step(*_batch(rows, seed=rows))
    x, y = _batch(batches[-1])
    samples = []
    for _ in range(DRAWS):
        with _autocast(dtype):
            step(x, y)
        samples.append(_gradient(model))
    return torch.stack(samples), _exact(x, y, dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_every_case_samples_and_stays_unbiased(case, joint_log):
    samples, exact = _run(joint_log, "effcompile_aot_eager", **CASES[case])
    counts = [results["randomized_vjp"].rewrites for results in joint_log.graphs]
    assert counts and all(count == 3 for count in counts), counts  # every compiled graph, every layer
    assert not torch.equal(samples[0], samples[1])
    _assert_unbiased(samples, exact, CASES[case].get("dtype"))


def test_a_changed_batch_is_sampled_at_its_own_size(joint_log):
    """After the batch changes Dynamo compiles one symbolic graph; k = ⌈keep·n⌉ is computed from the size."""
    _run(joint_log, "effcompile_aot_eager", batches=(64, 40, 64))
    symbolic = [record for record in joint_log.graphs[-1]["randomized_vjp"].records]
    assert {record.gemm for record in symbolic} == {"grad_weight"}
    assert all(isinstance(record.n, str) and isinstance(record.k, str) for record in symbolic), symbolic


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bf16_batch_change", "with_selection_batch_change"])
def test_inductor_samples_under_autocast_and_batch_changes(case, joint_log):
    samples, exact = _run(joint_log, "effcompile", **CASES[case])
    assert joint_log.graphs and all(results["randomized_vjp"].rewrites == 3 for results in joint_log.graphs)
    _assert_unbiased(samples, exact, CASES[case].get("dtype"))


def test_eager_sketch_under_autocast_is_unbiased():
    model = _mlp()
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25, target="both"), example_inputs=(_batch(64)[0],))
    x, y = _batch(64)
    samples = []
    for _ in range(DRAWS):
        model.zero_grad(set_to_none=True)
        with _autocast(torch.bfloat16):
            F.cross_entropy(model(x), y).backward()
        samples.append(_gradient(model))
    samples = torch.stack(samples)
    assert not torch.equal(samples[0], samples[1])
    _assert_unbiased(samples, _exact(x, y, torch.bfloat16), torch.bfloat16)


def test_a_planned_layer_without_a_rewritable_backward_fails_loudly(monkeypatch):
    """If the matcher finds no weight-gradient GEMM for a marked layer, compilation raises (no silent exact)."""
    monkeypatch.setattr(joint_rewrite, "_weight_gradient_mms", lambda layer_input, sources: [])
    model = _mlp()
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25), example_inputs=(_batch(64)[0],))
    x, y = _batch(64)
    with pytest.raises(Exception, match="planned to sample its grad_weight.*silently train with exact"):
        F.cross_entropy(torch.compile(model, backend="effcompile_aot_eager")(x), y).backward()


def test_a_budget_that_rounds_up_to_every_row_is_a_plan_reason_and_a_warning():
    model = _mlp()
    with pytest.warns(UserWarning, match="rounds up to all 64 with multiple=64"):
        effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25, multiple=64), example_inputs=(_batch(64)[0],))
    row = effcompile.report(model).row("0")
    assert "exact at this batch size" in row.reason and row.details["k_rows"] == "64/64"
    with warnings.catch_warnings(record=True) as caught:  # and the compiled graph says so again
        warnings.simplefilter("always")
        F.cross_entropy(torch.compile(model, backend="effcompile_aot_eager")(_batch(64)[0]), _batch(64)[1]).backward()
    assert any("stays exact in this compiled graph" in str(w.message) for w in caught)


class _TransposedReads(nn.Module):
    """Weights read as ``x @ W.T`` (Falcon's FalconLinear: aten.numpy_T) and ``x @ W.mT``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(x @ self.a.weight.T + self.a.bias)
        h = torch.relu(h @ self.b.weight.mT + self.b.bias)
        return self.c(h)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_a_weight_read_through_its_transpose_is_sketched_and_unbiased(compiled, joint_log):
    """``W.T`` and ``W.mT`` keep the weight's identity (before: both layers were skipped, "reaches
    matmul through numpy_T"): planned, sampled draw to draw, and unbiased."""
    torch.manual_seed(0)
    model = _TransposedReads()
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25), example_inputs=(_batch(64)[0],))
    assert {row.layer for row in effcompile.report(model).for_pass("randomized_vjp").applied()} == {"a", "b", "c"}
    exact_model = _TransposedReads()
    exact_model.load_state_dict(model.state_dict())
    x, y = _batch(64)
    F.cross_entropy(exact_model(x), y).backward()
    exact = torch.cat([getattr(exact_model, name).weight.grad.flatten() for name in "abc"])
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0),
                                 compile=compiled, backend="effcompile_aot_eager")
    samples = []
    for _ in range(DRAWS):
        step(x, y)
        samples.append(torch.cat([getattr(model, name)._parameters["weight"].grad.flatten() for name in "abc"]))
    samples = torch.stack(samples)
    assert not torch.equal(samples[0], samples[1])
    _assert_unbiased(samples, exact, None)
    if compiled:
        assert all(graph["randomized_vjp"].rewrites > 0 for graph in joint_log.graphs)
