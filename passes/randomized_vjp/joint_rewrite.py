"""Randomized VJP pass: replace backward GEMMs by sparse, unbiased, structured estimates.

Linear layer ``Y = X·Wᵀ + b`` (X: M×K rows = samples·tokens, G = ∂L/∂Y: M×N).  Joint graph
before (AOT autograd, the layer's backward nodes)::

    grad_W = mm(t(G), X)          # N×M · M×K
    grad_X = mm(G, t(t(W)))       # M×N · N×K

Joint graph after, target ``grad_weight`` (one shared index set over the M rows)::

    s      = ‖G_t‖·‖X_t‖                                   # row scores (uniform: zeros, no norms)
    idx, c = effcompile::sample_indices(s, k, estimator)  # k static, c_t = 1/π_t
    grad_W = mm(t(G[idx] · c), X[idx])                     # a k/M-smaller dense GEMM

and target ``grad_input`` (one shared index set over the N output features)::

    idx, c = effcompile::sample_indices(‖G_{:,j}‖·‖W_j‖, k, estimator)
    grad_X = mm(G[:, idx] · c, W[idx])

With centring (the default) the sampled rows are ``X[idx] − x̄`` and one more row pair
``(Σ_t g_t, x̄)`` adds the exact mean term.  What reads X alone (``x̄`` and the rows' norms
``‖x_t − x̄‖``) is computed in the forward, after the layer's forward GEMM, wherever that GEMM's
output feeds the rest of the forward (:func:`_forward_input_statistics`): the backward then never
recomputes X in full (for an input that comes out of a GELU, that is its ``erf`` per pass).

``E[estimate] = exact`` because every index is kept with probability π and scaled by 1/π.  The
``sketch`` estimator replaces ``grad_W`` by ``(Gᵀ·S)·(Sᵀ·X)`` with Rademacher ``S/√k``, ``E[S·Sᵀ] = I``.

How layers reach the joint graph: the model-level part of the pass swaps the owner module's class
so that, while Dynamo traces a training forward, the weight is read through the identity custom op
``effcompile::vjp_marker(W, layer, keep, keep_input, estimator, uniform_mix, multiple)``.  The
settings are op arguments, so they are part of the graph and of Inductor's cache key; the joint
pass (installed by the ``effcompile`` backend as ``joint_custom_pre_pass``, whose ``uuid()``
hashes this file) rewrites the marked layer's backward GEMMs and removes the marker.  A marker
that survives to run time (a graph compiled by another backend) raises instead of silently
computing exact gradients.  In eager mode, ``nn.Linear`` owners run the same estimator as the
autograd function ``effcompile.passes.randomized_vjp.estimators.SketchedLinear``.

Adaptive mode (``adaptive=True``, linear layers): the owner gets a ``weight_vjp_state``
submodule (:class:`VarianceControl`) whose ``statistics`` buffer requires grad and is a second
input of the marker.  The marker's backward gives it the gradient slot
``effcompile::statistics_slot``, which the joint pass replaces by::

    stats = effcompile::sketch_statistics(G, X, grad_W, ks=[k(keep_r) for the ladder], current_k, ...)
            # [added variance at each ladder keep ..., SGD noise]  (float32, on the device)

so the statistics leave the backward as an ordinary gradient; a post-accumulate-grad hook folds
them into EMAs and, every ``adapt_every`` steps, picks the layer's keep (one host read).

Memory mode (``memory_mode=True``, nn.Linear layers): no marker; the owner's forward is the
autograd function ``effcompile.passes.randomized_vjp.estimators.MemorySketchedLinear`` (eager and traced by Dynamo alike),
which samples the grad_weight rows in the forward and saves ``X[idx]`` instead of ``X``.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import operator
import warnings
from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn

from effcompile.passes.analysis.graph_utils import insert_node as _insert, is_tangent as _is_tangent, \
    is_transpose as _is_transpose
from effcompile.passes.base import RecordsJointPass, register_joint_pass

from .config import RandomizedVJP

__all__ = ["LayerSketch", "RewriteRecord", "MissingRewriteError", "JOINT_PASS", "MARKER", "rewrite_joint_graph", "inspect_backward"]

aten = torch.ops.aten
prims = torch.ops.prims  # the joint graph is decomposed: casts are prims.convert_element_type


# ------------------------------------------------------------------------------------ marker op
@torch.library.custom_op("effcompile::vjp_marker", mutates_args=())
def _vjp_marker(weight: torch.Tensor, statistics: Optional[torch.Tensor], layer: str, keep: float, keep_input: float,
                estimator: str, uniform_mix: float, multiple: int, ladder: List[float], center: bool) -> torch.Tensor:
    raise RuntimeError(
        f"effcompile: layer {layer!r} has a RandomizedVJP rewrite that was not applied: compile the model with "
        "torch.compile(backend='effcompile') (or 'effcompile_aot_eager'), or train it eagerly")


@_vjp_marker.register_fake
def _(weight, statistics, layer, keep, keep_input, estimator, uniform_mix, multiple, ladder, center):
    return torch.empty_like(weight)


def _marker_setup(ctx, inputs, output):
    statistics, ctx.layer = inputs[1], inputs[2]
    ctx.has_statistics = statistics is not None
    ctx.save_for_backward(*([statistics] if ctx.has_statistics else []))


def _marker_backward(ctx, grad):
    # The statistics tensor's gradient is a slot the joint pass fills with the layer's
    # on-device variance statistics (effcompile::sketch_statistics).
    from . import estimators  # noqa: F401  (registers effcompile::statistics_slot)

    slot = torch.ops.effcompile.statistics_slot(ctx.saved_tensors[0], ctx.layer) if ctx.has_statistics else None
    return grad, slot, None, None, None, None, None, None, None, None


_vjp_marker.register_autograd(_marker_backward, setup_context=_marker_setup)
MARKER = torch.ops.effcompile.vjp_marker.default


def _slot_op():
    from . import estimators  # noqa: F401  (registers the op)

    return torch.ops.effcompile.statistics_slot.default


@dataclasses.dataclass(frozen=True)
class LayerSketch:
    """Per-layer settings, as carried by the marker op."""

    layer: str
    keep: float  # grad_weight row fraction (1.0: exact)
    keep_input: float  # grad_input feature fraction (1.0: exact)
    estimator: str
    uniform_mix: float
    multiple: int
    ladder: Tuple[float, ...] = ()  # adaptive mode: the keeps the statistics are computed for
    center: bool = False  # grad_weight samples centred rows plus the exact mean term

    def marker_args(self) -> tuple:
        return (self.layer, self.keep, self.keep_input, self.estimator, self.uniform_mix, self.multiple,
                list(self.ladder), self.center)


def _settings(config: RandomizedVJP, layer: str, device: torch.device, adaptive: bool = False) -> LayerSketch:
    multiple = config.multiple or (64 if device.type == "cuda" else 8)
    keep = config.keep if config.target in ("grad_weight", "both") else 1.0
    keep_input = config.input_keep if config.target in ("grad_input", "both") else 1.0
    ladder = config.keep_ladder if adaptive else ()
    if adaptive:  # start on the ladder rung nearest to ``keep`` (log scale)
        keep = min(ladder, key=lambda rung: abs(math.log(rung / config.keep)))
    return LayerSketch(layer, float(keep), float(keep_input), config.estimator, float(config.uniform_mix), int(multiple),
                       tuple(float(rung) for rung in ladder), bool(config.center))


# ------------------------------------------------------------------------------------ joint pass
@dataclasses.dataclass
class RewriteRecord:
    """One rewritten backward GEMM, for reports and ``effcompile inspect``."""

    layer: str
    gemm: str  # "grad_weight" | "grad_input"
    sampled_dim: str  # "rows" (M) | "output features" (N) | "images" (convolution batch)
    n: Any  # an int, or the size expression of a symbolic (dynamic) dimension
    k: Any
    estimator: str
    before: str
    after: str


def _static(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, int) else None


def _size_text(value: Any) -> Any:
    """A static size as an int; a symbolic one (a node or SymInt) as its expression, e.g. ``ceil(s0/4)``."""
    if isinstance(value, torch.fx.Node):
        value = value.meta["val"]
    return int(value) if isinstance(value, int) else str(value)


@dataclasses.dataclass(frozen=True)
class _Exact:
    """A planned GEMM that legitimately stays exact for this graph (the budget keeps every index)."""

    reason: str


def _shape_text(node: torch.fx.Node) -> str:
    return "x".join(str(s) for s in node.meta["val"].shape)


def _describe(node: torch.fx.Node) -> str:
    """``name = op(arg : shape, ...) : shape``: the operands' shapes show the contracted size."""
    args = ", ".join(f"{a.name} : {_shape_text(a)}" if isinstance(a, torch.fx.Node) else repr(a) for a in node.args)
    return f"{node.name} = {getattr(node.target, '__name__', node.target)}({args}) : {_shape_text(node)}"


