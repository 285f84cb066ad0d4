"""Kronecker-structured R for k×k convolutions: ``R = R_channel ⊗ R_spatial`` per group.

A convolution's patch of ``C`` channels and ``s = k₁·…·k_n`` kernel taps is stored channel-major
(feature ``c·s + t``), so a patch is a ``C×s`` matrix ``X`` and the dense ``(C·s)²`` R of the
block structure acts on ``vec(X)``.  With ``R = R_c ⊗ R_s`` (``torch.kron(R_c, R_s)``)::

    z = R·vec(X)        ⇔   Z = R_c · X · R_sᵀ
    A = W·R             ⇔   A[o] = R_cᵀ · W[o] · R_s        (W[o]: C×s, per output channel)

so the layer's function and ``∂L/∂W = δ·zᵀ`` are those of the dense R it stands for, at
``(C + s)/(C·s)`` of its parameters: every channel is decorrelated against every other (a block
of the block structure spans only ``b/s`` channels) and the update has no ``(C·s)³`` term.

Update, from ``n`` sampled patches (every patch gives ``s`` channel vectors and ``C`` tap vectors):

    Σ_c = Σ_p Z_p·Z_pᵀ / (n·s)          (C×C: channel second moment, averaged over the taps)
    Σ_s = Σ_p Z_pᵀ·Z_p / (n·C)          (s×s: tap second moment, averaged over the channels)
    R_c ← R_c − η[(1−κ)·(Σ_c − diag Σ_c) + κ·diag(v_c − 1)]·R_c
    R_s ← R_s − η[(1−κ)·(Σ̂_s − diag Σ̂_s) + κ·diag(v̂_s − 1)]·R_s,   Σ̂_s = Σ_s / mean(diag Σ_s)

``R_c ⊗ R_s`` equals ``(a·R_c) ⊗ (R_s / a)``: the overall scale is one degree of freedom, which
the channel factor carries (its variance term drives the mean of ``z²`` to 1, as the dense rule
does); the spatial factor sees its statistic relative to that scale, so it only decorrelates the
taps and equalises their variances, and the two variance terms do not both correct one error.
Each factor's step is shortened to ``‖η·A‖_F ≤ MAX_STEP`` as in the block structure.

Cost per update (MACs, per group): ``Z`` (n·C²·s + n·C·s²), ``Σ_c`` (n·C²·s), ``Σ_s`` (n·C·s²),
the two steps (C³ + s³): :func:`kronecker_update_macs`.  Applying it to the weight costs
``|W|·(C + s)`` forward and the same backward (:func:`kronecker_apply_macs`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .config import Decorrelation
from .state import MAX_STEP, MIN_ROWS, DecorrelationState, LayerSpec

__all__ = ["KroneckerDecorrelationState", "kronecker_factors", "kronecker_rows", "kronecker_update_macs",
           "kronecker_apply_macs", "KRONECKER_APPLY_OPS", "KRONECKER_UPDATE_OPS"]

# Ops per step of applying R (two products, their backward, the views) and per update.
KRONECKER_APPLY_OPS = 8
KRONECKER_UPDATE_OPS = 32


def kronecker_factors(spec: LayerSpec) -> Tuple[int, int]:
    """(channels per group C, kernel taps s) of a convolution's patch; ``C·s == spec.group_dim``."""
    if spec.conv is None:
        raise ValueError(f"{spec.owner_path}.{spec.attr}: a Kronecker-structured R needs a convolution")
    taps = math.prod(spec.conv.kernel_size)
    return spec.group_dim // taps, taps


def kronecker_rows(channels: int, taps: int, rows_per_dim: float) -> int:
    """Patches per update: ``rows_per_dim`` rows per dimension of each factor (a patch gives
    ``s`` rows of the channel statistic and ``C`` of the tap statistic), at least ``MIN_ROWS``."""
    return max(MIN_ROWS, math.ceil(rows_per_dim * max(channels / taps, taps / channels)))


