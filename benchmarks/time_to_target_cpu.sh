#!/usr/bin/env bash
# Time to a target test accuracy for every pass alone and all four composed, against plain backprop
# with the same seeds, initial weights and data order (`effcompile train --compare --each`), on the
# two bundled real datasets, plus the baselines the papers ask for:
#   * sample selection's random arm (strategy=random, same keep);
#   * a same-FLOPs smaller-batch backprop for the randomized VJP: at its defaults (keep 0.25 of the
#     weight-gradient rows, exact input gradient) a layer's training GEMMs cost 1 + 1 + 0.25 = 2.25
#     of backprop's 3, which plain backprop spends at 3/4 of the batch
#     (benchmarks.randomized_vjp.same_flops_batch);
#   * the randomized VJP's plain estimator (center=false), the paper's, beside the centred default.
# Eager, 3 seeds; training seconds only (evaluation excluded).
# Usage: bash benchmarks/time_to_target_cpu.sh [OUT_DIR]   (run with nothing else loading the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
tag="cpu-$(date +%Y-%m-%d)"
mkdir -p "$out"
bin=${EFFCOMPILE:-.venv/bin/effcompile}
all=decorrelation,randomized_vjp,greedy_stages,sample_selection
common=(--model cnn --lr 0.01 --optimizer sgd --momentum 0.9 --seeds 0,1,2 --target-accuracy 0.95 --no-progress)
run() {  # run NAME DATASET BATCH EPOCHS THREADS ARGS...
  local name=$1 dataset=$2 batch=$3 epochs=$4 threads=$5
  shift 5
  "$bin" train "${common[@]}" --dataset "$dataset" --batch-size "$batch" --epochs "$epochs" --threads "$threads" \
    "$@" --out "$out/$tag-time-to-target-$dataset-$name"
}
for setting in "digits 32 8 1" "mnist5k 64 12 2"; do
  read -r dataset batch epochs threads <<<"$setting"
  run every "$dataset" "$batch" "$epochs" "$threads" --passes "$all" --each --compare
  run selection-random "$dataset" "$batch" "$epochs" "$threads" --passes sample_selection \
    --pass-arg sample_selection.strategy=random
  run randomized-vjp-plain "$dataset" "$batch" "$epochs" "$threads" --passes randomized_vjp \
    --pass-arg randomized_vjp.center=false
  run backprop-same-flops-batch "$dataset" $((batch * 3 / 4)) "$epochs" "$threads" --passes none
done
