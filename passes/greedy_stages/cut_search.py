"""Graph analysis for greedy local-loss stages: a stage-able trace, boundaries, costs, the cut DP.

Graph before: the model's ``forward`` (Python).  Graph after: one ``torch.fx`` graph of the whole
forward (``trace_for_stages``) and, for the chosen cuts, one ``fx.GraphModule`` per stage
(``split_stages``): stage 0 takes the model inputs, stage k>0 exactly one tensor — the boundary
activation — and each non-last stage returns its boundary.

1. ``trace_for_stages(model)`` traces the model with ``torch.fx`` symbolic tracing.  The leaves
   (``call_module`` nodes that run the original module objects, so other passes' class swaps,
   weight properties and hooks keep working) follow ``LEAF_RULES`` below.  A non-root module whose
   forward cannot be traced becomes a leaf automatically; a module whose train and eval traces
   differ (it branches on ``self.training``) becomes a leaf when it is a stochastic regulariser
   (parameter-free and the identity in eval: drop-path / stochastic depth written by hand) and
   otherwise raises :class:`StageTraceError` naming that module, its class and the fix.
2. ``find_boundaries(traced, values, probe)`` lists the *candidate boundaries*: every position in
   the node order where exactly one *activation* crosses — one floating, batch-first tensor that
   depends on the model's tensor inputs is defined before and used after.  What never counts as
   crossing (each stage recomputes or bakes it itself, see ``value_kind``):

   * values that do not depend on a tensor input: constants, ``None``/bool flags, root forward
     arguments left at their defaults, parameter and buffer reads, masks built from them;
   * non-tensor values derived from the activation's *shape* (``x.shape``, ``x.size(0)``,
     ``B, N, C = x.shape``): with the batch probe (the same graph run on a batch one row larger)
     a value equal on both batches is baked as a literal, and an int (or a tuple of ints) linear
     in the batch size is rebuilt from the boundary's batch axis in the later stage.

   A trainable parameter (or a leaf module's state) used on both sides forbids the cut (its
   gradient would come from two local losses).  Cuts are *not* limited to module ends: a point
   inside a residual chain (``x = relu(x + block(x))``), inside a container that owns parameters
   (an encoder owning ``pos_embedding``) or between the blocks of a ``ModuleList`` is a candidate
   when one activation crosses there.  A boundary is named by the outermost module whose forward
   ends there (``Boundary.label``, e.g. ``blocks.3``) or, when no module ends there, by its node
   (``Boundary.value``, e.g. ``relu_3``; ``Boundary.kind == "node"``).
3. ``measure_node_costs(traced, example_inputs)`` runs the graph node by node on the example
   inputs and counts each node's forward and backward FLOPs with
   ``torch.utils.flop_counter.FlopCounterMode`` (backward measured, not estimated: the node's
   output is back-propagated to its floating inputs and parameters).
4. ``min_max_partition`` chooses the K−1 cuts minimising the most expensive stage by dynamic
   programming (ties: smaller total, then fewer node-named cuts, i.e. module ends preferred);
   ``split_stages`` cuts the graph into one ``fx.GraphModule`` per stage.

Cost of a stage (FLOP-equivalents; every term is linear in the batch size, so the example batch
ranks cuts the same way as the training batch)::

    cost = Σ_{nodes n in stage} (fwd_n + bwd_n) + (fwd + bwd of its aux head)
           + bytes_weight · (bytes of its input boundary + bytes of its output boundary)
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from effcompile.passes.analysis.side_effects import module_state_restored

__all__ = [
    "LEAF_RULES", "STOCHASTIC_LEAF_NAMES", "register_leaf_module", "StageTraceError", "TracedModel", "Boundary",
    "NodeCost", "trace_for_stages", "live_values", "find_boundaries", "crossing_values", "probe_batch_values",
    "measure_node_costs", "count_flops", "stage_costs", "min_max_partition", "boundary_for_module", "split_stages",
    "trainable_elements", "batch_dependent_value",
]

COMPUTE_OPS = ("call_module", "call_function", "call_method")
# Ops that only change a tensor's shape or strides: a value that one of them makes and only such
# ops read is a shape in the middle of a reshuffle (ShuffleNet's channel_shuffle views its map as
# (B, groups, C/groups, H, W), transposes and views it back), not a boundary an aux head can read.
_LAYOUT_NAMES = frozenset(("view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten",
                           "squeeze", "unsqueeze", "swapaxes", "movedim", "expand", "view_as", "reshape_as"))


def _layout_op(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _LAYOUT_NAMES
    return node.op == "call_function" and getattr(node.target, "__name__", None) in _LAYOUT_NAMES


def _mid_reshuffle(node: fx.Node) -> bool:
    """A value made by a layout op and read only by layout ops (:data:`_LAYOUT_NAMES`)."""
    return _layout_op(node) and bool(node.users) and all(_layout_op(user) for user in node.users)

# What the tracer keeps as a leaf (a ``call_module`` node running the original module), and why.
LEAF_RULES: Tuple[Tuple[str, str], ...] = (
    ("owns parameters or buffers directly",
     "each parameter then has exactly one owning leaf, so it belongs to exactly one stage, and the "
     "per-module rewrites of other passes (decorrelation's fused-weight properties, randomized VJP's "
     "class swaps) run unchanged because the stage calls the original module object.  A module that "
     "owns parameters *and* has submodules with trainable parameters (an encoder owning pos_embedding, "
     "a model owning a class token) is a container: it is traced through and its own parameters are "
     "read as get_attr nodes, so it can be cut inside"),
    ("carries forward hooks or pre-hooks",
     "hooks (e.g. decorrelation's input observers) only fire when the module itself is called"),
    ("is a torch.nn built-in other than a container",
     "built-ins such as nn.MultiheadAttention hold argument checks symbolic tracing cannot follow, "
     "and they are the units users name in cuts= and reports (nn.Dropout* included)"),
    ("is registered with register_leaf_module", "a user-declared leaf, with the reason given there"),
    ("is a stochastic regulariser",
     "a parameter-free module whose class (or a base class) is named like StochasticDepth / DropPath / "
     "DropBlock / Drop* (torchvision, timm), or a parameter-free module that branches on self.training and "
     "is the identity in eval: it runs whole, so train and eval behave as the original"),
    ("its forward could not be traced", "data-dependent control flow inside it; it runs eagerly as one leaf"),
)

# Class names (or base class names) of stochastic-depth / drop-path style regularisers.
STOCHASTIC_LEAF_NAMES = ("StochasticDepth", "DropPath", "DropBlock", "DropBlock2d", "DropBlock3d", "DropConnect")
_STOCHASTIC_PATTERN = re.compile(r"^(Drop[A-Z0-9]|Dropout|StochasticDepth)")

_USER_LEAF_TYPES: Dict[type, str] = {}


def register_leaf_module(cls: type, reason: str) -> None:
    """Keep every module of class ``cls`` whole in the stage trace (``reason`` shows in errors).

    Exposed as ``effcompile.passes.greedy_stages.register_leaf_module``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {cls!r}")
    _USER_LEAF_TYPES[cls] = reason


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without grad for the block; every module's training flag restored after."""
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags.items():
            module.training = flag