def _transpose(graph, like, matrix):
    return _insert(graph, like, aten.permute.default, matrix, [1, 0])


def _gather(graph, like, matrix, dim, indices):
    """``matrix.index_select(dim, indices)`` as the decomposed ``aten.index`` Inductor lowers."""
    return _insert(graph, like, aten.index.Tensor, matrix, [None] * dim + [indices])


def _norms(graph, like, tensor, dims):
    """‖·‖₂ over ``dims`` in fp32, from core ops (the joint graph is already decomposed)."""
    tensor = _insert(graph, like, prims.convert_element_type.default, tensor, torch.float32)
    squares = _insert(graph, like, aten.mul.Tensor, tensor, tensor)
    return _insert(graph, like, aten.sqrt.default, _insert(graph, like, aten.sum.dim_IntList, squares, list(dims)))


def _batch_reduction(graph, like, op, tensor):
    """``op(tensor, [0], keepdim=True)`` (the input's mean ``x̄``, the gradient's sum ``Σ_t g_t`` of the
    exact mean term), accumulated and kept in fp32 for a low-precision tensor and cast back once: the
    estimators' ``_batch_sum`` (why: a bf16 sum of G would be merged with the bias
    gradient's into one reduction that Inductor's CPU codegen fails to compile)."""
    dtype = tensor.meta["val"].dtype
    if dtype in (torch.float32, torch.float64):
        return _insert(graph, like, op, tensor, [0], True)
    wide = _insert(graph, like, prims.convert_element_type.default, tensor, torch.float32)
    return _insert(graph, like, prims.convert_element_type.default, _insert(graph, like, op, wide, [0], True), dtype)


def _centred(graph, like, layer_input, mean):
    """``x − x̄`` when centring (``mean`` is x̄), else ``x``."""
    return layer_input if mean is None else _insert(graph, like, aten.sub.Tensor, layer_input, mean)


