"""Seeing a layer's input where the graph computes it: a TorchFunctionMode around a module call.

The R update needs the rows the layer multiplies.  When the input is an argument of a module
call, a forward pre-hook of that call reads it (``rewrite._ScopeObserver``, the cheap path).
When the input is computed *inside* the module that calls the layer — ``nn.MultiheadAttention``
feeds its attention output to ``linear(attn, out_proj.weight, out_proj.bias)`` inside
``F.multi_head_attention_forward``; a custom module calls ``F.linear(t, self.w)`` on a ``t`` of
its own — no hook sees it.  For those layers the scope module's ``forward`` runs inside a
:class:`LayerInputObserver`:

* Reading a decorrelated weight inside the scope forms ``A = W·R`` (``DecorrelationState.forward``),
  which registers ``A`` with the active observer (``watch``): identity, not shape, identifies it.
* Views of ``A`` the capture also follows (``t``, ``transpose``, ``permute``, casts,
  ``contiguous``, ``chunk``/``split``) stay watched, and so does a same-shaped result of any other
  op applied to ``A`` (a marker another pass puts on the weight, e.g. the randomized VJP's).
* Every ``linear`` / ``conv{1,2,3}d`` / ``matmul`` / ``mm`` / ``addmm`` whose weight operand is a
  watched tensor hands its input to that layer's ``DecorrelationState.observe`` (in training mode),
  then runs unchanged.  The update comes after ``A`` was formed, so this step's product uses the R
  the statistics were measured with; the next step uses the updated R.
* A Python composite that receives a watched weight (``F.multi_head_attention_forward``) would
  run its body with the mode popped (``handle_torch_function``), hiding the inner ``linear``; the
  observer runs the body with itself re-entered, skipping the composite's own
  ``__torch_function__`` hop once (``_compat.redispatch_function``).  Dynamo dispatches
  functions listed as overridable at their call site and would dispatch the composite again, so
  the body runs through an undecorated copy of the function (same code and globals).
* Python-level ``Tensor`` methods (``split``, ``unflatten``, …) are re-issued as method calls:
  Dynamo cannot inline their ``super()`` call from inside a mode.
* When the scope call ends, a weight formed but never seen as a layer weight raises: the update
  never goes silently missing.

Eager and compiled runs behave alike: Dynamo traces the mode (entered inside the compiled
function), so ``torch.compile`` graphs (aot_eager, Inductor) contain the update and the mode
costs nothing at run time.  In eager mode every torch call of the scope's forward passes through
``__torch_function__`` (a few µs each); in eval mode the mode is not entered at all.
"""

from __future__ import annotations

import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from effcompile._compat import dispatch_free_globals, redispatch_function

__all__ = ["LayerInputObserver", "observed_forward"]

# Layer ops: (function, position of the input, keyword of the input, position of the weight, keyword).
_LAYER_OPS: Tuple[Tuple[Any, int, str, int, str], ...] = (
    (F.linear, 0, "input", 1, "weight"),
    (torch.conv1d, 0, "input", 1, "weight"),
    (torch.conv2d, 0, "input", 1, "weight"),
    (torch.conv3d, 0, "input", 1, "weight"),
    (torch.matmul, 0, "input", 1, "other"),
    (torch.Tensor.matmul, 0, "input", 1, "other"),
    (torch.Tensor.__matmul__, 0, "input", 1, "other"),
    (torch.mm, 0, "input", 1, "mat2"),
    (torch.Tensor.mm, 0, "input", 1, "mat2"),
    (torch.addmm, 1, "mat1", 2, "mat2"),
    (torch.Tensor.addmm, 1, "mat1", 2, "mat2"),
) + tuple(  # the same ops called as torch.ops.aten.* (packet or default overload)
    (op, input_position, input_keyword, weight_position, weight_keyword)
    for name, input_position, input_keyword, weight_position, weight_keyword in (
        ("linear", 0, "input", 1, "weight"), ("conv1d", 0, "input", 1, "weight"), ("conv2d", 0, "input", 1, "weight"),
        ("conv3d", 0, "input", 1, "weight"), ("matmul", 0, "self", 1, "other"), ("mm", 0, "self", 1, "mat2"),
        ("addmm", 1, "mat1", 2, "mat2"))
    for op in (getattr(torch.ops.aten, name), getattr(torch.ops.aten, name).default))
