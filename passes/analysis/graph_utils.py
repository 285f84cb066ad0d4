"""Helpers shared by the joint-graph passes: inserting nodes with fake-tensor metadata, matching.

Every node a joint-graph pass inserts needs ``meta["val"]`` (a fake tensor) or the partitioner
fails (ANCHORS §5), and should carry the replaced node's backward tags so the partitioner keeps
it in the backward.
"""

from __future__ import annotations

from typing import Any

import torch

aten = torch.ops.aten

_COPIED_META = ("partitioner_tag", "seq_nr", "nn_module_stack", "fwd_nn_module_stack", "stack_trace",
                "original_aten", "source_fn_stack")


def fake_mode_of(node: torch.fx.Node):
    values = node.meta["val"] if isinstance(node.meta["val"], (tuple, list)) else (node.meta["val"],)
    return next(value.fake_mode for value in values if isinstance(value, torch.Tensor))


def insert_node(graph: torch.fx.Graph, like: torch.fx.Node, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
    """A new node (at the graph's insertion point) with fake-tensor metadata and ``like``'s tags."""
    node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    with fake_mode_of(like):
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    for key in _COPIED_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def is_tangent(node: torch.fx.Node) -> bool:
    """An input of AOTAutograd's joint graph carrying a backward's incoming gradient (``tangents_*``)."""
    return node.op == "placeholder" and node.name.startswith("tangents")


def is_transpose(node: Any) -> bool:
    """``t(A)`` as AOT autograd writes it, or as Inductor's decompositions do (``permute(A, [1, 0])``)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is aten.t.default:
        return True
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target is aten.transpose.int:
        return sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1] and node.args[0].meta["val"].dim() == 2
    return False


def tensor_meta(node: Any):
    """The fake tensor of ``node``, or None for non-tensor values and constants."""
    if isinstance(node, torch.fx.Node):
        value = node.meta.get("val")
        return value if isinstance(value, torch.Tensor) else None
    return None
