"""Cost model of decorrelation, and the per-layer choice that meets an overhead budget.

Counted in multiply-adds (MACs) per training step, from the captured graph's shapes:

* the layer's own work: forward ``rows·|W|`` plus two backward GEMMs of the same size, where
  ``rows`` is the number of input rows the weight is applied to (samples·tokens for a linear,
  samples·output positions for a convolution) — ``3·rows·|W|``;
* applying R, on the side the layer allows and the model finds cheaper (``Decorrelation.apply``):
  the fused weight ``A = W·R``, where every weight element meets one length-``b`` block row of R
  — ``|W|·b`` per step; or the input ``z = x·Rᵀ``, every input row meeting R — ``rows·d·b``
  (``d`` padded to whole blocks).  Either backward is the same size again and is counted;
* the R update: :func:`~.state.update_macs` of the cheapest exact formula for ``n`` sampled
  rows and block size ``b``, per block, once every ``update_every`` steps (a longer interval than
  configured takes a proportionally longer step, :func:`~.state.update_lr`, so it costs less
  without decorrelating less per training step).

* dispatch: every op the pass adds costs a fixed time before any arithmetic (eager dispatch,
  autograd bookkeeping, a kernel launch), counted as ``DISPATCH_MACS`` per op: ``APPLY_OPS`` for
  applying R (2 for one dense product and its backward, more for the views around a
  block-diagonal product) and ``UPDATE_OPS`` per update.  It is what decides small layers: a
  128-wide layer at batch 32 is cheaper with one dense 128-block than with two 64-blocks, whose
  saved MACs cost less time than their extra ops.

``overhead = (2·min(|W|, rows·d)·b + blocks·update / update_every + dispatch) / (3·rows·|W| +
dispatch of the layer's 3 ops)`` is the predicted extra step time of the layer relative to its
plain training work.

``Decorrelation(max_overhead=x)`` is a budget for the whole model: the pass's work summed over
the decorrelated layers is at most ``x`` times their summed training work (:func:`allocate`).
Each layer has a ladder of configurations (:func:`ladder`), from the most decorrelation (largest
block, update every step) to the cheapest: blocks first shrink to keep every-step updates (down
to 64 features), then the update interval grows, then blocks shrink further.  A k×k convolution
under ``structure="auto"`` also has the Kronecker R (``R_channel ⊗ R_spatial``, kronecker.py:
``2·|W|·(C+s)`` to apply, ``2·n·C·s·(C+s) + C³ + s³`` per update) at each interval, after the
dense block of the whole patch and before any smaller block.  Starting with
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

from effcompile.cost import DISPATCH_MACS, Work  # shared by every cost model

from .kronecker import (KRONECKER_APPLY_OPS, KRONECKER_UPDATE_OPS, kronecker_apply_macs, kronecker_rows,
                        kronecker_update_macs)
from .state import MIN_ROWS, block_layout, update_formula, update_macs

__all__ = ["SIDES", "DISPATCH_MACS", "APPLY_OPS", "APPLY_BYTES", "UPDATE_OPS", "LAYER_OPS", "AUTO_BUDGET", "AUTO_MAX_INTERVAL",
           "LayerCost", "layer_rows", "conv_output_positions", "predict", "predict_kronecker", "ladder", "allocate"]

UPDATE_INTERVALS = (1, 2, 4, 8, 16, 32, 64)
MIN_BUDGET_BLOCK = 64  # below this a block decorrelates little; longer intervals are preferred
# Decorrelation(max_overhead="auto"): the budget, and the cheapest configuration it may choose.
# 0.15 of the work: the pass's memory-bound work (gathering patches, the guarded R write) is not
# counted; on a CPU ResNet-18 (benchmarks/decorrelation.py step) it measured 0.1-0.15 of the step
# above the prediction with the update in einsums, and the whole pass 0.06 at 0.14 predicted since.
AUTO_BUDGET = 0.15
# At most an update every 16 steps: a longer interval takes a proportionally longer step
# (state.update_lr) and MAX_STEP keeps it stable, so the per-epoch gain holds (digits MLP, lr 0.01:
# 3.3 epochs to 95% at every 4 and at every 16; 1.7-1.9x backprop's step at 4, 1.3-2.1x at 16 over four runs).
AUTO_MAX_INTERVAL = 16
SIDES = ("weight", "input")  # where R is applied: the fused weight W·R, or the layer input x·Rᵀ
# Ops per step of applying R (product + backward), dense or block-diagonal, and per R update
# (row sampling, the batched products, the row scaling, the guarded write and its counters).
APPLY_OPS = {"dense": 2, "blocked": 12}
UPDATE_OPS = 20
LAYER_OPS = 3  # the layer's own: forward, input gradient, weight gradient
# Memory-bound traffic of applying R per step, in elements of the tensor R meets (fp32 assumed):
# on the weight, W read and W·R written, then the backward reads the gradient of W·R and writes
# W's (5 |W|: the fused weight is a new tensor every step); the Kronecker R passes twice, with
# the permuted copies between its two factors (9 |W|); on the input, x read and z written, the
# gradient of z read and x's written (4 per input element).  The 1024-wide MLP's budgeted step
# measured 0.1 above its MACs-only prediction, which 5 |W| at effcompile.cost.MACS_PER_BYTE
# accounts for (`python -m benchmarks cost_model`, 2026-12-05).
APPLY_BYTES = {"weight": 5, "kronecker": 9, "input": 4}
ELEMENT_BYTES = 4


@dataclasses.dataclass(frozen=True)
class LayerCost:
    block: int
    update_every: int
    layer_macs: int
    apply_macs: int
    update_macs: int  # per update (all blocks)
    side: str = "weight"  # where R is applied (one of SIDES)
    dense: bool = True  # R is one dense block (no block-diagonal plumbing around the product)
    structure: str = "blocks"  # "blocks" or "kronecker" (R_channel ⊗ R_spatial, kronecker.py)
    moved_bytes: float = 0.0  # memory-bound traffic of applying R (APPLY_BYTES); not in pass_cost

    @property
    def work(self) -> Work:
        """The pass's own work per training step (the update amortised over its interval)."""
        return self._work(self.update_every)

    @property
    def compiled_work(self) -> Work:
        """The same in train_step's compiled step, each op a kernel call: the update runs only on
        its steps there (a graph without it between them, ``effcompile.compiling.scheduled``).  A
        user's own compiled loop computes it every step and masks it, ``self._work(1)``, which this
        prediction leaves out."""
        return self._work(self.update_every).as_compiled_calls()

    def _work(self, interval: int) -> Work:
        if self.structure == "kronecker":
            ops = KRONECKER_APPLY_OPS + KRONECKER_UPDATE_OPS / interval
        else:
            ops = APPLY_OPS["dense" if self.dense else "blocked"] + UPDATE_OPS / interval
        return Work(macs=self.apply_macs + self.update_macs / interval, bytes=self.moved_bytes, ops=ops)

    @property
    def pass_cost(self) -> float:
        """The pass's own work per training step in MACs, its ops' dispatch counted as
        ``DISPATCH_MACS`` each: what the budget allocates (``AUTO_BUDGET`` was calibrated without
        the bytes, which the Plan's ``predicted_step`` adds through :attr:`work`)."""
        return self.work.macs + DISPATCH_MACS * self.work.ops

    @property
    def layer_cost(self) -> float:
        """The layer's own training work in the same units: its MACs and its ops' dispatch."""
        return self.layer_macs + DISPATCH_MACS * LAYER_OPS

    @property
    def overhead(self) -> float:
        return self.pass_cost / self.layer_cost


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
            update_every: int, syncing: bool = False, sides: Sequence[str] = ("weight",)) -> LayerCost:
    """The cost of one configuration, R applied on the cheaper of ``sides`` (ties: the weight)."""
    blocks_per_group, block = block_layout(group_dim, max_block)
    n = max(MIN_ROWS, math.ceil(rows_per_dim * block))
    n = min(n, max(1, rows))  # a batch with fewer rows than the cap gives all of them (state.py)
    per_block = update_macs(update_formula(n, block, syncing), n, block)
    apply_macs = {"weight": 2 * weight_numel * block, "input": 2 * rows * groups * blocks_per_group * block * block}
    side = min((side for side in SIDES if side in sides), key=lambda side: apply_macs[side])
    moved = {"weight": APPLY_BYTES["weight"] * weight_numel,
             "input": APPLY_BYTES["input"] * rows * groups * blocks_per_group * block}[side] * ELEMENT_BYTES
    return LayerCost(block=block, update_every=update_every, layer_macs=3 * rows * weight_numel,
                     apply_macs=apply_macs[side], update_macs=groups * blocks_per_group * per_block, side=side,
                     dense=groups * blocks_per_group == 1, moved_bytes=moved)


