"""Decoupled greedy learning (Belilovsky et al., ICML 2020).  See README.md beside this file.

``config`` (GreedyStages), ``rewrite`` (the model pass and the single-process staged step),
``cut_search`` (fx trace, cut candidates, FLOP costs, min-max cuts), ``block_stack`` (models whose
root forward fx cannot trace: cuts between the blocks of their ModuleList, made by forward hooks),
``aux_heads``, and
``runtime/`` (one process per stage over torch.distributed: launcher, worker, wire, transport,
replay).
"""

from effcompile.commands import register_command

from .config import GreedyStages
from .cut_search import StageTraceError, register_leaf_module
from .rewrite import (HEADS_ATTR, GreedyStageHeads, GreedyStagesPass, StagedModel, StagePlan, make_stage_optimizers,
                      plan_stages, saved_activation_bytes, staged_model)

__all__ = ["GreedyStages", "GreedyStagesPass", "GreedyStageHeads", "StagedModel", "StagePlan", "StageTraceError",
           "HEADS_ATTR", "make_stage_optimizers", "plan_stages", "register_leaf_module", "saved_activation_bytes",
           "staged_model"]

# ``effcompile stages``: the multi-process runtime (imported only when the command runs).
register_command("stages", entry="effcompile.passes.greedy_stages.runtime.launcher:command",
                 help="train greedy stages as K·D processes (K stages × D data-parallel replicas); "
                      "effcompile stages --help for its options")
