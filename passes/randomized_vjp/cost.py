"""Cost model of the randomized VJP: what one sketched layer saves and adds per step, eager or compiled.

In ``effcompile.cost`` units, from the captured layer's forward products (``LayerWork``):

* saved: the sampled product shrinks to the kept fraction (``SAVED_PRODUCT_SHARE`` of what its
  multiply-adds predict: measured, below) — the weight gradient (the same
  multiply-adds as the forward) to ``(k + 1)/M`` of its rows (images for a convolution; the ``+1``
  is the centring's exact mean row), the input gradient to ``k_features/N`` of the output features;
* added, memory-bound: the importance scores read the layer input X and output gradient G once
  (row norms; ``uniform`` reads nothing), the centring reads X for its mean, writes ``X − x̄`` and
  reads G for its sum, and the gather reads and writes the kept rows of X and G;
* added products: the ``sketch`` estimator projects X and G onto k Rademacher directions
  (``k·(|X| + |G|)`` multiply-adds);
* added ops: the eager fixed cost of the sampled product (``SKETCH_OPS``, ``IMPORTANCE_OPS``,
  ``CENTER_OPS``: measured, below), ``ADAPTIVE_OPS`` for the adaptive statistics.

Compiled (``compiled=True``, against ``step_work(..., compiled=True)``): the input statistics run
in the forward, fused into one pass over X after the layer's GEMM (``joint_rewrite.py``), and the
gradient's norms and sum into one pass over G; the centring is applied inside the gather (no
``X − x̄`` written); the fixed cost is what stays outside Inductor's kernels, mostly the host
sampler (``COMPILED_*_OPS``, measured, below).

Whether the sketch pays is the product's share of the step against these fixed costs: a
1024-wide MLP at batch 256 saves most of its weight-gradient GEMMs; a small layer at batch 32
adds more ops than it saves multiply-adds.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from effcompile.cost import LayerWork, Work

from .estimators import round_budget
from .joint_rewrite import LayerSketch

__all__ = ["PROFIT_MARGIN", "profitable", "sampled_rows", "SAVED_PRODUCT_SHARE", "SKETCH_OPS", "IMPORTANCE_OPS", "CENTER_OPS", "ADAPTIVE_OPS",
           "COMPILED_SKETCH_OPS", "COMPILED_IMPORTANCE_OPS", "COMPILED_CENTER_OPS", "COMPILED_CONV_SAVED_SHARE",
           "layer_change"]

# Eager fixed cost of one sampled product, in ops (``DISPATCH_MACS`` each), measured as the step
# time each layer adds to an 8×64-wide MLP at batch 32 (2-core Intel Xeon, torch 2.13, 2026-12-05):
# 74 µs with uniform sampling (the autograd function, the draw, two gathers, the scaling), 87 µs
# more for importance scores and the water-filling draw, 32 µs more for the centring (medians of
# 200 steps, one thread).
SKETCH_OPS = 21
IMPORTANCE_OPS = 25
CENTER_OPS = 9
# A sampled product saves this share of the time its multiply-adds predict.  torch.profiler over
# 10 eager steps of the 1024-wide MLP at batch 256, keep 0.25 (record_shapes): the first layer's
# weight-gradient GEMM took 12.6 ms over 256 rows and 8.3 ms over 65, where timed alone they take
# 9.7 and 2.4 ms.  Part of the gap is the output: the GEMM writes the full 1024x3072 gradient into
# a freshly allocated tensor whatever k is, and first touching 12.6 MB of new pages took 2.6 ms
# against 0.45 ms for a reused buffer (2-core Intel Xeon, 2026-12-05); the rest is not explained.
SAVED_PRODUCT_SHARE = 0.65
# Compiled fixed cost of one sampled product, in ops, measured like the eager one (the same MLP,
# Inductor, `effcompile.train_step(compile=True)`, medians of 300 steps, one thread, Xeon,
# 2026-12-06): 44 µs with uniform sampling (the sampler's host call and the kernels around the
# sampled GEMM), 7 µs more for the centring.  Importance's water-filling draw is host code, which
# runs 3-4x slower after a step's large GEMMs than in that small step (76 µs there): 0.28 ms a
# layer in the ViT's compiled step (profiled, 2026-12-05), 0.30 ms and 0.36 ms a layer as the
# measured difference to uniform on the ViT and the 512-wide MLP (`cost_model --compile`).
COMPILED_SKETCH_OPS = 13
COMPILED_IMPORTANCE_OPS = 80
COMPILED_CENTER_OPS = 2
# Compiled, a convolution's sampled weight gradient saved nothing measurable: ResNet-18 (width 16,
# batch 64, one thread) stepped 1.09x exact backprop with every convolution sketched by uniform
# sampling, where this model's other costs account for 1.08x (`cost_model --compile`, 2026-12-06).
# The sketch splits the convolution's backward into an input-gradient call over every image and a
# weight-gradient call over the k sampled ones, where exact backprop makes one call for both.
COMPILED_CONV_SAVED_SHARE = 0.0
ADAPTIVE_OPS = 10  # the per-step statistics op and the EMA fold
# profitable_only keeps a layer's sketch only where the predicted net saving is at least this share
# of its gross saving: the model under-predicts the sketch's cost by 0.02-0.18 of the step
# (`python -m benchmarks cost_model`), so a layer predicted to break even costs in practice (the
# 768-512 MLP's first layer at batch 128: predicted -0.0%, and the step with it alone sketched
# measured 1.07x).
PROFIT_MARGIN = 0.25


def profitable(change: Work) -> bool:
    """Whether a layer's predicted ``change`` (``layer_change``) is a saving worth keeping."""
    gross = -min(change.macs, 0.0)
    return change.units < 0 and -change.units >= PROFIT_MARGIN * gross


