#!/usr/bin/env bash
# Step-time ratio of RandomizedVJP vs plain backprop on the CPU (interleaved, same run, compiled).
# Usage: bash benchmarks/randomized_vjp_cpu.sh [OUT_DIR]   (run with nothing else loading the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
tag="cpu-$(date +%Y-%m-%d)"
mkdir -p "$out"
bin=${EFFCOMPILE:-.venv/bin/effcompile}
# A wide MLP on 3x32x32 inputs at batch 512: GEMMs large enough that sampling overhead is not everything.
for keep in 0.5 0.25 0.1; do
  "$bin" bench --model mlp --model-arg hidden=1024 --in-channels 3 --image-size 32 --batch-size 512 \
    --passes randomized_vjp --pass-arg randomized_vjp.keep=$keep --steps 20 --warmup 3 --compile \
    --out "$out/$tag-randomized_vjp-mlp1024-keep$keep-compiled.json"
done
