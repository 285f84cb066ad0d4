"""Is the planned rewrite really there?  The randomized VJP through ``train_step(compile=True)`` in
the cases users meet: fp32, bf16/fp16 autocast, a batch-size change (a partial last batch),
``dynamic=True``, composed with sample selection, and eager under autocast.

For each case: how many backward GEMMs the joint pass rewrote, whether two gradient draws on the
same batch differ (a sketch is random; exact backprop is not), and the relative error of the mean
of ``draws`` gradients against the exact gradient (unbiased: it shrinks like 1/√draws).

``python -m benchmarks rewrite_coverage [--draws 40] [--backend effcompile] --out FILE``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import warnings

# Count the joint-graph rewrites of every compile: a cache hit would skip the joint pass.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.passes.joint import recording


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _batch(rows: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 32, generator=generator), torch.randint(0, 10, (rows,), generator=generator)


def _gradient(model: nn.Module) -> torch.Tensor:
    return torch.cat([model[i].weight.grad.flatten().float() for i in (0, 2, 4)])


def _exact(x, y, autocast: Optional[torch.dtype]) -> torch.Tensor:
    model = _mlp()
    with _autocast(autocast):
        F.cross_entropy(model(x), y).backward()
    return _gradient(model)


def _autocast(dtype: Optional[torch.dtype]):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


CASES = {
    "fp32": dict(),
    "bf16 autocast": dict(autocast=torch.bfloat16),
    "fp16 autocast": dict(autocast=torch.float16),
    "batch 64 -> 40 -> 64": dict(batches=(64, 40, 64)),
    "dynamic=True": dict(dynamic=True),
    "composed with selection": dict(selection=True),
    "composed with selection + batch change": dict(selection=True, batches=(64, 40, 64)),
    "eager + bf16 autocast": dict(autocast=torch.bfloat16, compiled=False),
}


def run_case(name: str, draws: int, backend: str, autocast: Optional[torch.dtype] = None, batches: Sequence[int] = (64,),
             dynamic: Optional[bool] = None, selection: bool = False, compiled: bool = True) -> Dict[str, Any]:
    torch.compiler.reset()
    model = _mlp()
    configs = [effcompile.RandomizedVJP(keep=0.25)]
    if selection:  # random subsets weighted 1/k: still unbiased for the full-batch gradient
        configs.append(effcompile.SampleSelection(keep=0.5, strategy="random"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, *configs, example_inputs=(_batch(64)[0],))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # gradients only: the weights never move
    record: Dict[str, Any] = {"case": name}
    try:
        if dynamic is None:
            step = effcompile.train_step(model, nn.CrossEntropyLoss(), optimizer, compile=compiled, backend=backend)
        else:  # the user's own loop around torch.compile(model, dynamic=...)
            forward = torch.compile(model, backend=backend, dynamic=dynamic)

            def step(x, y):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(forward(x), y).backward()
        with recording() as log:
            for rows in batches[:-1]:
                x, y = _batch(rows)
                with _autocast(autocast):
                    step(x, y)
            x, y = _batch(batches[-1])
            samples: List[torch.Tensor] = []
            for _ in range(draws):
                with _autocast(autocast):
                    step(x, y)
                samples.append(_gradient(model))
        stacked = torch.stack(samples)
        exact = _exact(x, y, autocast)
        record.update(
            rewrites=[results["randomized_vjp"].rewrites for results in log],
            draws_differ=bool((stacked[0] - stacked[1]).abs().max() > 0),
            mean_rel_error=float((stacked.mean(0) - exact).norm() / exact.norm()),
            single_draw_rel_error=float((stacked[0] - exact).norm() / exact.norm()),
        )
        # Sketched: the joint pass rewrote GEMMs in every graph that ran (or, eager, the draws differ
        # although nothing else is random), and the mean of the draws approaches the exact gradient.
        rewritten = all(count > 0 for count in record["rewrites"]) if record["rewrites"] else not compiled
        record["sketched"] = (rewritten and record["draws_differ"]
                              and record["mean_rel_error"] < 0.5 * record["single_draw_rel_error"])
    except Exception as error:  # a loud failure is a valid outcome; a silent exact gradient is not
        record.update(error=f"{type(error).__name__}: {str(error)[:300]}")
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks rewrite_coverage", description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--backend", default="effcompile")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.cases.split(","):
        record = run_case(name, args.draws, args.backend, **CASES[name])
        rows.append(record)
        print(json.dumps(record), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"backend": args.backend, "draws": args.draws, "torch": torch.__version__, "cases": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
