"""The runnable examples in examples/ run (imported and called, a few steps each)."""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

import effcompile

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.usefixtures("single_thread")


def _example(filename):
    """Import ``examples/<filename>`` as a module for the duration of a test module."""
    spec = importlib.util.spec_from_file_location(f"_effcompile_example_{Path(filename).stem}", EXAMPLES / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def plain_loop():
    yield from _example("plain_loop.py")


def test_plain_loop_trains_a_decorrelated_model_with_a_hand_written_loop(plain_loop, capsys):
    result = plain_loop.main(["--steps", "60"])
    printed = capsys.readouterr().out
    assert "decorrelation" in printed and "rewrite" in printed  # the Plan
    assert "(plain loop)" in printed
    assert result["last_loss"] < result["first_loss"] and result["test_accuracy"] > 0.5
    assert result["fold_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("loop", ["plain", "train_step"])
def test_plain_loop_with_all_four_passes(plain_loop, capsys, loop):
    """All four passes in a hand-written loop around effcompile.training_loss, or in train_step."""
    result = plain_loop.main(["--steps", "8", "--passes", "decorrelation,randomized_vjp,greedy_stages,sample_selection",
                              "--loop", loop])
    printed = capsys.readouterr().out
    assert f"({loop} loop)" in printed and "greedy_stages" in printed and "sample_selection" in printed
    assert math.isfinite(result["last_loss"]) and result["fold_max_abs_diff"] < 1e-4


@pytest.fixture(scope="module")
def hf_trainer():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    yield from _example("hf_trainer.py")


def test_hf_trainer_trains_a_decorrelated_gpt2_eagerly(hf_trainer, tmp_path, capsys):
    from effcompile.passes.decorrelation import decorrelation_states

    result = hf_trainer.main(["--passes", "decorrelation", "--epochs", "2", "--output-dir", str(tmp_path)])
    assert "decorrelation" in capsys.readouterr().out
    assert result["losses"][-1] < result["losses"][0], result["losses"]
    states = decorrelation_states(result["model"])
    # 16 steps (64 rows / 8 × 2 epochs): R updated on every step its budgeted schedule names
    assert states and all(int(state.updates) == math.ceil(16 / state.update_every) > 0 for state in states.values())


def test_hf_trainer_samples_gpt2_conv1d_backward_eagerly(hf_trainer, tmp_path, joint_log):
    """GPT-2's Conv1D (addmm against an in×out weight), decorrelated and sketched, trained by the
    Trainer with no compilation: the scope mode runs each addmm as the sketched function."""
    result = hf_trainer.main(["--passes", "decorrelation,randomized_vjp", "--epochs", "1", "--output-dir", str(tmp_path)])
    assert all(math.isfinite(loss) for loss in result["losses"])
    rows = effcompile.report(result["model"]).for_pass("randomized_vjp").applied()
    assert len(rows) == 8 and all(row.details["eager_scope"] for row in rows)
    assert not joint_log.graphs


def test_hf_trainer_with_torch_compile_samples_the_backward(hf_trainer, tmp_path, joint_log):
    result = hf_trainer.main(["--passes", "decorrelation,randomized_vjp", "--compile", "--backend", "effcompile_aot_eager",
                              "--epochs", "1", "--output-dir", str(tmp_path)])
    assert all(math.isfinite(loss) for loss in result["losses"])
    # The model's graph samples all 8 Conv1D layers (a graph without markers, e.g. the Trainer's loss, has none:
    # a marked layer left unsampled would have raised MissingRewriteError).
    assert max(graph["randomized_vjp"].rewrites for graph in joint_log.graphs) >= 8


@pytest.mark.parametrize("passes", ["greedy_stages", "sample_selection"])
def test_hf_trainer_trains_step_changing_passes_through_compute_loss(hf_trainer, tmp_path, passes):
    """effcompile.training_loss as the Trainer's compute_loss: the Trainer's backward and optimizer
    train the stages on their local losses / the selected sequences."""
    from effcompile.passes.sample_selection.selectors import selector_of

    result = hf_trainer.main(["--passes", passes, "--epochs", "2", "--output-dir", str(tmp_path)])
    losses, model = result["losses"], result["model"]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], losses
    if passes == "sample_selection":
        selector = selector_of(model)
        assert int(selector.steps) == 16 and float(selector.rows_selected) == 16 * 4  # 4 of 8 sequences a step
    else:  # the Trainer logged the sum of the two stages' local losses, and it fell
        stage_losses = result["objective"].stage_losses
        assert len(stage_losses) == 2 and all(math.isfinite(float(loss)) for loss in stage_losses)


@pytest.mark.parametrize("passes, accumulation", [("greedy_stages", 1), ("sample_selection", 1), ("greedy_stages", 2)])
def test_hf_trainer_under_torchrun_ddp_averages_step_changing_passes(passes, accumulation, tmp_path):
    """``torchrun`` with 2 CPU processes: the Trainer wraps the model in DDP (gloo), shards the
    data per rank, and calls ``compute_loss`` with the wrapper; the objective made from it runs as
    the wrapper's forward, so DDP averages it and the ranks end with identical parameters (each
    rank alone would drift with its own data; an objective of the unwrapped model refuses).  With
    gradient accumulation the Trainer skips the all-reduce of the first micro-batch (``no_sync``)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import subprocess

    script = Path(__file__).resolve().parent / "hf_trainer_ddp.py"
    with socket.socket() as probe:  # a free port for the rendezvous (port 0 is not one)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(script), "--passes", passes, "--epochs", "1", "--output-dir", str(tmp_path),
               "--gradient-accumulation-steps", str(accumulation)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ranks identical: True; moved: True; objective: _StepOwnerObjective" in done.stdout, done.stdout[-2000:]


@pytest.fixture(scope="module")
def lightning_digits():
    pytest.importorskip("pytorch_lightning")
    yield from _example("lightning_digits.py")


def test_lightning_trains_a_decorrelated_model_with_automatic_optimisation(lightning_digits, capsys):
    from effcompile.passes.decorrelation import decorrelation_states

    result = lightning_digits.main(["--passes", "decorrelation", "--steps", "40"])
    assert "Lightning: 40 steps" in capsys.readouterr().out
    assert sum(result["losses"][-5:]) / 5 < 0.7 * result["losses"][0] and result["test_accuracy"] > 0.5
    states = decorrelation_states(result["module"].net)
    assert states and all(int(state.updates) == math.ceil(40 / state.update_every) > 0 for state in states.values())


@pytest.mark.parametrize("passes", ["decorrelation,sample_selection", "greedy_stages"])
def test_lightning_trains_step_changing_passes_with_automatic_optimisation(lightning_digits, passes):
    """training_step returns effcompile.training_loss: Lightning's own backward and optimizer step
    train the selected rows / every stage on its local loss."""
    from effcompile.passes.sample_selection import selector_of

    result = lightning_digits.main(["--passes", passes, "--steps", "20"])
    module = result["module"]
    assert module.automatic_optimization
    if "sample_selection" in passes:
        assert selector_of(module.net).last_index.numel() == 16  # keep 0.5 of 32 rows
        assert int(selector_of(module.net).steps) == 20
    else:
        assert len(module._objective.stage_losses) == 2
    assert sum(result["losses"][-5:]) / 5 < result["losses"][0]