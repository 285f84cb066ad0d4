"""Greedy stages on the structures of real architectures (issues 13 and 19, the stage parts).

The stand-ins (``standin_models.py``) reproduce what torchvision/timm models showed the cut
search: residual chains cut between functional ReLUs, a ViT whose blocks take
``attn_mask=None, is_causal=False`` and whose encoder owns ``pos_embedding``, an EfficientNet
with stochastic depth, a user module branching on ``self.training``.  Under the old rules (cuts
only at module ends, every live value counted, modules owning parameters kept whole, any
training branch an error naming the root) each of these tests fails.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import effcompile
from effcompile.passes import GreedyStages
from effcompile.passes.greedy_stages import StageTraceError, plan_stages, register_leaf_module, staged_model
from effcompile.passes.greedy_stages.cut_search import (
    _USER_LEAF_TYPES, batch_dependent_value, find_boundaries, measure_node_costs, probe_batch_values, trace_for_stages,
)

sys.path.insert(0, str(Path(__file__).parent))
from standin_models import (  # noqa: E402
    ChainWithUserBranch, EfficientNetLike, HalfInTraining, ResidualChain, ShapeAcrossBlocks, ViTLike,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _stage(model, x, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return effcompile.transform(model, GreedyStages(**config), example_inputs=(x,))


def _candidates(model, x):
    traced = trace_for_stages(model, 1)
    values, _ = measure_node_costs(traced, (x,), count=False)
    boundaries, _ = find_boundaries(traced, values, probe_batch_values(traced, (x,)))
    return traced, boundaries


def _activation_crossing(traced, values, position):
    """Independent check of a cut: early-side nodes holding a tensor that depends on the input
    (reachability from the placeholder, not the pass's kinds) with a user on the late side."""
    early = set(traced.nodes[: position + 1])
    dependent = set()
    for node in traced.nodes:
        if (node.op == "placeholder" and isinstance(values.get(node.name), torch.Tensor)) or (
                node.op != "get_attr" and any(a in dependent for a in node.all_input_nodes)):
            dependent.add(node)
    return {n.name for n in early if n in dependent and isinstance(values.get(n.name), torch.Tensor)
            and any(u not in early for u in n.users)}


def _train(model, x, y, steps, lr=0.05):
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    history = []
    for _ in range(steps):
        step(x, y)
        history.append([float(loss) for loss in step.stage_losses])
    return history


def _falls(history, stage, window=5, factor=0.8):
    first = sum(h[stage] for h in history[:window]) / window
    last = sum(h[stage] for h in history[-window:]) / window
    return last < factor * first, (first, last)


# ------------------------------------------------------------------------------------ residual chain
def test_residual_chain_is_cut_between_functional_relus_and_trains_in_3_stages():
    torch.manual_seed(0)
    model = ResidualChain()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=generator)
    y = (x @ torch.randn(16, 4, generator=generator)).argmax(1)
    traced, boundaries = _candidates(model, x[:8])
    names = {b.name for b in boundaries}
    # after every block's ReLU (no module ends there: named by the node), and after the stem
    assert {"stem", "relu", "relu_1", "relu_2", "relu_3", "relu_4"} <= names
    assert all(b.kind == "node" for b in boundaries if b.name.startswith("relu"))
    _stage(model, x[:8], num_stages=3, head="linear")
    staged = staged_model(model)
    rows = effcompile.report(model).for_pass("greedy_stages")
    cuts = [rows.row(f"greedy_stage_heads.{k}").details for k in range(2)]
    assert [c["cut_kind"] for c in cuts] == ["node", "node"] and all(c["cut_after"].startswith("relu") for c in cuts)
    shares = [float(rows.row(f"greedy_stage_heads.{k}").details["flops_share"].rstrip("%")) for k in range(2)]
    shares.append(float(rows.row("<stage 2>").details["flops_share"].rstrip("%")))
    assert all(25 <= s <= 42 for s in shares), shares  # 6 blocks + stem/head in 3 fair stages
    model.eval()
    assert torch.allclose(staged.forward(x), model(x), atol=1e-6)
    model.train()
    history = _train(model, x, y, steps=40)
    for k in range(3):
        falls, (first, last) = _falls(history, k)
        assert falls, (k, first, last)


# ------------------------------------------------------------------------------------ ViT-like
@pytest.mark.parametrize("num_stages", [2, 4])
def test_vit_like_is_cut_inside_the_encoder_at_fair_shares(num_stages):
    torch.manual_seed(0)
    model = ViTLike(depth=8)
    x = torch.randn(4, 1, 8, 8)
    plan = plan_stages(model, (x,), GreedyStages(num_stages=num_stages))
    kinds = plan.traced.value_kinds
    assert kinds["attn_mask"][0] == "const" and kinds["is_causal"][0] == "const"  # None / False never cross
    assert all(b.name.startswith("encoder.layers.encoder_layer_") for b in plan.boundaries), plan.boundaries
    fair = 1 / num_stages
    for k in range(num_stages):
        assert abs(plan.flop_share(k) - fair) < 0.06, [plan.flop_share(j) for j in range(num_stages)]
        assert abs(plan.weight_share(k) - fair) < 0.06, [plan.weight_share(j) for j in range(num_stages)]
    assert not any(plan.warnings)
    values, _ = measure_node_costs(plan.traced, (x,), count=False)
    for boundary in plan.boundaries:
        assert _activation_crossing(plan.traced, values, boundary.position) == {boundary.value}
    _stage(model, x, num_stages=num_stages)
    staged = staged_model(model)
    first = {id(p) for p in staged.stage_parameters(0)}
    assert id(model.class_token) in first and id(model.encoder.pos_embedding) in first
    model.eval()
    for batch in (x, torch.randn(6, 1, 8, 8)):  # another batch size than the example's
        assert torch.allclose(staged.forward(batch), model(batch), atol=1e-5)


