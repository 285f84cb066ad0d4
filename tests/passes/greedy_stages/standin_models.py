"""Small stand-ins for torchvision/timm architectures (not installable here), written to
reproduce the *structure* the stage cut search met on the real ones — not their names:

* ``ResidualChain``: ``for b in self.blocks: x = F.relu(x + b(x))`` — the cut points are not at
  any module's end (only after each functional ReLU does one activation cross).
* ``ViTLike``: torchvision's ViT (a class token owned by the root, an ``Encoder`` that owns
  ``pos_embedding``, blocks in an ``OrderedDict`` ``Sequential`` named ``encoder_layer_i``) with
  timm's block signature ``forward(x, attn_mask=None, is_causal=False)`` threaded from the root
  forward, a ``DropPath`` (timm-style, traced into without the stage rules), a LayerScale owning
  ``gamma`` and a buffer bias read by every block.
* ``EfficientNetLike``: MBConv blocks (expand / depthwise / squeeze-excitation / project) with a
  torchvision-style ``StochasticDepth`` (an ``fx.wrap``'ed function taking ``self.training``) and
  a user's parameter-free drop module under another name (``RandomSkip``), ``nn.Dropout`` in
  the classifier.
"""

from collections import OrderedDict

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------ residual chain
class MLPBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ResidualChain(nn.Module):
    def __init__(self, in_features=16, width=32, depth=6, num_classes=4):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList([MLPBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = F.relu(x + 0.5 * b(x))
        return self.head(x)


# ------------------------------------------------------------------------------------ ViT-like
def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """timm's drop_path: a plain function, so fx traces into it (the branch is on Python values)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class LayerScale(nn.Module):
    def __init__(self, dim, init=0.5):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attn_drop = 0.0

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, drop_path_rate):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ls1, self.drop_path1 = LayerScale(dim), DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    """torchvision's Encoder: owns ``pos_embedding`` *and* the blocks."""

    def __init__(self, seq_length, depth, dim, heads, drop_path_rate):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, seq_length, dim) * 0.02)
        self.register_buffer("attn_bias", torch.zeros(seq_length, seq_length))  # read by every block
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(dim, heads, drop_path_rate)) for i in range(depth)))
        self.ln = nn.LayerNorm(dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        torch._assert(x.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {x.shape}")
        x = self.dropout(x + self.pos_embedding)
        if attn_mask is None:
            attn_mask = self.attn_bias.to(x.dtype)  # made from a buffer: never an activation
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.ln(x)


class ViTLike(nn.Module):
    def __init__(self, image_size=8, patch=2, dim=32, depth=8, heads=2, num_classes=10, drop_path_rate=0.1):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.conv_proj = nn.Conv2d(1, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        seq = (image_size // patch) ** 2 + 1
        self.encoder = Encoder(seq, depth, dim, heads, drop_path_rate)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, num_classes)))

    def forward(self, x, attn_mask=None, is_causal=False):
        n = x.shape[0]
        x = self.conv_proj(x)
        x = x.reshape(n, self.dim, -1).permute(0, 2, 1)
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.heads(x[:, 0])


# ------------------------------------------------------------------------------------ EfficientNet-like
def stochastic_depth(input, p: float, mode: str, training: bool = True):
    """torchvision.ops.stochastic_depth (the real one is ``fx.wrap``'ed too)."""
    if not training or p == 0.0:
        return input
    survival = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival)
    return input * noise.div_(survival)


torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p, mode="row"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input):
        return stochastic_depth(input, self.p, self.mode, self.training)


class RandomSkip(nn.Module):
    """A user's own drop module under a name no list knows: parameter-free, identity in eval."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1, 1, 1).uniform_() > self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.SiLU(), nn.Sigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


def conv_bn_act(cin, cout, kernel, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.SiLU()) if act else nn.Sequential(*layers)


class MBConv(nn.Module):
    def __init__(self, cin, cout, stride, expand, drop):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn_act(cin, hidden, 1), conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            SqueezeExcitation(hidden, max(1, cin // 4)), conv_bn_act(hidden, cout, 1, act=False))
        self.stochastic_depth = drop

    def forward(self, x):
        out = self.block(x)
        if self.use_res:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNetLike(nn.Module):
    def __init__(self, num_classes=10, widths=(8, 16, 16, 24, 24), drop=0.2):
        super().__init__()
        layers = [conv_bn_act(1, widths[0], 3)]
        cin = widths[0]
        for index, cout in enumerate(widths[1:]):
            stride = 2 if cout != cin else 1
            regulariser = StochasticDepth(drop) if index == 1 else RandomSkip(drop)
            layers.append(nn.Sequential(MBConv(cin, cout, stride, 2, regulariser)))
            cin = cout
        layers.append(conv_bn_act(cin, 4 * cin, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * cin, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# ------------------------------------------------------------------------------------ user's branching module
class HalfInTraining(nn.Module):
    """A user's module (with parameters, in a submodule) whose forward branches on self.training."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        x = self.fc(x)
        if self.training:
            x = x * 0.5
        return torch.relu(x)


class ChainWithUserBranch(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.blocks = nn.Sequential(MLPBlock(width), HalfInTraining(width), MLPBlock(width))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


class ShapeAcrossBlocks(nn.Module):
    """The batch size read at the start and used after every block (``x.view(b, -1)``)."""

    def __init__(self, width=8, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList([MLPBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        b, width = x.size(0), x.shape[-1]
        for block in self.blocks:
            x = torch.relu(block(x.view(b, width)))
        return self.head(x.view(b, -1))
