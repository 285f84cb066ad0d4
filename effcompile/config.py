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

__all__ = ["PassConfig", "Decorrelation", "RandomizedVJP", "PASS_CONFIGS", "config_from_dict"]


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
        keep: fraction of the rows (sample·token rows) of each weight-gradient GEMM kept, in (0, 1].
        estimator: ``"importance"`` (minimum-variance water-filling probabilities
            ``p_i = min(1, s_i/τ)`` with an ``uniform_mix`` share of uniform), ``"uniform"``, or
            ``"sketch"`` (rank-``k`` Gaussian sketch; weight gradients only).
        target: ``"grad_weight"`` (default: the ∂h/∂W term, so variance does not compound through
            depth), ``"grad_input"`` (sample output features of the input-gradient GEMM) or ``"both"``.
        keep_input: fraction of output features kept for ``grad_input``; defaults to ``keep``.
        uniform_mix: ε of the importance estimator, in [0, 1).
        multiple: k is rounded up to a multiple of this (hardware-friendly GEMM sizes);
            ``None`` picks 64 on CUDA and 8 on CPU.
    """

    name: ClassVar[str] = "randomized_vjp"

    keep: float = 0.25
    estimator: str = "importance"
    target: str = "grad_weight"
    keep_input: Optional[float] = None
    uniform_mix: float = 0.1
    multiple: Optional[int] = None

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

    @property
    def input_keep(self) -> float:
        return self.keep if self.keep_input is None else self.keep_input


# One line per pass config class.
PASS_CONFIGS: Dict[str, Type[PassConfig]] = {
    cls.name: cls
    for cls in (
        Decorrelation,
        RandomizedVJP,
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
