"""One ``CustomGraphPass`` over every registered joint-graph pass, in their registered order.

The ``effcompile`` backends install it as Inductor's cache-keyed ``joint_custom_pre_pass`` (and
call it before partitioning in ``effcompile_aot_eager``).  Its ``uuid()`` hashes this file, the
pass interface and every source file each joint pass declares, so Inductor's FX graph cache never
serves a graph rewritten by other code.

What each joint pass rewrote is returned to whoever asks, never kept in module globals: inside
``with recording() as log:`` every joint graph rewritten appends ``{pass name: JointResult}`` to
``log`` (``effcompile inspect`` and the tests read it).  The block turns the compile caches off:
a cache hit replays a compiled graph without running the passes, and would leave the log short.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Dict, Iterator, List

import torch

from effcompile._compat import compile_caches_disabled, custom_graph_pass_base, hash_files

from .analysis.graph_utils import is_tangent
from .base import JOINT_PASSES, JointResult

__all__ = ["JOINT_PASS", "EffcompileJointPass", "run_joint_passes", "is_joint_graph", "recording"]

_recorders = threading.local()


def run_joint_passes(graph: torch.fx.Graph) -> Dict[str, JointResult]:
    """Run every joint pass on a joint forward+backward graph; graphs without a backward (Inductor
    also hands over the branch subgraphs of ``torch.cond``) have nothing to rewrite and are not
    logged."""
    if not is_joint_graph(graph):
        return {}
    results = {joint_pass.name: joint_pass(graph) for joint_pass in JOINT_PASSES}
    for log in getattr(_recorders, "stack", []):
        log.append(results)
    return results


def is_joint_graph(graph: torch.fx.Graph) -> bool:
    """AOTAutograd's joint graphs take the backward's incoming gradients as ``tangents_*`` inputs."""
    return any(is_tangent(node) for node in graph.nodes)


@contextlib.contextmanager
def recording(cache_hits: bool = False) -> Iterator[List[Dict[str, JointResult]]]:
    """Collect the results of every joint graph compiled in this thread inside the block.

    Compile caches are off inside the block, so every compiled graph is rewritten (and logged);
    ``cache_hits=True`` leaves them on (a hit then logs nothing: how a test sees that it missed).
    """
    log: List[Dict[str, JointResult]] = []
    stack = _recorders.__dict__.setdefault("stack", [])
    stack.append(log)
    try:
        with contextlib.nullcontext() if cache_hits else compile_caches_disabled():
            yield log
    finally:
        stack.remove(log)


class EffcompileJointPass(custom_graph_pass_base()):
    def __call__(self, graph: torch.fx.Graph) -> None:
        run_joint_passes(graph)

    def uuid(self) -> Any:
        here = os.path.dirname(__file__)
        sources = [os.path.join(here, name) for name in ("joint.py", "base.py", os.path.join("analysis", "graph_utils.py"))]
        for joint_pass in JOINT_PASSES:
            sources += joint_pass.sources()
        return hash_files(sorted(set(sources)))


JOINT_PASS = EffcompileJointPass()
