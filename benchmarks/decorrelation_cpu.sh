#!/usr/bin/env bash
# Step-time ratio of decorrelated vs plain backprop on the CPU (interleaved, same run).
# Usage: bash benchmarks/decorrelation_cpu.sh [OUT_DIR]   (run with nothing else loading the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
tag="cpu-$(date +%Y-%m-%d)"
mkdir -p "$out"
bin=${EFFCOMPILE:-.venv/bin/effcompile}
for model in mlp cnn; do  # digits-sized inputs (1x8x8), batch 32, as in the demo
  "$bin" bench --model "$model" --passes decorrelation --batch-size 32 --steps 40 --warmup 5 --out "$out/$tag-decorrelation-$model-eager.json"
  "$bin" bench --model "$model" --passes decorrelation --batch-size 32 --steps 40 --warmup 5 --compile --out "$out/$tag-decorrelation-$model-compiled.json"
done
# A realistic layer mix: ResNet-18 (CIFAR stem) on 3x32x32, eager only (CPU Inductor compiles take minutes).
"$bin" bench --model resnet18_cifar --passes decorrelation --in-channels 3 --image-size 32 --batch-size 32 --steps 10 --warmup 2 \
  --out "$out/$tag-decorrelation-resnet18_cifar-eager.json"