def _gradient_anchor(graph, like, grad_out, dtype):
    """A 0-dim zero in ``dtype`` computed from ``grad_out`` (the sum of its first zero rows: no data
    read), added to a random draw that needs no input of the backward.

    Why: AOTAutograd's min-cut partitioner places a node that no forward output needs, and whose
    inputs are all forward values, where the cut is cheapest, and may put it in *both* graphs.  A
    draw of ``effcompile::sample_indices`` (uniform: its scores are constant) or
    ``effcompile::rademacher`` would then run twice: once in the forward to gather the input rows
    X[idx] (saving them instead of X), once in the backward for the gradient rows G[idx'], with
    idx ≠ idx' and a biased estimate.  Its bans on recomputing random ops only cover nodes the
    forward needs.  Depending on ``grad_out`` puts the draw and everything it feeds in the backward,
    once."""
    return _zero_of(graph, like, [grad_out], dtype)


def _sampling_scores(graph, like, grad_out, count, settings: LayerSketch, score_factors):
    """The scores of the ``count`` positions to sample: the product of the two norm vectors that
    ``score_factors()`` inserts (``‖g_t‖·‖x_t‖``).  ``uniform`` reads only their count, so it gets
    zeros and no norms (they would cost two more passes over G and X in the compiled backward),
    anchored to the backward (:func:`_gradient_anchor`)."""
    if settings.estimator == "uniform":
        zeros = _insert(graph, like, aten.full.default, [count], 0.0, dtype=torch.float32,
                        device=grad_out.meta["val"].device)
        return _insert(graph, like, aten.add.Tensor, zeros, _gradient_anchor(graph, like, grad_out, torch.float32))
    return _insert(graph, like, aten.mul.Tensor, *score_factors())


def _with_mean_term(graph, like, grad_rows, input_rows, means):
    """The sampled rows (images) with the input centred and the exact ``(Σ_t g_t)·x̄ᵀ`` appended as
    one more row (image) of the same product; unchanged without centring."""
    if means is None:
        return grad_rows, input_rows
    input_mean, grad_sum = means
    centred = _insert(graph, like, aten.sub.Tensor, input_rows, input_mean)
    return (_insert(graph, like, aten.cat.default, [grad_rows, grad_sum]),
            _insert(graph, like, aten.cat.default, [centred, input_mean]))


def _sampled_rows(graph, like, scores, k, settings, dtype):
    """(indices, 1/π in ``dtype``) of ``k`` sampled positions, from the effcompile::sample_indices op."""
    from . import estimators  # noqa: F401  (registers effcompile::sample_indices)

    sample = _insert(graph, like, torch.ops.effcompile.sample_indices.default, scores, k,
                     settings.estimator, settings.uniform_mix, like.name)  # one draw per GEMM: see the op
    indices = _insert(graph, like, operator.getitem, sample, 0)
    scale = _insert(graph, like, operator.getitem, sample, 1)
    return indices, _insert(graph, like, prims.convert_element_type.default, scale, dtype)


def _sample_size(graph, like, sized: torch.fx.Node, dim: int, keep: float, multiple: int) -> Tuple[Any, Any, str]:
    """(k, n, why) for sampling dimension ``dim`` of ``sized``.

    A static size gives ``k = round_budget(n, keep, multiple)``, or ``k = None`` with the reason when
    the budget rounds up to every index (the exact GEMM stays).  A symbolic size (Dynamo made the
    batch dynamic after a batch-size change, or ``dynamic=True``) gives graph nodes computing
    ``k = ⌈keep·n⌉`` from the size at run time, so one compiled graph keeps sampling at every
    batch size: ``1 ≤ k ≤ n`` for ``0 < keep < 1`` without min/max, and no rounding to
    ``multiple`` (a rounded-up k could exceed a small n).
    """
    from .estimators import round_budget

    n = sized.meta["val"].shape[dim]
    if isinstance(n, int):
        k = round_budget(n, keep, multiple)
        if k >= n:
            return None, n, f"k = round_budget({n}, keep={keep:g}, multiple={multiple}) = {k} keeps every index"
        return k, n, ""
    numerator, denominator = fractions.Fraction(keep).as_integer_ratio()
    size = _insert(graph, like, aten.sym_size.int, sized, dim)
    scaled = _insert(graph, like, operator.add, _insert(graph, like, operator.mul, size, numerator), denominator - 1)
    return _insert(graph, like, operator.floordiv, scaled, denominator), size, ""


def _replace(graph: torch.fx.Graph, old: torch.fx.Node, new: torch.fx.Node) -> None:
    old.replace_all_uses_with(new)
    graph.erase_node(old)


@dataclasses.dataclass(frozen=True)
class _InputStatistics:
    """What the estimators read from the layer input X alone: the column mean ``x̄`` (centring) and
    the rows' norms ``‖x_t − x̄‖`` (``‖x_t‖`` uncentred; importance scores).  ``None``: not needed."""

    mean: Optional[torch.fx.Node]
    row_norms: Optional[torch.fx.Node]


def _input_statistics(graph, like, layer_input, settings: LayerSketch) -> _InputStatistics:
    mean = _batch_reduction(graph, like, aten.mean.dim, layer_input) if settings.center else None
    norms = None
    if settings.estimator == "importance":  # per row (linear) or per image (convolution)
        norms = _per_image_norms(graph, like, _centred(graph, like, layer_input, mean))
    return _InputStatistics(mean, norms)


