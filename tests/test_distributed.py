"""Per-rank semantics of the passes under torch.distributed: two real gloo processes on localhost.

The table these tests check is in passes/README.md ("Per-rank semantics").  Covered elsewhere,
not repeated here: decorrelation's R stays identical on every DDP rank with different data per rank
and moves (tests/passes/decorrelation/test_decorrelation_ddp.py, with a control without the
statistics all-reduce); decorrelation inside a K×D stage run averages over the stage's replicas
only, and every stage's replicas — aux heads included (``stage_state_keys`` lists
``greedy_stage_heads.k.*``) — end identical (tests/passes/greedy_stages/runtime/test_data_parallel_stages.py);
FSDP2 (tests/test_fsdp2.py).

Both ranks are seeded alike (``torch.manual_seed``), as data-parallel training does.

* Randomized VJP: each rank draws its own sketch (``effcompile.distributed.rank_generator``), so
  the ranks' sampled rows and sketched gradients differ, a rank repeats its draws under the same
  seed, and the all-reduced gradient is unbiased with half of one rank's variance.  The control
  (every rank on the global RNG, i.e. the per-rank stream switched off) draws identical sketches
  and keeps one rank's variance.
* Sample selection: each rank selects from its own batch; the loss history is global (every rank
  records every rank's losses), so percentiles rank a row among the whole data-parallel batch.
  ``sync_history=False`` (the control) keeps a history per rank.
* Steps that run the module behind a DDP wrapper without its forward (compiled selection, the
  single-process greedy-stage step) average the gradients themselves: the ranks stay identical,
  and ``max_grad_norm`` clips the averaged gradient.
* ``effcompile.training_loss`` under DDP (a trainer owns the backward): a step owner's objective
  runs as the wrapper's forward (``WrapperForward``), so DDP's own reducer all-reduces during the
  trainer's backward.  With different data per rank the ranks stay identical and end where
  ``train_step`` ends; ``no_sync()`` accumulation ends where synced micro-batches do.  The control
  (the objective without the wrapper's forward) leaves the ranks apart.
"""

import contextlib
import functools
import math
import warnings
from statistics import NormalDist

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gloo_ranks import run_ranks

WORLD = 2
CLIP = 0.02  # max_grad_norm of the clipped runs: below every step's averaged gradient norm here
DRAWS = 400
ALPHA = 1e-4  # family-wise false-alarm rate of each z-test


# ------------------------------------------------------------------------------ rank side
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))


def _vjp_data():
    generator = torch.Generator().manual_seed(3)  # the same batch on both ranks: draws are the only noise
    x = torch.randn(64, 12, generator=generator) * torch.logspace(-1, 1, 64)[:, None]
    return x, torch.randint(0, 5, (64,), generator=generator)


def _flat_grad(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _randomized_vjp(rank):
    import copy

    import effcompile
    from effcompile.passes.randomized_vjp import estimators

    x, y = _vjp_data()
    model = _mlp()
    exact = _flat_grad(copy.deepcopy(model), x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25, target="both"), example_inputs=(x,))
    out = {"exact": exact}

    torch.manual_seed(7)
    first = [estimators.sample_indices(torch.ones(64), 16, "uniform")[0] for _ in range(3)]
    torch.manual_seed(7)
    again = [estimators.sample_indices(torch.ones(64), 16, "uniform")[0] for _ in range(3)]
    out["indices"], out["indices_again"] = first, again
    torch.manual_seed(11)
    out["gradient"] = _flat_grad(model, x, y)
    torch.manual_seed(11)
    out["gradient_again"] = _flat_grad(model, x, y)

    def draws():
        local, averaged = [], []
        for _ in range(DRAWS):
            g = _flat_grad(model, x, y)
            total = g.clone()
            dist.all_reduce(total)
            local.append(g)
            averaged.append(total / WORLD)
        return torch.stack(local), torch.stack(averaged)

    torch.manual_seed(1234)
    out["local"], out["averaged"] = draws()
    original = estimators.rank_generator
    estimators.rank_generator = lambda device: None  # control: every rank on the global RNG
    try:
        torch.manual_seed(1234)
        out["local_shared"], out["averaged_shared"] = draws()
    finally:
        estimators.rank_generator = original

    # DDP averages the ranks' sketched gradients (the eager autograd functions under DDP's hooks).
    ddp = nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(99)
    out["ddp_local"] = _flat_grad(model, x, y)
    torch.manual_seed(99)
    ddp.zero_grad(set_to_none=True)
    F.cross_entropy(ddp(x), y).backward()
    out["ddp"] = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out


