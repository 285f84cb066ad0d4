"""ResNet-18 (He et al. 2016) with either the CIFAR or the ImageNet stem.

The body is the standard ``BasicBlock`` × [2, 2, 2, 2] with widths ``width × (1, 2, 4, 8)``
(64..512 by default) and an adaptive average pool, so the same model runs on 8×8 digits,
32×32 CIFAR and 224×224 ImageNet images.  At ``width=64`` the parameter counts match
torchvision's ``resnet18`` (ImageNet stem) and the usual CIFAR ResNet-18 (11.17 M for 10 classes).

ReLUs are separate, non-inplace modules and the residual sum is out-of-place: graph passes
that observe or rewrite activations must not see a tensor overwritten after it was saved.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model

__all__ = [
    "BasicBlock",
    "ResNet",
    "cifar_stem",
    "imagenet_stem",
    "build_resnet18_cifar",
    "build_resnet18_imagenet",
]

_BLOCKS_PER_STAGE = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3×3 Conv-BN layers plus a shortcut (identity, or 1×1 Conv-BN if the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.downsample(x))


def cifar_stem(in_channels: int, width: int) -> nn.Sequential:
    """3×3 stride-1 Conv-BN-ReLU without max pooling: keeps the resolution of small images."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    )


def imagenet_stem(in_channels: int, width: int) -> nn.Sequential:
    """7×7 stride-2 Conv-BN-ReLU followed by a 3×3 stride-2 max pool (4× downsampling)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


class ResNet(nn.Module):
    """ResNet with ``BasicBlock`` stages of widths ``width × (1, 2, 4, 8)``."""

    def __init__(
        self,
        stem: nn.Module,
        num_classes: int,
        width: int = 64,
        blocks_per_stage: tuple[int, ...] = _BLOCKS_PER_STAGE,
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != 4 or any(n < 1 for n in blocks_per_stage):
            raise ValueError(f"blocks_per_stage={blocks_per_stage!r}: expected 4 positive ints")
        self.stem = stem
        # Layer names follow torchvision (layer1.0.conv1, layer2.0.downsample, fc) so reports and
        # per-layer configs read the same as for the familiar model.
        self.layer1 = self._make_stage(width, width, blocks_per_stage[0], stride=1)
        self.layer2 = self._make_stage(width, 2 * width, blocks_per_stage[1], stride=2)
        self.layer3 = self._make_stage(2 * width, 4 * width, blocks_per_stage[2], stride=2)
        self.layer4 = self._make_stage(4 * width, 8 * width, blocks_per_stage[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * width, num_classes)
        self._init_weights()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # torchvision's initialisation, so results are comparable with published ResNet-18s.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def _check_width(width: int) -> None:
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width={width!r} is invalid: expected a positive int")


@register_model(
    "resnet18_cifar", description="ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max pool)"
)
def build_resnet18_cifar(
    num_classes: int = 10, in_channels: int = 1, image_size: int = 8, width: int = 64
) -> ResNet:
    """ResNet-18 with the CIFAR stem; works for any ``image_size`` thanks to adaptive pooling."""
    del image_size  # adaptive pooling makes the architecture independent of the input size
    _check_width(width)
    return ResNet(cifar_stem(in_channels, width), num_classes, width=width)


@register_model(
    "resnet18_imagenet",
    description="ResNet-18 with the ImageNet stem (7x7 stride-2 conv, 3x3 stride-2 max pool)",
)
def build_resnet18_imagenet(
    num_classes: int = 10, in_channels: int = 1, image_size: int = 8, width: int = 64
) -> ResNet:
    """ResNet-18 with the ImageNet stem; an 8×8 input shrinks to 1×1 by the third stage."""
    del image_size  # adaptive pooling makes the architecture independent of the input size
    _check_width(width)
    return ResNet(imagenet_stem(in_channels, width), num_classes, width=width)
