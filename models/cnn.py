"""Small convolutional network: Conv-BN-ReLU blocks, max pooling, global average pool."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .registry import register_model

__all__ = ["ConvBNReLU", "SmallCNN", "build_cnn"]


class ConvBNReLU(nn.Module):
    """3×3 convolution (no bias: BatchNorm's shift makes it redundant) → BatchNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SmallCNN(nn.Module):
    """One ``ConvBNReLU`` block per entry of ``widths``, a 2×2 max pool between blocks,
    then global average pooling and a linear head.

    With the default three blocks an 8×8 input is reduced to 2×2 before the average pool, so
    the model works on the digits dataset as well as on 32×32 images.
    """

    def __init__(
        self, in_channels: int, num_classes: int, widths: Sequence[int] = (32, 64, 128)
    ) -> None:
        super().__init__()
        if len(widths) == 0 or any(w < 1 for w in widths):
            raise ValueError(f"widths={tuple(widths)!r} is invalid: expected positive ints")
        layers: list[nn.Module] = []
        channels = in_channels
        for index, width in enumerate(widths):
            if index > 0:
                layers.append(nn.MaxPool2d(kernel_size=2))
            layers.append(ConvBNReLU(channels, width))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.features(x))))


@register_model(
    "cnn", description="small CNN: 3 Conv3x3-BN-ReLU blocks (32/64/128), max pools, GAP, linear"
)
def build_cnn(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 8,
    widths: Sequence[int] = (32, 64, 128),
) -> SmallCNN:
    """Small CNN; ``image_size`` must survive ``len(widths) - 1`` halvings."""
    min_size = 2 ** (len(widths) - 1)
    if image_size < min_size:
        raise ValueError(
            f"image_size={image_size} is too small for {len(widths)} blocks: need >= {min_size}"
        )
    return SmallCNN(in_channels, num_classes, widths=widths)