def _selector_history(rank):
    from effcompile.passes.sample_selection.selectors import SampleSelector

    out = {}
    losses = rank * 10.0 + torch.linspace(0.0, 1.0, 8)  # rank 1's rows are all harder than rank 0's
    for sync in (True, False):
        selector = SampleSelector(keep=0.25, strategy="loss", history_size=64, sync_history=sync)
        index, weights = selector.select(losses)
        out[sync] = {"percentiles": selector.percentiles(losses), "history": selector.loss_history.clone(),
                     "fill": int(selector.history_fill), "index": index, "rows_seen": int(selector.rows_seen)}
    return out


def _ddp_training(rank, config, compile=False, backend="aot_eager", steps=5, max_grad_norm=None):
    """``steps`` DDP steps of ``effcompile.train_step`` with different data on each rank."""
    import effcompile
    from effcompile.passes.greedy_stages import staged_model
    from effcompile.passes.sample_selection.selectors import selector_of

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    initial = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, config, example_inputs=(torch.randn(16, 8),))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    step = effcompile.train_step(ddp, F.cross_entropy, optimizer, compile=compile, backend=backend,
                                 max_grad_norm=max_grad_norm)
    generator = torch.Generator().manual_seed(10 + rank)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=generator) * (1 + 3 * rank)
        step(x, torch.randint(0, 3, (16,), generator=generator))
    selector = selector_of(model)
    groups = [list(model.parameters())]
    if isinstance(config, effcompile.GreedyStages):
        staged = staged_model(model)
        groups = [staged.stage_parameters(k) for k in range(staged.num_stages)]
    grad_norms = [math.sqrt(sum(float(p.grad.square().sum()) for p in group if p.grad is not None)) for group in groups]
    return {"initial": initial, "parameters": [p.detach().clone() for p in model.parameters()], "grad_norms": grad_norms,
            "history": None if selector is None else selector.loss_history.clone(),
            "fill": None if selector is None else int(selector.history_fill)}


# Step owners' objectives for a trainer that owns the backward (``effcompile.training_loss``).
OBJECTIVES = {
    "stages": lambda effcompile: (effcompile.GreedyStages(num_stages=2),),
    "selection": lambda effcompile: (effcompile.SampleSelection(keep=0.25, strategy="loss", history_size=256),),
    "stages_with_selection": lambda effcompile: (effcompile.GreedyStages(num_stages=2),
                                                 effcompile.SampleSelection(keep=0.5, strategy="random")),
}


