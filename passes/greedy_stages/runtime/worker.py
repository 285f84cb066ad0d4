"""One stage process: stage k's training loop (sync or async), messaging, checkpoints, counters.

See README.md beside this file for the modes, faults and checkpoints.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from effcompile.distributed import use_replica_group
from effcompile.passes.greedy_stages.config import GreedyStages

from .replay import ReplayBuffer
from .transport import RUNTIME_CODEBOOK_EVERY, Payload, VQCodec, make_codec, payload_bytes
from .wire import HEADER_BYTES, KIND_END, KIND_EVAL, KIND_TRAIN, StageRuntimeError, _classify, _Link

__all__ = ["Fault", "Layout", "StageJob", "build_staged_model", "stage_state_keys", "cycle_batches", "replica_batches",
           "stage_process"]


@dataclasses.dataclass(frozen=True)
class Fault:
    """Test hook: make stage ``stage`` (of data-parallel replica ``replica``) fail when it reaches
    training step ``step``.

    ``kind``: ``"exit"`` (``os._exit(1)``: a crash without cleanup), ``"kill"`` (SIGKILL to
    itself) or ``"hang"`` (sleep forever in the training loop).
    """

    stage: int
    step: int
    kind: str = "exit"
    replica: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("exit", "kill", "hang"):
            raise ValueError(f"Fault.kind={self.kind!r} is invalid: expected 'exit', 'kill' or 'hang'")
        if not (isinstance(self.replica, int) and self.replica >= 0):
            raise ValueError(f"Fault.replica={self.replica!r} is invalid: expected an integer >= 0")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which stage and data-parallel replica each of the K·D ranks runs.

    ``rank = replica · K + stage``: every replica's pipeline is K consecutive ranks, so under
    ``torchrun --nproc-per-node K`` one node holds one whole pipeline (activations stay on the
    node) and only the gradient all-reduce of each stage's replicas crosses nodes — the traffic
    plain DDP already puts there.
    """

    num_stages: int
    replicas: int = 1

    @property
    def world(self) -> int:
        return self.num_stages * self.replicas

    def stage_of(self, rank: int) -> int:
        return rank % self.num_stages

    def replica_of(self, rank: int) -> int:
        return rank // self.num_stages

    def rank_of(self, stage: int, replica: int) -> int:
        return replica * self.num_stages + stage

    def stage_ranks(self, stage: int) -> List[int]:
        """The ranks holding stage ``stage``: its replicas, which all-reduce their gradients."""
        return [self.rank_of(stage, replica) for replica in range(self.replicas)]

    def name(self, rank: int) -> str:
        """How messages name a rank: ``stage k`` (one replica) or ``stage k replica d``."""
        stage = self.stage_of(rank)
        return f"stage {stage}" if self.replicas == 1 else f"stage {stage} replica {self.replica_of(rank)}"


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
    codebook_every: int = RUNTIME_CODEBOOK_EVERY
    fault: Optional[Fault] = None
    backend: str = "gloo"
    launched_at: float = 0.0  # launcher's clock when the processes were started (start-up accounting)
    replicas: int = 1  # data-parallel replicas D of every stage (K·D processes)
    max_grad_norm: Optional[float] = None  # clip each stage's (replica-averaged) gradient to this norm

    @property
    def layout(self) -> Layout:
        return Layout(self.config.num_stages, self.replicas)



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


def replica_batches(data_factory: Callable[[], Any], replica: int, replicas: int,
                    skip_steps: int = 0) -> Iterator[Tuple[int, Any]]:
    """Replica ``replica``'s shard of ``cycle_batches``: (step id, batch) for every batch whose
    index is ``replica`` modulo ``replicas``, the step id being ``index // replicas``.

    Step t of every replica is drawn from the same pass over the data, so D replicas together see
    D consecutive batches per step, as ``DistributedSampler`` would give them; one replica is the
    plain stream.
    """
    for index, batch in cycle_batches(data_factory, skip=skip_steps * replicas):
        if index % replicas == replica:
            yield index // replicas, batch



