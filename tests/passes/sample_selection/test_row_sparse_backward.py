"""Specification of the row-sparse backward (passes/row_sparse_backward.py).

A loss over the selected rows of a batch (``select_rows``) has a backward that is zero outside
those rows.  The joint-graph pass must (1) compute exactly the same gradients as eager autograd,
(2) actually run the backward GEMMs on the selected rows only, and (3) stop — still exactly —
at ops that couple rows (BatchNorm).
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effcompile.models import get_model
from effcompile.passes.sample_selection import row_sparse_backward
from effcompile.passes.joint import recording
from effcompile.passes.sample_selection.row_sparse_backward import rewrite_row_sparse_backward, select_rows

BATCH, KEPT = 8, 3

ZOO: Dict[str, Dict[str, Any]] = {
    "mlp": {},
    "cnn": {},
    "vit_tiny": {"embed_dim": 16, "depth": 2, "num_heads": 2},
    "resnet18_cifar": {"width": 4},
    "bagnet": {"blocks": (1, 1, 1, 1)},
}


pytestmark = pytest.mark.usefixtures("single_thread")


def _model_and_batch(name: str):
    from effcompile.models import example_inputs

    torch.manual_seed(0)
    model = get_model(name, **ZOO[name])
    (x,) = example_inputs(name, batch_size=BATCH)
    return model, x, torch.randint(0, 10, (BATCH,))


def _selected_loss(model: nn.Module):
    def loss(x, y, index, weights):
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        return (select_rows(per_sample, index) * weights).sum()

    return loss


def _plain_selected_loss(model, x, y, index, weights):
    """The reference, written plainly: weighted sum of the selected samples' losses."""
    per_sample = torch.stack([F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) for i in range(len(y))]) \
        if not _has_batch_norm(model) else F.cross_entropy(model(x), y, reduction="none")
    return sum(w * per_sample[i] for i, w in zip(index.tolist(), weights))


def _has_batch_norm(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _gradients(loss_fn, model, *args):
    return torch.autograd.grad(loss_fn(*args), [p for p in model.parameters()])


SELECTION = (torch.tensor([1, 5, 6]), torch.tensor([0.2, 0.5, 0.3]))


@pytest.mark.parametrize("name", list(ZOO))
def test_compiled_gradients_equal_eager_autograd(name):
    model, x, y = _model_and_batch(name)
    index, weights = SELECTION
    expected = _gradients(lambda *a: _plain_selected_loss(model, *a), model, x, y, index, weights)
    compiled = torch.compile(_selected_loss(model), backend="effcompile_aot_eager")
    got = _gradients(compiled, model, x, y, index, weights)
    for (path, _), want, have in zip(model.named_parameters(), expected, got):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}.{path}: {m}")


def _rewritten_joint_graph(model, x, y):
    """Compile one step and keep the records of the row-sparse rewrite."""
    torch.compiler.reset()
    compiled = torch.compile(_selected_loss(model), backend="effcompile_aot_eager")
    with recording() as log:
        compiled(x, y, *SELECTION).backward()
    return [record for results in log for record in results["row_sparse_backward"].records]


@pytest.mark.parametrize("name", ["mlp", "vit_tiny"])
def test_every_weight_gemm_runs_on_the_selected_rows(name):
    model, x, y = _model_and_batch(name)
    _assert_every_gemm_on_the_kept_rows(model, _rewritten_joint_graph(model, x, y))


