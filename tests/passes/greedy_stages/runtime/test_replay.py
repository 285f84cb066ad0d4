"""Specification of the priority-LIFO replay buffer (effcompile/replay.py)."""

import threading
import time

import pytest
import torch

from effcompile.passes.greedy_stages.runtime.replay import ReplayBuffer
from effcompile.passes.greedy_stages.runtime.transport import Int8Codec, NoCodec, VQCodec


def _put(buffer, step):
    buffer.put(NoCodec().encode(torch.full((2, 3), float(step))), torch.tensor([step, step]), step)


def _sampled_steps(buffer, count):
    steps = []
    for _ in range(count):
        item = buffer.sample()
        steps.append(None if item is None else item.step)
    return steps


def test_priority_lifo_order_on_a_scripted_sequence():
    buffer = ReplayBuffer(capacity=3, max_reuse=2)
    for step in (0, 1, 2):
        _put(buffer, step)
    # Unused slots first, freshest first; then once-used slots freshest first; then nothing.
    assert _sampled_steps(buffer, 7) == [2, 1, 0, 2, 1, 0, None]
    buffer = ReplayBuffer(capacity=3, max_reuse=3)
    _put(buffer, 0)
    assert _sampled_steps(buffer, 1) == [0]
    _put(buffer, 1)
    # The fresh, never-used batch beats the older, once-used one.
    assert _sampled_steps(buffer, 1) == [1]
    _put(buffer, 2)
    assert _sampled_steps(buffer, 4) == [2, 2, 1, 0]  # 2 is fresh; then all used once: freshest first


def test_reuse_cap_is_respected():
    buffer = ReplayBuffer(capacity=4, max_reuse=3)
    for step in range(4):
        _put(buffer, step)
    counts = {}
    while (item := buffer.sample()) is not None:
        counts[item.step] = counts.get(item.step, 0) + 1
    assert counts == {0: 3, 1: 3, 2: 3, 3: 3}
    assert buffer.sampled == 12


def test_capacity_bound_and_eviction_of_the_most_used_then_oldest():
    buffer = ReplayBuffer(capacity=3, max_reuse=5)
    for step in range(3):
        _put(buffer, step)
    assert _sampled_steps(buffer, 2) == [2, 1]  # uses: 0→0, 1→1, 2→1
    _put(buffer, 3)  # evicts the most used, oldest among ties: step 1
    assert sorted(item.step for item in buffer.items) == [0, 2, 3]
    _put(buffer, 4)  # uses now 0→0, 2→1, 3→0: evicts step 2
    _put(buffer, 5)  # all unused: evicts the oldest, step 0
    assert sorted(item.step for item in buffer.items) == [3, 4, 5]
    assert len(buffer) == 3 and buffer.inserted == 6 and buffer.evicted == 3 and buffer.evicted_unused == 1
    for step in range(6, 50):
        _put(buffer, step)
        assert len(buffer) <= 3


def test_state_dict_round_trip_with_int8_and_vq_payloads():
    buffer = ReplayBuffer(capacity=4, max_reuse=2)
    int8, vq = Int8Codec(), VQCodec(16, 4)
    x = torch.randn(3, 8, 2, 2)
    buffer.put(int8.encode(x), torch.tensor([1, 2, 3]), 7)
    buffer.put(vq.encode(x), torch.tensor([4, 5, 6]), 8)
    buffer.sample()
    clone = ReplayBuffer(capacity=4, max_reuse=2)
    clone.load_state_dict(buffer.state_dict())
    assert [(i.step, i.uses, i.sequence) for i in clone.items] == [(i.step, i.uses, i.sequence) for i in buffer.items]
    assert torch.equal(int8.decode(clone.items[0].payload), int8.decode(buffer.items[0].payload))
    assert torch.equal(vq.decode(clone.items[1].payload), vq.decode(buffer.items[1].payload))
    assert torch.equal(clone.items[1].labels, torch.tensor([4, 5, 6]))
    assert _sampled_steps(clone, 4) == _sampled_steps(buffer, 4)
    with pytest.raises(ValueError, match="capacity=4"):
        ReplayBuffer(capacity=5, max_reuse=2).load_state_dict(buffer.state_dict())


def test_nbytes_counts_encoded_payloads_and_shares_codebooks():
    x = torch.randn(4, 16, 4, 4)
    raw, int8 = ReplayBuffer(8, 1), ReplayBuffer(8, 1)
    labels = torch.zeros(4, dtype=torch.int64)
    raw.put(NoCodec().encode(x), labels, 0)
    int8.put(Int8Codec().encode(x), labels, 0)
    assert raw.nbytes == x.numel() * 4 + 32
    assert int8.nbytes == x.numel() + 16 * 4 + 32
    vq_codec, vq = VQCodec(16, 8, codebook_every=100), ReplayBuffer(8, 1)
    for step in range(3):
        payload = vq_codec.encode(x)
        if "codebook" not in payload.fields:
            vq_codec_receiver_codebook = vq.items[0].payload.fields["codebook"]
            payload.fields["codebook"] = vq_codec_receiver_codebook  # as the receiver attaches it
        vq.put(payload, labels, step)
    codes = x.numel() // 8 * 4 // 8  # 4-bit codes
    assert vq.nbytes == 3 * (codes + 32) + 16 * 8 * 4


def test_wait_sample_blocks_until_put_close_or_deadline():
    buffer = ReplayBuffer(2, 1)
    threading.Timer(0.2, _put, args=(buffer, 5)).start()
    started = time.monotonic()
    item = buffer.wait_sample(timeout_s=5)
    assert item.step == 5 and 0.1 < time.monotonic() - started < 4
    with pytest.raises(TimeoutError, match="0.2 s"):
        buffer.wait_sample(timeout_s=0.2)
    threading.Timer(0.1, buffer.close).start()
    assert buffer.wait_sample(timeout_s=5) is None


def test_invalid_arguments():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, 1)
    with pytest.raises(ValueError, match="max_reuse"):
        ReplayBuffer(1, 0)
