"""Decorrelation state: the per-layer matrix R, its sampled statistics and its local update.

``DecorrelationState`` is a submodule of the layer's owner (``<attr>_decorrelation``), so
``state_dict`` checkpoints R and its counters; calling it applies R on the layer's side: it
returns the fused weight ``W·R``, or the decorrelated layer input ``z = x·Rᵀ``.
The update rule and where it runs are described in :mod:`.rewrite`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from effcompile import distributed as replicas
from effcompile._compat import inside_backward, is_compiling, native_bf16_matmul
from effcompile.passes.analysis.capture import ConvGeometry, InputLocation
from effcompile.passes.base import PassState

from .config import Decorrelation

__all__ = ["BF16_MIN_UPDATE_MACS", "DecorrelationState", "LayerSpec", "MAX_INTERVAL_LR", "MAX_STEP", "MIN_ROWS",
           "UPDATE_FORMULAS", "block_layout", "update_lr",
           "resolve_update_dtype", "sample_patches", "update_formula", "update_macs"]

MIN_ROWS = 64
# update_dtype="auto": the smallest update (MACs, all blocks, at the example's batch) whose products
# run in bf16 on hardware that multiplies bf16 natively.  On the development CPU (AMD EPYC,
# AVX512-BF16; 2 threads) one bf16 bmm with its casts took 0.83x the fp32 time at 8.4M MACs, 0.64x
# at 34M and 0.58x at 67M, and 3-4x longer below 1M (the casts are dispatches); whole ResNet-18
# updates (18 blocks of 128 at n = 512; 3 of 384 at n = 1536) ran 2.1-4.2x faster.
BF16_MIN_UPDATE_MACS = 1 << 25


def resolve_update_dtype(choice: str, macs: int, device: torch.device) -> torch.dtype:
    """The dtype of one layer's update products for ``Decorrelation.update_dtype`` (see there);
    ``macs``: the MACs of one update of the layer (every block)."""
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    if choice != "auto":
        raise ValueError(f"update_dtype must be 'auto', 'float32' or 'bfloat16', got {choice!r}")
    large = macs >= BF16_MIN_UPDATE_MACS
    return torch.bfloat16 if large and native_bf16_matmul(device) else torch.float32

# The three exact ways to compute one R update from n rows per block of size b.
UPDATE_FORMULAS = ("rows", "gram", "covariance")
# The largest step ‖η·A‖_F an update takes (A = (1−κ)·C + κ·diag(v − 1), the step R ← (I − η·A)·R):
# a longer one is shortened to this.  Past ‖η·A‖ ≈ 1 the iteration overshoots along A's top
# direction and diverges; early in training a block of b correlated features has ‖C‖ ~ b·ρ·v, so
# a fixed η safe for one layer diverges in a wider one (digits MLP: η = 0.16 took every seed to
# NaN weights, 10% accuracy).  Near convergence ‖A‖ → 0 and the step is the plain one.
MAX_STEP = 0.5
# The most an update interval's scaled step (update_lr) may reach: half of R per update, where a
# fixed η·A would already be shortened by MAX_STEP unless R is nearly converged.
MAX_INTERVAL_LR = 0.5


def update_lr(lr: float, update_every: int, configured_every: int) -> float:
    """The step size of a layer whose R is updated every ``update_every`` training steps when the
    config asked for every ``configured_every`` (a budget lengthens intervals, cost.py): ``lr``
    times their ratio, so R decorrelates as fast per training step (one long step in place of k
    short ones, from one batch's statistics), at most ``MAX_INTERVAL_LR``."""
    if update_every <= configured_every:
        return lr
    return min(lr * update_every / configured_every, max(lr, MAX_INTERVAL_LR))


def update_macs(formula: str, n: int, b: int) -> int:
    """Multiply-accumulates per block of one R update (the cost rule :func:`update_formula` uses).

    * ``rows``:       Z = X·Rᵀ (n·b²), Z·R (n·b²), Zᵀ(Z·R) (n·b²), ‖ZZᵀ‖ (n²·b) → 3·n·b² + n²·b
    * ``gram``:       Z = X·Rᵀ (n·b²), Σ = ZᵀZ (n·b²), (Σ − diag Σ)·R (b³)     → 2·n·b² + b³
    * ``covariance``: S = XᵀX (n·b²), R·S (b³), (R·S)·Rᵀ (b³), Σ·R (b³)        → n·b² + 3·b³

    (``XᵀX`` is symmetric, but torch has no symmetric rank-k product (syrk) to halve it, so it is
    counted as a full product.)  The diag(v)·R term is a row scaling, b² in every formula.
    """
    if formula == "rows":  # ‖Σ‖_F for the step's length (MAX_STEP) from the n×n Gram ZZᵀ
        return 3 * n * b * b + n * n * b
    if formula == "gram":
        return 2 * n * b * b + b ** 3
    if formula == "covariance":
        return n * b * b + 3 * b ** 3
    raise ValueError(f"unknown update formula {formula!r}; expected one of {UPDATE_FORMULAS}")


def update_formula(n: int, b: int, syncing: bool = False) -> str:
    """The cheapest exact formula for ``n`` rows and block size ``b`` (all give the same R).

    From :func:`update_macs`: ``rows`` wins for n < 0.62·b, ``gram`` up to 2b, ``covariance``
    for n > 2b (the default budget n = 4·b: 7·b³ instead of 9·b³).  Under DDP the statistic is
    averaged over ranks, which ``rows`` never forms, so it is not a candidate there.
    """
    candidates = UPDATE_FORMULAS[1:] if syncing else UPDATE_FORMULAS
    return min(candidates, key=lambda formula: update_macs(formula, n, b))


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What the runtime needs to know about one decorrelated weight."""

    param_fqn: str
    owner_path: str
    attr: str
    kind: str  # "linear" (incl. matmul) or "conv"
    contracted_axis: int
    groups: int
    group_dim: int  # input dimension d per group
    block: int
    conv: Optional[ConvGeometry]
    scopes: Tuple[Tuple[str, Tuple[InputLocation, ...]], ...]  # (scope module path, input locations)
    # Module calls whose forward computes this layer's input: observed in the graph (observe.py)
    # instead of by a pre-hook on ``scopes``.
    observer_scopes: Tuple[str, ...] = ()
    # R is updated every this many training forwards (the config's ``update_every``, or the
    # budget's choice for this layer under ``max_overhead``).
    update_every: int = 1
    # Where R is applied: "weight" (the layer computes with W·R) or "input" (with z = x·Rᵀ).
    side: str = "weight"
    # Input rows the layer meets per step at the example's batch (None: unknown); an update
    # samples at most this many, which decides what update_dtype="auto" picks.
    example_rows: Optional[int] = None
    # How R is structured: "blocks" (dense, or block-diagonal of ``block``-sized blocks) or
    # "kronecker" (R_channel ⊗ R_spatial per group, convolutions with a k×k kernel; kronecker.py).
    structure: str = "blocks"
    # The cost model's LayerCost of this layer's R at the chosen configuration (cost.py: its work
    # per eager and compiled step is what the Plan's predictions sum); None when no prediction was
    # made (a replanned spec).
    cost: Optional[Any] = None


def block_layout(group_dim: int, max_block: int) -> Tuple[int, int]:
    """Split ``group_dim`` into ``n`` equal blocks of size ``b ≤ max_block`` (last one padded)."""
    blocks = math.ceil(group_dim / max_block)
    return blocks, math.ceil(group_dim / blocks)


class DecorrelationState(PassState):
    """Holds one layer's decorrelation matrix and applies and updates it.

    Buffers (all in ``state_dict``): ``matrix`` (blocks, b, b) fp32, ``updates`` and
    ``rejected_updates`` counters, ``observed_batches``.
    """

    def __init__(self, spec: LayerSpec, config: Decorrelation, device: torch.device) -> None:
        super().__init__()
        self._configure(spec, config)
        self.blocks_per_group, self.block = block_layout(spec.group_dim, spec.block)
        self.num_rows = max(MIN_ROWS, math.ceil(config.rows_per_dim * self.block))
        num_blocks = spec.groups * self.blocks_per_group
        self._dense = num_blocks == 1  # one dense R: products without block plumbing
        self.register_buffer("matrix", torch.empty(num_blocks, self.block, self.block, device=device))
        self.register_buffer("feature_mask", torch.empty(num_blocks, self.block, device=device), persistent=False)
        for name in ("_scale_offset", "_scale_slope"):  # constants of the update's row scaling (_update)
            self.register_buffer(name, torch.empty(num_blocks, self.block, device=device), persistent=False)
        self._finish_init(device)

    def _configure(self, spec: LayerSpec, config: Decorrelation) -> None:
        """The settings every structure of R shares (the config's, resolved for this layer)."""
        self.spec = spec
        self.lr = update_lr(float(config.lr), spec.update_every, config.update_every)
        self.kappa = float(config.kappa)
        self.update_every = int(spec.update_every)
        self.divergence_threshold = float(config.divergence_threshold)
        self.sync_statistics = bool(config.sync_statistics)
        self.update_dtype_choice = config.update_dtype

    def _finish_init(self, device: torch.device) -> None:
        """Counters, initial values and checkpoint hooks, once the structure's buffers exist."""
        for name in ("updates", "rejected_updates", "observed_batches"):
            self.register_buffer(name, torch.empty((), dtype=torch.long, device=device))
        self.reset_parameters()
        self._resolve_update_dtype()
        self._register_load_state_dict_pre_hook(_keep_state_missing_from_checkpoint, with_module=True)
        self.register_load_state_dict_post_hook(_resume_update_schedule)
        # The LayerInputObserver of the scope call in progress (observe.py), else None.
        self._active_observer = None
        self._snapshot, self._snapshot_key = None, None  # eager copy of R for the fused product

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """R = I, counters zero. Also the hook that re-initialises state after ``to_empty`` (meta models)."""
        self.matrix.copy_(torch.eye(self.block, device=self.matrix.device).expand_as(self.matrix))
        padded = torch.arange(self.blocks_per_group * self.block, device=self.matrix.device) < self.spec.group_dim
        self.feature_mask.copy_(padded.view(self.blocks_per_group, self.block).repeat(self.spec.groups, 1))
        # 1 − η·u = (1 + η·κ·mask) + v·(η·(1−κ) − η·κ·mask): the update's row scaling as one addcmul.
        self._scale_offset.copy_(1.0 + self.lr * self.kappa * self.feature_mask)
        self._scale_slope.copy_(self.lr * (1.0 - self.kappa) - self.lr * self.kappa * self.feature_mask)
        self._reset_counters()

    def _reset_counters(self) -> None:
        for counter in (self.updates, self.rejected_updates, self.observed_batches):
            counter.zero_()
        self._calls = 0  # training forwards (eager) or compiled steps (train_step): the update_every phase
        self._compiled_due: Optional[bool] = None  # set by train_step's compiled step (schedule protocol)

    def _apply(self, fn, *args, **kwargs):
        moved = super()._apply(fn, *args, **kwargs)
        self._resolve_update_dtype()  # a move (.to, .cuda, to_empty) may change what the device multiplies fast
        return moved

    def _resolve_update_dtype(self) -> None:
        # Decided here, in eager code, never while tracing: the hardware query is not traceable.
        n = min(self.num_rows, self.spec.example_rows or self.num_rows)
        self.update_dtype = resolve_update_dtype(self.update_dtype_choice, self._update_macs(n), self.matrix.device)

    def _update_macs(self, n: int) -> int:
        """MACs of one update of every block from ``n`` rows (what ``update_dtype="auto"`` weighs)."""
        return self.matrix.shape[0] * update_macs(update_formula(n, self.block), n, self.block)

    def extra_repr(self) -> str:
        return (f"layer={self.spec.owner_path}.{self.spec.attr}, groups={self.spec.groups}, "
                f"d={self.spec.group_dim}, blocks={self.blocks_per_group}x{self.block}, rows={self.num_rows}")

    # ----------------------------------------------------------------------------- applying R
    def forward(self, value: torch.Tensor) -> torch.Tensor:
        """R applied where the Plan put it: ``value`` is the weight W (returns ``W·R``) or the
        layer input x (returns ``x·Rᵀ``).  Both give the layer the same function and W the same
        gradient ``δ·zᵀ``; a call of this module is what ONNX scopes and fold see."""
        if self.spec.side == "input":
            return self.decorrelated_input(value)
        return self.fused_weight(value)

    def decorrelated_input(self, x: torch.Tensor) -> torch.Tensor:
        """``z = x·Rᵀ`` over the last axis of ``x`` (block by block; one group)."""
        d, blocks, b = self.spec.group_dim, self.blocks_per_group, self.block
        matrix = self._matrix_snapshot(x.dtype)
        if self._dense:
            return F.linear(x, matrix)
        if blocks * b != d:
            x = F.pad(x, (0, blocks * b - d))
        z = torch.bmm(x.reshape(-1, blocks, b).transpose(0, 1), matrix.transpose(1, 2))  # (blocks, rows, b)
        return z.transpose(0, 1).reshape(*x.shape[:-1], blocks * b)[..., :d]

    def fused_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The fused weight ``W·R`` (``Rᵀ·W`` for a (d, out) matmul operand).

        Inside a scope call observed in the graph, the observer is told which tensor is the fused
        weight, so it can find the op that uses it (observe.py).
        """
        if self.spec.contracted_axis == 0:
            fused = self._right_multiply(weight.t()).t()
        else:
            fused = self._right_multiply(weight)
        observer = self._active_observer
        if observer is not None:
            observer.watch(fused, self)
        return fused

    def _matrix_snapshot(self, dtype: torch.dtype) -> torch.Tensor:
        """A copy of R as the product uses it: (b, b) for one dense block, else (blocks, b, b)."""
        # Autograd saves R to form ∂L/∂W = ∂L/∂A·Rᵀ; a module called twice in one forward updates R
        # in place between the calls, so each call multiplies by its own copy (b² per call).  In
        # eager the copy is reused until R changes (its version counter moves: an update, a load):
        # steps between updates then copy nothing, not even the view of the dense block.
        matrix = self.matrix
        return self._snapshot_of((matrix,), dtype,
                                 lambda: (matrix[0] if self._dense else matrix).detach().to(dtype, copy=True))

    def _snapshot_of(self, sources: Tuple[torch.Tensor, ...], dtype: torch.dtype, copy):
        """``copy()``; in eager the last one, until a tensor of ``sources`` changes (its version
        counter or storage: an update, a load) or ``dtype`` does."""
        if is_compiling():
            return copy()
        key = (tuple((source._version, source.data_ptr()) for source in sources), dtype)
        if self._snapshot_key == key:
            return self._snapshot
        made = copy()
        # Plain attributes, set past nn.Module.__setattr__ (its buffer/parameter checks cost more
        # than the rest of a step's bookkeeping).
        self.__dict__.update(_snapshot=made, _snapshot_key=key)
        return made

    def _right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        groups, d, blocks, b = self.spec.groups, self.spec.group_dim, self.blocks_per_group, self.block
        matrix = self._matrix_snapshot(weight.dtype)
        if self._dense:  # the common case: one dense product, no block plumbing
            if weight.dim() == 2:  # no reshape: each view would be one more autograd node per step
                return weight @ matrix
            return (weight.reshape(weight.shape[0], d) @ matrix).reshape(weight.shape)
        w = weight.reshape(groups, weight.shape[0] // groups, d)
        if blocks * b != d:
            w = F.pad(w, (0, blocks * b - d))
        w = w.view(groups, w.shape[1], blocks, b)
        r = matrix.view(groups, blocks, b, b)
        fused = torch.einsum("gonb,gnbc->gonc", w, r).reshape(groups, w.shape[1], blocks * b)
        return fused[..., :d].reshape(weight.shape)

    # ----------------------------------------------------------------------------- update
    def observe(self, inputs: Sequence[torch.Tensor]) -> None:
        """Update R from the layer inputs of one training forward (no host synchronisation).

        Not in an activation-checkpointing recomputation (eager; compiled checkpoints recompute in
        the graph, without Python hooks): R was updated by the forward that it repeats, and the
        recomputation must use the R that forward used, so the gradient matches its output."""
        if not is_compiling() and inside_backward():
            return
        with torch.no_grad():
            self.observed_batches.add_(1)
        gate = self._update_gate()
        if gate is False:  # eager steps between updates: nothing else (entering autocast costs more than the count)
            return
        device_type = self.matrix.device.type
        # Statistics in fp32: leave autocast for the update (entering the context costs more than
        # a small update's arithmetic in eager, so only when autocast is on or may be, compiling).
        outside_autocast = (torch.autocast(device_type=device_type, enabled=False)
                            if is_compiling() or torch.is_autocast_enabled(device_type) else contextlib.nullcontext())
        with torch.no_grad(), outside_autocast:
            samples = [self._sample_rows(x) for x in inputs]
            self._update(samples[0] if len(samples) == 1 else torch.cat(samples, dim=0), gate)

    def _update_gate(self):
        """True/False decided in Python (eager, or train_step's compiled schedule), or a 0-dim bool
        tensor when compiling otherwise.

        Inside a compiled graph a Python counter would be guarded on and recompile every step, so a
        user's own compiled loop gets the ``update_every`` schedule as a device-side mask of the
        update (computed every step); train_step's compiled step sets ``_compiled_due`` from outside
        the graph instead (:meth:`begin_scheduled_call`), one graph with the update and one without.
        """
        if self.update_every == 1:
            return True
        if is_compiling():
            due = self.__dict__["_compiled_due"]
            if due is not None:  # train_step's schedule: a graph specialised on it
                return due
            return (self.observed_batches - 1) % self.update_every == 0
        return self._count_call()

    def _count_call(self) -> bool:
        """Count one training forward (eager) or compiled step; whether it is an update step."""
        calls = self.__dict__["_calls"]
        self.__dict__["_calls"] = calls + 1  # past nn.Module.__setattr__, as the snapshot
        return calls % self.update_every == 0

    # The schedule protocol of effcompile.compiling.scheduled: train_step's compiled step tells the
    # state whether this step updates, so the graphs between updates leave the update out instead of
    # computing it and masking it.
    def schedule(self) -> Tuple[int, int]:
        return self.update_every, self.__dict__["_calls"]

    def begin_scheduled_call(self) -> None:
        self.__dict__["_compiled_due"] = self._count_call()

    def end_scheduled_call(self) -> None:
        self.__dict__["_compiled_due"] = None

    def _sample_rows(self, x: torch.Tensor, num_rows: Optional[int] = None) -> torch.Tensor:
        """Random rows of the layer input as (n, groups, d) in fp32 (all rows if fewer than n)."""
        num_rows = num_rows or self.num_rows
        if self.spec.kind == "conv":
            rows = sample_patches(x, self.spec.conv, num_rows, feature_major=is_compiling(), dtype=torch.float32)
        else:
            flat = x.detach().reshape(-1, x.shape[-1])
            if flat.shape[0] > num_rows:
                flat = flat[torch.randint(flat.shape[0], (num_rows,), device=flat.device)]
            rows = flat
        return rows.to(torch.float32).view(rows.shape[0], self.spec.groups, self.spec.group_dim)

    def _padded_blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, groups, d) rows → (blocks, n, b) per-block rows (a view), padded features zero.

        Blocks lead so that every product of the update is one ``bmm`` (``einsum`` on these
        small operands costs more in dispatch than in arithmetic).
        """
        groups, d, blocks, b = self.spec.groups, self.spec.group_dim, self.blocks_per_group, self.block
        if blocks * b != d:
            rows = F.pad(rows, (0, blocks * b - d))
        return rows.view(rows.shape[0], groups * blocks, b).transpose(0, 1)

    def _decorrelated_rows(self, rows: torch.Tensor, matrix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z = R·x per block: (n, groups, d) rows → (blocks, n, b), padded features zero."""
        matrix = self.matrix if matrix is None else matrix
        return torch.bmm(self._padded_blocks(rows), matrix.transpose(1, 2))

    def _update(self, rows: torch.Tensor, gate, formula: Optional[str] = None) -> None:
        """One step ``R ← R − η[(1−κ)·C·R + κ·diag(v)·R]`` from sampled rows (n, groups, d).

        ``formula`` forces one of :data:`UPDATE_FORMULAS` (tests, benchmarks); by default
        :func:`update_formula` picks the cheapest for this ``n`` and block size.

        ``gate`` is True (eager, or an update every step) or a device bool (the compiled
        ``update_every`` schedule), under which the proposal is computed every step and masked
        (``_commit``).
        """
        # The row count as a number (operator.index specialises a symbolic size, with a guard and
        # no graph break): when Dynamo recompiles for a partial last batch with a symbolic batch,
        # a symbolic n would reach min(key=...) in update_formula (a graph break per layer) and
        # a symbolic size in the update's graph.  A layer whose update takes every row of the
        # batch thus compiles once per batch size, as with dynamic=False.
        n, b = operator.index(rows.shape[0]), self.block
        syncing = self._syncing()
        formula = formula or update_formula(n, b, syncing)
        operands = (self.matrix, rows, self._scale_offset, self._scale_slope)

        def propose(matrix, rows, offset, slope):
            return self._proposal(matrix, rows, offset, slope, formula)

        self._commit(propose, operands, gate)

    def _commit(self, propose, operands: Tuple[torch.Tensor, ...], gate) -> None:
        """Write the update ``propose(*operands)`` into R where it is accepted (and the step updates).

        ``propose`` returns the new value of each state matrix (``operands`` begin with them, in
        order) and whether they are accepted.  Compiled with a device ``gate`` (an update every
        few steps), the proposal is computed every step and masked.  Not a ``torch.cond``: with
        one in the traced forward, Dynamo (torch 2.13) dropped attribute writes to Python objects
        the user's forward made before it and assigned after it (CLIP's ``out.pooler_output =
        self.proj(out.pooler_output)`` on a ModelOutput returned the unprojected tensor and froze
        the projection, with no error; ``test_compiled_decorrelation_keeps_attribute_writes``).
        Under DDP the statistic's all-reduce runs every step either way.
        """
        *proposals, accepted = propose(*operands)
        applied = accepted if gate is True else accepted & gate
        rejected = ~accepted if gate is True else gate & ~accepted
        for matrix, proposal in zip(operands, proposals):
            matrix.copy_(torch.where(applied, proposal, matrix))
        self.updates.add_(applied)
        self.rejected_updates.add_(rejected)

    def _proposal(self, matrix: torch.Tensor, rows: torch.Tensor, scale_offset: torch.Tensor,
                  scale_slope: torch.Tensor, formula: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """The updated R and whether it is accepted (finite, within ``divergence_threshold``).

        With Σ the second moment of z = R·x (C = Σ − diag Σ) and ``v = diag Σ``, the step is
        ``R ← diag(1 − η·u)·R − η(1−κ)·Σ·R`` with ``u = κ·(v − 1)·mask − (1−κ)·v``: one
        row scaling (``addcmul`` with the constants of ``reset_parameters``) and one batched
        ``baddbmm``.  Every small op is a dispatch that costs more than its arithmetic at the
        sizes where R matters most, so the step is written in as few as the algebra allows.

        With ``update_dtype`` bfloat16 the products take bf16 operands (fp32 accumulation inside
        the GEMM); what is averaged over ranks, the variance and the step itself stay fp32.
        """
        n = rows.shape[0]
        low = self.update_dtype
        exact = low == torch.float32
        # Identity in fp32: no extra ops there (small blocks are dispatch-bound).
        cast = (lambda t: t) if exact else (lambda t: t.to(low))
        widen = (lambda t: t) if exact else (lambda t: t.float())
        m = cast(matrix)
        if formula in ("rows", "gram"):
            z = self._decorrelated_rows(cast(rows), m)  # z = R·x per block: (blocks, n, b)
        if formula == "rows":
            if self._syncing():
                raise ValueError("the 'rows' formula needs every rank's rows: use 'gram' or 'covariance' with DDP")
            # Σ·R = Zᵀ(Z·R)/n: never forms a b×b statistic; ‖Σ‖_F = ‖ZZᵀ‖_F/n from the n×n Gram.
            z32 = widen(z)
            variance = (z32 * z32).mean(dim=1)
            moment, times = z.transpose(1, 2), torch.bmm(z, m) / n
            gram_norm = torch.linalg.matrix_norm(widen(torch.bmm(z, z.transpose(1, 2)))) / n
        elif formula == "gram":
            # Σ = ZᵀZ/n from the decorrelated rows z = R·x.
            moment, times = self._average_over_ranks(widen(torch.bmm(z.transpose(1, 2), z)) / n), matrix
            variance = torch.diagonal(moment, dim1=-2, dim2=-1)
            gram_norm = torch.linalg.matrix_norm(moment)
        elif formula == "covariance":
            # Σ = R·S·Rᵀ with S = XᵀX/n the second moment of the raw rows: z = R·x is never formed.
            # S is linear in the rows, so averaging S over ranks equals averaging Σ (R is identical).
            x = cast(self._padded_blocks(rows))
            second_moment = self._average_over_ranks(widen(torch.bmm(x.transpose(1, 2), x)) / n)
            moment, times = torch.bmm(torch.bmm(m, cast(second_moment)), m.transpose(-1, -2)), matrix
            variance = widen(torch.diagonal(moment, dim1=-2, dim2=-1))
            gram_norm = torch.linalg.matrix_norm(widen(moment))
        else:
            raise ValueError(f"unknown update formula {formula!r}; expected one of {UPDATE_FORMULAS}")
        row_scale = torch.addcmul(scale_offset, variance, scale_slope)  # 1 − η·u, padded rows 1
        step = -self.lr * (1.0 - self.kappa)
        if exact:
            proposal = torch.baddbmm(row_scale.unsqueeze(-1) * matrix, moment, times, alpha=step)
        else:  # the increment in bf16 products, R and the sum in fp32
            increment = widen(torch.bmm(cast(moment), cast(times)))
            proposal = torch.add(row_scale.unsqueeze(-1) * matrix, increment, alpha=step)
        proposal = torch.lerp(matrix, proposal, self._step_fraction(gram_norm, variance))
        # A non-finite entry makes the max NaN or inf, which fails the comparison too.
        return proposal, proposal.abs().amax() <= self.divergence_threshold

    def _step_fraction(self, second_moment_norm: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        """(blocks, 1, 1): the fraction of the step that keeps ``‖η·A‖_F ≤ MAX_STEP`` (1 for a
        step within it).  ``‖A‖_F² = (1−κ)²·‖C‖_F² + κ²·‖(v − 1)·mask‖²`` with
        ``‖C‖_F² = ‖Σ‖_F² − ‖v‖²`` (C is Σ off its diagonal); padded features have v = 0."""
        off_diagonal = (second_moment_norm.square() - variance.square().sum(-1)).clamp_min(0.0)
        normalising = ((variance - 1.0) * self.feature_mask).square().sum(-1)
        length = self.lr * ((1.0 - self.kappa) ** 2 * off_diagonal + self.kappa ** 2 * normalising).sqrt()
        # length = 0 gives inf, clamped to the whole step; NaN stays NaN and the update is rejected.
        return (MAX_STEP / length).clamp(max=1.0).view(-1, 1, 1)

    def _syncing(self) -> bool:
        # Replicas: the ranks holding this layer (WORLD under DDP, this stage's ranks in a staged run).
        return self.sync_statistics and replicas.replica_world_size() > 1

    def _average_over_ranks(self, covariance: torch.Tensor) -> torch.Tensor:
        if not self._syncing():
            return covariance
        return replicas.all_reduce_mean(covariance)

    # ----------------------------------------------------------------------------- diagnostics
    def off_diagonal_correlation(self, x: torch.Tensor, num_rows: int = 1 << 16) -> torch.Tensor:
        """Mean |corr(z_i, z_j)| over i≠j within blocks, on up to ``num_rows`` rows of input ``x``."""
        with torch.no_grad():
            z = self._decorrelated_rows(self._sample_rows(x, num_rows))
            z = z - z.mean(dim=1, keepdim=True)
            cov = torch.bmm(z.transpose(1, 2), z) / z.shape[1]
            std = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(1e-12).sqrt()
            corr = cov / (std.unsqueeze(-1) * std.unsqueeze(-2))
            mask = self.feature_mask.unsqueeze(-1) * self.feature_mask.unsqueeze(-2)
            mask = mask * (1 - torch.eye(self.block, device=mask.device))
            return (corr.abs() * mask).sum() / mask.sum().clamp_min(1)


def _resume_update_schedule(module, incompatible_keys) -> None:
    """The ``update_every`` phase (eager, and train_step's compiled schedule) follows the loaded count of observed batches (a resumed
    run updates R on the same steps as the uninterrupted one).  One host read, at load time."""
    module._calls = int(module.observed_batches)


def _keep_state_missing_from_checkpoint(module, state_dict, prefix, *args) -> None:
    """Let checkpoints saved before the transform load with ``strict=True``: missing R keeps its value."""
    for name, buffer in module.named_buffers(recurse=False):
        if name in module._non_persistent_buffers_set:
            continue
        state_dict.setdefault(prefix + name, buffer.detach().clone())


def sample_patches(x: torch.Tensor, conv: ConvGeometry, num_rows: int, feature_major: bool = False,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Convolution patches of ``x`` as (n, C·k₁·…·k_s), channel-major like the weight, in ``dtype``
    (default: ``x``'s).

    ``num_rows`` random patches, or every patch when the batch has no more than that.  Patches
    are gathered straight from the unpadded input: out-of-range taps are clamped and zeroed, so
    zero padding costs nothing and no unfold of the whole batch is materialised.

    ``feature_major``: the same (n, d) values, stored as the transpose of a contiguous (d, n)
    tensor (what compiled steps use).  Inductor's CPU code writes a gather in its output's
    memory order and vectorises the innermost dimension: a row-major patch ends in the kernel
    width (3 taps in a 16-lane vector, bounds-checked per tap), a feature-major one in the n
    sampled positions.  On the development CPU that made the compiled gather 2.4-3.4x faster
    (ResNet-18 width 32, batch 128: 1.2-3.4 ms a layer against 3.7-8.0 ms; eager: 1.2-3.3 ms).
    The cast to ``dtype`` comes before the layout, so the result stays a view of the contiguous
    buffer: a cast of the transposed view is laid out as Inductor chooses (row-major), which the
    compiled update's ``torch.cond`` branch (until 2026-12-06), traced with the transposed strides,
    rejected under bf16 autocast.
    """
    x = x.detach()
    spatial, dims, device = x.shape[2:], conv.spatial_dims, x.device
    out_sizes = [(spatial[a] + 2 * conv.padding[a] - conv.dilation[a] * (conv.kernel_size[a] - 1) - 1) // conv.stride[a] + 1
                 for a in range(dims)]
    positions = _patch_positions(x.shape[0], out_sizes, num_rows, device)  # (n, 1 + dims)
    n = positions.shape[0]
    index: List[torch.Tensor] = [positions[:, 0].view(n, *([1] * dims))]
    valid = torch.ones((), dtype=torch.bool, device=device)
    for axis in range(dims):
        size, k = spatial[axis], conv.kernel_size[axis]
        origin = positions[:, 1 + axis] * conv.stride[axis] - conv.padding[axis]
        taps = origin.unsqueeze(1) + torch.arange(k, device=device) * conv.dilation[axis]  # (n, k)
        shape = [n] + [1] * dims
        shape[1 + axis] = k
        taps = taps.view(shape)
        valid = valid & (taps >= 0) & (taps < size)
        index.append(taps.clamp(0, size - 1))
    patches = x[(index[0], slice(None), *index[1:])].to(dtype or x.dtype)  # (n, k₁, …, k_s, C)
    patches = patches * valid.unsqueeze(-1).to(patches.dtype)
    if feature_major:  # (C, k₁, …, k_s, n) in memory, returned as its (n, d) transpose
        permutation = (dims + 1,) + tuple(range(1, dims + 1)) + (0,)
        return patches.permute(permutation).contiguous().view(-1, n).t()
    permutation = (0, dims + 1) + tuple(range(1, dims + 1))
    return patches.permute(permutation).reshape(n, -1)


def _patch_positions(batch: int, out_sizes: List[int], num_rows: int, device: torch.device) -> torch.Tensor:
    """(image, output position…) of each patch: all of them if there are at most ``num_rows``."""
    sizes = [batch] + [max(size, 1) for size in out_sizes]
    if math.prod(sizes) <= num_rows:
        grids = torch.meshgrid(*[torch.arange(size, device=device) for size in sizes], indexing="ij")
        return torch.stack([grid.reshape(-1) for grid in grids], dim=1)
    return torch.stack([torch.randint(size, (num_rows,), device=device) for size in sizes], dim=1)
