"""Tests of the effcompile command line (called in-process through ``main``)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
from torch import nn

from effcompile.cli import main, parse_value
from effcompile.models import get_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_train_plain_backprop_writes_metrics_and_curves(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "mlp", "--epochs", "1", "--passes", "none", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["runs"]) == ["backprop/seed0"]
    assert len(metrics["runs"]["backprop/seed0"]["history"]) == 1
    assert (out / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert "| backprop/seed0 |" in capsys.readouterr().out


def test_train_compare_runs_both_variants_per_seed(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["train", "--model", "mlp", "--epochs", "1", "--passes", "decorrelation",
                 "--pass-arg", "decorrelation.lr=0.01", "--seeds", "3", "--compare",
                 "--target-accuracy", "0.5", "--out", str(out), "--no-progress"])
    assert code == 0
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert sorted(runs) == ["backprop/seed3", "decorrelation/seed3"]
    assert runs["decorrelation/seed3"]["config"]["passes"][0]["lr"] == 0.01
    assert runs["backprop/seed3"]["config"]["passes"] == []
    printed = capsys.readouterr().out
    assert "Mean over seeds" in printed
    assert "| decorrelation | 1 |" in printed and "| backprop | 1 |" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model", "nope", "--passes", "none"], "unknown model 'nope'"),
        (["train", "--model", "mlp", "--dataset", "nope", "--passes", "none"], "unknown dataset 'nope'"),
        (["train", "--model", "mlp", "--passes", "nope"], "unknown pass 'nope'"),
        (["train", "--model", "mlp", "--passes", "decorrelation", "--pass-arg", "decorrelation.bogus=1"], "has no field 'bogus'"),
        (["train", "--model", "mlp", "--passes", "decorrelation", "--pass-arg", "decorrelation.lr=2"], "lr=2.0 is invalid"),
        (["train", "--model", "mlp", "--passes", "decorrelation", "--pass-arg", "decorrelation.lr"], "expected PASS.FIELD=VALUE"),
        (["inspect", "--model", "missing.py:build", "--passes", "decorrelation"], "does not exist"),
        (["inspect", "--model", "mlp", "--passes", "none"], "at least one pass"),
        (["bench", "--model", "mlp", "--passes", "none"], "at least one pass"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_argparse_errors_return_2(capsys):
    assert main(["train", "--model", "mlp", "--seeds", "a,b"]) == 2
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_inspect_lists_every_linear_layer(capsys):
    assert main(["inspect", "--model", "mlp", "--passes", "decorrelation"]) == 0
    printed = capsys.readouterr().out
    layer_column = {line.split()[0] for line in printed.splitlines()[2:] if line.strip()}
    linear_paths = {name for name, module in get_model("mlp").named_modules() if isinstance(module, nn.Linear)}
    assert linear_paths and linear_paths <= layer_column


def test_inspect_shows_the_rewritten_backward_gemms(capsys):
    assert main(["inspect", "--model", "mlp", "--passes", "randomized_vjp", "--batch-size", "64"]) == 0
    printed = capsys.readouterr().out
    backward = printed.split("Backward GEMMs rewritten in the AOT joint graph:")[1]
    for layer in ("fc1", "fc2", "head"):
        assert f"| {layer} | grad_weight | rows | 16/64 | importance |" in backward


def test_inspect_accepts_a_model_file(tmp_path, capsys):
    model_file = tmp_path / "my_model.py"
    model_file.write_text(textwrap.dedent("""
        from torch import nn

        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    """))
    assert main(["inspect", "--model", f"{model_file}:build", "--passes", "decorrelation"]) == 0
    printed = capsys.readouterr().out
    assert "decorrelation" in printed and "rewrite" in printed and "linear" in printed


def test_bench_writes_json_with_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "mlp", "--passes", "decorrelation", "--steps", "3", "--warmup", "1",
                 "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert set(result["variants"]) == {"plain", "transformed"}
    assert all(v["steps_timed"] == 3 for v in result["variants"].values())
    assert {"torch", "device_name", "cpu_count", "date"} <= set(result["machine"])
    assert "ratio transformed/plain" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, annotation, expected",
    [("0.01", float, 0.01), ("3", float, 3.0), ("3", int, 3), ("true", bool, True), ("0", bool, False),
     ("7", None, 7), ("1e-3", None, 1e-3), ("False", None, False), ("abc", None, "abc")],
)
def test_parse_value(text, annotation, expected):
    value = parse_value(text, annotation)
    assert value == expected and type(value) is type(expected)
