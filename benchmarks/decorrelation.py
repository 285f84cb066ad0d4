"""Decorrelation micro-benchmark: time of one R update, old formula vs the cost rule's, same run.

``python -m benchmarks decorrelation update [--blocks 64,256,1024] [--rows-per-dim 4] [--out FILE]``

"old" is the formula used before the cost rule (``rows`` for n < b, else ``gram``: 2·n·b² + b³);
"new" is what :func:`update_formula` picks (``covariance``, n·b² + 3·b³, for n > 2·b).  The two
are timed in alternating rounds on the same rows and the same R, and the largest difference of
the updated R is reported (both are exact: it is fp32 rounding).  Step-level effect of the pass:
benchmarks/decorrelation_cpu.sh.
"""

from __future__ import annotations

import math
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
            transform(layer, Decorrelation(lr=0.01, rows_per_dim=rows_per_dim, max_block_size=b),
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


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Decorrelation R-update time, old formula vs cost rule")
    parser.add_argument("part", choices=("update",))
    parser.add_argument("--blocks", default="64,128,256,512,1024")
    parser.add_argument("--rows-per-dim", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = bench_update(blocks=[int(b) for b in args.blocks.split(",")], rows_per_dim=args.rows_per_dim,
                          rounds=args.rounds, threads=args.threads)
    print(f"threads={result['threads']}  rows_per_dim={result['rows_per_dim']}")
    print(f"{'b':>5} {'n':>6} {'old':>6} {'new':>10} {'old ms':>8} {'new ms':>8} {'old/new':>8} {'MACs':>6} {'max|ΔR|':>9}")
    for row in result["rows"]:
        print(f"{row['b']:>5} {row['n']:>6} {row['old']:>6} {row['new']:>10} {row['old_ms']:>8.3f} {row['new_ms']:>8.3f} "
              f"{row['ratio_old_over_new']:>8.2f} {row['mac_ratio_old_over_new']:>6.2f} {row['max_abs_difference']:>9.1e}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0