class StageTraceError(ValueError):
    """The model's forward cannot be traced into stages."""


def _stateless(module: nn.Module) -> bool:
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


def is_stochastic_regulariser(module: nn.Module) -> bool:
    """A parameter-free module whose class or a base class is named like a drop-path/stochastic-depth layer."""
    if not _stateless(module):
        return False
    names = [cls.__name__ for cls in type(module).__mro__ if cls not in (nn.Module, object)]
    return any(name in STOCHASTIC_LEAF_NAMES or _STOCHASTIC_PATTERN.match(name) for name in names)


def leaf_reason(module: nn.Module, path: str, forced: Dict[str, str]) -> Optional[str]:
    """Which of ``LEAF_RULES`` makes ``module`` a leaf, or None when the tracer enters it.

    ``forced``: module path → reason, for leaves found while tracing (untraceable forwards,
    stochastic regularisers found by their train/eval difference).
    """
    if path in forced:
        return forced[path]
    owns = (next(module.parameters(recurse=False), None) is not None
            or next(module.buffers(recurse=False), None) is not None)
    if owns and path:
        rewritten = hasattr(type(module), "_effcompile_original_class")  # another pass swapped its class
        container = any(p.requires_grad for child in module.children() for p in child.parameters())
        if rewritten or not container:
            return LEAF_RULES[0][0]
    if module._forward_hooks or module._forward_pre_hooks:
        return LEAF_RULES[1][0]
    for cls, reason in _USER_LEAF_TYPES.items():
        if isinstance(module, cls):
            return f"registered leaf: {reason}"
    builtin = type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))
    if builtin and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return LEAF_RULES[2][0]
    if is_stochastic_regulariser(module):
        return LEAF_RULES[4][0]
    return None


class _StageTracer(fx.Tracer):
    # Buffers read in a traced-through forward become get_attr nodes (read at run time), not
    # tensor constants frozen at trace time (a mask buffer that changes must be seen changing).
    proxy_buffer_attributes = True

    def __init__(self, forced: Optional[Dict[str, str]] = None) -> None:
        # forced defaults to none: unpickling a stage (torch.load of a staged model) re-traces it
        # with a subclass of this tracer built without arguments.
        super().__init__()
        self.forced = forced or {}

    def is_leaf_module(self, module: nn.Module, path: str) -> bool:
        return leaf_reason(module, path, self.forced) is not None


@dataclasses.dataclass
class TracedModel:
    """The stage-able trace of a model."""

    graph_module: fx.GraphModule
    nodes: List[fx.Node]  # every node in topological order (placeholders first, output last)
    leaves: Dict[str, str]  # leaf module path → the rule that made it a leaf
    untraceable: Dict[str, str]  # module path → why its forward could not be traced
    auto_leaves: Dict[str, str] = dataclasses.field(default_factory=dict)  # path → why (training branch)
    num_inputs: int = 0  # placeholders given by the example inputs (the rest keep their defaults)
    # node name → how a later stage gets that value (``value_kind``), set by ``find_boundaries``.
    value_kinds: Dict[str, tuple] = dataclasses.field(default_factory=dict)


def _describe_construct(error: BaseException) -> str:
    message = (str(error).strip().splitlines() or [""])[0]
    if "control flow" in message or "iterate" in message or "bool" in message.lower():
        return f"data-dependent control flow or Python use of a traced value ({type(error).__name__}: {message})"
    return f"{type(error).__name__}: {message}"


def _trace_once(model: nn.Module, untraceable: Dict[str, str], auto: Dict[str, str]) -> fx.GraphModule:
    while True:
        forced = {path: f"its forward could not be traced: {why}" for path, why in untraceable.items()}
        forced.update(auto)
        tracer = _StageTracer(forced)
        try:
            with module_state_restored(model):  # a forward that caches a value would keep a Proxy
                graph = tracer.trace(model)
        except Exception as error:  # find the innermost module being traced when it failed
            stack = list(tracer.module_stack.values())
            path = stack[-1][0] if stack else ""
            construct = _describe_construct(error)
            if not path or path in untraceable:
                where = f"module {path!r}" if path else f"the root forward of {type(model).__name__}"
                raise StageTraceError(
                    f"greedy_stages: cannot trace {where} with torch.fx: {construct}. Stages are cut from a "
                    "symbolic trace; write the branch with torch.where/torch.cond, move it into a submodule "
                    "(which then runs whole inside one stage), or give a simpler forward. cuts= only chooses "
                    "among traceable boundaries.") from error
            untraceable[path] = construct
            continue
        return fx.GraphModule(tracer.root, graph, class_name=f"{type(model).__name__}Staged")


def _innermost_module(node: fx.Node) -> str:
    """The module whose forward created ``node`` (for a leaf call: the caller, not the leaf)."""
    stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module" and stack and stack[-1] == node.target:
        stack = stack[:-1]
    return stack[-1] if stack else ""


