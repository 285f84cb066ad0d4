"""Randomized VJP pass: replace backward GEMMs by sparse, unbiased, structured estimates.

Linear layer ``Y = X·Wᵀ + b`` (X: M×K rows = samples·tokens, G = ∂L/∂Y: M×N).  Joint graph
before (AOT autograd, the layer's backward nodes)::

    grad_W = mm(t(G), X)          # N×M · M×K
    grad_X = mm(G, t(t(W)))       # M×N · N×K

Joint graph after, target ``grad_weight`` (one shared index set over the M rows)::

    s      = ‖G_t‖·‖X_t‖                                   # row scores
    idx, c = effcompile::sample_indices(s, k, estimator)  # k static, c_t = 1/π_t
    grad_W = mm(t(G[idx] · c), X[idx])                     # a k/M-smaller dense GEMM

and target ``grad_input`` (one shared index set over the N output features)::

    idx, c = effcompile::sample_indices(‖G_{:,j}‖·‖W_j‖, k, estimator)
    grad_X = mm(G[:, idx] · c, W[idx])

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
autograd function ``effcompile.sketch.SketchedLinear``.

Adaptive mode (``adaptive=True``, linear layers): the owner gets a ``weight_vjp_state``
submodule (:class:`VarianceControl`) whose ``statistics`` buffer requires grad and is a second
input of the marker.  The marker's backward gives it the gradient slot
``effcompile::statistics_slot``, which the joint pass replaces by::

    stats = effcompile::sketch_statistics(G, X, grad_W, ks=[k(keep_r) for the ladder], current_k, ...)
            # [added variance at each ladder keep ..., SGD noise]  (float32, on the device)

so the statistics leave the backward as an ordinary gradient; a post-accumulate-grad hook folds
them into EMAs and, every ``adapt_every`` steps, picks the layer's keep (one host read).

Memory mode (``memory_mode=True``, nn.Linear layers): no marker; the owner's forward is the
autograd function ``effcompile.sketch.MemorySketchedLinear`` (eager and traced by Dynamo alike),
which samples the grad_weight rows in the forward and saves ``X[idx]`` instead of ``X``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from effcompile._compat import is_compiling
from effcompile.config import RandomizedVJP
from effcompile.plan import PlanRow

from .base import ModelPass, register_pass
from .capture import GraphCapture, LayerCandidate
from .graph_utils import insert_node as _insert, is_transpose as _is_transpose

__all__ = ["RandomizedVJPPass", "rewrite_joint_graph", "LAST_REWRITES",
           "VarianceControl", "MemoryModeState",
           "inspect_backward"]

aten = torch.ops.aten
prims = torch.ops.prims  # the joint graph is decomposed: casts are prims.convert_element_type


# ------------------------------------------------------------------------------------ marker op
@torch.library.custom_op("effcompile::vjp_marker", mutates_args=())
def _vjp_marker(weight: torch.Tensor, statistics: Optional[torch.Tensor], layer: str, keep: float, keep_input: float,
                estimator: str, uniform_mix: float, multiple: int, ladder: List[float]) -> torch.Tensor:
    raise RuntimeError(
        f"effcompile: layer {layer!r} has a RandomizedVJP rewrite that was not applied: compile the model with "
        "torch.compile(backend='effcompile') (or 'effcompile_aot_eager'), or train it eagerly")


@_vjp_marker.register_fake
def _(weight, statistics, layer, keep, keep_input, estimator, uniform_mix, multiple, ladder):
    return torch.empty_like(weight)


def _marker_setup(ctx, inputs, output):
    statistics, ctx.layer = inputs[1], inputs[2]
    ctx.has_statistics = statistics is not None
    ctx.save_for_backward(*([statistics] if ctx.has_statistics else []))


def _marker_backward(ctx, grad):
    # The statistics tensor's gradient is a slot the joint pass fills with the layer's
    # on-device variance statistics (effcompile::sketch_statistics).
    from effcompile import sketch  # noqa: F401  (registers effcompile::statistics_slot)

    slot = torch.ops.effcompile.statistics_slot(ctx.saved_tensors[0], ctx.layer) if ctx.has_statistics else None
    return grad, slot, None, None, None, None, None, None, None


_vjp_marker.register_autograd(_marker_backward, setup_context=_marker_setup)
MARKER = torch.ops.effcompile.vjp_marker.default


def _slot_op():
    from effcompile import sketch  # noqa: F401  (registers the op)

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

    def marker_args(self) -> tuple:
        return (self.layer, self.keep, self.keep_input, self.estimator, self.uniform_mix, self.multiple,
                list(self.ladder))


def _settings(config: RandomizedVJP, layer: str, device: torch.device, adaptive: bool = False) -> LayerSketch:
    multiple = config.multiple or (64 if device.type == "cuda" else 8)
    keep = config.keep if config.target in ("grad_weight", "both") else 1.0
    keep_input = config.input_keep if config.target in ("grad_input", "both") else 1.0
    ladder = config.keep_ladder if adaptive else ()
    if adaptive:  # start on the ladder rung nearest to ``keep`` (log scale)
        keep = min(ladder, key=lambda rung: abs(math.log(rung / config.keep)))
    return LayerSketch(layer, float(keep), float(keep_input), config.estimator, float(config.uniform_mix), int(multiple),
                       tuple(float(rung) for rung in ladder))


# ------------------------------------------------------------------------------------ joint pass
@dataclasses.dataclass
class RewriteRecord:
    """One rewritten backward GEMM, for reports and ``effcompile inspect``."""

    layer: str
    gemm: str  # "grad_weight" | "grad_input"
    sampled_dim: str  # "rows" (M) | "output features" (N) | "images" (convolution batch)
    n: int
    k: int
    estimator: str
    before: str
    after: str


LAST_REWRITES: List[RewriteRecord] = []  # of the most recent joint graph this process rewrote


def _static(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, int) else None


def _describe(node: torch.fx.Node) -> str:
    args = ", ".join(getattr(a, "name", repr(a)) for a in node.args)
    shape = "x".join(str(s) for s in node.meta["val"].shape)
    return f"{node.name} = {getattr(node.target, '__name__', node.target)}({args}) : {shape}"


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


def _sampled_rows(graph, like, scores, k, settings, dtype):
    """(indices, 1/π in ``dtype``) of ``k`` sampled positions, from the effcompile::sample_indices op."""
    from effcompile import sketch  # noqa: F401  (registers effcompile::sample_indices)

    sample = _insert(graph, like, torch.ops.effcompile.sample_indices.default, scores, k,
                     settings.estimator, settings.uniform_mix)
    indices = _insert(graph, like, operator.getitem, sample, 0)
    scale = _insert(graph, like, operator.getitem, sample, 1)
    return indices, _insert(graph, like, prims.convert_element_type.default, scale, dtype)


def _sample_size(size: Any, keep: float, multiple: int) -> Optional[int]:
    """Static k for a GEMM dimension of ``size``, or None when the exact GEMM stays (k ≥ n, symbolic n)."""
    from effcompile.sketch import round_budget

    n = _static(size)
    if n is None:
        return None
    k = round_budget(n, keep, multiple)
    return k if k < n else None


def _replace(graph: torch.fx.Graph, old: torch.fx.Node, new: torch.fx.Node) -> None:
    old.replace_all_uses_with(new)
    graph.erase_node(old)


def _rewrite_grad_weight(graph, mm, grad_out, layer_input,
                         settings: LayerSketch) -> Tuple[Optional[RewriteRecord], Any, Optional[int]]:
    """(the record or None when the exact GEMM stays, the node that now computes grad_W, rows it used)."""
    rows = layer_input.meta["val"].shape[0]
    k = _sample_size(rows, settings.keep, settings.multiple)
    if k is None:
        return None, mm, _static(rows)
    before = _describe(mm)
    with graph.inserting_before(mm):
        if settings.estimator == "sketch":
            val = grad_out.meta["val"]
            # Rademacher S/√k (E[S·Sᵀ] = I): lower variance than Gaussian, and the eager path's design.
            gaussian = _insert(graph, mm, aten.randn.default, [rows, k], dtype=val.dtype, device=val.device)
            sketch_matrix = _insert(graph, mm, aten.mul.Tensor, _insert(graph, mm, aten.sign.default, gaussian),
                                    1.0 / math.sqrt(k))
            left = _insert(graph, mm, aten.mm.default, _transpose(graph, mm, grad_out), sketch_matrix)
            right = _insert(graph, mm, aten.mm.default, _transpose(graph, mm, sketch_matrix), layer_input)
            new = _insert(graph, mm, aten.mm.default, left, right)
        else:
            scores = _insert(graph, mm, aten.mul.Tensor, _norms(graph, mm, grad_out, [1]), _norms(graph, mm, layer_input, [1]))
            indices, scale = _sampled_rows(graph, mm, scores, k, settings, grad_out.meta["val"].dtype)
            scale = _insert(graph, mm, aten.unsqueeze.default, scale, 1)
            grad_rows = _insert(graph, mm, aten.mul.Tensor, _gather(graph, mm, grad_out, 0, indices), scale)
            input_rows = _gather(graph, mm, layer_input, 0, indices)
            new = _insert(graph, mm, aten.mm.default, _transpose(graph, mm, grad_rows), input_rows)
    _replace(graph, mm, new)
    return RewriteRecord(settings.layer, "grad_weight", "rows", rows, k, settings.estimator, before, _describe(new)), new, k


def _insert_statistics(graph, marker: torch.fx.Node, grad_weight: torch.fx.Node, current_k: int, grad_out,
                       layer_input, settings: LayerSketch) -> bool:
    """Fill the statistics slot of an adaptive layer with ``effcompile::sketch_statistics``.

    The slot is the gradient of the layer's statistics tensor (a forward input), so the
    statistics leave the compiled backward like any other gradient, with no host sync.
    """
    from effcompile.sketch import round_budget

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
                             grad_weight, ks, current_k, settings.estimator, settings.uniform_mix)
        _replace(graph, slot, values)
    return True


def _rewrite_grad_input(graph, mm, grad_out, weight_t, settings: LayerSketch) -> Optional[RewriteRecord]:
    features = grad_out.meta["val"].shape[1]
    k = _sample_size(features, settings.keep_input, settings.multiple)
    if k is None:
        return None
    before = _describe(mm)
    with graph.inserting_before(mm):
        scores = _insert(graph, mm, aten.mul.Tensor, _norms(graph, mm, grad_out, [0]), _norms(graph, mm, weight_t, [1]))
        indices, scale = _sampled_rows(graph, mm, scores, k, settings, grad_out.meta["val"].dtype)
        grad_columns = _insert(graph, mm, aten.mul.Tensor, _gather(graph, mm, grad_out, 1, indices), scale)
        weight_rows = _gather(graph, mm, weight_t, 0, indices)
        new = _insert(graph, mm, aten.mm.default, grad_columns, weight_rows)
    _replace(graph, mm, new)
    return RewriteRecord(settings.layer, "grad_input", "output features", features, k, settings.estimator, before,
                         _describe(new))


def _per_image_norms(graph, like, tensor):
    return _norms(graph, like, tensor, range(1, tensor.meta["val"].dim()))


def _rewrite_conv_grad_weight(graph, backward: torch.fx.Node, settings: LayerSketch) -> Optional[RewriteRecord]:
    """Split ``convolution_backward`` so the weight gradient comes from ``k`` sampled images.

    ``∇W = Σ_b ∇W(g_b, x_b)`` is a sum over images; the sampled call gathers ``k`` of them, scales
    each image's gradient by ``1/π_b`` (∇W is linear in g) and asks only for the weight gradient.
    """
    grad_out, layer_input, weight = backward.args[:3]
    conv_args, output_mask = list(backward.args[3:10]), list(backward.args[10])
    if not output_mask[1] or settings.estimator == "sketch":
        return None
    k = _sample_size(layer_input.meta["val"].shape[0], settings.keep, settings.multiple)
    if k is None:
        return None
    before = _describe_multi(backward)
    with graph.inserting_before(backward):
        rest = _insert(graph, backward, aten.convolution_backward.default, grad_out, layer_input, weight, *conv_args,
                       [output_mask[0], False, output_mask[2]])
        scores = _insert(graph, backward, aten.mul.Tensor, _per_image_norms(graph, backward, grad_out),
                         _per_image_norms(graph, backward, layer_input))
        indices, scale = _sampled_rows(graph, backward, scores, k, settings, grad_out.meta["val"].dtype)
        scale = _insert(graph, backward, aten.view.default, scale, [k] + [1] * (grad_out.meta["val"].dim() - 1))
        grad_images = _insert(graph, backward, aten.mul.Tensor, _gather(graph, backward, grad_out, 0, indices), scale)
        input_images = _gather(graph, backward, layer_input, 0, indices)
        sampled = _insert(graph, backward, aten.convolution_backward.default, grad_images, input_images, weight,
                          *conv_args, [False, True, False])
    for user in list(backward.users):
        source = sampled if user.args[1] == 1 else rest
        user.replace_input_with(backward, source)
        user.meta["val"] = source.meta["val"][user.args[1]]
    graph.erase_node(backward)
    after = _describe_multi(sampled)
    return RewriteRecord(settings.layer, "grad_weight", "images", int(layer_input.meta["val"].shape[0]), k,
                         settings.estimator, before, after)


def _describe_multi(node: torch.fx.Node) -> str:
    args = ", ".join(getattr(a, "name", repr(a)) for a in node.args[:3])
    return f"{node.name} = {getattr(node.target, '__name__', node.target)}({args}, ...)"


def _forward_matmuls(transposed_weight: torch.fx.Node) -> List[torch.fx.Node]:
    """Forward ``addmm(b, X, t(W))`` / ``mm(X, t(W))`` nodes that use the transposed weight."""
    return [user for user in transposed_weight.users
            if (user.target is aten.addmm.default and user.args[2] is transposed_weight)
            or (user.target is aten.mm.default and user.args[1] is transposed_weight)]


def _rewrite_layer(graph: torch.fx.Graph, marker: torch.fx.Node, settings: LayerSketch) -> List[RewriteRecord]:
    records = []
    if settings.keep < 1:
        for backward in [u for u in marker.users if u.target is aten.convolution_backward.default and u.args[2] is marker]:
            record = _rewrite_conv_grad_weight(graph, backward, settings)
            records += [record] if record else []
    for transposed in [u for u in marker.users if _is_transpose(u)]:
        for forward in _forward_matmuls(transposed):
            layer_input = forward.args[1] if forward.target is aten.addmm.default else forward.args[0]
            if settings.keep < 1 or settings.ladder:
                for mm in [u for u in layer_input.users if u.target is aten.mm.default and u.args[1] is layer_input
                           and _is_transpose(u.args[0])]:
                    grad_out = mm.args[0].args[0]
                    record, grad_weight, rows_used = _rewrite_grad_weight(graph, mm, grad_out, layer_input, settings)
                    records += [record] if record else []
                    if settings.ladder and rows_used is not None:
                        _insert_statistics(graph, marker, grad_weight, rows_used, grad_out, layer_input, settings)
            if settings.keep_input < 1:
                for back_t in [u for u in transposed.users if _is_transpose(u)]:
                    for mm in [u for u in back_t.users if u.target is aten.mm.default and u.args[1] is back_t]:
                        record = _rewrite_grad_input(graph, mm, mm.args[0], back_t, settings)
                        records += [record] if record else []
    return records


def rewrite_joint_graph(graph: torch.fx.Graph) -> List[RewriteRecord]:
    """Rewrite every marked layer's backward GEMMs; remove the markers. Idempotent."""
    records: List[RewriteRecord] = []
    for marker in [n for n in graph.nodes if n.op == "call_function" and n.target is MARKER]:
        *fields, ladder = marker.args[2:]
        settings = LayerSketch(*fields, tuple(ladder))
        records += _rewrite_layer(graph, marker, settings)
        marker.replace_all_uses_with(marker.args[0])
        graph.erase_node(marker)
    graph.eliminate_dead_code()
    graph.lint()
    LAST_REWRITES[:] = records
    return records


