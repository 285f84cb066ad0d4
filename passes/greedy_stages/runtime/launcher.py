"""Multi-process runtime for greedy stages: one process per stage over torch.distributed.

Before: a model transformed with ``effcompile.GreedyStages(K)`` trains in one process
(``effcompile.train_step`` runs the K stages one after the other).
After: K processes (rank k = stage k) each hold the same model (built from the same seed) but
train only stage k and its aux head with their own optimizer.  Messages go forward only:

    stage 0 reads a batch → trains → sends (activation, labels, step id) → stage 1 → … → stage K−1

No gradient ever crosses a process boundary (DGL), so there is no pipeline bubble: stage k works
on step t while stage k+1 works on step t−1.

Modes (``GreedyStages.mode``):
    sync: lockstep — stage k>0 trains on every message exactly once, in order.  Because gloo's
        send completes only when the receiver has posted its receive, the producer is at most
        one step ahead.  The losses equal the single-process ``train_step`` step for step.
    async: a receiver thread per stage k>0 puts every arriving batch into a bounded
        ``ReplayBuffer`` (priority LIFO, ``max_reuse`` cap); the trainer samples from it, so a
        producer never waits for its consumer's training, and a fast consumer reuses batches.

Transport (``GreedyStages.transport``): ``none``/``int8``/``vq`` codecs from
``effcompile.passes.greedy_stages.runtime.transport`` encode every activation on the wire (and in the replay buffers).  The
VQ codebook is learnt on the sender; a message carries it whenever the sender published a new
one (every ``codebook_every`` steps), and those bytes are counted.

Wire protocol per message on the boundary (k, k+1), each piece a gloo isend/irecv on a process
group of just the two ranks: a header of ``HEADER_LEN`` int64 (kind TRAIN/EVAL/END, step id,
codec, activation shape and dtype, codebook version, label shape, field table) followed by the
payload fields and the labels.  After END the receiver answers one int64 ACK, so the sender
knows its last messages were consumed.

Faults: every wait has the deadline ``GreedyStages.timeout_s``.  A killed peer closes its
sockets (gloo reports "connection closed"), a hung one lets the deadline pass; either way the
surviving rank raises :class:`StageRuntimeError` naming the peer stage and the step, writes it
to the run directory and exits.  The launcher (``run_stages``) polls its children, gives the
survivors a short grace period to report, terminates every remaining child and raises one
``StageRuntimeError`` that names the dead or hung stage.  A watchdog also fires when no stage
made progress for ``2·timeout_s`` (a hang outside any wait).

Checkpoints: with ``checkpoint_dir``, stage k writes ``stage{k}.pt`` every ``checkpoint_every``
of its steps and at the end (atomically, through ``effcompile.checkpoint.save_checkpoint``):
model and optimizer state, RNG, step, losses, both codecs (VQ codebooks and EMA statistics)
and the replay buffer.  ``resume=True`` restarts every stage from its file; in sync mode the
stages' checkpoints form a consistent cut (all messages up to step n were consumed), so a
resumed run reproduces the uninterrupted one step for step.

Launch: ``run_stages(...)`` (Python, spawns K processes) or torchrun::

    torchrun --nproc-per-node 2 -m effcompile.passes.greedy_stages.runtime --model cnn --dataset digits --stages 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from effcompile.api import checked_max_grad_norm
from effcompile.passes.greedy_stages.config import GreedyStages

from .wire import HEADER_BYTES, HEADER_LEN, StageRuntimeError
from .transport import RUNTIME_CODEBOOK_EVERY
from .worker import Fault, Layout, StageJob, build_staged_model, cycle_batches, stage_process, stage_state_keys

__all__ = ["StageRuntimeError", "Fault", "Layout", "StageJob", "StageRunResult", "run_stages", "ZooJob", "load_stage_checkpoints",
           "build_staged_model", "stage_state_keys", "cycle_batches", "cross_entropy", "stage_process",
           "merge_results", "HEADER_LEN", "HEADER_BYTES", "main", "command"]


@dataclasses.dataclass
class StageRunResult:
    """What a multi-process run measured (per stage lists are indexed by stage; with D replicas
    the per-stage losses are replica 0's and the rates and byte counts sum over the replicas)."""

    num_stages: int
    mode: str
    transport: str
    losses: List[List[float]]          # per stage: the loss of every training step (replica 0)
    step_ids: List[List[int]]          # per stage: the data step id each training step used (replica 0)
    boundaries: List[Dict[str, Any]]   # per boundary k→k+1: bytes (raw vs wire), messages, codec counters
    samples_per_s: float               # stage 0 samples (all replicas) / (last stage end − first stage start)
    stage_samples_per_s: List[float]   # per stage: samples it trained (all replicas) / its own span
    wall_s: float
    accuracy: Optional[float]          # last stage, on the eval batches (None without eval data)
    head_accuracy: List[Optional[float]]
    replay: List[Optional[Dict[str, int]]]
    model_state: Dict[str, torch.Tensor]  # every stage's trained parameters and buffers, merged
    start_steps: List[int]             # steps each stage resumed from (0 for a fresh run)
    startup_s: List[float] = dataclasses.field(default_factory=list)  # per stage: launch → model built
    build_s: List[float] = dataclasses.field(default_factory=list)    # per stage: model build (transform) only
    data_parallel: int = 1             # replicas D per stage (K·D processes)
    replica_losses: List[List[List[float]]] = dataclasses.field(default_factory=list)  # [stage][replica] losses
    # Per stage: the largest |difference| of any parameter or buffer between replica 0 and another
    # replica at the end (0.0: the replicas stayed identical; None with one replica).
    replica_divergence: List[Optional[float]] = dataclasses.field(default_factory=list)
    # Samples every stage trained per second: the slowest stage's rate (async stages may train
    # more or fewer samples than stage 0 produced).
    pipeline_samples_per_s: float = float("nan")

    def summary(self) -> Dict[str, Any]:
        """JSON-ready numbers (no tensors)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("model_state", "step_ids", "replica_losses")}
        fields["replica_final_losses"] = [[_mean(l[-10:]) for l in stage] for stage in self.replica_losses]
        fields["final_losses"] = [float(sum(l[-10:]) / max(1, len(l[-10:]))) if l else None for l in self.losses]
        fields["first_losses"] = [float(sum(l[:10]) / max(1, len(l[:10]))) if l else None for l in self.losses]
        fields.pop("losses")
        return fields



def _mean(values: Sequence[float]) -> Optional[float]:
    return float(sum(values) / len(values)) if values else None


# ------------------------------------------------------------------------------ launcher
def _exit_description(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "was still running (hung?) and was terminated"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


def _terminate(processes: Sequence[Any]) -> None:
    """SIGTERM, then SIGKILL after 2 s, then reap: no orphan survives the launcher."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 2.0
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def _read_error_file(path: str) -> str:
    """The message a failed stage wrote (JSON, data only)."""
    try:
        with open(path) as handle:
            message = json.load(handle)["message"]
        return str(message)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"(its error report {path} is unreadable: {type(error).__name__}: {error})"


def _read_result_file(path: str) -> Dict[str, Any]:
    """A stage's result file, read as plain data (``weights_only=True``: no code from it runs)."""
    try:
        result = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise StageRuntimeError(f"greedy-stage run: the stage result file {path} is unreadable "
                                f"({type(error).__name__}: {first})") from None
    if not isinstance(result, dict):
        raise StageRuntimeError(f"greedy-stage run: the stage result file {path} holds a {type(result).__name__}, "
                                "not a result dict")
    return result


def _collect_failure(processes: Sequence[Any], run_dir: str, progress: Any, exitcodes: Dict[int, Optional[int]],
                     layout: Layout) -> str:
    parts = []
    for rank, process in enumerate(processes):
        error_path = os.path.join(run_dir, f"error{rank}.json")
        step = int(progress[2 * rank])
        if os.path.exists(error_path):
            continue
        code = exitcodes.get(rank)
        if code not in (0,):
            parts.append(f"{layout.name(rank)} (pid {process.pid}, rank {rank}) {_exit_description(code)} "
                         f"after {step} training steps")
    for rank in range(len(processes)):
        error_path = os.path.join(run_dir, f"error{rank}.json")
        if os.path.exists(error_path):
            parts.append(_read_error_file(error_path))
    return "greedy-stage run failed: " + "; ".join(parts)


def _monitor(processes: Sequence[Any], run_dir: str, progress: Any, timeout_s: float, start_timeout_s: float,
             layout: Layout) -> None:
    """Wait for every stage; on the first failure give survivors a grace period, then stop all."""
    grace = min(timeout_s, 2.0)  # survivors next to a dead peer see its closed sockets at once
    failed_at: Optional[float] = None
    last_progress, last_change = None, time.monotonic()
    started = False
    while True:
        codes = [p.exitcode for p in processes]
        if all(code == 0 for code in codes):
            return
        now = time.monotonic()
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = now
        snapshot = tuple(progress[:])
        if snapshot != last_progress:
            last_progress, last_change = snapshot, now
            started = started or any(progress[2 * r + 1] > 0 for r in range(len(processes)))
        stalled = now - last_change > (2 * timeout_s + 5.0 if started else start_timeout_s)
        if stalled and failed_at is None:
            _terminate(processes)
            steps = {layout.name(r): int(progress[2 * r]) for r in range(len(processes))}
            raise _launcher_error(f"greedy-stage run hung: no stage made progress for {now - last_change:.0f} s "
                                  f"(steps {steps}); every stage process was terminated", processes, progress)
        if failed_at is not None and (all(code is not None for code in codes) or now - failed_at > grace):
            exitcodes = {rank: p.exitcode for rank, p in enumerate(processes)}
            _terminate(processes)
            raise _launcher_error(_collect_failure(processes, run_dir, progress, exitcodes, layout), processes, progress)
        time.sleep(0.05)


def _launcher_error(message: str, processes: Sequence[Any], progress: Any) -> StageRuntimeError:
    error = StageRuntimeError(message)
    error.pids = tuple(p.pid for p in processes)
    beats = [progress[2 * r + 1] for r in range(len(processes)) if progress[2 * r + 1] > 0]
    error.stalled_s = time.time() - max(beats) if beats else float("nan")
    return error


def _process_context(mp: Any) -> Any:
    """A fork server that imported torch and effcompile once (Linux), else spawn.

    Importing torch + effcompile costs several seconds per process; the fork server pays it once
    per launcher and forks every stage process from a clean, single-threaded interpreter (plain
    ``fork`` of the launcher would copy its OpenMP/thread state, which is unsafe).
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    # (sklearn: the bundled digits dataset of the zoo jobs; a missing module is skipped by the server.)
    context.set_forkserver_preload(["effcompile.passes.greedy_stages.runtime", "effcompile.passes", "effcompile.models",
                                    "sklearn.datasets", "sklearn.model_selection"])
    return context


def run_stages(config: GreedyStages, model_factory: Callable[[], Tuple[nn.Module, Any]], loss_fn: Callable,
               optimizer_factory: Callable[[List[nn.Parameter]], torch.optim.Optimizer],
               data_factory: Callable[[], Any], steps: int, *, eval_factory: Optional[Callable[[], Any]] = None,
               seed: int = 0, threads_per_process: int = 1, checkpoint_dir: Optional[str] = None,
               checkpoint_every: int = 0, resume: bool = False, codebook_every: int = RUNTIME_CODEBOOK_EVERY,
               fault: Optional[Fault] = None, start_timeout_s: float = 120.0, data_parallel: int = 1,
               max_grad_norm: Optional[float] = None) -> StageRunResult:
    """Train a greedy-staged model with one process per stage and replica on this machine (gloo on CPU).

    Args:
        config: the ``GreedyStages`` config (``num_stages`` processes are started; ``mode``,
            ``buffer``, ``max_reuse``, ``transport``, ``vq_*`` and ``timeout_s`` drive the runtime).
        model_factory: top-level callable returning ``(model, example_inputs)`` — an untransformed
            model (every process transforms it with ``config`` after ``torch.manual_seed(seed)``,
            so all stages start from the same weights) or an already staged one.
        loss_fn: ``loss_fn(logits, labels)`` (applied to every stage's local logits).
        optimizer_factory: ``optimizer_factory(parameters) -> Optimizer``, one per stage.
        data_factory: returns an iterable of ``(inputs, labels)`` batches; stage 0 iterates it
            repeatedly (``steps`` batches in all, a seeded shuffling loader stays deterministic).
        steps: training steps of stage 0 (async consumers stop after as many steps or when their
            replay buffer runs dry after the end of the stream).
        eval_factory: optional iterable of test batches streamed through the stages after training;
            gives ``accuracy`` (last stage) and ``head_accuracy`` (aux heads).
        checkpoint_dir / checkpoint_every / resume: per-stage checkpoints (see the module docstring).
        codebook_every: VQ transport: publish (and send) a new codebook every this many steps.
        fault: test hook making one stage (of one replica) crash or hang at a given step.
        data_parallel: D replicas of every stage, K·D processes (see ``Layout``).  Stage 0's
            replica d trains on the batches whose index is d modulo D; each stage's replicas
            all-reduce their gradients and buffers every step, so they stay identical; the
            activations of replica d flow to replica d of the next stage.  ``steps`` counts each
            replica's steps (D·steps batches in all).
        max_grad_norm: clip each stage's gradient (its replicas' average) to this total norm
            before its optimizer step, as ``train_step(max_grad_norm=...)`` does per stage.

    Raises ``StageRuntimeError`` naming the failed stage and step when a stage fails, dies or hangs;
    every child process is stopped before it is raised.
    """
    if not isinstance(config, GreedyStages):
        raise TypeError(f"run_stages expects an effcompile.GreedyStages config, got {config!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps={steps!r} is invalid: expected an integer >= 1")
    if not (isinstance(data_parallel, int) and data_parallel >= 1):
        raise ValueError(f"data_parallel={data_parallel!r} is invalid: expected an integer >= 1")
    max_grad_norm = checked_max_grad_norm(max_grad_norm, "run_stages")
    if fault is not None and not 0 <= fault.stage < config.num_stages:
        raise ValueError(f"Fault.stage={fault.stage} is out of range for {config.num_stages} stages")
    if fault is not None and not fault.replica < data_parallel:
        raise ValueError(f"Fault.replica={fault.replica} is out of range for {data_parallel} replicas")
    import torch.multiprocessing as mp

    job = StageJob(config, model_factory, loss_fn, optimizer_factory, data_factory, steps, eval_factory, seed,
                   threads_per_process, checkpoint_dir, checkpoint_every, resume, codebook_every, fault,
                   replicas=data_parallel, max_grad_norm=max_grad_norm)
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
    layout = job.layout
    world = layout.world
    context = _process_context(mp)
    progress = context.Array("d", 2 * world, lock=False)
    started = job.launched_at = time.time()
    with tempfile.TemporaryDirectory(prefix="effcompile-stages-") as run_dir:
        init_method = f"file://{os.path.join(run_dir, 'rendezvous')}"
        processes = [context.Process(target=stage_process, args=(rank, world, job, init_method, run_dir, progress),
                                     daemon=True, name=f"effcompile-rank{rank}") for rank in range(world)]
        try:
            for process in processes:
                process.start()
            _monitor(processes, run_dir, progress, config.timeout_s, start_timeout_s, layout)
        finally:
            _terminate(processes)
        missing = [layout.name(rank) for rank in range(world)
                   if not os.path.exists(os.path.join(run_dir, f"result{rank}.pt"))]
        if missing:
            raise StageRuntimeError(f"greedy-stage run: {', '.join(missing)} exited with code 0 but wrote no result")
        results = [_read_result_file(os.path.join(run_dir, f"result{rank}.pt")) for rank in range(world)]
    return merge_results(config, results, time.time() - started)


def _span(result: Dict[str, Any]) -> float:
    if result["start_time"] is None or result["end_time"] is None:
        return float("nan")
    return result["end_time"] - result["start_time"]


def _divergence(replicas: List[Dict[str, Any]]) -> Optional[float]:
    """Largest |difference| of any owned tensor between replica 0 and the others (None for one)."""
    if len(replicas) < 2:
        return None
    reference = replicas[0]["state"]
    worst = 0.0
    for other in replicas[1:]:
        for key, value in reference.items():
            if value.is_floating_point():
                worst = max(worst, float((value - other["state"][key]).abs().max()) if value.numel() else 0.0)
            elif not torch.equal(value, other["state"][key]):
                worst = float("inf")
    return worst


def merge_results(config: GreedyStages, results: List[Dict[str, Any]], wall_s: float) -> StageRunResult:
    """One ``StageRunResult`` from the per-rank result dicts (K·D of them, in rank order)."""
    num_stages = config.num_stages
    replicas = len(results) // num_stages
    by_stage = [[r for r in results if r.get("stage", r["rank"]) == k] for k in range(num_stages)]
    for stage in by_stage:
        stage.sort(key=lambda r: r.get("replica", 0))
    starts = [r["start_time"] for r in results if r["start_time"] is not None]
    ends = [r["end_time"] for r in results if r["end_time"] is not None]
    batch = results[0]["batch_size"]
    span = max(ends) - min(starts) if starts and ends else float("nan")
    stage_rates = []
    for stage in by_stage:
        rates = [(r["trained"] - r["start_step"]) * batch / _span(r) for r in stage]
        stage_rates.append(float(sum(rates)) if all(rate == rate and rate > 0 for rate in rates) else float("nan"))
    boundaries = []
    for k in range(num_stages - 1):
        counts: Dict[str, Any] = {}
        for r in by_stage[k]:  # every replica's link k→k+1, summed
            for key, value in r["bytes"].items():
                counts[key] = counts.get(key, 0) + value
        messages = max(1, counts["messages"])
        counts["raw_bytes_per_step"] = counts["raw_bytes"] / messages
        counts["wire_bytes_per_step"] = counts["wire_bytes"] / messages
        counts["compression"] = counts["raw_bytes"] / max(1, counts["wire_bytes"])
        counts["activation_compression"] = counts["activation_raw_bytes"] / max(1, counts["activation_wire_bytes"])
        counts["codec"] = by_stage[k][0]["codec"].get("codec_out", {})
        boundaries.append(counts)
    last = by_stage[-1]
    eval_total = sum(r["eval_total"] for r in last)
    accuracy = sum(r["eval_correct"] for r in last) / eval_total if eval_total else None
    head_accuracy = []
    for k, stage in enumerate(by_stage):
        total = sum(r["eval_total"] for r in stage)
        head_accuracy.append(sum(r["head_correct"] for r in stage) / total if total and k < num_stages - 1 else None)
    state: Dict[str, torch.Tensor] = {}
    for stage in by_stage:
        state.update(stage[0]["state"])
    trained0 = sum(r["trained"] - r["start_step"] for r in by_stage[0])
    first = [stage[0] for stage in by_stage]
    startup = [r["timeline"]["spawn_s"] + r["timeline"]["build_s"] for r in first if "timeline" in r]
    build = [r["timeline"]["build_s"] for r in first if "timeline" in r]
    return StageRunResult(
        num_stages=num_stages, mode=config.mode, transport=config.transport,
        losses=[r["losses"] for r in first], step_ids=[r["step_ids"] for r in first], boundaries=boundaries,
        samples_per_s=trained0 * batch / span if span and span > 0 else float("nan"),
        stage_samples_per_s=stage_rates, wall_s=wall_s, accuracy=accuracy, head_accuracy=head_accuracy,
        replay=[r["replay"] for r in first], model_state=state, start_steps=[r["start_step"] for r in first],
        startup_s=startup, build_s=build, data_parallel=replicas,
        replica_losses=[[r["losses"] for r in stage] for stage in by_stage],
        replica_divergence=[_divergence(stage) for stage in by_stage],
        pipeline_samples_per_s=min(stage_rates) if stage_rates else float("nan"))


def load_stage_checkpoints(checkpoint_dir: str, model: nn.Module) -> Dict[str, Any]:
    """Assemble the full trained model from every stage's checkpoint (each stage's own keys).

    ``model`` is a staged model built the same way; returns each stage's ``extra`` dict.
    Every file is read as plain data (no code runs) and checked (checksum, transform, shapes and
    dtypes of the stage's keys) before anything is loaded: a bad file raises
    ``effcompile.CheckpointError`` naming it, and ``model`` is then left as it was.
    """
    from effcompile.checkpoint import check_applied_layers, check_tensors, read_checkpoint
    from effcompile.passes.greedy_stages.rewrite import staged_model

    staged = staged_model(model)
    merged, extras = {}, {}
    for k in range(staged.num_stages):
        path = os.path.join(checkpoint_dir, f"stage{k}.pt")
        payload = read_checkpoint(path)
        check_applied_layers(path, payload, model)
        keys = stage_state_keys(model, k)
        check_tensors(path, payload["model"], model, keys=keys)
        merged.update({key: payload["model"][key] for key in keys})
        extras[k] = payload["extra"]
    model.load_state_dict(merged, strict=False)
    return extras


# ------------------------------------------------------------------------------ zoo job / CLI
@dataclasses.dataclass(frozen=True)
class ZooJob:
    """Picklable factories for a zoo model on a dataset (the CLI's and the benchmark's job)."""

    model: str = "cnn"
    dataset: str = "digits"
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    data_seed: int = 0
    num_train: int = 2048  # synthetic only
    image_size: int = 32   # synthetic only
    widths: Optional[Tuple[int, ...]] = None
    # Passes applied (with their default configs) before the stages, e.g. ("decorrelation",):
    # every stage process builds the same composed model.
    passes: Tuple[str, ...] = ()

    def _split(self):
        from effcompile.harness.data import get_dataset

        if self.dataset == "synthetic":
            return get_dataset("synthetic", num_train=self.num_train, num_test=256, image_size=self.image_size,
                               seed=self.data_seed)
        return get_dataset(self.dataset)

    def model_factory(self) -> Tuple[nn.Module, Any]:
        from effcompile.models import get_model

        train, _, info = self._split()
        kwargs = {} if self.widths is None else {"widths": tuple(self.widths)}
        model = get_model(self.model, num_classes=info.num_classes, in_channels=info.in_channels,
                          image_size=info.image_size, **kwargs)
        example_inputs = (train.tensors[0][: self.batch_size],)
        if self.passes:
            import warnings

            from effcompile.api import transform
            from effcompile.config import PASS_CONFIGS

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for name in self.passes:
                    model = transform(model, PASS_CONFIGS[name](), example_inputs=example_inputs)
        return model, example_inputs

    def data_factory(self):
        from effcompile.harness.data import make_loaders

        train, test, _ = self._split()
        return make_loaders(train, test, self.batch_size, self.data_seed)[0]

    def eval_factory(self):
        from effcompile.harness.data import make_loaders

        train, test, _ = self._split()
        return make_loaders(train, test, self.batch_size, self.data_seed)[1]

    def optimizer_factory(self, parameters: List[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Picklable mean cross-entropy (the CLI's loss)."""
    return nn.functional.cross_entropy(logits, labels)


def _parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    from effcompile.harness.data import DATASETS

    parser = argparse.ArgumentParser(prog=prog or "python -m effcompile.passes.greedy_stages.runtime",
                                     description="Train a greedy-staged zoo model with one process per stage "
                                                 "(and per data-parallel replica).")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="digits", choices=tuple(DATASETS))
    parser.add_argument("--with", dest="passes", default="",
                        help="comma-separated passes applied with their defaults before the stages "
                             "(e.g. decorrelation); their shared state is averaged over each stage's replicas")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--data-parallel", type=int, default=1,
                        help="replicas D of every stage: K·D processes, each stage's replicas all-reduce gradients")
    parser.add_argument("--mode", default="sync", choices=GreedyStages.MODES)
    parser.add_argument("--transport", default="none", choices=GreedyStages.TRANSPORTS)
    parser.add_argument("--buffer", type=int, default=4)
    parser.add_argument("--max-reuse", type=int, default=2)
    parser.add_argument("--vq-codebook-size", type=int, default=1024)
    parser.add_argument("--vq-group-size", type=int, default=8)
    parser.add_argument("--codebook-every", type=int, default=RUNTIME_CODEBOOK_EVERY,
                        help="VQ: publish (and send) a new codebook every this many steps")
    parser.add_argument("--cuts", default=None, help="comma-separated module paths (default: automatic cuts)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--max-grad-norm", type=float, default=None, help="clip each stage's gradient to this norm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage process")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--image-size", type=int, default=32, help="synthetic data only")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--out", default=None, help="write the result summary as JSON here")
    return parser


