"""Multi-layer perceptron on flattened pixels."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model

__all__ = ["MLP", "build_mlp"]


class MLP(nn.Module):
    """Flatten → Linear → ReLU → Linear → ReLU → Linear.

    Each layer is a named attribute (``fc1``, ``fc2``, ``head``) rather than an
    ``nn.Sequential`` index so that graph passes and reports show readable layer names.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        return self.head(x)


@register_model("mlp", description="3-layer MLP (Flatten, 2 hidden ReLU layers of width 128)")
def build_mlp(
    num_classes: int = 10, in_channels: int = 1, image_size: int = 8, hidden: int = 128
) -> MLP:
    """MLP whose input layer takes the flattened ``in_channels × image_size²`` pixels."""
    if hidden < 1:
        raise ValueError(f"hidden={hidden!r} is invalid: expected a positive int")
    return MLP(in_channels * image_size * image_size, num_classes, hidden=hidden)
