"""``torch.compile`` with one Dynamo cache per model, for the training steps effcompile builds.

Dynamo keeps its compiled graphs, and counts recompilations against ``recompile_limit`` (8), per
*code object*.  Every step that ``train_step`` builds runs the same few functions (the closure
``forward_loss``, a selector's bound methods), so without care all models trained in one process
share one cache: the ninth model of a new class or configuration silently falls back to eager
(Dynamo only logs a warning), dropping the compiled rewrites the Plan promised.
:func:`compile_for` gives each model its own copy of the function's code object, so each model
has its own cache and limit, and a second step built for the same model reuses the first's graphs.

:func:`scheduled` runs a compiled step with its modules' Python-side schedules.  A module whose
work runs every few steps (a pass's state updated every ``k`` steps) cannot count steps in Python
inside a compiled graph (Dynamo guards on the count and recompiles every step), so by itself it
computes that work every step and masks the result with a device-side flag.  A module that offers
the schedule protocol (``schedule() -> (period, calls so far)``, ``begin_scheduled_call()``,
``end_scheduled_call()``) instead gets told before each step whether the work is due, as a Python
bool the graph specialises on: one graph per pattern of due modules, and the work runs only where
it is due.  With more patterns than :data:`MAX_SCHEDULE_PATTERNS` (Dynamo's recompile limit is
8, and a partial last batch doubles the graphs) the modules keep their masks.
"""

from __future__ import annotations

import math
import types
import weakref
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn

__all__ = ["compile_for", "scheduled", "MAX_SCHEDULE_PATTERNS"]

MAX_SCHEDULE_PATTERNS = 4

# model → {original code object → that model's copy}; the copies (and their caches) die with it
_copies: "weakref.WeakKeyDictionary[nn.Module, Dict[types.CodeType, types.CodeType]]" = weakref.WeakKeyDictionary()


def _with_code(function: types.FunctionType, code: types.CodeType) -> types.FunctionType:
    copy = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__dict__.update(function.__dict__)
    return copy


def compile_for(model: nn.Module, fn: Callable, **compile_kwargs: Any) -> Callable:
    """``torch.compile(fn, **compile_kwargs)`` with a Dynamo cache private to ``model``.

    ``fn`` is a Python function or a bound method (its ``__self__`` is kept).
    """
    bound_to = fn.__self__ if isinstance(fn, types.MethodType) else None
    function = fn.__func__ if bound_to is not None else fn
    if not isinstance(function, types.FunctionType):
        return torch.compile(fn, **compile_kwargs)  # a callable object: its own frames, nothing to copy
    copies = _copies.setdefault(model, {})
    code = copies.setdefault(function.__code__, function.__code__.replace())
    copy = _with_code(function, code)
    return torch.compile(copy if bound_to is None else types.MethodType(copy, bound_to), **compile_kwargs)


def _scheduled_modules(model: nn.Module) -> List[nn.Module]:
    return [module for module in model.modules()
            if callable(getattr(module, "begin_scheduled_call", None)) and module.schedule()[0] > 1]


def _patterns(modules: List[nn.Module]) -> int:
    """How many distinct sets of due modules the coming steps hold (over one common period)."""
    schedules = [module.schedule() for module in modules]
    period = math.lcm(*(every for every, _ in schedules))
    if period > 64 * MAX_SCHEDULE_PATTERNS:
        return period  # unrelated periods: more patterns than allowed in any case
    return len({tuple((calls + t) % every == 0 for every, calls in schedules) for t in range(period)})


def scheduled(model: nn.Module, step: Callable) -> Callable:
    """``step`` (a compiled step or objective of ``model``), run with its modules' schedules
    (the module docstring); ``step`` itself where no module has one or they have too many patterns."""
    modules = _scheduled_modules(model)
    if not modules or _patterns(modules) > MAX_SCHEDULE_PATTERNS:
        return step
    return _ScheduledStep(step, modules)


class _ScheduledStep:
    """Calls ``step`` between its modules' ``begin_scheduled_call`` and ``end_scheduled_call``;
    attribute reads and writes (``step.grad_norm``, ``objective.reported_loss``) go to ``step``."""

    def __init__(self, step: Callable, modules: List[nn.Module]) -> None:
        self.__dict__.update(_step=step, _modules=modules)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for module in self._modules:
            module.begin_scheduled_call()
        try:
            return self._step(*args, **kwargs)
        finally:  # outside the step the modules fall back to their masks (a user's own compiled loop)
            for module in self._modules:
                module.end_scheduled_call()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_step"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._step, name, value)
