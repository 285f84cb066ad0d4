"""Specification of the boundary codecs (effcompile/transport.py).

Int8 is checked against its error bound; VQ against a plain k-means reference of the
distortion it should reach on clustered data, the bit-packing formula and its NaN guard.
"""

import math

import pytest
import torch

from effcompile.passes.greedy_stages.runtime.transport import (Int8Codec, NoCodec, Payload, VQCodec, make_codec, pack_bits, payload_bytes,
                                  unpack_bits)

SHAPES = [(4, 16, 5, 3), (6, 10, 24), (7, 32)]  # (B,C,H,W) channels dim 1; (B,T,C) and (B,C) last dim


def _tensor_nbytes(payload):
    return sum(t.numel() * t.element_size() for t in payload.fields.values())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_shape_dtype_and_error_bound(shape, dtype):
    x = (torch.randn(shape) * torch.linspace(0.01, 10, shape[1 if len(shape) == 4 else -1]).reshape(
        (1, -1, 1, 1) if len(shape) == 4 else (1,) * (len(shape) - 1) + (-1,))).to(dtype)
    codec = Int8Codec()
    payload = codec.encode(x)
    assert payload.fields["q"].dtype == torch.int8 and payload.fields["q"].shape == x.shape
    y = codec.decode(payload)
    assert y.shape == x.shape and y.dtype == dtype
    channel_dim = 1 if len(shape) == 4 else len(shape) - 1
    moved = x.float().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
    absmax = moved.abs().amax(dim=0)
    error = (y.float() - x.float()).abs().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]).amax(dim=0)
    # Per channel: |x − q·s| ≤ s/2 = absmax/254 (plus the bf16 rounding of the decoded value).
    slack = 0 if dtype == torch.float32 else 2 ** -7 * absmax
    assert torch.all(error <= absmax / 127 + slack + 1e-7)
    assert torch.all(error <= absmax / 254 * (1 + 1e-5) + slack + 1e-7)
    channels = x.shape[channel_dim]
    assert payload_bytes(payload) == x.numel() + 4 * channels == _tensor_nbytes(payload)


def test_int8_zero_channel_and_explicit_channel_dim():
    x = torch.randn(3, 4, 10)
    x[:, 2] = 0
    codec = Int8Codec(channel_dim=1)  # (B, C, L) conv1d layout needs the explicit dim
    payload = codec.encode(x)
    assert payload.fields["scales"].shape == (4,)
    y = codec.decode(payload)
    assert torch.equal(y[:, 2], torch.zeros(3, 10))
    assert torch.allclose(y, x, atol=float(x.abs().max()) / 127)


def test_none_codec_is_exact_and_counts_bytes():
    x = torch.randn(5, 6, 7)
    codec = NoCodec()
    payload = codec.encode(x)
    assert torch.equal(codec.decode(payload), x)
    assert payload_bytes(payload) == x.numel() * 4


@pytest.mark.parametrize("bits", [1, 3, 6, 8, 11, 16])
def test_bit_packing_round_trip_and_size(bits):
    count = 1001
    codes = torch.randint(0, 2 ** bits, (count,))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