def inspect_backward(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> List[RewriteRecord]:
    """Compile one training step of ``model`` (AOT joint graph, no Inductor) and return its rewrites.

    The backward never reaches ONNX; this is how ``effcompile inspect`` shows, per layer, which
    backward GEMM was sketched, along which dimension, with which k, and the nodes before/after.
    Parameters are left untouched (gradients are computed and discarded).
    """
    was_training = model.training
    model.train()
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="effcompile_aot_eager")
        parameters = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(compiled(*example_inputs).float().sum(), parameters, allow_unused=True)
        return list(LAST_REWRITES)
    finally:
        torch._dynamo.reset()
        model.train(was_training)


# ------------------------------------------------------------------------------------ model level
class _GradientSlotState(nn.Module):
    """Per-layer run-time state fed from the backward through a gradient slot.

    ``slot`` is a buffer that requires grad (never an optimizer parameter): the backward writes
    this step's statistics as its gradient, and a post-accumulate-grad hook folds them into
    the EMA held in ``slot`` itself (``slot ← d·slot + (1−d)·grad`` on the device, the first
    step copies) and clears the gradient.  The hook runs after the compiled backward too, so
    the same state works eagerly and under torch.compile.  Buffers: ``state_dict`` checkpoints it.
    """

    slot_name = "slot"

    def __init__(self, settings: LayerSketch, slot: torch.Tensor, ema_decay: float) -> None:
        super().__init__()
        self.settings = settings
        self.ema_decay = float(ema_decay)
        self.register_buffer(self.slot_name, slot.requires_grad_())
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64, device=slot.device))
        self._hooked_steps = 0
        self._ensure_hook()

    @property
    def _slot(self) -> torch.Tensor:
        return self._buffers[self.slot_name]

    def _ensure_hook(self) -> None:
        slot = self._slot
        if not (slot.is_leaf and slot.requires_grad):  # e.g. after .to(device): make it a leaf again
            slot = self._buffers[self.slot_name] = slot.detach().requires_grad_()
        if not slot._post_accumulate_grad_hooks:
            slot.register_post_accumulate_grad_hook(self._fold)

    def _fold(self, slot: torch.Tensor) -> None:
        step, slot.grad = slot.grad, None
        if step is None:
            return
        with torch.no_grad():
            decay = torch.where(self.updates > 0, self.ema_decay, 0.0).to(slot.dtype)
            slot.mul_(decay).add_((1 - decay) * step.to(slot.dtype))
            self.updates.add_(1)
        self._hooked_steps += 1
        self._after_step()

    def _after_step(self) -> None:
        pass

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._ensure_hook()
        return result

    def __setstate__(self, state) -> None:  # deepcopy/pickle drop tensor hooks: re-register
        super().__setstate__(state)
        self._ensure_hook()


