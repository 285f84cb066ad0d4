"""Pass configurations: small validated dataclasses.

Every config is a frozen dataclass that checks its fields in ``__post_init__`` and raises
``ValueError`` naming the field and the allowed range, so a bad value fails at construction and
never halfway through training.  ``to_dict``/``from_dict`` round-trip a config through JSON (the
CLI and checkpoints use them).  ``PASS_CONFIGS`` maps a pass name (``config.name``) to its config
class; a new pass adds a config here and a handler in ``effcompile.passes``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Dict, Optional, Type

__all__ = ["PassConfig", "Decorrelation", "RandomizedVJP", "GreedyStages", "SampleSelection", "PASS_CONFIGS",
           "config_from_dict"]


def _check(condition: bool, cls_name: str, field: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{cls_name}.{field}={value!r} is invalid: expected {allowed}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base class of every pass configuration."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def to_dict(self) -> Dict[str, Any]:
        return {"pass": self.name, "version": self.version, **dataclasses.asdict(self)}

    def _fail(self, field: str, allowed: str) -> None:
        _check(False, type(self).__name__, field, getattr(self, field), allowed)


@dataclasses.dataclass(frozen=True)
class Decorrelation(PassConfig):
    """Decorrelated backpropagation (Dalm et al., arXiv 2405.02385).

    Each linear/conv layer with input dimension ``d`` gets a decorrelation matrix ``R`` (d×d, or
    block-diagonal when ``d > max_block_size``); the layer computes ``(W·R)·x`` and, in training
    mode, updates ``R ← R − lr·[(1−kappa)·C·R + kappa·diag(v)·R]`` from ``rows_per_dim·d``
    sampled input rows before each forward (``C``: off-diagonal covariance of ``z = R·x``,
    ``v_j = mean(z_j²) − 1``).

    Fields:
        lr: step size η of the R update, in (0, 1).
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
    """

    name: ClassVar[str] = "decorrelation"

    lr: float = 1e-3
    kappa: float = 0.5
    rows_per_dim: float = 4.0
    max_block_size: int = 1024
    update_every: int = 1
    divergence_threshold: float = 1e3
    sync_statistics: bool = True

    def __post_init__(self) -> None:
        if not (_is_real(self.lr) and 0 < self.lr < 1):
            self._fail("lr", "a real number in (0, 1)")
        if not (_is_real(self.kappa) and 0 <= self.kappa <= 1):
            self._fail("kappa", "a real number in [0, 1]")
        if not (_is_real(self.rows_per_dim) and 0 < self.rows_per_dim <= 1024):
            self._fail("rows_per_dim", "a real number in (0, 1024]")
        if not (_is_int(self.max_block_size) and self.max_block_size >= 1):
            self._fail("max_block_size", "an integer >= 1")
        if not (_is_int(self.update_every) and self.update_every >= 1):
            self._fail("update_every", "an integer >= 1")
        if not (_is_real(self.divergence_threshold) and self.divergence_threshold > 1):
            self._fail("divergence_threshold", "a real number > 1")
        if not isinstance(self.sync_statistics, bool):
            self._fail("sync_statistics", "a bool")


@dataclasses.dataclass(frozen=True)
class RandomizedVJP(PassConfig):
    """Randomized unbiased VJPs (Bakong et al., arXiv 2602.14701): sketched backward GEMMs.

    Fields:
        keep: fraction of the rows (sample·token rows) of each weight-gradient GEMM kept, in (0, 1]
            (with ``adaptive``: the starting keep, snapped to the ladder).
        estimator: ``"importance"`` (minimum-variance water-filling probabilities
            ``p_i = min(1, s_i/τ)`` with an ``uniform_mix`` share of uniform), ``"uniform"``, or
            ``"sketch"`` (rank-``k`` Gaussian sketch; weight gradients only).
        target: ``"grad_weight"`` (default: the ∂h/∂W term, so variance does not compound through
            depth), ``"grad_input"`` (sample output features of the input-gradient GEMM) or ``"both"``.
        keep_input: fraction of output features kept for ``grad_input``; defaults to ``keep``.
        uniform_mix: ε of the importance estimator, in [0, 1).
        multiple: k is rounded up to a multiple of this (hardware-friendly GEMM sizes);
            ``None`` picks 64 on CUDA and 8 on CPU.
        adaptive: VCAS-style variance control of each linear layer's grad_weight keep: every step
            the analytic added variance (at every ladder keep) and the layer's SGD noise are
            folded into on-device EMAs; every ``adapt_every`` steps the keep becomes the smallest
            ladder keep whose added variance is at most ``variance_ratio`` × SGD noise.
        variance_ratio: τ of the adaptive rule, in (0, 100].
        min_keep, max_keep: the keep ladder is ``max_keep·2^-r`` for r = 0, 1, ... while ≥ ``min_keep``;
            ``0 < min_keep <= max_keep <= 1``.
        adapt_every: steps between keep adjustments (each change recompiles the compiled step once).
        ema_decay: decay of the variance EMAs, in [0, 1).
        memory_mode: choose the grad_weight rows in the forward (scores ``‖x_t‖`` × the previous
            steps' gradient norm at that token position) and save only those rows of the input;
            linear layers only, with ``target="grad_weight"`` and a sampling estimator.
        exclude: ``fnmatch`` patterns of layer paths that keep exact backprop (explicit skip rows),
            e.g. ``("*.attn.*",)``.
    """

    name: ClassVar[str] = "randomized_vjp"

    keep: float = 0.25
    estimator: str = "importance"
    target: str = "grad_weight"
    keep_input: Optional[float] = None
    uniform_mix: float = 0.1
    multiple: Optional[int] = None
    adaptive: bool = False
    variance_ratio: float = 0.5
    min_keep: float = 0.125
    max_keep: float = 1.0
    adapt_every: int = 50
    ema_decay: float = 0.9
    memory_mode: bool = False
    exclude: tuple = ()

    ESTIMATORS: ClassVar[tuple] = ("importance", "uniform", "sketch")
    TARGETS: ClassVar[tuple] = ("grad_weight", "grad_input", "both")

    def __post_init__(self) -> None:
        if not (_is_real(self.keep) and 0 < self.keep <= 1):
            self._fail("keep", "a real number in (0, 1]")
        if self.estimator not in self.ESTIMATORS:
            self._fail("estimator", f"one of {self.ESTIMATORS}")
        if self.target not in self.TARGETS:
            self._fail("target", f"one of {self.TARGETS}")
        if self.keep_input is not None and not (_is_real(self.keep_input) and 0 < self.keep_input <= 1):
            self._fail("keep_input", "None or a real number in (0, 1]")
        if self.estimator == "sketch" and self.target != "grad_weight":
            self._fail("target", "'grad_weight' with estimator='sketch' (a rank sketch of the input gradient would be biased)")
        if not (_is_real(self.uniform_mix) and 0 <= self.uniform_mix < 1):
            self._fail("uniform_mix", "a real number in [0, 1)")
        if self.multiple is not None and not (_is_int(self.multiple) and self.multiple >= 1):
            self._fail("multiple", "None or an integer >= 1")
        self._check_adaptive()
        self._check_memory_mode()
        if isinstance(self.exclude, list):
            object.__setattr__(self, "exclude", tuple(self.exclude))  # JSON round trip gives a list
        if not (isinstance(self.exclude, tuple) and all(isinstance(p, str) and p for p in self.exclude)):
            self._fail("exclude", "a tuple of non-empty fnmatch patterns of layer paths")

    def _check_adaptive(self) -> None:
        if not isinstance(self.adaptive, bool):
            self._fail("adaptive", "a bool")
        if not (_is_real(self.variance_ratio) and 0 < self.variance_ratio <= 100):
            self._fail("variance_ratio", "a real number in (0, 100]")
        if not (_is_real(self.max_keep) and 0 < self.max_keep <= 1):
            self._fail("max_keep", "a real number in (0, 1]")
        if not (_is_real(self.min_keep) and 0 < self.min_keep <= self.max_keep):
            self._fail("min_keep", f"a real number in (0, max_keep={self.max_keep}]")
        if not (_is_int(self.adapt_every) and self.adapt_every >= 1):
            self._fail("adapt_every", "an integer >= 1")
        if not (_is_real(self.ema_decay) and 0 <= self.ema_decay < 1):
            self._fail("ema_decay", "a real number in [0, 1)")
        if self.adaptive and (self.estimator == "sketch" or self.target == "grad_input"):
            self._fail("adaptive", "False unless estimator is 'importance'/'uniform' and target samples grad_weight")

    def _check_memory_mode(self) -> None:
        if not isinstance(self.memory_mode, bool):
            self._fail("memory_mode", "a bool")
        if self.memory_mode and (self.target != "grad_weight" or self.estimator == "sketch" or self.adaptive):
            self._fail("memory_mode", "False unless target='grad_weight', estimator is 'importance'/'uniform' and "
                                      "adaptive=False (the adaptive statistics need every row of the input)")

    @property
    def input_keep(self) -> float:
        return self.keep if self.keep_input is None else self.keep_input

    @property
    def keep_ladder(self) -> tuple:
        """The adaptive keeps, largest first: ``max_keep·2^-r`` while ≥ ``min_keep`` (at least one)."""
        ladder = [float(self.max_keep)]
        while ladder[-1] / 2 >= self.min_keep * (1 - 1e-9):
            ladder.append(ladder[-1] / 2)
        return tuple(ladder)


@dataclasses.dataclass(frozen=True)
class GreedyStages(PassConfig):
    """Decoupled greedy learning (Belilovsky et al., ICML 2020): the network is cut into
    ``num_stages`` stages, each trained by its own auxiliary head and local loss.

    Fields:
        num_stages: number of stages K, an integer >= 2.
        cuts: ``None`` (cut search picks the boundaries) or ``num_stages − 1`` module paths, in
            forward order, whose outputs are the stage boundaries.
        head: auxiliary head kind: ``"auto"``, ``"mlp_sr"``, ``"pool_mlp"``, ``"mlp"`` or ``"linear"``.
        head_width: hidden width of the auxiliary heads; ``None`` picks a default.
        mode: ``"sync"`` (stages step one after another) or ``"async"`` (stages run decoupled,
            exchanging boundary activations through buffers).
        buffer: capacity of each boundary buffer in async mode, an integer >= 1.
        max_reuse: how often an async stage may reuse a buffered boundary batch, an integer >= 1.
        transport: boundary activation codec: ``"none"``, ``"int8"`` or ``"vq"``.
        vq_codebook_size: codebook entries of the ``vq`` transport, an integer >= 2.
        vq_group_size: channels per quantised group of the ``vq`` transport, an integer >= 1.
        vq_decay: EMA decay of the ``vq`` codebook updates, in [0, 1).
        bytes_weight: FLOP-equivalents per boundary byte in the cut cost, a real number >= 0.
        timeout_s: seconds an async stage waits for its input before failing, a real number > 0.
    """

    name: ClassVar[str] = "greedy_stages"

    num_stages: int = 2
    cuts: Optional[tuple] = None
    head: str = "auto"
    head_width: Optional[int] = None
    mode: str = "sync"
    buffer: int = 4
    max_reuse: int = 2
    transport: str = "none"
    vq_codebook_size: int = 256
    vq_group_size: int = 8
    vq_decay: float = 0.99
    bytes_weight: float = 1.0
    timeout_s: float = 60.0

    HEADS: ClassVar[tuple] = ("auto", "mlp_sr", "pool_mlp", "mlp", "linear")
    MODES: ClassVar[tuple] = ("sync", "async")
    TRANSPORTS: ClassVar[tuple] = ("none", "int8", "vq")

    def __post_init__(self) -> None:
        if not (_is_int(self.num_stages) and self.num_stages >= 2):
            self._fail("num_stages", "an integer >= 2")
        if self.cuts is not None:
            if isinstance(self.cuts, list):
                object.__setattr__(self, "cuts", tuple(self.cuts))  # JSON round trip gives a list
            if not (isinstance(self.cuts, tuple) and all(isinstance(c, str) for c in self.cuts)
                    and len(self.cuts) == self.num_stages - 1):
                self._fail("cuts", f"None or a tuple of num_stages-1={self.num_stages - 1} module paths")
        if self.head not in self.HEADS:
            self._fail("head", f"one of {self.HEADS}")
        if self.head_width is not None and not (_is_int(self.head_width) and self.head_width >= 1):
            self._fail("head_width", "None or an integer >= 1")
        if self.mode not in self.MODES:
            self._fail("mode", f"one of {self.MODES}")
        if not (_is_int(self.buffer) and self.buffer >= 1):
            self._fail("buffer", "an integer >= 1")
        if not (_is_int(self.max_reuse) and self.max_reuse >= 1):
            self._fail("max_reuse", "an integer >= 1")
        if self.transport not in self.TRANSPORTS:
            self._fail("transport", f"one of {self.TRANSPORTS}")
        if not (_is_int(self.vq_codebook_size) and self.vq_codebook_size >= 2):
            self._fail("vq_codebook_size", "an integer >= 2")
        if not (_is_int(self.vq_group_size) and self.vq_group_size >= 1):
            self._fail("vq_group_size", "an integer >= 1")
        if not (_is_real(self.vq_decay) and 0 <= self.vq_decay < 1):
            self._fail("vq_decay", "a real number in [0, 1)")
        if not (_is_real(self.bytes_weight) and self.bytes_weight >= 0):
            self._fail("bytes_weight", "a real number >= 0")
        if not (_is_real(self.timeout_s) and self.timeout_s > 0):
            self._fail("timeout_s", "a real number > 0")


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
            last-layer gradient; needs a linear head and a cross-entropy loss) or ``"random"``
            (uniform subset, weights 1/k: an unbiased estimate of the batch-mean loss).
        fixed_k: ``strategy="loss"`` only.  True: exactly k rows, drawn without replacement with
            probabilities ∝ percentile^beta (Gumbel top-k; uses the row-sparse backward).  False:
            every row is kept independently with probability percentile^beta (the original
            Selective Backprop; a random number of rows, so the backward runs over the full batch
            with a 0/1 weight mask and saves nothing).
        beta: exponent β of the selection probability percentile^β, in (0, 16].
        mode: ``"auto"`` (forward reuse unless the model has batch-coupled layers such as
            BatchNorm, then re-forward), ``"forward_reuse"`` (one forward over the batch, the
            backward over the selected rows only) or ``"reforward"`` (no-grad scoring forward in
            eval mode, then forward+backward of the selected rows).
        history_size: length of the rolling loss history used for percentiles, in [1, 2**20].
        gradmatch_ridge: ridge term of the OMP least-squares refits, relative to the mean squared
            proxy-gradient norm, in (0, 1).
        nnls_iterations: projected accelerated-gradient iterations of the final non-negative
            least-squares weight fit of ``gradmatch``, in [0, 1000].
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

    STRATEGIES: ClassVar[tuple] = ("loss", "gradmatch", "random")
    MODES: ClassVar[tuple] = ("auto", "forward_reuse", "reforward")

    def __post_init__(self) -> None:
        if not (_is_real(self.keep) and 0 < self.keep <= 1):
            self._fail("keep", "a real number in (0, 1]")
        if self.strategy not in self.STRATEGIES:
            self._fail("strategy", f"one of {self.STRATEGIES}")
        if not isinstance(self.fixed_k, bool):
            self._fail("fixed_k", "a bool")
        if not self.fixed_k and self.strategy != "loss":
            self._fail("fixed_k", "True unless strategy='loss' (only Selective Backprop has a probabilistic variant)")
        if not (_is_real(self.beta) and 0 < self.beta <= 16):
            self._fail("beta", "a real number in (0, 16]")
        if self.mode not in self.MODES:
            self._fail("mode", f"one of {self.MODES}")
        if not (_is_int(self.history_size) and 1 <= self.history_size <= 1 << 20):
            self._fail("history_size", "an integer in [1, 2**20]")
        if not (_is_real(self.gradmatch_ridge) and 0 < self.gradmatch_ridge < 1):
            self._fail("gradmatch_ridge", "a real number in (0, 1)")
        if not (_is_int(self.nnls_iterations) and 0 <= self.nnls_iterations <= 1000):
            self._fail("nnls_iterations", "an integer in [0, 1000]")

    @property
    def probabilistic(self) -> bool:
        """Whether the number of selected rows is random (probabilistic Selective Backprop)."""
        return self.strategy == "loss" and not self.fixed_k


# One line per pass config class.
PASS_CONFIGS: Dict[str, Type[PassConfig]] = {
    cls.name: cls
    for cls in (
        Decorrelation,
        RandomizedVJP,
        GreedyStages,
        SampleSelection,
    )
}


def config_from_dict(data: Dict[str, Any]) -> PassConfig:
    """Inverse of ``PassConfig.to_dict``; raises ``ValueError`` for an unknown pass or field."""
    data = dict(data)
    name = data.pop("pass", None)
    if name not in PASS_CONFIGS:
        raise ValueError(f"unknown pass {name!r}; known passes: {sorted(PASS_CONFIGS)}")
    cls = PASS_CONFIGS[name]
    version = data.pop("version", cls.version)
    if version != cls.version:
        raise ValueError(f"{cls.__name__} version {version} is not supported (this is version {cls.version})")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}; fields: {sorted(fields)}")
    return cls(**data)
