"""Graph analysis for greedy local-loss stages: a stage-able trace, boundaries, costs, the cut DP.

1. ``trace_for_stages(model)`` traces the model with ``torch.fx`` symbolic tracing.  The leaves
   (``call_module`` nodes that run the original module objects, so other passes' class swaps,
   weight properties and hooks keep working) follow ``LEAF_RULES`` below.  A non-root module whose
   forward cannot be traced (data-dependent control flow, ...) becomes a leaf automatically and the
   reason is recorded; a root forward that cannot be traced raises :class:`StageTraceError`.
2. ``find_boundaries(traced)`` lists the *candidate boundaries*: positions in the node order
   where exactly one value — a floating activation tensor — is defined before and used after,
   no parameter or buffer is used on both sides, and some module's forward ends (so a cut
   falls after a block's output, not between a residual sum and the block's final ReLU, and
   every boundary can be named by a module path in ``cuts=``).
3. ``measure_node_costs(traced, example_inputs)`` runs the graph node by node on the example
   inputs and counts each node's forward and backward FLOPs with
   ``torch.utils.flop_counter.FlopCounterMode`` (backward measured, not estimated: the node's
   output is back-propagated to its floating inputs and parameters).
4. ``min_max_partition`` chooses the K−1 cuts minimising the most expensive stage by dynamic
   programming; ``split_stages`` cuts the graph into one ``fx.GraphModule`` per stage.

Cost of a stage (FLOP-equivalents; every term is linear in the batch size, so the example batch
ranks cuts the same way as the training batch)::

    cost = Σ_{nodes n in stage} (fwd_n + bwd_n) + (fwd + bwd of its aux head)
           + bytes_weight · (bytes of its input boundary + bytes of its output boundary)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "LEAF_RULES", "register_leaf_module", "StageTraceError", "TracedModel", "Boundary", "NodeCost",
    "trace_for_stages", "live_values", "find_boundaries", "measure_node_costs", "count_flops",
    "stage_costs", "min_max_partition", "boundary_for_module", "split_stages", "trainable_elements",
]

COMPUTE_OPS = ("call_module", "call_function", "call_method")

# What the tracer keeps as a leaf (a ``call_module`` node running the original module), and why.
LEAF_RULES: Tuple[Tuple[str, str], ...] = (
    ("owns parameters or buffers directly",
     "each parameter then has exactly one owning leaf, so it belongs to exactly one stage, and the "
     "per-module rewrites of other passes (decorrelation's fused-weight properties, randomized VJP's "
     "class swaps) run unchanged because the stage calls the original module object"),
    ("carries forward hooks or pre-hooks",
     "hooks (e.g. decorrelation's input observers) only fire when the module itself is called"),
    ("is a torch.nn built-in other than a container",
     "built-ins such as nn.MultiheadAttention hold argument checks symbolic tracing cannot follow, "
     "and they are the units users name in cuts= and reports"),
    ("is registered with register_leaf_module", "a user-declared leaf, with the reason given there"),
    ("its forward could not be traced", "data-dependent control flow inside it; it runs eagerly as one leaf"),
)

_USER_LEAF_TYPES: Dict[type, str] = {}


def register_leaf_module(cls: type, reason: str) -> None:
    """Keep every module of class ``cls`` whole in the stage trace (``reason`` shows in errors)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {cls!r}")
    _USER_LEAF_TYPES[cls] = reason


class StageTraceError(ValueError):
    """The model's forward cannot be traced into stages."""


def leaf_reason(module: nn.Module, path: str, untraceable: Dict[str, str]) -> Optional[str]:
    """Which of ``LEAF_RULES`` makes ``module`` a leaf, or None when the tracer enters it."""
    if path in untraceable:
        return f"its forward could not be traced: {untraceable[path]}"
    if next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None:
        return LEAF_RULES[0][0]
    if module._forward_hooks or module._forward_pre_hooks:
        return LEAF_RULES[1][0]
    for cls, reason in _USER_LEAF_TYPES.items():
        if isinstance(module, cls):
            return f"registered leaf: {reason}"
    builtin = type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))
    if builtin and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return LEAF_RULES[2][0]
    return None


class _StageTracer(fx.Tracer):
    def __init__(self, untraceable: Dict[str, str]) -> None:
        super().__init__()
        self.untraceable = untraceable

    def is_leaf_module(self, module: nn.Module, path: str) -> bool:
        return leaf_reason(module, path, self.untraceable) is not None


@dataclasses.dataclass
class TracedModel:
    """The stage-able trace of a model."""

    graph_module: fx.GraphModule
    nodes: List[fx.Node]  # every node in topological order (placeholders first, output last)
    leaves: Dict[str, str]  # leaf module path → the rule that made it a leaf
    untraceable: Dict[str, str]  # module path → why its forward could not be traced