def kronecker_update_macs(n: int, channels: int, taps: int) -> int:
    """MACs of one update of one group's factors from ``n`` patches (module docstring)."""
    return 2 * n * channels * taps * (channels + taps) + channels ** 3 + taps ** 3


def kronecker_apply_macs(weight_numel: int, channels: int, taps: int) -> int:
    """MACs per step of ``A = R_cᵀ·W·R_s`` and its backward."""
    return 2 * weight_numel * (channels + taps)


class KroneckerDecorrelationState(DecorrelationState):
    """A convolution's R as ``R_channel ⊗ R_spatial`` per group (module docstring).

    Buffers (all in ``state_dict``): ``matrix`` (groups, C, C) the channel factor and
    ``spatial_matrix`` (groups, s, s) the spatial one, fp32; the counters of
    :class:`DecorrelationState`.  ``dense_matrix()`` is the R they stand for.
    """

    def __init__(self, spec: LayerSpec, config: Decorrelation, device: torch.device) -> None:
        # nn.Module's init, not DecorrelationState's (that one makes the block structure's buffers);
        # the shared settings and counters come from the same helpers it uses.
        torch.nn.Module.__init__(self)
        self._configure(spec, config)
        if spec.side != "weight":
            raise ValueError(f"{spec.owner_path}.{spec.attr}: a Kronecker-structured R is applied on the weight side")
        self.channels, self.taps = kronecker_factors(spec)
        # The block structure's names, for code that reports any state: one block per group.
        self.blocks_per_group, self.block = 1, spec.group_dim
        self.num_rows = kronecker_rows(self.channels, self.taps, config.rows_per_dim)
        self._dense = False
        groups = spec.groups
        self.register_buffer("matrix", torch.empty(groups, self.channels, self.channels, device=device))
        self.register_buffer("spatial_matrix", torch.empty(groups, self.taps, self.taps, device=device))
        self.register_buffer("feature_mask", torch.empty(groups, spec.group_dim, device=device), persistent=False)
        self._finish_init(device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """R_c = I, R_s = I (so R = I), counters zero."""
        device = self.matrix.device
        self.matrix.copy_(torch.eye(self.channels, device=device).expand_as(self.matrix))
        self.spatial_matrix.copy_(torch.eye(self.taps, device=device).expand_as(self.spatial_matrix))
        self.feature_mask.fill_(1.0)
        self._reset_counters()

    def _update_macs(self, n: int) -> int:
        # Every group's factors from n patches (kronecker_update_macs): what update_dtype="auto" weighs.
        return self.spec.groups * kronecker_update_macs(n, self.channels, self.taps)

    def extra_repr(self) -> str:
        return (f"layer={self.spec.owner_path}.{self.spec.attr}, groups={self.spec.groups}, "
                f"d={self.spec.group_dim}, kronecker={self.channels}x{self.channels} ⊗ {self.taps}x{self.taps}, "
                f"rows={self.num_rows}")

    @torch.no_grad()
    def dense_matrix(self) -> torch.Tensor:
        """(groups, d, d): the R the factors stand for, ``R_c ⊗ R_s`` per group."""
        return torch.stack([torch.kron(c, s) for c, s in zip(self.matrix, self.spatial_matrix)])

    # ----------------------------------------------------------------------------- applying R
    def decorrelated_input(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a Kronecker-structured R acts on convolution patches: it is applied on the weight")

    def _factor_snapshots(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Copies of (R_c, R_s) as the product uses them (DecorrelationState._matrix_snapshot: why)."""
        channel, spatial = self.matrix, self.spatial_matrix
        return self._snapshot_of((channel, spatial), dtype, lambda: (channel.detach().to(dtype, copy=True),
                                                                     spatial.detach().to(dtype, copy=True)))

    def _right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        """``A[o] = R_cᵀ·W[o]·R_s`` as two GEMMs over the whole weight (a batched product per
        output channel is |W|/s tiny GEMMs: 7x slower on ResNet-18's layer4 on the development CPU)."""
        groups, channels, taps = self.spec.groups, self.channels, self.taps
        channel, spatial = self._factor_snapshots(weight.dtype)
        per_group = weight.shape[0] // groups
        # Rows (o, t) of W[o]ᵀ times R_c: (W[o]ᵀ·R_c)[t, d] = (R_cᵀ·W[o])[d, t].
        by_tap = weight.reshape(groups, per_group, channels, taps).transpose(2, 3).reshape(groups, -1, channels)
        left = torch.bmm(by_tap, channel).view(groups, per_group, taps, channels)
        by_channel = left.transpose(2, 3).reshape(groups, per_group * channels, taps)
        return torch.bmm(by_channel, spatial).reshape(weight.shape)  # (R_cᵀ·W[o])·R_s

    # ----------------------------------------------------------------------------- update
    def _update(self, rows: torch.Tensor, gate, formula=None) -> None:
        """One step of both factors from sampled patches (n, groups, C·s) (module docstring)."""
        if formula is not None:
            raise ValueError("a Kronecker-structured R has one update formula")
        self._commit(self._proposal, (self.matrix, self.spatial_matrix, rows), gate)

    def _proposal(self, channel: torch.Tensor, spatial: torch.Tensor, rows: torch.Tensor):
        n, groups, channels, taps = rows.shape[0], self.spec.groups, self.channels, self.taps
        low = self.update_dtype
        x = rows.reshape(n, groups, channels, taps).permute(1, 2, 0, 3).reshape(groups, channels, n * taps)
        y = torch.bmm(channel.to(low), x.to(low))  # R_c·X for every patch: (groups, C, n·s)
        z = torch.bmm(y.view(groups, channels * n, taps), spatial.transpose(1, 2).to(low))  # ·R_sᵀ
        by_channel = z.view(groups, channels, n * taps)
        channel_moment = torch.bmm(by_channel, by_channel.transpose(1, 2)).float() / (n * taps)
        spatial_moment = torch.bmm(z.transpose(1, 2), z).float() / (n * channels)
        channel_moment = self._average_over_ranks(channel_moment)
        spatial_moment = self._average_over_ranks(spatial_moment)
        # The spatial statistic relative to the overall scale, which R_c carries (module docstring).
        scale = torch.diagonal(spatial_moment, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        spatial_moment = spatial_moment / scale.view(-1, 1, 1)
        new_channel = self._factor_step(channel, channel_moment)
        new_spatial = self._factor_step(spatial, spatial_moment)
        largest = torch.maximum(new_channel.abs().amax(), new_spatial.abs().amax())
        return new_channel, new_spatial, largest <= self.divergence_threshold

    def _factor_step(self, matrix: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
        """``M ← M − η·A·M``, ``A = (1−κ)·(Σ − diag Σ) + κ·diag(v − 1)``, shortened to
        ``‖η·A‖_F ≤ MAX_STEP`` per group (a NaN statistic gives a NaN proposal: rejected)."""
        variance = torch.diagonal(moment, dim1=-2, dim2=-1)
        direction = (1.0 - self.kappa) * moment + torch.diag_embed(self.kappa * (variance - 1.0)
                                                                    - (1.0 - self.kappa) * variance)
        length = self.lr * torch.linalg.matrix_norm(direction)
        step = self.lr * (MAX_STEP / length).clamp(max=1.0)
        return matrix - step.view(-1, 1, 1) * torch.bmm(direction, matrix)

    # ----------------------------------------------------------------------------- diagnostics
    def _decorrelated_rows(self, rows: torch.Tensor, matrix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z = R·x with the dense R the factors stand for: (n, groups, d) rows → (groups, n, d)
        (what ``off_diagonal_correlation`` measures, over every pair of a group's features)."""
        return torch.bmm(self._padded_blocks(rows), self.dense_matrix().transpose(1, 2))
