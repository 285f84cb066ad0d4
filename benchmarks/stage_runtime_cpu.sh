#!/usr/bin/env bash
# Greedy stages as real processes (effcompile.passes.greedy_stages.runtime) on the CPU.
#  1. throughput: K=2 stage processes (1 torch thread each) vs single-process backprop with the same
#     total cores (K threads) and with 1 thread, and the single-process greedy step, CNN (32/64/128) on
#     synthetic 3x32x32, batch 64.  Sync counts every sample once (every stage trains each batch once);
#     async is reported as the slowest stage's trained samples/s (a reused batch counts again) and as
#     the distinct samples the last stage trained per second — not stage 0's production rate;
#  2. bytes per step and digits test accuracy with transport none / int8 / vq (seeds 0..S-1),
#     next to plain backprop trained for the same steps.
# Usage: [PARTS=throughput,digits] bash benchmarks/stage_runtime_cpu.sh [OUT_DIR] [SEEDS]
# Needs >= K free cores for a fair throughput number; the JSON records the core count and load.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
seeds=${2:-3}
tag="cpu-$(date +%Y-%m-%d)"
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
script=$(mktemp --suffix=.py)
trap 'rm -f "$script"' EXIT
# (A file, not stdin: the stage processes re-import the main module, guarded by __main__.)
cat > "$script" <<'EOF'
import json, os, platform, statistics, time, warnings

import torch

import effcompile
from effcompile.passes import GreedyStages
from effcompile.harness.data import get_dataset, make_loaders
from effcompile.models import get_model
from effcompile.passes.greedy_stages import staged_model
from effcompile.passes.greedy_stages.runtime.launcher import ZooJob, build_staged_model, cross_entropy, cycle_batches, run_stages



def single_process_rate(zoo, steps, warmup, staged_config=None, threads=1):
    """Samples/s of the plain (or single-process greedy) training step on ``threads`` threads."""
    torch.set_num_threads(threads)
    if staged_config is None:
        torch.manual_seed(0)
        model, _ = zoo.model_factory()
    else:
        model = build_staged_model(staged_config, zoo.model_factory, 0)
    optimizer = zoo.optimizer_factory(list(model.parameters()))
    step = effcompile.train_step(model, cross_entropy, optimizer)
    started = None
    for index, (x, y) in cycle_batches(zoo.data_factory):
        if index == warmup:
            started = time.perf_counter()
        if index == steps:
            break
        step(x, y)
    rate = (steps - warmup) * zoo.batch_size / (time.perf_counter() - started)
    torch.set_num_threads(1)
    return rate


def distinct_last_stage_rate(result):
    """Distinct batches the last stage trained (a reused replay slot counts once) per second, over the
    span ``samples_per_s`` uses (first stage's first step to last stage's last step)."""
    return result.samples_per_s * len(set(result.step_ids[-1])) / len(result.step_ids[0])


