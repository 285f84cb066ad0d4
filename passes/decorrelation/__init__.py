"""Decorrelated backpropagation (Dalm et al., arXiv 2405.02385).  See README.md beside this file.

``config`` (Decorrelation), ``rewrite`` (the model pass: find layers, fused ``W·R`` weights),
``state`` (the matrix R, its statistics and local update).
"""

from .config import Decorrelation
from .rewrite import DecorrelationPass, decorrelation_states, state_name
from .state import DecorrelationState

__all__ = ["Decorrelation", "DecorrelationPass", "DecorrelationState", "decorrelation_states", "state_name"]
