"""Codecs that compress stage-boundary activations on the wire and in replay buffers.

Greedy stages send one activation per step from stage k to stage k+1 (and keep a few of them
in a replay buffer in async mode).  A codec turns that float tensor into a :class:`Payload` — a
few named tensors plus the original shape/dtype — and back:

* :class:`NoCodec`: the tensor itself (``x``).
* :class:`Int8Codec`: per-channel absmax int8.  ``scale_c = max|x_c| / 127``,
  ``q = round(x / scale_c)`` clamped to [-127, 127]; decoding gives ``q · scale_c``, so the
  error per element is at most ``scale_c / 2 ≤ absmax_c / 127``.  Fields: ``q`` (int8, the
  input's shape) and ``scales`` (fp32, one per channel): ``4/1`` = 4x fewer bytes than fp32.
* :class:`VQCodec`: vector quantisation with an online EMA k-means codebook.  The channels are
  cut into groups of ``group_size`` (G) consecutive channels; every position's group is one
  sub-vector of length G, replaced by the index of its nearest codeword in a shared codebook
  of ``codebook_size`` (K) rows.  Codes take ``b = ceil(log2 K)`` bits and are bit-packed into
  uint8, so ``G`` fp32 values (32·G bits) become ``b`` bits: a ratio of ``32·G / b``
  (G=8, K=256 → 32x).  The codebook rides along with a message whenever the sender published a
  new one (every ``codebook_every`` encodes; its ``K·G·4`` bytes are counted in that message).

Which axis is the channel axis: ``channel_dim=None`` picks dim 1 for 4-D and higher
``(B, C, H, W, ...)`` tensors and the last dim for ``(B, C)`` and 3-D ``(B, T, C)`` tensors
(a 3-D ``(B, C, L)`` conv1d activation needs ``channel_dim=1`` explicitly).

Byte accounting: ``payload_bytes(payload)`` is the sum of the payload tensors' ``nbytes``; the
shape/dtype meta travels in the runtime's fixed message header, which the runtime counts
separately (``effcompile.passes.greedy_stages.runtime.HEADER_BYTES``).

Non-finite inputs: every codec counts them in ``nonfinite_inputs``; the VQ codec additionally
refuses to learn from such a batch, and rolls back a codebook update whose result is
non-finite, counting both in ``rejected_updates`` (the codebook stays at its last good value).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["Payload", "NoCodec", "Int8Codec", "VQCodec", "make_codec", "payload_bytes", "pack_bits", "unpack_bits",
           "RUNTIME_CODEBOOK_EVERY"]

# The stage runtime's codebook interval (``run_stages``, ``StageJob``, ``--codebook-every``): with
# K=1024 and 8-channel groups it sent 16.6x fewer bytes than fp32 for +0.1 pt on digits (README).
RUNTIME_CODEBOOK_EVERY = 50


@dataclasses.dataclass
class Payload:
    """An encoded activation: named tensors plus what is needed to rebuild the original.

    ``codebook_version`` is the VQ codebook that produced ``codes`` (-1 for other codecs); a
    VQ payload carries the ``codebook`` tensor itself only when the sender had not sent that
    version yet (the receiver attaches its copy on arrival, see ``VQCodec.attach_codebook``).
    """

    codec: str
    fields: Dict[str, torch.Tensor]
    shape: Tuple[int, ...]
    dtype: torch.dtype
    codebook_version: int = -1

    def to_state(self) -> dict:
        return {"codec": self.codec, "fields": dict(self.fields), "shape": tuple(self.shape),
                "dtype": str(self.dtype).replace("torch.", ""), "codebook_version": self.codebook_version}

    @classmethod
    def from_state(cls, state: dict) -> "Payload":
        return cls(state["codec"], dict(state["fields"]), tuple(state["shape"]), getattr(torch, state["dtype"]),
                   state["codebook_version"])


def payload_bytes(payload: Payload, exclude: Tuple[str, ...] = ()) -> int:
    """Bytes of the payload's tensors (the meta is counted in the runtime's message header)."""
    return sum(t.numel() * t.element_size() for name, t in payload.fields.items() if name not in exclude)


def default_channel_dim(ndim: int) -> int:
    """dim 1 for (B, C, H, W, ...); the last dim for (B, C) and (B, T, C)."""
    if ndim < 2:
        raise ValueError(f"a boundary activation needs a batch and a channel dim, got a {ndim}-D tensor")
    return 1 if ndim >= 4 else ndim - 1


def _channels_last(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x.movedim(channel_dim, -1)


class NoCodec:
    """Sends the activation as it is (the reference for byte ratios)."""

    name = "none"

    def __init__(self) -> None:
        self.nonfinite_inputs = 0

    def encode(self, x: torch.Tensor) -> Payload:
        if not bool(torch.isfinite(x).all()):
            self.nonfinite_inputs += 1
        return Payload(self.name, {"x": x.detach().contiguous()}, tuple(x.shape), x.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        return payload.fields["x"]

    def state_dict(self) -> dict:
        return {"nonfinite_inputs": self.nonfinite_inputs}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_inputs = int(state["nonfinite_inputs"])


class Int8Codec(NoCodec):
    """Per-channel absmax int8 (see the module docstring)."""

    name = "int8"

    def __init__(self, channel_dim: Optional[int] = None) -> None:
        super().__init__()
        self.channel_dim = channel_dim

    def encode(self, x: torch.Tensor) -> Payload:
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            self.nonfinite_inputs += 1
        dim = default_channel_dim(x.ndim) if self.channel_dim is None else self.channel_dim % x.ndim
        moved = _channels_last(x.float(), dim)
        absmax = moved.abs().reshape(-1, moved.shape[-1]).amax(dim=0)
        # A channel that is all zeros gets scale 1 (its codes are 0 anyway): no division by 0.
        scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        codes = torch.round(moved / scales).clamp_(-127, 127).to(torch.int8)
        codes = codes.movedim(-1, dim).contiguous()
        return Payload(self.name, {"q": codes, "scales": scales.contiguous()}, tuple(x.shape), x.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        codes = payload.fields["q"]
        dim = default_channel_dim(codes.ndim) if self.channel_dim is None else self.channel_dim % codes.ndim
        values = _channels_last(codes.float(), dim) * payload.fields["scales"]
        return values.movedim(-1, dim).to(payload.dtype).contiguous()


def code_bits(codebook_size: int) -> int:
    """Bits per code: ceil(log2 K), at least 1."""
    return max(1, math.ceil(math.log2(codebook_size)))


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Little-endian bit-packing of non-negative integer ``codes`` (< 2**bits) into uint8.

    Code i occupies bits [i·b, (i+1)·b) of the stream; the stream is zero-padded to whole bytes,
    so ``numel`` codes take ``ceil(numel·b / 8)`` bytes.
    """
    flat = codes.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1).to(torch.uint8)
    padding = (-stream.numel()) % 8
    if padding:
        stream = torch.cat([stream, stream.new_zeros(padding)])
    weights = (2 ** torch.arange(8, device=flat.device)).to(torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int64).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` codes as int64."""
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device)
    stream = ((packed.to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)[: count * bits]
    weights = 2 ** torch.arange(bits, dtype=torch.int64, device=packed.device)
    return (stream.reshape(count, bits) * weights).sum(dim=1)


class VQCodec(nn.Module):
    """Vector quantisation of channel groups with an online EMA k-means codebook.

    State (buffers, so ``state_dict`` checkpoints it):
        codebook (K×G): the published codewords, used to encode and to decode.
        ema_counts (K), ema_sums (K×G): exponential moving averages (decay d) of how many
            sub-vectors each codeword was assigned and of their sum.
        version, rejected_updates, dead_reseeds, nonfinite_inputs, encodes: counters.

    Update after encoding a batch (mini-batch k-means with EMA, on the sender only):
        N_k ← d·N_k + (1−d)·n_k,   S_k ← d·S_k + (1−d)·s_k
    (n_k, s_k: count and sum of this batch's sub-vectors assigned to k).  Every
    ``codebook_every`` encodes the codebook is republished as ``c_k = S_k / Ñ_k`` with Laplace
    smoothing ``Ñ_k = (N_k + ε) / (ΣN + K·ε) · ΣN`` (so an empty code never divides by 0), and
    codes whose count fell below ``dead_fraction / K`` of the mass are re-seeded with random
    sub-vectors of the current batch.  The first batch seeds the whole codebook (random distinct
    sub-vectors), so the codec is useful from step 0.

    Receivers call ``attach_codebook(payload)`` on arrival (in message order): it stores a
    codebook that came with the payload, or attaches the stored one, so ``decode`` always uses
    the codebook that encoded the payload — also for payloads that wait in a replay buffer while
    newer codebooks arrive.
    """

    name = "vq"

    def __init__(self, codebook_size: int = 256, group_size: int = 8, decay: float = 0.99,
                 codebook_every: int = 1, channel_dim: Optional[int] = None, epsilon: float = 1e-5,
                 dead_fraction: float = 0.03, seed: int = 0) -> None:
        super().__init__()
        if not 2 <= codebook_size <= 65536:
            raise ValueError(f"VQCodec.codebook_size={codebook_size} is invalid: expected an integer in [2, 65536]")
        if group_size < 1:
            raise ValueError(f"VQCodec.group_size={group_size} is invalid: expected an integer >= 1")
        if not 0 < decay < 1:
            raise ValueError(f"VQCodec.decay={decay} is invalid: expected a real number in (0, 1)")
        if codebook_every < 1:
            raise ValueError(f"VQCodec.codebook_every={codebook_every} is invalid: expected an integer >= 1")
        self.codebook_size, self.group_size, self.decay = codebook_size, group_size, decay
        self.codebook_every, self.channel_dim, self.epsilon = codebook_every, channel_dim, epsilon
        self.dead_fraction = dead_fraction
        self.bits = code_bits(codebook_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("codebook", torch.zeros(codebook_size, group_size))
        self.register_buffer("ema_counts", torch.zeros(codebook_size))
        self.register_buffer("ema_sums", torch.zeros(codebook_size, group_size))
        for counter in ("version", "rejected_updates", "dead_reseeds", "nonfinite_inputs", "encodes"):
            self.register_buffer(counter, torch.zeros((), dtype=torch.int64))
        self.register_buffer("sent_version", torch.full((), -1, dtype=torch.int64))
        # Receiver side: the newest codebook received (decoding uses the payload's own copy).
        self._received: Optional[Tuple[int, torch.Tensor]] = None

    # -- shapes ---------------------------------------------------------------------------
    def _dim(self, ndim: int) -> int:
        return default_channel_dim(ndim) if self.channel_dim is None else self.channel_dim % ndim

    def _subvectors(self, x: torch.Tensor) -> torch.Tensor:
        """(…, C, …) → (N·C/G, G): channels moved last and cut into groups of G."""
        moved = _channels_last(x.detach().float(), self._dim(x.ndim))
        channels = moved.shape[-1]
        if channels % self.group_size:
            raise ValueError(f"VQCodec: {channels} channels (shape {tuple(x.shape)}) are not divisible by "
                             f"group_size={self.group_size}; choose a vq_group_size dividing the boundary's channels")
        return moved.reshape(-1, self.group_size)

    # -- codebook learning ----------------------------------------------------------------
    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codeword: argmin_k ‖v‖² − 2·v·c_k + ‖c_k‖² (‖v‖² dropped)."""
        codebook = self.codebook
        distances = torch.addmm((codebook * codebook).sum(dim=1)[None, :], vectors, codebook.t(), alpha=-2.0)
        return distances.argmin(dim=1)

    def _random_rows(self, vectors: torch.Tensor, count: int) -> torch.Tensor:
        index = torch.randint(0, vectors.shape[0], (count,), generator=self.generator)
        if vectors.shape[0] >= count:
            index = torch.randperm(vectors.shape[0], generator=self.generator)[:count]
        return vectors[index]

    @torch.no_grad()
    def _seed(self, vectors: torch.Tensor) -> None:
        self.codebook.copy_(self._random_rows(vectors, self.codebook_size))
        self.ema_sums.copy_(self.codebook)
        self.ema_counts.fill_(1.0)
        self.version += 1

    @torch.no_grad()
    def _learn(self, vectors: torch.Tensor, codes: torch.Tensor) -> None:
        saved = (self.ema_counts.clone(), self.ema_sums.clone(), self.codebook.clone())
        one_hot_counts = torch.bincount(codes, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.ema_sums).index_add_(0, codes, vectors)
        self.ema_counts.mul_(self.decay).add_(one_hot_counts, alpha=1 - self.decay)
        self.ema_sums.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        if int(self.encodes) % self.codebook_every == 0:
            self._publish(vectors)
        if not (torch.isfinite(self.codebook).all() and torch.isfinite(self.ema_sums).all()):
            self.ema_counts.copy_(saved[0]), self.ema_sums.copy_(saved[1]), self.codebook.copy_(saved[2])
            self.rejected_updates += 1

    def _publish(self, vectors: torch.Tensor) -> None:
        total = self.ema_counts.sum()
        smoothed = (self.ema_counts + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        fresh = self.ema_sums / smoothed[:, None]
        dead = self.ema_counts < self.dead_fraction * total / self.codebook_size
        count = int(dead.sum())
        if count:
            replacements = self._random_rows(vectors, count)
            fresh[dead] = replacements
            self.ema_sums[dead] = replacements * smoothed[dead][:, None]
            self.dead_reseeds += count
        self.codebook.copy_(fresh)
        self.version += 1

    # -- codec interface ------------------------------------------------------------------
    def encode(self, x: torch.Tensor, learn: Optional[bool] = None) -> Payload:
        """Codes of ``x`` under the published codebook; then (``learn``, default: in training
        mode) one EMA step of the codebook on this batch, unless ``x`` is non-finite."""
        learn = self.training if learn is None else learn
        vectors = self._subvectors(x)
        finite = bool(torch.isfinite(vectors).all())
        if not finite:
            self.nonfinite_inputs += 1
            if learn:
                self.rejected_updates += 1
            # Non-finite sub-vectors map to code 0 (the runtime refuses to send them anyway).
            vectors = torch.nan_to_num(vectors, nan=0.0, posinf=0.0, neginf=0.0)
        if int(self.version) == 0:
            if not finite:
                raise ValueError("VQCodec: the first batch (which seeds the codebook) is not finite")
            self._seed(vectors)
        codebook = self.codebook.clone()  # frozen copy: later updates must not change this payload
        version = int(self.version)
        codes = self.nearest(vectors)
        self.encodes += 1
        if learn and finite:
            self._learn(vectors, codes)
        fields = {"codes": pack_bits(codes, self.bits)}
        if version != int(self.sent_version):
            fields["codebook"] = codebook
            self.sent_version.fill_(version)
        return Payload(self.name, fields, tuple(x.shape), x.dtype, codebook_version=version)

    def attach_codebook(self, payload: Payload) -> Payload:
        """Receiver side: remember a codebook that came with ``payload`` or attach the known one."""
        if "codebook" in payload.fields:
            self._received = (payload.codebook_version, payload.fields["codebook"])
        elif self._received is None or self._received[0] != payload.codebook_version:
            known = None if self._received is None else self._received[0]
            raise ValueError(f"VQCodec: payload needs codebook version {payload.codebook_version} but the receiver "
                             f"has {known} (messages lost or out of order)")
        else:
            payload.fields["codebook"] = self._received[1]
        return payload

    def decode(self, payload: Payload) -> torch.Tensor:
        if "codebook" not in payload.fields:
            self.attach_codebook(payload)
        shape = payload.shape
        dim = self._dim(len(shape))
        moved_shape = tuple(s for i, s in enumerate(shape) if i != dim) + (shape[dim],)
        count = math.prod(moved_shape) // self.group_size
        codes = unpack_bits(payload.fields["codes"], self.bits, count)
        values = payload.fields["codebook"][codes].reshape(moved_shape)
        return values.movedim(-1, dim).to(payload.dtype).contiguous()

    def reconstruction_error(self, x: torch.Tensor) -> float:
        """Relative squared error ‖x − decode(encode(x))‖² / ‖x‖² without learning."""
        vectors = self._subvectors(x)
        error = (vectors - self.codebook[self.nearest(vectors)]).pow(2).sum()
        return float(error / vectors.pow(2).sum().clamp_min(1e-30))

    def receiver_state(self) -> dict:
        return {"received": self._received}

    def load_receiver_state(self, state: dict) -> None:
        self._received = state["received"]

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, group_size={self.group_size}, decay={self.decay}, bits={self.bits}"


def make_codec(transport: str, codebook_size: int = 256, group_size: int = 8, decay: float = 0.99,
               codebook_every: int = 1, channel_dim: Optional[int] = None, seed: int = 0):
    """The codec named by ``GreedyStages.transport``."""
    if transport == "none":
        return NoCodec()
    if transport == "int8":
        return Int8Codec(channel_dim)
    if transport == "vq":
        return VQCodec(codebook_size, group_size, decay, codebook_every, channel_dim, seed=seed)
    raise ValueError(f"transport={transport!r} is invalid: expected one of ('none', 'int8', 'vq')")
