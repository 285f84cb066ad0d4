"""Weights the layer analysis does not turn into layers, each with the reason a pass skips it.

``capture`` finds a layer where a parameter is the weight operand of a linear, a convolution or a
matmul (``capture.py``).  A per-layer pass must still say what it did with every *other* weight
that a contraction reads: a pass that silently leaves a recurrent layer, a transposed convolution
or an ``einsum`` weight exact is a defect (the user believes the whole model was rewritten).
``uncovered_weights`` lists them, one per Plan key, so each per-layer pass adds a SKIP row:

- graph side: a parameter of rank ≥ 2 read (directly, or through one-input ops such as ``.T`` or
  ``0.5 * w``) by a contraction op of the captured graph — linear/conv/matmul operands the
  analysis did not follow, ``einsum``/``bmm``/``bilinear``/grouped-GEMM forms, transposed
  convolutions and the fused recurrent ops (``aten.lstm``, ``aten.gru_cell``...), whose gate GEMMs
  run inside one op — or by any custom op (``torch.library``), which the analysis cannot look into
  (Hugging Face MoE experts run their 3-D weights through ``transformers::grouped_mm_fallback``);
- module side: an ``nn.Linear``/conv/``nn.Bilinear``/recurrent module whose weight the captured
  forward never read as a layer weight (unused in this forward, tied to another module's, or
  computed by a ``torch.nn.utils.parametrize`` parametrization such as ``weight_norm``: keyed by
  the module, not by ``parametrizations.weight.original0``).

Elementwise reads (a position embedding added, a class token concatenated) and lookups
(``nn.Embedding``) are not contractions and get no row.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from effcompile._compat import ConvNd
from effcompile.plan import Action, PlanRow, layer_key

from .capture import PARAMETRIZED_REASON, GraphCapture, parametrized_weight, registered_parameter, weight_owner

__all__ = ["UncoveredWeight", "uncovered_weights", "uncovered_rows", "tied_parameters"]

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class UncoveredWeight:
    layer: str  # the Plan key (owner module path, plus the attribute when it is not ``weight``)
    op: str  # the op (or module class) that reads it
    weight_shape: Tuple[int, ...]
    reason: str


def _packets(*names: str) -> set:
    """The OpOverloadPackets of ``names`` that this torch version has (an overload-agnostic match)."""
    return {getattr(aten, name) for name in names if hasattr(aten, name)}


_LAYER_OPS = _packets("linear", "conv1d", "conv2d", "conv3d", "convolution", "matmul", "mm", "addmm")
_FORM_OPS = _packets("einsum", "bmm", "baddbmm", "addbmm", "bilinear", "_trilinear", "tensordot", "mv", "addmv",
                     "_grouped_mm", "_scaled_grouped_mm")
# Namespaces whose ops the analysis knows (aten, prims) or adds itself; an op of any other namespace
# (a torch.library custom op: Hugging Face MoE experts' grouped GEMM, a user's fused kernel) is opaque.
_KNOWN_NAMESPACES = ("aten", "prims", "higher_order", "effcompile")
_TRANSPOSED_OPS = _packets("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_RECURRENT_OPS = _packets("lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell",
                          "rnn_relu_cell", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell")
_LAYER_MODULES = (nn.Linear, ConvNd, nn.Bilinear, nn.RNNBase, nn.RNNCellBase)


def _packet(node: torch.fx.Node) -> Optional[object]:
    return getattr(node.target, "overloadpacket", None)


def _custom_namespace(node: torch.fx.Node) -> Optional[str]:
    """The namespace of a custom op's node (None for aten, prims and Python callables)."""
    namespace = getattr(node.target, "namespace", None)
    return namespace if isinstance(namespace, str) and namespace not in _KNOWN_NAMESPACES else None


def _op_name(node: torch.fx.Node) -> str:
    return str(getattr(_packet(node), "__name__", node.target)).split(".")[-1]


def _nodes_in(value: object) -> Iterator[torch.fx.Node]:
    """The graph values among an op's arguments (the recurrent ops take their weights as a list)."""
    if isinstance(value, torch.fx.Node):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _nodes_in(item)


def _source_parameter(node: torch.fx.Node, params: Dict[str, str]) -> Tuple[Optional[str], List[str]]:
    """Follow one-input ops back to a parameter placeholder: (its name or None, the ops passed through).

    Only ops with a single graph input: ``x + pos_embed`` is no use of ``pos_embed`` as a weight."""
    through = []
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node) \
            and len(node.all_input_nodes) == 1:
        through.append(_op_name(node))
        node = node.args[0]
    return (params.get(node.name) if node.op == "placeholder" else None), through


