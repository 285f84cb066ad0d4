"""The comparison suite: every pass alone and all passes composed, against plain backprop.

``run_suite(settings)`` measures, for one model, every configuration of :func:`configurations`
(plain backprop, each pass alone, and decorrelation + randomized VJP + greedy stages + sample
selection composed in one model) with the same initial weights, data order and optimizer:

* **step time** — full training steps (zero_grad, forward, loss, backward, optimizer step) on one
  fixed synthetic batch, eager and compiled (``backend="effcompile"``), all configurations of a
  mode interleaved in blocks so machine drift cancels in the ratios to backprop; compile time
  and recompiles are counted per configuration.  Compiled mode also times plain backprop under
  ``backend="inductor"``: the ``effcompile`` backend's own overhead on an unchanged graph.
* **memory** — peak bytes of activations saved for backward during one eager step (any device),
  and the CUDA peak step memory on a GPU.
* **accuracy** — training on the embedded digits data for several seeds: epochs and wall-clock
  seconds to a target accuracy, final accuracy, with min/max spread over seeds.

Results go to a JSON file, a Markdown table and two PNGs (accuracy against wall-clock; step-time
ratios).  ``readme_section`` renders committed results for the README.  Presets: ``quick`` (the
CPU suite in minutes), ``cpu`` (more models and seeds) and ``gpu`` (ResNet-18 and ViT-tiny at
realistic batch sizes under bf16 autocast; runs on a machine with only torch and its bundled
packages, no network).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from effcompile.api import train_step, transform
from effcompile.measure import CountedStep, compile_seconds, machine_info, peak_step_memory, time_first_call, time_steps
from effcompile.config import PassConfig
from effcompile.passes import Decorrelation, GreedyStages, RandomizedVJP, SampleSelection
from effcompile.harness.fit import RunResult, autocast_context, fit
from effcompile.harness.reports import markdown_table

__all__ = ["SuiteSettings", "PRESETS", "configurations", "run_suite", "suite_table", "readme_section",
           "write_suite_outputs"]

BACKPROP = "backprop"
COMPOSED = "composed"
MODES = ("eager", "compiled")


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One model of a suite: how to build it for timing (synthetic data) and for accuracy (digits)."""

    model: str
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    timing_batch: int = 32
    timing_channels: int = 1
    timing_image_size: int = 8


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """What a suite run measures; see :data:`PRESETS`."""

    name: str
    cases: Sequence[ModelCase]
    steps: int = 30
    warmup: int = 3
    block_size: int = 5
    seeds: Sequence[int] = (0, 1, 2)
    epochs: int = 6
    train_batch_size: int = 32
    lr: float = 0.01
    target_accuracy: float = 0.95
    modes: Sequence[str] = MODES
    train_compile: bool = False
    autocast: Optional[str] = None
    device: Optional[str] = None
    # A subset of configurations() to run (backprop is always run: every ratio is to it); None: all.
    labels: Optional[Sequence[str]] = None
    # False: step time and memory only, no digits training (a GPU check inside a short lease).
    accuracy: bool = True

    def __post_init__(self) -> None:
        if not self.cases:
            raise ValueError("SuiteSettings.cases is empty: give at least one model")
        unknown = sorted(set(self.labels) - set(configurations())) if self.labels is not None else []
        if unknown:
            raise ValueError(f"SuiteSettings.labels has unknown configurations {unknown}: "
                             f"expected names from {sorted(configurations())}")
        if any(mode not in MODES for mode in self.modes):
            raise ValueError(f"SuiteSettings.modes={self.modes!r} is invalid: expected a subset of {MODES}")
        if self.steps < 1 or self.warmup < 1 or self.epochs < 1 or not self.seeds:
            raise ValueError("SuiteSettings needs steps, warmup, epochs >= 1 and at least one seed")


