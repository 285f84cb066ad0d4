"""Auxiliary classifier heads for greedy local-loss stages (DGL, Belilovsky et al. ICML 2020).

Every stage but the last ends with an aux head that maps the stage's boundary activation to
class logits, so the stage can be trained by its own loss ``CE(head_k(out_k), y)``.  The head is
chosen from the boundary shape (batch dimension first):

* ``(B, C, H, W)`` → :class:`MLPSRHead`, DGL's "MLP-SR" head: adaptive average pool to
  ``⌈H/4⌉×⌈W/4⌉`` → 3×(1×1 conv + BatchNorm + ReLU, width C) → 2×2 average pool (adaptive, so
  ``⌈h/2⌉×⌈w/2⌉``; skipped when the map is already 1×1) → flatten → 3-layer MLP of width 4C with
  ReLUs, whose last layer outputs the classes.  The 1×1 convs are cheap (no spatial mixing) and the
  early pooling keeps the head at a few % of a stage's FLOPs.
* ``(B, T, C)`` → :class:`PoolMLPHead`: mean over tokens → the same 3-layer MLP.
* ``(B, C)`` → :class:`MLPHead`: the 3-layer MLP.
* ``head="linear"``: global pooling (mean over every non-batch, non-channel axis) → one Linear.

``head_width`` overrides the channel width C of the head (the MLP width is ``4·head_width``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["MLPSRHead", "PoolMLPHead", "MLPHead", "LinearHead", "HEAD_KINDS", "head_kind_for", "make_aux_head",
           "TokenHead", "FirstTokenHead", "PooledHead", "OUTPUT_HEAD_KINDS", "output_head_kind", "make_output_head"]

HEAD_KINDS = ("mlp_sr", "pool_mlp", "mlp", "linear")


def _mlp(in_features: int, width: int, num_classes: int) -> nn.Sequential:
    """in → width → width → classes, ReLU between (three Linear layers)."""
    return nn.Sequential(
        nn.Linear(in_features, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def _pooled_size(size: int, factor: int) -> int:
    return max(1, math.ceil(size / factor))


class MLPSRHead(nn.Module):
    """DGL's MLP-SR head for a ``(B, C, H, W)`` boundary (see the module docstring)."""

    def __init__(self, channels: int, spatial: Tuple[int, int], num_classes: int, width: Optional[int] = None) -> None:
        super().__init__()
        width = width or channels
        height, breadth = (_pooled_size(s, 4) for s in spatial)
        self.reduce = nn.AdaptiveAvgPool2d((height, breadth))
        layers = []
        for index in range(3):
            layers += [nn.Conv2d(channels if index == 0 else width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        if (height, breadth) != (1, 1):
            height, breadth = _pooled_size(height, 2), _pooled_size(breadth, 2)
            self.pool = nn.AdaptiveAvgPool2d((height, breadth))
        else:
            self.pool = nn.Identity()
        self.classifier = _mlp(width * height * breadth, 4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.body(self.reduce(x))), 1))


