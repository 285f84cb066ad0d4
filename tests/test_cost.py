"""The cost model (effcompile/cost.py) and the predicted step each pass shows in the Plan.

The products' multiply-adds are checked against torch's own FlopCounterMode over a real
forward+backward (the reference); the pass predictions against the formulas of each pass's
cost.py, and for the effect: sketching fewer rows or selecting fewer samples predicts a cheaper
step, and keep = 1 predicts no change.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import effcompile
from effcompile.api import plan_of
from effcompile.cost import COMPILED_OP_SHARE, MACS_PER_BYTE, OPTIMIZER_BYTES, StepWork, Work
from effcompile.models import example_inputs, get_model
from effcompile.passes import capture


def _plain_step(model: nn.Module, inputs, compiled: bool = False) -> StepWork:
    return capture(model, inputs).plain_step(model, compiled)


def _counted_macs(model: nn.Module, inputs) -> float:
    """Multiply-adds torch's FlopCounterMode counts over one forward and backward (attention in
    its math form: the counter has no formula for the CPU flash-attention kernel)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(*inputs).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("case", ["mlp", "cnn", "resnet18_cifar", "vit_tiny", "attention"])
def test_step_macs_match_torch_flop_counter(case):
    torch.manual_seed(0)
    if case == "mlp":
        model, inputs = _mlp(), (torch.randn(8, 20),)
    elif case == "attention":
        model, inputs = _Attention(), (torch.randn(2, 6, 32),)
    else:
        model, inputs = get_model(case, **({"width": 8} if case.startswith("resnet") else {})), example_inputs(case, 4)
    step = _plain_step(model, inputs)
    assert step.forward.macs + step.backward.macs == pytest.approx(_counted_macs(model, inputs), rel=1e-6)


def test_mlp_step_counted_by_hand():
    step = _plain_step(_mlp(), (torch.randn(8, 20),))
    assert step.forward.macs == 8 * 20 * 30 + 8 * 30 * 5
    # The first layer reads the model input: its weight gradient only; the second both gradients.
    assert step.backward.macs == 8 * 20 * 30 + 2 * 8 * 30 * 5
    assert step.layers["0"].forward.macs == 8 * 20 * 30 and step.layers["2"].input_numel == 8 * 30
    assert step.forward.bytes == 2 * 8 * 30 * 4  # the ReLU reads and writes 8x30 fp32
    assert step.optimizer.bytes == OPTIMIZER_BYTES * 4 * (20 * 30 + 30 + 30 * 5 + 5)
    assert step.ratio(Work()) == 1.0
    assert step.ratio(Work(bytes=1000)) == pytest.approx(1 + MACS_PER_BYTE * 1000 / step.total.units)


