"""The predicted cost of a training step, from the captured graph: the units every pass's cost model uses.

A step is counted three ways, per op of the exported forward graph and of the backward it implies:

* ``macs``: multiply-adds of the products (linear, convolution, matmul/bmm, attention);
* ``bytes``: what the memory-bound ops read and write (every other op that computes: norms,
  activations, additions, softmax, gathers, copies); views move nothing (their dispatch counts);
* ``ops``: ops dispatched (each costs a fixed time before any arithmetic: eager dispatch, autograd
  bookkeeping, a kernel launch).

``Work.units`` turns the three into one number in multiply-add equivalents,
``macs + MACS_PER_BYTE·bytes + DISPATCH_MACS·ops`` — a roofline per op (products are taken as
compute-bound, everything else as memory-bound) plus a dispatch floor.  A pass's cost model
predicts the *change* in work its rewrite makes (positive: the pass's own work; negative: work it
saves), and the Plan shows ``predicted_step = (plain + change) / plain`` on the pass's rows: the
eager step time relative to plain backprop at the example's shapes.

A compiled step (Inductor) fuses the memory-bound ops and launches fewer kernels, so it is counted
a second way (``step_work(..., compiled=True)``): the memory-bound ops between two products form
one fused kernel (connected through views), which reads what enters it from outside and writes
what leaves it, once, and every kernel or extern call costs ``COMPILED_OP_SHARE`` of an eager
op.  Passes whose cost model knows the compiled form of their own work
(``ModelPass.compiled_cost``) show ``predicted_step_compiled`` beside ``predicted_step``; the
benchmarks (``python -m benchmarks cost_model [--compile]``) put both beside measured ratios.

The plain step: forward as captured; backward = for each product, the gradient of each operand
that needs one (a linear layer reading the model's input computes no input gradient, a frozen
weight no weight gradient), and for each memory-bound op on the gradient path ``BACKWARD_BYTES``
times its forward bytes (a gradient read, a saved tensor read, a gradient written); optimizer =
SGD with momentum over the trainable parameters (read weight, gradient and momentum, write two).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Set

import torch

__all__ = ["COMPILED_OP_SHARE", "DISPATCH_MACS", "MACS_PER_BYTE", "Work", "LayerWork", "StepWork", "step_work",
           "predicted_ratio"]

# One op's fixed cost in MACs: ~5 µs of eager dispatch and autograd bookkeeping at one core's
# ~47 GMAC/s on the 2-core AMD EPYC it was first measured on (2026-12-04: 2-4 µs for a bare op);
# ~3.5 µs at the 74 GMAC/s of the 2-core Intel Xeon of 2026-12-05 (512² fp32 GEMM, a bare op
# 0.9 µs).  A GPU launch costs more MACs than this, so there it errs towards more ops.
DISPATCH_MACS = 1 << 18
# A byte moved by a memory-bound op costs as much time as this many MACs: the Xeon's core streams
# 17-32 GB/s from memory (copy, add, sum over 16-128 MiB; 80-140 GB/s from cache), so a byte is
# worth 2.3-4.4 of its 74 GMAC/s.  Training streams activations and optimizer state from memory:
# the 1024-wide MLP's SGD step (84 MB moved) took 5 ms of a 35 ms step, as 4 predicts.
MACS_PER_BYTE = 4.0
BACKWARD_BYTES = 1.5  # an elementwise op's backward reads the gradient and a saved tensor, writes one
OPTIMIZER_BYTES = 5   # SGD with momentum per parameter element: read w, g, m; write w, m (× element size)
OPTIMIZER_OPS = 3     # per parameter tensor (momentum update, weight update, the grad read)
VIEW_OPS = 0.25       # a view's dispatch (1 µs of the 2-4 µs of an op that computes), no bytes
# A compiled kernel or extern call (Inductor's wrapper calling a fused C++/Triton kernel or an aten
# GEMM) against an eager op, which also dispatches through autograd: ~1 µs of ~3.5 µs on the Xeon.
COMPILED_OP_SHARE = 0.3


@dataclasses.dataclass(frozen=True)
class Work:
    """Work of (part of) a training step: multiply-adds, bytes moved by memory-bound ops, ops."""

    macs: float = 0.0
    bytes: float = 0.0
    ops: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.macs + other.macs, self.bytes + other.bytes, self.ops + other.ops)

    def __sub__(self, other: "Work") -> "Work":
        return Work(self.macs - other.macs, self.bytes - other.bytes, self.ops - other.ops)

    def __mul__(self, factor: float) -> "Work":
        return Work(self.macs * factor, self.bytes * factor, self.ops * factor)

    __rmul__ = __mul__

    def as_compiled_calls(self) -> "Work":
        """The same work run by Inductor's wrapper: each kernel or extern call costs
        ``COMPILED_OP_SHARE`` of an eager op's dispatch."""
        return Work(self.macs, self.bytes, self.ops * COMPILED_OP_SHARE)

    @property
    def units(self) -> float:
        """The work in multiply-add equivalents (the module docstring)."""
        return self.macs + MACS_PER_BYTE * self.bytes + DISPATCH_MACS * self.ops