class VarianceControl(_GradientSlotState):
    """Adaptive keep of one linear weight's grad_weight rows (VCAS-style variance control).

    ``statistics`` (EMA, float32): entries ``r < R`` the added variance of the estimator at the
    ladder keep ``ladder[r]``, last entry the layer's SGD noise (:func:`effcompile.sketch.sketch_statistics`).
    Every ``adapt_every`` backward steps the keep becomes the smallest ladder keep whose added
    variance is at most ``variance_ratio`` × SGD noise (``max_keep`` when none is): one host read
    per adaptation.  The keep is a compile-time constant of the compiled step, so each change of
    some layer's keep recompiles once (Dynamo guards on it); at most one change per adaptation.
    """

    slot_name = "statistics"

    def __init__(self, settings: LayerSketch, config: RandomizedVJP, device: torch.device) -> None:
        slot = torch.zeros(len(settings.ladder) + 1, dtype=torch.float32, device=device)
        super().__init__(settings, slot, config.ema_decay)
        self.variance_ratio = float(config.variance_ratio)
        self.adapt_every = int(config.adapt_every)
        self.register_buffer("level", torch.tensor(settings.ladder.index(settings.keep), device=device))

    def _after_step(self) -> None:
        if self._hooked_steps % self.adapt_every == 0:
            self.adapt()

    def choose_level(self) -> torch.Tensor:
        """The ladder rung the rule picks from the current EMAs (a device tensor)."""
        statistics = self.statistics.detach()
        fits = statistics[:-1] <= self.variance_ratio * statistics[-1]
        rungs = torch.arange(fits.shape[0], device=fits.device)
        return torch.where(fits, rungs, 0).max()  # added variance grows down the ladder: take the last fit

    def adapt(self) -> float:
        level = int(self.choose_level())  # the one host read, every adapt_every steps
        self._set_level(level)
        return self.settings.keep

    def _set_level(self, level: int) -> None:
        with torch.no_grad():
            self.level.fill_(level)
        self.settings = dataclasses.replace(self.settings, keep=self.settings.ladder[level])

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._set_level(int(self.level))

    def details(self) -> Dict[str, object]:
        values = self.statistics.detach().tolist()
        added, sgd = values[:-1], values[-1]
        level = self.settings.ladder.index(self.settings.keep)
        return {"keep": self.settings.keep, "ladder": "/".join(f"{k:g}" for k in self.settings.ladder),
                "added_variance": f"{added[level]:.3g}", "sgd_noise": f"{sgd:.3g}",
                "variance_ratio": f"{added[level] / sgd:.3g}" if sgd > 0 else "n/a", "updates": int(self.updates)}