_TENSOR_CONSTANT = re.compile(r"_tensor_constant\d+")


def _signature(node: fx.Node) -> str:
    """What a node computes, without node identities (names shift when one trace has extra nodes;
    fx numbers the tensor constants it creates per trace)."""
    args = fx.node.map_arg((node.args, node.kwargs), lambda n: "%")
    target = _TENSOR_CONSTANT.sub("_tensor_constant", str(node.target))
    return f"{node.op}|{target}|{args!r}|{_innermost_module(node)}"


def _wired_signatures(gm: fx.GraphModule) -> List[str]:
    """Every node's signature with its inputs as node indices: equal lists = the same program."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    out = []
    for node in gm.graph.nodes:
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        out.append(f"{_signature(node)}|{args!r}")
    return out


def _training_culprits(train: fx.GraphModule, evaluation: fx.GraphModule) -> List[str]:
    """Module paths (innermost) whose code differs between the train and the eval trace ("" = root)."""
    a, b = list(train.graph.nodes), list(evaluation.graph.nodes)
    matcher = difflib.SequenceMatcher(None, [_signature(n) for n in a], [_signature(n) for n in b], autojunk=False)
    found: List[str] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        for node in a[i1:i2] + b[j1:j2]:
            path = _innermost_module(node)
            if path not in found:
                found.append(path)
    if not found:  # the same ops, wired differently (``return y if self.training else z``)
        for node, wired, other in zip(a, _wired_signatures(train), _wired_signatures(evaluation)):
            if wired != other:
                return [_innermost_module(node)]
    return found


def _eval_identity(evaluation: fx.GraphModule, path: str) -> bool:
    """No node of the eval trace was created inside module ``path``: it returned its input."""
    for node in evaluation.graph.nodes:
        stack = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if path in stack:
            return False
    return True


def trace_for_stages(model: nn.Module, num_inputs: Optional[int] = None) -> TracedModel:
    """Trace ``model`` with the stage leaf rules (see the module docstring).

    The trace is taken in training and in eval mode; a traced-through forward that branches on
    ``self.training`` would freeze one branch into the stages.  The modules whose code differs
    between the traces are found node by node (``nn_module_stack``): a parameter-free one that is
    the identity in eval becomes a leaf (a stochastic regulariser); any other raises
    :class:`StageTraceError` naming that module's path and class and the fix.
    ``num_inputs``: how many positional inputs the example gives (default: every placeholder).
    """
    was_training = {module: module.training for module in model.modules()}
    modules = dict(model.named_modules())
    untraceable: Dict[str, str] = {}
    auto: Dict[str, str] = {}
    try:
        while True:
            model.train()
            traced = _trace_once(model, untraceable, auto)
            model.eval()
            known = len(untraceable)
            traced_eval = _trace_once(model, untraceable, auto)
            if len(untraceable) != known:
                continue  # the eval trace found another untraceable module: trace train again
            if _wired_signatures(traced) == _wired_signatures(traced_eval):
                break
            added = False
            for path in _training_culprits(traced, traced_eval):
                if path == "":
                    raise StageTraceError(
                        f"greedy_stages: the forward of {type(model).__name__} (the root) branches on self.training "
                        "outside a leaf module (its train and eval traces differ); stages would freeze one branch. "
                        "Move that code into a submodule and register its class with "
                        "effcompile.passes.greedy_stages.register_leaf_module(cls, reason), or use torch.nn.Dropout-"
                        "style built-in modules.")
                module = modules[path]
                if _stateless(module) and not any(True for _ in module.children()) and _eval_identity(traced_eval, path):
                    auto[path] = (f"{LEAF_RULES[4][0]}: parameter-free, branches on self.training and is the "
                                  "identity in eval")
                    added = True
                    continue
                cls = type(module)
                raise StageTraceError(
                    f"greedy_stages: module {path!r} ({cls.__module__}.{cls.__qualname__}) branches on self.training "
                    f"in a forward the stage tracer enters (its train and eval traces differ), so the stages would "
                    f"freeze one branch. Fix: effcompile.passes.greedy_stages.register_leaf_module("
                    f"{cls.__qualname__}, reason) before transform — the module then runs whole (both modes) inside "
                    "one stage; or write the branch without self.training.")
            if not added:
                raise StageTraceError(f"greedy_stages: the train and eval traces of {type(model).__name__} differ "
                                      "and no module could be blamed; register the module that branches on "
                                      "self.training with register_leaf_module")
    finally:
        for module, flag in was_training.items():
            module.training = flag
    leaves = {}
    forced = {path: f"its forward could not be traced: {why}" for path, why in untraceable.items()}
    forced.update(auto)
    for node in traced.graph.nodes:
        if node.op == "call_module":
            leaves[node.target] = leaf_reason(modules[node.target], node.target, forced) or ""
    placeholders = sum(1 for n in traced.graph.nodes if n.op == "placeholder")
    return TracedModel(traced, list(traced.graph.nodes), leaves, untraceable, auto,
                       placeholders if num_inputs is None else min(num_inputs, placeholders))


# ------------------------------------------------------------------------------------ boundaries
@dataclasses.dataclass(frozen=True)
class Boundary:
    """A cut after ``nodes[position]``: exactly the activation of node ``value`` crosses it."""

    position: int
    value: str  # name of the node whose value crosses
    label: str  # the outermost module whose forward ends here ("" if none)
    shape: Tuple[int, ...]
    dtype: torch.dtype
    nbytes: int

    @property
    def kind(self) -> str:
        """``"module"`` (a module's forward ends here) or ``"node"`` (named by its crossing node)."""
        return "module" if self.label else "node"

    @property
    def name(self) -> str:
        """What ``cuts=`` and the Plan call this boundary: the module path, else the node name."""
        return self.label or self.value


def live_values(nodes: Sequence[fx.Node]) -> List[List[fx.Node]]:
    """For each position i, the nodes (not ``get_attr``) defined at or before i and used after i."""
    index = {node: i for i, node in enumerate(nodes)}
    last_use = {node: max((index[user] for user in node.users), default=index[node]) for node in nodes}
    live: List[List[fx.Node]] = []
    for i in range(len(nodes)):
        live.append([node for node in nodes[: i + 1] if node.op != "get_attr" and last_use[node] > i])
    return live


_RANDOM_NAMES = ("rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli",
                 "bernoulli_", "normal", "normal_", "uniform_", "dropout", "multinomial", "exponential_")


def _is_random(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name in _RANDOM_NAMES


_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


def _is_literal(value: Any) -> bool:
    if isinstance(value, _SIMPLE):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_literal(item) for item in value)
    return False


def _batch_spec(value: Any, probe: Any, batch: int) -> Optional[tuple]:
    """How ``value`` (at batch ``batch``) depends on the batch size, from its value at ``batch + 1``.

    ``("int", a, c)``: ``a·B + c``; ``("seq", type name, [specs])``; ``("lit", v)``: independent.
    None when it is not an int (or tuple/list of ints) affine in the batch size.
    """
    if isinstance(value, bool) or isinstance(probe, bool):
        return ("lit", value) if value == probe and type(value) is type(probe) else None
    if isinstance(value, int) and isinstance(probe, int):
        a = probe - value
        return ("lit", value) if a == 0 else ("int", a, value - a * batch)
    if isinstance(value, (tuple, list)) and isinstance(probe, (tuple, list)) and len(value) == len(probe):
        specs = [_batch_spec(v, p, batch) for v, p in zip(value, probe)]
        if any(s is None for s in specs):
            return None
        kind = "size" if isinstance(value, torch.Size) else type(value).__name__
        if kind not in ("size", "tuple", "list"):
            return None
        return ("seq", kind, tuple(specs))
    if _is_literal(value) and _is_literal(probe) and value == probe:
        return ("lit", value)
    return None


def batch_dependent_value(boundary: torch.Tensor, spec: tuple) -> Any:
    """Rebuild a shape-derived value from the boundary's batch axis (``_batch_spec``'s ``spec``)."""
    if spec[0] == "lit":
        return spec[1]
    if spec[0] == "int":
        return spec[1] * boundary.shape[0] + spec[2]
    items = [batch_dependent_value(boundary, item) for item in spec[2]]
    return torch.Size(items) if spec[1] == "size" else list(items) if spec[1] == "list" else tuple(items)


def _spec_is_literal(spec: tuple) -> bool:
    return spec[0] == "lit" or (spec[0] == "seq" and all(_spec_is_literal(s) for s in spec[2]))


def _example_batch(traced: TracedModel, values: Dict[str, Any]) -> Optional[int]:
    for node in traced.nodes[: traced.num_inputs]:
        value = values.get(node.name)
        if node.op == "placeholder" and isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def value_kinds(traced: TracedModel, values: Dict[str, Any],
                probe: Optional[Dict[str, Any]] = None) -> Dict[str, tuple]:
    """How a later stage gets each node's value, by node name:

    * ``("const",)``: it does not depend on an activation (a constant, a root argument left at
      its default or given as a non-tensor, a parameter/buffer read, a mask built from those and
      from shape values): the later stage recomputes it (copies the node and what it needs;
      placeholders become their example value).  Random ops and module calls never count.
    * ``("batch", spec)``: a non-tensor derived from the activation's shape (``x.shape``,
      ``x.size(0)``): a literal when equal on the example and the probe batch, else ints affine in
      the batch size rebuilt from the boundary (``batch_dependent_value``).  Needs ``probe``.
    * ``("cross",)``: an activation: it can only reach a later stage as the boundary tensor.
    """
    kinds: Dict[str, tuple] = {}
    batch = _example_batch(traced, values)
    for position, node in enumerate(traced.nodes):
        if node.op == "output":
            continue
        if node.op == "placeholder":
            tensor = isinstance(values.get(node.name), torch.Tensor)
            kinds[node.name] = (("cross",) if tensor and position < traced.num_inputs
                                else ("const", values.get(node.name)))
            continue
        inputs = node.all_input_nodes
        # A node made only of constants and of shape values a later stage can rebuild is itself
        # recomputed there (``torch.zeros(B, 1, C)``, ``self.mask[:N, :N]``, ``self.bias.to(x.dtype)``).
        dependent = any(kinds.get(a.name, ("cross",))[0] == "cross" for a in inputs)
        if not dependent and node.op != "call_module" and not _is_random(node):
            kinds[node.name] = ("const",)
            continue
        value = values.get(node.name)
        if not isinstance(value, torch.Tensor) and probe is not None and batch is not None and node.name in probe:
            spec = _batch_spec(value, probe[node.name], batch)
            if spec is not None:
                kinds[node.name] = ("batch", spec)
                continue
        kinds[node.name] = ("cross",)
    return kinds


def _state_spans(traced: TracedModel, kinds: Dict[str, tuple]) -> List[Tuple[int, int, str]]:
    """(first, last use position, name) of every trainable parameter read and every stateful leaf.

    A cut inside a span would put that state in two stages (two local losses for one parameter).
    A parameter read through constants (``pos = self.pos * 2``) is used where those are used.
    Buffers read directly (``get_attr``) are not state here: every stage may read them.
    """
    gm = traced.graph_module
    index = {node: i for i, node in enumerate(traced.nodes)}
    uses: Dict[int, Tuple[str, List[int]]] = {}
    feeds: Dict[fx.Node, Dict[int, str]] = {}  # constant node → trainable parameters it was made from
    for position, node in enumerate(traced.nodes):
        if node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            feeds[node] = ({id(value): node.target} if isinstance(value, nn.Parameter) and value.requires_grad
                           else {})
            continue
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                uses.setdefault(id(tensor), (f"{node.target}.{name}", []))[1].append(position)
        carried: Dict[int, str] = {}
        for arg in node.all_input_nodes:
            carried.update(feeds.get(arg, {}))
        if kinds.get(node.name, ("cross",))[0] == "const" and node.op != "output":
            feeds[node] = carried
            continue
        for key, name in carried.items():
            uses.setdefault(key, (name, []))[1].append(position)
    del index
    return [(min(p), max(p), name) for name, p in uses.values()]


def crossing_values(traced: TracedModel, position: int) -> List[fx.Node]:
    """The activations (``value_kinds`` ``cross``) defined at or before ``position`` and used after it."""
    kinds = traced.value_kinds
    index = {node: i for i, node in enumerate(traced.nodes)}
    return [node for node in traced.nodes[: position + 1]
            if kinds.get(node.name, ("cross",))[0] == "cross" and node.op not in ("get_attr", "output")
            and any(index[user] > position for user in node.users)]


def _module_end_positions(traced: TracedModel) -> Dict[str, int]:
    """Module path → position of the last node inside that module's forward."""
    ends: Dict[str, int] = {}
    for position, node in enumerate(traced.nodes):
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path:
                ends[path] = position
        if node.op == "call_module":
            ends[node.target] = position
    return ends


def find_boundaries(traced: TracedModel, values: Dict[str, Any],
                    probe: Optional[Dict[str, Any]] = None) -> Tuple[List[Boundary], List[int]]:
    """Candidate boundaries, plus every position's crossing-activation count (for error messages).

    ``values`` holds each node's value on the example inputs (from ``measure_node_costs``);
    ``probe`` the values on a batch one row larger (``probe_batch_values``; without it every
    activation-derived non-tensor counts as crossing, and the batch axis is not verified).
    Sets ``traced.value_kinds`` (what ``split_stages`` needs).
    """
    nodes = traced.nodes
    kinds = value_kinds(traced, values, probe)
    traced.value_kinds = kinds
    index = {node: i for i, node in enumerate(nodes)}
    n = len(nodes)
    count_delta, index_delta = [0] * (n + 1), [0] * (n + 1)
    for node in nodes:
        if node.op in ("get_attr", "output") or kinds.get(node.name, ("cross",))[0] != "cross":
            continue
        start = index[node]
        last = max((index[user] for user in node.users), default=start)
        if last > start:  # live on positions start .. last-1
            count_delta[start] += 1
            count_delta[last] -= 1
            index_delta[start] += start
            index_delta[last] -= start
    live_counts, live_index = [], []
    count = total = 0
    for i in range(n):
        count += count_delta[i]
        total += index_delta[i]
        live_counts.append(count)
        live_index.append(total)
    compute = [i for i, node in enumerate(nodes) if node.op in COMPUTE_OPS]
    if not compute:
        return [], live_counts
    last_compute = compute[-1]
    spans = _state_spans(traced, kinds)
    batch = _example_batch(traced, values)
    labels = _labels(traced)
    out = []
    for i in compute:
        if i >= last_compute or live_counts[i] != 1:
            continue
        node = nodes[live_index[i]]
        value = values.get(node.name)
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2):
            continue
        if _mid_reshuffle(node):  # the cut lands before or after the reshuffle, at the same cost
            continue
        if probe is not None and batch is not None:  # the boundary's first axis must be the batch
            probed = probe.get(node.name)
            if not (isinstance(probed, torch.Tensor) and value.shape[0] == batch and probed.shape[0] == batch + 1):
                continue
        if any(first <= i < last for first, last, _ in spans):
            continue  # a trainable parameter or a stateful leaf would be used in two stages
        out.append(Boundary(i, node.name, labels.get(i, ""), tuple(value.shape), value.dtype,
                            value.numel() * value.element_size()))
    return out, live_counts