@pytest.mark.slow
def test_inductor_runs_attention_blocks_on_the_selected_rows():
    """Inductor's decompositions write the packed q/k/v gradients' stack as cat + view: the
    propagation stopped there, so every block below the last ran its backward at full size (a
    ViT's compiled forward-reuse step measured 0.90x backprop at keep 0.25; 0.55x since).  One
    compile: every weight GEMM runs on the kept rows, and the gradients equal eager autograd's."""
    from effcompile.models import example_inputs

    torch.manual_seed(0)
    model = get_model("vit_tiny", embed_dim=16, depth=1, num_heads=2)
    (x,) = example_inputs("vit_tiny", batch_size=BATCH)
    y = torch.randint(0, 10, (BATCH,))
    expected = _gradients(_selected_loss(model), model, x, y, *SELECTION)
    torch.compiler.reset()
    with recording() as log:
        got = _gradients(torch.compile(_selected_loss(model), backend="effcompile"), model, x, y, *SELECTION)
    _assert_every_gemm_on_the_kept_rows(model, [r for results in log for r in results["row_sparse_backward"].records])
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4)


def _assert_every_gemm_on_the_kept_rows(model, records):
    gemms = [r for r in records if r.op == "aten.mm.default"]
    # Two GEMMs (input and weight gradient) per linear layer, minus the first layer's input gradient.
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(gemms) >= 2 * len(linears) - 1
    for record in gemms:  # rows = samples x tokens per sample (1 for the MLP and the ViT head)
        tokens = record.rows // BATCH
        assert record.rows == BATCH * tokens and record.kept_rows == KEPT * tokens


def test_batch_norm_stops_the_propagation_but_stays_exact():
    model, x, y = _model_and_batch("cnn")
    records = _rewritten_joint_graph(model, x, y)
    ops = {r.op for r in records}
    assert "aten.mm.default" in ops  # the classifier after the last BatchNorm runs on the selected rows
    assert "aten.convolution_backward.default" not in ops  # BatchNorm couples rows: the convs stay full


def _joint_graph_with_selection():
    """The joint graph of a small MLP with a selected loss, before any effcompile pass."""
    from effcompile._compat import aot_eager_with_partition

    captured = {}

    def keep(partition):
        def partition_fn(joint, inputs, **kwargs):
            captured["graph"] = joint
            return partition(joint, inputs, **kwargs)
        return partition_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
    torch._dynamo.reset()
    loss = torch.compile(_selected_loss(model), backend=aot_eager_with_partition(keep))
    loss(torch.randn(BATCH, 6), torch.randint(0, 4, (BATCH,)), *SELECTION).backward()
    return captured["graph"]


def test_rewrite_is_idempotent_and_removes_the_marker():
    joint = _joint_graph_with_selection()
    first = rewrite_row_sparse_backward(joint.graph)
    assert first and not any(n.target is row_sparse_backward.SCATTER for n in joint.graph.nodes)
    before = str(joint.graph)
    assert rewrite_row_sparse_backward(joint.graph) == []
    assert str(joint.graph) == before


def test_inductor_path_gradients_equal_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4))
    x, y = torch.randn(BATCH, 6), torch.randint(0, 4, (BATCH,))
    expected = _gradients(_selected_loss(model), model, x, y, *SELECTION)
    torch._dynamo.reset()
    got = _gradients(torch.compile(_selected_loss(model), backend="effcompile"), model, x, y, *SELECTION)
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4)


def test_repeated_indices_add_up_like_autograd():
    values = torch.randn(5, 3, requires_grad=True)
    index = torch.tensor([2, 2, 0])
    (select_rows(values, index) * torch.arange(1.0, 4.0)[:, None]).sum().backward()
    expected = torch.zeros(5, 3)
    expected[2] = 1 + 2
    expected[0] = 3
    torch.testing.assert_close(values.grad, expected)


def test_scatter_rows_op_passes_opcheck_and_rejects_bad_indices():
    torch.library.opcheck(torch.ops.effcompile.scatter_rows.default, (torch.randn(2, 3), torch.tensor([4, 1]), 6))
    with pytest.raises(ValueError, match="1-D int64 index"):
        select_rows(torch.randn(4), torch.tensor([0.0, 1.0]))