class MemoryModeState(_GradientSlotState):
    """Memory mode of one linear weight: EMA of the mean ‖g_t‖ per token position (the score factor)."""

    slot_name = "position_grad_norms"

    def __init__(self, settings: LayerSketch, positions: int, config: RandomizedVJP, device: torch.device) -> None:
        super().__init__(settings, torch.ones(positions, dtype=torch.float32, device=device), config.ema_decay)

    def details(self) -> Dict[str, object]:
        return {"memory_mode": "yes", "updates": int(self.updates)}


_STATE_SUFFIX = "_vjp_state"


def _state(owner: nn.Module, attr: str) -> Optional[_GradientSlotState]:
    return owner._modules.get(attr + _STATE_SUFFIX)


def _current_settings(owner: nn.Module, attr: str) -> LayerSketch:
    state = _state(owner, attr)
    return state.settings if state is not None else owner._effcompile_sketch[attr]


def _fused_getter(cls: type, attr: str) -> Optional[Any]:
    """The getter of a property that computes ``attr`` below the sketch (decorrelation's W·R), or None.

    Sketching the fused weight's gradient keeps it unbiased for W too: ∂L/∂W = (∂L/∂(W·R))·Rᵀ is
    linear in the sketched gradient.  The getter is resolved when the class is built: Dynamo
    traces a plain function call, not ``property.fget`` (a graph break).
    """
    fused = getattr(cls, attr, None)
    return fused.fget if isinstance(fused, property) else None


