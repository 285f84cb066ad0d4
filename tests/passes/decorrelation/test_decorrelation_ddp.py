"""Under DDP, every rank applies the same R update (statistics averaged over ranks).

Two real gloo processes on localhost see different data; their R matrices must stay identical
and equal to a single process that sees both ranks' sampled rows.
"""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import effcompile
from effcompile.passes.decorrelation import decorrelation_states

WORLD = 2
STEPS = 5


def _train(rank, sync_statistics, update_dtype="auto"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = effcompile.Decorrelation(input_layers=True, lr=0.05, sync_statistics=sync_statistics, update_dtype=update_dtype,
                                          max_overhead=None)  # an update every step: the control needs one last
        effcompile.transform(model, config, example_inputs=(torch.randn(4, 6),))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    step = effcompile.train_step(ddp, nn.functional.cross_entropy, optimizer)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(STEPS):
        x = torch.randn(16, 6, generator=generator) * (1 + rank) + rank
        step(x, torch.randint(0, 3, (16,), generator=generator))
    return {name: state.matrix for name, state in decorrelation_states(model).items()}


def _train_kronecker(rank, sync_statistics):
    """A convolution with R = R_channel ⊗ R_spatial: both factors' statistics are averaged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = effcompile.Decorrelation(input_layers=True, lr=0.05, sync_statistics=sync_statistics,
                                          max_overhead=None, structure="kronecker")
        effcompile.transform(model, config, example_inputs=(torch.randn(4, 4, 5, 5),))
    ddp = nn.parallel.DistributedDataParallel(model)
    step = effcompile.train_step(ddp, nn.functional.cross_entropy, torch.optim.SGD(ddp.parameters(), lr=0.1))
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(8, 1, 5, 5, generator=generator) * (1 + rank) + torch.randn(8, 4, 5, 5, generator=generator)
        step(x, torch.randint(0, 3, (8,), generator=generator))
    state = decorrelation_states(model)["0"]
    return {"channel": state.matrix, "spatial": state.spatial_matrix}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        runs = {sync: _train(rank, sync) for sync in (True, False)}
        runs["bfloat16"] = _train(rank, True, "bfloat16")  # the averaged statistic, then bf16 products
        runs["kronecker"] = {sync: _train_kronecker(rank, sync) for sync in (True, False)}
        torch.save(runs, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_R_stays_identical_on_every_rank(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    synced0, synced1 = rank0[True], rank1[True]
    assert set(synced0) == {"0", "2"}
    for name in synced0:
        assert not torch.equal(synced0[name], torch.eye(synced0[name].shape[-1]).expand_as(synced0[name])), "R was updated"
        torch.testing.assert_close(synced0[name], synced1[name], rtol=0, atol=1e-6)
    for name, matrix in rank0["bfloat16"].items():
        assert not torch.equal(matrix, synced0[name])  # the bf16 products ran
        torch.testing.assert_close(matrix, rank1["bfloat16"][name], rtol=0, atol=1e-6)
    # Control: without the all-reduce the ranks' different data make R drift apart.
    assert not torch.allclose(rank0[False]["0"], rank1[False]["0"], atol=1e-4)
    for factor in ("channel", "spatial"):
        synced = rank0["kronecker"][True][factor]
        assert not torch.equal(synced, torch.eye(synced.shape[-1]).expand_as(synced)), factor
        torch.testing.assert_close(synced, rank1["kronecker"][True][factor], rtol=0, atol=1e-6)
        assert not torch.allclose(rank0["kronecker"][False][factor], rank1["kronecker"][False][factor], atol=1e-4)
