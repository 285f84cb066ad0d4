"""effcompile.passes: the pass interface, shared analyses, and one folder per technique.

See README.md beside this file for the invariants every pass keeps and the checklist for adding a
technique.  Importing this package registers every technique (config, model pass, joint passes).
"""

from .base import (JOINT_PASSES, PASSES, JointPass, JointResult, ModelPass, StepOptions, register_joint_pass,
                   register_pass, step_owners)
from .analysis import CaptureError, GraphCapture, capture

# The techniques: one line each.  Importing a technique registers it.
from .decorrelation import Decorrelation
from .randomized_vjp import RandomizedVJP
from .greedy_stages import GreedyStages
from .sample_selection import SampleSelection

__all__ = ["PASSES", "JOINT_PASSES", "StepOptions", "ModelPass", "JointPass", "JointResult", "register_pass",
           "register_joint_pass", "step_owners", "capture", "CaptureError", "GraphCapture",
           "Decorrelation", "RandomizedVJP", "GreedyStages", "SampleSelection"]
