"""The GreedyStages config: validated at construction, registered by its ``name``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Union

from effcompile.config import PassConfig, is_int, is_real, register_config

__all__ = ["GreedyStages"]


@register_config
@dataclasses.dataclass(frozen=True)
class GreedyStages(PassConfig):
    """Decoupled greedy learning (Belilovsky et al., ICML 2020): the network is cut into
    ``num_stages`` stages, each trained by its own auxiliary head and local loss.

    Fields:
        num_stages: number of stages K, an integer >= 2.
        cuts: ``None`` (cut search picks the boundaries) or ``num_stages − 1`` names, in forward
            order: a module path (any module called once in forward: the cut falls after its
            forward) or a node name the Plan shows for a non-module cut (``cut_kind=node``); on the
            block-stack hook path (``cut_kind=block-stack hooks``) the paths of the blocks to cut after.
        head: auxiliary head kind: ``"auto"``, ``"mlp_sr"``, ``"pool_mlp"``, ``"mlp"`` or ``"linear"``.
        head_width: hidden width of the auxiliary heads; ``None`` picks a default.
        max_head_overhead: a budget for each aux head under ``head="auto"`` and ``head_width=None``:
            a head whose forward+backward FLOPs exceed this multiple of its stage body's is
            replaced by the ``linear`` head (global mean → one Linear), and the Plan says so
            (``head_choice``).  ``"auto"``: 1.0 (a head costs at most the stage it trains: the
            3-layer MLP head over an MLP's C-wide boundary, width 4·C, cost 3.3-40x its stage and
            made two stages 2.5x backprop's step on mnist5k, where the linear head trains as well:
            0.925 vs 0.921 test accuracy, 1.18x step).  ``None``: no budget; a real number > 0.
        mode: ``"sync"`` (stages step one after another) or ``"async"`` (stages run decoupled,
            exchanging boundary activations through buffers).
        buffer: capacity of each boundary buffer in async mode, an integer >= 1.
        max_reuse: how often an async stage may reuse a buffered boundary batch, an integer >= 1.
        transport: boundary activation codec: ``"none"``, ``"int8"`` or ``"vq"``.
        vq_codebook_size: codebook entries of the ``vq`` transport, an integer >= 2 (default 1024:
            with 8-channel groups and a codebook every 50 steps, the runtime's defaults, it sent
            16.6x fewer bytes than fp32 for +0.1 pt test accuracy on digits; 256 lost 1.1 pt).
        vq_group_size: channels per quantised group of the ``vq`` transport, an integer >= 1.
        vq_decay: EMA decay of the ``vq`` codebook updates, in [0, 1).
        bytes_weight: FLOP-equivalents per boundary byte in the cut cost, a real number >= 0.
        timeout_s: seconds an async stage waits for its input before failing, a real number > 0.
        min_stage_share: a stage with less than this share of the model's forward+backward FLOPs
            *and* of its trainable weights is negligible: the Plan row says so (``warning=``) and
            ``transform`` warns.  A real number in [0, 1); 0 turns the warning off.
    """

    name: ClassVar[str] = "greedy_stages"

    num_stages: int = 2
    cuts: Optional[tuple] = None
    head: str = "auto"
    head_width: Optional[int] = None
    max_head_overhead: Union[float, str, None] = "auto"
    mode: str = "sync"
    buffer: int = 4
    max_reuse: int = 2
    transport: str = "none"
    vq_codebook_size: int = 1024
    vq_group_size: int = 8
    vq_decay: float = 0.99
    bytes_weight: float = 1.0
    timeout_s: float = 60.0
    min_stage_share: float = 0.05

    HEADS: ClassVar[tuple] = ("auto", "mlp_sr", "pool_mlp", "mlp", "linear")
    MODES: ClassVar[tuple] = ("sync", "async")
    TRANSPORTS: ClassVar[tuple] = ("none", "int8", "vq")

    def __post_init__(self) -> None:
        if not (is_int(self.num_stages) and self.num_stages >= 2):
            self._fail("num_stages", "an integer >= 2")
        if self.cuts is not None:
            if isinstance(self.cuts, list):
                object.__setattr__(self, "cuts", tuple(self.cuts))  # JSON round trip gives a list
            if not (isinstance(self.cuts, tuple) and all(isinstance(c, str) for c in self.cuts)
                    and len(self.cuts) == self.num_stages - 1):
                self._fail("cuts", f"None or a tuple of num_stages-1={self.num_stages - 1} module paths")
        if self.head not in self.HEADS:
            self._fail("head", f"one of {self.HEADS}")
        if self.head_width is not None and not (is_int(self.head_width) and self.head_width >= 1):
            self._fail("head_width", "None or an integer >= 1")
        if not (self.max_head_overhead is None or self.max_head_overhead == "auto"
                or (is_real(self.max_head_overhead) and self.max_head_overhead > 0)):
            self._fail("max_head_overhead", "'auto', None or a real number > 0")
        if self.mode not in self.MODES:
            self._fail("mode", f"one of {self.MODES}")
        if not (is_int(self.buffer) and self.buffer >= 1):
            self._fail("buffer", "an integer >= 1")
        if not (is_int(self.max_reuse) and self.max_reuse >= 1):
            self._fail("max_reuse", "an integer >= 1")
        if self.transport not in self.TRANSPORTS:
            self._fail("transport", f"one of {self.TRANSPORTS}")
        if not (is_int(self.vq_codebook_size) and self.vq_codebook_size >= 2):
            self._fail("vq_codebook_size", "an integer >= 2")
        if not (is_int(self.vq_group_size) and self.vq_group_size >= 1):
            self._fail("vq_group_size", "an integer >= 1")
        if not (is_real(self.vq_decay) and 0 <= self.vq_decay < 1):
            self._fail("vq_decay", "a real number in [0, 1)")
        if not (is_real(self.bytes_weight) and self.bytes_weight >= 0):
            self._fail("bytes_weight", "a real number >= 0")
        if not (is_real(self.timeout_s) and self.timeout_s > 0):
            self._fail("timeout_s", "a real number > 0")
        if not (is_real(self.min_stage_share) and 0 <= self.min_stage_share < 1):
            self._fail("min_stage_share", "a real number in [0, 1)")
