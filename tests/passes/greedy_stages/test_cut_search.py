"""Specification of the cut search (passes/cut_search.py): trace, boundaries, FLOPs, the min-max DP."""

import itertools
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effcompile.passes import GreedyStages
from effcompile.models import example_inputs, get_model
from effcompile.passes.greedy_stages.cut_search import (
    StageTraceError, find_boundaries, measure_node_costs, min_max_partition, stage_costs, trace_for_stages,
)
from effcompile.passes.greedy_stages import plan_stages


pytestmark = pytest.mark.usefixtures("single_thread")


def _analyse(model, *inputs):
    traced = trace_for_stages(model)
    values, costs = measure_node_costs(traced, inputs)
    boundaries, _ = find_boundaries(traced, values)
    return traced, values, costs, boundaries


def _crossing_by_reachability(traced, position):
    """Values crossing a cut, computed from the stage sides: nodes on the early side (not
    parameters) with a direct user on the late side.  Written from users, not from live ranges."""
    early = set(traced.nodes[: position + 1])
    return {node.name for node in early if node.op != "get_attr" and any(user not in early for user in node.users)}


class TestFlops:
    def test_linear_forward_flops_are_2_B_in_out_and_backward_twice_that(self):
        model = get_model("mlp", hidden=16)
        x = torch.randn(5, 1, 8, 8)
        traced, _, costs, _ = _analyse(model, x)
        by_target = {node.target: cost for node, cost in zip(traced.nodes, costs)}
        assert by_target["fc1"].forward_flops == 2 * 5 * 64 * 16
        assert by_target["fc2"].forward_flops == 2 * 5 * 16 * 16
        assert by_target["head"].forward_flops == 2 * 5 * 16 * 10
        # backward: grad_input (B·out·in) and grad_weight (out·B·in) GEMMs, 2 FLOPs per MAC.
        assert by_target["fc2"].backward_flops == 2 * by_target["fc2"].forward_flops
        assert by_target["act1"].forward_flops == 0

    def test_measuring_leaves_the_model_and_rng_untouched(self):
        model = get_model("cnn", widths=(4, 8))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.randn(4, 1, 8, 8)
        rng = torch.get_rng_state()
        _analyse(model, x)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert torch.equal(rng, torch.get_rng_state())
        assert model.training and all(p.grad is None for p in model.parameters())


class TestPartition:
    @staticmethod
    def _brute_force(costs, candidates, k, head, nbytes, weight):
        return min(max(stage_costs(costs, list(cuts), head, nbytes, weight))
                   for cuts in itertools.combinations(sorted(candidates), k - 1))

    @pytest.mark.parametrize("seed", range(25))
    def test_dp_finds_the_brute_force_optimum(self, seed):
        rng = random.Random(seed)
        n = rng.randint(6, 14)
        costs = [rng.randint(0, 100) for _ in range(n)]
        candidates = rng.sample(range(n - 1), rng.randint(2, n - 1))
        k = rng.randint(2, min(4, len(candidates) + 1))
        heads = {p: rng.randint(0, 40) for p in candidates}
        sizes = {p: rng.randint(0, 30) for p in candidates}
        weight = rng.choice([0.0, 0.5, 2.0])
        cuts, value = min_max_partition(costs, candidates, k, heads.__getitem__, sizes.__getitem__, weight)
        assert len(cuts) == k - 1 and set(cuts) <= set(candidates)
        achieved = max(stage_costs(costs, cuts, heads.__getitem__, sizes.__getitem__, weight))
        assert achieved == pytest.approx(value)
        assert value == pytest.approx(self._brute_force(costs, candidates, k, heads.__getitem__, sizes.__getitem__, weight))

    def test_too_few_candidates_is_an_error(self):
        with pytest.raises(ValueError, match="3 stages need 2 cuts but only 1 candidate"):
            min_max_partition([1, 2, 3], [0], 3, lambda p: 0, lambda p: 0, 1.0)

    def test_stage_cost_counts_head_and_both_boundaries(self):
        # nodes 0..3, cut after 1: stage 0 = 1+2 + head 10 + w·5; stage 1 = 3+4 + w·5.
        assert stage_costs([1, 2, 3, 4], [1], lambda p: 10, lambda p: 5, 2.0) == [23.0, 17.0]


class _SkipFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x))) + x  # x crosses every point before the sum
        return self.fc3(h)


