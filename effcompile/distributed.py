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
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "replica_group", "replica_world_size", "use_replica_group", "all_reduce_mean",
           "rank_generator", "global_rank"]

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