def _labels(traced: TracedModel) -> Dict[int, str]:
    """Position → the outermost module path whose forward ends at that position."""
    labels: Dict[int, str] = {}
    for path, position in _module_end_positions(traced).items():
        current = labels.get(position)
        if current is None or path.count(".") < current.count("."):
            labels[position] = path
    return labels


def merge_equivalent(boundaries: Sequence[Boundary], node_costs: Sequence[int],
                     head_cost: Callable[[Boundary], float], bytes_weight: float) -> List[Boundary]:
    """Drop candidates that another candidate dominates without changing any stage's FLOPs.

    Consecutive candidates with only zero-cost nodes between them (a residual add and the ReLU
    after it, a block end and the next block's shape reads) give every stage the same node FLOPs;
    of such a group the ones not dominated on (head cost + bytes, bytes) are kept; among equals a
    module end beats a node, and the outermost module (``features.1`` over its last conv's
    ``features.1.0.block.3.0``, before that conv's BatchNorm) beats inner ones, then the later
    position (after a residual sum's ReLU rather than between the sum and the ReLU).  Keeps the DP small (every node can be a candidate now) and exact.
    """
    groups: List[List[Boundary]] = []
    for boundary in sorted(boundaries, key=lambda b: b.position):
        if groups and sum(node_costs[groups[-1][-1].position + 1: boundary.position + 1]) == 0:
            groups[-1].append(boundary)
        else:
            groups.append([boundary])
    kept: List[Boundary] = []
    for group in groups:
        scored = [(head_cost(b) + bytes_weight * b.nbytes, bytes_weight * b.nbytes, b.kind != "module",
                   b.label.count("."), -b.position, b) for b in group]
        scored.sort(key=lambda item: item[:5])
        front: List[tuple] = []
        for item in scored:
            if not any(f[0] <= item[0] and f[1] <= item[1] for f in front):
                front.append(item)
        kept.extend(item[-1] for item in front)
    return sorted(kept, key=lambda b: b.position)


