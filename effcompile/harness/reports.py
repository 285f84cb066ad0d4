"""Reports of training runs: JSON metrics, learning-curve PNGs and Markdown tables."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .fit import RunResult

__all__ = ["bench_table", "save_metrics", "load_metrics", "plot_runs", "compare_table", "summary_table", "markdown_table"]


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
    """A Markdown table with one row per run: accuracy, time-to-target and seconds per epoch."""
    header = ["run", "final acc", "best acc", "epochs to target", "seconds to target", "s/epoch"]
    rows = [
        [label, _fmt(run.final_accuracy, ".4f"), _fmt(run.best_accuracy, ".4f"),
         _fmt(run.target_epoch, "d"), _fmt(run.target_seconds, ".2f"), _fmt(run.seconds_per_epoch, ".3f")]
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
    if result.get("memory_ratio") is not None:
        lines.append(f"peak step memory ratio transformed/plain: {result['memory_ratio']:.3f}x")
    lines.append(f"note: {result['note']}")
    return "\n".join(lines)