PRESETS: Dict[str, SuiteSettings] = {
    # The CPU suite in a few minutes (issue 6 acceptance: under 15 minutes with --quick).
    "quick": SuiteSettings("quick", [ModelCase("cnn")], steps=20, seeds=(0, 1, 2), epochs=5),
    "cpu": SuiteSettings("cpu", [ModelCase("cnn"), ModelCase("mlp"),
                                 ModelCase("resnet18_cifar", {"width": 16}, timing_batch=32,
                                           timing_channels=3, timing_image_size=32)],
                         steps=40, seeds=(0, 1, 2), epochs=8),
    # Realistic GPU shapes: CIFAR-sized synthetic batches for throughput, digits for accuracy.
    "gpu": SuiteSettings("gpu", [ModelCase("resnet18_cifar", timing_batch=256, timing_channels=3, timing_image_size=32),
                                 ModelCase("vit_tiny", timing_batch=256, timing_channels=3, timing_image_size=32)],
                         steps=50, warmup=5, seeds=(0, 1, 2), epochs=8, train_batch_size=64,
                         train_compile=True, autocast="bf16", device="cuda"),
}


def configurations() -> Dict[str, List[PassConfig]]:
    """The compared configurations: each pass alone, then all four composed in one model."""
    decorrelation = Decorrelation()
    randomized = RandomizedVJP(keep=0.25)
    stages = GreedyStages(num_stages=2)
    selection = SampleSelection(keep=0.5, strategy="random")
    return {
        BACKPROP: [],
        "decorrelation": [decorrelation],
        "randomized_vjp": [randomized],
        "greedy_stages": [stages],
        "sample_selection": [selection],
        COMPOSED: [decorrelation, randomized, stages, selection],
    }


def selected_configurations(settings: SuiteSettings) -> Dict[str, List[PassConfig]]:
    """The configurations ``settings`` runs: its ``labels`` (all if None), backprop always first."""
    every = configurations()
    wanted = set(settings.labels) | {BACKPROP} if settings.labels is not None else set(every)
    return {label: configs for label, configs in every.items() if label in wanted}


# ------------------------------------------------------------------------------------ building
def _build(case: ModelCase, seed: int, *, timing: bool) -> nn.Module:
    from effcompile.models import get_model

    torch.manual_seed(seed)
    shape = ({"in_channels": case.timing_channels, "image_size": case.timing_image_size} if timing
             else {"in_channels": 1, "image_size": 8})
    return get_model(case.model, num_classes=10, **shape, **dict(case.model_kwargs))


def _transformed(model: nn.Module, configs: Sequence[PassConfig], example: tuple) -> tuple:
    """``transform`` a copy; returns (model, warnings raised) so skips show in the results."""
    model = copy.deepcopy(model)
    if not configs:
        return model, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transform(model, *configs, example_inputs=example)
    return model, [str(w.message) for w in caught if "effcompile" in str(w.message)]


def _plan_rows(model: nn.Module) -> List[Dict[str, Any]]:
    from effcompile.api import plan_of

    plan = plan_of(model)
    return [] if plan is None else [
        {key: value for key, value in row.to_dict().items() if key in ("layer", "pass_name", "action", "reason")}
        for row in plan]


# ------------------------------------------------------------------------------------ timing
def _saved_activation_peak(model: nn.Module, step: Callable[[], Any]) -> int:
    """Peak bytes of activations saved for backward during one step (parameters excluded)."""
    from effcompile.measure import SavedTensorMeter

    state = list(model.parameters()) + list(model.buffers())
    with torch.random.fork_rng(devices=[]), SavedTensorMeter(exclude=state) as meter:
        step()
    return meter.peak_bytes


def time_case(case: ModelCase, settings: SuiteSettings, device: torch.device) -> Dict[str, Any]:
    """Step time, compile time, recompiles and memory of every configuration, per mode."""
    base = _build(case, 0, timing=True).to(device)
    generator = torch.Generator().manual_seed(0)
    shape = (case.timing_batch, case.timing_channels, case.timing_image_size, case.timing_image_size)
    inputs = torch.randn(shape, generator=generator).to(device)
    targets = torch.randint(0, 10, (case.timing_batch,), generator=generator).to(device)
    results: Dict[str, Any] = {}
    for mode in settings.modes:
        if mode == "compiled":
            torch.compiler.reset()
        steps, models, notes = {}, {}, {}
        variants = selected_configurations(settings)
        if mode == "compiled":
            variants[f"{BACKPROP} (inductor)"] = []
        for label, configs in variants.items():
            model, notes[label] = _transformed(base, configs, (inputs,))
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9)
            backend = "inductor" if label.endswith("(inductor)") else "effcompile"
            step = train_step(model, nn.CrossEntropyLoss(), optimizer, compile=mode == "compiled", backend=backend)
            models[label] = model
            steps[label] = CountedStep(_autocast_step(step, inputs, targets, settings.autocast, device))
        first_call = {label: time_first_call(step, device) for label, step in steps.items()}
        if settings.warmup > 1:
            time_steps(steps, settings.warmup - 1, block_size=settings.block_size, device=device)
        cuda_memory = {label: peak_step_memory(step, device) for label, step in steps.items()}
        saved = ({label: _saved_activation_peak(models[label], step) for label, step in steps.items()}
                 if mode == "eager" else {})
        times = time_steps(steps, settings.steps, block_size=settings.block_size, device=device)
        results[mode] = _mode_results(times, first_call, steps, cuda_memory, saved, notes, mode)
    return {"batch": case.timing_batch, "input_shape": list(shape), **results}


