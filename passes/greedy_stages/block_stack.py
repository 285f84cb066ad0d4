"""Greedy stages for models whose root forward ``torch.fx`` cannot trace: cuts between the blocks
of the model's main block stack, made at run time by forward hooks (``cut_kind=block-stack hooks``).

Hugging Face models (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``BertForSequenceClassification``)
cannot be symbolically traced at the root (their forward inspects its arguments, builds masks
and caches in Python).  Their layers still run as one ``nn.ModuleList`` of same-class blocks
(``transformer.h``, ``model.layers``, ``bert.encoder.layer``), one after another, each taking the
hidden state ``(B, T, H)`` and returning the next one.  This path cuts that stack.

Model before: ``out = model(**batch)``; one loss ``loss_fn(out, targets)`` whose gradient flows
through every block.

Model after ``transform(model, GreedyStages(K), example_inputs=batch)`` on this path:

* ``block_stacks`` ranks the stacks: every ``nn.ModuleList``/``nn.Sequential`` of >= 2 children
  that all hold trainable parameters, the one holding the most trainable parameters first (a list
  of stages holds its stages' block lists; ties: more blocks).  The first stack whose blocks run
  once each, in order, with a hidden state an aux head maps to the model's output is cut; a stack
  whose blocks fold the batch (MobileViT's patch transformer: ``(B·P, N, C)``) is passed over.
* The example forward is run once (eval mode, RNG forked, no backward) with hooks on every block
  and a ``TorchFunctionMode`` that records, per parameter, at which block position it is used
  (so tied weights — GPT-2's ``lm_head.weight`` is ``wte.weight`` — are found), with the forward
  FLOPs of every block and of what runs before (embeddings) and after (final norm, head).
* The K−1 cuts (after blocks ``c_1 < … < c_{K−1}``) minimise the most expensive stage's forward
  FLOPs (its blocks, the prefix for stage 0, the suffix for the last, the aux head for the others)
  by a dynamic program.  Everything before the first cut's stage (embeddings) is stage 0;
  everything after the last cut (final norm, the model's head) is the last stage.
* ``model.greedy_stage_heads.k`` (the same attribute as the fx path) maps the hidden state at
  cut k to the model's output shape, inferred from the example output's first tensor (``logits``):
  ``(B, T, V)`` → LayerNorm + Linear to V per token (causal LM); ``(B, C)`` → LayerNorm of the
  first token → Linear + tanh → Linear to C (classification over a token sequence whose head reads
  a CLS token), the mean over the tokens → LayerNorm → Linear to C (a head that reads every token,
  as HF Swin's pooler: the positions the logits' gradient reaches on the example), or, for a
  feature map, mean over its spatial axes → LayerNorm → Linear to C (the channel axis read off the
  block's last conv/norm/Linear: ``(B, C, H, W)`` for a CNN stage, ``(B, H, W, C)`` for Swin).

``effcompile.train_step`` runs the model's **own** forward with forward hooks on the cut blocks::

    h_k = block_{c_k}(…)                       # the hidden state at cut k (tensor or tuple[0])
    a_k = head_k(h_k)                          # stage k's aux output (B, T, V) or (B, C)
    block_{c_k} returns h_k.detach().requires_grad_()   # every tensor of its output detached
    out = the model's output (ModelOutput)     # the last stage's output
    L_k = loss_fn(out with its first tensor (logits) replaced by a_k, targets);  L_K = loss_fn(out, targets)
    backward(L_0 … L_K); one optimizer step

so no gradient crosses a cut and each stage's parameters get gradients from its own loss only.  A
parameter used by several stages (a tied embedding) belongs to the first; later stages read it
detached (the ``TorchFunctionMode`` swaps it per op).  A block of a later stage that receives
trainable tensors besides its hidden state (T5's encoder output and position bias) reads those
that no block of its own stage made detached (``_SideInputs``).  A stack whose blocks run more
than once, out of order or not at all is refused at plan time (``StageTraceError``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from effcompile._compat import ConvNd, NormBase, hook_runs_last, is_compiling, pytree
from effcompile.inputs import ModelInputs, call, model_inputs, tensor_leaves, training_batch
from effcompile.passes.analysis.side_effects import module_state_restored

from .stage_losses import StageLosses

from .aux_heads import make_output_head, output_head_kind
from .config import GreedyStages
from .cut_search import StageTraceError, evaluating

__all__ = ["BlockStack", "BlockStagePlan", "BlockStagedModel", "block_stacks", "plan_block_stages",
           "block_stage_losses", "make_block_training_loss", "replace_first_tensor", "CUT_KIND"]

CUT_KIND = "block-stack hooks"


# ------------------------------------------------------------------------------------ the stack
@dataclasses.dataclass
class BlockStack:
    path: str
    blocks: List[str]  # module paths, in index order
    block_class: str


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _called_blocks(path: str, stack: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The stack's blocks as the forward calls them, with their paths: a ModuleList inside it is
    never called itself (the forward loops over it: Funnel's blocks of layers), so its own blocks
    stand in its place, in nested index order."""
    blocks = []
    for name, child in stack.named_children():
        child_path = f"{path}.{name}" if path else name
        blocks += _called_blocks(child_path, child) if isinstance(child, nn.ModuleList) else [(child_path, child)]
    return blocks


