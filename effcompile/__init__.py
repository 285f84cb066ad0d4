"""effcompile: graph passes that make PyTorch training cheaper.

One line applies a technique to any model::

    model = effcompile.transform(model, effcompile.Decorrelation(), example_inputs=(x,))
    compiled = torch.compile(model, backend="effcompile")

See README.md for the passes, the Plan report, ONNX export and the CLI.  The multi-process stage
runtime is ``effcompile.stage_runtime.run_stages``; the comparison suite is ``effcompile.suite``.
"""

from .config import (PASS_CONFIGS, Decorrelation, GreedyStages, PassConfig, RandomizedVJP, SampleSelection,
                     config_from_dict)
from .plan import Plan, PlanRow
from .api import fold, report, train_step, transform
from .onnx_export import export_onnx, inspect_onnx
from .checkpoint import load_checkpoint, save_checkpoint
from . import backend as _backend  # registers the "effcompile" torch.compile backend

__version__ = "0.1.0"

__all__ = [
    "Decorrelation", "RandomizedVJP", "GreedyStages", "SampleSelection", "PassConfig", "PASS_CONFIGS", "config_from_dict", "Plan", "PlanRow",
    "transform", "report", "fold", "train_step", "export_onnx", "inspect_onnx",
    "save_checkpoint", "load_checkpoint", "__version__",
]
