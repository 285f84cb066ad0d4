"""Graph capture and layer analysis shared by the passes.

``capture(model, example_inputs)`` exports the model with ``torch.export`` (non-strict, training
IR) and finds every *weight use*: an ``aten.linear``, ``aten.conv{1,2,3}d``/``aten.convolution``
or ``aten.matmul``/``aten.mm`` whose weight operand is a parameter, possibly seen through views
(``t``, ``transpose``, ``chunk``/``getitem`` as ``nn.MultiheadAttention`` does with
``in_proj_weight``, dtype casts).  Layers are found on the graph, not by module type, so
``F.linear`` in a custom module, ``x @ self.weight`` and attention projections are found the
same way as ``nn.Linear``.

The model is called as users call it: ``example_inputs`` may be a tensor, a tuple of positional
inputs or a dict of keyword arguments (a Hugging Face batch); outputs may be anything whose
tensors ``effcompile.inputs.tensor_leaves`` finds (a ``ModelOutput`` holding a KV-cache object
exports as its tensors).  ``addmm(b, X, W)`` with ``W`` stored in×out (GPT-2's ``Conv1D``) is a
``matmul`` use with contracted axis 0, like ``X @ W``.

For each use the analysis also locates the op's *input* among the arguments of the module call
that contains the op (its innermost ``nn_module_stack`` scope), using the module call
signatures that ``preserve_module_call_signature`` records.  Passes that need the layer input at
run time (decorrelation samples its rows) hook that module call; an input computed inside the
scope (e.g. the attention output fed to ``nn.MultiheadAttention.out_proj``) is reported in
``input_unobservable`` instead of being guessed, and such passes observe it where the graph
computes it (decorrelation: ``passes/decorrelation/observe.py``).
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from effcompile._compat import pytree, reentrant_checkpoints_inlined

from effcompile.cost import StepWork, step_work
from effcompile.inputs import model_inputs, tensor_outputs
from effcompile.plan import layer_key

from .side_effects import module_state_restored

__all__ = ["ConvGeometry", "WeightUse", "LayerCandidate", "GraphCapture", "capture", "CaptureError", "input_node",
           "registered_parameter", "parametrized_weight", "weight_owner", "PARAMETRIZED_REASON"]

aten = torch.ops.aten


class CaptureError(RuntimeError):
    """The model could not be captured as a graph (data-dependent control flow, bad inputs...)."""


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Arguments of an N-d convolution, normalised to tuples of length ``spatial_dims``."""

    spatial_dims: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]  # left padding per spatial dim
    dilation: Tuple[int, ...]
    groups: int


@dataclasses.dataclass(frozen=True)
class InputLocation:
    """Where a layer's input enters the scope module's ``forward``: positional index and name."""

    index: Optional[int]
    name: str


@dataclasses.dataclass
class WeightUse:
    """One op that uses a parameter as the weight of a linear map."""

    op: str  # "linear" | "conv1d" | "conv2d" | "conv3d" | "matmul"
    node: str
    scope: str  # innermost module path of the op ("" is the root module)
    input_shape: Tuple[int, ...]
    contracted_axis: int  # axis of the *parameter* contracted with the input features
    conv: Optional[ConvGeometry] = None
    input_location: Optional[InputLocation] = None
    unsupported: str = ""  # why this use cannot be handled ("" when it can)
    input_unobservable: str = ""  # why the input cannot be located ("" when it can)
    # The located input feeds nothing but this op inside its scope call, with the contracted
    # features on its last axis all the way (a pass may then transform that argument itself).
    input_exclusive: bool = False
    # The op reads one of the model's own inputs (through views, reshapes, casts and a fixed affine
    # rescaling only): it is an input layer, applied to the raw features (pixels, tabular columns)
    # rather than to features the model computed.
    reads_model_input: bool = False


