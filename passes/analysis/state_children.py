"""Pass state as child modules of the user's model, without changing what its forward runs.

A pass keeps its runtime state (aux heads, a sample selector) in modules attached to the model, so
``state_dict``, ``.to()`` and DDP see it.  Attaching a child is harmless for most models, but an
``nn.Sequential`` (or any subclass of it: torchvision's ``MLP``, a user's ``class Net(nn.Sequential)``)
runs *every* child in order: its forward would call the state module.  :func:`attach` therefore
gives a Sequential a subclass of its own class whose iteration, ``len`` and indexing skip the state
children, so the inherited forward (or a custom one that iterates ``self``) runs the layers only;
:func:`detach` restores the original class once no state child is left.  The subclass pickles as
its original class plus the state (``torch.save(model)`` works).
"""

from __future__ import annotations

import collections
from typing import Dict, List, Optional, Type

import torch.nn as nn

__all__ = ["attach", "detach"]

_STATE_NAMES = "_effcompile_state_children"
_subclasses: Dict[type, type] = {}


class _LayersOnly:
    """Mixin for nn.Sequential subclasses: iterate, count and index the layers, not the state children."""

    _effcompile_original_class: Type[nn.Sequential]

    def _layer_items(self) -> List[tuple]:
        hidden = self.__dict__.get(_STATE_NAMES, ())
        return [(name, module) for name, module in self._modules.items() if name not in hidden]

    def __iter__(self):
        return iter([module for _, module in self._layer_items()])

    def __len__(self) -> int:
        return len(self._layer_items())

    def __getitem__(self, index):
        items = self._layer_items()
        if isinstance(index, slice):
            return self._effcompile_original_class(collections.OrderedDict(items[index]))
        return items[index][1]

    def __reduce_ex__(self, protocol):
        return _restore, (self._effcompile_original_class,), self.__dict__


def _layers_only_class(cls: type) -> type:
    if cls not in _subclasses:
        _subclasses[cls] = type(cls.__name__, (_LayersOnly, cls),
                                {"_effcompile_original_class": cls, "__module__": cls.__module__,
                                 "__qualname__": cls.__qualname__})
    return _subclasses[cls]


def _restore(cls: type) -> nn.Module:
    """Unpickling: an empty instance of the layers-only subclass of ``cls`` (``__setstate__`` fills it)."""
    return object.__new__(_layers_only_class(cls))


def attach(owner: nn.Module, name: str, module: nn.Module) -> None:
    """``owner.add_module(name, module)``; a Sequential owner keeps running its layers only."""
    owner.add_module(name, module)
    if isinstance(owner, nn.Sequential):
        owner.__dict__[_STATE_NAMES] = owner.__dict__.get(_STATE_NAMES, frozenset()) | {name}
        if not isinstance(owner, _LayersOnly):
            owner.__class__ = _layers_only_class(type(owner))


def detach(owner: nn.Module, name: str) -> Optional[nn.Module]:
    """Remove and return the state child ``name`` (``None`` if absent); undo :func:`attach`'s class."""
    module = owner._modules.pop(name, None)
    hidden = owner.__dict__.get(_STATE_NAMES, frozenset()) - {name}
    if hidden:
        owner.__dict__[_STATE_NAMES] = hidden
    else:
        owner.__dict__.pop(_STATE_NAMES, None)
        if isinstance(owner, _LayersOnly):
            owner.__class__ = owner._effcompile_original_class
    return module
