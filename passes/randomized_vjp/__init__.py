"""Randomized unbiased VJPs (Bakong et al., arXiv 2602.14701).  See README.md beside this file.

``config`` (RandomizedVJP), ``rewrite`` (the model pass: marked weights, eager autograd
functions, adaptive and memory-mode state), ``joint_rewrite`` (the joint-graph pass that samples
the backward GEMMs), ``estimators`` (sampling designs, sketches, variances, custom ops).
"""

from .config import RandomizedVJP
from .joint_rewrite import JOINT_PASS, MissingRewriteError, RewriteRecord, inspect_backward, rewrite_joint_graph
from .rewrite import MemoryModeState, RandomizedVJPPass, VarianceControl

__all__ = ["RandomizedVJP", "RandomizedVJPPass", "JOINT_PASS", "MissingRewriteError", "RewriteRecord", "VarianceControl",
           "MemoryModeState", "inspect_backward", "rewrite_joint_graph"]