def test_vit_like_every_block_end_is_a_candidate_and_user_cuts_inside_the_encoder_work():
    torch.manual_seed(0)
    model = ViTLike(depth=4)
    x = torch.randn(4, 1, 8, 8)
    _, boundaries = _candidates(model, x)
    names = {b.name for b in boundaries}
    assert {f"encoder.layers.encoder_layer_{i}" for i in range(3)} <= names
    plan = plan_stages(model, (x,), GreedyStages(num_stages=2, cuts=("encoder.layers.encoder_layer_0",)))
    assert plan.boundaries[0].shape == (4, 17, 32)
    assert "encoder.pos_embedding" in plan.stage_attributes[0]
    with pytest.raises(ValueError, match=r"'encoder\.layers\.encoder_layer_0\.attn\.qkv' \(Linear\) is not a "
                                         r"single-tensor boundary: 2 values cross there .*nearest cut after it"):
        plan_stages(model, (x,), GreedyStages(num_stages=2, cuts=("encoder.layers.encoder_layer_0.attn.qkv",)))
    with pytest.raises(ValueError, match="'encoder.nope' is not a module path of the model nor a node"):
        plan_stages(model, (x,), GreedyStages(num_stages=2, cuts=("encoder.nope",)))


def test_a_negligible_stage_is_a_plan_warning_and_a_python_warning():
    torch.manual_seed(0)
    model = ViTLike(depth=4)
    x = torch.randn(4, 1, 8, 8)
    with pytest.warns(UserWarning, match=r"stage 1 \(after cut 'encoder'\) is negligible: 0\.\d% of the fwd\+bwd FLOPs"):
        effcompile.transform(model, GreedyStages(num_stages=2, cuts=("encoder",)), example_inputs=(x,))
    row = effcompile.report(model).for_pass("greedy_stages").row("<stage 1>")
    assert row.details["warning"] == "negligible stage" and "negligible" in row.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the balanced cut warns about nothing
        plan_stages(ViTLike(depth=4), (x,), GreedyStages(num_stages=2))


# ------------------------------------------------------------------------------------ EfficientNet-like
def test_efficientnet_like_with_stochastic_depth_trains_in_stages():
    torch.manual_seed(0)
    model = EfficientNetLike()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(32, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (32,), generator=generator)
    traced = trace_for_stages(model, 1)
    # torchvision-style StochasticDepth by its class name; the user's RandomSkip by its behaviour
    assert traced.leaves["features.2.0.stochastic_depth"] == "is a stochastic regulariser"
    assert "identity in eval" in traced.auto_leaves["features.4.0.stochastic_depth"]
    _stage(model, x[:4], num_stages=3)
    staged = staged_model(model)
    rows = effcompile.report(model).for_pass("greedy_stages")
    assert rows.row("features.4.0.stochastic_depth").details["leaf"] == "stochastic regulariser"
    assert all(rows.row(f"greedy_stage_heads.{k}").details["cut_kind"] == "module" for k in range(2))
    model.eval()
    assert torch.allclose(staged.forward(x), model(x), atol=1e-5)
    model.train()
    history = _train(model, x, y, steps=30)
    for k in range(3):
        falls, (first, last) = _falls(history, k, factor=0.9)
        assert falls, (k, first, last)


# ------------------------------------------------------------------------------------ training branches
def test_a_users_module_branching_on_training_is_named_with_the_fix():
    model = ChainWithUserBranch()
    with pytest.raises(StageTraceError, match=r"module 'blocks\.1' \(.*standin_models\.HalfInTraining\) branches on "
                                              r"self\.training.*register_leaf_module\(HalfInTraining, reason\)"):
        plan_stages(model, (torch.randn(4, 8),), GreedyStages(num_stages=2))
    assert model.training and all(m.training for m in model.modules())
    register_leaf_module(HalfInTraining, "scales its output in training")
    try:
        plan = plan_stages(model, (torch.randn(4, 8),), GreedyStages(num_stages=2))
        assert plan.traced.leaves["blocks.1"] == "registered leaf: scales its output in training"
    finally:
        _USER_LEAF_TYPES.pop(HalfInTraining)


# ------------------------------------------------------------------------------------ shape values
def test_a_batch_size_read_once_and_used_after_every_block_does_not_block_cuts():
    torch.manual_seed(0)
    model = ShapeAcrossBlocks(depth=4)
    x = torch.randn(4, 8)
    traced, boundaries = _candidates(model, x)
    assert traced.value_kinds["size"] == ("batch", ("int", 1, 0))  # b = x.size(0), rebuilt per stage
    assert {"blocks.0", "blocks.1", "blocks.2"} <= {b.name for b in boundaries}
    _stage(model, x, num_stages=3, cuts=("blocks.0", "blocks.2"))
    staged = staged_model(model)
    later = [n.target for n in staged.stage(1).graph.nodes if n.op == "call_function"]
    assert batch_dependent_value in later
    for batch in (x, torch.randn(7, 8)):
        assert torch.equal(staged.forward(batch), model(batch))