def block_stacks(model: nn.Module) -> List[BlockStack]:
    """The model's candidate block stacks, the main one first (see the module docstring);
    ``StageTraceError`` with the containers seen if there is none."""
    ranked, seen = [], []
    for path, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) == 1 and _trainable(module):
            seen.append(f"{path or '<root>'} (1× {type(module[0]).__name__}: a single block; where the forward runs it "
                        "at every depth, as ALBERT's shared layers do, no cut can give the stages their own parameters)")
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        children = _called_blocks(path, module)
        if len(children) < 2:
            continue
        classes = sorted({type(child).__name__ for _, child in children})
        untrained = sum(_trainable(child) == 0 for _, child in children)  # parameter-free or frozen blocks
        seen.append(f"{path or '<root>'} ({len(children)}× {', '.join(classes)}"
                    + (f"; {untrained} without trainable parameters" if untrained else "") + ")")
        if untrained:
            continue
        names = [name for name, _ in children]
        # The stack holding the most of the model's training (a stage list holds its block lists).
        ranked.append(((_trainable(module), len(children)), BlockStack(path, names, " / ".join(classes))))
    if not ranked:
        found = "; ".join(seen) if seen else "none"
        raise StageTraceError(
            f"greedy_stages: {type(model).__name__} has no block stack to cut between (an nn.ModuleList or "
            f"nn.Sequential of >= 2 blocks, each with trainable parameters); containers found: {found}")
    return [stack for _, stack in sorted(ranked, key=lambda item: item[0], reverse=True)]


_CHANNEL_FIRST_LAYERS = (ConvNd, NormBase, nn.GroupNorm)  # NormBase: the batch and instance norms


def block_layout(block: nn.Module, shape: Tuple[int, ...]) -> Optional[str]:
    """Where a block's output of ``shape`` keeps its channels, read off the block's last layer that
    makes or normalises them: a conv / batch, group or instance norm with ``shape[1]`` channels →
    ``"channels_first"``; a Linear / LayerNorm over ``shape[-1]`` features → ``"channels_last"``;
    neither → ``None``."""
    for module in reversed(list(block.modules())):
        if isinstance(module, _CHANNEL_FIRST_LAYERS):
            channels = getattr(module, "out_channels", None) or getattr(module, "num_features", None) \
                or getattr(module, "num_channels", None)
            if channels == shape[1]:
                return "channels_first"
        if isinstance(module, nn.Linear) and module.out_features == shape[-1]:
            return "channels_last"
        if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape)[-1:] == shape[-1:]:
            return "channels_last"
    return None


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    leaves = tensor_leaves(value)
    return leaves[0] if leaves else None


def replace_first_tensor(output: Any, replacement: torch.Tensor) -> Any:
    """``output`` (tensor, tuple, dict, ``ModelOutput``) with its first tensor leaf replaced."""
    if isinstance(output, torch.Tensor):
        return replacement
    if isinstance(output, (tuple, list)):
        items = list(output)
        for index, item in enumerate(items):
            if _first_tensor(item) is not None:
                items[index] = replace_first_tensor(item, replacement)
                break
        if hasattr(output, "_fields"):  # namedtuple
            return type(output)(*items)
        return type(output)(items)
    if isinstance(output, dict):  # dict and ModelOutput (an OrderedDict dataclass of its non-None fields)
        values = dict(output)
        for key, item in values.items():
            if _first_tensor(item) is not None:
                values[key] = replace_first_tensor(item, replacement)
                break
        try:
            return type(output)(**values)
        except TypeError:
            return dict(values)
    raise TypeError(f"greedy_stages: cannot replace the first tensor of a model output of type {type(output).__name__}")