def _leaf_containing(traced: TracedModel, path: str) -> Optional[str]:
    for leaf in traced.leaves:
        if path.startswith(leaf + "."):
            return leaf
    return None


def boundary_for_module(traced: TracedModel, model: nn.Module, path: str, boundaries: Sequence[Boundary],
                        live_counts: Sequence[int]) -> Boundary:
    """The boundary right after the forward of module ``path`` (or after node ``path``).

    ``ValueError`` stating the real reason when it is not a boundary: not a module path or node
    name, inside a leaf (and why it is a leaf), called more than once, never called, or which
    values cross there — with the nearest valid cut after it.
    """
    for boundary in boundaries:
        if boundary.label == path:
            return boundary
    node_names = {node.name: i for i, node in enumerate(traced.nodes)}
    try:
        module = model.get_submodule(path)
    except AttributeError:
        by_value = [b for b in boundaries if b.value == path]
        if by_value:  # a node-named cut: the first position where that node's value alone crosses
            return by_value[0]
        if path in node_names:
            return _not_a_boundary(traced, path, node_names[path], boundaries, live_counts, "a node")
        raise ValueError(_unknown_cut_message(path, boundaries)) from None
    described = f"{path!r} ({type(module).__name__})"
    leaf = _leaf_containing(traced, path)
    if leaf is not None:
        raise ValueError(
            f"greedy_stages: cut {described} is inside the leaf module {leaf!r} ({type(model.get_submodule(leaf)).__name__}), "
            f"which runs whole inside one stage (it is a leaf: {traced.leaves[leaf]}). Cut before or after {leaf!r}, or "
            "(when it is a leaf for owning parameters) give its parameters to a submodule. " + _valid_cuts_hint(boundaries))
    calls = sum(1 for node in traced.nodes if node.op == "call_module" and node.target == path)
    if calls > 1:
        raise ValueError(f"greedy_stages: cut {described} is ambiguous: the module is called {calls} times in forward")
    end = _module_end_positions(traced).get(path)
    if end is None:
        raise ValueError(f"greedy_stages: cut {described}: no node of the traced forward runs inside this module "
                         "(it is not called by forward, or its forward does nothing with the activation). "
                         + _valid_cuts_hint(boundaries))
    for boundary in boundaries:
        if boundary.position == end:
            return boundary
    return _not_a_boundary(traced, path, end, boundaries, live_counts, type(module).__name__)


