"""Sample-selection benchmarks: step cost against plain backprop and digits time-to-target.

``python -m benchmarks sample_selection step_cost|time_to_target --out FILE`` (see
benchmarks/sample_selection_cpu.sh for the committed settings).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from effcompile.passes.sample_selection import SampleSelection
from effcompile.passes.sample_selection.rewrite import FORWARD_REUSE, REFORWARD

def bench_step_cost(*, keeps=(0.5, 0.25, 0.1), modes=(FORWARD_REUSE, REFORWARD), strategy: str = "random",
                    hidden: int = 1024, image_size: int = 32, in_channels: int = 3, batch_size: int = 256,
                    steps: int = 20, warmup: int = 3, compile: bool = False, backend: str = "effcompile",
                    seed: int = 0, threads: Optional[int] = None) -> Dict[str, Any]:
    """Step time of each (mode, keep) relative to plain backprop, interleaved in one run.

    The model is the zoo MLP widened to ``hidden`` on ``in_channels×image_size²`` inputs, so the
    GEMMs dominate the step.  Limits printed next to each ratio: (1+2f)/3 for forward reuse (needs the
    row-sparse joint pass of the ``effcompile`` backend; without it the backward is full-size) and
    (1+3f)/3 for re-forward.
    """
    from effcompile.api import train_step, transform
    from effcompile.measure import machine_info, time_steps
    from effcompile.models import get_model

    if threads is not None:  # one thread is far less sensitive to other processes on a shared machine
        torch.set_num_threads(threads)
    if compile:
        torch.compiler.reset()
    torch.manual_seed(seed)
    plain = get_model("mlp", in_channels=in_channels, image_size=image_size, hidden=hidden)
    inputs = torch.randn(batch_size, in_channels, image_size, image_size)
    targets = torch.randint(0, 10, (batch_size,))
    variants = {"backprop": plain}
    for mode in modes:
        for keep in keeps:
            model = transform(_copy(plain), SampleSelection(keep=keep, strategy=strategy, mode=mode),
                              example_inputs=(inputs,))
            variants[f"{mode}/keep{keep}"] = model
    calls = {}
    for label, model in variants.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = train_step(model, nn.CrossEntropyLoss(), optimizer, compile=compile, backend=backend)
        calls[label] = lambda step=step: step(inputs, targets)
    time_steps(calls, warmup, block_size=1)
    times = time_steps(calls, steps, block_size=5)
    median = {label: float(torch.tensor(values).median()) for label, values in times.items()}
    # The nominal limits assume backward = 2 × forward and no optimizer step; measure this model's
    # ratios too — compiled like the steps when they are: r = backward/forward and o = optimizer
    # step/forward, which selection cannot shrink: forward reuse (1 + f·r + o)/(1 + r + o),
    # re-forward (1 + f·(1 + r) + o)/(1 + r + o).
    backward_per_forward, optimizer_per_forward = _phase_ratios(plain, inputs, targets, steps,
                                                                backend if compile else None)
    rows = []
    for label in variants:
        row = {"variant": label, "median_step_ms": median[label] * 1e3, "ratio": median[label] / median["backprop"]}
        if label != "backprop":
            mode, keep = label.split("/keep")
            f, r, o = float(keep), backward_per_forward, optimizer_per_forward
            row.update(mode=mode, keep=f, limit_forward_reuse=(1 + 2 * f) / 3, limit_reforward=(1 + 3 * f) / 3,
                       measured_limit_forward_reuse=(1 + f * r + o) / (1 + r + o),
                       measured_limit_reforward=(1 + f * (1 + r) + o) / (1 + r + o))
        rows.append(row)
    return {"kind": "step_cost", "strategy": strategy, "compile": compile, "backend": backend if compile else "eager",
            "model": f"mlp hidden={hidden} input={in_channels}x{image_size}x{image_size}", "batch_size": batch_size,
            "steps": steps, "phases": "compiled" if compile else "eager", "backward_per_forward": backward_per_forward,
            "optimizer_step_per_forward": optimizer_per_forward, "rows": rows,
            "machine": machine_info("cpu"),
            "note": "forward_reuse runs the backward on the k rows only with the effcompile backend's row-sparse "
                    "joint pass (compile=True); in eager mode its backward is full-size"}


def _phase_ratios(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int,
                  backend: Optional[str] = None) -> tuple:
    """(backward, optimizer step) median times over the forward's, for plain backprop on this batch:
    eager, or with the forward and loss compiled by ``backend`` as the compiled steps are (the
    compiled backward graph then runs in ``backward()``).

    The optimizer is the benchmark's SGD with momentum, on a copy of the model (the momentum buffers
    exist after the first step, as in training).
    """
    import time

    from effcompile.compiling import compile_for

    model = _copy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    run = compile_for(model, forward_loss, backend=backend) if backend is not None else forward_loss
    forward_s, backward_s, optimizer_s = [], [], []
    for _ in range(max(5, steps // 2) + 3):  # the first runs compile: dropped below
        start = time.perf_counter()
        loss = run(inputs, targets)
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        optimizer.step()
        optimizer_s.append(time.perf_counter() - end)
        optimizer.zero_grad(set_to_none=True)
        forward_s.append(middle - start)
        backward_s.append(end - middle)
    forward = torch.tensor(forward_s[3:]).median()
    return (float(torch.tensor(backward_s[3:]).median() / forward), float(torch.tensor(optimizer_s[3:]).median() / forward))


def bench_time_to_target(*, strategies=("backprop", "random", "loss", "gradmatch"), seeds=(0, 1, 2), keep: float = 0.5,
                         model: str = "mlp", epochs: int = 15, batch_size: int = 64, lr: float = 0.05,
                         target_accuracy: float = 0.95) -> Dict[str, Any]:
    """Digits: epochs and training seconds to ``target_accuracy`` per strategy and seed (eager steps)."""
    import statistics

    from effcompile.api import transform
    from effcompile.measure import machine_info
    from effcompile.harness.data import load_digits
    from effcompile.models import get_model
    from effcompile.harness.fit import fit

    train, test, info = load_digits()
    runs = []
    for strategy in strategies:
        for seed in seeds:
            torch.manual_seed(seed)
            net = get_model(model, num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size)
            if strategy != "backprop":
                transform(net, SampleSelection(keep=keep, strategy=strategy), example_inputs=(train.tensors[0][:batch_size],))
            result = fit(net, train, test, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=False,
                         target_accuracy=target_accuracy, label=f"{strategy}/seed{seed}", group=strategy)
            runs.append({"strategy": strategy, "seed": seed, "target_epoch": result.target_epoch,
                         "target_seconds": result.target_seconds, "final_accuracy": result.final_accuracy,
                         "best_accuracy": result.best_accuracy, "seconds_per_epoch": result.seconds_per_epoch,
                         "accuracy_by_epoch": [m.test_accuracy for m in result.history]})
    summary = {}
    for strategy in strategies:
        mine = [run for run in runs if run["strategy"] == strategy]
        reached = [run for run in mine if run["target_epoch"] is not None]

        def spread(key, values=None):
            values = [run[key] for run in (values if values is not None else mine)]
            return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)} if values else None

        summary[strategy] = {"reached": f"{len(reached)}/{len(mine)}", "epochs_to_target": spread("target_epoch", reached),
                             "seconds_to_target": spread("target_seconds", reached),
                             "final_accuracy": spread("final_accuracy"), "seconds_per_epoch": spread("seconds_per_epoch")}
    return {"kind": "time_to_target", "dataset": "digits", "model": model, "keep": keep, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "optimizer": "sgd momentum 0.9", "target_accuracy": target_accuracy,
            "seeds": list(seeds), "summary": summary, "runs": runs, "machine": machine_info("cpu")}


def bench_selection(part: str = "all", **kwargs: Any) -> Dict[str, Any]:
    """``part``: ``"step_cost"``, ``"time_to_target"`` or ``"all"`` (keyword arguments go to the part)."""
    if part == "step_cost":
        return bench_step_cost(**kwargs)
    if part == "time_to_target":
        return bench_time_to_target(**kwargs)
    return {"step_cost": bench_step_cost(), "time_to_target": bench_time_to_target()}


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import json
    import warnings

    parser = argparse.ArgumentParser(description="Sample-selection benchmarks (step cost, digits time-to-target)")
    parser.add_argument("part", choices=("step_cost", "time_to_target"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.part == "step_cost":
        result = bench_step_cost(compile=args.compile, steps=args.steps, threads=args.threads)
        for row in result["rows"]:
            limits = "" if row["variant"] == "backprop" else \
                (f"  limits: reuse (1+2f)/3={row['limit_forward_reuse']:.3f}  reforward (1+3f)/3={row['limit_reforward']:.3f}"
                 f"  with measured ({result['phases']}) bwd/fwd={result['backward_per_forward']:.2f}, "
                 f"optimizer/fwd={result['optimizer_step_per_forward']:.2f}: reuse "
                 f"{row['measured_limit_forward_reuse']:.3f} reforward {row['measured_limit_reforward']:.3f}")
            print(f"{row['variant']:<26} {row['median_step_ms']:9.2f} ms  ratio {row['ratio']:.3f}{limits}")
    else:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        result = bench_time_to_target(keep=args.keep, epochs=args.epochs, model=args.model)
        for strategy, stats in result["summary"].items():
            print(strategy, json.dumps(stats))
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