def _forward_input_statistics(graph, product: torch.fx.Node, layer_input, settings: LayerSketch,
                              forward: set) -> _InputStatistics:
    """The input statistics computed in the forward, right after the product ``Y = X·B`` (or the
    convolution ``Y = X ⋆ W``) that reads X.

    Why the forward: left in the backward, they need X there in full; the partitioner saves only the
    cheap producer of X (GELU's input, LayerNorm's) and recomputes X for each pass over it — for
    ``fc2`` that is GELU's ``erf`` over every row twice a step, more than the sampled GEMM saves
    (measured on the ViT: 3.8 ms a block against 0.3 ms for one GELU).  Why after the product:
    Inductor lowers nodes in order, and the product (an extern GEMM) makes it write X to memory
    first; statistics lowered before it would be fused with X's producer and recompute it per pass.

    The partitioner only keeps in the forward what a forward output needs, so the statistics are
    anchored to the product's forward users: they read ``Y + z``, with ``z`` a zero computed from
    the statistics' first zero entries (no data read; Inductor fuses the add into Y's consumer).
    The partitioner then saves the statistics (K + M values) for the backward.
    """
    with graph.inserting_before(product.next):  # in order after the product (inserting_after reverses)
        statistics = _input_statistics(graph, product, layer_input, settings)
        present = [node for node in (statistics.mean, statistics.row_norms) if node is not None]
        consumers = [user for user in product.users if user in forward]
        if not present or not consumers:
            return statistics
        anchored = _insert(graph, product, aten.add.Tensor, product,
                           _zero_of(graph, product, present, product.meta["val"].dtype))
    anchored.meta[_ANCHORED_FROM] = product
    for user in consumers:
        user.replace_input_with(product, anchored)
    return statistics


# Meta key of an anchored output ``Y + z``: the GEMM output Y it stands for.  The forward reads the
# anchored node, the backward still reads Y: a layer fed directly by another layer's output (a
# low-rank pair, two chained projections) finds its backward GEMMs through this.
_ANCHORED_FROM = "effcompile_anchored_from"


def _backward_value(node: Any) -> Any:
    """What the backward reads for a forward value (the GEMM output behind an anchored ``Y + z``)."""
    return node.meta.get(_ANCHORED_FROM, node) if isinstance(node, torch.fx.Node) else node


def _statistics_for(graph, gradient_node, layer_input, settings: LayerSketch, product: Optional[torch.fx.Node],
                    forward: Optional[set]) -> _InputStatistics:
    """The input statistics of a sampled weight gradient: in the forward after ``product`` when there is
    one, else in the backward before ``gradient_node`` (rows the row-sparse backward selected, or no
    forward product found)."""
    if product is not None:
        return _forward_input_statistics(graph, product, layer_input, settings, forward)
    with graph.inserting_before(gradient_node):
        return _input_statistics(graph, gradient_node, layer_input, settings)


def _zero_of(graph, like, nodes, dtype):
    """A 0-dim zero in ``dtype`` that depends on every node of ``nodes`` and reads none of their data
    (the sum of each one's empty slice ``node[0:0]``): the anchor that places a computation for the
    partitioner (:func:`_gradient_anchor`, :func:`_forward_input_statistics`)."""
    zero = None
    for node in nodes:
        empty_sum = _insert(graph, like, aten.sum.default, _insert(graph, like, aten.slice.Tensor, node, 0, 0, 0))
        zero = empty_sum if zero is None else _insert(graph, like, aten.add.Tensor, zero, empty_sum)
    return _insert(graph, like, prims.convert_element_type.default, zero, dtype)