def _base_weight(module: nn.Module, attr: str) -> torch.Tensor:
    """The weight the class below the sketch computes with: the parameter W, or W·R when decorrelated."""
    getter = type(module)._effcompile_base_getters.get(attr)
    return getter(module) if getter is not None else module._parameters[attr]


def _composes_with(owner: nn.Module, attr: str) -> bool:
    """A decorrelated layer (weight read as W·R) composes: the sketch applies to the fused weight."""
    return attr in getattr(type(owner), "_effcompile_decorrelated", ()) and \
        not hasattr(type(owner), "_effcompile_sketched")


def _marked_weight_property(attr: str, base_getter: Optional[Any]) -> property:
    def weight(self: nn.Module) -> torch.Tensor:
        parameter = base_getter(self) if base_getter is not None else self._parameters[attr]
        settings = _current_settings(self, attr)
        if self.training and torch.is_grad_enabled():
            if is_compiling():
                state = _state(self, attr)
                return MARKER(parameter, state.statistics if state is not None else None, *settings.marker_args())
            if not type(self).__dict__.get("_effcompile_eager_sketch", False):
                raise RuntimeError(
                    f"effcompile: layer {settings.layer!r} uses its weight outside nn.Linear; its randomized VJP "
                    "runs only in compiled training: torch.compile(model, backend='effcompile')")
        return parameter

    return property(weight)


