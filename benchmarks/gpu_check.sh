#!/usr/bin/env bash
# One short GPU lease, everything a CPU cannot show, in about 9 minutes (run it with timeout_s 590):
#   1. Decorrelation() against backprop and the decorbp-style reference, ResNet-18 (width 64,
#      batch 256, bf16 autocast), eager: does the budgeted default pay on a GPU?
#   2. The suite's step-time ratios of every pass and the composition, ResNet-18 and ViT-tiny at
#      batch 256 under bf16 autocast, eager; then compiled (Inductor/Triton) for the passes whose
#      point is wall-clock (each compile costs tens of seconds, so not all of them fit).
#      Then the randomized VJP's two samplers against one exact arm on a wide MLP (compiled, bf16).
#   3. The test suite under the machine's torch (2.11 on the lent H100/H200), pinned to other
#      cores than the timings so it disturbs them little.
# Usage on the device machine (no network; torch, triton, onnx preinstalled):
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Every part has its own time limit and writes its own file, so one failing part loses only itself.
set -u
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cores=$(nproc)
bench_cores="0-$((cores * 5 / 8 - 1))"
test_cores="$((cores * 5 / 8))-$((cores - 1))"
test_workers=$((cores - cores * 5 / 8))
pin() { if command -v taskset >/dev/null; then taskset -c "$@"; else shift; "$@"; fi; }

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/machine.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$OUT/machine.txt" 2>&1

# -v: every test's outcome is in the log as it finishes, so a run stopped at its limit still names its failures.
( pin "$test_cores" timeout "${TEST_LIMIT:-440}" python3 -m pytest -v -p no:logging -p no:cacheprovider \
    -n "$test_workers" tests >"$OUT/tests.log" 2>&1; echo "pytest exit $?" >>"$OUT/tests.log" ) &

bench() {  # bench LIMIT NAME ARGS...: one benchmark on the timing cores, its log kept
  local limit=$1 name=$2
  shift 2
  echo "== $name"
  pin "$bench_cores" timeout "$limit" python3 -m benchmarks "$@" >"$OUT/$name.log" 2>&1
  echo "$name exit $?" | tee -a "$OUT/$name.log"
  tail -n 25 "$OUT/$name.log"
}

bench 70 decorrelation-step-eager decorrelation step --device cuda --autocast bf16 --width 64 --batch-size 256 \
  --budgets auto,none --update-dtypes auto,float32 --structures auto,blocks --rounds 10 --steps-per-round 5 \
  --out "$OUT/decorrelation-step-eager.json"
bench 90 suite-eager suite --preset gpu --modes eager --timing-only --out "$OUT/suite-eager"
bench 150 suite-compiled-resnet18 suite --preset gpu --model resnet18_cifar --modes compiled \
  --configs decorrelation,randomized_vjp --timing-only --out "$OUT/suite-compiled-resnet18"
bench 120 suite-compiled-vit suite --preset gpu --model vit_tiny --modes compiled \
  --configs randomized_vjp,sample_selection --timing-only --out "$OUT/suite-compiled-vit"
# What the sampler costs on a GPU: importance (~60 ATen ops a layer: CUDA keeps the torch kernel) against uniform (4), same exact arm.
bench 100 rvjp-estimators-mlp1024 randomized_vjp steps --model mlp1024 --in-channels 3 --image-size 32 \
  --batch-size 1024 --keeps 0.25 --estimators importance,uniform --device cuda --autocast bf16 \
  --out "$OUT/rvjp-estimators-mlp1024.json"
wait
grep -cE " PASSED" "$OUT/tests.log" | sed 's/^/tests passed: /'
grep -E " (FAILED|ERROR) " "$OUT/tests.log" | sed 's/^\[gw[0-9]*\] *\[ *[0-9]*%\] *//' | sort -u
tail -n 3 "$OUT/tests.log"