class _SharedParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        x = self.fc1(x * self.scale)
        x = self.fc2(x)
        return self.fc3(x) * self.scale  # scale used at both ends


class TestBoundaries:
    @pytest.mark.parametrize("name, kwargs", [("resnet18_cifar", {"width": 4}), ("vit_tiny", {"embed_dim": 16, "depth": 2, "num_heads": 2})])
    def test_every_candidate_is_a_single_tensor_crossing_outside_blocks(self, name, kwargs):
        model = get_model(name, **kwargs)
        traced, values, _, boundaries = _analyse(model, *example_inputs(name))
        assert boundaries
        for boundary in boundaries:
            crossing = _crossing_by_reachability(traced, boundary.position)
            assert crossing == {boundary.value}
            assert tuple(values[boundary.value].shape) == boundary.shape
        labels = {b.label for b in boundaries}
        if name == "resnet18_cifar":  # residual blocks are never cut inside; their outputs are candidates
            assert {"stem", "layer1.0", "layer1", "layer2.0", "layer3"} <= labels  # layer1.1 ends with layer1
            assert not any(label.count(".") >= 2 for label in labels)
        else:  # transformer block outputs are candidates, nothing inside attention
            assert {"patch_embed", "blocks.0", "blocks"} <= labels  # blocks.1 ends with blocks
            assert not any(".attn" in label or ".mlp" in label for label in labels)

    def test_input_used_late_forbids_earlier_cuts(self):
        traced = trace_for_stages(_SkipFromInput())
        values, _ = measure_node_costs(traced, (torch.randn(3, 4),))
        boundaries, live_counts = find_boundaries(traced, values)
        position = {n.target: i for i, n in enumerate(traced.nodes) if n.op == "call_module"}
        assert live_counts[position["fc1"]] == 2 and live_counts[position["fc2"]] == 2  # activation + x
        # the only cut is after the residual sum (no module ends there: it is named by its node)
        assert [(b.value, b.kind) for b in boundaries] == [("add", "node")]
        assert all(b.position > position["fc2"] for b in boundaries)

    def test_parameter_used_in_two_places_forbids_cuts_between(self):
        _, _, _, boundaries = _analyse(_SharedParameter(), torch.randn(3, 4))
        assert boundaries == []
        with pytest.raises(ValueError, match="0 candidate boundaries.*fewer than the 1 cuts"):
            plan_stages(_SharedParameter(), (torch.randn(3, 4),), GreedyStages(num_stages=2))


class _Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # data-dependent: cannot be traced


class _WithBranchySubmodule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.branchy, self.fc2 = nn.Linear(4, 4), _Branchy(), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(self.branchy(torch.relu(self.fc1(x))))


class _BranchyRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.mean() > 0:
            x = -x
        return self.fc(x)


class _TrainingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        x = self.fc1(x)
        if self.training:
            x = x * 0.5
        return self.fc2(x)


class TestTracing:
    def test_untraceable_submodule_becomes_a_leaf(self):
        model = _WithBranchySubmodule()
        traced = trace_for_stages(model)
        assert "branchy" in traced.untraceable and "control flow" in traced.untraceable["branchy"]
        assert traced.leaves["branchy"].startswith("its forward could not be traced")
        x = torch.randn(3, 4)
        assert torch.equal(traced.graph_module(x), model(x))

    def test_untraceable_root_names_the_model_and_the_construct(self):
        with pytest.raises(StageTraceError, match="root forward of _BranchyRoot.*control flow.*torch.where"):
            trace_for_stages(_BranchyRoot())

    def test_branch_on_training_flag_is_refused(self):
        model = _TrainingBranch()
        with pytest.raises(StageTraceError, match="branches on self.training"):
            trace_for_stages(model)
        assert model.training  # the mode was restored

    def test_leaves_are_the_original_modules(self):
        model = get_model("resnet18_cifar", width=4)
        traced = trace_for_stages(model)
        assert traced.graph_module.get_submodule("layer1.0.conv1") is model.layer1[0].conv1
        assert traced.leaves["layer1.0.conv1"] == "owns parameters or buffers directly"
        assert "layer1.0" not in traced.leaves  # containers are traced through


class _Owner(nn.Module):
    """Owns a parameter and a child with parameters: a container (traced through)."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(4))
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x + self.offset)))


class _PlainOwner(nn.Module):
    """Owns a parameter, no child with parameters: a leaf."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x * self.scale)