def _ddp_objective_training(rank, name, by, compile=False, steps=4):
    """``steps`` DDP steps with different data on each rank: by ``train_step``, by a trainer-style
    loop around ``training_loss`` (``"loss"``), the same with the first of two micro-batches
    under ``no_sync()`` (``"no_sync"``) or synced (``"micro"``); by the objective of the module
    behind the wrapper called inside the wrapper's forward as Lightning's strategies call
    ``training_step`` (``"lightning"``), called outside it (``"unwrapped"``: refused, the error
    text is returned), or called outside it with that check fooled (``"drift"``: the control)."""
    import effcompile
    from effcompile import api
    from effcompile.distributed import WrapperForward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, *OBJECTIVES[name](effcompile), example_inputs=(torch.randn(16, 8),))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    options = dict(compile=compile, backend="effcompile_aot_eager")
    if by == "step":
        step = effcompile.train_step(ddp, F.cross_entropy, optimizer, **options)
    else:
        unwrapped = by in ("lightning", "unwrapped", "drift")
        objective = effcompile.training_loss(model if unwrapped else ddp, F.cross_entropy, **options)
        if by == "lightning":
            objective = functools.partial(WrapperForward(ddp, model), objective)
        if by == "drift":
            checked = api.inside_ddp_forward
            api.inside_ddp_forward = lambda: True

        def step(x, y):
            optimizer.zero_grad()
            if by in ("no_sync", "micro"):
                with ddp.no_sync() if by == "no_sync" else contextlib.nullcontext():
                    objective(x[:8], y[:8]).backward()
                objective(x[8:], y[8:]).backward()
            else:
                objective(x, y).backward()
            optimizer.step()

        if by == "unwrapped":
            try:
                step(torch.randn(16, 8), torch.randint(0, 3, (16,)))
            except RuntimeError as error:
                return str(error)

    generator = torch.Generator().manual_seed(10 + rank)
    torch.manual_seed(5 + rank)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=generator) * (1 + 3 * rank)
        step(x, torch.randint(0, 3, (16,), generator=generator))
    if by == "drift":
        api.inside_ddp_forward = checked
    return [p.detach().clone() for p in model.parameters()]


def _rank_results(rank):
    import effcompile

    selection = effcompile.SampleSelection(keep=0.25, strategy="loss", history_size=256)
    objectives = {(name, by, compile): _ddp_objective_training(rank, name, by, compile)
                  for name in OBJECTIVES for compile in (False, True) for by in ("step", "loss")}
    objectives.update({("stages", by, False): _ddp_objective_training(rank, "stages", by)
                       for by in ("no_sync", "micro", "lightning", "unwrapped", "drift")})
    return {
        "randomized_vjp": _randomized_vjp(rank),
        "selector": _selector_history(rank),
        "selection_eager": _ddp_training(rank, selection),
        "selection_compiled": _ddp_training(rank, selection, compile=True),
        "stages": _ddp_training(rank, effcompile.GreedyStages(num_stages=2)),
        "selection_compiled_clipped": _ddp_training(rank, selection, compile=True, max_grad_norm=CLIP),
        "stages_clipped": _ddp_training(rank, effcompile.GreedyStages(num_stages=2), max_grad_norm=CLIP),
        "objectives": objectives,
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_rank_results, tmp_path_factory.mktemp("distributed"), WORLD)


# ------------------------------------------------------------------------------ randomized VJP
def _total_variance(samples, exact):
    return float((samples.double() - exact.double()).square().sum(1).mean())


def test_randomized_vjp_ranks_draw_different_sketches_that_repeat_under_the_same_seed(ranks):
    rank0, rank1 = (r["randomized_vjp"] for r in ranks)
    for r in (rank0, rank1):  # reproducible: the same seed, the same draws on a rank
        assert all(torch.equal(a, b) for a, b in zip(r["indices"], r["indices_again"]))
        assert torch.equal(r["gradient"], r["gradient_again"])
    # Independent across ranks, although the ranks were seeded alike and hold the same batch.
    assert all(not torch.equal(a, b) for a, b in zip(rank0["indices"], rank1["indices"]))
    assert not torch.allclose(rank0["gradient"], rank1["gradient"])
    torch.testing.assert_close(rank0["exact"], rank1["exact"], rtol=0, atol=0)
    # Control: on the global RNG both ranks draw exactly the same sketch.
    assert torch.equal(rank0["local_shared"], rank1["local_shared"])


def test_randomized_vjp_all_reduced_gradient_is_unbiased(ranks):
    result = ranks[0]["randomized_vjp"]
    samples, exact = result["averaged"].double(), result["exact"].double()
    assert torch.equal(result["averaged"], ranks[1]["randomized_vjp"]["averaged"])  # every rank steps alike
    z = NormalDist().inv_cdf(1 - ALPHA / (2 * exact.numel()))
    error = (samples.mean(0) - exact).abs()
    bound = z * samples.std(0) / math.sqrt(samples.shape[0]) + 1e-7
    assert bool((error <= bound).all()), f"max error/bound {(error / bound).max():.3f}"