def _rewrite_grad_weight(graph, mm, grad_out, layer_input, settings: LayerSketch, in_out: bool = False,
                         product: Optional[torch.fx.Node] = None,
                         forward: Optional[set] = None) -> Tuple[Optional[RewriteRecord], Any, Optional[int]]:
    """(the record, or None with the reason when the exact GEMM stays; the node that now computes
    grad_W; the number of rows it used when static).

    ``in_out``: the exact GEMM is ``mm(t(X), G)`` (K×N: a weight stored in×out, ``X @ W``, or the
    gradient of ``t(W)`` in ``X @ W.t()``), and the estimate keeps that orientation.
    ``product``: the forward GEMM that reads ``layer_input`` when the backward samples the same rows
    (not rows the row-sparse backward selected): the input statistics are then computed in the forward.
    """
    before = _describe(mm)
    with graph.inserting_before(mm):
        k, rows, why = _sample_size(graph, mm, layer_input, 0, settings.keep, settings.multiple)
        if k is None:
            return _Exact(why), mm, _static(rows)
    statistics = _statistics_for(graph, mm, layer_input, settings, product, forward)
    with graph.inserting_before(mm):
        if settings.estimator == "sketch":
            val = grad_out.meta["val"]
            # Rademacher S/√k (E[S·Sᵀ] = I): lower variance than Gaussian, and the eager path's design.
            signs = _insert(graph, mm, aten.add.Tensor, _insert(
                graph, mm, torch.ops.effcompile.rademacher.default, rows, k, val.dtype, val.device, mm.name),
                _gradient_anchor(graph, mm, grad_out, val.dtype))  # one draw, in the backward
            if isinstance(k, int):
                sketch_matrix = _insert(graph, mm, aten.mul.Tensor, signs, 1.0 / math.sqrt(k))
            else:  # 1/√k of a size known at run time only
                inverse_root = _insert(graph, mm, aten.rsqrt.default, _insert(
                    graph, mm, aten.scalar_tensor.default, k, dtype=val.dtype, device=val.device))
                sketch_matrix = _insert(graph, mm, aten.mul.Tensor, signs, inverse_root)
            # Sᵀ·X (k×K) and Gᵀ·S (N×k), or (SᵀX)ᵀ and SᵀG when the GEMM is K×N.
            input_side = _insert(graph, mm, aten.mm.default, _transpose(graph, mm, sketch_matrix), layer_input)
            if settings.center:  # Sᵀ(X − 1x̄) = SᵀX − (Sᵀ1)·x̄: no centred copy of X
                input_mean, grad_sum = statistics.mean, _batch_reduction(graph, mm, aten.sum.dim_IntList, grad_out)
                sketch_sum = _insert(graph, mm, aten.sum.dim_IntList, sketch_matrix, [0], True)
                input_side = _insert(graph, mm, aten.sub.Tensor, input_side, _insert(
                    graph, mm, aten.mul.Tensor, _transpose(graph, mm, sketch_sum), input_mean))
            if in_out:
                left = _transpose(graph, mm, input_side)
                right = _insert(graph, mm, aten.mm.default, _transpose(graph, mm, sketch_matrix), grad_out)
            else:
                left = _insert(graph, mm, aten.mm.default, _transpose(graph, mm, grad_out), sketch_matrix)
                right = input_side
            if settings.center:  # plus the exact (Σ_t g_t)·x̄ᵀ, in the GEMM's orientation
                mean_term = (_insert(graph, mm, aten.mm.default, _transpose(graph, mm, input_mean), grad_sum) if in_out
                             else _insert(graph, mm, aten.mm.default, _transpose(graph, mm, grad_sum), input_mean))
                new = _insert(graph, mm, aten.addmm.default, mean_term, left, right)
            else:
                new = _insert(graph, mm, aten.mm.default, left, right)
        else:
            means = (statistics.mean, _batch_reduction(graph, mm, aten.sum.dim_IntList, grad_out)) \
                if settings.center else None
            scores = _sampling_scores(graph, mm, grad_out, rows, settings, lambda: (
                _norms(graph, mm, grad_out, [1]), statistics.row_norms))
            indices, scale = _sampled_rows(graph, mm, scores, k, settings, grad_out.meta["val"].dtype)
            scale = _insert(graph, mm, aten.unsqueeze.default, scale, 1)
            grad_rows, input_rows = _with_mean_term(
                graph, mm, _insert(graph, mm, aten.mul.Tensor, _gather(graph, mm, grad_out, 0, indices), scale),
                _gather(graph, mm, layer_input, 0, indices), means)
            if in_out:
                new = _insert(graph, mm, aten.mm.default, _transpose(graph, mm, input_rows), grad_rows)
            else:
                new = _insert(graph, mm, aten.mm.default, _transpose(graph, mm, grad_rows), input_rows)
    _replace(graph, mm, new)
    return RewriteRecord(settings.layer, "grad_weight", "rows", _size_text(rows), _size_text(k), settings.estimator,
                         before, _describe(new)), new, _static(k)


def _insert_statistics(graph, marker: torch.fx.Node, grad_weight: torch.fx.Node, current_k: int, grad_out,
                       layer_input, settings: LayerSketch) -> bool:
    """Fill the statistics slot of an adaptive layer with ``effcompile::sketch_statistics``.

    The slot is the gradient of the layer's statistics tensor (a forward input), so the
    statistics leave the compiled backward like any other gradient, with no host sync.
    """
    from .estimators import round_budget

    statistics = marker.args[1]
    rows = _static(layer_input.meta["val"].shape[0])
    slots = [u for u in statistics.users if u.target is _slot_op()] if isinstance(statistics, torch.fx.Node) else []
    if not slots or rows is None:
        return False
    ks = [round_budget(rows, keep, settings.multiple) for keep in settings.ladder]
    order = {node: i for i, node in enumerate(graph.nodes)}
    for slot in slots:
        first_user = min(slot.users, key=order.__getitem__)
        with graph.inserting_before(first_user):
            values = _insert(graph, grad_weight, torch.ops.effcompile.sketch_statistics.default, grad_out, layer_input,
                             grad_weight, ks, current_k, settings.estimator, settings.uniform_mix, settings.center)
        _replace(graph, slot, values)
    return True


def _rewrite_grad_input(graph, mm, grad_out, weight_t, settings: LayerSketch) -> Any:
    before = _describe(mm)
    with graph.inserting_before(mm):
        k, features, why = _sample_size(graph, mm, grad_out, 1, settings.keep_input, settings.multiple)
        if k is None:
            return _Exact(why)
        scores = _sampling_scores(graph, mm, grad_out, features, settings, lambda: (
            _norms(graph, mm, grad_out, [0]), _norms(graph, mm, weight_t, [1])))
        indices, scale = _sampled_rows(graph, mm, scores, k, settings, grad_out.meta["val"].dtype)
        grad_columns = _insert(graph, mm, aten.mul.Tensor, _gather(graph, mm, grad_out, 1, indices), scale)
        weight_rows = _gather(graph, mm, weight_t, 0, indices)
        new = _insert(graph, mm, aten.mm.default, grad_columns, weight_rows)
    _replace(graph, mm, new)
    return RewriteRecord(settings.layer, "grad_input", "output features", _size_text(features), _size_text(k),
                         settings.estimator, before, _describe(new))


def _per_image_norms(graph, like, tensor):
    return _norms(graph, like, tensor, range(1, tensor.meta["val"].dim()))