def _detach_all(value: Any) -> Tuple[Any, Optional[torch.Tensor]]:
    """Every tensor leaf of a block output detached; the first one (the hidden state) also
    ``requires_grad_()`` so the next stage trains on a detached leaf input."""
    first: List[torch.Tensor] = []

    def detach(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        out = leaf.detach()
        if not first:
            # Eagerly a leaf that requires grad, as a stage's own input; compiled the next block's
            # parameters make its outputs require grad anyway, and ``requires_grad_`` on an
            # intermediate would break the graph.
            if out.is_floating_point() and not is_compiling():
                out.requires_grad_()
            first.append(out)
        return out

    if isinstance(value, torch.Tensor):
        return detach(value), first[0]
    return pytree.tree_map(detach, value), (first[0] if first else None)


class _ParameterUses(TorchFunctionMode):
    """Records at which block position each parameter is used (by any torch function / method)."""

    def __init__(self, parameters: Dict[int, str], position: Callable[[], int]) -> None:
        super().__init__()
        self.parameters, self.position = parameters, position
        self.uses: Dict[str, Set[int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, nn.Parameter):
                name = self.parameters.get(id(leaf))
                if name is not None:
                    self.uses.setdefault(name, set()).add(self.position())
        return func(*args, **kwargs)


class _DetachForeign(TorchFunctionMode):
    """While stage ``s`` runs, a parameter owned by an earlier stage (a tied weight) is read detached.

    ``owners``: per shared parameter, the (module, attribute) places that hold it and its owning
    stage.  The parameter is recognised by what those places hold *now*, not by the object seen at
    transform time: FSDP2 swaps its unsharded parameter into them for the forward, and
    ``copy.deepcopy`` gives a copy new parameters."""

    def __init__(self, owners: List[Tuple[List[Tuple[nn.Module, str]], int]], stage: Callable[[], int]) -> None:
        super().__init__()
        self.owners, self.stage = owners, stage

    def _owner(self, leaf: nn.Parameter) -> Optional[int]:
        # Looked up at every read, not remembered: FSDP2 touches its unsharded parameter (the
        # all-gather's copy) before it places it on the modules, and a dict filled while Dynamo
        # traces is guarded on (torch 2.11 failed its own guard on such a cache).
        for places, owner in self.owners:
            for module, name in places:
                if module._parameters.get(name) is leaf:
                    return owner
        return None

    def _swap(self, leaf: Any) -> Any:
        if not isinstance(leaf, nn.Parameter):
            return leaf
        owner = self._owner(leaf)
        return leaf.detach() if owner is not None and owner != self.stage() else leaf

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        args, kwargs = pytree.tree_map(self._swap, (args, kwargs))
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class BlockStagePlan:
    """What ``apply`` needs for the hook path (kept as the stage rows' ``spec``)."""

    stack: BlockStack
    cuts: List[int]  # block indices: the cut falls after each
    boundary_shapes: List[Tuple[int, ...]]
    boundary_dtype: torch.dtype
    device: torch.device
    output_shape: Tuple[int, ...]  # the model's first output tensor (logits) on the example
    head_kinds: List[str]
    owners: Dict[str, int]  # parameter name → owning stage
    shared: Dict[str, List[int]]  # parameter name → every stage using it (more than one)
    stage_flops: List[int]  # forward FLOPs per stage body (example batch)
    head_flops: List[int]  # forward FLOPs per aux head (0 for the last stage)
    stage_weights: List[int]  # trainable elements per stage (heads excluded)
    fx_reason: str  # why the fx path was not taken
    # block index (a later stage's) → the trainable tensors it receives besides its hidden state
    # (argument leaf index, shape): an encoder output, a position bias; read detached at run time
    side_inputs: Dict[int, List[Tuple[int, Tuple[int, ...]]]] = dataclasses.field(default_factory=dict)
    passed_over: List[str] = dataclasses.field(default_factory=list)  # stacks ranked higher that did not fit: why

    @property
    def num_stages(self) -> int:
        return len(self.cuts) + 1

    def stage_blocks(self, k: int) -> List[str]:
        edges = [-1] + list(self.cuts) + [len(self.stack.blocks) - 1]
        return self.stack.blocks[edges[k] + 1: edges[k + 1] + 1]

    def flop_share(self, k: int) -> float:
        return self.stage_flops[k] / max(sum(self.stage_flops), 1)

    def weight_share(self, k: int) -> float:
        return self.stage_weights[k] / max(sum(self.stage_weights), 1)


def _stage_of(position: int, cuts: Sequence[int]) -> int:
    """Position p = number of blocks completed; a cut after block c separates p <= c from p > c."""
    return sum(1 for c in cuts if c < position)


def _measure(model: nn.Module, batch: ModelInputs, stack: BlockStack) -> Dict[str, Any]:
    """One example forward (eval, RNG forked, restored): per-unit FLOPs, parameter uses, shapes."""
    modules = dict(model.named_modules())
    blocks = [modules[path] for path in stack.blocks]
    parameters = {id(p): name for name, p in model.named_parameters()}
    state = {"position": 0, "calls": [], "inputs": [], "outputs": [], "snapshots": []}
    counter = FlopCounterMode(display=False)

    def pre_hook(index):
        def hook(module, args, kwargs):
            state["calls"].append(index)
            if index == 0:
                state["snapshots"].append(counter.get_total_flops())
            leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            state["inputs"].append([(i, tuple(t.shape)) for i, t in enumerate(leaves)
                                    if i > 0 and t.requires_grad and t.is_floating_point()])
        return hook

    def post_hook(index):
        def hook(module, args, output):
            state["position"] = index + 1
            state["snapshots"].append(counter.get_total_flops())
            state["outputs"].append(_first_tensor(output))
        return hook

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(index)))
    flags = {module: module.training for module in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    uses = _ParameterUses(parameters, lambda: state["position"])
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]), module_state_restored(model), counter, uses:
            output = call(model, batch)
            total = counter.get_total_flops()
            # Before the state is restored (in place: a saved tensor's version would change).
            pools = bool(state["outputs"]) and _pools_tokens(_first_tensor(output), state["outputs"][-1])
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return {"output": output, "total": total, "uses": uses.uses, "pools_tokens": pools, **state}