def test_randomized_vjp_two_ranks_halve_the_variance_of_one(ranks):
    """Var(mean of 2 independent draws) = Var/2; with a shared stream the mean is one draw."""
    rank0, rank1 = (r["randomized_vjp"] for r in ranks)
    exact = rank0["exact"]
    one = 0.5 * (_total_variance(rank0["local"], exact) + _total_variance(rank1["local"], exact))
    ratio = _total_variance(rank0["averaged"], exact) / one
    assert 0.4 < ratio < 0.62, ratio
    shared = _total_variance(rank0["averaged_shared"], exact) / _total_variance(rank0["local_shared"], exact)
    assert shared == pytest.approx(1.0, abs=1e-6), shared


def test_ddp_averages_the_ranks_sketched_gradients(ranks):
    rank0, rank1 = (r["randomized_vjp"] for r in ranks)
    expected = 0.5 * (rank0["ddp_local"] + rank1["ddp_local"])  # each rank's draw under seed 99
    assert not torch.allclose(rank0["ddp_local"], rank1["ddp_local"])
    for r in (rank0, rank1):
        torch.testing.assert_close(r["ddp"], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ sample selection
def test_selection_history_is_global_and_the_same_on_every_rank(ranks):
    rank0, rank1 = (r["selector"][True] for r in ranks)
    losses = [r * 10.0 + torch.linspace(0.0, 1.0, 8) for r in range(WORLD)]
    for r in (rank0, rank1):
        assert r["fill"] == 16 and r["rows_seen"] == 8  # every rank's losses recorded; 8 rows selected from
        torch.testing.assert_close(r["history"][:16], torch.cat(losses), rtol=0, atol=0)
        assert r["index"].shape == (2,) and bool((r["index"] < 8).all())  # k of its own 8 rows
    assert torch.equal(rank0["history"], rank1["history"])
    # Percentiles among the global batch: rank 0's easy rows rank low, rank 1's hard rows high.
    assert bool((rank0["percentiles"] < 0.5).all()) and bool((rank1["percentiles"] > 0.5).all())


def test_selection_history_per_rank_without_sync_history(ranks):
    rank0, rank1 = (r["selector"][False] for r in ranks)
    assert rank0["fill"] == rank1["fill"] == 8
    assert not torch.equal(rank0["history"], rank1["history"])
    # Each rank ranks its rows among its own: the same spread of percentiles on both ranks.
    torch.testing.assert_close(rank0["percentiles"], rank1["percentiles"])


@pytest.mark.parametrize("run", ["selection_eager", "selection_compiled"])
def test_ddp_selection_ranks_stay_identical(run, ranks):
    """Eager steps go through DDP's forward; compiled ones run the inner module and average the
    gradients themselves (without that, the ranks' parameters drift apart)."""
    rank0, rank1 = (r[run] for r in ranks)
    for a, b, initial in zip(rank0["parameters"], rank1["parameters"], rank0["initial"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.equal(a, initial)
    assert rank0["fill"] == 5 * WORLD * 16  # both ranks' rows of every step
    torch.testing.assert_close(rank0["history"], rank1["history"], rtol=0, atol=0)


def test_ddp_greedy_stage_step_ranks_stay_identical(ranks):
    """The single-process staged step runs the stages, not DDP's forward: it averages itself."""
    rank0, rank1 = (r["stages"] for r in ranks)
    for a, b, initial in zip(rank0["parameters"], rank1["parameters"], rank0["initial"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, initial) for a, initial in zip(rank0["parameters"], rank0["initial"]))


@pytest.mark.parametrize("run", ["selection_compiled_clipped", "stages_clipped"])
def test_ddp_steps_clip_the_averaged_gradient(run, ranks):
    """``max_grad_norm`` under DDP clips after the ranks' gradients are averaged: the ranks stay
    identical and the stepped gradient (each stage's, for greedy stages) has exactly the norm
    ``CLIP`` — clipping each rank's own gradient before averaging would leave it below ``CLIP``."""
    rank0, rank1 = (r[run] for r in ranks)
    for a, b in zip(rank0["parameters"], rank1["parameters"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert rank0["grad_norms"] == pytest.approx([CLIP] * len(rank0["grad_norms"]), rel=1e-4)


# ------------------------------------------------------------------------------ training_loss under DDP
def _same(first, second):
    return all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_ddp_training_loss_is_all_reduced_like_train_step(name, compile, ranks):
    """The trainer's backward of the objective is averaged by DDP itself: the ranks (different
    data) stay identical, and end exactly where DDP ``train_step`` (which averages itself) ends."""
    rank0, rank1 = (r["objectives"] for r in ranks)
    assert _same(rank0[(name, "loss", compile)], rank1[(name, "loss", compile)])
    for by_loss, by_step in zip(rank0[(name, "loss", compile)], rank0[(name, "step", compile)]):
        torch.testing.assert_close(by_loss, by_step, rtol=0, atol=1e-6)


def test_ddp_training_loss_honours_no_sync_accumulation(ranks):
    """A trainer accumulating two micro-batches with the first under ``no_sync()`` ends where
    syncing both does (DDP all-reduces the accumulated gradient once), identical on both ranks."""
    rank0, rank1 = (r["objectives"] for r in ranks)
    assert _same(rank0[("stages", "no_sync", False)], rank1[("stages", "no_sync", False)])
    for a, b in zip(rank0[("stages", "no_sync", False)], rank0[("stages", "micro", False)]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ddp_objective_of_the_inner_module_inside_the_wrappers_forward_is_averaged(ranks):
    """Lightning's way: the trainer calls the objective (made from the unwrapped module) inside
    the DDP forward; it runs as it is and DDP averages it, as ``train_step`` does."""
    rank0, rank1 = (r["objectives"] for r in ranks)
    assert _same(rank0[("stages", "lightning", False)], rank1[("stages", "lightning", False)])
    for a, b in zip(rank0[("stages", "lightning", False)], rank0[("stages", "step", False)]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_ddp_objective_outside_any_ddp_forward_refuses_and_would_drift(ranks):
    """Made from the unwrapped module and called outside any DDP forward, nothing would average it:
    it refuses, saying what to pass.  The control (that check fooled) shows the ranks drifting."""
    for results in ranks:
        refused = results["objectives"][("stages", "unwrapped", False)]
        assert isinstance(refused, str) and "greedy_stages" in refused and "DDP-wrapped model" in refused
    rank0, rank1 = (r["objectives"] for r in ranks)
    assert not _same(rank0[("stages", "drift", False)], rank1[("stages", "drift", False)])


# ------------------------------------------------------------------------------ WrapperForward itself
class _Recording(nn.Module):
    """A stand-in wrapper: its forward calls the inner module, as DDP's does, between two records."""

    def __init__(self, inner):
        super().__init__()
        self.module, self.calls = inner, []

    def forward(self):
        self.calls.append("before")
        output = self.module()
        self.calls.append("after")
        return output


def test_wrapper_forward_runs_the_function_as_the_inner_forward_once():
    from effcompile.distributed import WrapperForward

    inner = nn.Linear(3, 2)
    wrapper = _Recording(inner)
    x = torch.randn(4, 3)
    seen = []

    def objective(value):
        seen.append(list(wrapper.calls))
        return inner(value).sum()  # the inner module's own forward again, not the objective

    loss = WrapperForward(wrapper, inner)(objective, x)
    torch.testing.assert_close(loss, inner(x).sum())
    assert seen == [["before"]] and wrapper.calls == ["before", "after"]
    assert "forward" not in inner.__dict__  # the swap is undone


def test_wrapper_forward_keeps_an_instance_forward_and_restores_on_error():
    from effcompile.distributed import WrapperForward

    inner = nn.Linear(3, 2)
    own = lambda: "own"  # noqa: E731
    inner.forward = own
    wrapper = _Recording(inner)

    def failing():
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        WrapperForward(wrapper, inner)(failing)
    assert inner.__dict__["forward"] is own
    assert WrapperForward(wrapper, inner)(lambda: 7) == 7 and inner() == "own"