def _describe_construct(error: BaseException) -> str:
    message = (str(error).strip().splitlines() or [""])[0]
    if "control flow" in message or "iterate" in message or "bool" in message.lower():
        return f"data-dependent control flow or Python use of a traced value ({type(error).__name__}: {message})"
    return f"{type(error).__name__}: {message}"


def _trace_once(model: nn.Module, untraceable: Dict[str, str]) -> fx.GraphModule:
    tracer = _StageTracer(untraceable)
    try:
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
        return _trace_once(model, untraceable)
    return fx.GraphModule(tracer.root, graph, class_name=f"{type(model).__name__}Staged")


def trace_for_stages(model: nn.Module) -> TracedModel:
    """Trace ``model`` with the stage leaf rules (see the module docstring).

    The trace is taken in training and in eval mode; a traced-through forward that branches on
    ``self.training`` would freeze one branch into the stages, so different traces raise.
    """
    was_training = {module: module.training for module in model.modules()}
    untraceable: Dict[str, str] = {}
    try:
        model.train()
        traced = _trace_once(model, untraceable)
        model.eval()
        traced_eval = _trace_once(model, dict(untraceable))
    finally:
        for module, flag in was_training.items():
            module.training = flag
    if traced.code != traced_eval.code:
        raise StageTraceError(
            f"greedy_stages: the forward of {type(model).__name__} branches on self.training outside a leaf "
            "module (its train and eval traces differ); stages would freeze one branch. Move that code into "
            "an nn.Module that owns parameters or use torch.nn.Dropout-style built-in modules.")
    modules = dict(model.named_modules())
    leaves = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            leaves[node.target] = leaf_reason(modules[node.target], node.target, untraceable) or ""
    return TracedModel(traced, list(traced.graph.nodes), leaves, untraceable)


# ------------------------------------------------------------------------------------ boundaries
@dataclasses.dataclass(frozen=True)
class Boundary:
    """A cut after ``nodes[position]``: exactly the value of node ``value`` crosses it."""

    position: int
    value: str  # name of the node whose value crosses
    label: str  # the outermost module whose forward ends here ("" if none)
    shape: Tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def live_values(nodes: Sequence[fx.Node]) -> List[List[fx.Node]]:
    """For each position i, the nodes (not ``get_attr``) defined at or before i and used after i."""
    index = {node: i for i, node in enumerate(nodes)}
    last_use = {node: max((index[user] for user in node.users), default=index[node]) for node in nodes}
    live: List[List[fx.Node]] = []
    for i in range(len(nodes)):
        live.append([node for node in nodes[: i + 1] if node.op != "get_attr" and last_use[node] > i])
    return live


def _state_uses(traced: TracedModel) -> Dict[int, Tuple[str, List[int]]]:
    """id(parameter or buffer) → (its name, positions of the nodes that use it)."""
    gm = traced.graph_module
    uses: Dict[int, Tuple[str, List[int]]] = {}

    def add(tensor: Any, name: str, position: int) -> None:
        if isinstance(tensor, torch.Tensor):
            uses.setdefault(id(tensor), (name, []))[1].append(position)

    for position, node in enumerate(traced.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                add(tensor, f"{node.target}.{name}", position)
        elif node.op == "get_attr":
            for user in node.users:
                add(_fetch_attr(gm, node.target), node.target, traced.nodes.index(user))
    return uses


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


def find_boundaries(traced: TracedModel, values: Dict[str, Any]) -> Tuple[List[Boundary], List[int]]:
    """Candidate boundaries, plus every position's live-value count (for error messages).

    ``values`` holds each node's value on the example inputs (from ``measure_node_costs``).
    """
    nodes = traced.nodes
    live = live_values(nodes)
    compute = [i for i, node in enumerate(nodes) if node.op in COMPUTE_OPS]
    if not compute:
        return [], [len(values) for values in live]
    last_compute = compute[-1]
    state_spans = [(min(p), max(p)) for _, p in _state_uses(traced).values()]
    labels = _labels(traced)
    out = []
    for i in compute:
        if i >= last_compute or len(live[i]) != 1:
            continue
        value = values.get(live[i][0].name)
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2):
            continue
        if any(first <= i < last for first, last in state_spans):
            continue  # a parameter or buffer would be used in two stages
        if i not in labels:
            continue  # not the end of a module call (e.g. a residual sum before its block's ReLU)
        out.append(Boundary(i, live[i][0].name, labels.get(i, ""), tuple(value.shape), value.dtype,
                            value.numel() * value.element_size()))
    return out, [len(values) for values in live]


def _labels(traced: TracedModel) -> Dict[int, str]:
    """Position → the outermost module path whose forward ends at that position."""
    labels: Dict[int, str] = {}
    for path, position in _module_end_positions(traced).items():
        current = labels.get(position)
        if current is None or path.count(".") < current.count("."):
            labels[position] = path
    return labels


