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
``effcompile.transport`` encode every activation on the wire (and in the replay buffers).  The
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

    torchrun --nproc-per-node 2 -m effcompile.stage_runtime --model cnn --dataset digits --stages 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import queue
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import GreedyStages
from .replay import ReplayBuffer
from .transport import Payload, VQCodec, make_codec, payload_bytes

__all__ = ["StageRuntimeError", "Fault", "StageRunResult", "run_stages", "ZooJob", "load_stage_checkpoints",
           "build_staged_model", "stage_state_keys", "cycle_batches", "cross_entropy", "stage_process",
           "merge_results", "HEADER_LEN", "HEADER_BYTES", "main"]

HEADER_LEN = 32
HEADER_BYTES = HEADER_LEN * 8
KIND_TRAIN, KIND_EVAL, KIND_END = 1, 2, 3
_KIND_NAMES = {KIND_TRAIN: "train", KIND_EVAL: "eval", KIND_END: "end"}
_CODECS = ("none", "int8", "vq")
_FIELDS = ("x", "q", "scales", "codes", "codebook")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
           torch.int32, torch.int64, torch.bool)
_MAX_DIMS, _MAX_LABEL_DIMS, _MAX_FIELDS = 6, 3, 4
# Header slots.
_H_KIND, _H_STEP, _H_CODEC, _H_NDIM, _H_SHAPE, _H_DTYPE, _H_VERSION = 0, 1, 2, 3, 4, 10, 11
_H_LABEL_NDIM, _H_LABEL_SHAPE, _H_LABEL_DTYPE, _H_NFIELDS, _H_FIELDS = 12, 13, 16, 17, 18  # fields: 3 slots each


class StageRuntimeError(RuntimeError):
    """A stage process failed, died or hung; the message names the stage and the step.

    Raised by the launcher, it also carries ``pids`` (the stage processes, all stopped by then)
    and ``stalled_s``: seconds from the last progress of any stage to the raise, i.e. how long
    the failure took to detect and report.
    """

    pids: Tuple[int, ...] = ()
    stalled_s: float = float("nan")


@dataclasses.dataclass(frozen=True)
class Fault:
    """Test hook: make stage ``stage`` fail when it reaches training step ``step``.

    ``kind``: ``"exit"`` (``os._exit(1)``: a crash without cleanup), ``"kill"`` (SIGKILL to
    itself) or ``"hang"`` (sleep forever in the training loop).
    """

    stage: int
    step: int
    kind: str = "exit"

    def __post_init__(self) -> None:
        if self.kind not in ("exit", "kill", "hang"):
            raise ValueError(f"Fault.kind={self.kind!r} is invalid: expected 'exit', 'kill' or 'hang'")


@dataclasses.dataclass
class StageJob:
    """Everything a stage process needs (picklable: factories must be top-level callables)."""

    config: GreedyStages
    model_factory: Callable[[], Tuple[nn.Module, Any]]
    loss_fn: Callable
    optimizer_factory: Callable[[List[nn.Parameter]], torch.optim.Optimizer]
    data_factory: Callable[[], Any]
    steps: int
    eval_factory: Optional[Callable[[], Any]] = None
    seed: int = 0
    threads: int = 1
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    resume: bool = False
    codebook_every: int = 1
    fault: Optional[Fault] = None
    backend: str = "gloo"
    launched_at: float = 0.0  # launcher's clock when the processes were started (start-up accounting)


