"""K stages × D data-parallel replicas: K·D real gloo processes on localhost.

The sync 2×2 run is checked step for step against data-parallel greedy training written plainly
here (each stage's gradient averaged over the replicas' shards, BatchNorm statistics averaged);
replicas must end identical although they saw different data; a killed replica must be reported
like a killed stage; async replicas and composed passes (decorrelation, whose statistics are
averaged over the stage's replicas only) must train; the ``effcompile stages`` command must run
the 4 processes and write its results.
"""

import json
import multiprocessing
import os

import pytest
import torch

from effcompile import cli
from effcompile.passes import GreedyStages
from effcompile.passes.greedy_stages.rewrite import make_stage_optimizers, staged_model
from effcompile.passes.greedy_stages.runtime.launcher import (Fault, Layout, StageRuntimeError, ZooJob,
                                                              build_staged_model, cross_entropy, cycle_batches,
                                                              run_stages, stage_state_keys)

pytestmark = pytest.mark.slow

ZOO = ZooJob(model="cnn", dataset="digits", batch_size=32, lr=0.1, widths=(8, 16, 32))
CUTS = ("features.1",)
STAGES, REPLICAS, STEPS = 2, 2, 12


def _config(**overrides):
    fields = dict(num_stages=STAGES, cuts=CUTS, mode="sync", timeout_s=20.0)
    fields.update(overrides)
    return GreedyStages(**fields)


def _run(config, zoo=ZOO, steps=STEPS, **kwargs):
    return run_stages(config, zoo.model_factory, cross_entropy, zoo.optimizer_factory, zoo.data_factory, steps,
                      data_parallel=REPLICAS, **kwargs)


@pytest.fixture(scope="module")
def sync_run():
    return _run(_config(), eval_factory=ZOO.eval_factory)


def _reference():
    """Data-parallel greedy training in one process: at every step each stage runs its replicas'
    shards from the same weights and buffers, then steps once with the averaged gradient and
    the averaged buffers."""
    model = build_staged_model(_config(), ZOO.model_factory, seed=0)
    staged = staged_model(model)
    optimizers = make_stage_optimizers(staged, ZOO.optimizer_factory)
    parameter_ids = {id(p) for p in model.parameters()}
    buffers = []
    for k in range(STAGES):
        owned = set(stage_state_keys(model, k))
        buffers.append([v for key, v in model.state_dict(keep_vars=True).items()
                        if key in owned and id(v) not in parameter_ids])
    losses = [[[] for _ in range(REPLICAS)] for _ in range(STAGES)]
    batches = cycle_batches(ZOO.data_factory)
    for _ in range(STEPS):
        shard = [next(batches)[1] for _ in range(REPLICAS)]  # batch index ≡ replica (mod D)
        inputs, labels = [x for x, _ in shard], [y for _, y in shard]
        for k in range(STAGES):
            parameters = [p for group in optimizers[k].param_groups for p in group["params"]]
            start = [b.clone() for b in buffers[k]]
            grad_sum = [torch.zeros_like(p) for p in parameters]
            buffer_sum = [torch.zeros_like(b) for b in buffers[k]]
            outputs = []
            for d in range(REPLICAS):
                for b, s in zip(buffers[k], start):
                    b.copy_(s)
                optimizers[k].zero_grad(set_to_none=True)
                out = staged.stage(k)(inputs[d])
                loss = cross_entropy(staged.local_logits(k, out), labels[d])
                loss.backward()
                losses[k][d].append(float(loss.detach()))
                for total, p in zip(grad_sum, parameters):
                    if p.grad is not None:
                        total += p.grad
                for total, b in zip(buffer_sum, buffers[k]):
                    if b.is_floating_point():
                        total += b
                    else:  # counters (num_batches_tracked): every replica counts the same steps
                        total.copy_(b)
                outputs.append(out.detach())
            with torch.no_grad():
                for p, total in zip(parameters, grad_sum):
                    p.grad = total / REPLICAS
                for b, total in zip(buffers[k], buffer_sum):
                    b.copy_(total / REPLICAS if b.is_floating_point() else total)
            optimizers[k].step()
            inputs = outputs
    return losses, model.state_dict()


