"""Specification of the aux heads (effcompile/aux_heads.py) and of the GreedyStages config."""

import math

import pytest
import torch
import torch.nn as nn

from effcompile.passes.greedy_stages.aux_heads import (LinearHead, MLPHead, MLPSRHead, PoolMLPHead, head_kind_for, make_aux_head,
                                                      make_output_head, output_head_kind)
from effcompile.passes.greedy_stages.block_stack import block_layout
from effcompile.config import config_from_dict
from effcompile.passes import GreedyStages
from effcompile.passes.greedy_stages.cut_search import count_flops


@pytest.mark.parametrize("shape, kind, cls", [
    ((3, 16, 8, 8), "mlp_sr", MLPSRHead),
    ((3, 7, 12), "pool_mlp", PoolMLPHead),
    ((3, 20), "mlp", MLPHead),
])
def test_auto_head_matches_boundary_rank_and_outputs_logits(shape, kind, cls):
    assert head_kind_for(shape) == kind
    head = make_aux_head(shape, num_classes=5)
    assert isinstance(head, cls)
    out = head(torch.randn(shape))
    assert out.shape == (3, 5)
    out.sum().backward()  # every head parameter is trained by the local loss
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("shape", [(2, 8, 8, 8), (2, 6, 10), (2, 9)])
@pytest.mark.parametrize("kind", ["pool_mlp", "mlp", "linear"])
def test_every_explicit_kind_works_on_every_rank(shape, kind):
    head = make_aux_head(shape, num_classes=4, kind=kind)
    assert head(torch.randn(shape)).shape == (2, 4)


def test_mlp_sr_structure_follows_dgl():
    # 16x16 map, C=8: pool to 4x4, three 1x1 conv+BN+ReLU of width C, pool to 2x2, MLP 4C wide.
    head = MLPSRHead(8, (16, 16), num_classes=10)
    assert head.reduce.output_size == (4, 4)
    convs = [m for m in head.body if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(c.kernel_size == (1, 1) and c.out_channels == 8 for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in head.body) == 3
    assert head.pool.output_size == (2, 2)
    linears = [m for m in head.classifier if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(8 * 2 * 2, 32), (32, 32), (32, 10)]


def test_mlp_sr_on_tiny_maps_skips_the_second_pool_and_ceil_divides():
    head = MLPSRHead(4, (3, 3), num_classes=2)  # ⌈3/4⌉ = 1: already 1x1
    assert isinstance(head.pool, nn.Identity)
    assert head(torch.randn(2, 4, 3, 3)).shape == (2, 2)
    odd = MLPSRHead(4, (9, 5), num_classes=2)  # ⌈9/4⌉=3, ⌈5/4⌉=2 → pool to ⌈3/2⌉=2, 1
    assert odd.reduce.output_size == (3, 2) and odd.pool.output_size == (2, 1)
    assert odd(torch.randn(2, 4, 9, 5)).shape == (2, 2)


def test_head_width_overrides_the_channel_width():
    head = make_aux_head((2, 16, 8, 8), 10, "mlp_sr", width=4)
    assert all(m.out_channels == 4 for m in head.body if isinstance(m, nn.Conv2d))
    assert head.classifier[0].out_features == 16  # 4·width
    assert make_aux_head((2, 32), 10, "mlp", width=3).classifier[0].out_features == 12


def test_linear_head_pools_then_classifies():
    head = LinearHead((2, 6, 4, 4), 3)
    x = torch.randn(2, 6, 4, 4)
    expected = head.classifier(x.mean(dim=(2, 3)))
    torch.testing.assert_close(head(x), expected)
    tokens = LinearHead((2, 5, 6), 3)
    t = torch.randn(2, 5, 6)
    torch.testing.assert_close(tokens(t), tokens.classifier(t.mean(dim=1)))


def test_mlp_sr_rejects_non_image_boundaries():
    with pytest.raises(ValueError, match="mlp_sr.*needs a \\(B, C, H, W\\)"):
        head_kind_for((4, 10, 3), "mlp_sr")
    with pytest.raises(ValueError, match="batch and a feature axis"):
        head_kind_for((4,))


def test_mlp_sr_head_is_cheap_relative_to_a_conv_block():
    # DGL reports heads at ~1-3% of a VGG stage; at CIFAR scale (64 ch, 32x32) the MLP-SR head
    # must cost well under one 3x3 conv of the same width (the early 4x pooling does that).
    shape = (2, 64, 32, 32)
    head = make_aux_head(shape, 10)
    head_cost, _ = count_flops(head, (torch.randn(shape),), parameters=list(head.parameters()))
    conv = nn.Conv2d(64, 64, 3, padding=1)
    conv_cost, _ = count_flops(conv, (torch.randn(shape),), parameters=list(conv.parameters()))
    assert head_cost.total < 0.1 * conv_cost.total


class TestConfig:
    def test_defaults_and_round_trip(self):
        config = GreedyStages(num_stages=3, cuts=("layer1", "layer3"))
        assert config_from_dict(config.to_dict()) == config
        restored = config_from_dict({**config.to_dict(), "cuts": ["layer1", "layer3"]})  # JSON gives lists
        assert restored.cuts == ("layer1", "layer3")

    @pytest.mark.parametrize("field, value", [
        ("num_stages", 1), ("num_stages", 2.0), ("head", "conv"), ("head_width", 0), ("mode", "pipeline"),
        ("buffer", 0), ("max_reuse", 0), ("transport", "fp8"), ("vq_codebook_size", 1), ("vq_group_size", 0),
        ("vq_decay", 1.0), ("bytes_weight", -1.0), ("bytes_weight", math.inf), ("timeout_s", 0),
    ])
    def test_bad_values_name_the_field(self, field, value):
        with pytest.raises(ValueError, match=f"GreedyStages.{field}="):
            GreedyStages(**{field: value})

    def test_cuts_length_must_be_num_stages_minus_one(self):
        with pytest.raises(ValueError, match="GreedyStages.cuts="):
            GreedyStages(num_stages=3, cuts=("layer1",))


# ------------------------------------------------------------------ output-shaped heads (block-stack path)
@pytest.mark.parametrize("hidden, layout, kind", [
    ((3, 8, 5, 5), "channels_first", "pool_channels_first"),  # a CNN stage (HF ResNet/ConvNeXt)
    ((3, 5, 5, 8), "channels_last", "pool_channels_last"),  # Swin's (B, H, W, C)
    # rank 4 and no layer to read it off: by the shape (two equal dims after the batch are spatial)
    ((3, 8, 5, 5), None, "pool_channels_first"),
    ((3, 80, 1, 1), None, "pool_channels_first"),  # GhostNet: a 1x1 map whose blocks end in a concatenation
    ((3, 5, 5, 8), None, "pool_channels_last"),
    ((3, 7, 8), "channels_first", "pool_channels_first"),  # a Conv1d stage (B, C, L)
    ((3, 7, 8), "channels_last", "first_token"),  # a token sequence: the first (CLS) token
])
def test_classifier_head_for_a_feature_map_pools_the_spatial_axes(hidden, layout, kind):
    assert output_head_kind(hidden, (3, 4), "auto", layout) == kind
    assert output_head_kind(hidden, (3, 4), "linear", layout) == kind + "_linear"
    head = make_output_head(hidden, (3, 4), kind)
    x = torch.randn(hidden)
    assert head(x).shape == (3, 4)
    if kind.startswith("pool_"):
        # the head sees only the mean over the spatial axes: permuting positions changes nothing
        spatial = tuple(range(2, len(hidden))) if kind == "pool_channels_first" else tuple(range(1, len(hidden) - 1))
        flipped = x.flip(spatial)
        torch.testing.assert_close(head(flipped), head(x))


@pytest.mark.parametrize("block, shape, layout", [
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), (2, 8, 6, 6), "channels_first"),
    (nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)), (2, 6, 6, 8), "channels_last"),
    # ConvNeXt: depthwise conv, then Linears on a permuted map, permuted back to (B, C, H, W)
    (nn.Sequential(nn.Conv2d(8, 8, 7, groups=8), nn.LayerNorm(8), nn.Linear(8, 32), nn.Linear(32, 8)),
     (2, 8, 5, 5), "channels_first"),
    (nn.Sequential(nn.ReLU()), (2, 8, 5, 5), None),
])
def test_block_layout_is_read_off_the_blocks_layers(block, shape, layout):
    assert block_layout(block, shape) == layout