def _rewrite_conv_grad_weight(graph, backward: torch.fx.Node, settings: LayerSketch, product: Optional[torch.fx.Node],
                              forward: set) -> Optional[RewriteRecord]:
    """Split ``convolution_backward`` so the weight gradient comes from ``k`` sampled images.

    ``∇W = Σ_b ∇W(g_b, x_b)`` is a sum over images; the sampled call gathers ``k`` of them, scales
    each image's gradient by ``1/π_b`` (∇W is linear in g) and asks only for the weight gradient.
    ``product``: the forward convolution of the same input, after which the input statistics are
    computed (:func:`_forward_input_statistics`); None: in the backward.
    """
    grad_out, layer_input, weight = backward.args[:3]
    conv_args, output_mask = list(backward.args[3:10]), list(backward.args[10])
    if not output_mask[1] or settings.estimator == "sketch":  # the Plan keeps conv layers exact under "sketch"
        return None
    before = _describe_multi(backward)
    with graph.inserting_before(backward):
        k, images, why = _sample_size(graph, backward, layer_input, 0, settings.keep, settings.multiple)
        if k is None:
            return _Exact(why)
        rest = _insert(graph, backward, aten.convolution_backward.default, grad_out, layer_input, weight, *conv_args,
                       [output_mask[0], False, output_mask[2]])
    statistics = _statistics_for(graph, backward, layer_input, settings, product, forward)
    with graph.inserting_before(backward):
        means = (statistics.mean, _batch_reduction(graph, backward, aten.sum.dim_IntList, grad_out)) \
            if settings.center else None
        scores = _sampling_scores(graph, backward, grad_out, images, settings, lambda: (
            _per_image_norms(graph, backward, grad_out), statistics.row_norms))
        indices, scale = _sampled_rows(graph, backward, scores, k, settings, grad_out.meta["val"].dtype)
        scale = _insert(graph, backward, aten.view.default, scale, [k] + [1] * (grad_out.meta["val"].dim() - 1))
        # ∇W is bilinear: with centring the mean pair ∇W(Σ_b g_b, x̄) joins the call as image k+1.
        grad_images, input_images = _with_mean_term(
            graph, backward, _insert(graph, backward, aten.mul.Tensor, _gather(graph, backward, grad_out, 0, indices),
                                     scale), _gather(graph, backward, layer_input, 0, indices), means)
        sampled = _insert(graph, backward, aten.convolution_backward.default, grad_images, input_images, weight,
                          *conv_args, [False, True, False])
    for user in list(backward.users):
        source = sampled if user.args[1] == 1 else rest
        user.replace_input_with(backward, source)
        user.meta["val"] = source.meta["val"][user.args[1]]
    graph.erase_node(backward)
    after = _describe_multi(sampled)
    return RewriteRecord(settings.layer, "grad_weight", "images", _size_text(images), _size_text(k),
                         settings.estimator, before, after)


def _describe_multi(node: torch.fx.Node) -> str:
    args = ", ".join(getattr(a, "name", repr(a)) for a in node.args[:3])
    return f"{node.name} = {getattr(node.target, '__name__', node.target)}({args}, ...)"


_CASTS = (prims.convert_element_type.default, aten._to_copy.default)


def _weight_views(marker: torch.fx.Node) -> List[torch.fx.Node]:
    """The marker and every cast of it (autocast runs a layer on ``convert_element_type(W, bf16)``)."""
    views, frontier = [marker], [marker]
    while frontier:
        casts = [u for node in frontier for u in node.users if u.op == "call_function" and u.target in _CASTS]
        views += casts
        frontier = casts
    return views


def forward_nodes(graph: torch.fx.Graph) -> set:
    """The joint graph's nodes that do not depend on a tangent: the forward.

    Backward GEMMs have the forward's shapes too (``grad_X = mm(G, W)`` looks like a forward
    ``mm(X, W)``), so the matchers check which side of the joint graph a product is on.  Nodes
    inserted later are in neither set and never match as forward.
    """
    backward: set = set()
    for node in graph.nodes:
        if _is_tangent(node) or any(a in backward for a in node.all_input_nodes):
            backward.add(node)
    return {node for node in graph.nodes if node not in backward}


def _direct_matmuls(weight: torch.fx.Node, forward: set) -> List[torch.fx.Node]:
    """Forward ``addmm(b, X, B)`` / ``mm(X, B)`` nodes with ``weight`` as their B operand."""
    return [user for user in weight.users if user in forward
            and ((user.target is aten.addmm.default and user.args[2] is weight)
                 or (user.target is aten.mm.default and user.args[1] is weight))]


def _is_row_gather(node: Any, source: torch.fx.Node) -> bool:
    """``source[idx]`` along rows, as the row-sparse backward gathers a saved input (selected samples)."""
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.index.Tensor
            and node.args[0] is source and len(node.args[1]) == 1 and node.args[1][0] is not None)


