"""Real multi-process tests on one machine: ``world`` gloo ranks over a file rendezvous.

``run_ranks(body, out_dir, world)`` spawns the ranks, each runs ``body(rank)`` (a top-level
function of the test module, so spawn can import it) with one torch thread, and the ranks'
results come back in rank order through ``torch.save`` files.
"""

import os
from pathlib import Path
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, body: Callable[[int], Any], init_file: str, out_dir: str, world: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.save(body(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # The results are on disk: leave without the interpreter's teardown, which aborted a rank now
    # and then ("terminate called without an active exception", about 1 run in 10 of some bodies)
    # after everything had finished.
    os._exit(0)


def run_ranks(body: Callable[[int], Any], out_dir: Path, world: int = 2) -> List[Any]:
    mp.start_processes(_rank_main, args=(body, str(out_dir / "init"), str(out_dir), world), nprocs=world,
                       join=True, start_method="spawn")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
