"""The runnable examples in examples/ run (imported and called, a few steps each)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def plain_loop():
    spec = importlib.util.spec_from_file_location("_effcompile_example_plain_loop", EXAMPLES / "plain_loop.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_plain_loop_trains_a_decorrelated_model_with_a_hand_written_loop(plain_loop, capsys):
    result = plain_loop.main(["--steps", "60"])
    printed = capsys.readouterr().out
    assert "decorrelation" in printed and "rewrite" in printed  # the Plan
    assert "(plain loop)" in printed
    assert result["last_loss"] < result["first_loss"] and result["test_accuracy"] > 0.5
    assert result["fold_max_abs_diff"] < 1e-4


def test_plain_loop_with_all_four_passes_uses_train_step(plain_loop, capsys):
    result = plain_loop.main(["--steps", "8", "--passes", "decorrelation,randomized_vjp,greedy_stages,sample_selection"])
    printed = capsys.readouterr().out
    assert "(train_step loop)" in printed and "greedy_stages" in printed and "sample_selection" in printed
    assert math.isfinite(result["last_loss"]) and result["fold_max_abs_diff"] < 1e-4
    with pytest.raises(SystemExit, match="change the step"):
        plain_loop.main(["--steps", "1", "--passes", "greedy_stages", "--loop", "plain"])