def _weight_gradient_mms(layer_input: torch.fx.Node, sources: Optional[set]) -> List[Tuple[torch.fx.Node, torch.fx.Node, bool]]:
    """Weight-gradient GEMMs of the layer input X (or of its rows gathered by the row-sparse backward),
    as ``(mm, rows, transposed)``: ``mm(t(G), X)`` (``transposed=False``: N×K, nn.Linear's layout) or
    ``mm(t(X), G)`` (``True``: K×N, e.g. ``X @ W`` with W in×out, or ``X @ W.t()``).

    ``sources``, when known, are the backward nodes the weight's own gradient is computed from:
    a GEMM of another layer fed by the same X (q/k/v projections of one input) never matches.
    """
    inputs = [layer_input] + [u for u in layer_input.users if _is_row_gather(u, layer_input)]
    found = []
    for rows in inputs:
        for user in rows.users:
            if user.target is aten.mm.default and user.args[1] is rows and _is_transpose(user.args[0]):
                found.append((user, rows, False))
            elif _is_transpose(user):
                found += [(mm, rows, True) for mm in user.users if mm.target is aten.mm.default and mm.args[0] is user]
                # The row-sparse backward gathers the selected rows of t(X) as its columns: t(X)[:, idx].
                for gathered in [u for u in user.users if _is_column_gather(u, user)]:
                    for mm in [u for u in gathered.users if u.target is aten.mm.default and u.args[0] is gathered]:
                        if sources is None or mm in sources:
                            with mm.graph.inserting_before(mm):  # X[idx] (k×K), the rows the sketch samples
                                selected = _transpose(mm.graph, gathered, gathered)
                            found.append((mm, selected, True))
    return [item for item in found if sources is None or item[0] in sources]


def _is_column_gather(node: Any, source: torch.fx.Node) -> bool:
    """``source[:, idx]``: the row-sparse backward's gather of a transposed input's rows."""
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.index.Tensor
            and node.args[0] is source and len(node.args[1]) == 2 and node.args[1][0] is None
            and node.args[1][1] is not None)


def _gradient_sources(marker: torch.fx.Node, forward: set) -> Optional[set]:
    """The backward nodes the gradients of the weight's primals are computed from (None: unknown).

    The marked weight is a primal, or is computed from primals in the forward (decorrelation's
    ``W·R``); AOT's joint graph returns one gradient per primal after the forward outputs.
    """
    graph = marker.graph
    primals = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
    outputs = next((n for n in graph.nodes if n.op == "output"), None)
    flat = outputs.args[0] if outputs is not None and outputs.args else ()
    if not primals or not isinstance(flat, (list, tuple)) or len(flat) < len(primals):
        return None
    ancestors, stack = set(), [marker.args[0]]
    while stack:
        node = stack.pop()
        if node not in ancestors:
            ancestors.add(node)
            stack += node.all_input_nodes
    gradients = [flat[len(flat) - len(primals) + i] for i, primal in enumerate(primals) if primal in ancestors]
    sources, stack = set(), [g for g in gradients if isinstance(g, torch.fx.Node)]
    while stack:
        node = stack.pop()
        if node not in sources and node not in forward:
            sources.add(node)
            stack += node.all_input_nodes
    return sources


def _weight_operands(marker: torch.fx.Node, forward: set) -> List[torch.fx.Node]:
    """The marked weight up to forward casts and transposes, in any order (autocast casts ``W`` or
    ``t(W)``; ``X @ W.t()`` and nn.Linear read ``t(W)``, ``X @ W`` reads ``W``)."""
    operands, frontier = [marker], [marker]
    while frontier:
        frontier = [user for node in frontier for user in node.users if user in forward and user not in operands
                    and user.op == "call_function" and (user.target in _CASTS or _is_transpose(user))]
        operands += frontier
    return operands


def _dense_products(marker: torch.fx.Node, forward: set) -> List[Tuple[torch.fx.Node, torch.fx.Node]]:
    """``(forward GEMM, its weight operand B)`` for every ``mm(X, B)`` / ``addmm(b, X, B)`` with B one
    of the weight's operands (``t(W)``: nn.Linear, ``X @ W.t()``; ``W``: ``X @ W``, GPT-2's Conv1D)."""
    return [(product, operand) for operand in _weight_operands(marker, forward)
            for product in _direct_matmuls(operand, forward)]


def _rewrite_dense(graph: torch.fx.Graph, marker: torch.fx.Node, settings: LayerSketch, forward: set) -> List[Any]:
    """The backward GEMMs of every dense product of the marked weight, in either layout.

    Every matching GEMM is found before any is rewritten: a rewrite inserts ``t(X)`` products of
    its own, which must not be matched again.
    """
    sources = _gradient_sources(marker, forward)
    grad_weight_mms, grad_input_mms = [], []
    for product, operand in _dense_products(marker, forward):
        layer_input = _backward_value(product.args[1] if product.target is aten.addmm.default else product.args[0])
        if settings.keep < 1 or settings.ladder:
            grad_weight_mms += [(mm, rows, transposed, product if rows is layer_input else None)
                                for mm, rows, transposed in _weight_gradient_mms(layer_input, sources)]
        if settings.keep_input < 1:  # grad_X = mm(G, t(B)): t(B) is the N×K operand
            grad_input_mms += [(mm, back) for back in operand.users if _is_transpose(back) for mm in back.users
                               if mm.target is aten.mm.default and mm.args[1] is back and mm not in forward]
    outcomes: List[Any] = []
    for mm, rows, transposed, product in _first_per_gemm(grad_weight_mms):
        grad_out = mm.args[1] if transposed else mm.args[0].args[0]
        outcome, grad_weight, rows_used = _rewrite_grad_weight(graph, mm, grad_out, rows, settings, in_out=transposed,
                                                               product=product, forward=forward)
        outcomes.append(outcome)
        if settings.ladder:
            if transposed:  # the statistics read grad_W as N×K
                with graph.inserting_after(grad_weight):
                    grad_weight = _transpose(graph, grad_weight, grad_weight)
            _insert_statistics(graph, marker, grad_weight, rows_used, grad_out, rows, settings)
    for mm, back in dict.fromkeys(grad_input_mms):
        outcomes.append(_rewrite_grad_input(graph, mm, mm.args[0], back, settings))
    return outcomes


