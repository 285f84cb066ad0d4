"""Measurement primitives: step times, compilation, recompiles and memory, on any device.

Step times
----------
Step-time benchmark: a transformed model against plain backprop on the same machine.

``bench_pass`` builds a plain model and a transformed deep copy (identical initial weights),
and times full training steps (zero_grad, forward, loss, backward, optimizer step) of both on one
fixed synthetic batch.  ``time_steps`` interleaves the variants in alternating blocks
(A B, B A, A B, ...) so slow drift of the machine (thermal throttling, other processes, clock
boosts) affects both alike and cancels in the ratio.  On CUDA each step is timed with CUDA
events; on CPU with ``time.perf_counter``.  Absolute CPU times say little about a GPU, so the
headline number is the ratio transformed/plain.

Activation memory
-----------------
Activation memory, measured on any device: bytes autograd saves for backward.

CUDA has ``max_memory_allocated``; a CPU has no allocator statistics, but the memory that
efficient-training techniques save is the activations kept for backward.  ``SavedTensorMeter``
counts them through ``torch.autograd.graph.saved_tensors_hooks``: every saved tensor's storage is
counted once while any saved reference to it is alive (views share storage), and released when
autograd frees the graph (after its backward).  Parameters and buffers are excluded: they are
not activations.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ._compat import unique_graph_count

__all__ = ["SavedTensorMeter", "synchronize", "time_steps", "bench_pass", "machine_info", "CountedStep", "time_first_call", "compile_seconds",
           "peak_step_memory"]


class _SavedHandle:
    """What autograd keeps instead of the tensor; releases the meter's count when freed."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: "SavedTensorMeter", key: Optional[int]) -> None:
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self) -> None:
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """Live and peak bytes of the activations saved for backward inside the ``with`` block."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.refcounts: Dict[int, int] = {}
        self.sizes: Dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _SavedHandle:
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            return _SavedHandle(tensor, self, None)
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded:
            return _SavedHandle(tensor, self, None)
        if self.refcounts.get(key, 0) == 0:
            self.sizes[key] = storage.nbytes()
            self.live_bytes += self.sizes[key]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.refcounts[key] = self.refcounts.get(key, 0) + 1
        return _SavedHandle(tensor, self, key)

    @staticmethod
    def _unpack(handle: _SavedHandle) -> torch.Tensor:
        return handle.tensor

    def _release(self, key: int) -> None:
        self.refcounts[key] -= 1
        if self.refcounts[key] == 0:
            self.live_bytes -= self.sizes.pop(key)
            del self.refcounts[key]

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now (e.g. per stage of a staged step)."""
        self.peak_bytes = self.live_bytes

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


PLAIN, TRANSFORMED = "plain", "transformed"


