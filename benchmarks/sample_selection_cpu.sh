#!/usr/bin/env bash
# Sample selection on the CPU: step-cost ratios vs backprop (eager and compiled) and digits
# time-to-target per strategy (random always included) over 3 seeds.
# Usage: bash benchmarks/sample_selection_cpu.sh [OUT_DIR]   (run with nothing else loading the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
tag="cpu-$(date +%Y-%m-%d)"
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
bench() { "$py" -m benchmarks sample_selection "$@"; }
# --threads 1: on a shared 2-core machine two OpenMP threads per process thrash (50x slower steps seen).
# Step cost: wide MLP (3x32x32 -> 1024 -> 1024 -> 10), batch 256, random strategy, f = 0.5/0.25/0.1, both modes.
bench step_cost --steps 30 --threads 1 --out "$out/$tag-sample-selection-step-cost-eager.json"
bench step_cost --steps 30 --threads 1 --compile --out "$out/$tag-sample-selection-step-cost-compiled.json"
# Digits time-to-target (95% test accuracy), zoo MLP, keep 0.5, 15 epochs, seeds 0/1/2.
bench time_to_target --keep 0.5 --epochs 15 --threads 1 --out "$out/$tag-sample-selection-digits-mlp.json"
bench time_to_target --keep 0.25 --epochs 15 --threads 1 --out "$out/$tag-sample-selection-digits-mlp-keep0.25.json"
bench time_to_target --model cnn --keep 0.5 --epochs 15 --threads 1 --out "$out/$tag-sample-selection-digits-cnn.json"
# The plain `effcompile bench` row (one variant vs backprop, same harness as the other passes):
"${EFFCOMPILE:-.venv/bin/effcompile}" bench --model mlp --passes sample_selection --pass-arg sample_selection.strategy=random \
  --pass-arg sample_selection.keep=0.25 --batch-size 64 --steps 40 --warmup 5 \
  --out "$out/$tag-sample-selection-mlp-keep0.25-eager.json"
