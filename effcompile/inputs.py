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

import contextlib
import dataclasses
import inspect
from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

import torch
import torch.nn as nn
from effcompile._compat import pytree

__all__ = ["ModelInputs", "model_inputs", "call", "tensor_leaves", "training_batch"]


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """One batch of model inputs: ``model(*args, **kwargs)``."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]


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


def training_batch(model: nn.Module) -> Callable[[Any], Any]:
    """How a training step hands a batch to ``model``: a dict batch gets ``use_cache=False`` when
    the forward takes a ``use_cache`` argument the batch does not set; any other batch is unchanged.

    A training step never reads a KV cache.  Building one (Hugging Face decoders default to
    ``use_cache=True``) keeps key/value copies and, under ``torch.compile``, breaks the graph on
    the cache's lazily initialised layers.  Decided once per step (the signature is read here, not
    in the compiled function)."""
    try:
        takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        takes_cache = False
    if not takes_cache:
        return lambda inputs: inputs
    return lambda inputs: ({**inputs, "use_cache": False} if isinstance(inputs, Mapping) and "use_cache" not in inputs
                           else inputs)


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


@contextlib.contextmanager
def tensor_outputs(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` whose ``forward`` returns ``tensor_leaves`` of its output, for this block only.

    ``torch.export`` (and so ONNX export) must flatten the outputs; a Hugging Face decoder's
    ``DynamicCache`` is no pytree and fails it.  The wrapper is set on the instance and keeps
    ``forward``'s signature, so module paths, parameter names and call signatures stay the model's.
    """
    original = model.forward
    had_instance_forward = "forward" in model.__dict__

    def forward(*args: Any, **kwargs: Any) -> Tuple[torch.Tensor, ...]:
        return tensor_leaves(original(*args, **kwargs))

    forward.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    model.forward = forward
    try:
        yield model
    finally:
        if had_instance_forward:
            model.forward = original
        else:
            del model.forward
