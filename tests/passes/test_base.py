"""passes/base.py: what every pass's runtime state module guarantees."""

from __future__ import annotations

import pytest
import torch

from effcompile.passes.base import PassState


def test_a_zero_dim_float64_buffer_is_refused_with_the_reason():
    # AOTAutograd drops in-place updates of such a buffer, so a compiled step would leave it unchanged.
    state = PassState()
    with pytest.raises(TypeError, match="0-dim float64 buffer loses its in-place updates"):
        state.register_buffer("total", torch.zeros((), dtype=torch.float64))
    state.register_buffer("total", torch.zeros((1,), dtype=torch.float64))  # shape (1,) keeps them
    state.register_buffer("count", torch.zeros((), dtype=torch.long))
    state.register_buffer("slot", None)
    assert set(state._buffers) == {"total", "count", "slot"}


def test_pass_state_buffers_keep_their_dtype_through_a_model_cast():
    state = PassState()
    state.register_buffer("count", torch.zeros((), dtype=torch.long))
    state.register_buffer("matrix", torch.eye(2))
    state.to(torch.bfloat16)
    assert (state.count.dtype, state.matrix.dtype) == (torch.long, torch.float32)
