"""Tests of effcompile.harness.fit: fit, metrics persistence, plots and tables."""

from __future__ import annotations

import json
import math

import pytest
import torch

from effcompile.harness.data import get_dataset
from effcompile.models import get_model
from effcompile.harness.fit import EpochMetrics, RunResult, fit
from effcompile.harness.reports import (compare_table, comparison_table, load_metrics, plot_comparison, plot_runs,
                                       save_metrics, summary_table)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGET = 0.5


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits")


def _fit_mlp(digits, seed: int = 0, **overrides) -> RunResult:
    train_set, test_set, info = digits
    torch.manual_seed(seed)
    model = get_model("mlp", num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size)
    kwargs = dict(epochs=2, batch_size=64, lr=0.1, optimizer="sgd", momentum=0.9, seed=seed,
                  progress=False, target_accuracy=TARGET)
    kwargs.update(overrides)
    return fit(model, train_set, test_set, **kwargs)


@pytest.fixture(scope="module")
def two_runs(digits):
    """Two runs with the same seed (for the determinism check), trained once per module."""
    return _fit_mlp(digits), _fit_mlp(digits)


def test_fit_learns_and_records_one_entry_per_epoch(two_runs):
    run, _ = two_runs
    assert [m.epoch for m in run.history] == [1, 2]
    assert run.final_accuracy > 0.8
    assert run.best_accuracy == max(m.test_accuracy for m in run.history)
    assert all(math.isfinite(m.train_loss) and math.isfinite(m.test_loss) for m in run.history)
    assert run.history[-1].train_loss < run.history[0].train_loss


def test_fit_wall_clock_is_positive_and_monotone(two_runs):
    seconds = [m.seconds for m in two_runs[0].history]
    assert seconds[0] > 0
    assert all(later > earlier for earlier, later in zip(seconds, seconds[1:]))
    assert two_runs[0].seconds_per_epoch == pytest.approx(seconds[-1] / len(seconds))


def test_fit_same_seed_gives_identical_losses(two_runs):
    first, second = two_runs
    assert [m.train_loss for m in first.history] == [m.train_loss for m in second.history]
    assert [m.test_loss for m in first.history] == [m.test_loss for m in second.history]
    assert [m.test_accuracy for m in first.history] == [m.test_accuracy for m in second.history]


def test_fit_records_the_first_epoch_reaching_the_target(two_runs):
    run = two_runs[0]
    expected = next(m for m in run.history if m.test_accuracy >= TARGET)
    assert run.target_accuracy == TARGET
    assert run.target_epoch == expected.epoch
    assert run.target_seconds == expected.seconds


def test_compiled_fit_reports_the_compilation_apart(digits):
    """The first compiled step holds the compilation: reported in compile_seconds, left out of the
    training seconds (which stay within a few steps of the epoch's steady time)."""
    eager = _fit_mlp(digits, epochs=1, target_accuracy=None)
    compiled = _fit_mlp(digits, epochs=1, target_accuracy=None, compile=True)
    assert eager.compile_seconds is None
    assert compiled.compile_seconds > 0.5  # a cold Dynamo + Inductor compile on any machine
    assert compiled.history[0].seconds < compiled.compile_seconds
    assert RunResult.from_dict(compiled.to_dict()).compile_seconds == compiled.compile_seconds


def test_fit_unreached_target_is_none(digits):
    run = _fit_mlp(digits, epochs=1, target_accuracy=1.01)
    assert run.target_epoch is None and run.target_seconds is None


