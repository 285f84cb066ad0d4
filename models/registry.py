"""Name → factory registry of the reference model zoo.

Every factory has the signature ``factory(num_classes, in_channels, image_size, **kwargs)`` and
returns a freshly initialised ``nn.Module`` that maps ``(B, in_channels, image_size, image_size)``
float images to ``(B, num_classes)`` logits.  The image size is a construction argument because
some models (the MLP's input layer, the ViT's position embedding) depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple, TypeVar

import torch
from torch import nn

__all__ = [
    "ModelSpec",
    "register_model",
    "model_spec",
    "list_models",
    "get_model",
    "example_inputs",
]

ModelFactory = Callable[..., nn.Module]
_F = TypeVar("_F", bound=ModelFactory)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its name, its factory and a one-line description."""

    name: str
    factory: ModelFactory
    description: str


_REGISTRY: Dict[str, ModelSpec] = {}


def register_model(name: str, *, description: str | None = None) -> Callable[[_F], _F]:
    """Decorator that registers ``factory`` under ``name``.

    ``description`` defaults to the first line of the factory's docstring.  Registering a name
    twice raises ``ValueError``: silently replacing a model would make benchmark results depend
    on import order.
    """

    def decorator(factory: _F) -> _F:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        text = description or (factory.__doc__ or "").strip().split("\n", 1)[0].strip()
        if not text:
            raise ValueError(f"model {name!r} needs a description or a factory docstring")
        _REGISTRY[name] = ModelSpec(name=name, factory=factory, description=text)
        return factory

    return decorator


def list_models() -> List[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of ``name``; ``ValueError`` listing the known names if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}={value!r} is invalid: expected a positive int")


def get_model(
    name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, **kwargs: Any
) -> nn.Module:
    """Build the model registered under ``name``.

    The defaults describe the sklearn digits dataset (1×8×8 images, 10 classes).  Extra keyword
    arguments go to the model's factory (e.g. ``width`` for the ResNets, ``depth`` for the ViT).
    """
    spec = model_spec(name)
    _check_positive(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    return spec.factory(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs
    )


def example_inputs(
    name: str, batch_size: int = 4, in_channels: int = 1, image_size: int = 8, *, seed: int = 0
) -> Tuple[torch.Tensor, ...]:
    """Example positional inputs for the model ``name`` (for tracing, export and smoke tests).

    Every model in the zoo takes one ``(B, C, H, W)`` float32 image batch.  The values come from
    a seeded generator so traces and exported graphs are reproducible.  The batch size should
    be at least 2 for models with BatchNorm in training mode.
    """
    model_spec(name)  # validates the name with the same error as get_model
    _check_positive(batch_size=batch_size, in_channels=in_channels, image_size=image_size)
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, in_channels, image_size, image_size)
    return (torch.randn(shape, generator=generator),)