@dataclasses.dataclass
class LayerCandidate:
    """A parameter used as a layer weight, with all its uses in the graph."""

    param_fqn: str
    owner_path: str
    attr: str
    weight_shape: Tuple[int, ...]
    uses: List[WeightUse] = dataclasses.field(default_factory=list)
    other_uses: List[str] = dataclasses.field(default_factory=list)

    @property
    def layer(self) -> str:
        """The Plan key (see ``effcompile.plan.layer_key``)."""
        return layer_key(self.owner_path, self.attr)

    def parameter(self, model: nn.Module) -> nn.Parameter:
        return registered_parameter(model, self.param_fqn)


_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original\d*$")
PARAMETRIZED_REASON = ("the weight is computed by a parametrization (torch.nn.utils.parametrize: weight_norm, "
                       "spectral_norm, ...); the passes rewrite a weight parameter, not a computed weight")


def parametrized_weight(fqn: str) -> Optional[Tuple[str, str]]:
    """(module path, attribute) of the weight a ``torch.nn.utils.parametrize`` parametrization
    computes from the parameter ``fqn`` (``<path>.parametrizations.<attr>.original[0-9]``), or None."""
    match = _PARAMETRIZED.match(fqn)
    return (match.group(1) or "", match.group(2)) if match else None


def weight_owner(fqn: str) -> Tuple[str, str]:
    """(module path, attribute) of the weight parameter ``fqn`` is: its owner's, or for a
    parametrization's original the parametrized module's (its Plan key, e.g. ``fc``)."""
    return parametrized_weight(fqn) or fqn.rpartition(".")[::2]


def registered_parameter(model: nn.Module, fqn: str) -> nn.Parameter:
    """The parameter registered at ``fqn`` (not ``get_parameter``: an earlier pass may have made the
    attribute a property that computes from it, e.g. decorrelation's ``W·R``)."""
    owner, _, attr = fqn.rpartition(".")
    return model.get_submodule(owner)._parameters[attr]


@dataclasses.dataclass
class GraphCapture:
    exported: torch.export.ExportedProgram
    layers: List[LayerCandidate]
    _plain_steps: Dict[bool, StepWork] = dataclasses.field(default_factory=dict, repr=False)

    def plain_step(self, model: nn.Module, compiled: bool = False) -> StepWork:
        """The cost model's plain training step of the captured ``model`` (``effcompile.cost``),
        eager or as Inductor compiles it, counted once per capture: ``transform`` and every
        pass's plan read the same one."""
        if compiled not in self._plain_steps:
            layer_of_node = {use.node: candidate.layer for candidate in self.layers for use in candidate.uses}
            self._plain_steps[compiled] = step_work(self.exported, layer_of_node, dict(model.named_parameters()),
                                                    compiled=compiled)
        return self._plain_steps[compiled]


# Ops through which a weight keeps its identity (values unchanged up to layout or dtype).
_WEIGHT_IDENTITY_OPS = {
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.contiguous.default,
    aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
}
# Ops that swap a 2-D weight's axes (``W.T`` records numpy_T, ``W.mT`` mT; the walk checks the rank).
_WEIGHT_TRANSPOSE_OPS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default,
                         aten.mT.default, aten.adjoint.default, aten.swapaxes.default, aten.swapdims.default}
_WEIGHT_SPLIT_OPS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}
_CONV_OPS = {
    aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
    aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3,
}
_MATMUL_OPS = {aten.matmul.default, aten.mm.default}
# Ops through which a linear layer's input keeps the same multiset of feature rows.
_ROW_PRESERVING_OPS = _WEIGHT_IDENTITY_OPS | {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.flatten.using_ints,
}

# Elementwise ops that rescale a tensor by a fixed operand (a number, a buffer, a constant).
_CONSTANT_AFFINE_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
                        aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar}

# Row-preserving ops that also keep the last axis as it is (a transform of the last axis commutes with them).
_LAST_AXIS_OPS = _WEIGHT_IDENTITY_OPS | {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.flatten.using_ints,
}


def _shape(node: torch.fx.Node) -> Tuple[int, ...]:
    value = node.meta.get("val")
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else ()


def _scope(node: torch.fx.Node) -> str:
    """Module path of the innermost module call containing ``node``."""
    return _scope_call(node).split("@")[0]


