"""The SampleSelection config: validated at construction, registered by its ``name``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from effcompile.config import PassConfig, is_int, is_real, register_config

__all__ = ["SampleSelection"]


@register_config
@dataclasses.dataclass(frozen=True)
class SampleSelection(PassConfig):
    """Per-sample selection (Balles et al., arXiv 2312.05021): forward the batch, backpropagate a
    weighted subset of ``k = max(1, round(keep·B))`` rows.

    Fields:
        keep: fraction ``f`` of the batch that is backpropagated, in (0, 1].  Ignored by the
            probabilistic loss variant (``strategy="loss", fixed_k=False``), whose expected kept
            fraction is ``1/(beta+1)`` once the loss history is full.
        strategy: ``"loss"`` (Selective Backprop: rows with a high loss percentile in the rolling
            history are preferred, selection probability ∝ percentile^beta; unweighted, so biased
            towards hard samples), ``"gradmatch"`` (greedy non-negative OMP matching the batch-mean
            last-layer gradient of the user's loss; needs a linear head over the model output) or ``"random"``
            (uniform subset, weights 1/k: an unbiased estimate of the batch-mean loss).
        fixed_k: ``strategy="loss"`` only.  True: exactly k rows, drawn without replacement with
            probabilities ∝ percentile^beta (Gumbel top-k; uses the row-sparse backward).  False:
            every row is kept independently with probability percentile^beta (the original
            Selective Backprop; a random number of rows, so the backward runs over the full batch
            with a 0/1 weight mask and saves nothing).
        beta: exponent β of the selection probability percentile^β, in (0, 16].
        mode: ``"auto"`` (forward reuse unless the model has batch-coupled layers such as
            BatchNorm, then re-forward), ``"forward_reuse"`` (one forward over the batch, the
            backward over the selected rows only) or ``"reforward"`` (no-grad scoring forward over
            the batch — BatchNorm and other mode-dependent norms in train mode, i.e. normalised by
            the batch's statistics, with running stats saved and restored; dropout off; everything
            else in eval mode — then forward+backward of the selected rows).  Not available with
            greedy stages, whose step scores each stage on its own training forward.
        history_size: length of the rolling loss history used for percentiles, in [1, 2**20].
        gradmatch_ridge: ridge term of the OMP least-squares refits, relative to the mean squared
            proxy-gradient norm, in (0, 1).
        nnls_iterations: projected accelerated-gradient iterations of the final non-negative
            least-squares weight fit of ``gradmatch``, in [0, 1000].
        sync_history: under torch.distributed, write every data-parallel replica's batch losses
            into the loss history (one all-gather of B floats per step), so the history is the
            same on every rank and percentiles rank a row among the whole global batch's recent
            losses.  False: each rank keeps its own history.  Each rank always selects from its
            own batch.
    """

    name: ClassVar[str] = "sample_selection"

    keep: float = 0.5
    strategy: str = "loss"
    fixed_k: bool = True
    beta: float = 1.0
    mode: str = "auto"
    history_size: int = 1024
    gradmatch_ridge: float = 1e-3
    nnls_iterations: int = 50
    sync_history: bool = True

    STRATEGIES: ClassVar[tuple] = ("loss", "gradmatch", "random")
    MODES: ClassVar[tuple] = ("auto", "forward_reuse", "reforward")

    def __post_init__(self) -> None:
        if not (is_real(self.keep) and 0 < self.keep <= 1):
            self._fail("keep", "a real number in (0, 1]")
        if self.strategy not in self.STRATEGIES:
            self._fail("strategy", f"one of {self.STRATEGIES}")
        if not isinstance(self.fixed_k, bool):
            self._fail("fixed_k", "a bool")
        if not self.fixed_k and self.strategy != "loss":
            self._fail("fixed_k", "True unless strategy='loss' (only Selective Backprop has a probabilistic variant)")
        if not (is_real(self.beta) and 0 < self.beta <= 16):
            self._fail("beta", "a real number in (0, 16]")
        if self.mode not in self.MODES:
            self._fail("mode", f"one of {self.MODES}")
        if not (is_int(self.history_size) and 1 <= self.history_size <= 1 << 20):
            self._fail("history_size", "an integer in [1, 2**20]")
        if not (is_real(self.gradmatch_ridge) and 0 < self.gradmatch_ridge < 1):
            self._fail("gradmatch_ridge", "a real number in (0, 1)")
        if not (is_int(self.nnls_iterations) and 0 <= self.nnls_iterations <= 1000):
            self._fail("nnls_iterations", "an integer in [0, 1000]")
        if not isinstance(self.sync_history, bool):
            self._fail("sync_history", "a bool")

    @property
    def probabilistic(self) -> bool:
        """Whether the number of selected rows is random (probabilistic Selective Backprop)."""
        return self.strategy == "loss" and not self.fixed_k
