"""effcompile.passes: one file per technique, plus graph capture and analysis helpers.

Invariants every pass keeps:
* it decides in ``plan`` (read-only) and rewrites in ``apply``; the Plan rows are the record;
* a layer it cannot handle is a ``skip`` row with the reason, never silently ignored;
* model-level state (matrices, counters) lives in modules/buffers, so ``state_dict`` checkpoints it;
* ``state_dict`` keys of the original model are unchanged.
"""

from .base import PASSES, STEP_OWNERS, ModelPass, StepOptions, register_pass
from .capture import CaptureError, GraphCapture, capture
from . import decorrelation, randomized_vjp  # noqa: F401  (register the passes)
from . import greedy_stages  # noqa: F401
from . import sample_selection  # noqa: F401

__all__ = ["PASSES", "STEP_OWNERS", "StepOptions", "ModelPass", "register_pass", "capture", "CaptureError", "GraphCapture"]
