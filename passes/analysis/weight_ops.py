"""Seeing the ops that use a weight inside a module call: a TorchFunctionMode around the call.

A pass that rewrites a layer in eager mode usually swaps the owner's ``forward``.  That misses
weights used where the owner's forward is not the caller: ``nn.MultiheadAttention`` feeds
``linear(attn, out_proj.weight, out_proj.bias)`` inside ``F.multi_head_attention_forward`` and
never calls ``out_proj``; GPT-2's ``Conv1D`` computes ``addmm(b, x, W)``; a custom module calls
``F.linear(t, self.w)``.  For those, the forward of the module that *uses* the weight (its scope
on the captured graph) runs inside a :class:`WeightUseMode`:

* The pass registers the tensor its weight read returns (``watch``): identity, not shape,
  identifies it.
* Views of it the capture also follows (``t``, ``.T``, ``.mT``, ``transpose``, ``permute``, casts, ``contiguous``,
  ``chunk``/``split``) stay watched, and so does a same-shaped result of any other op applied to
  it (a marker another pass puts on the weight).
* Every ``linear`` / ``conv{1,2,3}d`` / ``matmul`` / ``mm`` / ``addmm`` whose weight operand is a
  watched tensor goes to :meth:`WeightUseMode.layer_call` (the pass's handler: observe the input,
  or run the op as its own autograd function); other ops run unchanged.
* A Python composite that receives a watched weight (``F.multi_head_attention_forward``) would
  run its body with the mode popped (``handle_torch_function``), hiding the inner ``linear``; the
  mode runs the body with itself re-entered, skipping the composite's own ``__torch_function__``
  hop once (``_compat.redispatch_function``).  Dynamo dispatches functions listed as overridable
  at their call site and would dispatch the composite again, so the body runs through an
  undecorated copy of the function (same code and globals).
* Python-level ``Tensor`` methods (``split``, ``unflatten``, …) are re-issued as method calls:
  Dynamo cannot inline their ``super()`` call from inside a mode.
* :meth:`WeightUseMode.unhandled` lists the weights registered but never handled as a layer
  weight, so a pass can raise instead of going silently missing.

Dynamo traces the mode when it is entered inside a compiled function, so a pass may use it in
compiled code too (it then costs nothing at run time).  In eager mode every torch call of the
scope's forward passes through ``__torch_function__`` (a few µs each).
"""

from __future__ import annotations

import types
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from effcompile._compat import dispatch_free_globals, redispatch_function

__all__ = ["WeightUseMode", "argument"]

# Layer ops: function → (kind, position of the input, its keyword, position of the weight, its
# keyword).  kind: "linear" (weight out×in, bias at 2), "conv" (weight out×in/g×k…, bias at 2),
# "matmul"/"mm" (weight operand in×out, no bias), "addmm" (weight in×out, bias at 0).
_LAYER_OPS: Tuple[Tuple[Any, str, int, str, int, str], ...] = (
    (F.linear, "linear", 0, "input", 1, "weight"),
    (torch.conv1d, "conv", 0, "input", 1, "weight"),
    (torch.conv2d, "conv", 0, "input", 1, "weight"),
    (torch.conv3d, "conv", 0, "input", 1, "weight"),
    (torch.matmul, "matmul", 0, "input", 1, "other"),
    (torch.Tensor.matmul, "matmul", 0, "input", 1, "other"),
    (torch.Tensor.__matmul__, "matmul", 0, "input", 1, "other"),
    (torch.mm, "mm", 0, "input", 1, "mat2"),
    (torch.Tensor.mm, "mm", 0, "input", 1, "mat2"),
    (torch.addmm, "addmm", 1, "mat1", 2, "mat2"),
    (torch.Tensor.addmm, "addmm", 1, "mat1", 2, "mat2"),
) + tuple(  # the same ops called as torch.ops.aten.* (packet or default overload)
    (op, kind, input_position, input_keyword, weight_position, weight_keyword)
    for name, kind, input_position, input_keyword, weight_position, weight_keyword in (
        ("linear", "linear", 0, "input", 1, "weight"), ("conv1d", "conv", 0, "input", 1, "weight"),
        ("conv2d", "conv", 0, "input", 1, "weight"), ("conv3d", "conv", 0, "input", 1, "weight"),
        ("matmul", "matmul", 0, "self", 1, "other"), ("mm", "mm", 0, "self", 1, "mat2"),
        ("addmm", "addmm", 1, "mat1", 2, "mat2"))
    for op in (getattr(torch.ops.aten, name), getattr(torch.ops.aten, name).default))
# Ops whose result is the weight itself up to layout or dtype (what capture's weight tracing follows).
# ``W.T`` and ``W.mT`` reach an eager mode as their property getters (Falcon's ``x @ self.weight.T``);
# Dynamo does not dispatch properties to modes, but compiled steps never enter these modes.
_WEIGHT_VIEWS: Tuple[Any, ...] = (
    torch.Tensor.T.__get__, torch.Tensor.mT.__get__, torch.Tensor.adjoint, torch.Tensor.swapaxes,
    torch.Tensor.swapdims,
    torch.Tensor.t, torch.t, torch.Tensor.transpose, torch.transpose, torch.Tensor.permute, torch.permute,
    torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16,
    torch.Tensor.double, torch.Tensor.type_as, torch.Tensor.clone, torch.clone, torch.Tensor.detach, torch.detach,
    torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split,
)


def _undecorated(func: types.FunctionType, namespace: Optional[Dict[str, Any]] = None) -> types.FunctionType:
    """A copy of a Python function (same code, defaults; its globals or ``namespace``) that Dynamo
    inlines as user code."""
    namespace = func.__globals__ if namespace is None else namespace
    copy = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