def _sketched_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    if is_compiling() or not (self.training and torch.is_grad_enabled()):
        return F.linear(input, self.weight, self.bias)
    from effcompile.sketch import SketchedLinear

    settings = _current_settings(self, "weight")
    state = _state(self, "weight")
    keep_weight = settings.keep if settings.keep < 1 else None
    keep_input = settings.keep_input if settings.keep_input < 1 else None
    return SketchedLinear.apply(input, _base_weight(self, "weight"), self.bias, keep_weight, keep_input,
                                settings.estimator, settings.uniform_mix, settings.multiple,
                                state.statistics if state is not None else None, settings.ladder)


def _memory_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """Memory mode, eager and compiled alike: Dynamo traces the autograd function."""
    if not (self.training and torch.is_grad_enabled()):
        return F.linear(input, self.weight, self.bias)
    from effcompile.sketch import MemorySketchedLinear, round_budget

    state = _state(self, "weight")
    settings = state.settings
    rows = input.numel() // input.shape[-1]
    k = round_budget(rows, settings.keep, settings.multiple)
    if k >= rows:
        return F.linear(input, self.weight, self.bias)
    return MemorySketchedLinear.apply(input, self.weight, self.bias, state.position_grad_norms, k, settings.estimator,
                                      settings.uniform_mix)


