"""What the single-process greedy step and ``effcompile.training_loss`` share: one batch's stage losses."""

from __future__ import annotations

from typing import Any, List, Optional

import torch

__all__ = ["StageLosses"]


class StageLosses:
    """Runs every stage of one batch (``run``, by the fx-stage or the block-stack subclass) and keeps
    each stage's loss (``stage_losses``, detached) for the report."""

    stage_losses: List[torch.Tensor]

    def run(self, inputs: Any, targets: Any, backward_each: bool) -> List[torch.Tensor]:
        """The stage losses of one batch; ``backward_each``: backpropagate each one as soon as it
        exists (freeing its activations) and return none."""
        raise NotImplementedError

    @property
    def reported_loss(self) -> Optional[torch.Tensor]:
        """The last stage's loss: the model's own loss on the batch."""
        return self.stage_losses[-1] if self.stage_losses else None

    def training_loss(self, inputs: Any, targets: Any) -> torch.Tensor:
        """The sum of the stage losses: their graphs are disjoint (every cut is detached), so its
        backward gives each stage's parameters exactly their own loss's gradient."""
        return torch.stack(self.run(inputs, targets, backward_each=False)).sum()
