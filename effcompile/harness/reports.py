"""Reports of training runs: JSON metrics, learning-curve PNGs and Markdown tables."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .fit import RunResult

__all__ = ["bench_table", "save_metrics", "load_metrics", "load_metadata", "plot_runs", "compare_table", "summary_table",
           "comparison_table", "plot_comparison", "case_name", "markdown_table"]

BASELINE = "backprop"  # the group the comparison's ratios divide by


# --------------------------------------------------------------------------------------------
# Persistence and plots
# --------------------------------------------------------------------------------------------


def save_metrics(
    results: Mapping[str, RunResult], path: str | Path, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``{"metadata": ..., "runs": {label: RunResult.to_dict()}}`` as strict JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"metadata": dict(metadata or {}), "runs": {k: r.to_dict() for k, r in results.items()}}
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


def load_metrics(path: str | Path) -> dict[str, RunResult]:
    """Read the runs written by :func:`save_metrics`."""
    payload = json.loads(Path(path).read_text())
    return {label: RunResult.from_dict(data) for label, data in payload["runs"].items()}


def load_metadata(path: str | Path) -> dict[str, Any]:
    """Read the metadata written by :func:`save_metrics` (empty if there is none)."""
    return dict(json.loads(Path(path).read_text()).get("metadata", {}))


def case_name(metadata: Mapping[str, Any], default: str = "run") -> str:
    """``dataset/model`` from the metadata ``effcompile train`` writes (``default`` if absent)."""
    dataset = (metadata.get("dataset") or {}).get("name")
    model = (metadata.get("command") or {}).get("model")
    if model and (str(model).partition(":")[0].endswith(".py")):
        model = Path(str(model).partition(":")[0]).stem
    parts = [str(part) for part in (dataset, model) if part]
    return "/".join(parts) or default


def plot_runs(results: Mapping[str, RunResult], path: str | Path) -> Path:
    """Save learning curves of every run to one PNG.

    Top row: test accuracy and train loss vs epoch; bottom row: the same vs training
    wall-clock seconds.  Runs of one group share a colour and differ in line style.
    """
    # The object-oriented Agg API leaves pyplot's global backend untouched for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    styles = _line_styles(results.values())
    for label, run in results.items():
        epochs = [m.epoch for m in run.history]
        seconds = [m.seconds for m in run.history]
        accuracy = [m.test_accuracy for m in run.history]
        loss = [m.train_loss for m in run.history]
        color, linestyle = styles[label]
        kwargs = dict(color=color, linestyle=linestyle, marker="o", markersize=3, label=label)
        for row, x in enumerate((epochs, seconds)):
            axes[row, 0].plot(x, accuracy, **kwargs)
            axes[row, 1].plot(x, loss, **kwargs)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no fractional epochs
    for row, xlabel in enumerate(("epoch", "training wall-clock (s)")):
        axes[row, 0].set(xlabel=xlabel, ylabel="test accuracy")
        axes[row, 1].set(xlabel=xlabel, ylabel="train loss")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
    if results:
        axes[0, 0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def _groups(results: Mapping[str, RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for run in results.values():
        groups.setdefault(run.group, []).append(run)
    return groups


def _mean_curve(runs: Sequence[RunResult]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per epoch over seeds: mean seconds, mean / min / max accuracy (epochs that all seeds ran)."""
    epochs = min(len(run.history) for run in runs)
    seconds, mean, low, high = [], [], [], []
    for index in range(epochs):
        accuracies = [run.history[index].test_accuracy for run in runs]
        seconds.append(statistics.fmean(run.history[index].seconds for run in runs))
        mean.append(statistics.fmean(accuracies))
        low.append(min(accuracies))
        high.append(max(accuracies))
    return seconds, mean, low, high