# Python composites of torch.nn.functional (F.multi_head_attention_forward, ...) and their copies,
# made here: Dynamo cannot build a function object while tracing.
_COMPOSITES: Tuple[types.FunctionType, ...] = tuple(
    _undecorated(value) for name, value in sorted(vars(F).items())
    if isinstance(value, types.FunctionType) and not name.startswith("__"))
# The same bodies with their own dispatch check off, for a torch without a redispatch hook (2.11).
_F_NAMESPACE = dispatch_free_globals(vars(F))
_UNDISPATCHED: Tuple[types.FunctionType, ...] = tuple(_undecorated(function, _F_NAMESPACE) for function in _COMPOSITES)

# func → its role: ("layer", LayerOp fields...), ("view", method name or None), ("method", name): a
# Tensor method written in Python (``split``, ``unflatten``: Dynamo cannot inline their ``super()``
# call from inside a mode, so they are re-issued as method calls), ("composite", index into _COMPOSITES).
_ROLES: Dict[Any, Tuple[Any, ...]] = {}
for _name, _value in vars(torch.Tensor).items():
    if isinstance(_value, types.FunctionType):
        _ROLES[_value] = ("method", _name)
for _index, (_name, _value) in enumerate(
        (name, value) for name, value in sorted(vars(F).items())
        if isinstance(value, types.FunctionType) and not name.startswith("__")):
    _ROLES.setdefault(_value, ("composite", _index))
for _value in _WEIGHT_VIEWS:
    _method = _ROLES.get(_value, (None, None))
    _ROLES[_value] = ("view", _method[1] if _method[0] == "method" else None)
for _entry in _LAYER_OPS:
    _ROLES[_entry[0]] = ("layer",) + _entry[1:]
_OTHER = ("other",)


@torch.compiler.assume_constant_result
def _role(func: Any) -> Tuple[Any, ...]:
    # A dict lookup, run as Python even while Dynamo traces (its result is a constant): Dynamo
    # would otherwise trace a lookup per torch call of the scope's forward, which is slow.
    try:
        return _ROLES.get(func, _OTHER)
    except TypeError:  # an unhashable callable
        return _OTHER


def argument(args: tuple, kwargs: dict, position: int, keyword: str) -> Any:
    """The argument at ``position`` or passed as ``keyword`` (None when absent)."""
    return args[position] if len(args) > position else kwargs.get(keyword)


def _call(func: Any, method: Any, args: tuple, kwargs: dict) -> Any:
    if method is not None and args and isinstance(args[0], torch.Tensor):
        return getattr(args[0], method)(*args[1:], **kwargs)
    return func(*args, **kwargs)


class WeightUseMode(TorchFunctionMode):
    """Hands every layer op whose weight operand is a watched tensor to :meth:`layer_call`.

    ``watch(tensor, key)`` registers a tensor a weight read returned; ``key`` names the layer to
    the subclass (any object, compared by identity).
    """

    def __init__(self) -> None:
        super().__init__()
        self.watched: List[Tuple[torch.Tensor, Any]] = []
        self.formed: List[Any] = []
        self.handled: List[Any] = []

    def watch(self, tensor: torch.Tensor, key: Any) -> None:
        self.watched.append((tensor, key))
        if not any(key is seen for seen in self.formed):
            self.formed.append(key)

    def key_of(self, value: Any) -> Optional[Any]:
        if isinstance(value, torch.Tensor):
            for tensor, key in self.watched:
                if value is tensor:
                    return key
        return None

    def mark_handled(self, key: Any) -> None:
        if not any(key is seen for seen in self.handled):
            self.handled.append(key)

    def unhandled(self) -> List[Any]:
        """The keys watched in this call but never handled as the weight of a layer op."""
        return [key for key in self.formed if not any(key is seen for seen in self.handled)]

    def layer_call(self, func: Any, op: Tuple[Any, ...], args: tuple, kwargs: dict, key: Any) -> Any:
        """Run the layer op ``func(*args, **kwargs)`` whose weight is watched under ``key``.

        ``op``: ``(kind, input position, input keyword, weight position, weight keyword)``, kind
        "linear", "conv", "matmul", "mm" or "addmm".  The subclass calls :meth:`mark_handled` for
        what it handled.  Runs with this mode popped (the ops inside are not seen again).
        """
        raise NotImplementedError

    def _holds_watched(self, args: tuple, kwargs: dict) -> bool:
        return any(self.key_of(value) is not None for value in list(args) + list(kwargs.values()))

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        role = _role(func)
        kind = role[0]
        if kind == "layer":
            op = role[1:]
            key = self.key_of(argument(args, kwargs, op[3], op[4]))
            if key is not None:
                return self.layer_call(func, op, args, kwargs, key)
            return func(*args, **kwargs)
        if kind == "view":
            key = self.key_of(args[0]) if args else None
            out = _call(func, role[1], args, kwargs)
            if key is not None:
                for piece in (out if isinstance(out, (tuple, list)) else (out,)):
                    self.watched.append((piece, key))
            return out
        if kind == "composite" and self._holds_watched(args, kwargs):
            # A composite (F.multi_head_attention_forward) gets a watched weight: run its body watched.
            with self:
                return redispatch_function(_COMPOSITES[role[1]], types_, args, kwargs, _UNDISPATCHED[role[1]])
        out = _call(func, role[1] if kind == "method" else None, args, kwargs)
        if args and isinstance(out, torch.Tensor):
            # An op that returns a same-shaped tensor from a watched weight (another pass's weight
            # marker): the plan saw only layer and view uses of the weight.
            key = self.key_of(args[0])
            if key is not None and out.shape == args[0].shape:
                self.watched.append((out, key))
        return out