@dataclasses.dataclass(frozen=True)
class LayerWork:
    """One weight's forward products (all its uses) and the sizes of their inputs and outputs."""

    forward: Work
    input_numel: int
    output_numel: int
    element_size: int = 4

    @property
    def input_bytes(self) -> int:
        return self.input_numel * self.element_size

    @property
    def output_bytes(self) -> int:
        return self.output_numel * self.element_size


@dataclasses.dataclass(frozen=True)
class StepWork:
    """The plain training step of a captured model, split where the passes' cost models need it."""

    forward: Work
    backward: Work
    optimizer: Work
    layers: Dict[str, LayerWork]  # keyed by Plan layer key
    compiled: bool = False  # counted as Inductor compiles it: fused memory-bound kernels (module docstring)

    @property
    def total(self) -> Work:
        return self.forward + self.backward + self.optimizer

    def ratio(self, change: Work) -> float:
        """Predicted step time with ``change`` added, relative to the plain step."""
        plain = self.total.units
        return max(0.0, (plain + change.units) / plain) if plain > 0 else 1.0


def predicted_ratio(step: StepWork, change: Optional[Work]) -> Optional[float]:
    """``step.ratio(change)`` rounded for the Plan, or None when the pass has no cost model."""
    return None if change is None else round(step.ratio(change), 3)


# ------------------------------------------------------------------------------------ the graph
# Ops that only relabel memory (or do nothing at run time): no bytes, VIEW_OPS of dispatch.
_VIEWS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice",
    "select", "alias", "detach", "flatten", "unflatten", "split", "split_with_sizes", "chunk", "unbind",
    "narrow", "as_strided", "view_as", "expand_as", "lift_fresh_copy", "sym_size", "sym_numel", "sym_stride",
    "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "dropout",
}
_PRODUCTS = {"linear", "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "matmul", "mm", "bmm", "addmm",
             "baddbmm", "addbmm", "scaled_dot_product_attention", "einsum"}


def _value(arg):
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None


def _tensors(node: torch.fx.Node):
    for arg in node.all_input_nodes:
        value = _value(arg)
        if isinstance(value, torch.Tensor):
            yield arg, value


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(item) for item in value)
    return 0


def _name(node: torch.fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))


def _product_macs(name: str, node: torch.fx.Node) -> int:
    """Multiply-adds of one product node from its operand and output shapes."""
    out = _value(node)
    out_numel = out.numel() if isinstance(out, torch.Tensor) else 0
    operands = [value for _, value in _tensors(node)]
    if not operands or not out_numel:
        return 0
    if name in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution"):
        weight = operands[1] if len(operands) > 1 else None
        # every output element: (input channels per group) × kernel taps multiply-adds
        return out_numel * (math.prod(weight.shape[1:]) if weight is not None else 1)
    if name == "scaled_dot_product_attention":
        query, key, value = operands[:3]
        return math.prod(query.shape[:-1]) * key.shape[-2] * (query.shape[-1] + value.shape[-1])
    if name == "einsum":  # contracted size = operands' elements over the output's, for two operands
        if len(operands) == 2:
            contracted = math.sqrt(operands[0].numel() * operands[1].numel() / max(out_numel, 1))
            return int(out_numel * max(contracted, 1))
        return out_numel
    first = operands[1] if name in ("addmm", "baddbmm", "addbmm") else operands[0]
    return out_numel * int(first.shape[-1])


def _operands(name: str, inputs: list) -> list:
    """The (node, value) pairs a product multiplies (a bias is added, not multiplied)."""
    if name in ("addmm", "baddbmm", "addbmm"):
        return inputs[1:3]
    if name == "scaled_dot_product_attention":
        return inputs[:3]
    return inputs[:2]


def _needs_grad(graph: torch.fx.Graph, trainable_placeholders: Set[str]) -> Set[str]:
    """Names of nodes whose value depends on a trainable parameter (so backward reaches them)."""
    needs = set(trainable_placeholders)
    for node in graph.nodes:
        if node.op == "call_function" and any(arg.name in needs for arg in node.all_input_nodes):
            needs.add(node.name)
    return needs


