"""Specification of the comparison suite (effcompile/suite.py, ``effcompile bench --suite``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmarks import suite
from benchmarks.suite import BACKPROP, COMPOSED, PRESETS, ModelCase, SuiteSettings

pytestmark = pytest.mark.slow


def _tiny(preset: str, **overrides) -> SuiteSettings:
    """The preset's code path at toy size: one model, one seed, one epoch, a few steps."""
    settings = dataclasses.replace(PRESETS[preset], cases=[ModelCase("mlp", timing_batch=16)], seeds=(0,),
                                   epochs=1, steps=2, warmup=1, block_size=1, modes=("eager",), device="cpu",
                                   train_compile=False)
    return dataclasses.replace(settings, **overrides)


@pytest.fixture(scope="module")
def quick_result():
    return suite.run_suite(_tiny("quick"), progress=lambda message: None)


def test_every_configuration_is_timed_trained_and_compared_to_backprop(quick_result):
    case = quick_result["cases"]["mlp"]
    labels = list(suite.configurations())
    assert labels[0] == BACKPROP and COMPOSED in labels
    eager = case["timing"]["eager"]
    assert set(eager) == set(labels)
    assert eager[BACKPROP]["ratio_to_backprop"] == pytest.approx(1.0)
    for label in labels:
        row = eager[label]
        assert row["median_step_s"] > 0 and row["saved_activation_peak_bytes"] > 0
        assert row["ratio_to_backprop"] == pytest.approx(row["median_step_s"] / eager[BACKPROP]["median_step_s"])
        (run,) = case["accuracy"][label]
        assert len(run["history"]) == 1 and 0.0 <= run["history"][0]["test_accuracy"] <= 1.0


def test_composed_configuration_carries_all_four_passes_in_its_plan(quick_result):
    composed = quick_result["configurations"][COMPOSED]
    assert [config["pass"] for config in composed] == ["decorrelation", "randomized_vjp", "greedy_stages",
                                                       "sample_selection"]
    passes_in_plan = {row["pass_name"] for row in quick_result["cases"]["mlp"]["composed_plan"]}
    assert passes_in_plan == {"decorrelation", "randomized_vjp", "greedy_stages", "sample_selection"}


def test_outputs_json_markdown_plots_and_readme_section(quick_result, tmp_path):
    paths = suite.write_suite_outputs(quick_result, tmp_path)
    assert json.loads(paths["json"].read_text())["suite"] == "quick"
    table = paths["markdown"].read_text()
    for label in suite.configurations():
        assert f"| {label} |" in table
    assert "AMD" in table or "Machine:" in table
    assert paths["plot_mlp"].stat().st_size > 10_000  # a real PNG, not an empty file

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{suite.README_START}\nold\n{suite.README_END}\n\nafter\n")
    suite.update_readme(readme, [paths["json"]])
    text = readme.read_text()
    assert "old" not in text and "| composed |" in text and text.endswith("after\n")
    with pytest.raises(ValueError, match="markers"):
        suite.update_readme(paths["markdown"], [paths["json"]])


def test_gpu_preset_code_path_runs_with_bf16_autocast_on_cpu():
    """The GPU preset's compiled timing under bf16 autocast (Inductor on the CPU), every configuration."""
    result = suite.run_suite(_tiny("gpu", modes=("compiled",)), progress=lambda message: None)
    assert result["settings"]["autocast"] == "bf16"
    run = result["cases"]["mlp"]["accuracy"][BACKPROP][0]
    assert run["config"]["autocast"] == "bf16"
    compiled = result["cases"]["mlp"]["timing"]["compiled"]
    assert set(suite.configurations()) <= set(compiled)
    for label, row in compiled.items():
        assert row["graphs"] >= 1 and row["compile_s"] is not None and row["median_step_s"] > 0, label


def test_settings_are_validated():
    with pytest.raises(ValueError, match="modes"):
        dataclasses.replace(PRESETS["quick"], modes=("fast",))
    with pytest.raises(ValueError, match="cases"):
        SuiteSettings("empty", [])
    with pytest.raises(ValueError, match="unknown configurations \\['nope'\\]"):
        dataclasses.replace(PRESETS["quick"], labels=("decorrelation", "nope"))


def test_a_timing_only_run_of_chosen_configurations_trains_nothing_and_says_so():
    """What a short GPU lease runs: a subset of configurations (backprop always, as the ratios'
    denominator), step times only; the table shows untrained cells as '—', not as 'not reached'."""
    settings = _tiny("quick", labels=("sample_selection",), accuracy=False)
    assert list(suite.selected_configurations(settings)) == [BACKPROP, "sample_selection"]
    result = suite.run_suite(settings, progress=lambda message: None)
    case = result["cases"]["mlp"]
    assert set(case["timing"]["eager"]) == {BACKPROP, "sample_selection"} and case["accuracy"] == {}
    assert list(result["configurations"]) == [BACKPROP, "sample_selection"]
    table = suite.suite_table(result)
    assert "not reached" not in table
    assert "| sample_selection | " in table and "| — | — | — |" in table