def _autocast_step(step: Callable, inputs, targets, autocast: Optional[str], device: torch.device) -> Callable:
    def run():
        with autocast_context(autocast, device):
            return step(inputs, targets)
    return run


def _mode_results(times, first_call, steps, cuda_memory, saved, notes, mode) -> Dict[str, Any]:
    medians = {label: statistics.median(seconds) for label, seconds in times.items()}
    rows = {}
    for label, seconds in times.items():
        rows[label] = {
            "median_step_s": medians[label],
            "ratio_to_backprop": medians[label] / medians[BACKPROP],
            "first_call_s": first_call[label],
            "compile_s": compile_seconds(first_call[label], medians[label]) if mode == "compiled" else None,
            "graphs": steps[label].graphs,
            "recompiles": steps[label].recompiles,
            "cuda_peak_step_bytes": cuda_memory[label],
            "saved_activation_peak_bytes": saved.get(label),
            "warnings": notes[label],
        }
    for label, row in rows.items():
        if cuda_memory[BACKPROP] and cuda_memory[label]:
            row["cuda_memory_ratio"] = cuda_memory[label] / cuda_memory[BACKPROP]
        if saved.get(BACKPROP) and saved.get(label) is not None:
            row["saved_activation_ratio"] = saved[label] / saved[BACKPROP]
    return rows


# ------------------------------------------------------------------------------------ accuracy
def train_case(case: ModelCase, settings: SuiteSettings, device: torch.device) -> Dict[str, Any]:
    """Digits training of every configuration and seed: curves, time and epochs to target."""
    from effcompile.harness.data import load_digits

    train_set, test_set, _ = load_digits()
    example = (torch.stack([train_set[i][0] for i in range(settings.train_batch_size)]).to(device),)
    runs: Dict[str, List[RunResult]] = {}
    for label, configs in selected_configurations(settings).items():
        runs[label] = []
        for seed in settings.seeds:
            model, _ = _transformed(_build(case, seed, timing=False).to(device), configs, example)
            if settings.train_compile:
                torch.compiler.reset()
            runs[label].append(fit(
                model, train_set, test_set, epochs=settings.epochs, batch_size=settings.train_batch_size,
                lr=settings.lr, seed=seed, compile=settings.train_compile, progress=False,
                target_accuracy=settings.target_accuracy, device=device, label=f"{label}/seed{seed}",
                group=label, autocast=settings.autocast))
    return {label: [run.to_dict() for run in label_runs] for label, label_runs in runs.items()}


