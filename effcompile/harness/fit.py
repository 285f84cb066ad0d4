"""Training loop and per-epoch metrics for effcompile runs.

``fit`` trains a (possibly transformed) classifier with :func:`effcompile.train_step`, so every
pass's own updates (e.g. the decorrelation matrices) run exactly as they would in user code, and
records one :class:`EpochMetrics` per epoch.  :mod:`effcompile.harness.reports` turns a
``{label: RunResult}`` mapping into JSON, a PNG of learning curves and Markdown tables.

Timing convention: ``EpochMetrics.seconds`` is cumulative *training* wall-clock time (optimizer
steps and data loading) since the start of ``fit``; evaluation is excluded so that a slower
evaluation never makes a training technique look slower.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from effcompile.api import train_step
from .data import make_loaders

__all__ = [
    "EpochMetrics",
    "RunResult",
    "fit",
    "evaluate",
    "make_optimizer",
    "autocast_context",
]

OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass
class EpochMetrics:
    """Metrics recorded at the end of one epoch (``epoch`` counts from 1)."""

    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float  # cumulative training wall-clock seconds, evaluation excluded

    def to_dict(self) -> dict[str, Any]:
        return {key: _json_float(value) for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EpochMetrics":
        # Non-finite values were stored as null (strict JSON); restore them as NaN.
        return cls(
            epoch=int(data["epoch"]),
            train_loss=_float_or_nan(data["train_loss"]),
            test_loss=_float_or_nan(data["test_loss"]),
            test_accuracy=_float_or_nan(data["test_accuracy"]),
            seconds=_float_or_nan(data["seconds"]),
        )


@dataclasses.dataclass
class RunResult:
    """The outcome of one :func:`fit` call.

    Attributes:
        label: unique name of the run, e.g. ``"decorrelation/seed0"``.
        group: runs that differ only in their seed share a group (used by ``summary_table``
            and for line colours in ``plot_runs``); defaults to the label.
        seed: the seed of model-independent randomness (data order, pass sampling).
        history: one entry per epoch.
        target_accuracy: the accuracy threshold of interest, or None.
        target_epoch: first epoch whose test accuracy reached ``target_accuracy`` (None: never).
        target_seconds: training seconds at ``target_epoch`` (None: never).
        config: the hyperparameters and anything else the caller wants stored with the run.
    """

    label: str
    group: str = ""
    seed: int = 0
    history: list[EpochMetrics] = dataclasses.field(default_factory=list)
    target_accuracy: float | None = None
    target_epoch: int | None = None
    target_seconds: float | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.group:
            self.group = self.label

    @property
    def final_accuracy(self) -> float:
        return self.history[-1].test_accuracy if self.history else math.nan

    @property
    def best_accuracy(self) -> float:
        finite = [m.test_accuracy for m in self.history if math.isfinite(m.test_accuracy)]
        return max(finite) if finite else math.nan

    @property
    def total_seconds(self) -> float:
        return self.history[-1].seconds if self.history else 0.0

    @property
    def seconds_per_epoch(self) -> float:
        return self.total_seconds / len(self.history) if self.history else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "group": self.group,
            "seed": self.seed,
            "target_accuracy": self.target_accuracy,
            "target_epoch": self.target_epoch,
            "target_seconds": self.target_seconds,
            "final_accuracy": _json_float(self.final_accuracy),
            "best_accuracy": _json_float(self.best_accuracy),
            "seconds_per_epoch": _json_float(self.seconds_per_epoch),
            "config": self.config,
            "history": [m.to_dict() for m in self.history],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunResult":
        """Inverse of :meth:`to_dict` (the derived summary fields are recomputed, not read)."""
        return cls(
            label=data["label"],
            group=data.get("group", ""),
            seed=int(data.get("seed", 0)),
            history=[EpochMetrics.from_dict(m) for m in data.get("history", [])],
            target_accuracy=data.get("target_accuracy"),
            target_epoch=data.get("target_epoch"),
            target_seconds=data.get("target_seconds"),
            config=dict(data.get("config", {})),
        )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], *, lr: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """Build ``sgd`` (with ``momentum``) or ``adam`` (``momentum`` is its beta1)."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def fit(
    model: nn.Module,
    train_set: torch.utils.data.Dataset,
    test_set: torch.utils.data.Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    seed: int = 0,
    compile: bool = False,
    progress: bool = True,
    target_accuracy: float | None = None,
    device: torch.device | str | None = None,
    label: str = "run",
    group: str = "",
    autocast: str | None = None,
) -> RunResult:
    """Train ``model`` for ``epochs`` epochs with cross-entropy and evaluate after each epoch.

    Every step goes through :func:`effcompile.train_step` (with ``torch.compile`` when
    ``compile``), so the updates of any applied pass run.  ``seed`` seeds torch's global RNG (for
    stochastic passes and layers) and the training-data order, so two calls with the same seed
    and the same initial model see the same batches and produce the same losses.  The model's
    initial weights are the caller's responsibility (seed before building it).

    ``EpochMetrics.seconds`` counts training time only (evaluation excluded); with ``compile``
    the first epoch includes the compilation, as it would in a real run.

    ``device`` defaults to the device of the model's parameters.  ``autocast`` (``"bf16"`` or
    ``"fp16"``) runs training steps and evaluation under ``torch.autocast`` on the model's device.
    Returns a :class:`RunResult` whose ``history`` has one :class:`EpochMetrics` per epoch.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device)
    torch.manual_seed(seed)
    train_loader, test_loader = make_loaders(train_set, test_set, batch_size, seed)
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum)
    step = train_step(model, nn.CrossEntropyLoss(), opt, compile=compile)

    result = RunResult(
        label=label, group=group, seed=seed, target_accuracy=target_accuracy,
        config={"epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
                "momentum": momentum, "compile": compile, "device": str(device), "autocast": autocast},
    )
    training_seconds = 0.0
    bar = tqdm(range(1, epochs + 1), desc=label, unit="epoch", leave=False,
               disable=not progress or not sys.stderr.isatty())
    for epoch in bar:
        with autocast_context(autocast, device):
            train_loss, seconds = _train_epoch(model, step, train_loader, device)
            test_loss, test_accuracy = evaluate(model, test_loader, device)
        training_seconds += seconds
        result.history.append(EpochMetrics(epoch, train_loss, test_loss, test_accuracy, training_seconds))
        if target_accuracy is not None and result.target_epoch is None and test_accuracy >= target_accuracy:
            result.target_epoch, result.target_seconds = epoch, training_seconds
        bar.set_postfix(loss=f"{train_loss:.4f}", acc=f"{test_accuracy:.4f}")
    bar.close()
    return result


def _train_epoch(
    model: nn.Module, step: Any, loader: Iterable, device: torch.device
) -> tuple[float, float]:
    """Run one epoch of steps; return (mean training loss, training wall-clock seconds)."""
    model.train()
    _synchronize(device)
    start = time.perf_counter()
    # Accumulate on the device and read the value once: a .item() per step would force a host
    # sync every step and distort the timing of asynchronous (CUDA) training.
    total = torch.zeros((), device=device)
    batches = 0
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        loss = step(inputs, targets)
        total += loss.detach().float()
        batches += 1
    mean_loss = total.item() / max(batches, 1)  # .item() synchronizes, so the clock is honest
    _synchronize(device)
    return mean_loss, time.perf_counter() - start


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` over ``loader`` in eval mode.

    The model's previous train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").double()
        correct += (logits.argmax(dim=-1) == targets).sum()
        count += targets.numel()
    model.train(was_training)
    if count == 0:
        return math.nan, math.nan
    return loss_sum.item() / count, correct.item() / count


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(autocast: str | None, device: torch.device | str) -> Any:
    """``torch.autocast`` for ``"bf16"``/``"fp16"``, or a no-op context for ``None``."""
    import contextlib

    if autocast is None:
        return contextlib.nullcontext()
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast={autocast!r} is invalid: expected None or one of {sorted(AUTOCAST_DTYPES)}")
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[autocast])


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _json_float(value: Any) -> Any:
    """Non-finite floats become None so the JSON stays standard (no NaN/Infinity tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)
