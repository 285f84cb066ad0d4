"""Activation memory, measured on any device: bytes autograd saves for backward.

CUDA has ``max_memory_allocated``; a CPU has no allocator statistics, but the memory that
efficient-training techniques save is the activations kept for backward.  ``SavedTensorMeter``
counts them through ``torch.autograd.graph.saved_tensors_hooks``: every saved tensor's storage is
counted once while any saved reference to it is alive (views share storage), and released when
autograd frees the graph (after its backward).  Parameters and buffers are excluded: they are
not activations.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch

__all__ = ["SavedTensorMeter"]


class _SavedHandle:
    """What autograd keeps instead of the tensor; releases the meter's count when freed."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: "SavedTensorMeter", key: Optional[int]) -> None:
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self) -> None:
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """Live and peak bytes of the activations saved for backward inside the ``with`` block."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.refcounts: Dict[int, int] = {}
        self.sizes: Dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _SavedHandle:
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            return _SavedHandle(tensor, self, None)
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded:
            return _SavedHandle(tensor, self, None)
        if self.refcounts.get(key, 0) == 0:
            self.sizes[key] = storage.nbytes()
            self.live_bytes += self.sizes[key]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.refcounts[key] = self.refcounts.get(key, 0) + 1
        return _SavedHandle(tensor, self, key)

    @staticmethod
    def _unpack(handle: _SavedHandle) -> torch.Tensor:
        return handle.tensor

    def _release(self, key: int) -> None:
        self.refcounts[key] -= 1
        if self.refcounts[key] == 0:
            self.live_bytes -= self.sizes.pop(key)
            del self.refcounts[key]

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now (e.g. per stage of a staged step)."""
        self.peak_bytes = self.live_bytes

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