def plot_comparison(cases: Mapping[str, Mapping[str, RunResult]], path: str | Path) -> Path:
    """One PNG: test accuracy against training wall-clock (log scale), one panel per case and one
    curve per configuration (mean over seeds, min–max band shaded; the target accuracy dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = max(len(cases), 1)
    fig = Figure(figsize=(6.5 * count, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, count, squeeze=False)[0]
    colours: dict[str, str] = {}
    for ax, (name, results) in zip(axes, cases.items()):
        targets = set()
        for group, runs in _groups(results).items():
            if not runs or not all(run.history for run in runs):
                continue
            colour = colours.setdefault(group, f"C{len(colours) % 10}")
            seconds, mean, low, high = _mean_curve(runs)
            ax.plot(seconds, mean, color=colour, marker="o", markersize=3, label=f"{group} ({len(runs)} seeds)")
            if len(runs) > 1:
                ax.fill_between(seconds, low, high, color=colour, alpha=0.15, linewidth=0)
            targets.update(run.target_accuracy for run in runs if run.target_accuracy is not None)
        for target in sorted(targets):
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
        if ax.lines and all(x > 0 for line in ax.lines[: len(ax.lines) - len(targets)] for x in line.get_xdata()):
            ax.set_xscale("log")  # configurations differ by multiples in time: log spacing shows them all
        ax.set(title=name, xlabel="training wall-clock (s, mean over seeds)", ylabel="test accuracy")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small", loc="lower right")
    fig.savefig(path, dpi=100)
    return path


def _line_styles(runs: Iterable[RunResult]) -> dict[str, tuple[str, str]]:
    """Map run label -> (colour per group, line style per run within its group)."""
    linestyles = ("-", "--", ":", "-.")
    groups: dict[str, int] = {}
    seen_in_group: dict[str, int] = {}
    styles = {}
    for run in runs:
        group_index = groups.setdefault(run.group, len(groups))
        member = seen_in_group.get(run.group, 0)
        seen_in_group[run.group] = member + 1
        styles[run.label] = (f"C{group_index % 10}", linestyles[member % len(linestyles)])
    return styles


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def compare_table(results: Mapping[str, RunResult]) -> str:
    """A Markdown table with one row per run: accuracy, time-to-target, seconds per epoch and
    (compiled runs) the compilation, which the training seconds leave out."""
    header = ["run", "final acc", "best acc", "epochs to target", "seconds to target", "s/epoch", "compile (s)"]
    rows = [
        [label, _fmt(run.final_accuracy, ".4f"), _fmt(run.best_accuracy, ".4f"),
         _fmt(run.target_epoch, "d"), _fmt(run.target_seconds, ".2f"), _fmt(run.seconds_per_epoch, ".3f"),
         _fmt(run.compile_seconds, ".1f")]
        for label, run in results.items()
    ]
    return markdown_table(header, rows)


def summary_table(results: Mapping[str, RunResult]) -> str:
    """A Markdown table with one row per group: mean over seeds with the [min, max] spread.

    Time-to-target columns average only the seeds that reached the target and say how many did.
    """
    groups: dict[str, list[RunResult]] = {}
    for run in results.values():
        groups.setdefault(run.group, []).append(run)
    header = ["group", "seeds", "final acc", "best acc", "epochs to target", "seconds to target", "s/epoch"]
    rows = []
    for group, runs in groups.items():
        reached = [r for r in runs if r.target_epoch is not None]
        suffix = f" ({len(reached)}/{len(runs)} reached)" if len(reached) < len(runs) and reached else ""
        rows.append([
            group,
            str(len(runs)),
            _spread([r.final_accuracy for r in runs], ".4f"),
            _spread([r.best_accuracy for r in runs], ".4f"),
            _spread([r.target_epoch for r in reached], ".1f") + suffix,
            _spread([r.target_seconds for r in reached], ".2f") + suffix,
            _spread([r.seconds_per_epoch for r in runs], ".3f"),
        ])
    return markdown_table(header, rows)


def comparison_table(cases: Mapping[str, Mapping[str, RunResult]], *, baseline: str = BASELINE) -> str:
    """One Markdown table over cases (``{case: {label: RunResult}}``), one row per configuration.

    Columns: seeds, epochs and training seconds to the target (mean [min, max] over the seeds
    that reached it), final accuracy (mean [min, max]), the median step time and its ratio to
    ``baseline`` of the same case, and the activations saved for backward in the first step
    (eager runs) with their ratio to ``baseline``.  Ratios are "—" without a baseline group.
    """
    header = ["case", "configuration", "seeds", "target", "epochs to target", "seconds to target",
              "final accuracy", "step (ms)", "step vs backprop", "saved activations (KiB)", "memory vs backprop"]
    rows = []
    for case, results in cases.items():
        groups = _groups(results)
        base = groups.get(baseline, [])
        base_step = _median([r.step_seconds for r in base])
        base_memory = _median([r.saved_activation_bytes for r in base])
        for group, runs in groups.items():
            reached = [r for r in runs if r.target_epoch is not None]
            targets = {r.target_accuracy for r in runs if r.target_accuracy is not None}
            step = _median([r.step_seconds for r in runs])
            memory = _median([r.saved_activation_bytes for r in runs])
            rows.append([
                case,
                group,
                str(len(runs)),
                "/".join(f"{t:g}" for t in sorted(targets)) or "—",
                _reached(runs, reached, [r.target_epoch for r in reached], ".1f"),
                _reached(runs, reached, [r.target_seconds for r in reached], ".2f"),
                _spread([r.final_accuracy for r in runs], ".3f"),
                _fmt(None if step is None else step * 1e3, ".2f"),
                _ratio(step, base_step),
                _fmt(None if memory is None else memory / 1024, ".0f"),
                _ratio(memory, base_memory),
            ])
    return markdown_table(header, rows)


def _reached(runs: Sequence[RunResult], reached: Sequence[RunResult], values: Sequence[Any], spec: str) -> str:
    if not any(r.target_accuracy is not None for r in runs):
        return "—"
    if not reached:
        return "not reached"
    text = _spread(values, spec)
    return text if len(reached) == len(runs) else f"{text} ({len(reached)}/{len(runs)} seeds)"


def _median(values: Sequence[float | int | None]) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}x"


def _spread(values: Sequence[float | int | None], spec: str) -> str:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "—"
    if len(finite) == 1:
        return format(finite[0], spec)
    mean = statistics.fmean(finite)
    return f"{mean:{spec}} [{min(finite):{spec}}, {max(finite):{spec}}]"


def _fmt(value: float | int | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render ``rows`` under ``header`` as a Markdown table (cells are str()-ed, pipes escaped)."""
    cell = lambda value: str(value).replace("|", "\\|")
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def bench_table(result: Mapping[str, Any]) -> str:
    """A Markdown table of a :func:`bench_pass` result, followed by the ratio line(s)."""
    header = ["variant", "median step (ms)", "mean (ms)", "min (ms)", "compile (s)", "graphs",
              "recompiles", "peak step mem (MiB)"]
    rows = []
    for label, stats in result["variants"].items():
        memory = stats["peak_step_memory_bytes"]
        rows.append([
            label,
            f"{stats['median_step_s'] * 1e3:.3f}",
            f"{stats['mean_step_s'] * 1e3:.3f}",
            f"{stats['min_step_s'] * 1e3:.3f}",
            "—" if stats["compile_s"] is None else f"{stats['compile_s']:.2f}",
            str(stats["graphs"]),
            str(stats["recompiles"]),
            "—" if memory is None else f"{memory / 2**20:.1f}",
        ])
    lines = [markdown_table(header, rows), ""]
    lines.append(f"ratio transformed/plain (median step time): {result['ratio']:.3f}x on {result['machine']['device_name']}")
    if result.get("predicted_ratio") is not None:
        kind = "compiled" if result.get("compile") else "eager"
        lines.append(f"predicted by the Plan's cost model ({kind} step): {result['predicted_ratio']:.3f}x")
    if result.get("memory_ratio") is not None:
        lines.append(f"peak step memory ratio transformed/plain: {result['memory_ratio']:.3f}x")
    lines.append(f"note: {result['note']}")
    return "\n".join(lines)
