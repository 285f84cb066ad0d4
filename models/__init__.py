"""Reference model zoo for effcompile, registered by name.

    >>> from effcompile.models import get_model, example_inputs, list_models
    >>> model = get_model("resnet18_cifar", num_classes=10, in_channels=1, image_size=8, width=16)
    >>> logits = model(*example_inputs("resnet18_cifar"))   # (4, 10)

Every model takes one ``(B, C, H, W)`` float image batch and returns ``(B, num_classes)``
logits.  Forward passes contain no data-dependent Python control flow, so every model can be
captured by ``torch.export.export`` and ``torch.compile(fullgraph=True)``.

Registered models (see ``model_spec(name).description``): ``mlp``, ``cnn``,
``resnet18_cifar``, ``resnet18_imagenet``, ``vit_tiny`` and ``bagnet``.  A new model is a new
module with a factory decorated by ``@register_model("name")``, imported below.
"""

from __future__ import annotations

from .registry import ModelSpec, example_inputs, get_model, list_models, model_spec, register_model

# Importing the model modules runs their @register_model decorators.
from .mlp import MLP
from .cnn import SmallCNN
from .resnet import ResNet
from .vit import VisionTransformer
from .bagnet import BagNet

__all__ = [
    "ModelSpec",
    "register_model",
    "model_spec",
    "list_models",
    "get_model",
    "example_inputs",
    "MLP",
    "SmallCNN",
    "ResNet",
    "VisionTransformer",
    "BagNet",
]
