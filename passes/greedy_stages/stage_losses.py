"""What the single-process greedy step and ``effcompile.training_loss`` share: one batch's stage losses."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch

__all__ = ["StageLosses", "stage_train_step"]


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


def stage_train_step(stages: StageLosses, optimizer: Any, options: Any, sync: Any = None, joint: bool = False,
                     stage_parameters: Sequence[List[Any]] = ()) -> Callable:
    """The single-process DGL step over ``stages`` (either path).

    Each stage's loss is backpropagated as soon as it exists (freeing its activations), or with
    ``joint`` all together, once, after the forward: what FSDP2 expects of one forward (the
    root's hooks, or the fx stages run as the root's forward, arm the reduce-scatter for one
    backward); the gradients are the same.  ``sync``: an ``effcompile.distributed.DataParallelSync``
    when the stages run the module behind a DDP wrapper without its forward, so DDP would not
    all-reduce their gradients: the step does what DDP does itself.  ``options.max_grad_norm``
    clips each stage's gradients (``stage_parameters[k]``: its body and aux head) on their own: no
    stage's update depends on another's gradient; ``options.grad_scaler`` scales every backward."""
    from effcompile.api import training_step

    @training_step
    def step(inputs: Any, targets: Any) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        if sync is not None:
            sync.before_forward()
        if joint:
            options.backward(stages.training_loss(inputs, targets))
        else:
            stages.run(inputs, targets, backward_each=True)  # backpropagates through options.backward
        if sync is not None:
            sync.after_backward()
        # Gradients never cross stages, so one optimizer over all parameters takes exactly the
        # per-stage optimizers' steps for per-parameter optimizers (SGD, Adam, ...).
        step.stage_grad_norms = options.optimizer_step(optimizer, lambda: list(stage_parameters)) or []
        step.stage_losses = stages.stage_losses
        step.stage_subset_losses = getattr(stages, "stage_subset_losses", stages.stage_losses)
        return stages.reported_loss

    step.stage_losses, step.stage_subset_losses, step.stage_grad_norms = [], [], []
    return step
