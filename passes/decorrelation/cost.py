"""Cost model of decorrelation, and the per-layer choice that meets an overhead budget.

Counted in multiply-adds (MACs) per training step, from the captured graph's shapes:

* the layer's own work: forward ``rows·|W|`` plus two backward GEMMs of the same size, where
  ``rows`` is the number of input rows the weight is applied to (samples·tokens for a linear,
  samples·output positions for a convolution) — ``3·rows·|W|``;
* the fused weight ``A = W·R``: every weight element meets one length-``b`` block row of R —
  ``|W|·b`` per step (autograd's backward of the product is the same size again; it is counted);
* the R update: :func:`~.state.update_macs` of the cheapest exact formula for ``n`` sampled
  rows and block size ``b``, per block, once every ``update_every`` steps.

``overhead = (2·|W|·b + blocks·update / update_every) / (3·rows·|W|)`` is the predicted extra
step time of the layer relative to its plain training work.

``Decorrelation(max_overhead=x)`` is a budget for the whole model: the pass's work summed over
the decorrelated layers is at most ``x`` times their summed training work (:func:`allocate`).
Each layer has a ladder of configurations (:func:`ladder`), from the most decorrelation (largest
block, update every step) to the cheapest: blocks first shrink to keep every-step updates (down
to 64 features), then the update interval grows, then blocks shrink further.  Starting with
every layer on its first rung, the layer whose pass work is the largest steps down one rung
until the model meets the budget.  Wide layers that dominate the cost are the ones made cheaper;
a small layer keeps its full R, whose cost is negligible for the step even where it is large
relative to that layer.  The choice is shown in the Plan.  The work is counted at the batch of
``example_inputs``: the overhead shrinks as the batch grows (the pass's work does not depend on
it), so pass an example of the training batch size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

from .state import MIN_ROWS, block_layout, update_formula, update_macs

__all__ = ["AUTO_BUDGET", "AUTO_MAX_INTERVAL", "LayerCost", "layer_rows", "conv_output_positions", "predict", "ladder", "allocate"]

UPDATE_INTERVALS = (1, 2, 4, 8, 16, 32, 64)
MIN_BUDGET_BLOCK = 64  # below this a block decorrelates little; longer intervals are preferred
# Decorrelation(max_overhead="auto"): the budget, and the cheapest configuration it may choose.
# 0.15 of the MACs: the pass's other work (row sampling, per-op dispatch, the guarded R write) is
# not counted and measured about 0.1-0.15 more on a CPU ResNet-18 (benchmarks/decorrelation.py step).
AUTO_BUDGET = 0.15
AUTO_MAX_INTERVAL = 4


@dataclasses.dataclass(frozen=True)
class LayerCost:
    block: int
    update_every: int
    layer_macs: int
    fused_macs: int
    update_macs: int  # per update (all blocks)

    @property
    def pass_macs(self) -> float:
        """The pass's own MACs per training step (the update amortised over its interval)."""
        return self.fused_macs + self.update_macs / self.update_every

    @property
    def overhead(self) -> float:
        return self.pass_macs / max(1, self.layer_macs)


def layer_rows(input_shape: Sequence[int], conv_output_positions: Optional[int]) -> int:
    """Input rows the weight meets per step: samples·tokens (linear) or samples·positions (conv)."""
    if conv_output_positions is not None:
        return int(input_shape[0]) * conv_output_positions if input_shape else 0
    return math.prod(input_shape[:-1]) if len(input_shape) > 1 else 1


def conv_output_positions(input_shape: Sequence[int], conv) -> int:
    """Output positions of a convolution from its geometry (padding on both sides)."""
    positions = 1
    for size, k, s, p, d in zip(input_shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        positions *= max(1, (size + 2 * p - d * (k - 1) - 1) // s + 1)
    return positions


def predict(weight_numel: int, rows: int, groups: int, group_dim: int, max_block: int, rows_per_dim: float,
            update_every: int, syncing: bool = False) -> LayerCost:
    blocks_per_group, block = block_layout(group_dim, max_block)
    n = max(MIN_ROWS, math.ceil(rows_per_dim * block))
    n = min(n, max(1, rows))  # a batch with fewer rows than the cap gives all of them (state.py)
    per_block = update_macs(update_formula(n, block, syncing), n, block)
    return LayerCost(block=block, update_every=update_every, layer_macs=3 * rows * weight_numel,
                     fused_macs=2 * weight_numel * block, update_macs=groups * blocks_per_group * per_block)


def _block_ladder(group_dim: int, max_block: int) -> Tuple[int, ...]:
    """Block-size caps from the largest allowed down to 16, halving."""
    caps, cap = [], min(group_dim, max_block)
    while cap >= 16:
        caps.append(cap)
        cap //= 2
    return tuple(caps) or (min(group_dim, max_block),)


def ladder(weight_numel: int, rows: int, groups: int, group_dim: int, max_block: int, rows_per_dim: float,
           syncing: bool = False, min_update_every: int = 1, limited: bool = False) -> List[LayerCost]:
    """One layer's configurations in order of preference, each strictly cheaper than the one before.

    Preference: every-step updates with blocks shrinking to ``MIN_BUDGET_BLOCK``, then longer
    intervals at those blocks, then smaller blocks at any interval.  ``limited`` (the "auto"
    budget) stops at ``MIN_BUDGET_BLOCK`` and ``AUTO_MAX_INTERVAL``.
    """
    blocks = _block_ladder(group_dim, max_block)
    floor = min(MIN_BUDGET_BLOCK, group_dim)
    intervals = [every for every in UPDATE_INTERVALS if every >= min_update_every] or [min_update_every]
    if limited:
        intervals = [every for every in intervals if every <= AUTO_MAX_INTERVAL] or intervals[:1]
    preferred = [(cap, intervals[0]) for cap in blocks if cap >= floor]
    preferred += [(cap, every) for every in intervals[1:] for cap in blocks if cap >= floor]
    if not limited:
        preferred += [(cap, every) for every in intervals for cap in blocks if cap < floor]
    rungs: List[LayerCost] = []
    for cap, every in preferred:
        cost = predict(weight_numel, rows, groups, group_dim, cap, rows_per_dim, every, syncing)
        if not rungs or cost.pass_macs < rungs[-1].pass_macs:
            rungs.append(cost)
    return rungs


def allocate(ladders: Sequence[Sequence[LayerCost]], max_overhead: float) -> Tuple[List[LayerCost], bool]:
    """One configuration per layer such that the summed pass MACs are at most ``max_overhead`` ×
    the summed layer MACs (and whether that was reached; else every layer at its cheapest).

    Greedy: all layers start on their first rung; while over budget, the layer whose current
    pass MACs are the largest moves one rung down.
    """
    position = [0] * len(ladders)
    budget = max_overhead * sum(rungs[0].layer_macs for rungs in ladders)
    total = sum(rungs[0].pass_macs for rungs in ladders)
    while total > budget:
        movable = [i for i, rungs in enumerate(ladders) if position[i] < len(rungs) - 1]
        if not movable:
            return [rungs[i] for rungs, i in zip(ladders, position)], False
        layer = max(movable, key=lambda i: ladders[i][position[i]].pass_macs)
        total -= ladders[layer][position[layer]].pass_macs
        position[layer] += 1
        total += ladders[layer][position[layer]].pass_macs
    return [rungs[i] for rungs, i in zip(ladders, position)], True