def _not_a_boundary(traced: TracedModel, path: str, end: int, boundaries: Sequence[Boundary],
                    live_counts: Sequence[int], what: str) -> Boundary:
    crossing = crossing_values(traced, end) if traced.value_kinds else []
    if len(crossing) > 1 or live_counts[end] > 1:
        names = ", ".join(n.name for n in crossing[:6]) + (" ..." if len(crossing) > 6 else "")
        why = (f"{max(len(crossing), live_counts[end])} values cross there ({names}: a residual/skip connection, "
               "an input or activation used later)")
    elif end >= max((i for i, n in enumerate(traced.nodes) if n.op in COMPUTE_OPS), default=0):
        why = "it is the end of the forward (the stage after it would be empty)"
    elif not crossing:
        why = "no activation crosses there"
    else:
        why = (f"the crossing value {crossing[0].name} is not a floating batch-first activation tensor, or a "
               "trainable parameter / stateful module is used on both sides")
    later = [b for b in boundaries if b.position > end]
    nearest = f" The nearest cut after it: {later[0].name!r}." if later else ""
    raise ValueError(f"greedy_stages: cut {path!r} ({what}) is not a single-tensor boundary: {why}.{nearest} "
                     + _valid_cuts_hint(boundaries))


def _unknown_cut_message(path: str, boundaries: Sequence[Boundary]) -> str:
    return f"greedy_stages: cut {path!r} is not a module path of the model nor a node of its trace. " + _valid_cuts_hint(boundaries)


def _valid_cuts_hint(boundaries: Sequence[Boundary]) -> str:
    names = [b.name for b in boundaries]
    shown = ", ".join(repr(n) for n in names[:12]) + (f" (and {len(names) - 12} more)" if len(names) > 12 else "")
    return f"Valid cuts: {shown or 'none'}."


# ------------------------------------------------------------------------------------ costs
@dataclasses.dataclass(frozen=True)
class NodeCost:
    forward_flops: int
    backward_flops: int

    @property
    def total(self) -> int:
        return self.forward_flops + self.backward_flops


def _fetch_attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _map_tensors(fn: Callable[[Any], Any], value: Any) -> Any:
    """Apply ``fn`` to every leaf of nested tuples/lists/dicts (what fx node arguments hold)."""
    if isinstance(value, (tuple, list)):
        mapped = [_map_tensors(fn, item) for item in value]
        return type(value)(mapped) if not hasattr(value, "_fields") else type(value)(*mapped)
    if isinstance(value, dict):
        return {key: _map_tensors(fn, item) for key, item in value.items()}
    return fn(value)


def _tensor_leaves(value: Any) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _tensor_leaves(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _tensor_leaves(item)]
    return []


def count_flops(fn: Callable[..., Any], args: Sequence[Any], kwargs: Optional[Dict[str, Any]] = None,
                parameters: Sequence[torch.Tensor] = (), counter: Optional[FlopCounterMode] = None) -> Tuple[NodeCost, Any]:
    """Forward and backward FLOPs of ``fn(*args, **kwargs)``; returns (cost, detached output).

    Floating tensors in the arguments become fresh leaves requiring grad (passed as clones, so
    in-place ops stay legal); the backward is the gradient of ``sum(outputs)`` with respect to
    them and to ``parameters`` that require grad (parameter ``.grad`` is left as it was).  ``counter``: an already active ``FlopCounterMode`` to read totals
    from (entering a counter per call costs ~50 ms).
    """
    if counter is None:
        with FlopCounterMode(display=False) as active:
            return count_flops(fn, args, kwargs, parameters, active)
    kwargs = kwargs or {}
    leaves: List[torch.Tensor] = []

    def as_leaf(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            leaf = value.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf.clone()
        return value

    args, kwargs = _map_tensors(as_leaf, (tuple(args), kwargs))
    with torch.enable_grad():
        start = counter.get_total_flops()
        out = fn(*args, **kwargs)
        middle = counter.get_total_flops()
        outputs = [t for t in _tensor_leaves(out) if t.requires_grad]
        wrt = leaves + [p for p in parameters if p.requires_grad]
        if outputs and wrt:
            # backward(inputs=...) rather than autograd.grad: FlopCounterMode's module tracker
            # hooks module inputs, and such hooks on leaves (a parameter passed to a submodule,
            # as decorrelation's W·R does) are refused under autograd.grad.  Parameter .grad is
            # restored afterwards, so measuring writes no gradient.
            saved_grads = [(p, p.grad) for p in parameters]
            torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs], inputs=wrt)
            for parameter, grad in saved_grads:
                parameter.grad = grad
        end = counter.get_total_flops()
    detached = _map_tensors(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)
    return NodeCost(middle - start, end - middle), detached


