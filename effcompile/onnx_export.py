"""ONNX export of a transformed model, and an inspection report read from the ONNX graph itself."""

from __future__ import annotations

import ast
import os
from typing import Any, Dict, List, Union

import torch
import torch.nn as nn

from .plan import layer_key

__all__ = ["export_onnx", "inspect_onnx", "OnnxFileError", "NAME_SCOPES_KEY"]

# Every node of torch.onnx.export(dynamo=True) carries its module path in this metadata entry.
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"

# Shape and constant plumbing around an inserted computation: not worth a row of its own.
# Layout ops count too: a Kronecker-structured R's two products transpose the weight between them.
_PLUMBING_OPS = {"Constant", "Reshape", "Transpose", "Concat", "Identity", "Shape", "Gather", "Unsqueeze", "Squeeze",
                 "Cast", "Slice", "Pad"}


def export_onnx(model: nn.Module, example_inputs: Any, path: Union[str, os.PathLike], opset_version: int = 18) -> str:
    """Export the transformed forward (eval mode: no pass updates run) to ``path``.

    The inserted ops stay as ordinary ONNX ops (e.g. the decorrelation's W·R product is a MatMul
    inside the ``<layer>.weight_decorrelation`` name scope), so onnxruntime runs the file as is.
    The graph's outputs are the tensors of the model's output in order (``inputs.tensor_leaves``:
    a ``ModelOutput``'s logits first; an object pytree cannot flatten, such as a decoder's KV
    cache, is left out).  The model is checked with ``onnx.checker`` before returning.
    """
    import onnx

    from .api import _unwrap
    from .inputs import model_inputs, tensor_outputs

    module = _unwrap(model)
    was_training = module.training
    module.eval()
    try:
        batch = model_inputs(example_inputs)  # a tensor, a tuple or a dict of keyword inputs
        with tensor_outputs(module):
            program = torch.onnx.export(module, batch.args, kwargs=batch.kwargs or None, dynamo=True,
                                        opset_version=opset_version, optimize=False, verbose=False)
        program.save(os.fspath(path))
    finally:
        module.train(was_training)
    onnx.checker.check_model(os.fspath(path), full_check=True)
    return os.fspath(path)


def _scopes(node: Any) -> List[str]:
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return [prop.value]
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return []


def _inserted_suffixes() -> Dict[str, str]:
    """Module-name suffix → the pass that inserts such modules (each pass declares its own)."""
    from effcompile.passes import PASSES

    return {suffix: name for name, model_pass in PASSES.items() for suffix in model_pass.onnx_scope_suffixes}


def _inserted_by(scopes: List[str]) -> Any:
    """(layer path, pass) if a scope is a pass-inserted module, else None.

    ``scopes`` is the node's name-scope stack: full module paths from the root ('') inward, then
    the op's own name, e.g. ``['', 'fc', 'fc.weight_decorrelation', 'einsum']``.
    """
    suffixes = _inserted_suffixes()
    for scope in scopes:
        for suffix, pass_name in suffixes.items():
            if scope.endswith(suffix):
                owner, _, attr = scope[: -len(suffix)].rpartition(".")
                return layer_key(owner, attr), pass_name
    return None


class OnnxFileError(ValueError):
    """An ONNX file that cannot be inspected: missing, empty, not a protobuf ModelProto or invalid."""


def _read_onnx(path: Union[str, os.PathLike]) -> Any:
    """The checked ModelProto at ``path`` (external tensor data is not read: only the graph is needed)."""
    import onnx

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise OnnxFileError(f"ONNX file {name}: {'is a directory' if os.path.isdir(name) else 'does not exist'}")
    if os.path.getsize(name) == 0:
        raise OnnxFileError(f"ONNX file {name}: is empty (0 bytes)")
    try:
        model = onnx.load(name, load_external_data=False)
    except Exception as error:  # protobuf's DecodeError, or whatever a malformed file provokes
        raise OnnxFileError(f"ONNX file {name}: is truncated or not an ONNX model "
                            f"({type(error).__name__}: {error})") from None
    if not model.graph.node and not model.opset_import:
        raise OnnxFileError(f"ONNX file {name}: is not an ONNX model (it decodes to an empty ModelProto)")
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # onnx.checker.ValidationError and friends
        first = (str(error).strip().splitlines() or [""])[0]
        raise OnnxFileError(f"ONNX file {name}: is not a valid ONNX model ({type(error).__name__}: {first})") from None
    return model


def inspect_onnx(path: Union[str, os.PathLike]) -> List[Dict[str, str]]:
    """Rows ``{layer, op, pass, nodes}``: what the passes inserted, read from the ONNX node metadata.

    ``op`` names the compute ops of the inserted scope (e.g. ``MatMul``), ``nodes`` counts every
    node in it including shape plumbing.  A missing, empty, truncated or invalid file raises
    ``OnnxFileError`` (a ``ValueError``) naming ``path``.
    """
    model = _read_onnx(path)
    ops: Dict[tuple, List[str]] = {}
    for node in model.graph.node:
        inserted = _inserted_by(_scopes(node))
        if inserted is not None:
            ops.setdefault(inserted, []).append(node.op_type)
    rows = []
    for (layer, pass_name), op_types in ops.items():
        compute = sorted({op for op in op_types if op not in _PLUMBING_OPS}) or sorted(set(op_types))
        rows.append({"layer": layer, "op": "+".join(compute), "pass": pass_name, "nodes": len(op_types)})
    return rows
