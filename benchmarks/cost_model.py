"""The cost model checked: each pass's Plan prediction (``predicted_step``) beside the measured
eager step ratio to plain backprop, in the same run.

``python -m benchmarks cost_model [--steps 30] [--compile] [--out FILE]``: for each (model,
configuration), ``effcompile.measure.bench_pass`` times interleaved blocks of plain and transformed
steps (SGD with momentum, one intra-op thread, synthetic data) and the transformed model's Plan
gives the prediction (``effcompile.predicted_step``).  ``error`` = predicted − measured.  With
``--compile`` both arms are Inductor-compiled steps and the prediction is
``predicted_step(model, compiled=True)`` (passes with a compiled cost model only: the randomized
VJP, decorrelation and sample selection).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import effcompile
from effcompile.measure import bench_pass, machine_info
from effcompile.models import example_inputs, get_model


def _mlp1024() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10))


def _mlp512() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(768, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


# name → (factory, example inputs)
MODELS: Dict[str, tuple] = {
    "mlp1024-b256": (_mlp1024, lambda: (torch.randn(256, 3, 32, 32),)),
    "mlp512-b128": (_mlp512, lambda: (torch.randn(128, 3, 16, 16),)),
    "cnn-digits-b32": (lambda: get_model("cnn"), lambda: example_inputs("cnn", 32)),
    "resnet18w16-b64": (lambda: get_model("resnet18_cifar", in_channels=3, image_size=32, width=16),
                        lambda: example_inputs("resnet18_cifar", 64, in_channels=3, image_size=32)),
    "vit-digits-b64": (lambda: get_model("vit_tiny"), lambda: example_inputs("vit_tiny", 64)),
    "vit192-b128": (lambda: get_model("vit_tiny", depth=4, embed_dim=192, num_heads=3),
                    lambda: example_inputs("vit_tiny", 128)),
}

CONFIGS: Dict[str, Callable[[], Any]] = {
    "decorrelation": lambda: effcompile.Decorrelation(),
    "decorrelation-unbudgeted": lambda: effcompile.Decorrelation(max_overhead=None),
    "rvjp-0.25": lambda: effcompile.RandomizedVJP(keep=0.25),
    "rvjp-0.5": lambda: effcompile.RandomizedVJP(keep=0.5),
    "rvjp-0.25-profitable": lambda: effcompile.RandomizedVJP(keep=0.25, profitable_only=True),
    "rvjp-0.25-profitable-compiled": lambda: effcompile.RandomizedVJP(keep=0.25, profitable_only="compiled"),
    "rvjp-0.25-uniform": lambda: effcompile.RandomizedVJP(keep=0.25, estimator="uniform"),
    "selection-reforward-0.25": lambda: effcompile.SampleSelection(keep=0.25, mode="reforward", strategy="random"),
    "selection-reuse-0.25": lambda: effcompile.SampleSelection(keep=0.25, mode="auto", strategy="loss"),
    "stages-2": lambda: effcompile.GreedyStages(num_stages=2),
}


COMPILED_CONFIGS = ("rvjp-0.25", "rvjp-0.25-uniform", "rvjp-0.5", "rvjp-0.25-profitable",
                    "rvjp-0.25-profitable-compiled", "decorrelation", "selection-reuse-0.25")


def _predicted(build: Callable[[], nn.Module], config: Any, inputs: Sequence[torch.Tensor],
               compiled: bool = False) -> Optional[float]:
    torch.manual_seed(0)
    model = effcompile.transform(build(), config, example_inputs=tuple(inputs))
    return effcompile.predicted_step(model, compiled=compiled)


def run(models: Sequence[str], configs: Sequence[str], steps: int, compile: bool = False) -> List[Dict[str, Any]]:
    rows = []
    for model_name in models:
        build, make_inputs = MODELS[model_name]
        inputs = make_inputs()
        for config_name in configs:
            config = CONFIGS[config_name]()
            predicted = _predicted(build, config, inputs, compiled=compile)
            result = bench_pass(build, [config], inputs, 10, steps=steps, warmup=5, device="cpu", compile=compile)
            row = {"model": model_name, "config": config_name, "predicted": predicted,
                   "measured": round(result["ratio"], 3),
                   "error": None if predicted is None else round(predicted - result["ratio"], 3),
                   "plain_step_ms": round(result["variants"]["plain"]["median_step_s"] * 1e3, 3),
                   "compiled": compile}
            print(f"{model_name:<16} {config_name:<26} predicted {predicted}  measured {row['measured']:.3f}  "
                  f"(plain {row['plain_step_ms']} ms)", flush=True)
            rows.append(row)
    return rows


def _square_mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def scaling(widths: Sequence[int], batches: Sequence[int], configs: Sequence[str]) -> List[Dict[str, Any]]:
    """Predictions only (no timing): where does each pass pay, as the layers and the batch grow?
    A 3-layer MLP of ``width`` (two width×width layers and a head) at each batch size."""
    rows = []
    for config_name in configs:
        for width in widths:
            for batch in batches:
                predicted = _predicted(lambda: _square_mlp(width), CONFIGS[config_name](), (torch.randn(batch, width),))
                rows.append({"config": config_name, "width": width, "batch": batch, "predicted": predicted})
                print(f"{config_name:<26} width {width:<5} batch {batch:<5} predicted {predicted}", flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks cost_model", description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--configs", default=None, help="comma-separated (default: every configuration; "
                        "with --compile, those with a compiled cost model)")
    parser.add_argument("--compile", action="store_true", help="Inductor-compiled steps, compiled predictions")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--scaling", action="store_true",
                        help="predictions only, over MLP widths and batch sizes (no timing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.configs is None:
        args.configs = ",".join(COMPILED_CONFIGS if args.compile else CONFIGS)
    if args.scaling:
        rows = scaling((128, 256, 512, 1024, 2048, 4096), (32, 128, 512), args.configs.split(","))
        if args.out:
            with open(args.out, "w") as handle:
                json.dump({"rows": rows, "machine": machine_info("cpu")}, handle, indent=1)
        return 0
    rows = run(args.models.split(","), args.configs.split(","), args.steps, compile=args.compile)
    errors = [abs(row["error"]) for row in rows if row["error"] is not None]
    summary = {"rows": rows, "median_abs_error": sorted(errors)[len(errors) // 2] if errors else None,
               "threads": args.threads, "steps": args.steps, "compiled": args.compile, "machine": machine_info("cpu")}
    print(f"median |predicted - measured| = {summary['median_abs_error']}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(summary, handle, indent=1)
    return 0