def _sketched_conv_forward(self: nn.modules.conv._ConvNd, input: torch.Tensor) -> torch.Tensor:
    original = type(self)._effcompile_original_class
    if is_compiling() or not (self.training and torch.is_grad_enabled()):
        return original.forward(self, input)
    from effcompile.sketch import SketchedConv

    settings: LayerSketch = self._effcompile_sketch["weight"]
    return SketchedConv.apply(input, _base_weight(self, "weight"), self.bias, self.stride, self.padding, self.dilation,
                              self.groups, settings.keep if settings.keep < 1 else None, settings.estimator,
                              settings.uniform_mix, settings.multiple)


def _eager_forward(cls: type, attrs: Tuple[str, ...]):
    """The eager sketched forward for this owner class, or None (then the layer is compiled-only)."""
    if attrs != ("weight",):
        return None
    if issubclass(cls, nn.Linear):
        return _sketched_linear_forward
    if issubclass(cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _sketched_conv_forward
    return None


def _eager_supported(owner: nn.Module, attr: str) -> bool:
    if _eager_forward(type(owner), (attr,)) is None:
        return False
    if isinstance(owner, nn.modules.conv._ConvNd):  # SketchedConv: zero padding given as numbers
        return owner.padding_mode == "zeros" and not isinstance(owner.padding, str)
    return True


_SKETCHED_CLASSES: Dict[Tuple[type, Tuple[str, ...], bool], type] = {}


def _sketched_class(cls: type, attrs: Tuple[str, ...], memory_mode: bool = False) -> type:
    key = (cls, attrs, memory_mode)
    if key not in _SKETCHED_CLASSES:
        namespace = {"_effcompile_original_class": cls, "_effcompile_sketched": attrs,
                     "_effcompile_base_getters": {attr: _fused_getter(cls, attr) for attr in attrs}}
        if memory_mode:  # the weight stays a plain parameter; the forward is the memory-mode function
            namespace["forward"] = _memory_linear_forward
            name = f"MemorySketched{cls.__name__}"
        else:
            namespace.update({attr: _marked_weight_property(attr, _fused_getter(cls, attr)) for attr in attrs})
            eager_forward = _eager_forward(cls, attrs)
            if eager_forward is not None:
                namespace["forward"] = eager_forward
                namespace["_effcompile_eager_sketch"] = True
            name = f"Sketched{cls.__name__}"
        _SKETCHED_CLASSES[key] = type(name, (cls,), namespace)
    return _SKETCHED_CLASSES[key]


@dataclasses.dataclass(frozen=True)
class _LayerSpec:
    """What ``apply`` needs for one planned layer."""

    owner_path: str
    attr: str
    settings: LayerSketch
    mode: str  # "marker" | "adaptive" | "memory"
    positions: int = 1  # memory mode: token positions per sample (rows = batch · positions)


class RandomizedVJPPass(ModelPass):
    config_type = RandomizedVJP

    def plan(self, model: nn.Module, captured: GraphCapture, config: RandomizedVJP) -> List[PlanRow]:
        return [self._plan_layer(model, candidate, config) for candidate in captured.layers]

    def _plan_layer(self, model: nn.Module, candidate: LayerCandidate, config: RandomizedVJP) -> PlanRow:
        first = candidate.uses[0]
        row = PlanRow(layer=candidate.layer, pass_name=self.name, action="sketch", op=first.op,
                      input_shape=first.input_shape, weight_shape=candidate.weight_shape)
        owner = model.get_submodule(candidate.owner_path)
        reason = self._skip_reason(owner, candidate, config)
        if reason:
            row.action, row.reason = "skip", reason
            return row
        is_conv = first.op.startswith("conv")
        mode = "memory" if config.memory_mode else "adaptive" if (config.adaptive and not is_conv) else "marker"
        settings = _settings(config, candidate.layer, owner._parameters[candidate.attr].device, mode == "adaptive")
        # The sampled GEMM dimension: sample·token rows for linears, images for convolutions.
        rows = (first.input_shape[0] if is_conv else math.prod(first.input_shape[:-1])) if first.input_shape else 0
        from effcompile.sketch import round_budget

        row.details = {"estimator": settings.estimator, "target": config.target}
        if settings.keep < 1:
            sampled = "k_images" if is_conv else "k_rows"
            row.details.update({"keep": settings.keep, sampled: f"{round_budget(rows, settings.keep, settings.multiple)}/{rows}"})
        if settings.keep_input < 1:
            features = candidate.weight_shape[0]
            row.details.update(keep_input=settings.keep_input,
                               k_features=f"{round_budget(features, settings.keep_input, settings.multiple)}/{features}")
        if config.adaptive:
            row.details["adaptive"] = "yes" if mode == "adaptive" else "no (convolution: fixed keep)"
        if mode == "memory":
            row.details["memory_mode"] = "yes"
        row.details["eager"] = "yes" if _eager_supported(owner, candidate.attr) else "compiled only"
        positions = math.prod(first.input_shape[1:-1]) if first.input_shape and len(first.input_shape) > 2 else 1
        row.spec = _LayerSpec(candidate.owner_path, candidate.attr, settings, mode, positions)
        return row

    @staticmethod
    def _skip_reason(owner: nn.Module, candidate: LayerCandidate, config: RandomizedVJP) -> str:
        excluded = [pattern for pattern in config.exclude if fnmatch.fnmatchcase(candidate.layer, pattern)]
        if excluded:
            return f"excluded by RandomizedVJP(exclude=...) pattern {excluded[0]!r}: exact backprop"
        if candidate.other_uses:
            return f"the weight is also used by {', '.join(sorted(set(candidate.other_uses)))}"
        kinds = {use.op for use in candidate.uses}
        if len(kinds) != 1 or not (kinds <= {"linear"} or next(iter(kinds)).startswith("conv")):
            return f"{'/'.join(sorted(kinds))}: only linear and conv layers have a sketched backward in this version"
        if any(use.unsupported for use in candidate.uses):
            return candidate.uses[0].unsupported
        if next(iter(kinds)).startswith("conv") and (config.estimator == "sketch" or config.target == "grad_input"):
            return "convolutions sketch grad_weight with estimator importance/uniform only in this version"
        if hasattr(type(owner), "_effcompile_original_class") and not _composes_with(owner, candidate.attr):
            return "the layer already carries a weight rewrite this pass cannot compose with"
        if config.memory_mode and not (kinds == {"linear"} and isinstance(owner, nn.Linear) and candidate.attr == "weight"
                                       and len(candidate.uses) == 1):
            return ("memory_mode saves sampled input rows of nn.Linear layers only (convolutions and functional "
                    "uses of a weight keep their exact backward in memory mode)")
        return ""

    def apply(self, model: nn.Module, rows: List[PlanRow], config: RandomizedVJP) -> int:
        by_owner: Dict[str, List[_LayerSpec]] = {}
        for row in rows:
            by_owner.setdefault(row.spec.owner_path, []).append(row.spec)
        for owner_path, specs in by_owner.items():
            owner = model.get_submodule(owner_path)
            device = owner._parameters[specs[0].attr].device
            for spec in specs:
                if spec.mode == "adaptive":
                    owner.add_module(spec.attr + _STATE_SUFFIX, VarianceControl(spec.settings, config, device))
                elif spec.mode == "memory":
                    owner.add_module(spec.attr + _STATE_SUFFIX,
                                     MemoryModeState(spec.settings, spec.positions, config, device))
            owner.__dict__["_effcompile_sketch"] = {spec.attr: spec.settings for spec in specs}
            memory_mode = any(spec.mode == "memory" for spec in specs)
            owner.__class__ = _sketched_class(type(owner), tuple(sorted(spec.attr for spec in specs)), memory_mode)
        return sum(len(specs) for specs in by_owner.values())

    def live_details(self, model: nn.Module, row: PlanRow) -> Dict[str, object]:
        if not isinstance(row.spec, _LayerSpec):
            return {}
        state = _state(model.get_submodule(row.spec.owner_path), row.spec.attr)
        if state is None:
            return {}
        details = state.details()
        rows = math.prod(row.input_shape[:-1]) if row.input_shape else 0
        if isinstance(state, VarianceControl) and rows:
            from effcompile.sketch import round_budget

            details["k_rows"] = f"{round_budget(rows, state.settings.keep, state.settings.multiple)}/{rows}"
        return details

    def is_applied(self, model: nn.Module) -> bool:
        return any(type(m).__dict__.get("_effcompile_sketched") for m in model.modules())

    def fold(self, model: nn.Module) -> int:
        folded = 0
        for module in list(model.modules()):
            attrs = type(module).__dict__.get("_effcompile_sketched")
            if attrs:
                module.__class__ = type(module)._effcompile_original_class
                module.__dict__.pop("_effcompile_sketch", None)
                for attr in attrs:
                    module._modules.pop(attr + _STATE_SUFFIX, None)
                folded += 1
        return folded


register_pass(RandomizedVJPPass())
