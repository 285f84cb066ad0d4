"""The ``effcompile`` torch.compile backend.

``torch.compile(model, backend="effcompile")`` (after ``import effcompile``, or through the
``torch_dynamo_backends`` entry point) hands the Dynamo graph to Inductor, so the result is
compiled CPU or GPU code.  Model-level passes (decorrelation) are already in the module the user
compiles; joint-graph passes registered in ``JOINT_GRAPH_PASSES`` (stateless backward rewrites)
are installed through Inductor's cache-keyed ``joint_custom_pre_pass`` hook.
"""

from __future__ import annotations

from typing import Any, Callable, List

import torch

from ._compat import compile_fx, register_backend_once

__all__ = ["effcompile_backend", "JOINT_GRAPH_PASSES"]

# CustomGraphPass instances contributed by passes that rewrite the AOT joint graph.
JOINT_GRAPH_PASSES: List[Any] = []


def _config_patches() -> dict:
    if not JOINT_GRAPH_PASSES:
        return {}
    if len(JOINT_GRAPH_PASSES) > 1:
        raise NotImplementedError("only one joint-graph pass can be installed at a time")
    return {"joint_custom_pre_pass": JOINT_GRAPH_PASSES[0]}


def effcompile_backend(graph_module: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
    """Dynamo backend: Inductor with the effcompile joint-graph passes."""
    return compile_fx(graph_module, example_inputs, config_patches=_config_patches())


register_backend_once("effcompile", effcompile_backend)