def predict_kronecker(weight_numel: int, rows: int, groups: int, channels: int, taps: int, rows_per_dim: float,
                      update_every: int) -> LayerCost:
    """The cost of a convolution's ``R = R_channel ⊗ R_spatial`` (kronecker.py), on the weight."""
    n = min(kronecker_rows(channels, taps, rows_per_dim), max(1, rows))
    return LayerCost(block=channels * taps, update_every=update_every, layer_macs=3 * rows * weight_numel,
                     apply_macs=kronecker_apply_macs(weight_numel, channels, taps),
                     update_macs=groups * kronecker_update_macs(n, channels, taps), side="weight", dense=False,
                     structure="kronecker", moved_bytes=APPLY_BYTES["kronecker"] * weight_numel * ELEMENT_BYTES)


def _block_ladder(group_dim: int, max_block: int) -> Tuple[int, ...]:
    """Block-size caps from the largest allowed down to 16, halving."""
    caps, cap = [], min(group_dim, max_block)
    while cap >= 16:
        caps.append(cap)
        cap //= 2
    return tuple(caps) or (min(group_dim, max_block),)


def ladder(weight_numel: int, rows: int, groups: int, group_dim: int, max_block: int, rows_per_dim: float,
           syncing: bool = False, min_update_every: int = 1, limited: bool = False,
           sides: Sequence[str] = ("weight",), kronecker: Optional[Tuple[int, int]] = None,
           structure: str = "blocks") -> List[LayerCost]:
    """One layer's configurations in order of preference, each strictly cheaper than the one before.

    Preference with blocks: every-step updates with blocks shrinking to ``MIN_BUDGET_BLOCK``, then
    longer intervals at those blocks, then smaller blocks at any interval.  ``limited`` (the
    "auto" budget) stops at ``MIN_BUDGET_BLOCK`` and ``AUTO_MAX_INTERVAL``.

    ``kronecker``: (channels C, taps s) of a convolution that may take ``R_channel ⊗ R_spatial``.
    ``structure="kronecker"`` gives it at every interval instead of blocks; ``"auto"`` puts it,
    at each interval, after a dense block of the whole patch and before any smaller block (a
    block spans ``b/s`` channels; the Kronecker R spans all of them).
    """
    intervals = [every for every in UPDATE_INTERVALS if every >= min_update_every] or [min_update_every]
    if limited:
        intervals = [every for every in intervals if every <= AUTO_MAX_INTERVAL] or intervals[:1]
    if kronecker is None or structure == "blocks":
        preferred = _block_preference(group_dim, max_block, intervals, limited)
    elif structure == "kronecker":
        preferred = [("kronecker", every) for every in intervals]
    else:
        preferred = []
        for cap, every in _block_preference(group_dim, max_block, intervals, limited):
            if cap < group_dim and ("kronecker", every) not in preferred:
                preferred.append(("kronecker", every))
            preferred.append((cap, every))
    rungs: List[LayerCost] = []
    for cap, every in preferred:
        if cap == "kronecker":
            cost = predict_kronecker(weight_numel, rows, groups, *kronecker, rows_per_dim, every)
        else:
            cost = predict(weight_numel, rows, groups, group_dim, cap, rows_per_dim, every, syncing, sides)
        if not rungs or cost.pass_cost < rungs[-1].pass_cost:
            rungs.append(cost)
    return rungs


