"""Decorrelation pass: decorrelated backpropagation (Dalm et al., arXiv 2405.02385).

Graph before, for every parameter ``W`` found on the captured graph as the weight of a linear
map (``aten.linear``, ``aten.conv{1,2,3}d`` incl. grouped/depthwise, ``aten.matmul`` against a
parameter, the packed input projection of ``nn.MultiheadAttention``)::

    y = linear(x, W, b)                   # or conv(x, W, b, stride, padding, dilation, groups)

Graph after (one fused op per layer; ``R`` is a buffer, so ``∂L/∂W = δ·zᵀ`` with ``z = R·x``)::

    # training mode only, in a forward pre-hook of the module call that receives x:
    R ← R − η·[(1−κ)·C·R + κ·diag(v)·R]    # C, v from sampled rows (patches) of z = R·x
    A = W·R                                 # owner.<attr>_decorrelation(W); R detached
    y = linear(x, A, b)                     # conv: A = W·R over the (C/groups)·k… patch

Details that make it cheap and safe:

* Rows: at most ``max(64, rows_per_dim·b)`` random rows of the layer input (patches for
  convolutions, gathered directly from the unpadded input) feed the statistics, where ``b`` is
  the block size; no host synchronisation anywhere in the update.
* Structure: layers whose per-group input dimension exceeds ``max_block_size`` get a
  block-diagonal ``R``; grouped convolutions get one ``R`` per group.
* Statistics are computed in fp32 with autocast disabled; ``R`` is stored in fp32 and cast to the
  weight's dtype for the fused product.
* Stability: an update that makes ``R`` non-finite or larger than ``divergence_threshold`` is
  rejected on device (``R`` keeps its last good value) and counted in ``rejected_updates``.
* DDP: when torch.distributed is initialised, the statistics are averaged over ranks before the
  update, so every rank applies the same update and ``R`` stays identical.

The R update runs inside ``forward`` as an in-place buffer update under ``no_grad`` (the same
pattern BatchNorm uses for running statistics), so plain eager loops need no extra call and
compiled steps contain the update.  Because ``R`` is updated before ``W·R`` is formed, the
fused weight of a step always uses the freshest ``R``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from effcompile._compat import functional_all_reduce_mean, is_compiling
from effcompile.config import Decorrelation
from effcompile.plan import PlanRow, layer_key

from .base import ModelPass, register_pass
from .capture import ConvGeometry, GraphCapture, InputLocation, LayerCandidate

__all__ = ["DecorrelationState", "DecorrelationPass", "decorrelation_states"]

MIN_ROWS = 64


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


def _block_layout(group_dim: int, max_block: int) -> Tuple[int, int]:
    """Split ``group_dim`` into ``n`` equal blocks of size ``b ≤ max_block`` (last one padded)."""
    blocks = math.ceil(group_dim / max_block)
    return blocks, math.ceil(group_dim / blocks)


class DecorrelationState(nn.Module):
    """Holds one layer's decorrelation matrix and applies and updates it.

    Buffers (all in ``state_dict``): ``matrix`` (blocks, b, b) fp32, ``updates`` and
    ``rejected_updates`` counters, ``observed_batches``.
    """

    def __init__(self, spec: LayerSpec, config: Decorrelation, device: torch.device) -> None:
        super().__init__()
        self.spec = spec
        self.lr = float(config.lr)
        self.kappa = float(config.kappa)
        self.update_every = int(config.update_every)
        self.divergence_threshold = float(config.divergence_threshold)
        self.sync_statistics = bool(config.sync_statistics)
        self.blocks_per_group, self.block = _block_layout(spec.group_dim, spec.block)
        self.num_rows = max(MIN_ROWS, math.ceil(config.rows_per_dim * self.block))
        num_blocks = spec.groups * self.blocks_per_group
        self.register_buffer("matrix", torch.empty(num_blocks, self.block, self.block, device=device))
        self.register_buffer("feature_mask", torch.empty(num_blocks, self.block, device=device), persistent=False)
        for name in ("updates", "rejected_updates", "observed_batches"):
            self.register_buffer(name, torch.empty((), dtype=torch.long, device=device))
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(_keep_state_missing_from_checkpoint, with_module=True)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """R = I, counters zero. Also the hook that re-initialises state after ``to_empty`` (meta models)."""
        self.matrix.copy_(torch.eye(self.block, device=self.matrix.device).expand_as(self.matrix))
        padded = torch.arange(self.blocks_per_group * self.block, device=self.matrix.device) < self.spec.group_dim
        self.feature_mask.copy_(padded.view(self.blocks_per_group, self.block).repeat(self.spec.groups, 1))
        for counter in (self.updates, self.rejected_updates, self.observed_batches):
            counter.zero_()
        self._eager_calls = 0

    def extra_repr(self) -> str:
        return (f"layer={self.spec.owner_path}.{self.spec.attr}, groups={self.spec.groups}, "
                f"d={self.spec.group_dim}, blocks={self.blocks_per_group}x{self.block}, rows={self.num_rows}")

    # ----------------------------------------------------------------------------- fused weight
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the fused weight ``W·R`` (``Rᵀ·W`` for a (d, out) matmul operand)."""
        if self.spec.contracted_axis == 0:
            return self._right_multiply(weight.t()).t()
        return self._right_multiply(weight)

    def _matrix_snapshot(self, dtype: torch.dtype) -> torch.Tensor:
        # Autograd saves R to form ∂L/∂W = ∂L/∂A·Rᵀ; a module called twice in one forward updates R
        # in place between the calls, so each call multiplies by its own copy (b² per call).
        return self.matrix.detach().to(dtype, copy=True)

    def _right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        groups, d, blocks, b = self.spec.groups, self.spec.group_dim, self.blocks_per_group, self.block
        matrix = self._matrix_snapshot(weight.dtype)
        if groups == 1 and blocks == 1:  # the common case: one dense product, no block plumbing
            return (weight.reshape(weight.shape[0], d) @ matrix[0]).reshape(weight.shape)
        w = weight.reshape(groups, weight.shape[0] // groups, d)
        if blocks * b != d:
            w = F.pad(w, (0, blocks * b - d))
        w = w.view(groups, w.shape[1], blocks, b)
        r = matrix.view(groups, blocks, b, b)
        fused = torch.einsum("gonb,gnbc->gonc", w, r).reshape(groups, w.shape[1], blocks * b)
        return fused[..., :d].reshape(weight.shape)

    # ----------------------------------------------------------------------------- update
    def observe(self, inputs: Sequence[torch.Tensor]) -> None:
        """Update R from the layer inputs of one training forward (no host synchronisation)."""
        with torch.no_grad(), torch.autocast(device_type=self.matrix.device.type, enabled=False):
            self.observed_batches.add_(1)
            gate = self._update_gate()
            if gate is False:
                return
            rows = torch.cat([self._sample_rows(x) for x in inputs], dim=0)
            self._update(rows, gate)

    def _update_gate(self):
        """True/False decided in Python (eager), or a 0-dim bool tensor when compiling.

        Under torch.compile a Python counter would be guarded on and recompile every step, so the
        ``update_every`` schedule becomes a device-side mask of the update instead.
        """
        if self.update_every == 1:
            return True
        if is_compiling():
            return (self.observed_batches - 1) % self.update_every == 0
        self._eager_calls += 1
        return (self._eager_calls - 1) % self.update_every == 0

    def _sample_rows(self, x: torch.Tensor, num_rows: Optional[int] = None) -> torch.Tensor:
        """Random rows of the layer input as (n, groups, d) in fp32 (all rows if fewer than n)."""
        num_rows = num_rows or self.num_rows
        if self.spec.kind == "conv":
            rows = _sample_patches(x, self.spec.conv, num_rows)
        else:
            flat = x.detach().reshape(-1, x.shape[-1])
            if flat.shape[0] > num_rows:
                flat = flat[torch.randint(flat.shape[0], (num_rows,), device=flat.device)]
            rows = flat
        return rows.to(torch.float32).view(rows.shape[0], self.spec.groups, self.spec.group_dim)

    def _decorrelated_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """z = R·x per block: (n, groups, d) rows → (n, blocks, b), padded features zero."""
        groups, d, blocks, b = self.spec.groups, self.spec.group_dim, self.blocks_per_group, self.block
        if blocks * b != d:
            rows = F.pad(rows, (0, blocks * b - d))
        return torch.einsum("nkb,kcb->nkc", rows.view(rows.shape[0], groups * blocks, b), self.matrix)

    def _update(self, rows: torch.Tensor, gate) -> None:
        n, b = rows.shape[0], self.block
        z = self._decorrelated_rows(rows)
        if n < b and not self._syncing():
            # Fewer rows than features: C·R = (ZᵀZ/n)·R − diag(var)·R as Zᵀ(Z·R)/n costs 3·n·b²
            # instead of n·b² + b³ for forming C and multiplying.
            variance = (z * z).mean(dim=0)
            gram_times_matrix = torch.einsum("nkc,nke->kce", z, torch.einsum("nkc,kce->nke", z, self.matrix)) / n
            off_diagonal_times_matrix = gram_times_matrix - variance.unsqueeze(-1) * self.matrix
        else:
            covariance = self._average_over_ranks(torch.einsum("nkc,nke->kce", z, z) / n)
            variance = torch.diagonal(covariance, dim1=-2, dim2=-1)
            off_diagonal_times_matrix = (covariance - torch.diag_embed(variance)) @ self.matrix
        excess_variance = (variance - 1.0) * self.feature_mask  # padded features stay untouched
        step = (1.0 - self.kappa) * off_diagonal_times_matrix + self.kappa * excess_variance.unsqueeze(-1) * self.matrix
        proposal = self.matrix - self.lr * step
        accepted = torch.isfinite(proposal).all() & (proposal.abs().amax() <= self.divergence_threshold)
        # ``gate`` is True (eager/update every step) or a device bool (compiled update_every schedule).
        applied = accepted if gate is True else accepted & gate
        rejected = ~accepted if gate is True else gate & ~accepted
        self.matrix.copy_(torch.where(applied, proposal, self.matrix))
        self.updates.add_(applied.long())
        self.rejected_updates.add_(rejected.long())

    def _syncing(self) -> bool:
        return (self.sync_statistics and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    def _average_over_ranks(self, covariance: torch.Tensor) -> torch.Tensor:
        if not self._syncing():
            return covariance
        return functional_all_reduce_mean(covariance)

    # ----------------------------------------------------------------------------- diagnostics
    def off_diagonal_correlation(self, x: torch.Tensor, num_rows: int = 1 << 16) -> torch.Tensor:
        """Mean |corr(z_i, z_j)| over i≠j within blocks, on up to ``num_rows`` rows of input ``x``."""
        with torch.no_grad():
            z = self._decorrelated_rows(self._sample_rows(x, num_rows))
            z = z - z.mean(dim=0, keepdim=True)
            cov = torch.einsum("nkc,nke->kce", z, z) / z.shape[0]
            std = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(1e-12).sqrt()
            corr = cov / (std.unsqueeze(-1) * std.unsqueeze(-2))
            mask = self.feature_mask.unsqueeze(-1) * self.feature_mask.unsqueeze(-2)
            mask = mask * (1 - torch.eye(self.block, device=mask.device))
            return (corr.abs() * mask).sum() / mask.sum().clamp_min(1)


def _keep_state_missing_from_checkpoint(module, state_dict, prefix, *args) -> None:
    """Let checkpoints saved before the transform load with ``strict=True``: missing R keeps its value."""
    for name, buffer in module.named_buffers(recurse=False):
        if name in module._non_persistent_buffers_set:
            continue
        state_dict.setdefault(prefix + name, buffer.detach().clone())


def _sample_patches(x: torch.Tensor, conv: ConvGeometry, num_rows: int) -> torch.Tensor:
    """Convolution patches of ``x`` as (n, C·k₁·…·k_s), channel-major like the weight.

    ``num_rows`` random patches, or every patch when the batch has no more than that.  Patches
    are gathered straight from the unpadded input: out-of-range taps are clamped and zeroed, so
    zero padding costs nothing and no unfold of the whole batch is materialised.
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
    patches = x[(index[0], slice(None), *index[1:])]  # (n, k₁, …, k_s, C)
    patches = patches * valid.unsqueeze(-1).to(patches.dtype)
    permutation = (0, dims + 1) + tuple(range(1, dims + 1))
    return patches.permute(permutation).reshape(n, -1)


def _patch_positions(batch: int, out_sizes: List[int], num_rows: int, device: torch.device) -> torch.Tensor:
    """(image, output position…) of each patch: all of them if there are at most ``num_rows``."""
    sizes = [batch] + [max(size, 1) for size in out_sizes]
    if math.prod(sizes) <= num_rows:
        grids = torch.meshgrid(*[torch.arange(size, device=device) for size in sizes], indexing="ij")
        return torch.stack([grid.reshape(-1) for grid in grids], dim=1)
    return torch.stack([torch.randint(size, (num_rows,), device=device) for size in sizes], dim=1)


class _ScopeObserver:
    """Forward pre-hook: hands the layer inputs of a module call to their DecorrelationStates."""

    def __init__(self) -> None:
        self.targets: List[Tuple[DecorrelationState, Tuple[InputLocation, ...]]] = []

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for state, locations in self.targets:
            if not state.training:
                continue
            inputs: List[torch.Tensor] = []
            for location in locations:
                value = kwargs[location.name] if location.name in kwargs else args[location.index]
                if not any(value is seen for seen in inputs):
                    inputs.append(value)
            state.observe(inputs)
        return None


# ------------------------------------------------------------------------------------ class swap
_DECORRELATED_CLASSES: Dict[Tuple[type, Tuple[str, ...]], type] = {}


def state_name(attr: str) -> str:
    return f"{attr}_decorrelation"


def _fused_weight_property(attr: str) -> property:
    child = state_name(attr)

    def fused_weight(self: nn.Module) -> torch.Tensor:
        return self._modules[child](self._parameters[attr])

    fused_weight.__doc__ = f"``{attr}`` seen by the forward: the decorrelated weight W·R (the parameter stays in _parameters)."
    return property(fused_weight)


def _decorrelated_class(cls: type, attrs: Tuple[str, ...]) -> type:
    """A subclass whose ``attr`` reads return ``W·R``; ``_parameters`` (and state_dict keys) are unchanged."""
    key = (cls, attrs)
    if key not in _DECORRELATED_CLASSES:
        namespace = {attr: _fused_weight_property(attr) for attr in attrs}
        namespace["_effcompile_original_class"] = cls
        namespace["_effcompile_decorrelated"] = attrs
        _DECORRELATED_CLASSES[key] = type(f"Decorrelated{cls.__name__}", (cls,), namespace)
    return _DECORRELATED_CLASSES[key]


def decorrelation_states(model: nn.Module) -> Dict[str, DecorrelationState]:
    """Plan layer key → DecorrelationState for every decorrelated layer of ``model``."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, DecorrelationState):
            out[layer_key(module.spec.owner_path, module.spec.attr)] = module
    return out


# ------------------------------------------------------------------------------------ the pass
class DecorrelationPass(ModelPass):
    config_type = Decorrelation

    def plan(self, model: nn.Module, captured: GraphCapture, config: Decorrelation) -> List[PlanRow]:
        tied = _tied_parameters(model)
        rows = []
        for candidate in captured.layers:
            rows.append(self._plan_layer(candidate, tied, config))
        rows.extend(self._unused_weights(model, captured, tied))
        return rows

    def _plan_layer(self, candidate: LayerCandidate, tied: Dict[str, List[str]], config: Decorrelation) -> PlanRow:
        first = candidate.uses[0]
        row = PlanRow(layer=candidate.layer, pass_name=self.name, action="decorrelate", op=first.op,
                      input_shape=first.input_shape, weight_shape=candidate.weight_shape)
        reason = self._skip_reason(candidate, tied)
        if reason:
            row.action, row.reason = "skip", reason
            return row
        spec = _layer_spec(candidate, config)
        blocks, block = _block_layout(spec.group_dim, spec.block)
        row.details = {"d": spec.group_dim, "groups": spec.groups, "blocks": f"{blocks}x{block}",
                       "row_cap": max(MIN_ROWS, math.ceil(config.rows_per_dim * block))}
        if len(candidate.uses) > 1:
            row.details["uses"] = len(candidate.uses)
        row.spec = spec
        return row

    @staticmethod
    def _skip_reason(candidate: LayerCandidate, tied: Dict[str, List[str]]) -> str:
        if candidate.param_fqn in tied:
            return f"tied weight shared with {', '.join(tied[candidate.param_fqn])}"
        if candidate.other_uses:
            return f"the weight is also used by {', '.join(sorted(set(candidate.other_uses)))}"
        for use in candidate.uses:
            if use.unsupported:
                return f"{use.unsupported} ({use.op} in {use.scope or '<root>'})"
        kinds = {(use.op, use.conv, use.contracted_axis, use.input_shape[-1:] if use.conv is None else None)
                 for use in candidate.uses}
        if len(kinds) > 1:
            return "the weight is used by ops of different kinds or shapes"
        for use in candidate.uses:
            if use.input_unobservable:
                return f"layer input not observable: {use.input_unobservable}"
        return ""

    @staticmethod
    def _unused_weights(model: nn.Module, captured: GraphCapture, tied: Dict[str, List[str]]) -> List[PlanRow]:
        """Weights of linear/conv modules the graph never used as a layer weight: say so."""
        found = {candidate.param_fqn for candidate in captured.layers}
        rows = []
        for path, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear)):
                fqn = f"{path}.weight" if path else "weight"
                if fqn not in found and getattr(module, "weight", None) is not None:
                    if fqn in tied:
                        reason = f"tied weight shared with {', '.join(tied[fqn])}"
                    elif getattr(module, "transposed", False):
                        reason = "transposed convolution"
                    else:
                        reason = "its weight is not used as a linear/conv weight in the captured forward"
                    rows.append(PlanRow(layer=path or "<root>", pass_name="decorrelation", action="skip",
                                        op=type(module).__name__, weight_shape=tuple(module.weight.shape),
                                        reason=reason))
        return rows

    def apply(self, model: nn.Module, rows: List[PlanRow], config: Decorrelation) -> int:
        observers: Dict[str, _ScopeObserver] = {}
        by_owner: Dict[str, List[LayerSpec]] = {}
        for row in rows:
            by_owner.setdefault(row.spec.owner_path, []).append(row.spec)
        for owner_path, specs in by_owner.items():
            owner = model.get_submodule(owner_path)
            for spec in specs:
                weight = owner._parameters[spec.attr]
                state = DecorrelationState(spec, config, weight.device)
                owner.add_module(state_name(spec.attr), state)
                for scope, locations in spec.scopes:
                    observers.setdefault(scope, _ScopeObserver()).targets.append((state, locations))
            attrs = tuple(sorted(spec.attr for spec in specs))
            owner.__class__ = _decorrelated_class(type(owner), attrs)
        handles = []
        for scope, observer in observers.items():
            handles.append(model.get_submodule(scope).register_forward_pre_hook(observer, with_kwargs=True))
        model.__dict__.setdefault("_effcompile_hooks", {}).setdefault(self.name, []).extend(handles)
        return sum(len(specs) for specs in by_owner.values())

    def is_applied(self, model: nn.Module) -> bool:
        return any(isinstance(module, DecorrelationState) for module in model.modules())

    def fold(self, model: nn.Module) -> int:
        folded = 0
        for module in list(model.modules()):
            attrs = type(module).__dict__.get("_effcompile_decorrelated")
            if not attrs:
                continue
            with torch.no_grad():
                for attr in attrs:
                    parameter = module._parameters[attr]
                    parameter.copy_(module._modules[state_name(attr)](parameter))
                    del module._modules[state_name(attr)]
                    folded += 1
            module.__class__ = type(module)._effcompile_original_class
        for handle in model.__dict__.get("_effcompile_hooks", {}).pop(self.name, []):
            handle.remove()
        return folded

    def live_details(self, model: nn.Module, row: PlanRow) -> Dict[str, object]:
        state = decorrelation_states(model).get(row.layer)
        if state is None:
            return {}
        return {"updates": int(state.updates), "rejected": int(state.rejected_updates)}


