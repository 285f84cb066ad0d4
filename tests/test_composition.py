"""All four passes composed in one model (issue 6 acceptance; no reference system composes them).

decorrelation (W·R on every layer) + randomized VJP (sketched backward of the fused weights) +
greedy stages (local losses, detached stages) + sample selection (each stage backpropagates a
weighted subset of its batch): the Plan holds every pass's decision per layer, and the model
trains with falling loss eagerly and through ``torch.compile(backend="effcompile")``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import effcompile
from effcompile.passes import GreedyStages, SampleSelection
from effcompile.harness.data import load_digits
from effcompile.models import get_model

PASS_NAMES = ["decorrelation", "randomized_vjp", "greedy_stages", "sample_selection"]
MODELS = {"cnn": {}, "resnet18_cifar": {"width": 8}}
# The CNN runs the composed joint graph through Inductor; the ResNet (residuals, BatchNorm) runs the same
# joint-graph rewrites with eager kernels: Inductor's codegen of its two stages cost ~100 s of CI per run.
BACKENDS = {"cnn": "effcompile", "resnet18_cifar": "effcompile_aot_eager"}


pytestmark = pytest.mark.usefixtures("single_thread")


def _composed(name: str, batch: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = get_model(name, num_classes=10, in_channels=1, image_size=8, **MODELS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skips are listed in the Plan, asserted below
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.01), effcompile.RandomizedVJP(keep=0.5),
                             GreedyStages(num_stages=2), SampleSelection(keep=0.5, strategy="loss"),
                             example_inputs=(batch,))
    return model


def _digits_batches(count: int, batch_size: int = 32):
    train, _, _ = load_digits()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=generator)
    for i in range(count):
        index = order[(i * batch_size) % (len(train) - batch_size):][:batch_size]
        yield torch.stack([train[j][0] for j in index]), torch.stack([train[j][1] for j in index])


def _train(model: nn.Module, steps: int, compile: bool, backend: str = "effcompile") -> list:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), optimizer, compile=compile, backend=backend)
    return [float(step(x, y)) for x, y in _digits_batches(steps)]


@pytest.mark.parametrize("name", list(MODELS))
def test_plan_shows_every_pass_for_every_layer(name):
    batch = next(_digits_batches(1))[0]
    model = _composed(name, batch)
    plan = effcompile.report(model)
    assert {row.pass_name for row in plan} == set(PASS_NAMES)
    layers = {row.layer for row in plan.for_pass("decorrelation")}
    for pass_name in ("randomized_vjp", "greedy_stages"):
        covered = {row.layer for row in plan.for_pass(pass_name)}
        assert layers <= covered, f"{pass_name} has no decision for {sorted(layers - covered)}"
    assert all(row.applied for row in plan.for_pass("decorrelation"))
    sketched = [row for row in plan.for_pass("randomized_vjp") if row.applied]
    assert sketched, "the randomized VJP composes with decorrelation (it sketches the fused weights)"
    assert all(row.reason for row in plan.skipped())  # every skip says why


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_all_four_passes_train_with_falling_loss_through_effcompile(name, joint_log):
    batch = next(_digits_batches(1))[0]
    model = _composed(name, batch)
    # 60 steps: with the sketch really applied to the selected rows of every stage (the classifier's
    # grad_W from 8 of 16 rows), the composed ResNet's loss only starts falling after ~40 steps.
    losses = _train(model, 60, compile=True, backend=BACKENDS[name])
    assert all(torch.isfinite(torch.tensor(losses)))
    # The returned loss is the last stage's per-sample mean over the whole batch (what it backpropagates is
    # the selected rows' weighted loss, step.stage_subset_losses).
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    # Every stage's compiled graph sketched its layers, on top of the row-sparse backward.
    assert joint_log.graphs and all(graph["randomized_vjp"].rewrites > 0 for graph in joint_log.graphs)
    assert any(int(state.updates) > 0 for state in
               [m for m in model.modules() if type(m).__name__ == "DecorrelationState"])
    # The selected stage losses reach the joint graph: some backward ran on the selected rows.
    assert any(record.kept_rows < record.rows for record in joint_log.last("row_sparse_backward"))


def test_all_four_passes_train_eagerly():
    batch = next(_digits_batches(1))[0]
    model = _composed("cnn", batch)
    losses = _train(model, 30, compile=False)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gradmatch_with_stages_matches_each_stages_own_head(compiled):
    """Every stage selects by gradient matching on its own last layer: the input of its aux head's
    final Linear (the model's head for the last stage) and its local loss's gradient at its logits;
    the stages train on their matched rows.  Stages first, selection in a later transform."""
    from effcompile.passes.sample_selection import selector_of

    batch = next(_digits_batches(1))[0]
    torch.manual_seed(0)
    model = get_model("cnn", num_classes=10, in_channels=1, image_size=8)
    effcompile.transform(model, GreedyStages(num_stages=2), example_inputs=(batch,))
    effcompile.transform(model, SampleSelection(keep=0.5, strategy="gradmatch", nnls_iterations=10),
                         example_inputs=(batch,))
    selector, seen = selector_of(model), []
    original = selector.select

    def spy(losses, features=None, errors=None, head_bias=None):
        seen.append((features.shape, errors.shape, head_bias))
        return original(losses, features=features, errors=errors, head_bias=head_bias)

    selector.select = spy
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                 compile=compiled, backend="effcompile_aot_eager")
    losses = [float(step(x, y)) for x, y in _digits_batches(20)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    aux_linear = [m for m in model.greedy_stage_heads[0].modules() if isinstance(m, nn.Linear)][-1]
    head_linear = [m for m in model.modules() if isinstance(m, nn.Linear)
                   and not any(m is h for h in model.greedy_stage_heads.modules())][-1]
    if not compiled:  # (a compiled step calls select while tracing only)
        assert seen[:2] == [((32, aux_linear.in_features), (32, 10), True),
                            ((32, head_linear.in_features), (32, 10), head_linear.bias is not None)]
    index, weights = selector.last_index, selector.last_weights
    assert index.shape == (16,) and (weights >= 0).all() and float(weights.sum()) > 0


def test_composed_model_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    import onnxruntime

    batch = next(_digits_batches(1))[0]
    model = _composed("cnn", batch)
    path = tmp_path / "composed.onnx"
    effcompile.export_onnx(model, (batch,), path)
    rows = effcompile.inspect_onnx(path)
    assert {row["layer"] for row in rows} == {row.layer for row in effcompile.report(model).for_pass("decorrelation")}
    session = onnxruntime.InferenceSession(str(path))
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    model.eval()
    torch.testing.assert_close(torch.from_numpy(onnx_out), model(batch).detach(), atol=1e-4, rtol=1e-4)