def _block_preference(group_dim: int, max_block: int, intervals: Sequence[int],
                      limited: bool) -> List[Tuple[int, int]]:
    """(block cap, interval) of the block structure in order of preference (:func:`ladder`)."""
    blocks = _block_ladder(group_dim, max_block)
    floor = min(MIN_BUDGET_BLOCK, group_dim)
    preferred = [(cap, intervals[0]) for cap in blocks if cap >= floor]
    preferred += [(cap, every) for every in intervals[1:] for cap in blocks if cap >= floor]
    if not limited:
        preferred += [(cap, every) for every in intervals for cap in blocks if cap < floor]
    return preferred


def allocate(ladders: Sequence[Sequence[LayerCost]], max_overhead: float) -> Tuple[List[LayerCost], bool]:
    """One configuration per layer such that the summed pass MACs are at most ``max_overhead`` ×
    the summed layer MACs (and whether that was reached; else every layer at its cheapest).

    Greedy: all layers start on their first rung; while over budget, the layer whose current
    pass MACs are the largest moves one rung down.
    """
    position = [0] * len(ladders)
    budget = max_overhead * sum(rungs[0].layer_cost for rungs in ladders)
    total = sum(rungs[0].pass_cost for rungs in ladders)
    while total > budget:
        movable = [i for i, rungs in enumerate(ladders) if position[i] < len(rungs) - 1]
        if not movable:
            return [rungs[i] for rungs, i in zip(ladders, position)], False
        layer = max(movable, key=lambda i: ladders[i][position[i]].pass_cost)
        total -= ladders[layer][position[layer]].pass_cost
        position[layer] += 1
        total += ladders[layer][position[layer]].pass_cost
    return [rungs[i] for rungs, i in zip(ladders, position)], True