def _reason(node: torch.fx.Node, through: List[str], position: int) -> str:
    packet, op = _packet(node), _op_name(node)
    namespace = _custom_namespace(node)
    if namespace is not None:
        return (f"read by the custom op {namespace}::{op}, which the layer analysis cannot look into (exact "
                "backprop; Hugging Face MoE experts: their grouped GEMM)")
    if packet in _RECURRENT_OPS:
        return (f"recurrent layer: its gate GEMMs run inside one fused aten.{op}, which the layer analysis cannot "
                "split into layers (exact backprop)")
    if packet in _TRANSPOSED_OPS or (packet is aten.convolution and len(node.args) > 6 and node.args[6]):
        return "transposed convolution"
    if packet in _FORM_OPS:
        return f"{op} against a parameter is not a recognised layer form (write it as F.linear or @)"
    if through:
        return f"the weight reaches {op} through {' → '.join(reversed(through))}, which the layer analysis does not follow"
    return (f"the parameter is operand {position} of {op}, not its weight operand (W @ x): not a recognised layer form "
            "(write it as x @ W.T or F.linear)")


def _layer_of(fqn: str, packet: object) -> str:
    owner, attr = weight_owner(fqn)
    # A recurrent module's weights (weight_ih_l0, weight_hh_l0, ...) are one layer: one row for the module.
    return (owner or "<root>") if packet in _RECURRENT_OPS else layer_key(owner, attr)


def _graph_rows(model: nn.Module, captured: GraphCapture, covered: set) -> Dict[str, UncoveredWeight]:
    params = dict(captured.exported.graph_signature.inputs_to_parameters)
    rows: Dict[str, UncoveredWeight] = {}
    contractions = _LAYER_OPS | _FORM_OPS | _TRANSPOSED_OPS | _RECURRENT_OPS
    for node in captured.exported.graph.nodes:
        if node.op != "call_function" or (_packet(node) not in contractions and _custom_namespace(node) is None):
            continue
        for position, operand in enumerate(node.args):
            for value in _nodes_in(operand):
                fqn, through = _source_parameter(value, params)
                if fqn is None:
                    continue
                parameter = registered_parameter(model, fqn)
                if parameter.dim() < 2 or id(parameter) in covered:
                    continue
                layer = _layer_of(fqn, _packet(node))
                # A parametrization's own ops (spectral_norm's power iteration) are not why: it is computed.
                reason = PARAMETRIZED_REASON if parametrized_weight(fqn) else _reason(node, through, position)
                rows.setdefault(layer, UncoveredWeight(layer, _op_name(node), tuple(parameter.shape), reason))
    return rows


def tied_parameters(model: nn.Module) -> Dict[str, List[str]]:
    """Each name of a parameter registered under several names → its other names."""
    names_by_id: Dict[int, List[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(parameter), []).append(name)
    return {name: [other for other in names if other != name]
            for names in names_by_id.values() if len(names) > 1 for name in names}


def _layer_weights(module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """A layer module's weights of rank >= 2, a parametrized one as the originals it is computed from."""
    weights = [(attr, p) for attr, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if parametrize.is_parametrized(module):
        weights += [(attr, p) for attr, originals in module.parametrizations.items() for p in originals.parameters()]
    return weights


def _module_rows(model: nn.Module, layers: set, reported: set) -> Dict[str, UncoveredWeight]:
    """Layer modules no candidate is keyed by (``layers``) and the graph scan did not report: a
    module whose weight is tied to another's is keyed by one of them only, and gets its own row."""
    tied = tied_parameters(model)
    rows: Dict[str, UncoveredWeight] = {}
    for path, module in model.named_modules():
        if not isinstance(module, _LAYER_MODULES):
            continue
        weights = _layer_weights(module)
        if not weights:
            continue
        recurrent = isinstance(module, (nn.RNNBase, nn.RNNCellBase))
        attr, weight = weights[0]
        layer = (path or "<root>") if recurrent else layer_key(path, attr)
        if layer in layers or layer in reported:
            continue
        fqn = f"{path}.{attr}" if path else attr
        others = tied.get(fqn, [])
        if parametrize.is_parametrized(module, attr):
            reason = PARAMETRIZED_REASON
        elif others:
            reason = f"tied weight shared with {', '.join(others)}"
        elif getattr(module, "transposed", False):
            reason = "transposed convolution"
        else:
            reason = "its weight is not used as a linear/conv weight in the captured forward"
        rows[layer] = UncoveredWeight(layer, type(module).__name__, tuple(weight.shape), reason)
    return rows


def uncovered_weights(model: nn.Module, captured: GraphCapture) -> List[UncoveredWeight]:
    """Every contraction weight of ``model`` that ``captured.layers`` does not hold, with why."""
    covered = {id(candidate.parameter(model)) for candidate in captured.layers}
    rows = _graph_rows(model, captured, covered)
    rows.update(_module_rows(model, {candidate.layer for candidate in captured.layers}, set(rows)))
    return list(rows.values())


def uncovered_rows(pass_name: str, model: nn.Module, captured: GraphCapture, planned: List[PlanRow]) -> List[PlanRow]:
    """A per-layer pass's SKIP rows for the weights it cannot see as layers (none already planned)."""
    taken = {row.layer for row in planned}
    return [PlanRow(layer=weight.layer, pass_name=pass_name, action=Action.SKIP, op=weight.op,
                    weight_shape=weight.weight_shape, reason=weight.reason)
            for weight in uncovered_weights(model, captured) if weight.layer not in taken]
