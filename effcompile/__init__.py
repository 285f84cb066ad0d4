"""effcompile: graph passes that make PyTorch training cheaper.

One line applies a technique to any model::

    model = effcompile.transform(model, effcompile.Decorrelation(), example_inputs=(x,))
    compiled = torch.compile(model, backend="effcompile")

See README.md for the passes, the Plan report, ONNX export and the CLI.  Each technique lives in
its own folder of ``effcompile.passes`` (its README, config, pass and runtime); importing this
package registers every technique and exposes each config class here by its class name
(``effcompile.Decorrelation``, ...), read from the config registry.
"""

from .config import PASS_CONFIGS, PassConfig, config_from_dict
from .plan import Action, Plan, PlanRow
from .api import fold, predicted_step, report, train_step, training_loss, transform
from .onnx_export import export_onnx, inspect_onnx
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from . import backend as _backend  # registers the "effcompile" torch.compile backend
from . import passes as _passes  # noqa: F401  (registers every technique's config and passes)

__version__ = "0.1.0"

# Every registered config class, by its class name (effcompile.Decorrelation, effcompile.RandomizedVJP, ...).
_CONFIG_CLASSES = {cls.__name__: cls for cls in PASS_CONFIGS.values()}
globals().update(_CONFIG_CLASSES)

__all__ = [
    *sorted(_CONFIG_CLASSES), "PassConfig", "PASS_CONFIGS", "config_from_dict", "Action", "Plan", "PlanRow",
    "transform", "report", "predicted_step", "fold", "train_step", "training_loss", "export_onnx", "inspect_onnx",
    "save_checkpoint", "load_checkpoint", "CheckpointError", "__version__",
]
