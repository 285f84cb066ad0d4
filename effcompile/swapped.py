"""Generated module classes that pickle.

A pass that rewrites a module in place swaps its class for a subclass it generates
(``type(name, (cls,), namespace)``), cached per arguments.  Pickle stores a class by its import
path, and a generated class has none, so ``torch.save(model)`` and sending the model to another
process would fail.  ``picklable(cls, factory, args)`` gives the generated class a recipe: an
instance pickles as ``factory(*args)`` rebuilt on load (a module-level ``factory``, pickled by
reference; any generated class among ``args`` — a pass composed over another's rewrite — by its
own recipe), then the module's state as usual.  ``copy.deepcopy`` takes the same path.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

__all__ = ["picklable"]

_RECIPE = "_effcompile_recipe"
_CLASS = "effcompile.generated_class"


def picklable(cls: type, factory: Callable[..., type], args: Tuple[Any, ...]) -> type:
    """Mark ``cls`` (just made by ``factory(*args)``) as rebuildable from that call; returns it."""
    setattr(cls, _RECIPE, (factory, tuple(args)))
    cls.__reduce_ex__ = _reduce_ex
    return cls


def _encode(value: Any) -> Any:
    if isinstance(value, type) and _RECIPE in value.__dict__:
        factory, args = value.__dict__[_RECIPE]
        return (_CLASS, factory, tuple(_encode(arg) for arg in args))
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 3 and value[0] == _CLASS:
        _, factory, args = value
        return factory(*(_decode(arg) for arg in args))
    return value


def _rebuild(encoded: Tuple[Any, ...]) -> Any:
    cls = _decode(encoded)
    return cls.__new__(cls)


def _reduce_ex(self: Any, protocol: int) -> Tuple[Any, ...]:
    reduced = object.__reduce_ex__(self, protocol)  # (copyreg.__newobj__, (cls,), state, ...)
    return (_rebuild, (_encode(type(self)),)) + tuple(reduced[2:])
