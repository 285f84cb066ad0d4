"""Greedy-stages benchmark on digits: accuracy, saved-activation memory and step time vs backprop.

For each model and each K (K=1 is plain end-to-end backprop) and seed, the model is built from
the same seed, transformed with ``GreedyStages(K)`` (K ≥ 2), trained with
:func:`effcompile.harness.fit.fit` (which runs :func:`effcompile.train_step`, i.e. the staged step)
and evaluated from the final stage (the model's own forward).  Per K the benchmark also records

* the peak bytes of activations saved for backward in one step, for backprop and for the staged
  step (``saved_activation_bytes``), per stage;
* the single-process step time of the staged step relative to backprop (interleaved timing of
  both on one fixed batch, ``effcompile.measure.time_steps``).

``python -m benchmarks.greedy_stages --out FILE.json`` runs it (see benchmarks/greedy_stages_cpu.sh).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from effcompile.api import plain_train_step, report, transform
from effcompile.measure import machine_info, time_steps
from effcompile.passes.greedy_stages import GreedyStages
from effcompile.harness.data import load_digits
from effcompile.harness.fit import fit

__all__ = ["run_benchmark", "MODEL_KWARGS"]

# Widths reduced so that the whole benchmark runs in minutes on a 2-core CPU.
MODEL_KWARGS: Dict[str, Dict[str, Any]] = {"cnn": {}, "resnet18_cifar": {"width": 16}}


def _build(name: str, stages: int, seed: int, example: torch.Tensor) -> nn.Module:
    from effcompile.models import get_model

    torch.manual_seed(seed)
    model = get_model(name, **MODEL_KWARGS.get(name, {}))
    if stages > 1:
        transform(model, GreedyStages(num_stages=stages), example_inputs=(example,))
    return model


def _step_time_ratio(name: str, stages: int, batch: torch.Tensor, labels: torch.Tensor, n_steps: int) -> Dict[str, float]:
    from effcompile.api import train_step
    from effcompile.passes import StepOptions

    plain = _build(name, 1, 0, batch[:8])
    staged = _build(name, stages, 0, batch[:8])
    plain_step = plain_train_step(plain, F.cross_entropy, torch.optim.SGD(plain.parameters(), lr=0.01), StepOptions())
    staged_step = train_step(staged, F.cross_entropy, torch.optim.SGD(staged.parameters(), lr=0.01))
    times = time_steps({"backprop": lambda: plain_step(batch, labels), "staged": lambda: staged_step(batch, labels)},
                       n_steps)
    backprop, staged_time = statistics.median(times["backprop"][2:]), statistics.median(times["staged"][2:])
    return {"backprop_step_s": backprop, "staged_step_s": staged_time, "step_time_ratio": staged_time / backprop}


def run_benchmark(models: Sequence[str] = ("cnn", "resnet18_cifar"), stages: Sequence[int] = (1, 2, 4),
                  seeds: Sequence[int] = (0, 1, 2), epochs: int = 10, batch_size: int = 64, lr: float = 0.05,
                  timing_steps: int = 20) -> Dict[str, Any]:
    """Run the benchmark; returns a JSON-ready dict (see the module docstring)."""
    train, test, info = load_digits()
    batch, labels = train.tensors[0][:batch_size], train.tensors[1][:batch_size]
    results: Dict[str, Any] = {"machine": machine_info(), "torch": torch.__version__, "dataset": "digits",
                               "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": "sgd(momentum=0.9)",
                               "seeds": list(seeds), "model_kwargs": MODEL_KWARGS, "runs": []}
    for name in models:
        for k in stages:
            accuracies, best, seconds = [], [], []
            for seed in seeds:
                model = _build(name, k, seed, batch[:8])
                run = fit(model, train, test, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=False,
                          label=f"{name}/K{k}/seed{seed}")
                accuracies.append(run.final_accuracy)
                best.append(run.best_accuracy)  # selected on the test split: a stability indicator only
                seconds.append(run.seconds_per_epoch)
            entry: Dict[str, Any] = {
                "model": name, "stages": k, "accuracy": accuracies,
                "accuracy_mean": statistics.mean(accuracies), "accuracy_std": statistics.pstdev(accuracies),
                "best_epoch_accuracy": best, "best_epoch_accuracy_mean": statistics.mean(best),
                "seconds_per_epoch": statistics.mean(seconds),
            }
            if k > 1:
                entry.update(_stage_details(name, k, batch, labels))
                entry.update(_step_time_ratio(name, k, batch, labels, timing_steps))
            results["runs"].append(entry)
            print(json.dumps({key: value for key, value in entry.items() if key != "plan"}), flush=True)
    return results


def _stage_details(name: str, k: int, batch: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
    from effcompile.passes.greedy_stages import saved_activation_bytes, staged_model

    model = _build(name, k, 0, batch[:8])
    model.train()
    memory = saved_activation_bytes(model, batch, labels, F.cross_entropy)
    staged = staged_model(model)
    stage_rows = [row.to_dict() for row in report(model) if row.layer.startswith(("greedy_stage_heads", "<stage"))]
    return {"memory": memory, "boundary_shapes": [list(s) for s in staged.boundary_shapes], "plan": stage_rows}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet18_cifar"])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: tiny models gain nothing from more, and OpenMP barriers "
                             "stall badly when another process holds a core)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run_benchmark(args.models, args.stages, args.seeds, args.epochs, args.batch_size, args.lr)
    results["wall_seconds"] = time.perf_counter() - start
    results["threads"] = args.threads
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
