"""The RandomizedVJP config: validated at construction, registered by its ``name``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Union

from effcompile.config import PassConfig, is_int, is_real, register_config

__all__ = ["RandomizedVJP"]


@register_config
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
        center: a mean control variate for every weight-gradient estimator: sample the centred
            rows ``(g_t − ḡ)(x_t − x̄)ᵀ`` and add the exact ``M·ḡ·x̄ᵀ`` (still unbiased).  It cuts
            the added variance wherever the rows share a mean (inputs after a ReLU/GELU; layers
            followed by a train-mode BatchNorm, where ``ḡ = 0`` and the plain terms cancel).
            ``False`` gives the paper's plain estimators.
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
        profitable_only: leave exact (a skip row giving the prediction) every layer whose sketch the
            cost model (``cost.py``) predicts makes the step slower than exact backprop at the
            example's shapes: its exact gradient is then both cheaper and noise-free.  ``True`` or
            ``"eager"``: predicted for eager steps; ``"compiled"``: for Inductor-compiled steps
            (``train_step(compile=True)``, ``torch.compile(backend="effcompile")``), where the
            scoring fuses into the forward and only the host sampler keeps its eager cost, so more
            layers pay.
    """

    name: ClassVar[str] = "randomized_vjp"

    keep: float = 0.25
    estimator: str = "importance"
    target: str = "grad_weight"
    keep_input: Optional[float] = None
    uniform_mix: float = 0.1
    center: bool = True
    multiple: Optional[int] = None
    adaptive: bool = False
    variance_ratio: float = 0.5
    min_keep: float = 0.125
    max_keep: float = 1.0
    adapt_every: int = 50
    ema_decay: float = 0.9
    memory_mode: bool = False
    exclude: tuple = ()
    profitable_only: Union[bool, str] = False

    ESTIMATORS: ClassVar[tuple] = ("importance", "uniform", "sketch")
    TARGETS: ClassVar[tuple] = ("grad_weight", "grad_input", "both")

    def __post_init__(self) -> None:
        if not (is_real(self.keep) and 0 < self.keep <= 1):
            self._fail("keep", "a real number in (0, 1]")
        if self.estimator not in self.ESTIMATORS:
            self._fail("estimator", f"one of {self.ESTIMATORS}")
        if self.target not in self.TARGETS:
            self._fail("target", f"one of {self.TARGETS}")
        if self.keep_input is not None and not (is_real(self.keep_input) and 0 < self.keep_input <= 1):
            self._fail("keep_input", "None or a real number in (0, 1]")
        if self.estimator == "sketch" and self.target != "grad_weight":
            self._fail("target", "'grad_weight' with estimator='sketch' (a rank sketch of the input gradient would be biased)")
        if not (is_real(self.uniform_mix) and 0 <= self.uniform_mix < 1):
            self._fail("uniform_mix", "a real number in [0, 1)")
        if not isinstance(self.center, bool):
            self._fail("center", "a bool")
        if self.multiple is not None and not (is_int(self.multiple) and self.multiple >= 1):
            self._fail("multiple", "None or an integer >= 1")
        self._check_adaptive()
        self._check_memory_mode()
        if isinstance(self.exclude, list):
            object.__setattr__(self, "exclude", tuple(self.exclude))  # JSON round trip gives a list
        if not (isinstance(self.exclude, tuple) and all(isinstance(p, str) and p for p in self.exclude)):
            self._fail("exclude", "a tuple of non-empty fnmatch patterns of layer paths")
        if not (isinstance(self.profitable_only, bool) or self.profitable_only in ("eager", "compiled")):
            self._fail("profitable_only", "a bool, 'eager' or 'compiled'")

    def _check_adaptive(self) -> None:
        if not isinstance(self.adaptive, bool):
            self._fail("adaptive", "a bool")
        if not (is_real(self.variance_ratio) and 0 < self.variance_ratio <= 100):
            self._fail("variance_ratio", "a real number in (0, 100]")
        if not (is_real(self.max_keep) and 0 < self.max_keep <= 1):
            self._fail("max_keep", "a real number in (0, 1]")
        if not (is_real(self.min_keep) and 0 < self.min_keep <= self.max_keep):
            self._fail("min_keep", f"a real number in (0, max_keep={self.max_keep}]")
        if not (is_int(self.adapt_every) and self.adapt_every >= 1):
            self._fail("adapt_every", "an integer >= 1")
        if not (is_real(self.ema_decay) and 0 <= self.ema_decay < 1):
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