class _GatedBlock(nn.Module):
    """Untraceable (data-dependent branch) with a child: a leaf whose inside cannot be cut."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y if y.sum() > 0 else -y


class _Containers(nn.Module):
    def __init__(self):
        super().__init__()
        self.owner, self.plain, self.gated, self.head = _Owner(), _PlainOwner(), _GatedBlock(), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.gated(self.plain(self.owner(x))))


class TestContainersAndCuts:
    def test_a_module_owning_parameters_and_blocks_is_cut_inside(self):
        model = _Containers()
        traced, values, _, boundaries = _analyse(model, torch.randn(3, 4))
        assert "owner" not in traced.leaves and "owner.fc1" in traced.leaves
        assert any(n.op == "get_attr" and n.target == "owner.offset" for n in traced.nodes)
        assert traced.leaves["plain"] == "owns parameters or buffers directly"
        assert "owner.fc1" in {b.name for b in boundaries}  # a cut inside the container
        plan = plan_stages(model, (torch.randn(3, 4),), GreedyStages(num_stages=2, cuts=("owner.fc1",)))
        assert plan.stage_attributes[0] == ["owner.offset"]

    def test_a_decorrelated_style_class_swap_stays_a_leaf(self):
        class Swapped(_Owner):
            _effcompile_original_class = _Owner  # what another pass's class swap marks

        model = _Containers()
        model.owner.__class__ = Swapped
        assert trace_for_stages(model).leaves["owner"] == "owns parameters or buffers directly"

    def test_cut_inside_a_leaf_states_which_leaf_and_why(self):
        model = _Containers()
        with pytest.raises(ValueError, match=r"cut 'gated\.fc' \(Linear\) is inside the leaf module 'gated' "
                                             r"\(_GatedBlock\), which runs whole inside one stage \(it is a leaf: "
                                             r"its forward could not be traced"):
            plan_stages(model, (torch.randn(3, 4),), GreedyStages(num_stages=2, cuts=("gated.fc",)))

    def test_a_module_never_called_says_so(self):
        model = _Containers()
        model.unused = nn.Linear(4, 4)
        with pytest.raises(ValueError, match=r"cut 'unused' \(Linear\): no node of the traced forward runs inside"):
            plan_stages(model, (torch.randn(3, 4),), GreedyStages(num_stages=2, cuts=("unused",)))

    def test_a_node_named_cut_from_the_plan_is_accepted(self):
        model = _SkipFromInput()
        plan = plan_stages(model, (torch.randn(3, 4),), GreedyStages(num_stages=2, cuts=("add",)))
        assert plan.boundaries[0].kind == "node" and plan.boundaries[0].name == "add"

    def test_constants_and_default_arguments_never_cross(self):
        class WithFlags(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)
                self.register_buffer("mask", torch.ones(4))

            def forward(self, x, scale=None, flip=False):
                m = self.mask * 2  # made from a buffer: recomputed where used
                x = self.fc1(x) * m
                x = torch.relu(F.layer_norm(x, (4,), weight=scale))  # None and False reach ops as values
                return self.fc2(F.dropout(x, 0.0, flip)) + m[:3]

        traced, values, _, boundaries = _analyse(WithFlags(), torch.randn(3, 4))
        assert traced.value_kinds["scale"][0] == "const" and traced.value_kinds["mul"][0] == "const"
        assert {"fc1", "relu"} <= {b.name for b in boundaries}


def test_dp_prefers_module_ends_on_ties():
    costs = [5, 0, 0, 5]  # a cut after node 0, 1 or 2 gives the same stages
    cuts, _ = min_max_partition(costs, [0, 1, 2], 2, lambda p: 0, lambda p: 0, 0.0, penalty=lambda p: int(p != 1))
    assert cuts == [1]


class _RewiredInTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y, z = self.fc(x), torch.relu(x)
        return torch.relu(y) if self.training else torch.relu(z)  # same ops, different wiring


class _WithRewired(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = _RewiredInTraining(), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.inner(x))


def test_a_training_branch_that_only_rewires_is_found_and_named():
    with pytest.raises(StageTraceError, match=r"module 'inner' \(.*_RewiredInTraining\) branches on self\.training"):
        trace_for_stages(_WithRewired())
