"""The one pass interface.

A pass has two phases, so analysis and rewriting stay separate and every entry point reads the
same decisions:

1. ``plan(model, captured, config) -> list[PlanRow]`` decides, per layer, what to do and why
   (``action="skip"`` with a reason for layers it cannot handle).  It does not touch the model.
2. ``apply(model, rows, config) -> int`` performs the applied rows' rewrites and returns how many
   places it rewrote (for logs and tests).

Passes that add state (decorrelation matrices, aux heads) rewrite at model level, before any
tracing, because a torch.compile backend receives parameters as graph inputs and cannot add
state.  Stateless backward rewrites register on the AOT joint graph instead.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Type

import torch.nn as nn

from effcompile.config import PassConfig
from effcompile.plan import PlanRow

from .capture import GraphCapture

__all__ = ["ModelPass", "PASSES", "STEP_OWNERS", "StepOptions", "register_pass"]


class ModelPass(abc.ABC):
    """A model-level rewrite driven by a config and recorded in the Plan."""

    config_type: Type[PassConfig]

    @property
    def name(self) -> str:
        return self.config_type.name

    @abc.abstractmethod
    def plan(self, model: nn.Module, captured: GraphCapture, config: PassConfig) -> List[PlanRow]:
        """Decide what to do with each layer; must not modify ``model``."""

    @abc.abstractmethod
    def apply(self, model: nn.Module, rows: List[PlanRow], config: PassConfig) -> int:
        """Rewrite the layers of the applied ``rows``; return the number of rewritten layers."""

    @abc.abstractmethod
    def is_applied(self, model: nn.Module) -> bool:
        """Whether ``model`` already carries this pass."""

    @abc.abstractmethod
    def fold(self, model: nn.Module) -> int:
        """Bake the pass into plain weights and remove its state; return the layers folded."""

    def live_details(self, model: nn.Module, row: PlanRow) -> Dict[str, object]:
        """Run-time counters to show next to a Plan row (read on demand, never per step)."""
        return {}

    # Passes that change the shape of the training step itself (greedy stages: one loss and one
    # optimizer per stage; sample selection: a per-sample loss and a weighted subset) return a
    # step function here; every other pass leaves the step alone and returns None.
    # ``effcompile.train_step`` asks the passes in ``STEP_OWNERS`` order and uses the first step.
    def make_train_step(self, model: nn.Module, loss_fn: Callable, optimizer: Any,
                        options: StepOptions) -> Optional[Callable]:
        return None


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How ``effcompile.train_step`` was asked to build the step (shared by every step owner)."""

    compile: bool = False
    backend: Any = "effcompile"
    check_finite: bool = False


PASSES: Dict[str, ModelPass] = {}

# Passes that may own the training step, outermost first: the stage runtime runs every stage's
# local loss through the sample selection when both are applied.
STEP_OWNERS = ("greedy_stages", "sample_selection")


def register_pass(instance: ModelPass) -> ModelPass:
    PASSES[instance.name] = instance
    return instance