# Ops whose result is the weight itself up to layout or dtype (what capture's weight tracing follows;
# ``.T``/``.mT`` are properties Dynamo does not dispatch to modes, and capture does not follow them).
_WEIGHT_VIEWS: Tuple[Any, ...] = (
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

# func → its role: ("layer", input position, input keyword, weight position, weight keyword),
# ("view", method name or None), ("method", name): a Tensor method written in Python (``split``,
# ``unflatten``: Dynamo cannot inline their ``super()`` call from inside a mode, so they are
# re-issued as method calls), ("composite", index into _COMPOSITES).
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


def _argument(args: tuple, kwargs: dict, position: int, keyword: str) -> Any:
    return args[position] if len(args) > position else kwargs.get(keyword)


def _call(func: Any, method: Any, args: tuple, kwargs: dict) -> Any:
    if method is not None and args and isinstance(args[0], torch.Tensor):
        return getattr(args[0], method)(*args[1:], **kwargs)
    return func(*args, **kwargs)


class LayerInputObserver(TorchFunctionMode):
    """Feeds the inputs of the layer ops that use the watched fused weights to their states."""

    def __init__(self, states: Sequence[Any]) -> None:
        super().__init__()
        self.states = list(states)
        self.watched: List[Tuple[torch.Tensor, Any]] = []
        self.observed: List[Any] = []
        self.formed: List[Any] = []

    # Called by DecorrelationState.forward while this observer is its active one.
    def watch(self, fused: torch.Tensor, state: Any) -> None:
        self.watched.append((fused, state))
        if not any(state is seen for seen in self.formed):
            self.formed.append(state)

    def _state_of(self, value: Any) -> Optional[Any]:
        if isinstance(value, torch.Tensor):
            for tensor, state in self.watched:
                if value is tensor:
                    return state
        return None

    def _holds_watched(self, args: tuple, kwargs: dict) -> bool:
        return any(self._state_of(value) is not None for value in list(args) + list(kwargs.values()))

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        role = _role(func)
        kind = role[0]
        if kind == "layer":
            _, input_position, input_keyword, weight_position, weight_keyword = role
            state = self._state_of(_argument(args, kwargs, weight_position, weight_keyword))
            if state is not None:
                if state.training:
                    state.observe([_argument(args, kwargs, input_position, input_keyword)])
                if not any(state is seen for seen in self.observed):
                    self.observed.append(state)
            return func(*args, **kwargs)
        if kind == "view":
            state = self._state_of(args[0]) if args else None
            out = _call(func, role[1], args, kwargs)
            if state is not None:
                for piece in (out if isinstance(out, (tuple, list)) else (out,)):
                    self.watched.append((piece, state))
            return out
        if kind == "composite" and self._holds_watched(args, kwargs):
            # A composite (F.multi_head_attention_forward) gets a fused weight: run its body observed.
            with self:
                return redispatch_function(_COMPOSITES[role[1]], types_, args, kwargs, _UNDISPATCHED[role[1]])
        out = _call(func, role[1] if kind == "method" else None, args, kwargs)
        if args and isinstance(out, torch.Tensor):
            # An op that returns a same-shaped tensor from a watched weight (another pass's weight
            # marker, e.g. the randomized VJP's): the plan saw only layer and view uses of the weight.
            state = self._state_of(args[0])
            if state is not None and out.shape == args[0].shape:
                self.watched.append((out, state))
        return out

    def check(self, scope: str) -> None:
        for state in self.formed:
            if not any(state is seen for seen in self.observed):
                raise RuntimeError(
                    f"effcompile decorrelation: the fused weight of layer {state.spec.owner_path}.{state.spec.attr} "
                    f"was read in the forward of {scope or 'the model'!r} but no linear/conv/matmul used it where "
                    "the observer could see it, so R cannot be updated")


def observed_forward(cls: type):
    """``forward`` for a module class whose calls compute the input of decorrelated layers."""
    base_forward = cls.forward

    def forward(self, *args, **kwargs):
        states = self.__dict__.get("_effcompile_observed", ())
        if not (self.training and any(state.training for state in states)):
            return base_forward(self, *args, **kwargs)
        observer = LayerInputObserver(states)
        previous = [state._active_observer for state in states]
        for state in states:
            state._active_observer = observer
        try:
            with observer:
                out = base_forward(self, *args, **kwargs)
        finally:
            for state, before in zip(states, previous):
                state._active_observer = before
        observer.check(self.__dict__.get("_effcompile_scope", ""))
        return out

    forward.__doc__ = (base_forward.__doc__ or "") + \
        "\n\n(effcompile: runs inside a LayerInputObserver in training mode, see passes/decorrelation/observe.py)"
    return forward
