"""``python -m benchmarks <name> [args...]``: the one entry point of every benchmark."""

from __future__ import annotations

import importlib
import sys

# name → module of this package with a ``main(argv)``.
BENCHMARKS = {
    "suite": "every pass alone and composed vs backprop: step time, memory, accuracy over seeds",
    "randomized_vjp": "sketched step/backward ratios, saved memory, digits accuracy",
    "greedy_stages": "staged vs backprop step time, activation memory, digits accuracy",
    "sample_selection": "step cost vs backprop per (mode, keep), digits time-to-target per strategy",
    "decorrelation": "a step vs backprop and a decorbp-style reference under budgets (cost model checked); one R update by formula",
    "stage_scaling": "K stages x D replicas vs DDP backprop at equal process counts (gloo); predicted 8/64-GPU rates",
    "rewrite_coverage": "is the randomized VJP really applied under autocast, batch changes, dynamic, composition",
    "cost_model": "each pass's Plan prediction (predicted_step) beside the measured eager step ratio",
    "architectures": "every technique on Hugging Face architectures beyond the test zoo, eager or compiled (a smoke survey)",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print("usage: python -m benchmarks {" + ",".join(BENCHMARKS) + "} [args...]\n", file=sys.stderr)
        for name, what in BENCHMARKS.items():
            print(f"  {name:<17} {what}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