def _scope_call(node: torch.fx.Node) -> str:
    """Like ``_scope`` plus ``@n`` for the n-th repeated call of the same module (``fc@1``)."""
    calls = _module_calls(node)
    return calls[-1] if calls else ""


def _module_calls(node: torch.fx.Node) -> List[str]:
    """Every module call containing ``node``, outermost first, named as ``_scope_call`` names them."""
    calls = []
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        call = key.rpartition("@")[2] if "@" in key else ""
        path = _normalise_path(path)
        calls.append(f"{path}@{call}" if call else path)
    return calls


def _normalise_path(path: str) -> str:
    # nn_module_stack paths look like "L['self'].layer1[0].conv1" (strict) or "layer1.0.conv1".
    path = path.replace("L['self']", "").replace("L__self__", "")
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def _tuple(value: Any, n: int) -> Tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) if len(value) == n else tuple(int(value[0]) for _ in range(n))
    return tuple(int(value) for _ in range(n))


def _conv_geometry(node: torch.fx.Node, spatial_dims: int, weight_shape: Tuple[int, ...]) -> ConvGeometry:
    args = list(node.args) + [None] * 7
    kernel = tuple(weight_shape[2:])
    stride = _tuple(args[3] if args[3] is not None else 1, spatial_dims)
    dilation = _tuple(args[5] if args[5] is not None else 1, spatial_dims)
    groups = int(args[6]) if args[6] is not None else 1
    padding_arg = args[4] if args[4] is not None else 0
    if isinstance(padding_arg, str):
        if padding_arg == "valid":
            padding = (0,) * spatial_dims
        else:  # "same": total dilation*(k-1), the extra element goes right/bottom as in aten
            padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
    else:
        padding = _tuple(padding_arg, spatial_dims)
    return ConvGeometry(spatial_dims, kernel, stride, padding, dilation, groups)


def _trace_weight(node: torch.fx.Node, axis: int, params: Dict[str, str]) -> Tuple[Optional[str], int, str]:
    """Walk from a weight operand back to a parameter.

    Returns (parameter fqn or None, contracted axis of the parameter, reason if unsupported).
    ``axis`` is the contracted axis of the operand as the op sees it.
    """
    while True:
        if node.op == "placeholder":
            return params.get(node.name), axis, ""
        if node.op != "call_function":
            return None, axis, ""
        target = node.target
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node):
            return None, axis, ""
        if target in _WEIGHT_IDENTITY_OPS:
            node = source
        elif target in _WEIGHT_TRANSPOSE_OPS:
            if len(_shape(source)) != 2:
                return None, axis, ""
            axis = 1 - axis
            node = source
        elif target is operator.getitem and isinstance(source, torch.fx.Node) and source.target in _WEIGHT_SPLIT_OPS:
            split_dim = source.args[2] if len(source.args) > 2 else source.kwargs.get("dim", 0)
            rank = len(_shape(source.args[0]))
            if split_dim % max(rank, 1) == axis:
                return params.get(getattr(source.args[0], "name", "")), axis, "the weight is split along its input dimension"
            node = source.args[0]
        else:
            return None, axis, ""


def _module_signatures(exported: torch.export.ExportedProgram) -> Dict[str, Any]:
    signatures = {}
    for entry in exported.module_call_graph:
        key = _normalise_path(entry.fqn)
        if entry.signature is not None and key not in signatures:
            signatures[key] = entry.signature
    return signatures


def _leaf_locations(module: nn.Module, in_spec: Any, n_leaves: int) -> Dict[int, InputLocation]:
    """Map flattened-input index → (positional index, parameter name) for a module call."""
    args, kwargs = pytree.tree_unflatten(list(range(n_leaves)), in_spec)
    params = list(inspect.signature(module.forward).parameters.values())
    locations: Dict[int, InputLocation] = {}
    for position, leaf in enumerate(args):
        if isinstance(leaf, int) and position < len(params):
            locations[leaf] = InputLocation(position, params[position].name)
    for name, leaf in kwargs.items():
        if isinstance(leaf, int):
            index = next((i for i, p in enumerate(params) if p.name == name), None)
            locations[leaf] = InputLocation(index, name)
    return locations