def _snapshot_state(model: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [(buffer, buffer.detach().clone()) for buffer in model.buffers()]


def measure_node_costs(traced: TracedModel, example_inputs: Sequence[Any],
                       count: bool = True) -> Tuple[Dict[str, Any], List[NodeCost]]:
    """Run the traced graph node by node; return (node name → value, per-node cost).

    ``count=False`` only computes the values (every cost is zero): a stage process applying cuts
    its launcher already decided needs the boundary shapes, not the FLOP measurement.

    Runs in eval mode (no running-statistics or pass-state updates, no dropout) with the RNG
    forked and every buffer and module attribute restored afterwards (a leaf's eval-mode cache),
    so measuring leaves the model untouched.
    """
    gm = traced.graph_module
    flags = {module: module.training for module in gm.modules()}
    snapshot = _snapshot_state(gm)
    inputs = list(example_inputs)
    values: Dict[str, Any] = {}
    costs: List[NodeCost] = []
    try:
        gm.eval()
        counting = FlopCounterMode(display=False) if count else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), module_state_restored(gm), counting as counter:
            for node in traced.nodes:
                cost = NodeCost(0, 0)
                if node.op == "placeholder":
                    values[node.name] = inputs.pop(0) if inputs else node.args[0] if node.args else None
                elif node.op == "get_attr":
                    values[node.name] = _fetch_attr(gm, node.target)
                elif node.op in COMPUTE_OPS:
                    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n.name])
                    fn, parameters = _callable(gm, node, args)
                    if count:
                        cost, values[node.name] = count_flops(fn, args, kwargs, parameters, counter)
                    else:
                        with torch.no_grad():
                            values[node.name] = fn(*args, **kwargs)
                costs.append(cost)
    finally:
        with torch.no_grad():
            for buffer, saved in snapshot:
                buffer.copy_(saved)
        for module, flag in flags.items():
            module.training = flag
    return values, costs


def probe_batch_values(traced: TracedModel, example_inputs: Sequence[Any]) -> Optional[Dict[str, Any]]:
    """Every node's value on the example inputs with one more row (each tensor input's row 0
    appended), or None when the model cannot run on it (then no value counts as batch-derived).

    Tells which non-tensor values depend on the batch size (``value_kinds``) and which tensor
    axis 0 is the batch (a boundary must be batch-first).  Runs like ``measure_node_costs``
    (eval mode, RNG forked, buffers restored, no FLOP counting).
    """
    probe_inputs = []
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] == 0:
                return None
            value = torch.cat([value, value[:1]], dim=0)
        probe_inputs.append(value)
    try:
        values, _ = measure_node_costs(traced, probe_inputs, count=False)
    except Exception:  # noqa: BLE001 — a model with a fixed batch size: no probe, conservative kinds
        return None
    return values


def _callable(gm: fx.GraphModule, node: fx.Node, args: Sequence[Any]) -> Tuple[Callable, List[torch.Tensor]]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module, list(module.parameters())
    if node.op == "call_method":
        name = node.target
        return (lambda receiver, *rest, **kwargs: getattr(receiver, name)(*rest, **kwargs)), []
    return node.target, []


# ------------------------------------------------------------------------------------ partition
def stage_costs(node_costs: Sequence[int], positions: Sequence[int], head_cost: Callable[[int], float],
                boundary_bytes: Callable[[int], int], bytes_weight: float) -> List[float]:
    """Cost of each stage for cuts after ``positions`` (see the module docstring)."""
    prefix = [0]
    for cost in node_costs:
        prefix.append(prefix[-1] + cost)
    edges = [-1] + list(positions) + [len(node_costs) - 1]
    out = []
    for s in range(len(edges) - 1):
        start, end = edges[s], edges[s + 1]
        cost = prefix[end + 1] - prefix[start + 1]
        if s > 0:
            cost += bytes_weight * boundary_bytes(start)
        if s < len(edges) - 2:
            cost += head_cost(end) + bytes_weight * boundary_bytes(end)
        out.append(float(cost))
    return out


