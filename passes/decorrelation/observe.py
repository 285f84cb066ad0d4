"""Seeing a layer's input where the graph computes it: a WeightUseMode around a module call.

The R update needs the rows the layer multiplies.  When the input is an argument of a module
call, a forward pre-hook of that call reads it (``rewrite._ScopeObserver``, the cheap path).
When the input is computed *inside* the module that calls the layer — ``nn.MultiheadAttention``
feeds its attention output to ``linear(attn, out_proj.weight, out_proj.bias)`` inside
``F.multi_head_attention_forward``; a custom module calls ``F.linear(t, self.w)`` on a ``t`` of
its own — no hook sees it.  For those layers the scope module's ``forward`` runs inside a
:class:`LayerInputObserver`, a :class:`~effcompile.passes.analysis.weight_ops.WeightUseMode`
(views, composites and the cost of the mode are described there):

* Reading a decorrelated weight inside the scope forms ``A = W·R`` (``DecorrelationState.forward``),
  which registers ``A`` with the active observer (``watch``).
* Every layer op whose weight operand is ``A`` (or a view of it) hands its input to that layer's
  ``DecorrelationState.observe`` (in training mode), then runs unchanged.  The update comes after
  ``A`` was formed, so this step's product uses the R the statistics were measured with; the next
  step uses the updated R.
* When the scope call ends, a weight formed but never seen as a layer weight raises: the update
  never goes silently missing.

Eager and compiled runs behave alike: Dynamo traces the mode (entered inside the compiled
function), so ``torch.compile`` graphs (aot_eager, Inductor) contain the update and the mode
costs nothing at run time.  In eval mode the mode is not entered at all.
"""

from __future__ import annotations

from typing import Any, Sequence

from effcompile.passes.analysis.weight_ops import WeightUseMode, argument

__all__ = ["LayerInputObserver", "observed_forward"]


class LayerInputObserver(WeightUseMode):
    """Feeds the inputs of the layer ops that use the watched fused weights to their states."""

    def __init__(self, states: Sequence[Any]) -> None:
        super().__init__()
        self.states = list(states)

    def layer_call(self, func, op, args, kwargs, state):
        if state.training:
            state.observe([argument(args, kwargs, op[1], op[2])])
        self.mark_handled(state)
        return func(*args, **kwargs)

    def check(self, scope: str) -> None:
        for state in self.unhandled():
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