# ------------------------------------------------------------------------------ one stage process
def refuse_step_owners(model: nn.Module, config: GreedyStages) -> None:
    """A stage process trains its stage with the plain local loss; a composed pass that owns the
    training step (it changes which rows are backpropagated) would be silently bypassed here."""
    from effcompile.passes import step_owners

    owners = [p.config_type.name for p in step_owners() if p.config_type.name != config.name and p.is_applied(model)]
    if owners:
        raise StageRuntimeError(
            f"the multi-process stage runtime trains each stage with its plain local loss and cannot run "
            f"{', '.join(owners)} (a pass that owns the training step); train it in one process with "
            f"effcompile.train_step, or compose only passes that rewrite layers")


def build_staged_model(config: GreedyStages, model_factory: Callable, seed: int,
                       plan: Optional[List[Dict[str, Any]]] = None) -> nn.Module:
    """``model_factory() -> (model, example_inputs)`` transformed with ``config`` from ``seed``.

    ``plan``: the Plan rows (``Plan.to_dict()``) another process decided for the same model; the
    model then applies them (``effcompile.api.apply_plan``) instead of capturing, measuring and
    searching cuts again.
    """
    import warnings

    from effcompile.api import apply_plan, transform
    from effcompile.passes import PASSES
    from effcompile.plan import Plan

    torch.manual_seed(seed)
    model, example_inputs = model_factory()
    refuse_step_owners(model, config)
    if PASSES[config.name].is_applied(model):
        return model
    if plan is not None:
        return apply_plan(model, Plan.from_dict(plan), config, example_inputs=example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transform(model, config, example_inputs=example_inputs)


def _decided_model(rank: int, job: "StageJob") -> nn.Module:
    """Stage 0 decides the Plan (capture, FLOPs, cut search) once; every other stage applies it.

    The rows travel over the process group already set up for the run (spawned or torchrun), so
    all stages hold one Plan and nobody re-decides.
    """
    from effcompile.api import plan_of

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return build_staged_model(job.config, job.model_factory, job.seed)
    model = build_staged_model(job.config, job.model_factory, job.seed) if rank == 0 else None
    rows: List[Any] = [None]
    if rank == 0:
        plan = plan_of(model)
        rows = [plan.to_dict() if plan is not None else None]
    dist.broadcast_object_list(rows, src=0)
    return model if rank == 0 else build_staged_model(job.config, job.model_factory, job.seed, plan=rows[0])


def stage_state_keys(model: nn.Module, k: int) -> List[str]:
    """``state_dict`` keys owned by stage k: its modules, its direct attributes and its head."""
    from effcompile.passes.greedy_stages.rewrite import HEADS_ATTR, staged_model

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
        from effcompile.passes.greedy_stages.rewrite import make_stage_optimizers, staged_model

        self.rank, self.world, self.job, self.progress, self.device = rank, world, job, progress, device
        self.config = job.config
        self.layout = job.layout
        self.stage, self.replica = self.layout.stage_of(rank), self.layout.replica_of(rank)
        self.name = self.layout.name(rank)
        self.last = self.stage == self.layout.num_stages - 1
        self.model = _decided_model(rank, job).to(device)
        self.staged = staged_model(self.model)
        if self.staged.num_stages * self.layout.replicas != world:
            raise StageRuntimeError(f"the model has {self.staged.num_stages} stages × {self.layout.replicas} "
                                    f"replicas but {world} processes were started")
        self.optimizer = make_stage_optimizers(self.staged, job.optimizer_factory)[self.stage]
        self.stage_fn = self.staged.stage(self.stage)
        # The sender's codec learns the VQ codebook; the receiver's only decodes.
        self.codec_out = None if self.last else self._codec(seed=job.seed * 1000 + self.stage)
        self.codec_in = None if self.stage == 0 else self._codec(seed=job.seed * 1000 + self.stage - 1)
        self.buffer = (ReplayBuffer(self.config.buffer, self.config.max_reuse)
                       if self.config.mode == "async" and self.stage > 0 else None)
        self.replica_group = None  # this stage's replicas (set by prepare when D > 1)
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
        # Replica 0 keeps the one-replica name, which load_stage_checkpoints reads.
        suffix = "" if self.replica == 0 else f".replica{self.replica}"
        return os.path.join(self.job.checkpoint_dir, f"stage{self.stage}{suffix}.pt")

    def _codec_state(self, codec: Any, receiver: bool) -> Optional[dict]:
        if codec is None:
            return None
        state = {"state": codec.state_dict()}  # plain data: a dict of tensors / ints
        if isinstance(codec, VQCodec):
            state["generator"] = codec.generator.get_state()  # dead-code reseeds draw from it
            if receiver:
                state["receiver"] = codec.receiver_state()
        return state

    def _load_codec_state(self, codec: Any, state: Optional[dict]) -> None:
        if codec is None or state is None:
            return
        codec.load_state_dict(state["state"])
        if "generator" in state and isinstance(codec, VQCodec):
            codec.generator.set_state(state["generator"])
        if "receiver" in state:
            codec.load_receiver_state(state["receiver"])

    def save(self) -> None:
        from effcompile.checkpoint import save_checkpoint

        path = self._checkpoint_path()
        if path is None:
            return
        extra = {
            "stage": self.stage, "num_stages": self.layout.num_stages, "replica": self.replica,
            "replicas": self.layout.replicas, "mode": self.config.mode, "trained": self.trained,
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
            raise StageRuntimeError(f"{self.name}: resume=True but no checkpoint at {path}")
        extra = load_checkpoint(path, self.model, self.optimizer)
        found = (extra.get("stage"), extra.get("num_stages"), extra.get("replica", 0), extra.get("replicas", 1))
        if found != (self.stage, self.layout.num_stages, self.replica, self.layout.replicas):
            raise StageRuntimeError(f"{self.name}: {path} belongs to stage {found[0]} of {found[1]}, replica {found[2]} "
                                    f"of {found[3]}")
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
        if fault is None or (fault.stage, fault.replica, fault.step) != (self.stage, self.replica, self.trained):
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
        logits = self.staged.local_logits(self.stage, out)
        loss = self.job.loss_fn(logits, labels)
        if not bool(torch.isfinite(loss)):
            raise StageRuntimeError(f"{self.name}: non-finite loss {float(loss.detach())} at step {step_id}; "
                                    "the optimizer step was not taken")
        loss.backward()
        self._average_over_replicas(step_id)
        if self.job.max_grad_norm is not None:
            from effcompile.api import clip_gradients

            clip_gradients([[p for group in self.optimizer.param_groups for p in group["params"]]],
                           self.job.max_grad_norm)
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

    def _replica_wait(self, work: Any, what: str, step: int) -> None:
        """Wait for a collective of this stage's replicas, with the run's deadline."""
        try:
            work.wait(datetime.timedelta(seconds=self.config.timeout_s))
        except RuntimeError as error:
            raise StageRuntimeError(f"{self.name}: {what} with the other replicas of stage {self.stage} at step {step} "
                                    f"failed: {_classify(error, self.config.timeout_s)} "
                                    f"[a replica of stage {self.stage} is the suspect]") from error

    @torch.no_grad()
    def _average_over_replicas(self, step: int) -> None:
        """Data parallelism inside the stage: one all-reduce of the stage's gradients and its
        floating-point buffers (BatchNorm statistics, pass state) over its replicas, as one flat
        tensor.  Averaging the buffers keeps replicas identical (DDP instead broadcasts rank 0's)."""
        if self.replica_group is None:
            return
        tensors = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.replica_parameters]
        tensors += self.replica_buffers
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
        work = dist.all_reduce(flat, group=self.replica_group, async_op=True)
        self._replica_wait(work, "all-reducing gradients", step)
        flat.div_(self.layout.replicas)
        offset = 0
        for parameter, tensor in zip(self.replica_parameters + [None] * len(self.replica_buffers), tensors):
            chunk = flat[offset:offset + tensor.numel()].view_as(tensor).to(tensor.dtype)
            offset += tensor.numel()
            if parameter is not None and parameter.grad is None:
                parameter.grad = chunk.clone()
            else:
                tensor.copy_(chunk)

    def _replicas_continue(self, have_batch: bool, step: int) -> bool:
        """Async consumers: every replica trains the next step only if all of them have a batch
        (the gradient all-reduce pairs their steps one to one)."""
        if self.replica_group is None:
            return have_batch
        flag = torch.tensor([1 if have_batch else 0], dtype=torch.int64)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.replica_group, async_op=True)
        self._replica_wait(work, "agreeing on the next step", step)
        return bool(flag.item())

    @torch.no_grad()
    def _evaluate(self, inputs: tuple, labels: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        try:
            out = self.stage_fn(*inputs)
            logits = self.staged.local_logits(self.stage, out)
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
            raise StageRuntimeError(f"{self.name}: non-finite boundary activation at step {step}; "
                                    f"not sending it to stage {self.stage + 1}")
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
    def prepare(self, groups: "_Groups") -> None:
        """Everything slow before the start barrier: links, replica group, checkpoint, stage 0's data."""
        timeout_s, layout = self.config.timeout_s, self.layout
        previous, following = self.rank - 1, self.rank + 1  # same replica, neighbouring stages
        self.link_in = None if self.stage == 0 else _Link(
            self.name, layout.name(previous), previous, groups.boundary[(previous, self.rank)], timeout_s, self.device)
        self.link_out = None if self.last else _Link(
            self.name, layout.name(following), following, groups.boundary[(self.rank, following)], timeout_s, self.device)
        self.replica_group = groups.stage.get(self.stage)
        if self.replica_group is not None:
            owned = set(stage_state_keys(self.model, self.stage))
            self.replica_parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            parameter_ids = {id(p) for p in self.model.parameters()}
            self.replica_buffers = [value for key, value in self.model.state_dict(keep_vars=True).items()
                                    if key in owned and id(value) not in parameter_ids and value.is_floating_point()]
        self.next_data_step = 0
        self.restore()
        self._last_message = time.monotonic()
        if self.stage == 0:
            self.batches = replica_batches(self.job.data_factory, self.replica, layout.replicas, self.next_data_step)
            self.first_batch = next(self.batches)  # loads the data now, not on the first deadline

    def run(self) -> Dict[str, Any]:
        self.model.train()
        self._last_message = time.monotonic()
        self._beat()
        if self.stage == 0:
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
            replicas = self.layout.replicas  # each replica streams its shard of the eval batches
            shard = (item for position, item in enumerate(job.eval_factory()) if position % replicas == self.replica)
            for index, (inputs, labels) in enumerate(shard):
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
                    raise StageRuntimeError(f"{self.name}: expected step {expected} from stage {self.stage - 1} "
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
                                    name=f"rank{self.rank}-receiver")
        receiver.start()
        # Train until `steps` or until the buffer runs dry after the training stream ended (the
        # receiver closes the buffer at the first eval/end message).
        while self.trained < self.job.steps:
            try:
                item = self.buffer.wait_sample(self.config.timeout_s, abort)
            except TimeoutError as error:
                raise StageRuntimeError(f"{self.name}: waiting for a batch from {self.link_in.peer} at step "
                                        f"{self.trained} failed: {_classify(error, self.config.timeout_s)} "
                                        f"[{self.link_in.peer} is the suspect]") from error
            if not self._replicas_continue(item is not None, self.trained):
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
                        f"{self.name}: waiting for the end of stream from {self.link_in.peer} at step "
                        f"{self.trained} failed: {_classify(TimeoutError(), self.config.timeout_s)} "
                        f"[{self.link_in.peer} is the suspect]") from None
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
        owned = {key: state[key].detach().cpu().clone() for key in stage_state_keys(self.model, self.stage)}
        codec = {}
        for name, c in (("codec_out", self.codec_out), ("codec_in", self.codec_in)):
            if isinstance(c, VQCodec):
                codec[name] = {key: int(getattr(c, key)) for key in ("version", "rejected_updates", "dead_reseeds",
                                                                      "nonfinite_inputs")}
        return {
            "rank": self.rank, "stage": self.stage, "replica": self.replica, "losses": self.losses, "step_ids": self.step_ids, "bytes": self.bytes,
            "start_time": self.first_step_started, "end_time": self.last_step_ended,
            "trained": self.trained, "start_step": self.start_step, "batch_size": self.batch_size,
            "eval_correct": self.eval_correct, "head_correct": self.head_correct, "eval_total": self.eval_total,
            "replay": None if self.buffer is None else {
                "inserted": self.buffer.inserted, "evicted": self.buffer.evicted, "sampled": self.buffer.sampled,
                "evicted_unused": self.buffer.evicted_unused, "nbytes": self.buffer.nbytes},
            "codec": codec, "state": owned,
        }