def boundary_for_module(traced: TracedModel, model: nn.Module, path: str, boundaries: Sequence[Boundary],
                        live_counts: Sequence[int]) -> Boundary:
    """The boundary right after the forward of module ``path``; ``ValueError`` when it is not one."""
    try:
        model.get_submodule(path)
    except AttributeError:
        raise ValueError(_unknown_cut_message(path, boundaries)) from None
    calls = sum(1 for node in traced.nodes if node.op == "call_module" and node.target == path)
    if calls > 1:
        raise ValueError(f"greedy_stages: cut {path!r} is ambiguous: the module is called {calls} times in forward")
    end = _module_end_positions(traced).get(path)
    if end is None:
        raise ValueError(f"greedy_stages: cut {path!r}: the module is never called in forward. "
                         + _valid_cuts_hint(boundaries))
    for boundary in boundaries:
        if boundary.position == end:
            return boundary
    crossing = live_counts[end]
    why = (f"{crossing} values cross there (a residual/skip connection or an input used later)" if crossing != 1
           else "the crossing value is not a floating activation tensor, the stage after it would be empty, "
                "or a parameter/buffer is used on both sides")
    raise ValueError(f"greedy_stages: cut {path!r} is not a single-tensor boundary: {why}. " + _valid_cuts_hint(boundaries))


def _unknown_cut_message(path: str, boundaries: Sequence[Boundary]) -> str:
    return f"greedy_stages: cut {path!r} is not a module path of the model. " + _valid_cuts_hint(boundaries)


def _valid_cuts_hint(boundaries: Sequence[Boundary]) -> str:
    names = [b.label for b in boundaries if b.label]
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
    forked and every buffer restored afterwards, so measuring leaves the model untouched.
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
        with torch.random.fork_rng(devices=[]), counting as counter:
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
                      bytes_weight: float, trainable: Optional[Sequence[int]] = None) -> Tuple[List[int], float]:
    """The ``num_stages − 1`` candidate positions minimising the maximum stage cost (exact DP).

    ``best[k][j]`` = (max stage cost, total cost) of the best way to cover the nodes up to
    candidate ``j`` with ``k`` stages, ties broken by the smaller total; ``O(K·m²)`` for ``m``
    candidates.  ``trainable`` (trainable parameter elements per node): a stage without any is
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

    inf = (math.inf, math.inf)
    # best[k][j]: first k stages end exactly at candidates[j].
    best = [[inf] * m for _ in range(cuts + 1)]
    parent = [[-1] * m for _ in range(cuts + 1)]
    for j in range(m):
        value = segment(-1, candidates[j], True, False)
        best[1][j] = (value, value)
    for k in range(2, cuts + 1):
        for j in range(m):
            for i in range(j):
                if best[k - 1][i] == inf:
                    continue
                value = segment(candidates[i], candidates[j], False, False)
                option = (max(best[k - 1][i][0], value), best[k - 1][i][1] + value)
                if option < best[k][j]:
                    best[k][j], parent[k][j] = option, i
    final_best, final_j = inf, -1
    for j in range(m):
        if best[cuts][j] == inf:
            continue
        value = segment(candidates[j], last, False, True)
        option = (max(best[cuts][j][0], value), best[cuts][j][1] + value)
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


def split_stages(traced: TracedModel, positions: Sequence[int]) -> List[fx.GraphModule]:
    """One ``fx.GraphModule`` per stage; stage 0 takes the model inputs, stage k the boundary.

    Each stage copies its nodes (and the ``get_attr`` nodes they use) into a fresh graph whose
    root is the traced model, so ``call_module`` targets and parameters are the original objects.
    """
    nodes, gm = traced.nodes, traced.graph_module
    edges = [-1] + list(positions) + [len(nodes) - 1]
    live = live_values(nodes)
    stages = []
    for s in range(len(edges) - 1):
        start, end = edges[s], edges[s + 1]
        graph = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        if s == 0:
            for node in nodes:
                if node.op == "placeholder":
                    env[node] = graph.node_copy(node)
        else:
            env[live[start][0]] = graph.placeholder(live[start][0].name)

        def lookup(arg: fx.Node) -> fx.Node:
            if arg not in env:  # a get_attr used in this stage: copy it here
                if arg.op != "get_attr":
                    raise AssertionError(f"value {arg.name} used in stage {s} is not available there")
                env[arg] = graph.node_copy(arg)
            return env[arg]

        for node in nodes[start + 1: end + 1]:
            if node.op in COMPUTE_OPS:
                env[node] = graph.node_copy(node, lookup)
            elif node.op == "output":
                graph.node_copy(node, lookup)
        if s < len(edges) - 2:
            graph.output(lookup(live[end][0]))
        graph.lint()
        stages.append(fx.GraphModule(gm, graph, class_name=f"GreedyStage{s}"))
    return stages