@dataclasses.dataclass
class StageRunResult:
    """What a multi-process run measured (per stage lists are indexed by stage)."""

    num_stages: int
    mode: str
    transport: str
    losses: List[List[float]]          # per stage: the loss of every training step
    step_ids: List[List[int]]          # per stage: the data step id each training step used
    boundaries: List[Dict[str, Any]]   # per boundary k→k+1: bytes (raw vs wire), messages, codec counters
    samples_per_s: float               # stage 0 samples / (last stage end − first stage start)
    stage_samples_per_s: List[float]
    wall_s: float
    accuracy: Optional[float]          # last stage, on the eval batches (None without eval data)
    head_accuracy: List[Optional[float]]
    replay: List[Optional[Dict[str, int]]]
    model_state: Dict[str, torch.Tensor]  # every stage's trained parameters and buffers, merged
    start_steps: List[int]             # steps each stage resumed from (0 for a fresh run)
    startup_s: List[float] = dataclasses.field(default_factory=list)  # per stage: launch → model built
    build_s: List[float] = dataclasses.field(default_factory=list)    # per stage: model build (transform) only

    def summary(self) -> Dict[str, Any]:
        """JSON-ready numbers (no tensors)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("model_state", "step_ids")}
        fields["final_losses"] = [float(sum(l[-10:]) / max(1, len(l[-10:]))) if l else None for l in self.losses]
        fields["first_losses"] = [float(sum(l[:10]) / max(1, len(l[:10]))) if l else None for l in self.losses]
        fields.pop("losses")
        return fields


# ------------------------------------------------------------------------------ wire messages
def _classify(error: BaseException, timeout_s: float) -> str:
    text = str(error)
    if "Timed out" in text or "timed out" in text or isinstance(error, TimeoutError):
        return f"timed out after {timeout_s:g} s (peer hung or too slow)"
    if "closed" in text or "reset" in text or "Broken pipe" in text or "refused" in text:
        return "connection closed (peer process died)"
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class _Link:
    """One boundary seen from one of its two ranks: framed messages with deadlines."""

    def __init__(self, me: int, peer: int, group: Any, timeout_s: float, device: torch.device) -> None:
        self.me, self.peer, self.group, self.timeout_s, self.device = me, peer, group, timeout_s, device
        self.timeout = datetime.timedelta(seconds=timeout_s)

    def _fail(self, action: str, step: int, error: BaseException) -> StageRuntimeError:
        return StageRuntimeError(f"stage {self.me}: {action} stage {self.peer} at step {step} failed: "
                                 f"{_classify(error, self.timeout_s)} [stage {self.peer} is the suspect]")

    def _send(self, tensors: Sequence[torch.Tensor], action: str, step: int) -> None:
        try:
            works = [dist.isend(t, self.peer, group=self.group) for t in tensors]
            for work in works:
                work.wait(self.timeout)
        except RuntimeError as error:
            raise self._fail(action, step, error) from error

    def _recv(self, tensor: torch.Tensor, action: str, step: int) -> torch.Tensor:
        try:
            dist.irecv(tensor, self.peer, group=self.group).wait(self.timeout)
        except RuntimeError as error:
            raise self._fail(action, step, error) from error
        return tensor

    def send(self, kind: int, step: int, payload: Optional[Payload], labels: Optional[torch.Tensor]) -> int:
        """Send one message; returns the bytes put on the wire (header included)."""
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[_H_KIND], header[_H_STEP] = kind, step
        tensors: List[torch.Tensor] = []
        if payload is not None:
            _check_fits(len(payload.shape) <= _MAX_DIMS, f"activation of {len(payload.shape)} dims")
            header[_H_CODEC] = _CODECS.index(payload.codec)
            header[_H_NDIM] = len(payload.shape)
            header[_H_SHAPE:_H_SHAPE + len(payload.shape)] = torch.tensor(payload.shape)
            header[_H_DTYPE] = _DTYPES.index(payload.dtype)
            header[_H_VERSION] = payload.codebook_version
            fields = [(name, t) for name, t in payload.fields.items()]
            _check_fits(len(fields) <= _MAX_FIELDS, f"{len(fields)} payload fields")
            header[_H_NFIELDS] = len(fields)
            for i, (name, t) in enumerate(fields):
                header[_H_FIELDS + 3 * i: _H_FIELDS + 3 * i + 3] = torch.tensor(
                    [_FIELDS.index(name), _DTYPES.index(t.dtype), t.numel()])
                tensors.append(t.contiguous().reshape(-1))
            _check_fits(labels.dim() <= _MAX_LABEL_DIMS, f"labels of {labels.dim()} dims")
            header[_H_LABEL_NDIM] = labels.dim()
            header[_H_LABEL_SHAPE:_H_LABEL_SHAPE + labels.dim()] = torch.tensor(labels.shape, dtype=torch.int64)
            header[_H_LABEL_DTYPE] = _DTYPES.index(labels.dtype)
            tensors.append(labels.contiguous().reshape(-1))
        tensors = [header.to(self.device)] + [t.to(self.device) for t in tensors]
        self._send(tensors, f"sending {_KIND_NAMES[kind]} message to", step)
        return sum(t.numel() * t.element_size() for t in tensors)

    def recv(self, expected_step: int, codebook_groups: int) -> Tuple[int, int, Optional[Payload], Optional[torch.Tensor], int]:
        """Receive one message: (kind, step id, payload, labels, wire bytes)."""
        header = self._recv(torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device),
                            "waiting for a message from", expected_step).cpu()
        kind, step = int(header[_H_KIND]), int(header[_H_STEP])
        if kind == KIND_END:
            return kind, step, None, None, HEADER_BYTES
        if kind not in (KIND_TRAIN, KIND_EVAL):
            raise StageRuntimeError(f"stage {self.me}: malformed message (kind {kind}) from stage {self.peer} "
                                    f"at step {expected_step}")
        shape = tuple(int(s) for s in header[_H_SHAPE:_H_SHAPE + int(header[_H_NDIM])])
        fields: Dict[str, torch.Tensor] = {}
        total = HEADER_BYTES
        for i in range(int(header[_H_NFIELDS])):
            name_index, dtype_index, numel = (int(v) for v in header[_H_FIELDS + 3 * i: _H_FIELDS + 3 * i + 3])
            name = _FIELDS[name_index]
            buffer = torch.empty(numel, dtype=_DTYPES[dtype_index], device=self.device)
            fields[name] = buffer
        label_shape = tuple(int(s) for s in header[_H_LABEL_SHAPE:_H_LABEL_SHAPE + int(header[_H_LABEL_NDIM])])
        labels = torch.empty(label_shape, dtype=_DTYPES[int(header[_H_LABEL_DTYPE])], device=self.device)
        for name, buffer in list(fields.items()) + [("labels", labels)]:
            flat = buffer.reshape(-1)
            self._recv(flat, f"receiving {_KIND_NAMES[kind]} payload from", step)
            total += flat.numel() * flat.element_size()
        for name in ("x", "q"):
            if name in fields:
                fields[name] = fields[name].reshape(shape)
        if "codebook" in fields:
            fields["codebook"] = fields["codebook"].reshape(-1, codebook_groups)
        payload = Payload(_CODECS[int(header[_H_CODEC])], fields, shape, _DTYPES[int(header[_H_DTYPE])],
                          int(header[_H_VERSION]))
        return kind, step, payload, labels, total

    def send_ack(self, step: int) -> None:
        self._send([torch.ones(1, dtype=torch.int64, device=self.device)], "acknowledging the end to", step)

    def recv_ack(self, step: int) -> None:
        self._recv(torch.zeros(1, dtype=torch.int64, device=self.device),
                   "waiting for the end-of-stream acknowledgement of", step)


def _check_fits(condition: bool, what: str) -> None:
    if not condition:
        raise StageRuntimeError(f"the stage runtime's message header cannot describe {what} "
                                f"(at most {_MAX_DIMS} activation dims, {_MAX_LABEL_DIMS} label dims, {_MAX_FIELDS} fields)")


# ------------------------------------------------------------------------------ data
def _as_tuple(inputs: Any) -> tuple:
    if isinstance(inputs, tuple):
        return inputs
    return tuple(inputs) if isinstance(inputs, list) else (inputs,)


def cycle_batches(data_factory: Callable[[], Any], skip: int = 0) -> Iterator[Tuple[int, Any]]:
    """(step id, batch) over repeated passes of ``data_factory()``, skipping the first ``skip``.

    Each pass calls ``iter`` on the same loader again, so a seeded shuffling loader draws its
    next permutation exactly as an uninterrupted run would: resuming by skipping reproduces it.
    """
    loader = data_factory()
    index = 0
    while True:
        produced = False
        for batch in loader:
            produced = True
            if index >= skip:
                yield index, batch
            index += 1
        if not produced:
            raise ValueError("data_factory() returned an empty iterable")


# ------------------------------------------------------------------------------ one stage process
def build_staged_model(config: GreedyStages, model_factory: Callable, seed: int) -> nn.Module:
    """``model_factory() -> (model, example_inputs)`` transformed with ``config`` from ``seed``."""
    import warnings

    from effcompile.api import transform
    from effcompile.passes import PASSES

    torch.manual_seed(seed)
    model, example_inputs = model_factory()
    if PASSES["greedy_stages"].is_applied(model):
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transform(model, config, example_inputs=example_inputs)


def stage_state_keys(model: nn.Module, k: int) -> List[str]:
    """``state_dict`` keys owned by stage k: its modules, its direct attributes and its head."""
    from effcompile.passes.greedy_stages import HEADS_ATTR, staged_model

    staged = staged_model(model)
    prefixes = tuple(f"{path}." for path in staged.stage_modules(k))
    if staged.head(k) is not None:
        prefixes += (f"{HEADS_ATTR}.{k}.",)
    # Parameters used directly by the stage (get_attr, not through a module) are matched by identity;
    # buffers used that way are listed by the pass.
    parameters = {id(p) for p in staged.stage_parameters(k)}
    attributes = set(staged.stage_attributes(k))
    return [key for key, value in model.state_dict(keep_vars=True).items()
            if key.startswith(prefixes) or key in attributes or id(value) in parameters]


class _StageWorker:
    """Stage k's training loop (sync or async), messaging, checkpoints and counters."""

    def __init__(self, rank: int, world: int, job: StageJob, progress: Optional[Any], device: torch.device) -> None:
        from effcompile.passes.greedy_stages import make_stage_optimizers, staged_model

        self.rank, self.world, self.job, self.progress, self.device = rank, world, job, progress, device
        self.config = job.config
        self.last = rank == world - 1
        self.model = build_staged_model(job.config, job.model_factory, job.seed).to(device)
        self.staged = staged_model(self.model)
        if self.staged.num_stages != world:
            raise StageRuntimeError(f"the model has {self.staged.num_stages} stages but {world} processes were started")
        self.optimizer = make_stage_optimizers(self.staged, job.optimizer_factory)[rank]
        self.stage_fn = self.staged.stage(rank)
        # The sender's codec learns the VQ codebook; the receiver's only decodes.
        self.codec_out = None if self.last else self._codec(seed=job.seed * 1000 + rank)
        self.codec_in = None if rank == 0 else self._codec(seed=job.seed * 1000 + rank - 1)
        self.buffer = (ReplayBuffer(self.config.buffer, self.config.max_reuse)
                       if self.config.mode == "async" and rank > 0 else None)
        self.losses: List[float] = []
        self.step_ids: List[int] = []
        self.trained = 0
        self.bytes = {"messages": 0, "raw_bytes": 0, "wire_bytes": 0, "activation_raw_bytes": 0,
                      "activation_wire_bytes": 0, "codebook_bytes": 0, "eval_wire_bytes": 0}
        self.eval_correct, self.eval_total, self.head_correct = 0, 0, 0
        self.first_step_started: Optional[float] = None
        self.last_step_ended: Optional[float] = None
        self.batch_size = 0
        self.start_step = 0

    def _codec(self, seed: int):
        config = self.config
        return make_codec(config.transport, config.vq_codebook_size, config.vq_group_size, config.vq_decay,
                          self.job.codebook_every, seed=seed)

    # -- checkpoints ----------------------------------------------------------------------
    def _checkpoint_path(self) -> Optional[str]:
        if self.job.checkpoint_dir is None:
            return None
        return os.path.join(self.job.checkpoint_dir, f"stage{self.rank}.pt")

    def _codec_state(self, codec: Any, receiver: bool) -> Optional[dict]:
        if codec is None:
            return None
        state = {"state": codec.state_dict()}
        if receiver and isinstance(codec, VQCodec):
            state["receiver"] = codec.receiver_state()
        return state

    def _load_codec_state(self, codec: Any, state: Optional[dict]) -> None:
        if codec is None or state is None:
            return
        codec.load_state_dict(state["state"])
        if "receiver" in state:
            codec.load_receiver_state(state["receiver"])

    def save(self) -> None:
        from effcompile.checkpoint import save_checkpoint

        path = self._checkpoint_path()
        if path is None:
            return
        extra = {
            "stage": self.rank, "num_stages": self.world, "mode": self.config.mode, "trained": self.trained,
            "next_data_step": self.next_data_step, "losses": list(self.losses), "step_ids": list(self.step_ids),
            "codec_out": self._codec_state(self.codec_out, receiver=False),
            "codec_in": self._codec_state(self.codec_in, receiver=True),
            "replay": None if self.buffer is None else self.buffer.state_dict(),
            "config": self.config.to_dict(),
        }
        save_checkpoint(path, self.model, self.optimizer, extra=extra)

    def restore(self) -> None:
        from effcompile.checkpoint import load_checkpoint

        path = self._checkpoint_path()
        if not self.job.resume:
            return
        if path is None or not os.path.exists(path):
            raise StageRuntimeError(f"stage {self.rank}: resume=True but no checkpoint at {path}")
        extra = load_checkpoint(path, self.model, self.optimizer)
        if extra.get("stage") != self.rank or extra.get("num_stages") != self.world:
            raise StageRuntimeError(f"stage {self.rank}: {path} belongs to stage {extra.get('stage')} of "
                                    f"{extra.get('num_stages')}")
        self.trained = self.start_step = int(extra["trained"])
        self.next_data_step = int(extra["next_data_step"])
        self.losses, self.step_ids = list(extra["losses"]), list(extra["step_ids"])
        self._load_codec_state(self.codec_out, extra["codec_out"])
        self._load_codec_state(self.codec_in, extra["codec_in"])
        if self.buffer is not None and extra["replay"] is not None:
            self.buffer.load_state_dict(extra["replay"])

    # -- progress / faults ----------------------------------------------------------------
    def _beat(self) -> None:
        if self.progress is not None:
            self.progress[2 * self.rank] = self.trained
            self.progress[2 * self.rank + 1] = time.time()

    def _maybe_fault(self) -> None:
        fault = self.job.fault
        if fault is None or fault.stage != self.rank or fault.step != self.trained:
            return
        sys.stderr.flush()
        if fault.kind == "exit":
            os._exit(1)
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # "hang": a stuck process that never answers
            time.sleep(3600)

    # -- one step ---------------------------------------------------------------------------
    def _train(self, inputs: tuple, labels: torch.Tensor, step_id: int) -> torch.Tensor:
        self._maybe_fault()
        started = time.time()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.stage_fn(*inputs)
        logits = self.staged.local_logits(self.rank, out)
        loss = self.job.loss_fn(logits, labels)
        if not bool(torch.isfinite(loss)):
            raise StageRuntimeError(f"stage {self.rank}: non-finite loss {float(loss.detach())} at step {step_id}; "
                                    "the optimizer step was not taken")
        loss.backward()
        self.optimizer.step()
        self.losses.append(float(loss.detach()))
        self.step_ids.append(step_id)
        self.batch_size = int(labels.shape[0])
        self.trained += 1
        if self.first_step_started is None:
            self.first_step_started = started
        self.last_step_ended = time.time()
        self._beat()
        every = self.job.checkpoint_every
        if every and self.trained % every == 0:
            self.save()
        return out.detach()

    @torch.no_grad()
    def _evaluate(self, inputs: tuple, labels: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        try:
            out = self.stage_fn(*inputs)
            logits = self.staged.local_logits(self.rank, out)
            correct = int((logits.argmax(dim=-1) == labels).sum())
            if self.last:
                self.eval_correct += correct
            else:
                self.head_correct += correct
            self.eval_total += labels.numel()
            return out
        finally:
            self.model.train()

    def _send(self, kind: int, step: int, out: torch.Tensor, labels: torch.Tensor) -> None:
        if not bool(torch.isfinite(out).all()):
            raise StageRuntimeError(f"stage {self.rank}: non-finite boundary activation at step {step}; "
                                    f"not sending it to stage {self.rank + 1}")
        if isinstance(self.codec_out, VQCodec):
            self.codec_out.train(kind == KIND_TRAIN)  # the codebook learns from training batches only
        payload = self.codec_out.encode(out)
        wire = self.link_out.send(kind, step, payload, labels)
        if kind != KIND_TRAIN:
            self.bytes["eval_wire_bytes"] += wire
            return
        label_bytes = labels.numel() * labels.element_size()
        raw_activation = out.numel() * out.element_size()
        self.bytes["messages"] += 1
        self.bytes["raw_bytes"] += HEADER_BYTES + raw_activation + label_bytes
        self.bytes["wire_bytes"] += wire
        self.bytes["activation_raw_bytes"] += raw_activation
        self.bytes["activation_wire_bytes"] += payload_bytes(payload)
        if "codebook" in payload.fields:
            self.bytes["codebook_bytes"] += payload_bytes(payload) - payload_bytes(payload, exclude=("codebook",))

    def _decode(self, payload: Payload) -> torch.Tensor:
        if isinstance(self.codec_in, VQCodec) and "codebook" not in payload.fields:
            self.codec_in.attach_codebook(payload)
        return self.codec_in.decode(payload)

    def _receive(self, expected: int) -> Tuple[int, int, Optional[Payload], Optional[torch.Tensor]]:
        groups = self.config.vq_group_size
        kind, step, payload, labels, _ = self.link_in.recv(expected, groups)
        self._last_message = time.monotonic()
        if payload is not None and isinstance(self.codec_in, VQCodec):
            self.codec_in.attach_codebook(payload)  # in message order: codebooks follow the stream
        self._beat()
        return kind, step, payload, labels

    # -- loops --------------------------------------------------------------------------
    def prepare(self, groups: List[Any]) -> None:
        """Everything slow before the start barrier: links, checkpoint, stage 0's data loader."""
        timeout_s = self.config.timeout_s
        self.link_in = None if self.rank == 0 else _Link(self.rank, self.rank - 1, groups[self.rank - 1], timeout_s, self.device)
        self.link_out = None if self.last else _Link(self.rank, self.rank + 1, groups[self.rank], timeout_s, self.device)
        self.next_data_step = 0
        self.restore()
        self._last_message = time.monotonic()
        if self.rank == 0:
            self.batches = cycle_batches(self.job.data_factory, skip=self.next_data_step)
            self.first_batch = next(self.batches)  # loads the data now, not on the first deadline

    def run(self) -> Dict[str, Any]:
        self.model.train()
        self._last_message = time.monotonic()
        self._beat()
        if self.rank == 0:
            self._run_source()
        elif self.config.mode == "sync":
            self._run_sync_consumer()
        else:
            self._run_async_consumer()
        self.save()
        return self._result()

    def _finish(self, end_step: int) -> None:
        """End of stream: acknowledge upstream, tell downstream, wait for its acknowledgement."""
        if self.link_in is not None:
            self.link_in.send_ack(end_step)
        if self.link_out is not None:
            self.link_out.send(KIND_END, end_step, None, None)
            self.link_out.recv_ack(end_step)

    def _run_source(self) -> None:
        job = self.job
        pending = [self.first_batch]
        while self.trained < job.steps:
            step_id, (inputs, labels) = pending.pop() if pending else next(self.batches)
            inputs = tuple(t.to(self.device) for t in _as_tuple(inputs))
            labels = labels.to(self.device)
            self.next_data_step = step_id + 1
            out = self._train(inputs, labels, step_id)
            if self.link_out is not None:
                self._send(KIND_TRAIN, step_id, out, labels)
        if job.eval_factory is not None:
            for index, (inputs, labels) in enumerate(job.eval_factory()):
                inputs = tuple(t.to(self.device) for t in _as_tuple(inputs))
                out = self._evaluate(inputs, labels.to(self.device))
                if self.link_out is not None:
                    self._send(KIND_EVAL, index, out, labels.to(self.device))
        self._finish(self.next_data_step)

    def _run_sync_consumer(self) -> None:
        expected = self.next_data_step
        while True:
            kind, step, payload, labels = self._receive(expected)
            if kind == KIND_END:
                self._finish(step)
                return
            x = self._decode(payload)
            if kind == KIND_TRAIN:
                if step != expected:
                    raise StageRuntimeError(f"stage {self.rank}: expected step {expected} from stage {self.rank - 1} "
                                            f"but got step {step} (checkpoints of different steps?)")
                expected = self.next_data_step = step + 1  # before _train, which may checkpoint
                out = self._train((x,), labels, step)
                if self.link_out is not None:
                    self._send(KIND_TRAIN, step, out, labels)
            else:
                out = self._evaluate((x,), labels)
                if self.link_out is not None:
                    self._send(KIND_EVAL, step, out, labels)

    def _receiver_thread(self, evals: "queue.Queue", failure: List[BaseException], abort: threading.Event) -> None:
        expected = self.next_data_step
        try:
            while True:
                kind, step, payload, labels = self._receive(expected)
                if kind == KIND_TRAIN:
                    self.buffer.put(payload, labels, step)
                    expected = step + 1
                else:
                    self.buffer.close()  # the training stream has ended (eval batches or the end follow)
                    evals.put((kind, step, payload, labels))
                    if kind == KIND_END:
                        return
        except BaseException as error:  # handed to the trainer, which raises it
            failure.append(error)
            abort.set()
        finally:
            self.buffer.close()

    def _run_async_consumer(self) -> None:
        evals: "queue.Queue" = queue.Queue()
        failure: List[BaseException] = []
        abort = threading.Event()
        receiver = threading.Thread(target=self._receiver_thread, args=(evals, failure, abort), daemon=True,
                                    name=f"stage{self.rank}-receiver")
        receiver.start()
        # Train until `steps` or until the buffer runs dry after the training stream ended (the
        # receiver closes the buffer at the first eval/end message).
        while self.trained < self.job.steps:
            try:
                item = self.buffer.wait_sample(self.config.timeout_s, abort)
            except TimeoutError as error:
                raise StageRuntimeError(f"stage {self.rank}: waiting for a batch from stage {self.rank - 1} at step "
                                        f"{self.trained} failed: {_classify(error, self.config.timeout_s)} "
                                        f"[stage {self.rank - 1} is the suspect]") from error
            if item is None:
                break
            self.next_data_step = item.step + 1
            out = self._train((self._decode(item.payload),), item.labels, item.step)
            if self.link_out is not None:
                self._send(KIND_TRAIN, item.step, out, item.labels)
        end_step = self.trained
        while True:
            if failure:
                raise failure[0]
            try:
                kind, step, payload, labels = evals.get(timeout=0.1)
            except queue.Empty:
                # The upstream may still be training (this stage stopped at `steps` first): only a
                # silence of timeout_s on the link, not the wait itself, is a fault.
                if time.monotonic() - self._last_message > self.config.timeout_s:
                    raise StageRuntimeError(
                        f"stage {self.rank}: waiting for the end of stream from stage {self.rank - 1} at step "
                        f"{self.trained} failed: {_classify(TimeoutError(), self.config.timeout_s)} "
                        f"[stage {self.rank - 1} is the suspect]") from None
                continue
            if kind == KIND_END:
                end_step = step
                break
            out = self._evaluate((self._decode(payload),), labels)
            if self.link_out is not None:
                self._send(KIND_EVAL, step, out, labels)
        receiver.join(self.config.timeout_s)
        if failure:
            raise failure[0]
        self._finish(end_step)

    # -- result -------------------------------------------------------------------------
    def _result(self) -> Dict[str, Any]:
        state = self.model.state_dict()
        owned = {key: state[key].detach().cpu().clone() for key in stage_state_keys(self.model, self.rank)}
        codec = {}
        for name, c in (("codec_out", self.codec_out), ("codec_in", self.codec_in)):
            if isinstance(c, VQCodec):
                codec[name] = {key: int(getattr(c, key)) for key in ("version", "rejected_updates", "dead_reseeds",
                                                                      "nonfinite_inputs")}
        return {
            "rank": self.rank, "losses": self.losses, "step_ids": self.step_ids, "bytes": self.bytes,
            "start_time": self.first_step_started, "end_time": self.last_step_ended,
            "trained": self.trained, "start_step": self.start_step, "batch_size": self.batch_size,
            "eval_correct": self.eval_correct, "head_correct": self.head_correct, "eval_total": self.eval_total,
            "replay": None if self.buffer is None else {
                "inserted": self.buffer.inserted, "evicted": self.buffer.evicted, "sampled": self.buffer.sampled,
                "evicted_unused": self.buffer.evicted_unused, "nbytes": self.buffer.nbytes},
            "codec": codec, "state": owned,
        }


def _init_distributed(rank: int, world: int, init_method: Optional[str], backend: str, timeout_s: float) -> List[Any]:
    """Start the process group and one two-rank group per boundary (gloo send/recv per pair)."""
    timeout = datetime.timedelta(seconds=max(timeout_s, 30.0))  # start-up: peers import torch at different speeds
    kwargs = {"backend": backend, "rank": rank, "world_size": world, "timeout": timeout}
    if init_method is not None:
        kwargs["init_method"] = init_method
    dist.init_process_group(**kwargs)
    return [dist.new_group([k, k + 1]) for k in range(world - 1)]


def _write_atomic(path: str, value: Any) -> None:
    temporary = f"{path}.tmp"
    torch.save(value, temporary)
    os.replace(temporary, path)


def stage_process(rank: int, world: int, job: StageJob, init_method: Optional[str], run_dir: str,
                  progress: Optional[Any] = None) -> None:
    """Entry point of one stage process (spawned by ``run_stages`` or started by torchrun)."""
    entered = time.time()
    torch.set_num_threads(job.threads)
    device = torch.device("cpu")
    if job.backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    try:
        groups = _init_distributed(rank, world, init_method, job.backend, job.config.timeout_s)
        worker = _StageWorker(rank, world, job, progress, device)
        worker.prepare(groups)
        built = time.time()
        dist.barrier()  # every stage built its model: start-up time is not charged to timeout_s
        result = worker.run()
        result["timeline"] = {"entered": entered, "built": built, "build_s": built - entered,
                              "spawn_s": entered - job.launched_at if job.launched_at else float("nan"),
                              "finished": time.time()}
        _write_atomic(os.path.join(run_dir, f"result{rank}.pt"), result)
    except BaseException as error:  # report, then exit hard: a receiver thread may sit in a gloo wait
        message = str(error) if isinstance(error, StageRuntimeError) else f"stage {rank}: {type(error).__name__}: {error}"
        try:
            _write_atomic(os.path.join(run_dir, f"error{rank}.pt"),
                          {"message": message, "traceback": traceback.format_exc()})
            print(f"[effcompile stage {rank}] {message}", file=sys.stderr, flush=True)
        finally:
            os._exit(1)
    dist.destroy_process_group()


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


def _collect_failure(processes: Sequence[Any], run_dir: str, progress: Any, exitcodes: Dict[int, Optional[int]]) -> str:
    parts = []
    for rank, process in enumerate(processes):
        error_path = os.path.join(run_dir, f"error{rank}.pt")
        step = int(progress[2 * rank])
        if os.path.exists(error_path):
            continue
        code = exitcodes.get(rank)
        if code not in (0,):
            parts.append(f"stage {rank} (pid {process.pid}) {_exit_description(code)} after {step} training steps")
    for rank in range(len(processes)):
        error_path = os.path.join(run_dir, f"error{rank}.pt")
        if os.path.exists(error_path):
            parts.append(torch.load(error_path, weights_only=False)["message"])
    return "greedy-stage run failed: " + "; ".join(parts)


def _monitor(processes: Sequence[Any], run_dir: str, progress: Any, timeout_s: float, start_timeout_s: float) -> None:
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
            steps = [int(progress[2 * r]) for r in range(len(processes))]
            raise _launcher_error(f"greedy-stage run hung: no stage made progress for {now - last_change:.0f} s "
                                  f"(steps per stage {steps}); every stage process was terminated", processes, progress)
        if failed_at is not None and (all(code is not None for code in codes) or now - failed_at > grace):
            exitcodes = {rank: p.exitcode for rank, p in enumerate(processes)}
            _terminate(processes)
            raise _launcher_error(_collect_failure(processes, run_dir, progress, exitcodes), processes, progress)
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
    context.set_forkserver_preload(["effcompile.stage_runtime", "effcompile.passes", "effcompile.models",
                                    "sklearn.datasets", "sklearn.model_selection"])
    return context


def run_stages(config: GreedyStages, model_factory: Callable[[], Tuple[nn.Module, Any]], loss_fn: Callable,
               optimizer_factory: Callable[[List[nn.Parameter]], torch.optim.Optimizer],
               data_factory: Callable[[], Any], steps: int, *, eval_factory: Optional[Callable[[], Any]] = None,
               seed: int = 0, threads_per_process: int = 1, checkpoint_dir: Optional[str] = None,
               checkpoint_every: int = 0, resume: bool = False, codebook_every: int = 1,
               fault: Optional[Fault] = None, start_timeout_s: float = 120.0) -> StageRunResult:
    """Train a greedy-staged model with one process per stage on this machine (gloo on CPU).

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
        fault: test hook making one stage crash or hang at a given step.

    Raises ``StageRuntimeError`` naming the failed stage and step when a stage fails, dies or hangs;
    every child process is stopped before it is raised.
    """
    if not isinstance(config, GreedyStages):
        raise TypeError(f"run_stages expects an effcompile.GreedyStages config, got {config!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps={steps!r} is invalid: expected an integer >= 1")
    if fault is not None and not 0 <= fault.stage < config.num_stages:
        raise ValueError(f"Fault.stage={fault.stage} is out of range for {config.num_stages} stages")
    import torch.multiprocessing as mp

    job = StageJob(config, model_factory, loss_fn, optimizer_factory, data_factory, steps, eval_factory, seed,
                   threads_per_process, checkpoint_dir, checkpoint_every, resume, codebook_every, fault)
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
    world = config.num_stages
    context = _process_context(mp)
    progress = context.Array("d", 2 * world, lock=False)
    started = job.launched_at = time.time()
    with tempfile.TemporaryDirectory(prefix="effcompile-stages-") as run_dir:
        init_method = f"file://{os.path.join(run_dir, 'rendezvous')}"
        processes = [context.Process(target=stage_process, args=(rank, world, job, init_method, run_dir, progress),
                                     daemon=True, name=f"effcompile-stage{rank}") for rank in range(world)]
        try:
            for process in processes:
                process.start()
            _monitor(processes, run_dir, progress, config.timeout_s, start_timeout_s)
        finally:
            _terminate(processes)
        missing = [rank for rank in range(world) if not os.path.exists(os.path.join(run_dir, f"result{rank}.pt"))]
        if missing:
            raise StageRuntimeError(f"greedy-stage run: stage(s) {missing} exited with code 0 but wrote no result")
        results = [torch.load(os.path.join(run_dir, f"result{rank}.pt"), weights_only=False) for rank in range(world)]
    return merge_results(config, results, time.time() - started)


def merge_results(config: GreedyStages, results: List[Dict[str, Any]], wall_s: float) -> StageRunResult:
    """One ``StageRunResult`` from the per-stage result dicts."""
    world = len(results)
    starts = [r["start_time"] for r in results if r["start_time"] is not None]
    ends = [r["end_time"] for r in results if r["end_time"] is not None]
    batch = results[0]["batch_size"]
    span = max(ends) - min(starts) if starts and ends else float("nan")
    stage_rates = []
    for r in results:
        duration = (r["end_time"] - r["start_time"]) if r["start_time"] is not None else float("nan")
        trained = r["trained"] - r["start_step"]
        stage_rates.append(trained * batch / duration if duration and duration > 0 else float("nan"))
    boundaries = []
    for k in range(world - 1):
        counts = dict(results[k]["bytes"])
        messages = max(1, counts["messages"])
        counts["raw_bytes_per_step"] = counts["raw_bytes"] / messages
        counts["wire_bytes_per_step"] = counts["wire_bytes"] / messages
        counts["compression"] = counts["raw_bytes"] / max(1, counts["wire_bytes"])
        counts["activation_compression"] = counts["activation_raw_bytes"] / max(1, counts["activation_wire_bytes"])
        counts["codec"] = results[k]["codec"].get("codec_out", {})
        boundaries.append(counts)
    last = results[-1]
    accuracy = last["eval_correct"] / last["eval_total"] if last["eval_total"] else None
    head_accuracy = [r["head_correct"] / r["eval_total"] if r["eval_total"] and k < world - 1 else None
                     for k, r in enumerate(results)]
    state: Dict[str, torch.Tensor] = {}
    for r in results:
        state.update(r["state"])
    trained0 = results[0]["trained"] - results[0]["start_step"]
    startup = [r["timeline"]["spawn_s"] + r["timeline"]["build_s"] for r in results if "timeline" in r]
    build = [r["timeline"]["build_s"] for r in results if "timeline" in r]
    return StageRunResult(
        num_stages=world, mode=config.mode, transport=config.transport,
        losses=[r["losses"] for r in results], step_ids=[r["step_ids"] for r in results], boundaries=boundaries,
        samples_per_s=trained0 * batch / span if span and span > 0 else float("nan"),
        stage_samples_per_s=stage_rates, wall_s=wall_s, accuracy=accuracy, head_accuracy=head_accuracy,
        replay=[r["replay"] for r in results], model_state=state, start_steps=[r["start_step"] for r in results],
        startup_s=startup, build_s=build)


def load_stage_checkpoints(checkpoint_dir: str, model: nn.Module) -> Dict[str, Any]:
    """Assemble the full trained model from every stage's checkpoint (each stage's own keys).

    ``model`` is a staged model built the same way; returns each stage's ``extra`` dict.
    """
    from effcompile.passes.greedy_stages import staged_model

    staged = staged_model(model)
    merged, extras = {}, {}
    for k in range(staged.num_stages):
        path = os.path.join(checkpoint_dir, f"stage{k}.pt")
        payload = torch.load(path, map_location="cpu", weights_only=False)
        keys = stage_state_keys(model, k)
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

    def _split(self):
        from effcompile.data import get_dataset

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
        return model, (train.tensors[0][: self.batch_size],)

    def data_factory(self):
        from effcompile.data import make_loaders

        train, test, _ = self._split()
        return make_loaders(train, test, self.batch_size, self.data_seed)[0]

    def eval_factory(self):
        from effcompile.data import make_loaders

        train, test, _ = self._split()
        return make_loaders(train, test, self.batch_size, self.data_seed)[1]

    def optimizer_factory(self, parameters: List[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Picklable mean cross-entropy (the CLI's loss)."""
    return nn.functional.cross_entropy(logits, labels)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m effcompile.stage_runtime",
                                     description="Train a greedy-staged zoo model with one process per stage.")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="digits", choices=("digits", "synthetic", "cifar10", "mnist"))
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--mode", default="sync", choices=GreedyStages.MODES)
    parser.add_argument("--transport", default="none", choices=GreedyStages.TRANSPORTS)
    parser.add_argument("--buffer", type=int, default=4)
    parser.add_argument("--max-reuse", type=int, default=2)
    parser.add_argument("--vq-codebook-size", type=int, default=256)
    parser.add_argument("--vq-group-size", type=int, default=8)
    parser.add_argument("--codebook-every", type=int, default=1)
    parser.add_argument("--cuts", default=None, help="comma-separated module paths (default: automatic cuts)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
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


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """CLI: under torchrun (``RANK`` set) this process is one stage; otherwise it spawns them all."""
    args = _parser().parse_args(argv)
    config = _config_from_args(args)
    zoo = ZooJob(model=args.model, dataset=args.dataset, batch_size=args.batch_size, lr=args.lr,
                 data_seed=args.seed, image_size=args.image_size)
    eval_factory = None if args.no_eval else zoo.eval_factory
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _torchrun_stage(args, config, zoo, eval_factory)
    result = run_stages(config, zoo.model_factory, cross_entropy, zoo.optimizer_factory, zoo.data_factory,
                        args.steps, eval_factory=eval_factory, seed=args.seed, threads_per_process=args.threads,
                        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                        resume=args.resume, codebook_every=args.codebook_every)
    summary = result.summary()
    _emit(summary, args.out)
    return summary


def _torchrun_stage(args: argparse.Namespace, config: GreedyStages, zoo: ZooJob, eval_factory: Any) -> Dict[str, Any]:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != config.num_stages:
        raise SystemExit(f"torchrun started {world} processes but --stages is {config.num_stages}")
    run_dir = args.checkpoint_dir or os.path.join(tempfile.gettempdir(), f"effcompile-stages-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    os.makedirs(run_dir, exist_ok=True)
    job = StageJob(config, zoo.model_factory, cross_entropy, zoo.optimizer_factory, zoo.data_factory, args.steps,
                   eval_factory, args.seed, args.threads, args.checkpoint_dir, args.checkpoint_every, args.resume,
                   args.codebook_every, None, "nccl" if torch.cuda.is_available() else "gloo")
    started = time.time()
    stage_process(rank, world, job, None, run_dir)  # env:// rendezvous from torchrun; exits 1 on failure
    summary: Dict[str, Any] = {}
    if rank == 0:  # merge the results once every stage has written its file
        paths = [os.path.join(run_dir, f"result{r}.pt") for r in range(world)]
        deadline = time.monotonic() + config.timeout_s
        while not all(os.path.exists(path) for path in paths):
            if time.monotonic() > deadline:
                raise StageRuntimeError(f"stage results missing in {run_dir} after {config.timeout_s:g} s")
            time.sleep(0.1)
        results = [torch.load(path, weights_only=False) for path in paths]
        summary = merge_results(config, results, time.time() - started).summary()
        _emit(summary, args.out)
    return summary


def _emit(summary: Dict[str, Any], out: Optional[str]) -> None:
    text = json.dumps(summary, indent=2, default=str)
    if out:
        with open(out, "w") as handle:
            handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
