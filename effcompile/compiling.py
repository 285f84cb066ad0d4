"""``torch.compile`` with one Dynamo cache per model, for the training steps effcompile builds.

Dynamo keeps its compiled graphs, and counts recompilations against ``recompile_limit`` (8), per
*code object*.  Every step that ``train_step`` builds runs the same few functions (the closure
``forward_loss``, a selector's bound methods), so without care all models trained in one process
share one cache: the ninth model of a new class or configuration silently falls back to eager
(Dynamo only logs a warning), dropping the compiled rewrites the Plan promised.
:func:`compile_for` gives each model its own copy of the function's code object, so each model
has its own cache and limit, and a second step built for the same model reuses the first's graphs.
"""

from __future__ import annotations

import types
import weakref
from typing import Any, Callable, Dict

import torch
import torch.nn as nn

__all__ = ["compile_for"]

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
