"""Vision Transformer in the ViT-Tiny configuration (Dosovitskiy et al. 2021; timm layout).

Attention is written out explicitly — a ``qkv`` linear, ``F.scaled_dot_product_attention`` and
a ``proj`` linear — instead of ``nn.MultiheadAttention``, whose fused ``in_proj_weight`` hides
the individual linear layers from graph passes.  Parameter names follow timm
(``blocks.0.attn.qkv``, ``blocks.0.mlp.fc1``, ...), and at ``image_size=224, patch_size=16,
in_channels=3, num_classes=1000`` the parameter count equals timm's ``vit_tiny_patch16_224``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = [
    "PatchEmbed",
    "Attention",
    "Mlp",
    "Block",
    "VisionTransformer",
    "default_patch_size",
    "build_vit_tiny",
]

# A default patch size is chosen so that at most this many patches span one image side:
# 8 → 2 (4×4 grid), 28 → 2 (14×14), 32 → 4 (8×8), 224 → 16 (14×14, as in ViT-*/16).
_MAX_GRID = 14


def default_patch_size(image_size: int) -> int:
    """Smallest patch size ≥ 2 that divides ``image_size`` into at most 14 patches per side."""
    for patch in range(2, image_size + 1):
        if image_size % patch == 0 and image_size // patch <= _MAX_GRID:
            return patch
    return 1  # only reached for image_size == 1


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches → ``embed_dim`` tokens via a strided Conv2d."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, D, H/p, W/p) → (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` linear → scaled dot-product attention → ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(x)


class Mlp(nn.Module):
    """Position-wise feed-forward network: Linear → GELU → Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier: patch embedding, class token, learned position embedding, pre-norm
    blocks, final LayerNorm and a linear head on the class token."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        num_classes: int,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        _check_config(image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio)
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's scheme: truncated normal (std 0.02) for embeddings and linear weights.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _check_config(
    image_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float
) -> None:
    if patch_size < 1 or image_size % patch_size != 0:
        raise ValueError(
            f"patch_size={patch_size} must be a positive divisor of image_size={image_size}"
        )
    if depth < 1 or num_heads < 1 or embed_dim % num_heads != 0:
        raise ValueError(
            f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} (depth={depth} >= 1)"
        )
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio={mlp_ratio} must be positive")


@register_model(
    "vit_tiny", description="ViT-Tiny (dim 192, depth 12, 3 heads, MLP ratio 4), explicit qkv/proj"
)
def build_vit_tiny(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 8,
    patch_size: int | None = None,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
) -> VisionTransformer:
    """ViT-Tiny; ``patch_size`` defaults to ``default_patch_size(image_size)`` (2 for 8×8)."""
    if patch_size is None:
        patch_size = default_patch_size(image_size)
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
    )
