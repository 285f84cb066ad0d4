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
from typing import Dict, List, Type

import torch.nn as nn

from effcompile.config import PassConfig
from effcompile.plan import PlanRow

from .capture import GraphCapture

__all__ = ["ModelPass", "PASSES", "register_pass"]


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


PASSES: Dict[str, ModelPass] = {}


def register_pass(instance: ModelPass) -> ModelPass:
    PASSES[instance.name] = instance
    return instance