@dataclasses.dataclass
class _Groups:
    boundary: Dict[Tuple[int, int], Any]  # (rank of stage k, rank of stage k+1) of one replica → 2-rank group
    stage: Dict[int, Any]                 # stage → the group of its D replicas (only when D > 1)
    control: Any = None                   # a gloo group of every rank for the result objects (None: WORLD)


def _init_distributed(rank: int, world: int, init_method: Optional[str], backend: str, timeout_s: float,
                      layout: Layout) -> _Groups:
    """Start the process group, one two-rank group per boundary of every replica (send/recv per
    pair) and, with replicas, one group per stage for its gradient all-reduce.  Every rank creates
    every group, in the same order (torch.distributed requires it)."""
    timeout = datetime.timedelta(seconds=max(timeout_s, 30.0))  # start-up: peers import torch at different speeds
    kwargs = {"backend": backend, "rank": rank, "world_size": world, "timeout": timeout}
    if init_method is not None:
        kwargs["init_method"] = init_method
    dist.init_process_group(**kwargs)
    boundary = {}
    for replica in range(layout.replicas):
        for stage in range(layout.num_stages - 1):
            pair = (layout.rank_of(stage, replica), layout.rank_of(stage + 1, replica))
            boundary[pair] = dist.new_group(list(pair))
    stage_groups = {}
    if layout.replicas > 1:
        for stage in range(layout.num_stages):
            group = dist.new_group(layout.stage_ranks(stage))
            if rank in layout.stage_ranks(stage):
                stage_groups[stage] = group
    control = dist.new_group(backend="gloo") if backend != "gloo" else None  # object collectives on CPU
    return _Groups(boundary, stage_groups, control)