def test_layout_puts_each_replicas_pipeline_on_consecutive_ranks():
    layout = Layout(num_stages=3, replicas=2)
    assert layout.world == 6
    assert [(layout.stage_of(r), layout.replica_of(r)) for r in range(6)] == [
        (0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert layout.stage_ranks(1) == [1, 4] and layout.name(4) == "stage 1 replica 1"
    assert Layout(num_stages=2).name(1) == "stage 1"


def test_sync_replicas_match_plain_data_parallel_greedy_training(sync_run):
    losses, state = _reference()
    assert sync_run.data_parallel == REPLICAS and len(sync_run.replica_losses) == STAGES
    for k in range(STAGES):
        for d in range(REPLICAS):
            torch.testing.assert_close(torch.tensor(sync_run.replica_losses[k][d]), torch.tensor(losses[k][d]),
                                       rtol=1e-5, atol=1e-5)
    for key, value in state.items():
        torch.testing.assert_close(sync_run.model_state[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_replicas_see_different_data_and_end_identical(sync_run):
    assert sync_run.replica_divergence == [0.0, 0.0]
    for k in range(STAGES):  # different shards: the replicas' losses differ at every step
        assert all(a != b for a, b in zip(*sync_run.replica_losses[k]))
    initial = build_staged_model(_config(), ZOO.model_factory, seed=0).state_dict()
    moved = [key for key, value in initial.items()
             if value.is_floating_point() and not torch.equal(value, sync_run.model_state[key])]
    assert len(moved) > 10  # trained
    # Throughput and accuracy count every replica's samples.
    assert sync_run.boundaries[0]["messages"] == REPLICAS * STEPS
    assert sync_run.accuracy is not None and sync_run.pipeline_samples_per_s > 0


def _no_children_left(pids):
    assert multiprocessing.active_children() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_killed_replica_is_reported_like_a_killed_stage(tmp_path):
    config = _config(timeout_s=10.0)
    with pytest.raises(StageRuntimeError) as info:
        _run(config, steps=20, checkpoint_dir=str(tmp_path), checkpoint_every=5,
             fault=Fault(stage=1, replica=1, step=6, kind="kill"))
    message = str(info.value)
    assert "stage 1 replica 1 (pid" in message and "was killed by SIGKILL after 6 training steps" in message
    assert "connection closed (peer process died)" in message  # a survivor saw it at once
    assert info.value.stalled_s < config.timeout_s
    _no_children_left(info.value.pids)
    # Every rank checkpointed step 5 under its own name; replica 0 keeps the one-replica file name.
    names = sorted(os.listdir(tmp_path))
    assert names == ["stage0.pt", "stage0.replica1.pt", "stage1.pt", "stage1.replica1.pt"]
    extra = torch.load(tmp_path / "stage1.replica1.pt", weights_only=False)["extra"]
    assert (extra["stage"], extra["replica"], extra["replicas"], extra["trained"]) == (1, 1, 2, 5)


def test_async_replicas_with_int8_transport_train_and_stay_identical():
    result = _run(_config(mode="async", transport="int8", buffer=4, max_reuse=2), steps=30)
    assert result.replica_divergence == [0.0, 0.0]
    last = result.replica_losses[-1][0]
    assert sum(last[-5:]) / 5 < 0.8 * sum(last[:5]) / 5
    assert result.boundaries[0]["activation_compression"] > 3.5


def test_composed_decorrelation_averages_its_statistics_over_the_stage_replicas_only():
    """Decorrelation all-reduces its statistics over the replica group: the stage's 2 ranks, not
    WORLD (whose ranks hold other layers: that all-reduce would mismatch and fail)."""
    zoo = ZooJob(model="cnn", dataset="digits", batch_size=32, lr=0.1, widths=(8, 16, 32), passes=("decorrelation",))
    result = _run(_config(), zoo=zoo)
    assert result.replica_divergence == [0.0, 0.0]
    matrices = {key: value for key, value in result.model_state.items() if key.endswith(".matrix")}
    assert len(matrices) >= 3
    for key, matrix in matrices.items():
        assert not torch.equal(matrix, torch.eye(matrix.shape[-1]).expand_as(matrix)), f"{key}: R never moved"


def test_effcompile_stages_command_runs_four_processes(tmp_path):
    out = tmp_path / "result.json"
    status = cli.main(["stages", "--model", "cnn", "--dataset", "digits", "--stages", "2", "--data-parallel", "2",
                       "--steps", "60", "--out", str(out)])
    assert status == 0
    summary = json.loads(out.read_text())
    assert summary["data_parallel"] == 2 and summary["num_stages"] == 2
    assert summary["replica_divergence"] == [0.0, 0.0]
    assert [len(stage) for stage in summary["replica_final_losses"]] == [2, 2]
    assert summary["final_losses"][-1] < 0.5 * summary["first_losses"][-1]
    assert summary["accuracy"] > 0.5


def test_effcompile_stages_rejects_bad_arguments(capsys):
    assert cli.main(["stages", "--data-parallel", "0"]) == 2
    assert "--data-parallel must be >= 1" in capsys.readouterr().err
    assert cli.main(["stages", "--with", "greedy_stages"]) == 2
    assert "not a pass to compose" in capsys.readouterr().err
    assert cli.main(["stages", "--help"]) == 0
    assert "--data-parallel" in capsys.readouterr().out


def test_a_step_owning_pass_is_refused_not_silently_bypassed(capsys):
    """Stage processes train with the plain local loss: composed sample selection would be skipped."""
    assert cli.main(["stages", "--with", "sample_selection"]) == 2
    assert "owns the training step" in capsys.readouterr().err
    zoo = ZooJob(model="cnn", dataset="digits", batch_size=32, lr=0.1, widths=(8, 16, 32), passes=("sample_selection",))
    with pytest.raises(StageRuntimeError, match="cannot run sample_selection"):
        _run(_config(timeout_s=10.0), zoo=zoo, steps=2)