def time_steps(
    steps: Mapping[str, Callable[[], Any]],
    n_steps: int,
    *,
    block_size: int = 5,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Call every step function ``n_steps`` times, interleaved in blocks; return seconds per call.

    Blocks alternate the order of the variants (A B, then B A, ...) so that neither variant
    always runs right after the other; within a block one variant runs ``block_size`` steps
    back to back, which keeps its caches warm as in real training.
    """
    if n_steps < 1 or block_size < 1:
        raise ValueError(f"n_steps and block_size must be >= 1, got {n_steps} and {block_size}")
    device = torch.device(device)
    times: dict[str, list[float]] = {label: [] for label in steps}
    labels = list(steps)
    block = 0
    while any(len(times[label]) < n_steps for label in labels):
        order = labels if block % 2 == 0 else labels[::-1]
        for label in order:
            count = min(block_size, n_steps - len(times[label]))
            times[label].extend(_time_block(steps[label], count, device))
        block += 1
    return times


def _time_block(step: Callable[[], Any], count: int, device: torch.device) -> list[float]:
    """Time ``count`` consecutive calls of ``step`` (seconds each)."""
    if count <= 0:
        return []
    if device.type == "cuda":
        # Events measure on the GPU timeline without a host sync between steps; one sync per
        # block makes the elapsed times readable.
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(count)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return seconds


class CountedStep:
    """Wraps a step function and attributes newly compiled Dynamo graphs to it.

    The variants are interleaved, so graph counts must be read around each call rather than
    around the whole benchmark; reading a counter costs nanoseconds.
    """

    def __init__(self, step: Callable[[], Any]) -> None:
        self.step = step
        self.graphs = 0
        self.calls = 0
        self.graphs_after_first_call = 0

    def __call__(self) -> Any:
        before = unique_graph_count()
        out = self.step()
        self.graphs += unique_graph_count() - before
        self.calls += 1
        if self.calls == 1:
            self.graphs_after_first_call = self.graphs
        return out

    @property
    def recompiles(self) -> int:
        """Graphs compiled after the first call (the first call's graphs are the compilation)."""
        return self.graphs - self.graphs_after_first_call


def bench_pass(
    build_model: Callable[[], nn.Module],
    configs: Sequence[Any],
    example_inputs: Sequence[torch.Tensor],
    num_classes: int,
    *,
    steps: int = 50,
    warmup: int = 5,
    block_size: int = 5,
    lr: float = 0.01,
    momentum: float = 0.9,
    compile: bool = False,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Benchmark training steps of ``build_model()`` plain and transformed by ``configs``.

    ``example_inputs`` is one synthetic batch (its first dimension is the batch size); random
    class targets in ``[0, num_classes)`` are drawn from ``seed``.  Both variants use
    :func:`effcompile.train_step` with SGD, so the only difference between them is the
    transform.  Returns a JSON-ready dict with per-variant statistics, ``ratio`` (median
    transformed / median plain step time), ``predicted_ratio`` (the Plan's ``predicted_step``:
    the cost model's step ratio, compiled with ``compile``), the CUDA ``memory_ratio`` (None on CPU) and ``machine`` info.
    """
    if not configs:
        raise ValueError("bench_pass needs at least one pass config to compare against plain backprop")
    from .api import predicted_step, train_step, transform

    if steps < 1 or warmup < 1:
        raise ValueError(f"steps and warmup must be >= 1, got {steps} and {warmup}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if compile:
        torch.compiler.reset()  # start from empty caches so compile time and graph counts are this run's

    torch.manual_seed(seed)
    plain = build_model().to(device)
    transformed = copy.deepcopy(plain)
    inputs = tuple(t.to(device) for t in example_inputs)
    transform(transformed, *configs, example_inputs=inputs)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, num_classes, (inputs[0].shape[0],), generator=generator).to(device)

    counted = {}
    for label, model in ((PLAIN, plain), (TRANSFORMED, transformed)):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        step = train_step(model, nn.CrossEntropyLoss(), optimizer, compile=compile)
        counted[label] = CountedStep(lambda step=step: step(inputs, targets))

    first_call = {label: time_first_call(step, device) for label, step in counted.items()}
    if warmup > 1:
        time_steps(counted, warmup - 1, block_size=block_size, device=device)
    memory = {label: peak_step_memory(step, device) for label, step in counted.items()}
    times = time_steps(counted, steps, block_size=block_size, device=device)

    variants = {
        label: _variant_stats(times[label], first_call[label], counted[label], memory[label], compile)
        for label in counted
    }
    plain_median = variants[PLAIN]["median_step_s"]
    ratio = variants[TRANSFORMED]["median_step_s"] / plain_median if plain_median > 0 else float("nan")
    memory_ratio = None
    if memory[PLAIN] and memory[TRANSFORMED]:
        memory_ratio = memory[TRANSFORMED] / memory[PLAIN]
    return {
        "passes": [config.to_dict() for config in configs],
        "batch_size": int(inputs[0].shape[0]),
        "input_shapes": [list(t.shape) for t in inputs],
        "steps": steps,
        "warmup": warmup,
        "block_size": block_size,
        "compile": compile,
        "device": str(device),
        "variants": variants,
        "ratio": ratio,
        # The Plan's cost model for the step measured (eager, or compiled), None without one.
        "predicted_ratio": predicted_step(transformed, compiled=compile),
        "memory_ratio": memory_ratio,
        "note": _note(device),
        "machine": machine_info(device),
    }


def time_first_call(step: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of the first call (with --compile: compilation plus one step)."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def compile_seconds(first_call_s: float, step_s: float) -> float:
    """The compilation inside a first compiled call: its excess over a typical step (never negative)."""
    return max(first_call_s - step_s, 0.0)


def peak_step_memory(step: Callable[[], Any], device: torch.device) -> int | None:
    """Peak CUDA bytes allocated during one step above what was allocated before it.

    Both models live on the device during the benchmark, so an absolute peak would include the
    other variant's weights; the increment is the step's own working memory (activations saved
    for backward, gradients, the passes' temporaries).  None on CPU.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _variant_stats(
    seconds: Sequence[float], first_call_s: float, counted: CountedStep, peak_memory: int | None, compile: bool
) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "steps_timed": len(seconds),
        "median_step_s": median,
        "mean_step_s": statistics.fmean(seconds),
        "min_step_s": min(seconds),
        "max_step_s": max(seconds),
        "first_call_s": first_call_s,
        # The first call compiles and runs one step; subtracting a typical step isolates compilation.
        "compile_s": compile_seconds(first_call_s, median) if compile else None,
        "graphs": counted.graphs,
        "recompiles": counted.recompiles,
        "peak_step_memory_bytes": peak_memory,
    }


def _note(device: torch.device) -> str:
    if device.type == "cuda":
        return "times from CUDA events; peak memory is the per-step increment over resident memory"
    return "absolute times are CPU times and say little about GPU speed; compare the ratio"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU): a wall-clock read must follow it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions and hardware that a benchmark number depends on."""
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": _cpu_name(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux, where platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
