"""Per-rank semantics shared by every pass: which ranks are replicas, and each rank's random stream.

Two questions every pass with state or randomness must answer under torch.distributed:

* **Who averages with whom?**  Under plain DDP the replicas are the whole world.  In a K-stage ×
  D-replica run (``effcompile.passes.greedy_stages.runtime``) the ranks of different stages hold
  different layers, so a pass that averages state over ``WORLD`` would mismatch shapes or hang:
  its replicas are the D ranks of its own stage.  :func:`replica_group` is that group (``WORLD``
  unless a runtime set another with :func:`use_replica_group`), and :func:`all_reduce_mean`
  averages over it, traceably (inside compiled graphs too).
* **Whose random numbers?**  Data-parallel training seeds every rank alike (identical initial
  weights).  A randomized estimator that draws from torch's global RNG then draws the *same*
  sample on every rank, and the all-reduced gradient keeps one rank's variance instead of 1/D of
  it.  :func:`rank_generator` gives a generator whose stream is seeded from one draw of the
  global CPU RNG and the global rank: reproducible under ``torch.manual_seed``, independent
  across ranks, and it consumes the global RNG identically on every rank (so dropout masks and
  other global draws stay as the user seeded them).  Outside torch.distributed (or with one
  rank) it returns None: draws come from the global RNG exactly as before.
* **Whose statistics?**  State that summarises the data (a loss history) can be gathered from
  every replica with :func:`all_gather_replicas`, so it is the same on every rank.
* **Who all-reduces?**  DDP arms its gradient all-reduce in its own forward only.  A step that
  runs the module behind the wrapper another way (a compiled function of the inner module, a
  step that runs the model stage by stage) uses :class:`DataParallelSync` to do what DDP does.
  An objective whose backward a trainer runs cannot average afterwards: it runs as the wrapper's
  forward instead (:class:`WrapperForward`), and so do stages of an FSDP2 root, whose forward
  unshards the root's own parameters.

What each pass shares and what stays per rank: the "Per-rank semantics" table in passes/README.md.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "replica_group", "replica_world_size", "use_replica_group", "all_reduce_mean",
           "all_gather_replicas", "rank_generator", "global_rank", "DataParallelSync", "WrapperForward"]

_UNSET = object()
_REPLICA_GROUP: object = _UNSET  # unset: the default group (WORLD); None: this rank has no replicas
_GENERATORS: Dict[torch.device, torch.Generator] = {}
# Odd 64-bit constant (the golden-ratio increment of splitmix64): seeds of neighbouring ranks land
# far apart in the seed space instead of at base, base+1, ...
_RANK_STRIDE = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1


def is_distributed() -> bool:
    """torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def replica_group():
    """The process group of this rank's replicas: ``WORLD`` unless a runtime set another, None
    when the runtime said this rank has none (one replica per stage)."""
    return dist.group.WORLD if _REPLICA_GROUP is _UNSET else _REPLICA_GROUP


def replica_world_size() -> int:
    """How many replicas share this rank's state (1 outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    group = replica_group()
    return 1 if group is None else dist.get_world_size(group=group)


@contextlib.contextmanager
def use_replica_group(group) -> Iterator[None]:
    """Make ``group`` the replicas every pass averages its shared state over, for the block
    (None: this rank has no replicas, so nothing is averaged).

    A runtime that gives different ranks different layers (K stages × D replicas) sets each
    rank's stage group here around its training loop.
    """
    global _REPLICA_GROUP
    previous, _REPLICA_GROUP = _REPLICA_GROUP, group
    try:
        yield
    finally:
        _REPLICA_GROUP = previous


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over :func:`replica_group`; traceable, so it works in compiled graphs."""
    from ._compat import functional_all_reduce_mean

    group = replica_group()
    return tensor if group is None else functional_all_reduce_mean(tensor, group)


def all_gather_replicas(tensor: torch.Tensor) -> torch.Tensor:
    """Every replica's ``tensor`` concatenated along dim 0 in the replicas' rank order (``tensor``
    itself without replicas); traceable, so it works in compiled graphs.  Every replica must call
    it at the same point with the same shape."""
    from ._compat import functional_all_gather

    if replica_world_size() == 1:
        return tensor
    return functional_all_gather(tensor, replica_group())


def rank_generator(device: torch.device) -> Optional[torch.Generator]:
    """A generator on ``device`` for this rank's next draw, or None outside torch.distributed.

    Each call takes one int64 from the global CPU RNG (the same on every rank when the ranks were
    seeded alike) and seeds this rank's generator with it mixed with the global rank.  A host
    draw and a host seed: no device synchronisation, also for CUDA devices.
    """
    if not is_distributed():
        return None
    device = torch.device(device)
    base = int(torch.randint(0, _SEED_MASK, (1,), dtype=torch.int64))
    generator = _GENERATORS.get(device)
    if generator is None:
        generator = _GENERATORS[device] = torch.Generator(device=device)
    generator.manual_seed((base + _RANK_STRIDE * (dist.get_rank() + 1)) & _SEED_MASK)
    return generator