def _layer_spec(candidate: LayerCandidate, config: Decorrelation) -> LayerSpec:
    first = candidate.uses[0]
    shape = candidate.weight_shape
    if first.conv is not None:
        groups = first.conv.groups
        group_dim = math.prod(shape[1:])
        kind = "conv"
    else:
        groups, group_dim, kind = 1, shape[first.contracted_axis], "linear"
    scopes: Dict[str, List[InputLocation]] = {}
    for use in candidate.uses:
        locations = scopes.setdefault(use.scope, [])
        if use.input_location not in locations:
            locations.append(use.input_location)
    return LayerSpec(
        param_fqn=candidate.param_fqn, owner_path=candidate.owner_path, attr=candidate.attr, kind=kind,
        contracted_axis=first.contracted_axis, groups=groups, group_dim=group_dim,
        block=config.max_block_size, conv=first.conv,
        scopes=tuple((scope, tuple(locations)) for scope, locations in scopes.items()),
    )


def _tied_parameters(model: nn.Module) -> Dict[str, List[str]]:
    names_by_id: Dict[int, List[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(parameter), []).append(name)
    tied = {}
    for names in names_by_id.values():
        if len(names) > 1:
            for name in names:
                tied[name] = [other for other in names if other != name]
    return tied


register_pass(DecorrelationPass())