def sampled_rows(op: str, input_shape: Optional[Sequence[int]]) -> int:
    """The sampled dimension M of a layer's weight-gradient GEMM: sample·token rows for a linear,
    images for a convolution (0 without a shape)."""
    if not input_shape:
        return 0
    return int(input_shape[0]) if op.startswith("conv") else math.prod(input_shape[:-1])


def layer_change(settings: LayerSketch, op: str, input_shape: Optional[Sequence[int]], layer: LayerWork,
                 adaptive: bool = False, compiled: bool = False) -> Work:
    """How sketching one layer at ``settings`` changes the step's work (negative: it saves), eager
    or compiled (the module docstring)."""
    change = Work()
    x_bytes, g_bytes = layer.input_bytes, layer.output_bytes
    product = layer.forward.macs
    rows = sampled_rows(op, input_shape)
    if settings.keep < 1 and rows:
        k = round_budget(rows, settings.keep, settings.multiple)
        kept = min(1.0, (k + settings.center) / rows)
        share = COMPILED_CONV_SAVED_SHARE if compiled and op.startswith("conv") else SAVED_PRODUCT_SHARE
        change += Work(macs=-(1.0 - kept) * share * product, ops=COMPILED_SKETCH_OPS if compiled else SKETCH_OPS)
        moved = 2 * kept * (x_bytes + g_bytes)  # gather: read and write the kept rows
        if compiled:  # one fused pass over X (mean, norms) and one over G (norms, sum)
            scored = settings.estimator == "importance"
            if scored or settings.center:
                change += Work(bytes=x_bytes + g_bytes)
            change += Work(ops=scored * COMPILED_IMPORTANCE_OPS + settings.center * COMPILED_CENTER_OPS)
        else:
            if settings.estimator == "importance":  # row norms of X and G
                change += Work(bytes=x_bytes + g_bytes, ops=IMPORTANCE_OPS)
            if settings.center:  # the mean of X, X - mean written, the sum of G
                change += Work(bytes=3 * x_bytes + g_bytes, ops=CENTER_OPS)
        change += Work(bytes=moved)
        if settings.estimator == "sketch":
            change += Work(macs=k * (layer.input_numel + layer.output_numel))
    features = layer.output_numel // math.prod(input_shape[:-1]) if input_shape and len(input_shape) > 1 else 0
    if settings.keep_input < 1 and features and not op.startswith("conv"):
        k = round_budget(features, settings.keep_input, settings.multiple)
        kept = min(1.0, k / features)
        change += Work(macs=-(1.0 - kept) * SAVED_PRODUCT_SHARE * product, bytes=(1 + 2 * kept) * g_bytes,
                       ops=COMPILED_SKETCH_OPS if compiled else SKETCH_OPS)
    if adaptive:
        change += Work(bytes=x_bytes + g_bytes, ops=ADAPTIVE_OPS)
    return change
