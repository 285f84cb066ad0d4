"""Training loop and per-epoch metrics for effcompile runs.

``fit`` trains a (possibly transformed) classifier with :func:`effcompile.train_step`, so every
pass's own updates (e.g. the decorrelation matrices) run exactly as they would in user code, and
records one :class:`EpochMetrics` per epoch.  :mod:`effcompile.harness.reports` turns a
``{label: RunResult}`` mapping into JSON, a PNG of learning curves and Markdown tables.

Timing convention: ``EpochMetrics.seconds`` is cumulative *training* wall-clock time (optimizer
steps and data loading) since the start of ``fit``; evaluation is excluded so that a slower
evaluation never makes a training technique look slower.  ``RunResult.step_seconds`` is the median
over epochs of each epoch's training time per step (the first epoch is left out under ``compile``
when there are more, since it includes the compilation).

Activation memory: in eager mode ``fit`` runs its first training step under
:class:`effcompile.measure.SavedTensorMeter` and stores the peak bytes autograd saved for backward
(parameters and buffers excluded) as ``RunResult.saved_activation_bytes``.

Progress: one tqdm bar per run on stderr, counting steps, with the epoch, loss and test accuracy
as postfix; it stays on screen as one line when the run ends.  On a terminal it refreshes twice a
second; written to a log (stderr not a terminal) it is ASCII and refreshes at most every
``LOG_REFRESH_S`` seconds, so a log holds a few carriage-return updates per run, not thousands.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Iterable, Mapping

import statistics

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from effcompile.api import train_step
from effcompile.measure import SavedTensorMeter, compile_seconds, synchronize
from .data import make_loaders

__all__ = [
    "EpochMetrics",
    "RunResult",
    "fit",
    "evaluate",
    "make_optimizer",
    "autocast_context",
    "progress_bar",
]

OPTIMIZERS = ("sgd", "adam")
LOG_REFRESH_S = 15.0  # progress-bar refresh interval when stderr is a log, not a terminal


@dataclasses.dataclass
class EpochMetrics:
    """Metrics recorded at the end of one epoch (``epoch`` counts from 1)."""

    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float  # cumulative training wall-clock seconds, evaluation excluded
    steps: int = 0  # training steps in this epoch (0: not recorded)

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
            steps=int(data.get("steps", 0)),
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
        saved_activation_bytes: peak bytes of activations saved for backward during the first
            training step (eager runs; None when not measured, e.g. under ``compile``).
        compile_seconds: under ``compile``, the first step's excess over the first epoch's mean
            step (the compilation), left out of the training seconds; None for eager runs.
    """

    label: str
    group: str = ""
    seed: int = 0
    history: list[EpochMetrics] = dataclasses.field(default_factory=list)
    target_accuracy: float | None = None
    target_epoch: int | None = None
    target_seconds: float | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    saved_activation_bytes: int | None = None
    compile_seconds: float | None = None

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

    @property
    def step_seconds(self) -> float:
        """Median over epochs of training seconds per step (NaN when steps were not recorded).

        Under ``compile`` the first epoch (which includes the compilation) is left out when
        there are more epochs.
        """
        per_step, previous = [], 0.0
        for metrics in self.history:
            if metrics.steps > 0 and math.isfinite(metrics.seconds):
                per_step.append((metrics.seconds - previous) / metrics.steps)
            previous = metrics.seconds
        if self.config.get("compile") and len(per_step) > 1:
            per_step = per_step[1:]
        return statistics.median(per_step) if per_step else math.nan

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
            "step_seconds": _json_float(self.step_seconds),
            "saved_activation_bytes": self.saved_activation_bytes,
            "compile_seconds": _json_float(self.compile_seconds),
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
            saved_activation_bytes=data.get("saved_activation_bytes"),
            compile_seconds=data.get("compile_seconds"),
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
    max_steps: int | None = None,
    measure_memory: bool = True,
) -> RunResult:
    """Train ``model`` for ``epochs`` epochs with cross-entropy and evaluate after each epoch.

    Every step goes through :func:`effcompile.train_step` (with ``torch.compile`` when
    ``compile``), so the updates of any applied pass run.  ``seed`` seeds torch's global RNG (for
    stochastic passes and layers) and the training-data order, so two calls with the same seed
    and the same initial model see the same batches and produce the same losses.  The model's
    initial weights are the caller's responsibility (seed before building it).

    ``EpochMetrics.seconds`` counts training time only (evaluation excluded); with ``compile``
    the compilation is reported apart in ``RunResult.compile_seconds`` (the first step's excess
    over the first epoch's mean step) and left out, so time-to-target compares training alone.

    ``device`` defaults to the device of the model's parameters.  ``autocast`` (``"bf16"`` or
    ``"fp16"``) runs training steps and evaluation under ``torch.autocast`` on the model's device.
    ``max_steps`` caps the training steps of the whole run (a smoke test): the epoch in which it
    is reached is the last one and is evaluated as usual.  ``measure_memory`` runs the first
    step of an eager run under a :class:`~effcompile.measure.SavedTensorMeter` (compiled runs are
    not metered: the hooks would change what Dynamo traces).  ``progress`` shows a tqdm bar.
    Returns a :class:`RunResult` whose ``history`` has one :class:`EpochMetrics` per epoch.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps={max_steps!r} is invalid: expected None or a positive int")
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
    meter = None
    if measure_memory and not compile:
        meter = SavedTensorMeter(exclude=list(model.parameters()) + list(model.buffers()))
    steps_per_epoch = len(train_loader)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    bar = progress_bar(total_steps, label, disable=not progress)
    training_seconds, steps_left = 0.0, total_steps
    for epoch in range(1, epochs + 1):
        with autocast_context(autocast, device):
            train_loss, seconds, steps, first_step = _train_epoch(
                model, step, train_loader, device, max_steps=steps_left, meter=meter if epoch == 1 else None, bar=bar)
            if compile and epoch == 1 and steps > 1:
                result.compile_seconds = compile_seconds(first_step, (seconds - first_step) / (steps - 1))
                seconds -= result.compile_seconds
            test_loss, test_accuracy = evaluate(model, test_loader, device)
        training_seconds += seconds
        steps_left -= steps
        result.history.append(EpochMetrics(epoch, train_loss, test_loss, test_accuracy, training_seconds, steps))
        if target_accuracy is not None and result.target_epoch is None and test_accuracy >= target_accuracy:
            result.target_epoch, result.target_seconds = epoch, training_seconds
        bar.set_postfix_str(f"epoch {epoch}/{epochs} loss {train_loss:.4f} acc {test_accuracy:.4f}")
        if steps_left <= 0:
            break
    if meter is not None and meter.peak_bytes:
        result.saved_activation_bytes = meter.peak_bytes
    bar.close()
    return result


def progress_bar(total: int, label: str, *, disable: bool = False, file: Any = None) -> tqdm:
    """One tqdm line per run: live on a terminal, ASCII and rarely refreshed in a log file."""
    file = sys.stderr if file is None else file
    is_terminal = bool(getattr(file, "isatty", lambda: False)())
    return tqdm(
        total=total, desc=label, unit="step", leave=True, disable=disable, file=file,
        ascii=not is_terminal, dynamic_ncols=False,
        mininterval=0.5 if is_terminal else LOG_REFRESH_S, maxinterval=LOG_REFRESH_S * 2,
        bar_format="{desc} {percentage:3.0f}%|{bar:20}| {n}/{total} [{elapsed}<{remaining}]{postfix}",
    )


def _train_epoch(
    model: nn.Module,
    step: Any,
    loader: Iterable,
    device: torch.device,
    *,
    max_steps: int | None = None,
    meter: SavedTensorMeter | None = None,
    bar: tqdm | None = None,
) -> tuple[float, float, int, float]:
    """Run one epoch of steps (at most ``max_steps``); return (mean training loss, training
    wall-clock seconds, steps, seconds of the first step).  With ``meter``, the first step runs
    under it."""
    model.train()
    synchronize(device)
    start = time.perf_counter()
    # Accumulate on the device and read the value once: a .item() per step would force a host
    # sync every step and distort the timing of asynchronous (CUDA) training.
    total = torch.zeros((), device=device)
    batches, first_step = 0, 0.0
    for inputs, targets in loader:
        if max_steps is not None and batches >= max_steps:
            break
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if meter is not None and batches == 0:
            with meter:
                loss = step(inputs, targets)
        else:
            loss = step(inputs, targets)
        total += loss.detach().float()
        batches += 1
        if batches == 1:  # one synchronisation per epoch: the first step's time (a compile shows there)
            synchronize(device)
            first_step = time.perf_counter() - start
        if bar is not None:
            bar.update(1)
    mean_loss = total.item() / max(batches, 1)  # .item() synchronizes, so the clock is honest
    synchronize(device)
    return mean_loss, time.perf_counter() - start, batches, first_step


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


def _json_float(value: Any) -> Any:
    """Non-finite floats become None so the JSON stays standard (no NaN/Infinity tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)