def _config_from_args(args: argparse.Namespace) -> GreedyStages:
    cuts = None if not args.cuts else tuple(args.cuts.split(","))
    return GreedyStages(num_stages=args.stages, cuts=cuts, mode=args.mode, buffer=args.buffer,
                        max_reuse=args.max_reuse, transport=args.transport, vq_codebook_size=args.vq_codebook_size,
                        vq_group_size=args.vq_group_size, timeout_s=args.timeout)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Dict[str, Any]:
    """CLI: under torchrun (``RANK`` set) this process is one rank; otherwise it spawns them all."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.data_parallel < 1:
        parser.error(f"--data-parallel must be >= 1, got {args.data_parallel}")
    try:
        checked_max_grad_norm(args.max_grad_norm, "--max-grad-norm")
    except ValueError as error:
        parser.error(str(error))
    from effcompile.config import PASS_CONFIGS

    passes = tuple(name for name in args.passes.split(",") if name)
    from effcompile.passes import step_owners

    composable = sorted(set(PASS_CONFIGS) - {p.config_type.name for p in step_owners()})
    unknown = [name for name in passes if name not in composable]
    if unknown:
        parser.error(f"--with {','.join(unknown)}: not a pass to compose with the stage processes (a pass that "
                     f"owns the training step runs only in one process); choose from {composable}")
    try:
        config = _config_from_args(args)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    zoo = ZooJob(model=args.model, dataset=args.dataset, batch_size=args.batch_size, lr=args.lr,
                 data_seed=args.seed, image_size=args.image_size, passes=passes)
    eval_factory = None if args.no_eval else zoo.eval_factory
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _torchrun_stage(args, config, zoo, eval_factory)
    result = run_stages(config, zoo.model_factory, cross_entropy, zoo.optimizer_factory, zoo.data_factory,
                        args.steps, eval_factory=eval_factory, seed=args.seed, threads_per_process=args.threads,
                        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                        resume=args.resume, codebook_every=args.codebook_every, data_parallel=args.data_parallel,
                        max_grad_norm=args.max_grad_norm)
    summary = result.summary()
    _emit(summary, args.out)
    return summary


def command(argv: Sequence[str], prog: str) -> int:
    """``effcompile stages``: :func:`main` with a failed run reported as one line on stderr (exit 2)."""
    try:
        main(argv, prog=prog)
    except StageRuntimeError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _torchrun_stage(args: argparse.Namespace, config: GreedyStages, zoo: ZooJob, eval_factory: Any) -> Dict[str, Any]:
    """One rank under torchrun (any number of nodes: rendezvous from torchrun's environment).

    The ranks' results travel to rank 0 over torch.distributed, not through files, so nodes need
    no shared file system; rank 0 merges and writes ``--out``.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    layout = Layout(config.num_stages, args.data_parallel)
    if world != layout.world:
        raise SystemExit(f"torchrun started {world} processes but --stages {config.num_stages} × --data-parallel "
                         f"{args.data_parallel} needs {layout.world}")
    run_dir = args.checkpoint_dir or os.path.join(tempfile.gettempdir(), f"effcompile-stages-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    os.makedirs(run_dir, exist_ok=True)
    job = StageJob(config, zoo.model_factory, cross_entropy, zoo.optimizer_factory, zoo.data_factory, args.steps,
                   eval_factory, args.seed, args.threads, args.checkpoint_dir, args.checkpoint_every, args.resume,
                   args.codebook_every, None, "nccl" if torch.cuda.is_available() else "gloo",
                   replicas=args.data_parallel, max_grad_norm=args.max_grad_norm)
    started = time.time()
    results = stage_process(rank, world, job, None, run_dir, collect=True)  # exits 1 on failure
    summary: Dict[str, Any] = {}
    if rank == 0:
        summary = merge_results(config, results, time.time() - started).summary()
        _emit(summary, args.out)
    return summary


def _json_ready(value: Any) -> Any:
    """``value`` with every non-finite float as None: strict JSON (``NaN`` is not JSON, and e.g.
    the start-up times are NaN under torchrun, which has no launcher clock)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def _emit(summary: Dict[str, Any], out: Optional[str]) -> None:
    text = json.dumps(_json_ready(summary), indent=2, default=str, allow_nan=False)
    if out:
        with open(out, "w") as handle:
            handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