def input_node(use_node: torch.fx.Node) -> Any:
    """The layer-input operand of a weight-use op (``addmm(b, X, W)`` holds it second)."""
    return use_node.args[1] if use_node.target is aten.addmm.default else use_node.args[0]


def _locate_input(
    use_node: torch.fx.Node, scope: str, row_preserving: bool, signatures: Dict[str, Any],
    modules: Dict[str, nn.Module], user_inputs: List[str], root_spec: Any,
) -> Tuple[Optional[InputLocation], str, bool]:
    """Where the op's input enters its scope call, why it cannot be located, and whether it is
    exclusive (see ``WeightUse.input_exclusive``)."""
    node = input_node(use_node)
    allowed = _ROW_PRESERVING_OPS if row_preserving else _WEIGHT_IDENTITY_OPS
    call = _scope_call(use_node)
    if scope:
        signature = signatures.get(call)
        if signature is None:
            return None, f"the call signature of module {scope!r} was not recorded", False
        names = [getattr(arg, "name", None) for arg in signature.inputs]
        locations = _leaf_locations(modules[scope], signature.in_spec, len(names))
    else:  # the root: its user inputs, flattened from (args, kwargs) by the program's input spec
        names, locations = user_inputs, _leaf_locations(modules[""], root_spec, len(user_inputs))
    features = _shape(node)[-1:]
    exclusive = True
    while isinstance(node, torch.fx.Node):
        users_inside = [user for user in node.users if not call or call in _module_calls(user)]
        exclusive = exclusive and len(users_inside) == 1 and _shape(node)[-1:] == features
        if node.name in names:
            location = locations.get(names.index(node.name))
            if location is None:
                return None, f"the input reaches {scope or 'the model'!r} inside a nested argument", False
            return location, "", exclusive
        if node.op == "call_function" and node.target in allowed and node.args:
            exclusive = exclusive and node.target in _LAST_AXIS_OPS
            node = node.args[0]
            continue
        break
    where = f"module {scope!r}" if scope else "the model"
    return None, f"its input is computed inside {where}, not passed to it (wrap the op in its own module)", False


def _reads_model_input(use_node: torch.fx.Node, user_inputs: set, constants: set) -> bool:
    """Whether the op's input is a model input seen only through views, reshapes, casts and a fixed
    affine rescaling (``x / 255``, ``(x − mean) / std`` with numbers or buffers): raw features."""
    node = input_node(use_node)
    while isinstance(node, torch.fx.Node):
        if node.op == "placeholder":
            return node.name in user_inputs
        if node.op != "call_function" or not node.args:
            return False
        if node.target in _ROW_PRESERVING_OPS:
            node = node.args[0]
        elif node.target in _CONSTANT_AFFINE_OPS and len(node.args) == 2:
            # One operand varies, the other is fixed (a number, a buffer, a constant).
            varying = [arg for arg in node.args if isinstance(arg, torch.fx.Node) and arg.name not in constants]
            if len(varying) != 1:
                return False
            node = varying[0]
        else:
            return False
    return False


def _use_from_node(node: torch.fx.Node, params: Dict[str, str]) -> Optional[Tuple[str, WeightUse]]:
    target = node.target
    if target is aten.linear.default:
        op, weight, axis = "linear", node.args[1], 1
    elif target in _CONV_OPS:
        op, weight, axis = f"conv{_CONV_OPS[target]}d", node.args[1], 1
    elif target is aten.convolution.default:
        op, weight, axis = f"conv{len(_shape(node.args[1])) - 2}d", node.args[1], 1
    elif target in _MATMUL_OPS and len(node.args) == 2:
        op, weight, axis = "matmul", node.args[1], 0
    elif target is aten.addmm.default and len(node.args) >= 3 and _is_plain_addmm(node):
        op, weight, axis = "matmul", node.args[2], 0  # b + X @ W (GPT-2 Conv1D: W stored in×out)
    else:
        return None
    if not isinstance(weight, torch.fx.Node):
        return None
    fqn, param_axis, reason = _trace_weight(weight, axis, params)
    if fqn is None:
        return None
    use = WeightUse(op=op, node=node.name, scope=_scope(node), input_shape=_shape(input_node(node)),
                    contracted_axis=param_axis, unsupported=reason)
    if op.startswith("conv"):
        use.conv = _conv_geometry(node, int(op[4]), _shape(weight))
        if target is aten.convolution.default and node.args[6]:
            use.unsupported = "transposed convolution"
    elif op == "matmul" and len(_shape(weight)) != 2:
        use.unsupported = "matmul against a parameter of rank other than 2"
    return fqn, use