def _is_view(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and (_name(node) in _VIEWS or _name(node) == "getitem")


def _view_base(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose memory ``node`` relabels (itself unless it is a view of one)."""
    while _is_view(node) and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _fused_kernels(memory_bound: Dict[torch.fx.Node, None]) -> List[tuple]:
    """The memory-bound ops grouped as Inductor fuses them: connected through each other (and
    views) between products.  Per kernel: (bytes read from outside it and written for use outside
    it, its nodes)."""
    parent = {node: node for node in memory_bound}

    def root(node):
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for node in memory_bound:
        for arg in node.all_input_nodes:
            base = _view_base(arg)
            if base in memory_bound:
                parent[root(base)] = root(node)
    kernels: Dict[torch.fx.Node, list] = {}
    for node in memory_bound:
        kernels.setdefault(root(node), []).append(node)
    result = []
    for members in kernels.values():
        inside = set(members)
        read = {_view_base(arg) for node in members for arg in node.all_input_nodes} - inside
        moved = sum(_nbytes(_value(base)) for base in read)
        for node in members:  # written once where anything outside the kernel (or the output) reads it
            if any(user not in inside for user in _users_through_views(node)):
                moved += _nbytes(_value(node))
        result.append((moved, members))
    return result


def _users_through_views(node: torch.fx.Node) -> List[torch.fx.Node]:
    """The nodes that read ``node``'s memory: its users, seen through views of it."""
    users = []
    for user in node.users:
        if _is_view(user):
            users.extend(_users_through_views(user))
        else:
            users.append(user)
    return users


def step_work(exported: "torch.export.ExportedProgram", layer_of_node: Mapping[str, str],
              parameters: Mapping[str, torch.Tensor], compiled: bool = False) -> StepWork:
    """The plain training step of ``exported`` (the module docstring says how it is counted).

    ``layer_of_node``: product node name → Plan layer key, for the per-layer split;
    ``parameters``: the model's named parameters (their ``requires_grad`` says what trains);
    ``compiled``: count it as Inductor compiles it (fused memory-bound kernels, cheaper calls).
    """
    signature = exported.graph_signature
    trainable = {fqn for fqn, p in parameters.items() if p.requires_grad}
    trainable_nodes = {name for name, fqn in signature.inputs_to_parameters.items() if fqn in trainable}
    needs = _needs_grad(exported.graph, trainable_nodes)
    forward = backward = Work()
    layers: Dict[str, LayerWork] = {}
    memory_bound: Dict[torch.fx.Node, None] = {}  # ordered: the kernels come out in graph order
    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        name = _name(node)
        if name in _VIEWS or name == "getitem":  # no bytes; a quarter of an op's dispatch, here and in backward
            if not compiled:  # compiled: a view is an index expression inside a kernel
                forward += Work(ops=VIEW_OPS)
                if node.name in needs:
                    backward += Work(ops=VIEW_OPS)
            continue
        inputs = list(_tensors(node))
        if name in _PRODUCTS:
            macs = _product_macs(name, node)
            forward += Work(macs=macs, ops=1)
            operands = _operands(name, inputs)
            grads = sum(1 for arg, _ in operands if arg.name in needs)  # one product per operand needing a gradient
            if name == "scaled_dot_product_attention":  # dQ, dK, dV and dP: twice the forward's two products
                grads = 2 if grads else 0
            biased = len(inputs) > len(operands) and any(arg.name in needs for arg, _ in inputs if
                                                         all(arg is not op for op, _ in operands))
            backward += Work(macs=macs * grads, ops=grads + biased)  # a bias gradient is one more reduction
            layer = layer_of_node.get(node.name)
            if layer is not None and operands:
                before = layers.get(layer, LayerWork(Work(), 0, 0))
                activation, out = operands[0][1], _value(node)
                layers[layer] = LayerWork(before.forward + Work(macs=macs, ops=1),
                                          before.input_numel + activation.numel(),
                                          before.output_numel + (out.numel() if isinstance(out, torch.Tensor) else 0),
                                          activation.element_size())
            continue
        if compiled:
            memory_bound[node] = None
            continue
        moved = sum(_nbytes(value) for _, value in inputs) + _nbytes(_value(node))
        forward += Work(bytes=moved, ops=1)
        if node.name in needs:
            backward += Work(bytes=BACKWARD_BYTES * moved, ops=1)
    for moved, members in _fused_kernels(memory_bound):
        forward += Work(bytes=moved, ops=1)
        if any(node.name in needs for node in members):
            backward += Work(bytes=BACKWARD_BYTES * moved, ops=1)
    optimizer = Work()
    for fqn in trainable:
        p = parameters[fqn]
        optimizer += Work(bytes=OPTIMIZER_BYTES * p.numel() * p.element_size(), ops=OPTIMIZER_OPS)
    if compiled:  # products and fused kernels are calls from Inductor's wrapper (the optimizer stays eager)
        forward, backward = forward.as_compiled_calls(), backward.as_compiled_calls()
    return StepWork(forward, backward, optimizer, layers, compiled)

