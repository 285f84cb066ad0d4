"""Eager sketch of weights used outside an ``nn.Linear``/``nn.ConvNd`` forward of their own.

GPT-2's ``Conv1D`` computes ``addmm(b, x, W)``; ``nn.MultiheadAttention`` reads ``in_proj_weight``
and ``out_proj.weight`` inside ``F.multi_head_attention_forward`` (``out_proj`` is never called);
torchvision's Swin calls ``F.linear(x, self.qkv.weight, ...)``; a custom module multiplies
``x @ self.p``.  Swapping the owner's forward cannot reach these ops.  Instead the forward of each
module the captured graph shows using the weight (its *scope*) runs inside an
:class:`EagerSketchMode` (a :class:`~effcompile.passes.analysis.weight_ops.WeightUseMode`) in
eager training:

* the weight read (the sketched class's property) registers the tensor it returns with the active
  mode that covers the layer;
* each ``linear`` / ``matmul`` / ``mm`` / ``addmm`` / ``conv{1,2,3}d`` whose weight operand is
  that tensor or a view of it runs as :class:`SketchedLinear` / :class:`SketchedConv` with the
  layer's current settings (a weight stored in×out is multiplied as ``x·(Wᵀ)ᵀ``: autograd carries
  the sketched gradient back through the transpose, so it stays unbiased for W);
* when the scope call returns, a registered weight that no op used as a layer weight the mode
  could sketch raises: the eager gradient is never silently exact.

Graph before (one use)::  y = addmm(b, x, W)                     (exact backward: Xᵀ·G)
Graph after (eager)::     y = SketchedLinear(x, t(W), b, keep…)  (backward: k sampled rows of X, G)

Compiled training never enters the mode: the marker op and the joint-graph rewrite sketch the
same layers there.  The mode costs a few µs per torch call of the scope's forward in eager mode.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from effcompile._compat import is_compiling
from effcompile.passes.analysis.weight_ops import WeightUseMode, argument

__all__ = ["EagerLayer", "EagerSketchMode", "ScopeSketch", "active_mode_for"]

_ACTIVE = threading.local()


def _active_modes() -> List["EagerSketchMode"]:
    modes = getattr(_ACTIVE, "modes", None)
    if modes is None:
        modes = _ACTIVE.modes = []
    return modes


class EagerLayer:
    """One layer sketched through scope modes: its owner, weight name and the op runner.

    ``run(kind, args, kwargs, input, weight)`` returns the sketched op's output, or None when the
    op's form has no eager sketch (the scope then raises).
    """

    def __init__(self, owner: nn.Module, attr: str, layer: str,
                 run: Callable[[nn.Module, str, str, tuple, dict, Any, Any], Optional[torch.Tensor]]) -> None:
        self.owner, self.attr, self.layer, self._run = owner, attr, layer, run

    def run(self, kind: str, args: tuple, kwargs: dict, input: Any, weight: Any) -> Optional[torch.Tensor]:
        return self._run(self.owner, self.attr, kind, args, kwargs, input, weight)


def active_mode_for(layer: EagerLayer) -> Optional["EagerSketchMode"]:
    """The innermost active scope mode that covers ``layer`` (None outside every such scope)."""
    for mode in reversed(_active_modes()):
        if any(layer is covered for covered in mode.layers):
            return mode
    return None


class EagerSketchMode(WeightUseMode):
    """Runs the layer ops of the registered weights as their sketched autograd functions."""

    def __init__(self, scope: str, layers: Sequence[EagerLayer]) -> None:
        super().__init__()
        self.scope, self.layers = scope, tuple(layers)

    def layer_call(self, func, op, args, kwargs, layer: EagerLayer):
        kind = op[0]
        out = layer.run(kind, args, kwargs, argument(args, kwargs, op[1], op[2]), argument(args, kwargs, op[3], op[4]))
        if out is None:
            return func(*args, **kwargs)  # not handled: the scope's check raises when the call ends
        self.mark_handled(layer)
        return out

    def check(self) -> None:
        missing = [layer.layer for layer in self.unhandled()]
        if missing:
            raise RuntimeError(
                f"effcompile randomized_vjp: layer(s) {', '.join(map(repr, missing))} read their weight in the "
                f"forward of {self.scope or 'the model'!r}, but no linear/matmul/addmm/conv used it in a form the "
                "eager sketch handles; their eager gradient would be exact.  Train compiled "
                "(torch.compile(model, backend='effcompile')) or exclude them: RandomizedVJP(exclude=[...])")


class ScopeSketch:
    """Forward pre-hook and always-called forward hook of one scope module: enter an
    :class:`EagerSketchMode` for the call in eager training, leave it and check after.

    A callable object (not a closure), so ``copy.deepcopy`` of the model copies it with the model.
    """

    def __init__(self, scope: str, layers: Sequence[EagerLayer]) -> None:
        self.scope, self.layers = scope, list(layers)
        self._entered: List[Tuple[nn.Module, EagerSketchMode]] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        if is_compiling() or not (module.training and torch.is_grad_enabled()):
            return
        mode = EagerSketchMode(self.scope, self.layers)
        mode.__enter__()
        _active_modes().append(mode)
        self._entered.append((module, mode))

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if is_compiling() or not self._entered or self._entered[-1][0] is not module:
            return
        _, mode = self._entered.pop()
        modes = _active_modes()
        if modes and modes[-1] is mode:
            modes.pop()
        mode.__exit__(None, None, None)
        if output is not None:  # None: the forward raised, and that error is the one to see
            mode.check()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_entered"] = []
        return state


# ----------------------------------------------------------------------------- sketched op forms
def _conv_padding(padding: Any, weight: torch.Tensor, dilation: Any, input: torch.Tensor
                  ) -> Optional[Tuple[torch.Tensor, Any]]:
    """Numeric padding for a string one ("valid", "same"), padding the input itself when "same"
    is asymmetric (as ``F.conv*d`` does); None for an unknown string."""
    if not isinstance(padding, str):
        return input, padding
    dims = weight.dim() - 2
    if padding == "valid":
        return input, 0
    if padding != "same":
        return None
    dilation = [dilation] * dims if isinstance(dilation, int) else list(dilation)
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if all(total % 2 == 0 for total in totals):
        return input, [total // 2 for total in totals]
    pad: List[int] = []
    for total in reversed(totals):  # F.pad lists the last dimension first
        pad += [total // 2, total - total // 2]
    return F.pad(input, pad), 0


def sketched_op(kind: str, args: tuple, kwargs: dict, input: Any, weight: Any,
                linear: Callable[..., torch.Tensor], conv: Callable[..., torch.Tensor]) -> Optional[torch.Tensor]:
    """The layer op ``kind`` run through ``linear(input, weight_out_in, bias)`` or
    ``conv(input, weight, bias, stride, padding, dilation, groups)``; None for a form neither covers."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return None
    if kind == "linear":
        return linear(input, weight, argument(args, kwargs, 2, "bias")) if weight.dim() == 2 else None
    if kind in ("matmul", "mm"):  # input @ W with W stored in×out
        if weight.dim() != 2 or input.dim() < 2 or (kind == "mm" and input.dim() != 2):
            return None
        return linear(input, weight.t(), None)
    if kind == "addmm":  # addmm(bias, input, W), W in×out
        bias = argument(args, kwargs, 0, "input")
        scaled = len(args) > 3 or kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1
        if scaled or input.dim() != 2 or weight.dim() != 2 or (bias is not None and bias.dim() != 1):
            return None
        return linear(input, weight.t(), bias)
    if kind == "conv":
        given = (argument(args, kwargs, 2 + i, name)
                 for i, name in enumerate(("bias", "stride", "padding", "dilation", "groups")))
        bias, stride, padding, dilation, groups = (default if value is None else value
                                                   for value, default in zip(given, (None, 1, 0, 1, 1)))
        if input.dim() != weight.dim():  # unbatched input
            return None
        padded = _conv_padding(padding, weight, dilation, input)
        if padded is None:
            return None
        return conv(padded[0], weight, bias, stride, padded[1], dilation, groups)
    return None