def _first_per_gemm(matches: List[tuple]) -> List[tuple]:
    """One match per backward GEMM (a weight used by two products can find the same GEMM twice)."""
    seen: dict = {}
    for match in matches:
        seen.setdefault(match[0], match)
    return list(seen.values())


def _rewrite_layer(graph: torch.fx.Graph, marker: torch.fx.Node, settings: LayerSketch, forward: set) -> List[Any]:
    """Every outcome for the marked layer: a RewriteRecord per sampled GEMM, an _Exact per GEMM whose
    budget keeps every index."""
    outcomes: List[Any] = []
    views = _weight_views(marker)
    if settings.keep < 1:
        for backward in [u for view in views for u in view.users
                         if u.target is aten.convolution_backward.default and u.args[2] is view]:
            products = [u for view in views for u in view.users if u in forward and
                        u.target is aten.convolution.default and u.args[1] is backward.args[2]
                        and _backward_value(u.args[0]) is backward.args[1]]
            outcome = _rewrite_conv_grad_weight(graph, backward, settings, products[0] if products else None, forward)
            outcomes += [outcome] if outcome else []
    outcomes += _rewrite_dense(graph, marker, settings, forward)
    _verify(marker, settings, outcomes)
    return [outcome for outcome in outcomes if isinstance(outcome, RewriteRecord)]


def _gets_gradient(weight: torch.fx.Node) -> bool:
    """Whether the joint graph returns a gradient for this primal (a frozen weight has none).

    AOT's joint graph returns ``[*forward outputs, *one gradient or None per primal]``; a weight
    that is not a primal placeholder is assumed to need its gradient.
    """
    graph = weight.graph
    primals = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
    outputs = next((n for n in graph.nodes if n.op == "output"), None)
    flat = outputs.args[0] if outputs is not None and outputs.args else ()
    if weight not in primals or not isinstance(flat, (list, tuple)) or len(flat) < len(primals):
        return True
    return flat[len(flat) - len(primals) + primals.index(weight)] is not None


class MissingRewriteError(RuntimeError):
    """A layer the Plan sketches has no backward GEMM this pass could rewrite in the compiled graph."""


def _verify(marker: torch.fx.Node, settings: LayerSketch, outcomes: List[Any]) -> None:
    """Never silently exact: a trainable weight whose Plan samples ``grad_weight`` must have had its
    weight-gradient GEMM rewritten, or provably stay exact because the budget keeps every index
    (warned).  (``grad_input`` exists only where the layer input needs a gradient, so it is reported
    by the records but not required.)"""
    trainable = _gets_gradient(marker.args[0])
    exact = sorted({outcome.reason for outcome in outcomes if isinstance(outcome, _Exact)})
    if exact:
        warnings.warn(f"effcompile randomized_vjp: layer {settings.layer!r} stays exact in this compiled graph: "
                      f"{'; '.join(exact)}", stacklevel=2)
    sampled = {outcome.gemm for outcome in outcomes if isinstance(outcome, RewriteRecord)}
    if trainable and settings.keep < 1 and "grad_weight" not in sampled and not exact:
        raise MissingRewriteError(
            f"effcompile randomized_vjp: layer {settings.layer!r} is planned to sample its grad_weight GEMM but the "
            "compiled joint graph has no matching backward GEMM, so it would silently train with exact gradients. "
            "Exclude it with RandomizedVJP(exclude=(...)) or report the graph pattern.")


def rewrite_joint_graph(graph: torch.fx.Graph) -> List[RewriteRecord]:
    """Rewrite every marked layer's backward GEMMs; remove the markers. Idempotent."""
    records: List[RewriteRecord] = []
    forward = forward_nodes(graph)
    for marker in [n for n in graph.nodes if n.op == "call_function" and n.target is MARKER]:
        *fields, ladder, center = marker.args[2:]
        settings = LayerSketch(*fields, tuple(ladder), center)
        records += _rewrite_layer(graph, marker, settings, forward)
        marker.replace_all_uses_with(marker.args[0])
        graph.erase_node(marker)
    graph.eliminate_dead_code()
    graph.lint()
    return records


def _sources() -> List[str]:
    from . import estimators

    return [__file__, estimators.__file__]


# Runs after the (exact) row-sparse backward, which may shrink the GEMMs this pass samples.
JOINT_PASS = register_joint_pass(RecordsJointPass("randomized_vjp", 20, rewrite_joint_graph, _sources()))


def inspect_backward(model: nn.Module, example_inputs: Any) -> List[RewriteRecord]:
    """Compile one training step of ``model`` (AOT joint graph, no Inductor) and return its rewrites.

    The backward never reaches ONNX; this is how ``effcompile inspect`` shows, per layer, which
    backward GEMM was sketched, along which dimension, with which k, and the nodes before/after.
    Parameters are left untouched (gradients are computed and discarded).
    """
    from effcompile.inputs import call, tensor_leaves
    from effcompile.passes.joint import recording

    was_training = model.training
    model.train()
    try:
        torch.compiler.reset()
        compiled = torch.compile(model, backend="effcompile_aot_eager")
        parameters = [p for p in model.parameters() if p.requires_grad]
        with recording() as log:
            output = tensor_leaves(call(compiled, example_inputs))[0]  # any batch form, any output type
            torch.autograd.grad(output.float().sum(), parameters, allow_unused=True)
        return [record for results in log for record in results[JOINT_PASS.name].records]
    finally:
        torch.compiler.reset()
        model.train(was_training)