def min_max_partition(node_costs: Sequence[int], candidates: Sequence[int], num_stages: int,
                      head_cost: Callable[[int], float], boundary_bytes: Callable[[int], int],
                      bytes_weight: float, trainable: Optional[Sequence[int]] = None,
                      penalty: Optional[Callable[[int], int]] = None) -> Tuple[List[int], float]:
    """The ``num_stages − 1`` candidate positions minimising the maximum stage cost (exact DP).

    ``best[k][j]`` = (max stage cost, total cost, penalty) of the best way to cover the nodes up
    to candidate ``j`` with ``k`` stages, ties broken by the smaller total, then by the smaller
    summed ``penalty`` of the cuts (1 for a cut not at a module end: module ends are preferred);
    ``O(K·m²)`` for ``m`` candidates.  ``trainable`` (trainable parameter elements per node): a stage without any is
    infeasible — its local loss would train its aux head and nothing else.  Returns (positions,
    max stage cost).
    """
    candidates = sorted(candidates)
    m, cuts = len(candidates), num_stages - 1
    if m < cuts:
        raise ValueError(f"{num_stages} stages need {cuts} cuts but only {m} candidate boundaries exist")
    prefix, owned = [0], [0]
    for cost in node_costs:
        prefix.append(prefix[-1] + cost)
    for count in trainable if trainable is not None else [1] * len(node_costs):
        owned.append(owned[-1] + count)
    last = len(node_costs) - 1

    def segment(start: int, end: int, first: bool, final: bool) -> float:
        if owned[end + 1] == owned[start + 1]:
            return math.inf
        cost = prefix[end + 1] - prefix[start + 1]
        if not first:
            cost += bytes_weight * boundary_bytes(start)
        if not final:
            cost += head_cost(end) + bytes_weight * boundary_bytes(end)
        return float(cost)

    inf = (math.inf, math.inf, math.inf)
    cut_penalty = penalty or (lambda position: 0)
    # best[k][j]: first k stages end exactly at candidates[j].
    best = [[inf] * m for _ in range(cuts + 1)]
    parent = [[-1] * m for _ in range(cuts + 1)]
    for j in range(m):
        value = segment(-1, candidates[j], True, False)
        if value < math.inf:
            best[1][j] = (value, value, cut_penalty(candidates[j]))
    for k in range(2, cuts + 1):
        for j in range(m):
            for i in range(j):
                if best[k - 1][i][0] == math.inf:
                    continue
                value = segment(candidates[i], candidates[j], False, False)
                if value == math.inf:
                    continue
                option = (max(best[k - 1][i][0], value), best[k - 1][i][1] + value,
                          best[k - 1][i][2] + cut_penalty(candidates[j]))
                if option < best[k][j]:
                    best[k][j], parent[k][j] = option, i
    final_best, final_j = inf, -1
    for j in range(m):
        if best[cuts][j][0] == math.inf:
            continue
        value = segment(candidates[j], last, False, True)
        if value == math.inf:
            continue
        option = (max(best[cuts][j][0], value), best[cuts][j][1] + value, best[cuts][j][2])
        if option < final_best:
            final_best, final_j = option, j
    if final_j < 0:
        raise ValueError(f"no choice of {cuts} cuts among the {m} candidate boundaries gives each of the {num_stages} "
                         "stages a trainable parameter")
    chosen, j = [], final_j
    for k in range(cuts, 0, -1):
        chosen.append(candidates[j])
        j = parent[k][j]
    return sorted(chosen), final_best[0]


# ------------------------------------------------------------------------------------ splitting
def trainable_elements(traced: TracedModel) -> List[int]:
    """Trainable parameter elements each traced node uses (a leaf module's, or a get_attr parameter)."""
    gm = traced.graph_module
    counts = []
    for node in traced.nodes:
        if node.op == "call_module":
            parameters = list(gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            parameters = [value] if isinstance(value, nn.Parameter) else []
        else:
            parameters = []
        counts.append(sum(p.numel() for p in parameters if p.requires_grad))
    return counts


def split_stages(traced: TracedModel, positions: Sequence[int],
                 boundary_values: Optional[Sequence[str]] = None) -> List[fx.GraphModule]:
    """One ``fx.GraphModule`` per stage; stage 0 takes the model inputs, stage k the boundary.

    Each stage copies its nodes into a fresh graph whose root is the traced model, so
    ``call_module`` targets and parameters are the original objects.  A value a stage uses but
    does not compute is (``traced.value_kinds``, set by ``find_boundaries``): the boundary tensor
    (the stage's one placeholder); a constant, recomputed here (its nodes copied, ``get_attr``
    reads included; a root argument becomes its example value); or a shape-derived value, baked
    or rebuilt from the boundary's batch axis (``batch_dependent_value``).
    ``boundary_values``: the crossing node of each cut (default: the one live activation there).
    """
    nodes, gm = traced.nodes, traced.graph_module
    kinds = traced.value_kinds
    by_name = {node.name: node for node in nodes}
    if boundary_values is None:
        boundary_values = []
        for position in positions:
            crossing = crossing_values(traced, position) if kinds else live_values(nodes)[position]
            if len(crossing) != 1:
                raise ValueError(f"position {position} is not a single-activation boundary")
            boundary_values.append(crossing[0].name)
    # placeholder name → its example value (a root argument not given, or given as a non-tensor)
    literal = {node.name: kinds[node.name][1] for node in nodes
               if node.op == "placeholder" and kinds.get(node.name, ("cross",))[0] == "const"}
    edges = [-1] + list(positions) + [len(nodes) - 1]
    stages = []
    for s in range(len(edges) - 1):
        start, end = edges[s], edges[s + 1]
        graph = fx.Graph()
        env: Dict[fx.Node, Any] = {}
        boundary_input: Optional[fx.Node] = None
        if s == 0:
            for node in nodes:
                if node.op == "placeholder":
                    env[node] = graph.node_copy(node)
        else:
            crossing = by_name[boundary_values[s - 1]]
            boundary_input = graph.placeholder(crossing.name)
            env[crossing] = boundary_input

        def lookup(arg: fx.Node) -> Any:
            if arg in env:
                return env[arg]
            kind = kinds.get(arg.name, ("cross",))
            if arg.op == "get_attr" or kind[0] == "const":
                if arg.op == "placeholder":
                    env[arg] = literal.get(arg.name)
                else:  # recompute the constant here (a parameter/buffer read, a mask built from constants)
                    env[arg] = graph.node_copy(arg, lookup)
            elif kind[0] == "batch" and boundary_input is not None:
                spec = kind[1]
                env[arg] = (batch_dependent_value(None, spec) if _spec_is_literal(spec)
                            else graph.call_function(batch_dependent_value, (boundary_input, spec)))
            else:
                raise AssertionError(f"value {arg.name} used in stage {s} is not available there")
            return env[arg]

        for node in nodes[start + 1: end + 1]:
            if node.op in COMPUTE_OPS:
                env[node] = graph.node_copy(node, lookup)
            elif node.op == "output":
                graph.node_copy(node, lookup)
        if s < len(edges) - 2:
            graph.output(lookup(by_name[boundary_values[s]]))
        graph.lint()
        stages.append(fx.GraphModule(gm, graph, class_name=f"GreedyStage{s}"))
    return stages
