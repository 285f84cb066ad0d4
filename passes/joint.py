"""The joint-graph passes, in the order the ``effcompile`` backends run them.

1. ``row_sparse_backward``: a backward that only the selected samples feed (sample selection in
   forward-reuse mode) runs on their rows — exact, so it goes first.
2. ``randomized_vjp``: marked layers' backward GEMMs become sampled, unbiased estimates.

One ``CustomGraphPass`` runs both; its ``uuid()`` hashes the source of every file that shapes the
rewrite, so Inductor's FX graph cache never serves a graph rewritten by other code.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from effcompile._compat import custom_graph_pass_base, hash_files

from . import randomized_vjp, row_sparse_backward

__all__ = ["JOINT_PASS", "EffcompileJointPass", "run_joint_passes"]


def run_joint_passes(graph: torch.fx.Graph) -> None:
    row_sparse_backward.rewrite_row_sparse_backward(graph)
    randomized_vjp.rewrite_joint_graph(graph)


class EffcompileJointPass(custom_graph_pass_base()):
    def __call__(self, graph: torch.fx.Graph) -> None:
        run_joint_passes(graph)

    def uuid(self) -> Any:
        from effcompile import sketch

        here = os.path.dirname(__file__)
        sources = [os.path.join(here, name) for name in ("joint.py", "graph_utils.py")]
        return hash_files([*sources, randomized_vjp.__file__, row_sparse_backward.__file__, sketch.__file__])


JOINT_PASS = EffcompileJointPass()
