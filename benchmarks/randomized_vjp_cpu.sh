#!/usr/bin/env bash
# Benchmark rows of RandomizedVJP vs plain backprop on the CPU (run with nothing else loading the machine).
# Usage: bash benchmarks/randomized_vjp_cpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
tag="cpu-$(date +%Y-%m-%d)-randomized_vjp"
mkdir -p "$out"
bin=${EFFCOMPILE:-.venv/bin/effcompile}
py=${PYTHON:-.venv/bin/python}
# 1. Whole-step ratio through the CLI (effcompile bench): a wide MLP on 3x32x32 inputs at batch 512.
for keep in 0.5 0.25 0.1; do
  "$bin" bench --model mlp --model-arg hidden=1024 --in-channels 3 --image-size 32 --batch-size 512 \
    --passes randomized_vjp --pass-arg randomized_vjp.keep=$keep --steps 20 --warmup 3 --compile \
    --out "$out/$tag-mlp1024-keep$keep-compiled.json"
done
# 2. Whole-step and backward-only ratios at keep .5/.25/.1, compiled with backend="effcompile" (Inductor).
"$py" -m benchmarks randomized_vjp steps --model mlp1024 --in-channels 3 --image-size 32 --batch-size 512 \
  --out "$out/$tag-steps-mlp1024.json"
"$py" -m benchmarks randomized_vjp steps --model vit192 --batch-size 128 --out "$out/$tag-steps-vit192.json"
# 2b. Eager: the scope mode around nn.MultiheadAttention (keep 1 = its overhead alone, and keep 0.25).
for batch in 32 128; do
  "$py" -m benchmarks randomized_vjp scope --batch-size $batch --keep 0.25 --steps 30 \
    --out "$out/$tag-eager-scope-b$batch.json"
done
# 3. Saved-for-backward bytes, exact vs memory mode (keep 0.25).
"$py" -m benchmarks randomized_vjp memory --model mlp1024 --in-channels 3 --image-size 32 --batch-size 512 \
  --out "$out/$tag-memory-mlp1024.json"
"$py" -m benchmarks randomized_vjp memory --model vit --batch-size 64 --out "$out/$tag-memory-vit.json"
# 4. Epochs / seconds to 90 % digits accuracy: exact, keep 0.25, and the same-FLOPs smaller batch.
"$py" -m benchmarks randomized_vjp accuracy --model vit --keep 0.25 --target 0.9 --epochs 10 --seeds 0 1 \
  --out "$out/$tag-accuracy-vit.json"
"$py" -m benchmarks randomized_vjp accuracy --model mlp --keep 0.25 --target 0.95 --epochs 10 --seeds 0 1 \
  --out "$out/$tag-accuracy-mlp.json"
