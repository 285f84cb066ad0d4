"""Cost model of greedy stages in one process: what the aux heads and the per-stage steps add.

The stage bodies do the model's own work: each stage's backward stops at its detached input, and
together the stages backpropagate through every layer once, as backprop does.  What they add,
in ``effcompile.cost`` units:

* each aux head's forward and backward multiply-adds (measured with torch's FlopCounterMode at
  plan time: ``head_flops``, forward+backward on the traced path, forward only on the block-stack
  path, where backward is counted as twice the forward);
* ``HEAD_OPS`` per head (pooling, flattening, the head's layers, its loss, and their backward)
  and ``STAGE_OPS`` per stage (a backward call of its own, the detach, the loss bookkeeping).

One process per stage (``runtime/``) overlaps the stages; its throughput is set by the slowest
stage, whose share the Plan shows per stage (``flops_share``).
"""

from __future__ import annotations

from typing import Sequence

from effcompile.cost import Work

__all__ = ["HEAD_OPS", "STAGE_OPS", "stages_change"]

HEAD_OPS = 16
STAGE_OPS = 12


def stages_change(head_flops: Sequence[int], forward_only: bool) -> Work:
    """The one-process staged step's change of work: ``head_flops`` per stage (0 for the last)."""
    heads = [flops for flops in head_flops if flops]
    macs = sum(heads) / 2 * (3 if forward_only else 1)
    return Work(macs=macs, ops=HEAD_OPS * len(heads) + STAGE_OPS * len(head_flops))
