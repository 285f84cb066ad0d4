"""Decorrelation benchmarks: a training step against backprop, and one R update.

``python -m benchmarks decorrelation step [--model resnet18_cifar --width 32 --batch-size 128] [--out FILE]``

One training step (SGD, eager) of plain backprop, of a decorbp-style reference written plainly
here (:class:`ReferenceDecorrelation`: a dense d×d R per layer, fused W·R for convolutions,
unfused for linears, statistics from every patch of a random 10% of the batch's images, updated
after every step), and of ``Decorrelation`` under several budgets (``auto``, the default; fixed
budgets; ``none``: the knobs as given, the old default), all timed in interleaved rounds in one
process.  Each effcompile variant also reports the overhead its Plan predicted (``model_overhead``),
so the cost model is checked against the measured step ratio.

``python -m benchmarks decorrelation update [--blocks 64,256,1024] [--rows-per-dim 4] [--out FILE]``

"old" is the formula used before the cost rule (``rows`` for n < b, else ``gram``: 2·n·b² + b³);
"new" is what :func:`update_formula` picks (``covariance``, n·b² + 3·b³, for n > 2·b).  The two
are timed in alternating rounds on the same rows and the same R, and the largest difference of
the updated R is reported (both are exact: it is fp32 rounding).  Step-level effect of the pass:
benchmarks/decorrelation_cpu.sh.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import statistics
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn


def _old_formula(n: int, b: int) -> str:
    return "rows" if n < b else "gram"


def bench_update(*, blocks: Sequence[int] = (64, 128, 256, 512, 1024), rows_per_dim: float = 4.0,
                 rounds: int = 15, threads: Optional[int] = None, seed: int = 0) -> Dict[str, Any]:
    from effcompile.api import transform
    from effcompile.measure import machine_info
    from effcompile.passes.decorrelation import Decorrelation, decorrelation_states
    from effcompile.passes.decorrelation.state import update_formula, update_macs

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rows_out: List[Dict[str, Any]] = []
    for b in blocks:
        layer = nn.Linear(b, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transform(layer, Decorrelation(rows_per_dim=rows_per_dim, max_block_size=b, input_layers=True),
                      example_inputs=(torch.randn(2, b),))
        state = decorrelation_states(layer)["<root>"]
        with torch.no_grad():
            state.matrix.add_(0.1 * torch.randn_like(state.matrix) / math.sqrt(b))
        start = state.matrix.clone()
        n = state.num_rows
        rows = state._sample_rows(torch.randn(n, b) @ (torch.eye(b) + 0.3 * torch.randn(b, b) / math.sqrt(b)))
        old, new = _old_formula(n, b), update_formula(n, b)
        times: Dict[str, List[float]] = {old: [], new: []} if old != new else {old: []}
        results = {}
        with torch.no_grad():
            for round_ in range(rounds + 2):  # two warm-up rounds
                for formula in (times if round_ % 2 == 0 else reversed(list(times))):
                    state.matrix.copy_(start)
                    began = time.perf_counter()
                    state._update(rows, True, formula)
                    elapsed = time.perf_counter() - began
                    if round_ >= 2:
                        times[formula].append(elapsed)
                    results[formula] = state.matrix.clone()
        old_ms = 1e3 * statistics.median(times[old])
        new_ms = 1e3 * statistics.median(times[new])
        rows_out.append({
            "b": b, "n": n, "old": old, "new": new, "old_ms": old_ms, "new_ms": new_ms,
            "ratio_old_over_new": old_ms / new_ms,
            "mac_ratio_old_over_new": update_macs(old, n, b) / update_macs(new, n, b),
            "max_abs_difference": float((results[old] - results[new]).abs().max()),
        })
    return {"machine": machine_info(), "threads": torch.get_num_threads(), "rows_per_dim": rows_per_dim,
            "rows": rows_out}


class ReferenceDecorrelation(nn.Module):
    """A decorbp-style layer, written plainly as the baseline: ``y = layer(R·x)`` with a dense
    d×d R, fused into the weight for convolutions (one conv with W·R), applied to the input for
    linears; ``update()`` after the optimizer step takes every patch of a random ``fraction`` of
    the last batch's images and steps ``R ← R − η[(1−κ)·C·R + κ·diag(v)·R]`` (C: off-diagonal
    second moment of z = R·x, v = mean(z²) − 1).  Only ungrouped convolutions."""

    def __init__(self, layer: nn.Module, lr: float, kappa: float, fraction: float) -> None:
        super().__init__()
        self.layer, self.lr, self.kappa, self.fraction = layer, lr, kappa, fraction
        d = layer.weight[0].numel()
        self.register_buffer("matrix", torch.eye(d, device=layer.weight.device))
        self._inputs: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        if self.training:
            keep = max(1, math.ceil(self.fraction * x.shape[0]))
            self._inputs = x.detach()[torch.randperm(x.shape[0], device=x.device)[:keep]]
        layer, matrix = self.layer, self.matrix
        if isinstance(layer, nn.Conv2d):
            weight = (layer.weight.reshape(layer.weight.shape[0], -1) @ matrix).view_as(layer.weight)
            return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x @ matrix.t(), layer.weight, layer.bias)

    @torch.no_grad()
    def update(self) -> None:
        import torch.nn.functional as F

        if self._inputs is None:
            return
        layer, x = self.layer, self._inputs
        if isinstance(layer, nn.Conv2d):
            patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = x.reshape(-1, x.shape[-1])
        z = rows.to(self.matrix.dtype) @ self.matrix.t()  # inputs saved under autocast are bf16
        second_moment = z.t() @ z / z.shape[0]
        variance = torch.diagonal(second_moment)
        off_diagonal = second_moment - torch.diag(variance)
        step = (1 - self.kappa) * off_diagonal @ self.matrix + self.kappa * (variance - 1).unsqueeze(1) * self.matrix
        self.matrix.sub_(self.lr * step)
        self._inputs = None


def reference_decorrelated(model: nn.Module, lr: float = 1e-3, kappa: float = 0.5, fraction: float = 0.1) -> List[ReferenceDecorrelation]:
    """Wrap every ungrouped Conv2d and every Linear of ``model`` in place; returns the wrappers."""
    wrappers = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d) and child.groups == 1):
                wrapper = ReferenceDecorrelation(child, lr, kappa, fraction)
                setattr(module, child_name, wrapper)
                wrappers.append(wrapper)
    return wrappers


def bench_step(*, model: str = "resnet18_cifar", width: int = 32, batch_size: int = 128, image_size: int = 32,
               in_channels: int = 3, budgets: Sequence[str] = ("auto", "0.15", "0.4", "none"), rounds: int = 5,
               steps_per_round: int = 2, threads: Optional[int] = None, seed: int = 0,
               compile: bool = False, device: str = "cpu", autocast: Optional[str] = None,
               update_dtypes: Sequence[str] = ("auto",), input_layers: Sequence[bool] = (False,),
               structures: Sequence[str] = ("auto",)) -> Dict[str, Any]:
    """Interleaved step times of backprop, the decorbp-style reference and ``Decorrelation`` at each
    budget (and each ``update_dtype`` of ``update_dtypes``: one variant per pair).  ``compile``:
    every model's forward and backward through ``torch.compile(backend="effcompile")`` (Inductor;
    the reference's Python-side update cannot be, so it is left out);
    the compilation happens in the warm-up, outside the timed rounds, and is reported apart.
    ``autocast``: "bf16" runs forward and loss under ``torch.autocast``.  ``input_layers``: the
    ``Decorrelation.input_layers`` values (``True`` adds variants with the stem decorrelated too,
    as the reference does).  ``structures``: the ``Decorrelation.structure`` values (``blocks``
    against the default ``auto``, which takes the Kronecker R where the budget would cut a patch)."""
    import torch.nn.functional as F

    from effcompile import models
    from effcompile.api import report, transform
    from effcompile.harness.fit import autocast_context
    from effcompile._compat import native_bf16_matmul
    from effcompile.measure import machine_info, synchronize
    from effcompile.passes.decorrelation import Decorrelation

    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device)

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return models.get_model(model, in_channels=in_channels, image_size=image_size, width=width).to(device)

    x = torch.randn(batch_size, in_channels, image_size, image_size).to(device)
    y = torch.randint(0, 10, (batch_size,)).to(device)
    variants: Dict[str, Dict[str, Any]] = {"backprop": {"model": build(), "after": lambda: None}}
    if not compile:
        reference = build()
        wrappers = reference_decorrelated(reference)
        variants["reference"] = {"model": reference, "after": lambda: [w.update() for w in wrappers]}
    for budget, update_dtype, inputs_too, structure in itertools.product(budgets, update_dtypes, input_layers,
                                                                         structures):
        max_overhead = None if budget == "none" else budget if budget == "auto" else float(budget)
        transformed = build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transform(transformed, Decorrelation(max_overhead=max_overhead, update_dtype=update_dtype,
                                                 input_layers=inputs_too, structure=structure), example_inputs=(x,))
        rows = [row for row in report(transformed) if row.applied]
        predicted = rows[0].details.get("model_overhead") if rows else None
        name = (f"effcompile max_overhead={budget}" + (f" {update_dtype}" if len(update_dtypes) > 1 else "")
                + (" input_layers" if inputs_too else "") + (f" {structure}" if len(structures) > 1 else ""))
        variants[name] = {"model": transformed, "after": lambda: None, "predicted_overhead": predicted,
                          "update_dtypes": sorted({row.details.get("update_dtype") for row in rows} - {None}),
                          "structures": dict(collections.Counter(row.details.get("structure") for row in rows))}
    for variant in variants.values():
        variant["optimizer"] = torch.optim.SGD(variant["model"].parameters(), lr=0.01, momentum=0.9)
        variant["times"] = []
        variant["forward"] = torch.compile(variant["model"], backend="effcompile") if compile else variant["model"]

    def step(variant: Dict[str, Any]) -> None:
        variant["optimizer"].zero_grad(set_to_none=True)
        with autocast_context(autocast, device):
            loss = F.cross_entropy(variant["forward"](x), y)
        loss.backward()
        variant["optimizer"].step()
        variant["after"]()

    for variant in variants.values():  # warm-up (and the compilation, timed apart)
        synchronize(device)
        began = time.perf_counter()
        step(variant)
        synchronize(device)
        variant["first_step_s"] = time.perf_counter() - began
        step(variant)
    for round_ in range(rounds):
        order = list(variants.values()) if round_ % 2 == 0 else list(reversed(list(variants.values())))
        for variant in order:
            synchronize(device)
            began = time.perf_counter()
            for _ in range(steps_per_round):
                step(variant)
            synchronize(device)
            variant["times"].append((time.perf_counter() - began) / steps_per_round)
    base = statistics.median(variants["backprop"]["times"])
    out = []
    for name, variant in variants.items():
        seconds = statistics.median(variant["times"])
        out.append({"variant": name, "step_s": seconds, "vs_backprop": seconds / base,
                    "predicted_overhead": variant.get("predicted_overhead"),
                    "update_dtypes": variant.get("update_dtypes"), "structures": variant.get("structures"),
                    "first_step_s": variant["first_step_s"], "times": variant["times"]})
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"machine": machine_info(device), "device": str(device), "autocast": autocast,
            "threads": torch.get_num_threads(), "load_average": load,
            "model": model, "width": width, "batch_size": batch_size, "image_size": image_size,
            "rounds": rounds, "steps_per_round": steps_per_round, "mode": "compiled" if compile else "eager",
            "native_bf16_matmul": native_bf16_matmul(device),
            "variants": out}


SCHEDULE_MODELS = ("digits-mlp", "mlp512")


def bench_schedule(model: str, rounds: int = 30, steps_per_round: int = 16) -> dict:
    """train_step(compile=True) with ``update_every > 1``: the update computed every step and masked
    (what a user's own compiled loop runs; forced with ``MAX_SCHEDULE_PATTERNS = 0``) against
    train_step's schedule (a graph with the update and one without), against plain backprop."""
    import copy
    import statistics
    import warnings

    import torch.nn.functional as F

    import effcompile
    from effcompile import compiling
    from effcompile.models import get_model

    torch.manual_seed(0)
    if model == "digits-mlp":  # the zoo MLP at digits' shape; the defaults' budget picks the interval
        base, shape = get_model("mlp", num_classes=10, in_channels=1, image_size=8), (32, 1, 8, 8)
        config = effcompile.Decorrelation()
    else:
        base, shape = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)), (128, 512)
        config = effcompile.Decorrelation(update_every=4, max_overhead=None, input_layers=True)
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    arms = {}
    for arm in ("plain", "masked", "scheduled"):
        copied = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if arm != "plain":
                effcompile.transform(copied, config, example_inputs=(x,))
        limit = compiling.MAX_SCHEDULE_PATTERNS
        compiling.MAX_SCHEDULE_PATTERNS = 0 if arm == "masked" else limit
        try:
            step = effcompile.train_step(copied, F.cross_entropy, torch.optim.SGD(copied.parameters(), lr=0.01),
                                         compile=True, backend="effcompile")
        finally:
            compiling.MAX_SCHEDULE_PATTERNS = limit
        for _ in range(20):  # compiles every schedule pattern
            step(x, y)
        arms[arm] = (step, copied)
    times = {arm: [] for arm in arms}
    for _ in range(rounds):
        for arm, (step, _) in arms.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step(x, y)
            times[arm].append((time.perf_counter() - start) / steps_per_round)
    median = {arm: statistics.median(values) for arm, values in times.items()}
    scheduled = arms["scheduled"][1]
    return {"model": model, "threads": torch.get_num_threads(),
            "intervals": sorted({m.update_every for m in scheduled.modules() if hasattr(m, "update_every")}),
            "ms": {arm: round(1e3 * value, 3) for arm, value in median.items()},
            "vs_plain": {arm: round(value / median["plain"], 3) for arm, value in median.items()},
            "predicted_compiled": effcompile.predicted_step(scheduled, compiled=True)}


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Decorrelation R-update time, old formula vs cost rule")
    parser.add_argument("part", choices=("step", "update", "schedule"))
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--budgets", default="auto,0.15,0.4,none", help="max_overhead values ('none': no budget)")
    parser.add_argument("--input-layers", default="false",
                        help="step: Decorrelation.input_layers values, e.g. false,true (true: the stem too)")
    parser.add_argument("--update-dtypes", default="auto", help="step: Decorrelation.update_dtype values, e.g. auto,float32")
    parser.add_argument("--structures", default="auto", help="step: Decorrelation.structure values, e.g. auto,blocks")
    parser.add_argument("--blocks", default="64,128,256,512,1024")
    parser.add_argument("--rows-per-dim", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: step 5, update 15)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    parser.add_argument("--compile", action="store_true", help="step: torch.compile(backend='effcompile') every model")
    parser.add_argument("--device", default="cpu", help="step: cpu or cuda")
    parser.add_argument("--autocast", choices=("bf16",), default=None, help="step: forward and loss under autocast")
    parser.add_argument("--steps-per-round", type=int, default=2, help="step: steps timed together per round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.part == "schedule":  # --model digits-mlp or mlp512
        if args.threads:
            torch.set_num_threads(args.threads)
        result = bench_schedule(args.model if args.model in SCHEDULE_MODELS else SCHEDULE_MODELS[0], rounds=args.rounds or 30)
        print(json.dumps(result))
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(result, handle, indent=2)
        return 0
    if args.part == "step":
        result = bench_step(model=args.model, width=args.width, batch_size=args.batch_size, image_size=args.image_size,
                            in_channels=args.in_channels, budgets=args.budgets.split(","), rounds=args.rounds or 5,
                            threads=args.threads, compile=args.compile, device=args.device,
                            autocast=args.autocast, steps_per_round=args.steps_per_round,
                            update_dtypes=args.update_dtypes.split(","),
                            input_layers=[value.strip().lower() == "true" for value in args.input_layers.split(",")],
                            structures=args.structures.split(","))
        print(f"{result['model']} width {result['width']}, batch {result['batch_size']}, {result['mode']}, "
              f"threads={result['threads']}, load {result['load_average']}")
        print(f"{'variant':<40} {'step s':>8} {'vs backprop':>12} {'predicted':>10} {'first step s':>13}")
        for row in result["variants"]:
            print(f"{row['variant']:<40} {row['step_s']:>8.3f} {row['vs_backprop']:>11.2f}x "
                  f"{row['predicted_overhead'] or '':>10} {row['first_step_s']:>13.1f}")
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(result, handle, indent=2)
        return 0
    result = bench_update(blocks=[int(b) for b in args.blocks.split(",")], rows_per_dim=args.rows_per_dim,
                          rounds=args.rounds or 15, threads=args.threads)
    print(f"threads={result['threads']}  rows_per_dim={result['rows_per_dim']}")
    print(f"{'b':>5} {'n':>6} {'old':>6} {'new':>10} {'old ms':>8} {'new ms':>8} {'old/new':>8} {'MACs':>6} {'max|ΔR|':>9}")
    for row in result["rows"]:
        print(f"{row['b']:>5} {row['n']:>6} {row['old']:>6} {row['new']:>10} {row['old_ms']:>8.3f} {row['new_ms']:>8.3f} "
              f"{row['ratio_old_over_new']:>8.2f} {row['mac_ratio_old_over_new']:>6.2f} {row['max_abs_difference']:>9.1e}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0