def _pools_tokens(logits: torch.Tensor, last_hidden: torch.Tensor) -> bool:
    """Whether the model's own head reads every position of the last block's ``(B, T, H)`` output
    (a mean-pooled classifier: Hugging Face Swin's pooler) rather than the first
    alone (a CLS token: BERT, HF ViT).  Read off the example forward's graph: the positions where
    the gradient of the logits is non-zero."""
    if not isinstance(logits, torch.Tensor) or last_hidden is None or last_hidden.dim() != 3 or logits.dim() != 2 \
            or not (logits.requires_grad and last_hidden.requires_grad):
        return False
    (grad,) = torch.autograd.grad(logits.float().sum(), last_hidden, allow_unused=True)
    return grad is not None and bool(grad[:, 1:].abs().sum() > 0)


class _Unfit(Exception):
    """A stack this model cannot be cut at (the next candidate is tried); ``error`` says why."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def plan_block_stages(model: nn.Module, batch: Any, config: GreedyStages, fx_reason: str) -> BlockStagePlan:
    """Rank the stacks, measure, and cut the first that fits (read-only: the model's state is left
    untouched).  When none fits, the main stack's error, with why each other stack was passed over."""
    batch = model_inputs(batch)
    if config.head not in ("auto", "linear"):
        raise ValueError(f"greedy_stages: head={config.head!r} does not apply to the block-stack path (its heads map "
                         "the hidden state to the model's output shape); use head='auto' or 'linear'")
    passed_over: List[Tuple[BlockStack, Exception]] = []
    for stack in block_stacks(model):
        try:
            plan = _plan_on(model, batch, config, fx_reason, stack)
        except _Unfit as unfit:
            passed_over.append((stack, unfit.error))
            continue
        plan.passed_over = [f"{unfit_stack.path}: {str(error)[:200]}" for unfit_stack, error in passed_over]
        return plan
    main = passed_over[0][1]
    others = "; ".join(f"{stack.path}: {error}" for stack, error in passed_over[1:])
    raise type(main)(f"{main}" + (f" (the other block stacks do not fit either: {others})" if others else "")) from None


