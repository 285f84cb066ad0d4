"""The ``effcompile`` torch.compile backends.

``torch.compile(model, backend="effcompile")`` (after ``import effcompile``, or through the
``torch_dynamo_backends`` entry point) hands the Dynamo graph to Inductor, so the result is
compiled CPU or GPU code.  Model-level passes (decorrelation, aux heads) are already in the module
the user compiles; the joint-graph passes (stateless backward rewrites: the row-sparse backward of
sample selection, then the randomized VJPs) run as one ``CustomGraphPass`` installed through
Inductor's cache-keyed ``joint_custom_pre_pass`` hook.

``backend="effcompile_aot_eager"`` runs the same joint-graph rewrite through AOTAutograd without
Inductor (eager kernels): the CPU tests' fast rung of the backend ladder.  It partitions the joint
graph with Inductor's min-cut partitioner (recomputation and CSE included), so the forward/backward
split it tests is the one Inductor compiles: with AOTAutograd's default partitioner a random draw
that Inductor duplicated into both graphs passed every test at this rung.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._compat import aot_eager_with_partition, compile_fx, inductor_config, register_backend_once

__all__ = ["effcompile_backend", "effcompile_aot_eager_backend"]


def _joint_pass():
    from effcompile.passes.joint import JOINT_PASS

    return JOINT_PASS


def _config_patches() -> dict:
    joint_pass = _joint_pass()
    existing = inductor_config().joint_custom_pre_pass
    if existing is not None and existing is not joint_pass:
        raise RuntimeError("torch._inductor.config.joint_custom_pre_pass is already set by someone else; "
                           "effcompile installs its own joint-graph pass there")
    return {"joint_custom_pre_pass": joint_pass}


def effcompile_backend(graph_module: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
    """Dynamo backend: Inductor with the effcompile joint-graph passes."""
    return compile_fx(graph_module, example_inputs, config_patches=_config_patches())


def _rewrite_then_partition(partition):
    def partition_fn(joint_module: torch.fx.GraphModule, joint_inputs: Any, **kwargs: Any):
        _joint_pass()(joint_module.graph)
        joint_module.recompile()
        return partition(joint_module, joint_inputs, **kwargs)

    return partition_fn


def effcompile_aot_eager_backend(graph_module: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
    """Dynamo backend: AOTAutograd + the effcompile joint-graph passes, eager kernels (no Inductor)."""
    return aot_eager_with_partition(_rewrite_then_partition, min_cut=True)(graph_module, example_inputs, **kwargs)


register_backend_once("effcompile", effcompile_backend)
register_backend_once("effcompile_aot_eager", effcompile_aot_eager_backend)
