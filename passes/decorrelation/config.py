"""The Decorrelation config: validated at construction, registered by its ``name``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Union

from effcompile.config import PassConfig, is_int, is_real, register_config

__all__ = ["APPLY_SIDES", "STRUCTURES", "UPDATE_DTYPES", "Decorrelation"]

APPLY_SIDES = ("auto", "weight", "input")
UPDATE_DTYPES = ("auto", "float32", "bfloat16")
STRUCTURES = ("auto", "blocks", "kronecker")


@register_config
@dataclasses.dataclass(frozen=True)
class Decorrelation(PassConfig):
    """Decorrelated backpropagation (Dalm et al., arXiv 2405.02385).

    Each linear/conv layer with input dimension ``d`` gets a decorrelation matrix ``R`` (d×d, or
    block-diagonal when ``d > max_block_size``); the layer computes ``(W·R)·x`` and, in training
    mode, updates ``R ← R − lr·[(1−kappa)·C·R + kappa·diag(v)·R]`` from ``rows_per_dim·d``
    sampled input rows before each forward (``C``: off-diagonal covariance of ``z = R·x``,
    ``v_j = mean(z_j²) − 1``).

    Fields:
        lr: step size η of the R update, in (0, 1).  A step longer than ``state.MAX_STEP`` (0.5,
            Frobenius norm of η·A below) is shortened to it, so a large η cannot diverge; near
            convergence the step is the plain one.  The default 0.01 (the top of the reference's
            1e-4..1e-2) reached 95% on digits in fewer epochs than 1e-3 (MLP 3.3 vs 4.0, three
            seeds) and 0.95 on mnist5k's CNN sooner (5.3 vs 6.0 epochs); 0.03 and above gained
            nothing more and 0.03 kept the mnist5k CNN below 95%.
        kappa: weight κ of the variance-normalising term, in [0, 1] (0: decorrelate only).
        rows_per_dim: statistics use at most ``rows_per_dim · d`` sampled input rows (patches
            for convolutions) per update.
        max_block_size: layers with ``d`` above this get a block-diagonal R of blocks of at most
            this size (per group for grouped convolutions).
        update_every: update R every k-th training forward.
        divergence_threshold: an update whose R has a non-finite entry or an entry with
            ``|R_ij|`` above this is rejected (R rolls back to its last good value and the event
            is counted in the report).
        sync_statistics: average the statistics over ranks when torch.distributed is
            initialised, so R stays identical on every rank (DDP).
        max_overhead: a budget for the pass's own work per training step (the fused W·R products
            and the amortised R updates), as a fraction of the decorrelated layers' plain training
            work (forward + backward MACs, from the captured graph at the example's batch size).
            The cost model (``cost.py``) gives each layer a ladder of configurations (smaller
            blocks ≤ ``max_block_size``, longer update intervals ≥ ``update_every``) and steps the
            most expensive layers down it until the whole model meets the budget; the Plan shows
            each layer's choice, its own predicted overhead and the model's, and warns where even
            the cheapest choice exceeds it.  An interval longer than ``update_every`` takes a
            proportionally longer step (``lr · interval / update_every``, at most 0.5; the Plan's
            ``lr``), so R decorrelates as fast per training step.  ``"auto"`` (the default): a
            budget of 0.15 that never goes below blocks of 64 features (smaller ones decorrelate
            too little) or an update every 16 steps, and is not warned about where a small batch
            puts it out of reach (the Plan still says so).  ``None``: no budget (the knobs as
            given).
        apply: where R is applied.  ``"weight"``: the fused weight ``W·R`` (costs ``2·|W|·b``
            MACs per step, whatever the batch).  ``"input"``: the layer input, ``z = x·Rᵀ`` and
            then the plain layer on ``z`` (``2·rows·d·b``: cheaper when the batch has fewer rows
            than the layer has outputs).  Same function, same gradient ``∂L/∂W = δ·zᵀ``.  The
            input side needs a linear/matmul layer whose input is an argument of its module call
            that feeds nothing else there (the Plan says why a layer keeps the weight side).
            ``"auto"`` (the default): per layer, the side the cost model finds cheaper.
        update_dtype: the dtype of the R update's matrix products (the statistic, ``Σ = R·S·Rᵀ``
            and ``Σ·R``); R itself, the row scaling and the step stay float32, so only the
            increment ``η·(...)`` is rounded.  ``"bfloat16"`` rounds the operands to 8 bits of
            mantissa (relative error 2⁻⁹, against the statistic's sampling error of about
            ``1/√n`` ≈ 3% at ``rows_per_dim=4``) and runs the products 2–4x faster where the
            hardware multiplies bf16 natively.  ``"auto"`` (the default): bfloat16 for layers whose
            update costs at least 2²⁵ MACs (at the example's batch) on such hardware (CUDA from Ampere,
            x86 CPUs with AVX512-BF16 or AMX), float32 otherwise (smaller products are
            dispatch-bound: the casts would cost more than they save).  Resolved per layer when
            the state is built or moved (``.to``); the report shows each layer's choice.
        input_layers: also decorrelate the input layers, those applied to one of the model's own
            inputs (raw pixels, tabular columns; seen through views, reshapes, casts and a fixed
            rescaling such as ``(x − mean) / std`` with numbers or buffers only).
            Off by default, and the Plan lists them as skipped: whitening raw input features
            trains faster but can generalise worse.  On mnist5k (4,000 training images of 784
            pixels) an MLP with its input layer decorrelated fit the training set sooner and
            ended at 0.89–0.90 test accuracy against backprop's 0.92–0.93; with only the hidden
            layers decorrelated it reached 0.92 in 4.7 epochs (backprop 6) and ended at 0.94.  On
            digits (64 pixels) the input layer helped a little (MLP 3.3 vs 4.0 epochs to 95%),
            on the CNNs' 3×3 input patches it made no clear difference.  Composed with the
            randomized VJP, decorrelating a CNN's stem steadied training (mnist5k, all four passes: 95% on 3 of 3
            seeds against 0 of 3 with the stem left alone): pass True there (README).
        structure: how R is structured for a convolution with a k×k kernel (``C`` channels per
            group, ``s = k·k`` taps; linear layers and 1×1 convolutions always take blocks).
            ``"blocks"``: dense, or block-diagonal past ``max_block_size`` or under the budget
            (a block of ``b`` features spans ``b/s`` channels).  ``"kronecker"``: ``R = R_channel
            ⊗ R_spatial`` per group (kronecker.py): every channel against every other and the
            taps against each other, with no ``(C·s)³`` term.  ``"auto"`` (the default): a dense R over
            the whole patch where the budget affords it, else the Kronecker R before any smaller
            block (cost.py; without a budget, Kronecker where the patch exceeds
            ``max_block_size``).  On a 2-core CPU (2026-12-05), ResNet-18 width 32, batch 128:
            step 1.15x/1.14x backprop (eager/compiled) with ``"auto"``, 1.17x/1.17x with
            ``"blocks"``, 1.09x/1.08x with ``"kronecker"``; mnist5k's CNN (batch 64, where
            ``"auto"`` takes Kronecker for both hidden convolutions) reached 95% in 5.3 epochs
            against 4.7 with blocks (3 seeds; backprop 10.5 on the 2 seeds that reach it), its
            step 1.03x backprop against 1.21x.
    """

    name: ClassVar[str] = "decorrelation"

    lr: float = 1e-2
    kappa: float = 0.5
    rows_per_dim: float = 4.0
    max_block_size: int = 1024
    update_every: int = 1
    divergence_threshold: float = 1e3
    sync_statistics: bool = True
    max_overhead: Union[float, str, None] = "auto"
    apply: str = "auto"
    update_dtype: str = "auto"
    input_layers: bool = False
    structure: str = "auto"

    def __post_init__(self) -> None:
        if not (is_real(self.lr) and 0 < self.lr < 1):
            self._fail("lr", "a real number in (0, 1)")
        if not (is_real(self.kappa) and 0 <= self.kappa <= 1):
            self._fail("kappa", "a real number in [0, 1]")
        if not (is_real(self.rows_per_dim) and 0 < self.rows_per_dim <= 1024):
            self._fail("rows_per_dim", "a real number in (0, 1024]")
        if not (is_int(self.max_block_size) and self.max_block_size >= 1):
            self._fail("max_block_size", "an integer >= 1")
        if not (is_int(self.update_every) and self.update_every >= 1):
            self._fail("update_every", "an integer >= 1")
        if not (is_real(self.divergence_threshold) and self.divergence_threshold > 1):
            self._fail("divergence_threshold", "a real number > 1")
        if not isinstance(self.sync_statistics, bool):
            self._fail("sync_statistics", "a bool")
        if not (self.max_overhead is None or self.max_overhead == "auto"
                or (is_real(self.max_overhead) and 0 < self.max_overhead <= 100)):
            self._fail("max_overhead", "'auto', None or a real number in (0, 100]")
        if self.apply not in APPLY_SIDES:
            self._fail("apply", f"one of {APPLY_SIDES}")
        if self.update_dtype not in UPDATE_DTYPES:
            self._fail("update_dtype", f"one of {UPDATE_DTYPES}")
        if not isinstance(self.input_layers, bool):
            self._fail("input_layers", "a bool")
        if self.structure not in STRUCTURES:
            self._fail("structure", f"one of {STRUCTURES}")