# ------------------------------------------------------------------------------------ driver
def run_suite(settings: SuiteSettings, *, progress: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every case of ``settings``; returns a JSON-ready dict (see :func:`write_suite_outputs`)."""
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result: Dict[str, Any] = {
        "suite": settings.name,
        "settings": _settings_record(settings),
        "configurations": {label: [c.to_dict() for c in configs]
                           for label, configs in selected_configurations(settings).items()},
        "machine": machine_info(device),
        "cases": {},
    }
    for case in settings.cases:
        progress(f"[{case.model}] timing {', '.join(settings.modes)} ...")
        timing = time_case(case, settings, device)
        accuracy = {}
        if settings.accuracy:
            progress(f"[{case.model}] training on digits ({len(settings.seeds)} seeds x "
                     f"{len(selected_configurations(settings))} configurations) ...")
            accuracy = train_case(case, settings, device)
        composed = selected_configurations(settings).get(COMPOSED)
        plan = _plan_rows(_transformed(_build(case, 0, timing=False), composed, (torch.zeros(4, 1, 8, 8),))[0]) \
            if composed else []
        result["cases"][case.model] = {"timing": timing, "accuracy": accuracy, "composed_plan": plan}
    return result


def _settings_record(settings: SuiteSettings) -> Dict[str, Any]:
    record = dataclasses.asdict(settings)
    record["cases"] = [dataclasses.asdict(case) for case in settings.cases]
    return record


# ------------------------------------------------------------------------------------ reporting
def _runs(records: Sequence[Mapping[str, Any]]) -> List[RunResult]:
    return [RunResult.from_dict(record) for record in records]


def _spread(values: Sequence[Optional[float]], spec: str) -> str:
    if not values:
        return "—"  # not trained (a timing-only run)
    present = [v for v in values if v is not None]
    if not present:
        return "not reached"
    text = f"{statistics.fmean(present):{spec}} [{min(present):{spec}}, {max(present):{spec}}]"
    missing = len(values) - len(present)
    return text + (f" ({missing} not reached)" if missing else "")


def _ratio(timing: Mapping[str, Any], mode: str, label: str) -> str:
    row = timing.get(mode, {}).get(label)
    return "—" if row is None else f"{row['ratio_to_backprop']:.2f}x"


def suite_table(result: Mapping[str, Any]) -> str:
    """One Markdown table per model: time, memory and accuracy of every configuration."""
    blocks = []
    for model, case in result["cases"].items():
        timing, accuracy = case["timing"], case["accuracy"]
        header = ["configuration", "step eager", "step compiled", "compile (s)", "recompiles",
                  "saved activations", "epochs to target", "seconds to target", "final accuracy"]
        rows = []
        for label in result["configurations"]:
            runs = _runs(accuracy.get(label, []))
            compiled = timing.get("compiled", {}).get(label, {})
            eager = timing.get("eager", {}).get(label, {})
            rows.append([
                label, _ratio(timing, "eager", label), _ratio(timing, "compiled", label),
                "—" if compiled.get("compile_s") is None else f"{compiled['compile_s']:.1f}",
                "—" if not compiled else str(compiled["recompiles"]),
                "—" if eager.get("saved_activation_ratio") is None else f"{eager['saved_activation_ratio']:.2f}x",
                _spread([run.target_epoch for run in runs], ".1f"),
                _spread([run.target_seconds for run in runs], ".2f"),
                _spread([run.final_accuracy for run in runs], ".3f"),
            ])
        inductor = timing.get("compiled", {}).get(f"{BACKPROP} (inductor)")
        backend_line = ""
        if inductor:
            backend_line = (f"\n\nBackend overhead: plain backprop under `effcompile` / under `inductor` = "
                            f"{1 / inductor['ratio_to_backprop']:.3f}x (goal ≤ 1.05x).")
        shape = "x".join(str(s) for s in timing["input_shape"])
        blocks.append(f"**{model}** — step times: ratio to plain backprop (median of interleaved steps, synthetic "
                      f"batch {shape}); accuracy: digits, target {result['settings']['target_accuracy']:.0%}, "
                      f"mean [min, max] over seeds {list(result['settings']['seeds'])}.\n\n"
                      + markdown_table(header, rows) + backend_line)
    machine = result["machine"]
    footer = (f"\n\nMachine: {machine['device_name']} ({machine['cpu_count']} CPU cores), torch {machine['torch']}, "
              f"{machine['date'][:10]}; suite `{result['suite']}`.")
    return "\n\n".join(blocks) + footer


def plot_suite(result: Mapping[str, Any], directory: Path) -> List[Path]:
    """accuracy-vs-wall-clock and step-time-ratio PNGs, one pair per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model, case in result["cases"].items():
        figure, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
        for label, records in case["accuracy"].items():
            for i, run in enumerate(_runs(records)):
                curves.plot([m.seconds for m in run.history], [m.test_accuracy for m in run.history],
                            color=f"C{list(case['accuracy']).index(label)}", alpha=0.7,
                            label=label if i == 0 else None)
        curves.set(xlabel="training wall-clock (s)", ylabel="test accuracy (digits)", title=f"{model}: accuracy")
        if case["accuracy"]:  # a timing-only run trains nothing: an empty panel, no legend
            curves.legend(fontsize=8)
        labels = list(result["configurations"])
        width = 0.4
        for offset, mode in enumerate(m for m in MODES if m in case["timing"]):
            ratios = [case["timing"][mode].get(label, {}).get("ratio_to_backprop", float("nan")) for label in labels]
            bars.bar([i + offset * width for i in range(len(labels))], ratios, width, label=mode)
        bars.axhline(1.0, color="black", linewidth=0.8)
        bars.set_xticks([i + width / 2 for i in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
        bars.set(ylabel="step time / backprop", title=f"{model}: step time")
        bars.legend(fontsize=8)
        figure.tight_layout()
        path = directory / f"{model}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def write_suite_outputs(result: Mapping[str, Any], directory: str | Path) -> Dict[str, Path]:
    """``suite.json``, ``suite.md`` and one PNG per model under ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "suite.json"
    json_path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    markdown_path = directory / "suite.md"
    markdown_path.write_text(suite_table(result) + "\n")
    plots = plot_suite(result, directory)
    return {"json": json_path, "markdown": markdown_path, **{f"plot_{p.stem}": p for p in plots}}


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


README_START, README_END = "<!-- suite-results:start -->", "<!-- suite-results:end -->"


def readme_section(result_paths: Sequence[str | Path]) -> str:
    """The README's generated results: one suite table per committed result file."""
    parts = []
    for path in result_paths:
        result = json.loads(Path(path).read_text())
        parts.append(f"From `{Path(path).as_posix()}`:\n\n{suite_table(result)}")
    return "\n\n".join(parts)


def update_readme(readme: str | Path, result_paths: Sequence[str | Path]) -> None:
    """Replace the text between the suite-results markers of ``readme`` with :func:`readme_section`."""
    readme = Path(readme)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} markers")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{readme_section(result_paths)}\n{README_END}{tail}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks suite --preset quick|cpu|gpu [--model M] [--seeds 0,1,2] [--epochs N] --out DIR``."""
    import argparse
    import datetime as _dt

    from effcompile.cli import is_model_path, parse_model_args, resolve_device

    parser = argparse.ArgumentParser(prog="python -m benchmarks suite", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--model", default=None, help="one zoo model instead of the preset's")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=None, help="digits training epochs")
    parser.add_argument("--device", default=None)
    parser.add_argument("--modes", default=None, help="comma-separated subset of eager,compiled")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated subset of {','.join(configurations())} (backprop always runs)")
    parser.add_argument("--timing-only", action="store_true", help="step time and memory only, no digits training")
    parser.add_argument("--out", default=None, help="output directory")
    args = parser.parse_args(argv)
    settings = PRESETS[args.preset]
    overrides: Dict[str, Any] = {}
    if args.model:
        if is_model_path(args.model):
            parser.error("the suite runs zoo models only; give a zoo name with --model")
        # A model the preset already has keeps the preset's timing shape (batch, channels, size).
        preset_case = next((case for case in settings.cases if case.model == args.model), ModelCase(args.model))
        model_kwargs = {**preset_case.model_kwargs, **parse_model_args(args.model_arg)}
        overrides["cases"] = [dataclasses.replace(preset_case, model_kwargs=model_kwargs)]
    if args.seeds:
        overrides["seeds"] = tuple(int(seed) for seed in args.seeds.split(","))
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.device:
        overrides["device"] = str(resolve_device(args.device))
    if args.modes:
        overrides["modes"] = tuple(args.modes.split(","))
    if args.configs:
        overrides["labels"] = tuple(args.configs.split(","))
    if args.timing_only:
        overrides["accuracy"] = False
    settings = dataclasses.replace(settings, **overrides)
    result = run_suite(settings)
    result["command"] = {key: value for key, value in vars(args).items()}
    out = Path(args.out or f"runs/suite-{settings.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    paths = write_suite_outputs(result, out)
    print(suite_table(result))
    print("\nwrote " + ", ".join(str(path) for path in paths.values()))
    return 0
