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
# The structure of R on ResNet-18 (width 32, batch 128): the default "auto" (Kronecker R_channel ⊗
# R_spatial where the budget would cut a 3x3 patch into blocks) against blocks only and Kronecker on
# every 3x3 convolution, interleaved with backprop and the decorbp-style reference; then compiled.
for mode in eager compiled; do
  flags=(--rounds 8); [ "$mode" = compiled ] && flags=(--compile --rounds 12)
  ${PYTHON:-.venv/bin/python} -m benchmarks decorrelation step --budgets auto --structures auto,blocks,kronecker \
    --threads 2 "${flags[@]}" --out "$out/$tag-decorrelation-step-resnet18w32-$mode-structures.json"
done
# Time to target with the defaults a user gets (`Decorrelation()`), against backprop with the same
# seeds, weights and data order, and with the input layer decorrelated too (`input_layers=true`).
# Eager, 3 seeds, training seconds only.  The MLP on mnist5k is where the input layer matters.
for setting in "digits mlp 32 10 1 0.95" "digits cnn 32 8 1 0.95" "mnist5k mlp 64 8 2 0.92" "mnist5k cnn 64 12 2 0.95"; do
  read -r dataset model batch epochs threads target <<<"$setting"
  common=(train --model "$model" --dataset "$dataset" --batch-size "$batch" --epochs "$epochs" --threads "$threads"
          --lr 0.01 --optimizer sgd --momentum 0.9 --seeds 0,1,2 --target-accuracy "$target" --no-progress --passes decorrelation)
  "$bin" "${common[@]}" --compare --out "$out/$tag-decorrelation-time-to-target-$dataset-$model"
  "$bin" "${common[@]}" --pass-arg decorrelation.input_layers=true \
    --out "$out/$tag-decorrelation-time-to-target-$dataset-$model-input-layers"
done
