"""Transform-time example forwards leave the model's Python state as it was (passes/analysis/side_effects.py).

The model writes to itself during a forward, as real ones do: in eval mode each block caches a
tensor derived from a parameter in a dict (timm's LeViT caches its attention biases this way), and
every forward bumps a call counter.  After ``transform`` no cache entry and no counter may remain:
a cached tensor from the planning forward is stale once training moves the parameter, and one
computed with grad is not a graph leaf, so ``copy.deepcopy`` (an EMA copy) failed.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.passes.greedy_stages import register_leaf_module

pytestmark = pytest.mark.usefixtures("single_thread")


class CachingBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.shift = nn.Parameter(torch.randn(8))
        self.cache = {}

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        if self.training:
            shift = self.shift * 2
        else:
            if "shift" not in self.cache:
                self.cache["shift"] = self.shift * 2
            shift = self.cache["shift"]
        return torch.relu(self.fc(x) + shift)


class CachingLeaf(CachingBlock):
    """The same block kept whole in the stage trace: greedy stages then take the fx path, whose
    cost measurement runs the leaf's real forward in eval mode."""


register_leaf_module(CachingLeaf, "caches a tensor in eval mode")


class CachingNet(nn.Module):
    def __init__(self, block: type = CachingBlock) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block() for _ in range(3)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


CONFIGS = {
    "decorrelation": lambda: effcompile.Decorrelation(input_layers=True, lr=0.01),
    "randomized_vjp": lambda: effcompile.RandomizedVJP(keep=0.5),
    "greedy_stages": lambda: effcompile.GreedyStages(num_stages=2),
    "sample_selection": lambda: effcompile.SampleSelection(keep=0.5, strategy="loss"),
}
CASES = [(technique, CachingBlock) for technique in CONFIGS] + [("greedy_stages", CachingLeaf)]


@pytest.mark.parametrize("technique, block", CASES, ids=[f"{t}-{b.__name__}" for t, b in CASES])
def test_transform_leaves_no_cache_and_no_new_attribute_and_the_model_deep_copies(technique, block):
    torch.manual_seed(0)
    model = CachingNet(block)
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, CONFIGS[technique](), example_inputs=x)
    assert effcompile.report(model).for_pass(technique).applied()
    for block in model.blocks:
        assert block.cache == {} and "calls" not in block.__dict__
    twin = copy.deepcopy(model)  # raised on a non-leaf cached tensor
    step = effcompile.train_step(twin, F.cross_entropy, torch.optim.SGD(twin.parameters(), lr=0.1))
    assert torch.isfinite(step(x, y))


class RecordingNet(nn.Module):
    """As transformers' output capturing (SegFormer's decode head reads every stage's output): the
    first forward registers a forward hook on each block that records its output, behind a flag
    attribute, and the head reads what was recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        if not getattr(self, "_recorders_installed", False):
            for block in self.blocks:
                block.register_forward_hook(self._record)
            self._recorders_installed = True
        self.recorded = []
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(torch.cat(self.recorded, dim=-1))

    def _record(self, module, args, output):
        self.recorded.append(output)


@pytest.mark.parametrize("technique", list(CONFIGS))
def test_hooks_a_forward_installs_on_itself_leave_with_its_flag(technique):
    """The planning forwards' hooks go with the flag they set, so the first training forward
    installs them once (before: the flag was dropped and the hooks kept, and the head got four
    recorded outputs)."""
    torch.manual_seed(0)
    model = RecordingNet()
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, CONFIGS[technique](), example_inputs=x)
    assert effcompile.report(model).for_pass(technique).applied()
    assert "_recorders_installed" not in model.__dict__
    assert not any(hook == model._record for block in model.blocks for hook in block._forward_hooks.values())
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.isfinite(step(x, y))
    assert [sum(hook == model._record for hook in block._forward_hooks.values()) for block in model.blocks] == [1, 1]
