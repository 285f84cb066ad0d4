"""The step benchmarks a GPU lease runs (benchmarks/decorrelation.py, benchmarks/randomized_vjp.py),
at toy size on the CPU under the same options: bf16 autocast, several estimator arms."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import decorrelation as decorrelation_bench
from benchmarks import randomized_vjp as randomized_vjp_bench


def test_the_reference_decorrelation_updates_R_from_inputs_saved_under_bf16_autocast():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    reference = decorrelation_bench.ReferenceDecorrelation(conv, lr=0.1, kappa=0.5, fraction=0.5)
    inputs = (torch.randn(8, 3, 6, 6) * 2 + 1).bfloat16()  # inside a network: the previous layer's bf16 output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reference(inputs)
    assert out.dtype == torch.bfloat16
    reference.update()
    assert reference.matrix.dtype == torch.float32 and bool(reference.matrix.isfinite().all())
    assert not torch.allclose(reference.matrix, torch.eye(27))


def test_decorrelation_step_benchmark_runs_every_variant_under_autocast():
    result = decorrelation_bench.bench_step(width=8, batch_size=16, budgets=("auto",), rounds=1, steps_per_round=1,
                                            autocast="bf16", device="cpu")
    assert [row["variant"] for row in result["variants"]] == ["backprop", "reference", "effcompile max_overhead=auto"]
    assert result["autocast"] == "bf16" and result["device"] == "cpu"
    assert all(row["step_s"] > 0 for row in result["variants"])
    assert result["variants"][2]["predicted_overhead"]  # the Plan's prediction rides along


def test_randomized_vjp_step_benchmark_has_one_arm_per_estimator_against_one_exact_arm():
    result = randomized_vjp_bench.bench_step_times("mlp", {}, 32, (0.25,), steps=2, warmup=1, compile=False,
                                                   estimators=("importance", "uniform"), autocast="bf16")
    rows = result["rows"]
    assert [(row["keep"], row["estimator"]) for row in rows] == [(0.25, "importance"), (0.25, "uniform")]
    assert rows[0]["exact_step_ms"] == rows[1]["exact_step_ms"]  # the same exact arm
    assert all(row["sketched_step_ms"] > 0 and row["step_ratio"] > 0 for row in rows)


def test_randomized_vjp_step_benchmark_arm_flags_reach_the_config():
    arm = randomized_vjp_bench._arm_config("uniform+profitable_only", 0.25)
    assert (arm.estimator, arm.profitable_only, arm.keep) == ("uniform", True, 0.25)
    assert randomized_vjp_bench._arm_config("importance", 0.5).profitable_only is False
    with pytest.raises(ValueError, match="unknown arm flag"):
        randomized_vjp_bench._arm_config("importance+fast", 0.25)


def test_decorrelation_step_benchmark_has_one_variant_per_update_dtype():
    result = decorrelation_bench.bench_step(width=8, batch_size=16, budgets=("none",), rounds=1, steps_per_round=1,
                                            update_dtypes=("bfloat16", "float32"))
    variants = {row["variant"]: row for row in result["variants"]}
    assert set(variants) == {"backprop", "reference", "effcompile max_overhead=none bfloat16",
                             "effcompile max_overhead=none float32"}
    # Each variant reports the dtype its layers' updates resolved to (the report's update_dtype).
    assert variants["effcompile max_overhead=none bfloat16"]["update_dtypes"] == ["bfloat16"]
    assert variants["effcompile max_overhead=none float32"]["update_dtypes"] == ["float32"]
    assert isinstance(result["native_bf16_matmul"], bool)


def test_eager_scope_benchmark_sketches_the_attention_through_the_mode():
    result = randomized_vjp_bench.bench_eager_scope(batch_size=4, tokens=4, width=16, heads=2, depth=1, steps=2,
                                                    warmup=1)
    assert [row["arm"] for row in result["rows"]] == ["exact", "keep1", "keep0.25"]
    assert result["scoped_layers"] == ["encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0.self_attn.out_proj"]
    assert all(row["step_ms"] > 0 for row in result["rows"])


def test_architecture_survey_row_records_losses_and_the_plan():
    pytest.importorskip("transformers")
    from benchmarks import architectures

    build, batch, loss_fn = architectures._architectures()["bart"]
    row = architectures.survey_one(build, batch, loss_fn, "gradmatch", compile=False)
    assert "error" not in row, row
    assert len(row["losses"]) == 7 and row["applied"] > 0 and not row["skipped"]