def _is_plain_addmm(node: torch.fx.Node) -> bool:
    """``addmm(b, X, W)`` with the default ``beta = alpha = 1`` (a linear map plus a bias)."""
    return node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1


def _export(model: nn.Module, example_inputs: Any, scopes: Tuple[str, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model(*args, **kwargs)`` whose outputs are reduced to their tensors.

    Layer analysis needs only the graph; outputs such as a KV-cache object that pytree cannot
    flatten would fail the export, so the export sees ``effcompile.inputs.tensor_outputs(model)``
    (module paths, parameter names and the recorded call signatures stay the model's own).
    """
    batch = model_inputs(example_inputs)
    with tensor_outputs(model), module_state_restored(model), reentrant_checkpoints_inlined():
        return _export_wrapped(model, batch, scopes)


def _export_wrapped(model: nn.Module, batch: Any, scopes: Tuple[str, ...]) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(model, batch.args, kwargs=batch.kwargs, strict=False,
                                   preserve_module_call_signature=scopes)
    except Exception:  # some modules' calls cannot be preserved; the analysis then reports it
        return torch.export.export(model, batch.args, kwargs=batch.kwargs, strict=False)


def capture(model: nn.Module, example_inputs: Any) -> GraphCapture:
    """Export ``model`` on ``example_inputs`` (tensor, tuple or dict) and list the parameters used
    as layer weights."""
    modules = dict(model.named_modules())
    scopes = tuple(path for path, module in modules.items() if path and next(module.parameters(recurse=False), None) is not None)
    try:
        exported = _export(model, example_inputs, scopes)
    except Exception as error:
        raise CaptureError(_describe_capture_failure(model, error)) from error

    params = dict(exported.graph_signature.inputs_to_parameters)
    user_inputs = list(exported.graph_signature.user_inputs)
    model_input_names = set(user_inputs)
    constants = set(exported.graph_signature.inputs_to_buffers) | set(
        getattr(exported.graph_signature, "inputs_to_lifted_tensor_constants", {}))
    signatures = _module_signatures(exported)
    candidates: Dict[str, LayerCandidate] = {}
    param_nodes = {name for name in params}

    def candidate(fqn: str) -> LayerCandidate:
        if fqn not in candidates:
            owner_path, attr = weight_owner(fqn)
            shape = tuple(model.get_parameter(fqn).shape)
            candidates[fqn] = LayerCandidate(fqn, owner_path, attr, shape)
        return candidates[fqn]

    layer_ops = set()
    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        found = _use_from_node(node, params)
        if found is None:
            continue
        fqn, use = found
        layer_ops.add(node)
        row_preserving = use.op in ("linear", "matmul")
        use.input_location, use.input_unobservable, use.input_exclusive = _locate_input(
            node, use.scope, row_preserving, signatures, modules, user_inputs, exported.call_spec.in_spec)
        use.reads_model_input = _reads_model_input(node, model_input_names, constants)
        if parametrized_weight(fqn):
            use.unsupported = use.unsupported or PARAMETRIZED_REASON
        candidate(fqn).uses.append(use)

    # Any other use of a candidate parameter (as a bias, in a norm, ...) makes it unsafe to rewrite.
    for node in exported.graph.nodes:
        if node.op == "placeholder" and node.name in param_nodes:
            fqn = params[node.name]
            if fqn not in candidates:
                continue
            for user in _users_through_views(node):
                if user not in layer_ops:
                    candidates[fqn].other_uses.append(f"{getattr(user.target, '__name__', user.target)} in {_scope(user) or '<root>'}")
    return GraphCapture(exported, list(candidates.values()))


def _describe_capture_failure(model: nn.Module, error: BaseException) -> str:
    """Name the module path and source line where capture failed, and the construct."""
    paths = {id(module): path for path, module in model.named_modules()}
    torch_dir = os.path.dirname(torch.__file__)
    where = ""
    for raised in _exception_chain(error):
        traceback = raised.__traceback__
        while traceback is not None:  # the innermost user-code frame of a model module wins
            frame = traceback.tb_frame
            owner = frame.f_locals.get("self")
            if id(owner) in paths and not frame.f_code.co_filename.startswith(torch_dir):
                path = paths[id(owner)] or "<root>"
                where = f" in module {path!r} ({type(owner).__name__}.{frame.f_code.co_name}, " \
                        f"{frame.f_code.co_filename}:{traceback.tb_lineno})"
            traceback = traceback.tb_next
    where = where or _locate_in_message(model, str(error), torch_dir)
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    construct = type(error).__name__
    hint = "rewrite the branch with torch.where or move it out of forward"
    if "data-dependent" in message or "GuardOnDataDependent" in construct:
        construct = "data-dependent control flow (a Python branch on a tensor value)"
        hint += _layerdrop_hint(model)
    return (f"could not capture {type(model).__name__} as a graph with torch.export{where}: {construct}: {message}. "
            f"effcompile finds layers on the captured graph; {hint}.")


def _layerdrop_hint(model: nn.Module) -> str:
    """Hugging Face LayerDrop skips whole layers by a random Python branch in training mode."""
    settings = getattr(getattr(model, "config", None), "__dict__", {})  # a Hugging Face config's fields
    drops = {name: value for name, value in settings.items()
             if name.endswith("layerdrop") and isinstance(value, (int, float)) and value > 0}
    if not drops:
        return ""
    settings = ", ".join(f"model.config.{name} = 0.0" for name in drops)
    listed = ", ".join(f"{name}={value}" for name, value in drops.items())
    return (f" — here probably LayerDrop ({listed}), which skips layers by a random draw in training mode: "
            f"set {settings} before transform")


_SOURCE_LINE = re.compile(r'File "([^"]+)", line (\d+), in (\w+)')


def _locate_in_message(model: nn.Module, message: str, torch_dir: str) -> str:
    """Export errors quote the user's source line; map it to the module whose forward holds it."""
    lines = [(f, int(n), fn) for f, n, fn in _SOURCE_LINE.findall(message) if not f.startswith(torch_dir)]
    if not lines:
        return ""
    filename, lineno, function = lines[-1]
    for path, module in model.named_modules():
        code = getattr(type(module).forward, "__code__", None)
        if code is None or code.co_filename != filename:
            continue
        try:
            length = len(inspect.getsourcelines(type(module).forward)[0])
        except (OSError, TypeError):
            length = 1 << 30
        if code.co_firstlineno <= lineno < code.co_firstlineno + length:
            return f" in module {path or '<root>'!r} ({type(module).__name__}.{function}, {filename}:{lineno})"
    return f" at {filename}:{lineno} in {function}"


def _exception_chain(error: BaseException) -> List[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return chain


def _users_through_views(node: torch.fx.Node) -> List[torch.fx.Node]:
    """Terminal users of ``node``, following the view/split ops ``_trace_weight`` walks through."""
    out: List[torch.fx.Node] = []
    for user in node.users:
        passthrough = user.target in _WEIGHT_IDENTITY_OPS or user.target in _WEIGHT_TRANSPOSE_OPS \
            or user.target in _WEIGHT_SPLIT_OPS or user.target is operator.getitem
        if passthrough:
            out.extend(_users_through_views(user))
        else:
            out.append(user)
    return out