def _plan_on(model: nn.Module, batch: ModelInputs, config: GreedyStages, fx_reason: str,
             stack: BlockStack) -> BlockStagePlan:
    """The plan cutting ``stack``; ``_Unfit`` when this stack cannot be cut."""
    name = type(model).__name__
    n = len(stack.blocks)
    if n < config.num_stages:
        raise _Unfit(ValueError(f"greedy_stages: {name}'s block stack {stack.path!r} has {n} blocks, fewer than "
                                f"num_stages={config.num_stages} (every stage keeps at least one block)"))
    measured = _measure(model, batch, stack)
    if measured["calls"] != list(range(n)):
        raise _Unfit(StageTraceError(
            f"greedy_stages: the blocks of {name}'s stack {stack.path!r} ({n}× {stack.block_class}) must each run "
            f"once, in index order, in one forward; the example forward called them in the order {measured['calls']}"))
    output = measured["output"]
    if isinstance(output, dict) and output.get("loss") is not None:
        raise ValueError(f"greedy_stages: {name} computed its own loss (labels in the batch?); stage losses apply "
                         "loss_fn to each stage's logits, so pass the targets to the step, not in the batch")
    logits = _first_tensor(output)
    if logits is None or logits.dim() < 2:
        raise StageTraceError(f"greedy_stages: {name}'s output has no tensor with a batch and a feature axis to "
                              "give the aux heads their output shape")
    hidden = measured["outputs"]
    for index, tensor in enumerate(hidden):
        if tensor is None or not tensor.is_floating_point() or tensor.dim() < 2:
            raise _Unfit(StageTraceError(f"greedy_stages: block {stack.blocks[index]!r} returns no floating "
                                         "hidden-state tensor to cut at"))
    kinds = []  # the aux head at every possible cut (after blocks 0..n−2): the blocks of a stage list differ
    for index in range(n - 1):
        shape = tuple(hidden[index].shape)
        layout = block_layout(model.get_submodule(stack.blocks[index]), shape)
        try:
            kinds.append(output_head_kind(shape, tuple(logits.shape), config.head, layout,
                                          pools_tokens=measured["pools_tokens"]))
        except ValueError as error:
            raise _Unfit(error) from None

    snapshots = measured["snapshots"]  # [start of block 0, end of block 0, …, end of block n−1]
    units = [snapshots[i + 1] - snapshots[i] for i in range(n)]
    units[0] += snapshots[0]  # the prefix (embeddings) runs in stage 0
    units[-1] += measured["total"] - snapshots[-1]  # the suffix (final norm, head) in the last stage
    head_costs = [_head_flops(tuple(hidden[c].shape), tuple(logits.shape), kinds[c], hidden[c].dtype)
                  for c in range(n - 1)]

    if config.cuts is not None:
        try:
            cuts = _user_cuts(stack, config.cuts, name)
        except ValueError as error:  # the user's cuts name the blocks of another stack
            raise _Unfit(error) from None
    else:
        cuts = _min_max_cuts(units, n, config.num_stages, head_costs)
    # Parameter ownership: the first stage that uses it; later ones read it detached.
    named = dict(model.named_parameters())
    uses = measured["uses"]
    owners, shared = {}, {}
    for pname, parameter in named.items():
        stages = sorted({_stage_of(p, cuts) for p in uses.get(pname, set())})
        owners[pname] = stages[0] if stages else _owner_by_path(pname, stack, cuts)
        if len(stages) > 1 and parameter.requires_grad:
            shared[pname] = stages
    # Trainable side inputs of a later stage's blocks (T5's encoder output and position bias) were
    # computed before its cut: the stage reads them detached (_SideInputs), so no gradient crosses.
    side_inputs = {index: measured["inputs"][index] for index in range(n)
                   if _stage_of(index, cuts) > 0 and index > 0 and measured["inputs"][index]}
    edges = [-1] + list(cuts) + [n - 1]
    stage_flops = [sum(units[edges[s] + 1: edges[s + 1] + 1]) for s in range(len(cuts) + 1)]
    weights = [0] * (len(cuts) + 1)
    counted = set()
    for pname, parameter in named.items():
        if parameter.requires_grad and id(parameter) not in counted:
            counted.add(id(parameter))
            weights[owners[pname]] += parameter.numel()
    boundary_shapes = [tuple(hidden[c].shape) for c in cuts]
    return BlockStagePlan(stack, cuts, boundary_shapes, hidden[0].dtype, hidden[0].device, tuple(logits.shape),
                          [kinds[c] for c in cuts], owners, shared, stage_flops, [head_costs[c] for c in cuts] + [0],
                          weights,
                          fx_reason, side_inputs)


def _owner_by_path(pname: str, stack: BlockStack, cuts: Sequence[int]) -> int:
    """A parameter the example forward never used: its block's stage, else the last stage."""
    for index, path in enumerate(stack.blocks):
        if pname.startswith(path + "."):
            return _stage_of(index, cuts)
    return len(cuts)