def _clustered(batch, generator, centers, noise=0.05):
    """(batch, C, 4, 4) activations whose 8-channel groups are drawn from fixed cluster centres."""
    groups = batch * 16 * (32 // 8)
    index = torch.randint(0, centers.shape[0], (groups,), generator=generator)
    vectors = centers[index] + noise * torch.randn(groups, 8, generator=generator)
    return vectors.reshape(batch, 4, 4, 32).permute(0, 3, 1, 2).contiguous()


def test_vq_round_trip_shapes_dtypes_and_byte_formula():
    for shape, group in [((4, 32, 4, 4), 8), ((3, 5, 16), 4), ((6, 24), 8)]:
        for size in (16, 256, 1024):
            codec = VQCodec(codebook_size=size, group_size=group)
            x = torch.randn(shape)
            payload = codec.encode(x)
            y = codec.decode(payload)
            assert y.shape == x.shape and y.dtype == x.dtype
            bits = math.ceil(math.log2(size))
            codes = x.numel() // group
            assert payload.fields["codes"].dtype == torch.uint8
            assert payload_bytes(payload, exclude=("codebook",)) == math.ceil(codes * bits / 8)
            # First message carries the codebook: K·G fp32.
            assert payload_bytes(payload) == math.ceil(codes * bits / 8) + size * group * 4 == _tensor_nbytes(payload)
            # Ratio of the code stream vs fp32 = 32·G / log2(K) (exact when codes·bits is a multiple of 8).
            ratio = x.numel() * 4 / payload_bytes(payload, exclude=("codebook",))
            assert ratio == pytest.approx(32 * group / bits, rel=8 / (codes * bits) + 1e-9)


def test_vq_codebook_travels_only_when_republished():
    sender, receiver = VQCodec(64, 8, codebook_every=3), VQCodec(64, 8)
    generator = torch.Generator().manual_seed(0)
    carried = []
    for step in range(7):
        x = torch.randn(2, 16, 3, 3, generator=generator)
        payload = sender.encode(x)
        carried.append("codebook" in payload.fields)
        # The receiver decodes with the codebook that encoded (kept across later updates).
        receiver.attach_codebook(payload)
        y = receiver.decode(payload)
        reference = payload.fields["codebook"][unpack_bits(payload.fields["codes"], 6, x.numel() // 8)]
        assert torch.equal(y.movedim(1, -1).reshape(-1, 8), reference)
    # Published at seeding (step 0) and after encodes 3 and 6 → sent with messages 0, 3, 6.
    assert carried == [True, False, False, True, False, False, True]


def _kmeans_distortion(vectors, k, iterations=30, seed=0):
    """Plain Lloyd's k-means (reference), relative distortion of the best of the run."""
    generator = torch.Generator().manual_seed(seed)
    centers = vectors[torch.randperm(vectors.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(vectors, centers).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centers).index_add_(0, assign, vectors)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
    error = (vectors - centers[torch.cdist(vectors, centers).argmin(dim=1)]).pow(2).sum()
    return float(error / vectors.pow(2).sum())


def test_vq_reconstruction_error_falls_and_approaches_kmeans():
    generator = torch.Generator().manual_seed(1)
    centers = torch.randn(48, 8, generator=generator) * 2
    codec = VQCodec(codebook_size=64, group_size=8, decay=0.9)
    probe = _clustered(16, generator, centers)
    errors = []
    for _ in range(30):
        codec.encode(_clustered(8, generator, centers))
        errors.append(codec.reconstruction_error(probe))
    # errors[0] is right after the codebook was seeded with random sub-vectors of batch 1.
    assert errors[-1] < 0.6 * errors[0], errors
    assert all(later <= earlier * 1.05 for earlier, later in zip(errors[::10], errors[10::10])), errors
    # As good as batch Lloyd's k-means with the same K on the probe itself (measured: 0.0335 vs 0.0341).
    reference = _kmeans_distortion(probe.movedim(1, -1).reshape(-1, 8), 64)
    assert errors[-1] < 1.2 * reference + 0.002, (errors[-1], reference)


def test_vq_rejects_nonfinite_batch_without_touching_the_codebook():
    codec = VQCodec(codebook_size=16, group_size=4)
    codec.encode(torch.randn(4, 8, 3, 3))
    before = {name: tensor.clone() for name, tensor in codec.state_dict().items()}
    bad = torch.randn(4, 8, 3, 3)
    bad[0, 0, 0, 0] = float("nan")
    bad[1, 3, 1, 1] = float("inf")
    payload = codec.encode(bad)
    assert int(codec.nonfinite_inputs) == 1 and int(codec.rejected_updates) == 1
    for name in ("codebook", "ema_counts", "ema_sums", "version"):
        assert torch.equal(codec.state_dict()[name], before[name]), name
    assert torch.isfinite(codec.decode(payload)).all()


def test_vq_rolls_back_an_update_that_overflows():
    codec = VQCodec(codebook_size=4, group_size=2, decay=0.5)
    codec.encode(torch.ones(2, 2, 2, 2))
    before = codec.codebook.clone()
    huge = torch.full((2, 2, 2, 2), 3e38)  # sums overflow fp32 to inf in the EMA
    codec.encode(huge)
    assert int(codec.rejected_updates) == 1
    assert torch.equal(codec.codebook, before) and torch.isfinite(codec.ema_sums).all()


def test_vq_state_dict_round_trip_and_validation():
    codec = VQCodec(32, 4)
    for _ in range(3):
        codec.encode(torch.randn(2, 5, 8))
    clone = VQCodec(32, 4)
    clone.load_state_dict(codec.state_dict())
    x = torch.randn(2, 5, 8)
    assert torch.equal(clone.nearest(clone._subvectors(x)), codec.nearest(codec._subvectors(x)))
    with pytest.raises(ValueError, match="not divisible by group_size=4"):
        codec.encode(torch.randn(2, 6, 5, 5))
    with pytest.raises(ValueError, match="codebook_size"):
        VQCodec(codebook_size=1)
    with pytest.raises(ValueError, match="transport"):
        make_codec("fp8")


def test_receiver_refuses_a_payload_whose_codebook_it_never_saw():
    sender, receiver = VQCodec(16, 4), VQCodec(16, 4)
    sender.encode(torch.randn(2, 8))
    second = sender.encode(torch.randn(2, 8))  # version 2, codebook sent again (republished)
    third = Payload(second.codec, {"codes": second.fields["codes"]}, second.shape, second.dtype, 99)
    with pytest.raises(ValueError, match="codebook version 99"):
        receiver.attach_codebook(third)
