"""Bounded replay buffer of encoded stage-boundary batches (async greedy stages).

In async mode the consumer stage k+1 does not wait for each new batch of stage k: a receiver
thread puts every arriving (payload, labels, step id) into this buffer, and the trainer samples
from it.  Rules (DGL's "priority LIFO" with a reuse cap):

* sampling: among the slots with the lowest use count, take the freshest (highest insertion
  sequence number); slots used ``max_reuse`` times are never sampled.  So a new batch is always
  trained on before any batch is reused, and reuse goes to the most recent batches first.
* insertion when full: the new item replaces the most-used slot, ties broken by age (oldest
  first).  A slot at the reuse cap is dead weight and goes first; otherwise the least valuable
  slot is the one trained on most and, among equals, the stalest.
* capacity: never more than ``capacity`` items.

Items hold encoded payloads (int8 / VQ codes), so the buffer's memory shrinks with the wire's
compression (``nbytes``).  All methods are thread-safe (one lock); ``wait_sample`` blocks on a
condition variable until an item is sampleable, the stream is closed, or a deadline passes.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import List, Optional

import torch

from .transport import Payload, payload_bytes

__all__ = ["ReplayItem", "ReplayBuffer"]


@dataclasses.dataclass
class ReplayItem:
    payload: Payload
    labels: torch.Tensor
    step: int
    sequence: int = 0
    uses: int = 0


class ReplayBuffer:
    """Bounded priority-LIFO replay buffer with a per-item reuse cap (see the module docstring)."""

    def __init__(self, capacity: int, max_reuse: int) -> None:
        if not (isinstance(capacity, int) and capacity >= 1):
            raise ValueError(f"ReplayBuffer.capacity={capacity!r} is invalid: expected an integer >= 1")
        if not (isinstance(max_reuse, int) and max_reuse >= 1):
            raise ValueError(f"ReplayBuffer.max_reuse={max_reuse!r} is invalid: expected an integer >= 1")
        self.capacity, self.max_reuse = capacity, max_reuse
        self.items: List[ReplayItem] = []
        self.next_sequence = 0
        self.inserted = self.evicted = self.sampled = 0
        self.evicted_unused = 0  # batches dropped before any training on them (consumer too slow)
        self.closed = False
        self._condition = threading.Condition()

    def __len__(self) -> int:
        with self._condition:
            return len(self.items)

    def put(self, payload: Payload, labels: torch.Tensor, step: int) -> None:
        with self._condition:
            item = ReplayItem(payload, labels, int(step), self.next_sequence)
            self.next_sequence += 1
            self.inserted += 1
            if len(self.items) < self.capacity:
                self.items.append(item)
            else:
                victim = max(range(len(self.items)), key=lambda i: (self.items[i].uses, -self.items[i].sequence))
                self.evicted += 1
                self.evicted_unused += self.items[victim].uses == 0
                self.items[victim] = item
            self._condition.notify_all()

    def _pick(self) -> Optional[ReplayItem]:
        usable = [item for item in self.items if item.uses < self.max_reuse]
        if not usable:
            return None
        return min(usable, key=lambda item: (item.uses, -item.sequence))

    def sample(self) -> Optional[ReplayItem]:
        """The next item by priority LIFO (its use count incremented), or None if none is usable."""
        with self._condition:
            item = self._pick()
            if item is not None:
                item.uses += 1
                self.sampled += 1
            return item

    def close(self) -> None:
        """No more items will come (end of stream): wake waiting samplers."""
        with self._condition:
            self.closed = True
            self._condition.notify_all()

    def wait_sample(self, timeout_s: float, abort: Optional[threading.Event] = None) -> Optional[ReplayItem]:
        """Block until an item is usable (returned) or the stream is closed with none left (None).

        Raises ``TimeoutError`` when nothing usable arrives within ``timeout_s``.  ``abort``
        (set by a failing receiver thread) ends the wait early with None.
        """
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while True:
                item = self._pick()
                if item is not None:
                    item.uses += 1
                    self.sampled += 1
                    return item
                if self.closed or (abort is not None and abort.is_set()):
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no usable batch arrived within {timeout_s:g} s")
                self._condition.wait(min(remaining, 0.1))

    @property
    def nbytes(self) -> int:
        """Bytes held: encoded payloads (a VQ codebook shared by items counted once) + labels."""
        with self._condition:
            total, seen = 0, set()
            for item in self.items:
                total += payload_bytes(item.payload, exclude=("codebook",)) + item.labels.numel() * item.labels.element_size()
                codebook = item.payload.fields.get("codebook")
                if codebook is not None and id(codebook) not in seen:
                    seen.add(id(codebook))
                    total += codebook.numel() * codebook.element_size()
            return total

    def state_dict(self) -> dict:
        with self._condition:
            return {
                "capacity": self.capacity, "max_reuse": self.max_reuse, "next_sequence": self.next_sequence,
                "counters": (self.inserted, self.evicted, self.sampled, self.evicted_unused),
                "items": [{"payload": item.payload.to_state(), "labels": item.labels, "step": item.step,
                           "sequence": item.sequence, "uses": item.uses} for item in self.items],
            }

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity or state["max_reuse"] != self.max_reuse:
            raise ValueError(f"replay buffer state has capacity={state['capacity']}, max_reuse={state['max_reuse']}; "
                             f"this buffer has capacity={self.capacity}, max_reuse={self.max_reuse}")
        with self._condition:
            self.next_sequence = state["next_sequence"]
            self.inserted, self.evicted, self.sampled, self.evicted_unused = state["counters"]
            self.items = [ReplayItem(Payload.from_state(item["payload"]), item["labels"], item["step"],
                                     item["sequence"], item["uses"]) for item in state["items"]]
            self._condition.notify_all()