def _head_flops(hidden: Tuple[int, ...], target: Tuple[int, ...], kind: str, dtype: torch.dtype) -> int:
    with torch.random.fork_rng(devices=[]):
        head = make_output_head(hidden, target, kind).to(dtype).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            head(torch.randn(hidden, dtype=dtype))
    return counter.get_total_flops()


def _user_cuts(stack: BlockStack, cuts: Sequence[str], name: str) -> List[int]:
    index = {path: i for i, path in enumerate(stack.blocks)}
    bad = [c for c in cuts if c not in index]
    if bad:
        raise ValueError(f"greedy_stages: cuts {bad} are not blocks of {name}'s stack {stack.path!r} (the block-stack "
                         f"path cuts after a block); valid cuts: {stack.blocks}")
    positions = [index[c] for c in cuts]
    if any(a >= b for a, b in zip(positions, positions[1:])):
        raise ValueError(f"greedy_stages: cuts={tuple(cuts)} must be distinct blocks in forward order")
    return positions


def _min_max_cuts(units: List[int], n: int, stages: int, head_costs: Sequence[int]) -> List[int]:
    """Cuts after blocks c_1 < … < c_{K−1} (each stage keeps >= 1 block) minimising the largest stage
    cost, a non-last stage paying for the aux head at its cut (exact DP, O(K·n²)); ties: the earlier cut."""
    prefix = [0]
    for u in units:
        prefix.append(prefix[-1] + u)

    def cost(i: int, j: int, last: bool) -> int:  # blocks i..j inclusive
        if last:
            return prefix[j + 1] - prefix[i]
        return prefix[j + 1] - prefix[i] + head_costs[j] if j < len(head_costs) else math.inf  # no cut after the last block

    # best[k][j]: the smallest largest-stage cost of stages 0..k covering blocks 0..j
    best = [[math.inf] * n for _ in range(stages)]
    back = [[-1] * n for _ in range(stages)]
    for j in range(n):
        best[0][j] = cost(0, j, stages == 1)
    for k in range(1, stages):
        last = k == stages - 1
        for j in range(k, n):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i + 1, j, last))
                if value < best[k][j]:
                    best[k][j], back[k][j] = value, i
    cuts, k, j = [], stages - 1, n - 1
    while k > 0:
        j = back[k][j]
        cuts.append(j)
        k -= 1
    return sorted(cuts)


# ------------------------------------------------------------------------------------ runtime
class _CutHook:
    """Forward hook of the block after which stage k ends: while ``BlockStagedModel.run`` runs,
    stage k's aux output from the block's hidden state, and the block's output detached.  A class
    (not a closure), so ``copy.deepcopy`` of the model copies it with its staged view."""

    def __init__(self, staged: "BlockStagedModel", k: int) -> None:
        self.staged, self.k = staged, k

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        state = self.staged.state
        aux = state["aux"]
        if aux is None:
            return None
        aux.append(self.staged.heads[self.k](_first_tensor(output)))
        state["stage"] = self.k + 1
        detached, _ = _detach_all(output)
        return detached


class _BlockOutputs:
    """Forward hook of every block while ``run`` runs: which stage made each tensor a block returned."""

    def __init__(self, staged: "BlockStagedModel", stage: int) -> None:
        self.staged, self.stage = staged, stage

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        made = self.staged.state["made_by"]
        if made is not None:  # a list searched by identity: Dynamo (torch 2.11) breaks the graph at id(tensor)
            made.extend((self.stage, leaf) for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))


class _SideInputs:
    """Forward pre-hook of a later stage's block that receives trainable tensors besides its hidden
    state: while ``run`` runs, each such tensor that no block of this stage made (an encoder
    output, a position bias from an earlier stage) is passed detached, one detached copy per tensor."""

    def __init__(self, staged: "BlockStagedModel", stage: int) -> None:
        self.staged, self.stage = staged, stage

    def _detached(self, leaf: Any) -> Any:
        state = self.staged.state
        if not (isinstance(leaf, torch.Tensor) and leaf.requires_grad):
            return leaf
        if any(stage == self.stage and made is leaf for stage, made in state["made_by"]):
            return leaf
        for source, detached in state["detached"]:  # one detached copy per tensor
            if source is leaf:
                return detached
        detached = leaf.detach()
        state["detached"].append((leaf, detached))
        return detached

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[Tuple[tuple, dict]]:
        if self.staged.state["made_by"] is None or not args:
            return None
        rest, kwargs = pytree.tree_map(self._detached, (args[1:], kwargs))
        return (args[0],) + tuple(rest), kwargs