# ------------------------------------------------------------------------------ max_head_overhead
def _wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _heads(model: nn.Module):
    from effcompile.api import plan_of

    return [row for row in plan_of(model) if row.details.get("aux") and row.op != "model output"]


def test_a_head_costlier_than_its_stage_becomes_linear_and_the_plan_says_why():
    import effcompile

    example = (torch.randn(32, 256),)
    budgeted = effcompile.transform(_wide_mlp(), GreedyStages(num_stages=2), example_inputs=example)
    (row,) = _heads(budgeted)
    assert row.op == "linear" and "above max_head_overhead" in row.details["head_choice"]
    assert isinstance(budgeted.greedy_stage_heads[0], LinearHead)
    # Switched off, or heads the user chose: the 3-layer MLP head, no note.
    for config in (GreedyStages(num_stages=2, max_head_overhead=None), GreedyStages(num_stages=2, head="mlp"),
                   GreedyStages(num_stages=2, head_width=32)):
        (row,) = _heads(effcompile.transform(_wide_mlp(), config, example_inputs=example))
        assert row.op == "mlp" and "head_choice" not in row.details
    # A budget the MLP head meets keeps it.
    (row,) = _heads(effcompile.transform(_wide_mlp(), GreedyStages(num_stages=2, max_head_overhead=100.0),
                                         example_inputs=example))
    assert row.op == "mlp"
    predicted = [effcompile.predicted_step(effcompile.transform(_wide_mlp(), GreedyStages(num_stages=2, **kw),
                                                                 example_inputs=example))
                 for kw in ({}, {"max_head_overhead": None})]
    assert predicted[0] < predicted[1]


def test_a_stage_process_builds_the_heads_its_launcher_chose():
    import effcompile
    from effcompile.api import apply_plan, plan_of
    from effcompile.plan import Plan

    example = (torch.randn(32, 256),)
    decided = effcompile.transform(_wide_mlp(), GreedyStages(num_stages=2), example_inputs=example)
    rows = plan_of(decided).to_dict()
    applied = apply_plan(_wide_mlp(), Plan.from_dict(rows), GreedyStages(num_stages=2), example_inputs=example)
    assert isinstance(applied.greedy_stage_heads[0], LinearHead)
    decided.eval(), applied.eval()
    assert torch.equal(decided(*example), applied(*example))


@pytest.mark.parametrize("value", [0, -1.0, "big", True])
def test_max_head_overhead_is_validated(value):
    with pytest.raises(ValueError, match="max_head_overhead"):
        GreedyStages(max_head_overhead=value)