def _write_atomic(path: str, value: Any) -> None:
    """Write a data-only file atomically (temp file, fsync, rename): JSON for ``*.json``, otherwise
    ``torch.save`` of plain data (tensors, dicts, lists, str, numbers), which loads with weights_only=True."""
    from effcompile.checkpoint import _check_plain, _write_atomic as write_torch_file

    if not path.endswith(".json"):
        _check_plain(path, value, "the stage file", torch_types=True)
        write_torch_file(path, value)
        return
    import json

    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def stage_process(rank: int, world: int, job: StageJob, init_method: Optional[str], run_dir: str,
                  progress: Optional[Any] = None, collect: bool = False) -> Optional[List[Dict[str, Any]]]:
    """Entry point of one rank (spawned by ``run_stages`` or started by torchrun).

    The result goes to ``run_dir/result{rank}.pt``; with ``collect`` (torchrun, possibly many
    nodes without a shared file system) it is gathered to rank 0 instead, which returns every
    rank's result in rank order.
    """
    entered = time.time()
    torch.set_num_threads(job.threads)
    device = torch.device("cpu")
    if job.backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    layout = job.layout
    gathered: Optional[List[Dict[str, Any]]] = None
    try:
        if world != layout.world:
            raise StageRuntimeError(f"{world} processes were started for {layout.num_stages} stages × "
                                    f"{layout.replicas} replicas (expected {layout.world})")
        groups = _init_distributed(rank, world, init_method, job.backend, job.config.timeout_s, layout)
        worker = _StageWorker(rank, world, job, progress, device)
        worker.prepare(groups)
        built = time.time()
        dist.barrier()  # every stage built its model: start-up time is not charged to timeout_s
        # Passes that average shared state (decorrelation statistics) average over this stage's replicas.
        with use_replica_group(groups.stage.get(layout.stage_of(rank))):
            result = worker.run()
        result["timeline"] = {"entered": entered, "built": built, "build_s": built - entered,
                              "spawn_s": entered - job.launched_at if job.launched_at else float("nan"),
                              "finished": time.time()}
        if collect:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(result, gathered, dst=0, group=groups.control)
        else:
            _write_atomic(os.path.join(run_dir, f"result{rank}.pt"), result)
    except BaseException as error:  # report, then exit hard: a receiver thread may sit in a gloo wait
        message = (str(error) if isinstance(error, StageRuntimeError)
                   else f"{layout.name(rank)}: {type(error).__name__}: {error}")
        try:
            _write_atomic(os.path.join(run_dir, f"error{rank}.json"),
                          {"message": message, "traceback": traceback.format_exc()})
            print(f"[effcompile {layout.name(rank)}] {message}", file=sys.stderr, flush=True)
        finally:
            os._exit(1)
    dist.destroy_process_group()
    return gathered