def _shared_places(model: nn.Module, plan: BlockStagePlan) -> List[Tuple[List[Tuple[nn.Module, str]], int]]:
    """Per parameter used by several stages: every (module, attribute) holding it (a tied weight
    has several) and its owning stage."""
    places: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                places.setdefault(id(parameter), []).append((module, name))
    named = dict(model.named_parameters())
    return [(places[id(named[name])], plan.owners[name]) for name in plan.shared]


class BlockStagedModel:
    """The runtime view of a model staged on the block-stack hook path (``model.__dict__``)."""

    kind = CUT_KIND

    def __init__(self, model: nn.Module, plan: BlockStagePlan, heads_attr: str) -> None:
        self.model = model
        self.plan = plan
        self._heads_attr = heads_attr
        self._owners = _shared_places(model, plan)
        # "aux": the list the cut hooks append stage outputs to while ``run`` runs (None otherwise:
        # a plain forward of the model is not cut).
        self.state: Dict[str, Any] = {"stage": 0, "aux": None, "made_by": None, "detached": []}
        modules = dict(model.named_modules())
        # Kept with the other passes' hooks of the model (``fold`` removes them).
        handles = model.__dict__.setdefault("_effcompile_hooks", {}).setdefault(GreedyStages.name, [])
        handles += [modules[plan.stack.blocks[c]].register_forward_hook(_CutHook(self, k))
                    for k, c in enumerate(plan.cuts)]
        if plan.side_inputs:
            for index, path in enumerate(plan.stack.blocks):
                stage = _stage_of(index, plan.cuts)
                handles.append(modules[path].register_forward_hook(_BlockOutputs(self, stage)))
                if index in plan.side_inputs:
                    handles.append(modules[path].register_forward_pre_hook(_SideInputs(self, stage), with_kwargs=True))

    def hooks_after_fsdp(self) -> None:
        """Run the cut hooks after FSDP2's forward hooks (``fully_shard`` after ``transform``
        appended its own): FSDP2's post-forward then registers its pre-backward unshard on the
        block's real output — the one the aux head reads — before the cut detaches it, so a
        stage's backward unshards the block by that hook, not by the prefetch of a later block."""
        for handle in self.model.__dict__.get("_effcompile_hooks", {}).get(GreedyStages.name, []):
            hook_runs_last(handle)

    @property
    def num_stages(self) -> int:
        return self.plan.num_stages

    @property
    def heads(self) -> nn.ModuleList:
        return self.model._modules[self._heads_attr]

    @property
    def boundary_shapes(self) -> List[tuple]:
        return list(self.plan.boundary_shapes)

    def _check(self, k: int) -> int:
        if not (isinstance(k, int) and -self.num_stages <= k < self.num_stages):
            raise IndexError(f"stage {k!r} out of range for {self.num_stages} stages")
        return k % self.num_stages

    def stage(self, k: int) -> nn.Module:
        raise NotImplementedError(
            "greedy_stages: this model is staged on the block-stack hook path (its root forward cannot be traced by "
            "torch.fx), which runs the model's own forward with hooks at the cuts; there is no separate module per "
            "stage. Train it with effcompile.train_step (one process); the multi-process stage runtime and "
            "saved_activation_bytes need the fx path")

    def head(self, k: int) -> Optional[nn.Module]:
        k = self._check(k)
        return None if k == self.num_stages - 1 else self.heads[k]

    def stage_modules(self, k: int) -> List[str]:
        """The blocks of stage k (modules outside the stack: see ``stage_parameters`` / the Plan)."""
        return self.plan.stage_blocks(self._check(k))

    def stage_attributes(self, k: int) -> List[str]:
        return []

    def stage_parameters(self, k: int) -> List[nn.Parameter]:
        """Parameters owned by stage k (its blocks, embeddings for stage 0, the model's head for the
        last) and its aux head; every parameter belongs to exactly one stage."""
        k = self._check(k)
        found: Dict[int, nn.Parameter] = {}
        for name, parameter in self.model.named_parameters():
            if name.startswith(self._heads_attr + "."):
                continue
            if self.plan.owners.get(name, self.num_stages - 1) == k:
                found.setdefault(id(parameter), parameter)
        head = self.head(k)
        if head is not None:
            for parameter in head.parameters():
                found.setdefault(id(parameter), parameter)
        return list(found.values())

    def run(self, inputs: Any) -> Tuple[Any, List[torch.Tensor]]:
        """The model's forward with the cuts: ``(output, [aux output of stage k for k < K−1])``.

        The cut hooks stay registered (registering them per call would break a compiled step's
        graph); they act only while ``state["aux"]`` is a list."""
        aux: List[torch.Tensor] = []
        self.state["stage"] = 0
        self.state["aux"] = aux
        if self.plan.side_inputs:
            self.state["made_by"], self.state["detached"] = [], []
        try:
            if self._owners:
                with _DetachForeign(self._owners, lambda: self.state["stage"]):
                    output = call(self.model, inputs)
            else:
                output = call(self.model, inputs)
        finally:
            self.state["aux"] = None
            self.state["stage"] = 0
            self.state["made_by"], self.state["detached"] = None, []
        if len(aux) != len(self.plan.cuts):
            raise RuntimeError(f"greedy_stages: {len(aux)} of {len(self.plan.cuts)} cut blocks ran in this forward")
        return output, aux

    def stage_outputs(self, inputs: Any) -> List[Any]:
        """Every stage's output in the model's output type (aux logits in place of the first tensor)."""
        output, aux = self.run(inputs)
        return [replace_first_tensor(output, a) for a in aux] + [output]

    def predict(self, inputs: Any, stage: Optional[int] = None) -> torch.Tensor:
        """Stage ``stage``'s logits (default: the last stage's), in eval mode, without grad."""
        k = self.num_stages - 1 if stage is None else self._check(stage)
        with evaluating(self.model):
            output, aux = self.run(inputs)
        return aux[k] if k < len(aux) else _first_tensor(output)

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        return self.model(*inputs, **kwargs)

    def __repr__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.boundary_shapes)
        return f"BlockStagedModel({self.num_stages} stages of {self.plan.stack.path!r}, boundaries: {shapes})"


