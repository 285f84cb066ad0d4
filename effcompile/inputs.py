"""Model inputs and outputs as users have them: a tensor, a tuple, or a dict of keyword arguments.

Every entry point (``transform``, ``train_step``'s step, ONNX export, the stage runtime) accepts
the batch in the form the model's ``forward`` takes it:

* a tensor → ``model(x)``
* a tuple or list → ``model(*inputs)`` (positional)
* a dict (e.g. a Hugging Face batch ``{"input_ids": ..., "attention_mask": ...}``) → ``model(**inputs)``

``ModelInputs`` holds the normalised ``(args, kwargs)``; :func:`call` runs the model on it.
Model outputs are passed to the user's loss function exactly as the model returned them (a
tensor, a tuple, a ``ModelOutput``); :func:`tensor_leaves` gives their tensors where a pass needs
only those (graph capture).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

__all__ = ["ModelInputs", "model_inputs", "call", "batch_size", "tensor_leaves", "map_batch"]


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """One batch of model inputs: ``model(*args, **kwargs)``."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        """Every tensor of the batch, positional first (nested containers included)."""
        leaves = pytree.tree_leaves((self.args, self.kwargs))
        return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))

    def map(self, fn: Callable[[torch.Tensor], Any]) -> "ModelInputs":
        """The same batch with ``fn`` applied to every tensor (e.g. ``.to(device)``)."""
        mapped = pytree.tree_map(lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf,
                                 (self.args, self.kwargs))
        return ModelInputs(tuple(mapped[0]), dict(mapped[1]))

    def unwrap(self) -> Any:
        """Back to the user's form: a tensor, a tuple, or a dict."""
        if self.kwargs and not self.args:
            return dict(self.kwargs)
        if len(self.args) == 1 and not self.kwargs and isinstance(self.args[0], torch.Tensor):
            return self.args[0]
        if self.kwargs:
            raise ValueError("a batch with both positional and keyword inputs has no single user form")
        return tuple(self.args)


def model_inputs(inputs: Any) -> ModelInputs:
    """Normalise a tensor / tuple / list / dict batch (see the module docstring)."""
    if isinstance(inputs, ModelInputs):
        return inputs
    if isinstance(inputs, Mapping):
        bad = [key for key in inputs if not isinstance(key, str)]
        if bad:
            raise TypeError(f"a dict batch is passed as keyword arguments; its keys must be strings, got {bad[:3]}")
        return ModelInputs((), dict(inputs))
    if isinstance(inputs, tuple):
        return ModelInputs(inputs, {})
    if isinstance(inputs, list):
        return ModelInputs(tuple(inputs), {})
    return ModelInputs((inputs,), {})


def call(model: nn.Module, inputs: Any) -> Any:
    """``model`` on one batch in any form of :func:`model_inputs`."""
    batch = model_inputs(inputs)
    return model(*batch.args, **batch.kwargs)


def batch_size(inputs: Any) -> Optional[int]:
    """The leading dimension shared by the batch's tensors (the first tensor's, if any)."""
    for tensor in model_inputs(inputs).tensors():
        if tensor.dim() >= 1:
            return int(tensor.shape[0])
    return None


def map_batch(inputs: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``fn`` on every tensor of the batch, returned in the user's form (tensor, tuple or dict)."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {key: map_batch(value, fn) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_batch(value, fn) for value in inputs)
    return inputs


def tensor_leaves(output: Any) -> Tuple[torch.Tensor, ...]:
    """The tensors of a model output, in order; objects pytree cannot flatten (e.g. a KV cache
    object) are dropped, ``None`` fields too."""
    leaves = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            leaves.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, Mapping):  # incl. ModelOutput (an OrderedDict of its non-None fields)
            for item in value.values():
                walk(item)
        elif value is not None:
            children = pytree.tree_leaves(value)
            if not (len(children) == 1 and children[0] is value):
                for item in children:
                    walk(item)

    walk(output)
    return tuple(leaves)