def test_fit_records_steps_step_time_and_saved_activations(two_runs):
    run = two_runs[0]
    assert [m.steps for m in run.history] == [1437 // 64] * 2  # drop_last
    per_step = [(run.history[0].seconds) / 22, (run.history[1].seconds - run.history[0].seconds) / 22]
    assert run.step_seconds == pytest.approx(sum(per_step) / 2)  # the median of two epochs
    # The MLP saves its 64x64 input, two 64x128 hidden activations and ReLU outputs (float32).
    assert 64 * (64 + 2 * 128) * 4 <= run.saved_activation_bytes < 64 * (64 + 6 * 128) * 4
    record = run.to_dict()
    assert record["step_seconds"] == run.step_seconds and record["saved_activation_bytes"] == run.saved_activation_bytes
    assert RunResult.from_dict(record).to_dict() == record


def test_fit_max_steps_stops_early_and_evaluates_the_last_epoch(digits):
    run = _fit_mlp(digits, epochs=3, max_steps=30)
    assert [m.steps for m in run.history] == [22, 8]
    assert math.isfinite(run.history[-1].test_accuracy)
    with pytest.raises(ValueError, match="max_steps"):
        _fit_mlp(digits, epochs=1, max_steps=0)


def test_fit_progress_is_one_ascii_line_per_run_in_a_log(digits, capsys):
    _fit_mlp(digits, epochs=2, progress=True, label="digits/mlp backprop/seed0")
    err = capsys.readouterr().err  # pytest's capture is not a terminal: the log format
    assert err.count("\n") == 1 and err.endswith("\n")
    final = err.rstrip("\n").split("\r")[-1]
    assert final.startswith("digits/mlp backprop/seed0 100%|") and "44/44" in final
    assert "epoch 2/2 loss " in final and " acc " in final
    assert err.isascii()
    assert err.count("\r") <= 2 + 2 + 1  # start, one postfix per epoch, close: no per-step refreshes


def test_fit_rejects_unknown_optimizer(digits):
    with pytest.raises(ValueError, match="unknown optimizer"):
        _fit_mlp(digits, epochs=1, optimizer="lbfgs")


def _synthetic_results() -> dict[str, RunResult]:
    """Hand-made runs covering a reached target, an unreached one and a non-finite loss."""
    def run(label, group, seed, accuracies, target_epoch):
        history = [EpochMetrics(e + 1, 1.0 / (e + 1), 0.5 / (e + 1), acc, 0.25 * (e + 1))
                   for e, acc in enumerate(accuracies)]
        target_seconds = None if target_epoch is None else history[target_epoch - 1].seconds
        return RunResult(label=label, group=group, seed=seed, history=history, target_accuracy=0.9,
                         target_epoch=target_epoch, target_seconds=target_seconds, config={"lr": 0.1})

    results = {
        "backprop/seed0": run("backprop/seed0", "backprop", 0, [0.7, 0.85, 0.92], 3),
        "backprop/seed1": run("backprop/seed1", "backprop", 1, [0.6, 0.8, 0.88], None),
        "decorrelation/seed0": run("decorrelation/seed0", "decorrelation", 0, [0.8, 0.91, 0.95], 2),
    }
    results["backprop/seed1"].history[0].train_loss = math.nan
    return results


def test_save_metrics_round_trips_strict_json(tmp_path):
    results = _synthetic_results()
    path = save_metrics(results, tmp_path / "sub" / "metrics.json", metadata={"dataset": "digits"})
    payload = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert payload["metadata"] == {"dataset": "digits"}
    assert payload["runs"]["backprop/seed1"]["history"][0]["train_loss"] is None
    loaded = load_metrics(path)
    assert list(loaded) == list(results)
    assert [r.to_dict() for r in loaded.values()] == [r.to_dict() for r in results.values()]
    assert math.isnan(loaded["backprop/seed1"].history[0].train_loss)


def test_plot_runs_writes_a_png(tmp_path):
    path = plot_runs(_synthetic_results(), tmp_path / "curves.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_compare_table_has_one_row_per_run():
    table = compare_table(_synthetic_results())
    lines = table.splitlines()
    assert lines[0].startswith("| run | final acc | best acc | epochs to target | seconds to target | s/epoch |")
    assert len(lines) == 2 + 3
    assert "| decorrelation/seed0 | 0.9500 | 0.9500 | 2 | 0.50 | 0.250 | — |" in lines
    assert "| backprop/seed1 | 0.8800 | 0.8800 | — | — | 0.250 | — |" in lines


def test_comparison_table_ratios_to_backprop_per_case():
    results = _synthetic_results()
    for run in results.values():
        for metrics in run.history:
            metrics.steps = 10  # 0.25 s per epoch: 25 ms per step
        run.saved_activation_bytes = 2048 if run.group == "backprop" else 1024
    results["decorrelation/seed0"].history[1].seconds = 0.75  # epoch 2 takes 0.5 s, epoch 3 none: median of 25/50/0 ms
    table = comparison_table({"digits/mlp": results, "other/mlp": {"x/seed0": results["decorrelation/seed0"]}})
    lines = table.splitlines()
    assert lines[0].startswith("| case | configuration | seeds | target | epochs to target | seconds to target | "
                               "final accuracy | step (ms) | step vs backprop | saved activations (KiB) |")
    assert len(lines) == 2 + 3
    assert lines[2] == ("| digits/mlp | backprop | 2 | 0.9 | 3.0 (1/2 seeds) | 0.75 (1/2 seeds) | 0.900 [0.880, 0.920] "
                        "| 25.00 | 1.00x | 2 | 1.00x |")
    assert lines[3] == "| digits/mlp | decorrelation | 1 | 0.9 | 2.0 | 0.50 | 0.950 | 25.00 | 1.00x | 1 | 0.50x |"
    assert lines[4].startswith("| other/mlp | decorrelation | 1 |") and lines[4].endswith("| — | 1 | — |")


def test_comparison_table_says_not_reached():
    results = _synthetic_results()
    del results["backprop/seed0"]
    row = comparison_table({"c": results}).splitlines()[2]
    assert "| not reached | not reached |" in row


def test_plot_comparison_writes_one_png(tmp_path):
    results = _synthetic_results()
    path = plot_comparison({"digits/mlp": results, "mnist5k/mlp": results}, tmp_path / "accuracy_vs_time.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_summary_table_gives_mean_and_spread_per_group():
    table = summary_table(_synthetic_results())
    backprop = next(line for line in table.splitlines() if line.startswith("| backprop |"))
    assert "| 2 |" in backprop
    assert "0.9000 [0.8800, 0.9200]" in backprop  # final accuracy: mean [min, max]
    assert "3.0 (1/2 reached)" in backprop