def plain_accuracy(zoo, steps, seed):
    torch.manual_seed(seed)
    model, _ = zoo.model_factory()
    optimizer = zoo.optimizer_factory(list(model.parameters()))
    step = effcompile.train_step(model, cross_entropy, optimizer)
    for index, (x, y) in cycle_batches(zoo.data_factory):
        if index == steps:
            break
        step(x, y)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in zoo.eval_factory():
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def main():
    torch.set_num_threads(1)
    out, tag, seeds = os.environ["OUT"], os.environ["TAG"], int(os.environ["SEEDS"])
    parts = os.environ.get("PARTS", "throughput,digits").split(",")
    machine = {"cpu_cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "threads_per_process": 1, "load_average_at_start": os.getloadavg()}
    if "throughput" in parts:
        throughput_benchmark(out, tag, machine)
    if "digits" in parts:
        digits_benchmark(out, tag, machine, seeds)


def throughput_benchmark(out, tag, machine):
    # ---- 1. throughput --------------------------------------------------------------------------
    synthetic = ZooJob(model="cnn", dataset="synthetic", batch_size=64, lr=0.05, image_size=32, num_train=2048)
    steps, warmup = 100, 10
    config = GreedyStages(num_stages=2, timeout_s=120.0)
    cores = config.num_stages  # the stage processes' total cores: the fair baseline gets as many threads
    rates = {"backprop_1proc": [], f"backprop_1proc_{cores}threads": [], "greedy_1proc": [],
             f"greedy_1proc_{cores}threads": [], "greedy_2proc_sync": [], "greedy_2proc_async_stage0": [],
             "greedy_2proc_async_every_stage": [], "greedy_2proc_async_distinct": []}
    for repeat in range(3):  # interleaved repeats
        rates["backprop_1proc"].append(single_process_rate(synthetic, steps, warmup))
        rates[f"backprop_1proc_{cores}threads"].append(single_process_rate(synthetic, steps, warmup, threads=cores))
        rates["greedy_1proc"].append(single_process_rate(synthetic, steps, warmup, config))
        rates[f"greedy_1proc_{cores}threads"].append(single_process_rate(synthetic, steps, warmup, config, cores))
        for mode in ("sync", "async"):
            result = run_stages(GreedyStages(num_stages=2, mode=mode, timeout_s=120.0), synthetic.model_factory,
                                cross_entropy, synthetic.optimizer_factory, synthetic.data_factory, steps)
            if mode == "sync":
                rates["greedy_2proc_sync"].append(result.samples_per_s)
            else:
                rates["greedy_2proc_async_stage0"].append(result.samples_per_s)
                rates["greedy_2proc_async_every_stage"].append(result.pipeline_samples_per_s)
                rates["greedy_2proc_async_distinct"].append(distinct_last_stage_rate(result))
    staged = build_staged_model(config, synthetic.model_factory, 0)
    boundaries = [list(s) for s in staged_model(staged).boundary_shapes]
    modules = [staged_model(staged).stage_modules(k) for k in range(2)]
    median = {name: statistics.median(values) for name, values in rates.items()}
    throughput = {
        "model": "cnn (32/64/128) on synthetic 3x32x32", "batch_size": 64, "steps": steps, "warmup": warmup,
        "samples_per_s": rates, "median_samples_per_s": median,
        "same_cores_baseline": f"backprop_1proc_{cores}threads",
        "speedup_vs_backprop_same_cores": {name: rate / median[f"backprop_1proc_{cores}threads"]
                                           for name, rate in median.items()},
        "speedup_vs_backprop_1thread": {name: rate / median["backprop_1proc"] for name, rate in median.items()},
        "goal": "2proc >= 0.75*K = 1.5x backprop", "boundaries": boundaries, "stage_modules": modules,
        "note": ("sync and async_stage0: stage-0 samples / (last stage end - first stage start), pipeline fill "
                 "included; async_every_stage: the slowest stage's trained samples/s over its own span (reuse "
                 "counts again); async_distinct: distinct batches the last stage trained over the same span"),
    }
    print(json.dumps(throughput, indent=1, default=str), flush=True)
    write(out, tag, "throughput", machine, throughput)


# name → (transport, VQ codebook size K, codebook_every); VQ groups G = 8 channels.
TRANSPORTS = {"none": ("none", 256, 1), "int8": ("int8", 256, 1), "vq256": ("vq", 256, 20), "vq1024": ("vq", 1024, 50)}


def digits_benchmark(out, tag, machine, seeds):
    # ---- 2. bytes and accuracy on digits --------------------------------------------------------
    digits_steps = 300
    runs = []
    for seed in range(seeds):
        zoo = ZooJob(model="cnn", dataset="digits", batch_size=64, lr=0.05, data_seed=seed)
        runs.append({"transport": "backprop (1 process)", "seed": seed, "accuracy": plain_accuracy(zoo, digits_steps, seed)})
        for name, (transport, codebook_size, codebook_every) in TRANSPORTS.items():
            cfg = GreedyStages(num_stages=2, mode="sync", transport=transport, vq_codebook_size=codebook_size,
                               timeout_s=120.0)
            result = run_stages(cfg, zoo.model_factory, cross_entropy, zoo.optimizer_factory, zoo.data_factory,
                                digits_steps, eval_factory=zoo.eval_factory, seed=seed, codebook_every=codebook_every)
            b = result.boundaries[0]
            runs.append({"transport": name, "seed": seed, "accuracy": result.accuracy,
                         "head_accuracy": result.head_accuracy[0], "final_loss": result.summary()["final_losses"][-1],
                         "raw_bytes_per_step": b["raw_bytes_per_step"], "wire_bytes_per_step": b["wire_bytes_per_step"],
                         "compression": b["compression"], "activation_compression": b["activation_compression"],
                         "codebook_bytes": b["codebook_bytes"], "codec": b["codec"],
                         "samples_per_s": result.samples_per_s})
            print(json.dumps(runs[-1], default=str), flush=True)
    summary = {}
    for transport in ("backprop (1 process)",) + tuple(TRANSPORTS):
        rows = [r for r in runs if r["transport"] == transport]
        summary[transport] = {"accuracy_mean": statistics.mean(r["accuracy"] for r in rows),
                              "accuracy_min": min(r["accuracy"] for r in rows), "seeds": len(rows)}
        if transport != "backprop (1 process)":
            summary[transport].update({"wire_bytes_per_step": rows[0]["wire_bytes_per_step"],
                                       "compression": statistics.mean(r["compression"] for r in rows)})
    digits = {"model": "cnn (32/64/128) on digits, K=2 sync, automatic cut", "steps": digits_steps, "batch_size": 64,
              "transports": {name: {"transport": t, "vq_codebook_size": k, "vq_group_size": 8, "codebook_every": e}
                         for name, (t, k, e) in TRANSPORTS.items()}, "runs": runs, "summary": summary,
              "goal": "vq: >= 16x fewer bytes at <= 1 pt accuracy loss vs transport none"}
    write(out, tag, "digits-transport", machine, digits)
    print(json.dumps(summary, indent=1))


def write(out, tag, name, machine, payload):
    path = os.path.join(out, f"{tag}-stage-runtime-{name}.json")
    with open(path, "w") as handle:
        json.dump({"machine": {**machine, "load_average_at_end": os.getloadavg()}, **payload}, handle, indent=2,
                  default=str)
    print("wrote", path)


if __name__ == "__main__":  # stage processes import this file as __mp_main__
    main()
EOF
OUT="$out" TAG="$tag" SEEDS="$seeds" "$py" "$script"