class PoolMLPHead(nn.Module):
    """Mean over every axis between batch and the last (tokens for ``(B, T, C)``) → 3-layer MLP."""

    def __init__(self, channels: int, num_classes: int, width: Optional[int] = None) -> None:
        super().__init__()
        width = width or channels
        self.classifier = _mlp(channels, 4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            x = x.flatten(1, -2).mean(dim=1)
        return self.classifier(x)


class MLPHead(nn.Module):
    """Flatten all non-batch axes → 3-layer MLP of width ``4·width`` (``width`` defaults to ``features``)."""

    def __init__(self, features: int, num_classes: int, width: Optional[int] = None) -> None:
        super().__init__()
        self.classifier = _mlp(features, 4 * (width or features), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(x, 1))


class LinearHead(nn.Module):
    """Global mean over spatial/token axes (channel axis: 1 for 4-D maps, last otherwise) → Linear."""

    def __init__(self, shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.channel_first = len(shape) >= 4
        channels = shape[1] if self.channel_first else shape[-1]
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_first:
            x = x.flatten(2).mean(dim=2)
        elif x.dim() > 2:
            x = x.flatten(1, -2).mean(dim=1)
        return self.classifier(x)


def head_kind_for(shape: Sequence[int], requested: str = "auto") -> str:
    """The head kind for a boundary of ``shape`` (batch first); ``ValueError`` if it does not fit."""
    rank = len(shape)
    if rank < 2:
        raise ValueError(f"an aux head needs a boundary with a batch and a feature axis, got shape {tuple(shape)}")
    if requested == "auto":
        return {4: "mlp_sr", 3: "pool_mlp", 2: "mlp"}.get(rank, "pool_mlp")
    if requested == "mlp_sr" and rank != 4:
        raise ValueError(f"head='mlp_sr' needs a (B, C, H, W) boundary, got shape {tuple(shape)}; use head='auto'")
    if requested not in HEAD_KINDS:
        raise ValueError(f"head={requested!r} is invalid: expected 'auto' or one of {HEAD_KINDS}")
    return requested


def make_aux_head(shape: Sequence[int], num_classes: int, kind: str = "auto", width: Optional[int] = None) -> nn.Module:
    """A fresh aux head mapping a boundary of ``shape`` (batch first) to ``num_classes`` logits."""
    kind = head_kind_for(shape, kind)
    shape = tuple(int(s) for s in shape)
    if kind == "mlp_sr":
        return MLPSRHead(shape[1], (shape[2], shape[3]), num_classes, width)
    if kind == "pool_mlp":
        channels = shape[1] if len(shape) >= 4 else shape[-1]
        if len(shape) >= 4:  # channel-first maps: pool spatial axes, not channels
            return nn.Sequential(nn.Flatten(2), _ChannelFirstMean(), PoolMLPHead(channels, num_classes, width).classifier)
        return PoolMLPHead(channels, num_classes, width)
    if kind == "mlp":  # width defaults to the channel count C, not the flattened C·H·W
        channels = shape[1] if len(shape) >= 4 else shape[-1]
        return MLPHead(math.prod(shape[1:]), num_classes, width or channels)
    return LinearHead(shape, num_classes)


class _ChannelFirstMean(nn.Module):
    """(B, C, N) → (B, C): mean over the flattened spatial axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=2)


# ------------------------------------------------------------------------------------ output-shaped heads
class TokenHead(nn.Module):
    """``(B, …, H)`` hidden state → LayerNorm → Linear to ``V`` per position: the shape of a causal
    LM's ``(B, T, V)`` logits (the block-stack path's head for token-level outputs)."""

    def __init__(self, hidden: int, outputs: int, norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.proj = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class FirstTokenHead(nn.Module):
    """``(B, T, H)`` → LayerNorm of the first token → Linear(H, H) + tanh → Linear to ``C`` (a BERT-style
    pooled classifier; ``norm=False``: the first token → one Linear)."""

    def __init__(self, hidden: int, outputs: int, norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.pool = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) if norm else nn.Identity()
        self.proj = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.norm(x[:, 0])))


class PooledHead(nn.Module):
    """A feature map → mean over its spatial axes → LayerNorm → Linear to ``C``: the classifier head
    for a map-shaped hidden state, ``(B, C, *spatial)`` (``channels_last=False``: a CNN stage) or
    ``(B, *spatial, C)`` (``channels_last=True``: Swin's ``(B, H, W, C)``); ``norm=False`` drops
    the LayerNorm."""

    def __init__(self, channels: int, outputs: int, channels_last: bool, norm: bool = True) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.norm = nn.LayerNorm(channels) if norm else nn.Identity()
        self.proj = nn.Linear(channels, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.flatten(1, -2).mean(dim=1) if self.channels_last else x.flatten(2).mean(dim=2)
        return self.proj(self.norm(pooled))


OUTPUT_HEAD_KINDS = ("token", "token_linear", "first_token", "first_token_linear", "pool_tokens", "pool_tokens_linear",
                     "pool_channels_first", "pool_channels_first_linear", "pool_channels_last",
                     "pool_channels_last_linear")


def layout_of_shape(hidden: Sequence[int]) -> str:
    """The layout of a map of rank ≥ 4 whose block names none (GhostNet's blocks end in a
    concatenation of two halves, no layer making all the channels): channels-last when the two dims
    after the batch look spatial (equal) and the last does not, else torch's channels-first.  Taking
    an NCHW map as channels-last pooled GhostNet's (B, 80, 1, 1) into a 1-wide head, whose LayerNorm
    output is constant: its stage got no gradient."""
    if len(hidden) == 4 and hidden[1] == hidden[2] != hidden[3]:
        return "channels_last"
    return "channels_first"


def output_head_kind(hidden: Sequence[int], target: Sequence[int], requested: str = "auto",
                     layout: Optional[str] = None, pools_tokens: bool = False) -> str:
    """The head mapping a hidden state of shape ``hidden`` to the model's output shape ``target``.

    ``target[:-1] == hidden[:-1]`` (per-token logits) → ``token``.  A ``target`` of rank 2 with the
    same batch (a classifier): a map of rank ≥ 4 → ``pool_channels_first`` or ``pool_channels_last``
    by ``layout`` (read off the block's last layer), else by :func:`layout_of_shape`; a token sequence ``(B, T, H)`` → ``first_token`` where the model's own
    head reads the first position (a CLS token), ``pool_tokens`` (the mean over positions) where
    it reads them all (``pools_tokens``: a mean-pooled classifier such as Hugging Face Swin's).
    ``requested="linear"`` drops the norm (and the pooler).  Anything else raises ``ValueError``
    naming both shapes.
    """
    hidden, target = tuple(hidden), tuple(target)
    suffix = "_linear" if requested == "linear" else ""
    if len(hidden) >= 2 and target[:-1] == hidden[:-1]:
        return "token" + suffix
    if len(hidden) >= 3 and len(target) == 2 and target[0] == hidden[0]:
        if len(hidden) >= 4:
            return f"pool_{layout or layout_of_shape(hidden)}" + suffix
        if layout == "channels_first":  # a Conv1d stage (B, C, L)
            return "pool_channels_first" + suffix
        return ("pool_tokens" if pools_tokens else "first_token") + suffix
    raise ValueError(f"greedy_stages: no aux head maps a hidden state {hidden} to the model's output {target} "
                     "(supported: per-token outputs (B, T, V) and per-example outputs (B, C))")


def make_output_head(hidden: Sequence[int], target: Sequence[int], kind: str) -> nn.Module:
    """A fresh output-shaped aux head of ``kind`` (from :func:`output_head_kind`)."""
    width, outputs = int(hidden[-1]), int(target[-1])
    if kind.startswith("token"):
        return TokenHead(width, outputs, norm=kind == "token")
    if kind.startswith("first_token"):
        return FirstTokenHead(width, outputs, norm=kind == "first_token")
    if kind.startswith(("pool_channels_", "pool_tokens")):  # a token sequence pools like a channels-last map
        channels_last = not kind.startswith("pool_channels_first")
        channels = int(hidden[-1] if channels_last else hidden[1])
        return PooledHead(channels, outputs, channels_last, norm=not kind.endswith("_linear"))
    raise ValueError(f"unknown output head kind {kind!r}; expected one of {OUTPUT_HEAD_KINDS}")