class _ChannelsLikeTheBatch(nn.Module):
    """Conv1d with as many output channels as the batch has rows, and a LayerNorm of that width:
    their weights' first dimension equals the batch size, and must not be gathered with the rows."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, BATCH, 3, padding=1)
        self.norm = nn.LayerNorm(BATCH)
        self.head = nn.Linear(BATCH, 10)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.conv(x)).mean(2)))


def test_parameters_shaped_like_the_batch_are_not_gathered():
    torch.manual_seed(0)
    model, x, y = _ChannelsLikeTheBatch(), torch.randn(BATCH, 4, 6), torch.randint(0, 10, (BATCH,))
    index, weights = SELECTION
    expected = _gradients(lambda *a: _plain_selected_loss(model, *a), model, x, y, index, weights)
    records = _rewritten_joint_graph(model, x, y)
    assert {"aten.convolution_backward.default", "aten.native_layer_norm_backward.default"} <= {r.op for r in records}
    compiled = torch.compile(_selected_loss(model), backend="effcompile_aot_eager")
    got = _gradients(compiled, model, x, y, index, weights)
    for (path, _), want, have in zip(model.named_parameters(), expected, got):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{path}: {m}")


class _EndsInSort(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(x).sort(1).values  # a backward op the row-sparse rewrite does not know


def test_a_graph_where_nothing_runs_on_the_selected_rows_warns():
    torch.manual_seed(0)
    model, x, y = _EndsInSort(), torch.randn(BATCH, 6), torch.randint(0, 10, (BATCH,))
    compiled = torch.compile(_selected_loss(model), backend="effcompile_aot_eager")
    with pytest.warns(UserWarning, match="forward reuse saves nothing here"):
        compiled(x, y, *SELECTION).backward()


def test_relu_masks_are_recomputed_from_the_saved_rows_not_saved_as_bool():
    """Inductor writes ReLU's backward as ``where(le(Y, 0), 0, g)``.  Gathering the full-batch mask
    ``le(Y, 0)`` made the partitioner save a bool mask of the kept rows beside the float rows of
    ``Y`` it saves for the next weight gradient; the mask is now recomputed from those rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))
    x, y = torch.randn(BATCH, 6), torch.randint(0, 4, (BATCH,))
    index, weights = SELECTION
    expected = _gradients(lambda *a: _plain_selected_loss(model, *a), model, x, y, index, weights)
    torch.compiler.reset()
    compiled = torch.compile(_selected_loss(model), backend="effcompile")
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = compiled(x, y, index, weights)
    got = torch.autograd.grad(loss, list(model.parameters()))
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4)
    assert (torch.float32, (KEPT, 12)) in saved  # the kept rows of the hidden activations
    assert not [shape for dtype, shape in saved if dtype == torch.bool and shape[:1] == (KEPT,)], saved


class _SplitWithAMixedHalf(nn.Module):
    """One projection split in two; the second half is averaged over the batch, so the backward
    concatenates a row-sparse gradient with one that is not (GPT-2's fused qkv under Inductor)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        own, shared = self.fc(x).chunk(2, dim=-1)
        return self.head(torch.tanh(own) + shared.mean(0, keepdim=True))


def test_a_cat_of_row_sparse_and_dense_gradients_stays_dense_and_exact():
    torch.manual_seed(0)
    model, x, y = _SplitWithAMixedHalf(), torch.randn(BATCH, 6), torch.randint(0, 10, (BATCH,))
    index, weights = SELECTION
    expected = _gradients(_selected_loss(model), model, x, y, index, weights)
    records = _rewritten_joint_graph(model, x, y)  # raised KeyError before the cat was checked first
    assert any(r.op == "aten.mm.default" for r in records)  # the head still runs on the selected rows
    compiled = torch.compile(_selected_loss(model), backend="effcompile_aot_eager")
    got = _gradients(compiled, model, x, y, index, weights)
    for (path, _), want, have in zip(model.named_parameters(), expected, got):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{path}: {m}")
