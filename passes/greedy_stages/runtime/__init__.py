"""One process per greedy stage over torch.distributed.  See README.md beside this file.

``launcher`` (spawn, monitor, merge results; the CLI/torchrun entry), ``worker`` (one stage's
loop, checkpoints), ``wire`` (the boundary message format), ``transport`` (int8/VQ codecs),
``replay`` (async replay buffers).
"""

from .launcher import (Fault, StageJob, StageRunResult, StageRuntimeError, ZooJob, load_stage_checkpoints, main,
                       run_stages)

__all__ = ["Fault", "StageJob", "StageRunResult", "StageRuntimeError", "ZooJob", "load_stage_checkpoints", "main",
           "run_stages"]