class DataParallelSync:
    """What ``DistributedDataParallel`` does around a step, for a step that runs the module behind
    the wrapper without calling the wrapper's forward (a compiled function of the inner module, a
    step that runs the model piece by piece).

    DDP all-reduces gradients only after a backward whose forward went through ``DDP.forward``
    (that forward arms its reducer); any other forward leaves each rank with its own gradient and
    the replicas drift apart silently.  Such a step calls :meth:`before_forward` (rank 0's
    buffers to every rank, as DDP does with ``broadcast_buffers=True``) and :meth:`after_backward`
    (the gradients averaged over the wrapper's process group, skipped inside ``no_sync()``).
    """

    def __init__(self, wrapper: torch.nn.parallel.DistributedDataParallel) -> None:
        self.wrapper = wrapper
        self.group = wrapper.process_group
        ignored = set(getattr(wrapper, "parameters_to_ignore", ()) or ())
        named = [(name, p) for name, p in wrapper.module.named_parameters() if p.requires_grad]
        self.parameters = [p for name, p in named if name not in ignored]
        self.buffers = [b for name, b in wrapper.module.named_buffers() if name not in ignored]

    @classmethod
    def of(cls, model: torch.nn.Module) -> Optional["DataParallelSync"]:
        """For ``model`` wrapped in DDP (possibly inside ``torch.compile``'s wrapper) with more than
        one rank; None otherwise."""
        wrapper = _ddp_wrapper(model)
        return None if wrapper is None else cls(wrapper)

    @torch.no_grad()
    def before_forward(self) -> None:
        if not getattr(self.wrapper, "broadcast_buffers", True) or not self.buffers:
            return
        source = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        by_dtype: Dict[torch.dtype, list] = {}
        for buffer in self.buffers:
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        for buffers in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, src=source, group=self.group)
            offset = 0
            for b in buffers:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()

    @torch.no_grad()
    def after_backward(self) -> None:
        if not getattr(self.wrapper, "require_backward_grad_sync", True) or not self.parameters:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        present = torch.tensor([float(p.grad is not None) for p in self.parameters], device=grads[0].device)
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads] + [present])
        dist.all_reduce(flat, group=self.group)
        flat[:-len(self.parameters)].div_(dist.get_world_size(group=self.group))
        offset = 0
        # Which ranks had a gradient matters only where this rank has none: read it to the host
        # then alone (a device synchronisation), not on every step.
        missing = any(p.grad is None for p in self.parameters)
        counts = flat[-len(self.parameters):].tolist() if missing else [1.0] * len(self.parameters)
        for parameter, grad, count in zip(self.parameters, grads, counts):
            chunk = flat[offset:offset + grad.numel()].view_as(grad).to(grad.dtype)
            offset += grad.numel()
            if parameter.grad is not None:
                parameter.grad.copy_(chunk)
            elif count > 0:  # another rank had a gradient: DDP would give this rank the average too
                parameter.grad = chunk.clone()


class WrapperForward:
    """Runs a function *as the forward* of the wrapper that arms data parallelism (forward
    redirection), for objectives that call the model's modules another way (stage by stage, a
    compiled function of the inner module) and whose backward someone else runs.

    What arms the averaging is the wrapper's forward: DDP prepares its reducer there (buckets
    all-reduce during the backward; ``no_sync()`` is honoured), and an FSDP2 root unshards its own
    parameters there and registers the reduce-scatter of their gradients on the forward's output.
    So the objective runs inside that forward: the inner module's ``forward`` is swapped for one
    call, the wrapper is called, and the swap is undone before the objective starts (its own calls
    of the inner module run the real forward).  The objective's output (the loss) is the
    forward's output.
    """

    def __init__(self, wrapper: torch.nn.Module, inner: torch.nn.Module) -> None:
        self.wrapper, self.inner = wrapper, inner

    @classmethod
    def of(cls, model: torch.nn.Module) -> Optional["WrapperForward"]:
        """For ``model`` wrapped in DDP with more than one rank (possibly inside ``torch.compile``'s
        wrapper); None otherwise."""
        wrapper = _ddp_wrapper(model)
        return None if wrapper is None else cls(wrapper, wrapper.module)

    @classmethod
    def fsdp_root(cls, model: torch.nn.Module) -> Optional["WrapperForward"]:
        """For an FSDP2 (``fully_shard``) root, whose hooks wrap its own forward; None otherwise.
        Only for objectives that do not call the root's forward themselves."""
        from torch.distributed.fsdp import FSDPModule

        model = _uncompiled(model)
        return cls(model, model) if isinstance(model, FSDPModule) else None

    def __call__(self, function, *args, **kwargs):
        inner = self.inner
        own = inner.__dict__.get("forward", _UNSET)  # an instance-level forward the user set, kept

        def restore() -> None:
            if own is _UNSET:
                inner.__dict__.pop("forward", None)
            else:
                inner.__dict__["forward"] = own

        def forward(*_: object, **__: object):
            restore()
            return function(*args, **kwargs)

        inner.__dict__["forward"] = forward
        try:
            return self.wrapper()
        finally:
            restore()


def _uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
        model = model._orig_mod
    return model


def _ddp_wrapper(model: torch.nn.Module) -> Optional[torch.nn.parallel.DistributedDataParallel]:
    """``model``'s DDP wrapper (possibly inside ``torch.compile``'s) when its group has more than
    one rank; None otherwise (one rank: nothing to average)."""
    model = _uncompiled(model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and \
            dist.get_world_size(group=model.process_group) > 1:
        return model
    return None