class _Chain(nn.Module):
    """Two layers with an elementwise chain between them (through a view) and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(20, 30), nn.Linear(30, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        chained = torch.relu((h * 2).reshape(8, 3, 10) + 1).reshape(8, 30)
        return self.b(chained + h)


def test_compiled_step_counts_a_fused_chain_once():
    model, inputs = _Chain(), (torch.randn(8, 20),)
    captured = capture(model, inputs)
    eager, compiled = captured.plain_step(model), captured.plain_step(model, compiled=True)
    hidden = 8 * 30 * 4  # one fp32 8x30 tensor
    # Eager: mul, add and relu each read and write it, the residual add reads two and writes one.
    assert eager.forward.bytes == 3 * 2 * hidden + 3 * hidden
    # Compiled: one kernel reads h once (two uses, one read) and writes what the second layer reads.
    assert compiled.forward.bytes == 2 * hidden
    assert compiled.forward.macs == eager.forward.macs and compiled.backward.macs == eager.backward.macs
    assert compiled.forward.ops == pytest.approx((2 + 1) * COMPILED_OP_SHARE)  # two GEMMs, one kernel
    assert compiled.compiled and not eager.compiled
    assert compiled.optimizer == eager.optimizer  # the optimizer step is not compiled
    assert captured.plain_step(model, compiled=True) is compiled  # counted once per capture


def test_frozen_layers_have_no_weight_gradient_work():
    model = _mlp()
    model[0].requires_grad_(False)
    step = _plain_step(model, (torch.randn(8, 20),))
    assert step.backward.macs == 8 * 30 * 5  # the second weight's gradient; nothing before it trains
    assert step.optimizer.bytes == OPTIMIZER_BYTES * 4 * (30 * 5 + 5)


# ------------------------------------------------------------------------------ the passes' predictions
def _wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(768, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


_WIDE_INPUTS = (torch.randn(128, 3, 16, 16),)


def _predicted(*configs) -> float:
    torch.manual_seed(0)
    model = effcompile.transform(_wide_mlp(), *configs, example_inputs=_WIDE_INPUTS)
    ratios = {row.details["predicted_step"] for row in plan_of(model).applied()}
    assert len(ratios) == len(configs), "every applied row of a pass shows its pass's one prediction"
    return effcompile.predicted_step(model)


def test_randomized_vjp_prediction_falls_with_keep():
    keeps = [_predicted(effcompile.RandomizedVJP(keep=keep)) for keep in (0.125, 0.25, 0.5)]
    assert keeps[0] < keeps[1] < keeps[2]
    assert _predicted(effcompile.RandomizedVJP(keep=0.25, estimator="uniform", center=False)) < keeps[1]
    assert _predicted(effcompile.RandomizedVJP(keep=1.0)) == 1.0  # nothing sampled: nothing changes


def test_randomized_vjp_predicts_a_saving_where_the_weight_gradients_dominate():
    # The 1024-wide MLP of benchmarks/cost_model.py (eager keep 0.25 measured 0.91x, 2-core Intel Xeon).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3072, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25), example_inputs=(torch.randn(256, 3072),))
    assert effcompile.predicted_step(model) < 0.9


def test_randomized_vjp_prediction_of_a_small_layer_is_a_cost():
    torch.manual_seed(0)
    model = effcompile.transform(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)),
                                 effcompile.RandomizedVJP(keep=0.5, multiple=1), example_inputs=(torch.randn(16, 16),))
    assert effcompile.predicted_step(model) > 1.0  # its fixed eager cost outweighs the saved multiply-adds


def test_sample_selection_reforward_prediction_is_the_formula():
    step = _plain_step(_wide_mlp(), _WIDE_INPUTS)
    from effcompile.passes.sample_selection.cost import SELECT_OPS

    predictions = []
    for keep in (0.25, 0.5):
        predicted = _predicted(effcompile.SampleSelection(keep=keep, mode="reforward", strategy="random"))
        rows_forward, rows_backward = (Work(macs=w.macs, bytes=w.bytes) for w in (step.forward, step.backward))
        change = keep * rows_forward + Work(ops=step.forward.ops + SELECT_OPS) - (1 - keep) * rows_backward
        assert predicted == pytest.approx(step.ratio(change), abs=1e-3)
        predictions.append(predicted)
    assert predictions[0] < 1.0 and predictions[0] < predictions[1]
    # Forward reuse saves only where the effcompile backend shrinks the backward: eagerly a cost.
    assert _predicted(effcompile.SampleSelection(keep=0.25, mode="forward_reuse", strategy="random")) > 1.0


def test_decorrelation_prediction_sums_its_layers_work():
    torch.manual_seed(0)
    model = effcompile.transform(_wide_mlp(), effcompile.Decorrelation(max_overhead=None),
                                 example_inputs=_WIDE_INPUTS)
    rows = plan_of(model).applied()
    step = _plain_step(_wide_mlp(), _WIDE_INPUTS)
    own = sum((row.spec.cost.work for row in rows), Work())
    assert own.macs > 0 and rows[0].details["predicted_step"] == pytest.approx(step.ratio(own), abs=1e-3)
    # Compiled: the same products and traffic, each op a kernel call, against the fused plain step
    # (every layer updates every step here, so masking the update between updates costs nothing).
    assert all(row.spec.update_every == 1 for row in rows)
    compiled = _plain_step(_wide_mlp(), _WIDE_INPUTS, compiled=True)
    calls = Work(own.macs, own.bytes, own.ops * COMPILED_OP_SHARE)
    assert rows[0].details["predicted_step_compiled"] == pytest.approx(compiled.ratio(calls), abs=1e-3)
    assert effcompile.predicted_step(model, compiled=True) == rows[0].details["predicted_step_compiled"]
    cheaper = _predicted(effcompile.Decorrelation(update_every=8, max_overhead=None))
    assert 1.0 < cheaper < rows[0].details["predicted_step"]


def test_composed_prediction_adds_the_passes_changes():
    alone = [_predicted(effcompile.RandomizedVJP(keep=0.25)), _predicted(effcompile.Decorrelation())]
    composed = _predicted(effcompile.Decorrelation(), effcompile.RandomizedVJP(keep=0.25))
    assert composed == pytest.approx(1 + sum(ratio - 1 for ratio in alone), abs=0.02)


def test_greedy_stages_prediction_adds_the_aux_heads():
    from effcompile.passes.greedy_stages.cost import HEAD_OPS, STAGE_OPS

    torch.manual_seed(0)
    model = effcompile.transform(_wide_mlp(), effcompile.GreedyStages(num_stages=3, min_stage_share=0),
                                 example_inputs=_WIDE_INPUTS)
    rows = plan_of(model).applied()
    head_flops = next(row.spec for row in rows if row.spec is not None).head_flops
    assert len(head_flops) == 3 and head_flops[-1] == 0 and all(head_flops[:2])
    step = _plain_step(_wide_mlp(), _WIDE_INPUTS)
    change = Work(macs=sum(head_flops) / 2, ops=2 * HEAD_OPS + 3 * STAGE_OPS)
    predicted = effcompile.predicted_step(model)
    assert predicted == pytest.approx(step.ratio(change), abs=1e-3) and predicted > 1.0
