"""Example forwards made at transform time leave the user's modules as they found them.

Planning runs the model on the example batch (``torch.export``, the stage tracer, the stage cost
measurement, the block-stack measurement).  Parameters and buffers are restored by their callers; this module
covers the rest of a module's Python state, which models do write during a forward: timm's LeViT
caches its attention biases in a dict in eval mode (after a forward with grad, tensors that are
not graph leaves, so ``copy.deepcopy(model)`` — an EMA copy — failed after ``transform``; under
``torch.export`` they would be fake tensors), Hugging Face modules keep counters and flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, List, Set, Tuple

import torch.nn as nn

__all__ = ["module_state_restored"]

# nn.Module's own bookkeeping (parameters, buffers, children, hooks, the training flag): callers
# restore what they change there themselves, and hook handles remove their own entries.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
# Except hooks a forward installs on itself (transformers' output recorders, behind a flag attribute
# the forward also sets): dropping the flag but keeping the hooks made the next call install them
# twice (SegFormer's decode head then received every hidden state twice).
_HOOK_DICTS = tuple(name for name, value in nn.Module().__dict__.items() if "hook" in name and isinstance(value, dict))


@dataclasses.dataclass
class _Snapshot:
    """A module's plain attributes, each with a shallow copy of its contents when it is a dict or
    list, and the handle ids of every hook dict."""

    attributes: Dict[str, Tuple[Any, Any]]
    hook_ids: Dict[str, Set[int]]


def _snapshot(module: nn.Module) -> _Snapshot:
    attributes = {}
    for name, value in module.__dict__.items():
        if name in _MODULE_INTERNALS:
            continue
        contents = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else None
        attributes[name] = (value, contents)
    return _Snapshot(attributes, {name: set(getattr(module, name, ())) for name in _HOOK_DICTS})


def _restore(module: nn.Module, saved: _Snapshot) -> None:
    for name, ids in saved.hook_ids.items():  # hooks the forward registered on the module
        hooks = getattr(module, name, None)
        for key in [key for key in (hooks or ()) if key not in ids]:
            del hooks[key]
    for name in [name for name in module.__dict__ if name not in _MODULE_INTERNALS and name not in saved.attributes]:
        del module.__dict__[name]  # an attribute the forward added
    for name, (value, contents) in saved.attributes.items():
        if isinstance(value, dict) and contents is not None:
            value.clear()  # in place: other references to the container stay valid
            value.update(contents)
        elif isinstance(value, list) and contents is not None:
            value[:] = contents
        module.__dict__[name] = value


@contextlib.contextmanager
def module_state_restored(model: nn.Module) -> Iterator[None]:
    """Every module's plain Python attributes (and the contents of its dict/list attributes) as
    they were before the block."""
    snapshots: List[Tuple[nn.Module, _Snapshot]] = [(m, _snapshot(m)) for m in model.modules()]
    try:
        yield
    finally:
        for module, saved in snapshots:
            _restore(module, saved)
