#!/usr/bin/env bash
# Greedy local-loss stages (DGL) on sklearn digits: K=1 (backprop), 2, 4 for the small CNN and a
# width-16 ResNet-18 (CIFAR stem), 3 seeds each: final test accuracy, saved-activation bytes per
# stage vs backprop, single-process step-time ratio.
# Usage: bash benchmarks/greedy_stages_cpu.sh [OUT_DIR] [EPOCHS]  (run with nothing else loading the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
epochs=${2:-15}
tag="cpu-$(date +%Y-%m-%d)"
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
for model in cnn resnet18_cifar; do
  "$py" -m benchmarks greedy_stages --models "$model" --stages 1 2 4 --seeds 0 1 2 --epochs "$epochs" \
    --batch-size 64 --lr 0.05 --out "$out/$tag-greedy-stages-$model.json"
done