class _BlockStageLosses(StageLosses):
    """Every stage's loss of one batch on the hook path: the model's forward with its cuts, the aux
    heads and the losses (one compiled graph with ``compile=True``).

    ``objective(output, targets, k) -> (loss, selection, reported)`` makes stage k's loss from its
    output (the model's output with the aux logits in place of its first tensor): the plain loss,
    or with sample selection composed, the weighted loss of the rows the stage selects by its own
    per-sample losses (forward reuse: the model's forward ran once, over the whole batch, and
    each stage backpropagates its subset; ``greedy_stages.rewrite._stage_objective``)."""

    def __init__(self, model: nn.Module, staged: BlockStagedModel, objective: Callable, options: Any) -> None:
        from effcompile.compiling import compile_for
        from effcompile.passes.sample_selection.selectors import selector_of

        def stage_losses(inputs: Any, targets: Any) -> List[tuple]:
            output, aux = staged.run(inputs)
            outputs = [replace_first_tensor(output, a) for a in aux] + [output]
            return [objective(out, targets, k) for k, out in enumerate(outputs)]

        self.losses = compile_for(model, stage_losses, backend=options.backend, dynamic=False) if options.compile \
            else stage_losses
        self.options, self.steps = options, 0
        self.selector = selector_of(model)
        self.batch = training_batch(model)
        self.stage_losses: List[torch.Tensor] = []  # each stage's loss on the whole batch (selection: per-sample mean)
        self.stage_subset_losses: List[torch.Tensor] = []  # what each stage backpropagated

    def run(self, inputs: Any, targets: Any, backward_each: bool) -> List[torch.Tensor]:
        from effcompile.api import check_finite_loss

        results = self.losses(self.batch(inputs), targets)
        losses = [loss for loss, _, _ in results]
        if self.options.check_finite:
            for loss in losses:
                check_finite_loss(loss, self.steps)
        for _, selection, _ in results:  # the report's selection counters: the last stage's selection
            if selection is not None:
                self.selector.record(*selection)
        self.stage_losses = [reported for _, _, reported in results]
        self.stage_subset_losses = [loss.detach() for loss in losses]
        self.steps += 1
        if backward_each:  # one backward over all: the stages' graphs are disjoint, the model's forward is one
            self.options.backward(losses)
            return []
        return losses


def block_stage_losses(model: nn.Module, staged: BlockStagedModel, objective: Callable, options: Any) -> StageLosses:
    """The stage losses of the hook path (the step and ``training_loss`` run them); ``objective``:
    see ``_BlockStageLosses``."""
    return _BlockStageLosses(model, staged, objective, options)


def make_block_training_loss(model: nn.Module, staged: BlockStagedModel, objective: Callable, options: Any) -> Callable:
    """``effcompile.training_loss`` on the hook path: the sum of the stage losses."""
    return block_stage_losses(model, staged, objective, options).training_loss
