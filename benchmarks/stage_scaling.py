"""Greedy stages × data-parallel replicas against plain DDP backprop at the same process count,
and a predicted scaling to 8 and 64 GPUs.

Measured (loopback gloo, 1 torch thread per process, CNN 32/64/128 on synthetic 3×32×32, batch
``--batch-size`` per rank / per replica, SGD): for every layout K×D the stage runtime
(``run_stages(..., data_parallel=D)``: K·D processes) and DDP backprop with the same number K·D of
processes, interleaved over ``--repeats``.  Both rates count the samples of every rank from the
first step's start to the last step's end (pipeline fill included for the stages, DDP's first
bucket build included for DDP); no warm-up is excluded on either side.

Predicted (an α-β model, every number an explicit parameter written into the output): per-step
compute times are the measured single-process times (the full backprop step; each stage's own
forward+backward+optimizer step, its aux head included) scaled to a GPU by the ratio of the
measured CPU FLOP rate to an assumed achieved GPU FLOP rate (``cpu_time`` basis), or each step's
counted FLOPs over that rate (``flops`` basis); message sizes are measured (each boundary's bytes
per step from the runtime's counters, each stage's all-reduced gradient and buffer bytes, DDP's
gradient bytes and broadcast buffer bytes).  See ``ASSUMPTIONS``.

``python -m benchmarks stage_scaling [--steps 30] [--repeats 2] [--layouts 2x1,2x2] [--out PATH]``;
``--predict-from PATH [--ib-GBps-per-gpu ...]`` recomputes only the prediction of a result file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

# Link and overlap parameters of the prediction (H100/H200 SXM nodes of 8 GPUs with NVLink 4 /
# NVSwitch and one 400 Gb/s NDR InfiniBand NIC per GPU).  Overridable on the command line.
ASSUMPTIONS = {
    "gpus_per_node": 8,
    "gpu_achieved_tflops": 50.0,      # fp32/TF32 training of a small CNN: an assumption, ~10% of TF32 dense peak
    "nvlink_allreduce_busbw_GBps": 450.0,  # NCCL all-reduce bus bandwidth inside one 8-GPU NVSwitch node
    "nvlink_p2p_GBps": 350.0,         # one GPU-to-GPU send over NVLink 4
    "ib_GBps_per_gpu": 45.0,          # 400 Gb/s NDR per GPU (rail-optimised), achievable
    "alpha_intra_s": 4e-6,            # per tree step latency inside a node
    "alpha_inter_s": 8e-6,            # per tree step latency across nodes
    "backward_fraction": 2.0 / 3.0,   # backward share of a step's compute (2 of 3 FLOP units)
    "formulas": {
        "all_reduce(n, S)": "2(n-1)/n * S / busbw + 2*ceil(log2 n) * alpha  (busbw: NVLink inside a node, IB per GPU across nodes)",
        "broadcast(n, S)": "S / busbw + ceil(log2 n) * alpha",
        "send(S)": "S / p2p bandwidth + alpha (NVLink when both ranks are on one node: rank = replica*K + stage keeps a "
                   "pipeline on one node when K divides gpus_per_node)",
        "ddp step": "no overlap: t_bp + all_reduce(G, grads) + broadcast(G, buffers); overlap: the all-reduce hides "
                    "behind the backward (t_bp * backward_fraction) as DDP's buckets do",
        "stage k step": "no overlap (the runtime as written: blocking send, all-reduce after the backward): "
                        "t_k + all_reduce(D, grads_k + buffers_k) + send(boundary bytes); overlap: the send runs on its "
                        "own stream beside the next step and the all-reduce hides behind the stage's backward",
        "throughput": "DDP: G*B / step; K x D stages: D*B / max_k(stage k step) (a pipeline runs at its slowest stage)",
        "compute": "cpu_time basis: measured CPU step times * (measured CPU FLOP/s) / gpu_achieved_tflops (the stages "
                   "keep their measured time shares); flops basis: each step's counted FLOPs / gpu_achieved_tflops "
                   "(the stages keep their FLOP shares); batch B per GPU as profiled",
    },
    "not_modelled": [
        "kernel-launch and optimizer floors: a CNN this small is launch-bound on a GPU, so real step times are longer "
        "than FLOPs / rate (which favours the communication-bound side of both layouts alike)",
        "NCCL protocol switching, congestion between the replica groups sharing a NIC, stragglers",
        "greedy stages train a different model than backprop (local losses): the rates are samples/s, not "
        "time to an accuracy",
    ],
}


# ------------------------------------------------------------------------------ measured: DDP
def _ddp_worker(rank: int, world: int, init_file: str, job: Any, steps: int, out_dir: str) -> None:
    from effcompile.passes.greedy_stages.runtime.launcher import cross_entropy
    from effcompile.passes.greedy_stages.runtime.worker import replica_batches

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model, _ = job.model_factory()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = job.optimizer_factory(list(ddp.parameters()))
        batches = replica_batches(job.data_factory, rank, world)
        loaded = [next(batches)[1] for _ in range(min(steps, 8))]  # load before the clock starts
        dist.barrier()
        start = time.time()
        for index in range(steps):
            x, y = loaded[index % len(loaded)] if index < len(loaded) else next(batches)[1]
            optimizer.zero_grad(set_to_none=True)
            cross_entropy(ddp(x), y).backward()
            optimizer.step()
        end = time.time()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"start": start, "end": end, "samples": steps * int(y.shape[0])}, handle)
    finally:
        dist.destroy_process_group()


def ddp_rate(job: Any, world: int, steps: int) -> float:
    """Samples/s of plain DDP backprop on ``world`` gloo processes (every rank's samples)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_ddp_worker, args=(world, os.path.join(out, "init"), job, steps, out), nprocs=world,
                           join=True, start_method="spawn")
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
    span = max(r["end"] for r in ranks) - min(r["start"] for r in ranks)
    return sum(r["samples"] for r in ranks) / span


# ------------------------------------------------------------------------------ measured: stages
def stage_run(job: Any, stages: int, replicas: int, steps: int) -> Dict[str, Any]:
    from effcompile.passes import GreedyStages
    from effcompile.passes.greedy_stages.runtime.launcher import cross_entropy, run_stages

    config = GreedyStages(num_stages=stages, mode="sync", timeout_s=120.0)
    result = run_stages(config, job.model_factory, cross_entropy, job.optimizer_factory, job.data_factory, steps,
                        data_parallel=replicas, threads_per_process=1)
    return {"samples_per_s": result.samples_per_s, "pipeline_samples_per_s": result.pipeline_samples_per_s,
            "replica_divergence": result.replica_divergence,
            "boundary_wire_bytes_per_step": [b["wire_bytes_per_step"] for b in result.boundaries],
            "boundary_activation_bytes_per_step": [b["activation_raw_bytes"] / max(1, b["messages"])
                                                   for b in result.boundaries]}


# ------------------------------------------------------------------------------ measured: compute profile
def _median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def compute_profile(job: Any, stages: int, repeats: int) -> Dict[str, Any]:
    """Single-process, 1 thread: the backprop step and every stage's step (time, FLOPs) and the
    bytes each layout communicates per step."""
    from effcompile.passes import GreedyStages
    from effcompile.passes.greedy_stages.rewrite import make_stage_optimizers, staged_model
    from effcompile.passes.greedy_stages.runtime.launcher import build_staged_model, cross_entropy, stage_state_keys

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = next(iter(job.data_factory()))
        torch.manual_seed(0)
        model, _ = job.model_factory()
        optimizer = job.optimizer_factory(list(model.parameters()))

        def backprop_step():
            optimizer.zero_grad(set_to_none=True)
            cross_entropy(model(x), y).backward()
            optimizer.step()

        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        profile: Dict[str, Any] = {
            "batch_size": int(y.shape[0]),
            "backprop_step_s": _median_time(backprop_step, repeats), "backprop_step_flops": _flops(backprop_step),
            "ddp_gradient_bytes": parameter_bytes, "ddp_broadcast_buffer_bytes": buffer_bytes,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            staged_full = build_staged_model(GreedyStages(num_stages=stages), job.model_factory, 0)
        staged = staged_model(staged_full)
        optimizers = make_stage_optimizers(staged, job.optimizer_factory)
        inputs, stage_rows = (x,), []
        parameter_ids = {id(p) for p in staged_full.parameters()}
        state = staged_full.state_dict(keep_vars=True)
        for k in range(stages):
            def stage_step(k=k, inputs=inputs):
                optimizers[k].zero_grad(set_to_none=True)
                out = staged.stage(k)(*inputs)
                cross_entropy(staged.local_logits(k, out), y).backward()
                optimizers[k].step()
                return out

            owned = set(stage_state_keys(staged_full, k))
            # What the runtime all-reduces over a stage's replicas: gradients and floating buffers, as float32.
            grads = sum(p.numel() for group in optimizers[k].param_groups for p in group["params"]) * 4
            buffers = sum(v.numel() * 4 for key, v in state.items()
                          if key in owned and id(v) not in parameter_ids and v.is_floating_point())
            out = stage_step()
            stage_rows.append({"stage": k, "step_s": _median_time(stage_step, repeats), "step_flops": _flops(stage_step),
                               "allreduce_bytes": grads + buffers, "modules": list(staged.stage_modules(k)),
                               "boundary_shape": list(out.shape) if k < stages - 1 else None})
            inputs = (out.detach(),)
        profile["stages"] = stage_rows
        profile["cpu_flops_per_s"] = profile["backprop_step_flops"] / profile["backprop_step_s"]
        return profile
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ predicted
def _all_reduce_s(n: int, size: float, crosses_nodes: bool, a: Dict[str, Any]) -> float:
    if n <= 1:
        return 0.0
    bandwidth = (a["ib_GBps_per_gpu"] if crosses_nodes else a["nvlink_allreduce_busbw_GBps"]) * 1e9
    alpha = a["alpha_inter_s"] if crosses_nodes else a["alpha_intra_s"]
    return 2 * (n - 1) / n * size / bandwidth + 2 * math.ceil(math.log2(n)) * alpha


def _broadcast_s(n: int, size: float, crosses_nodes: bool, a: Dict[str, Any]) -> float:
    if n <= 1:
        return 0.0
    bandwidth = (a["ib_GBps_per_gpu"] if crosses_nodes else a["nvlink_allreduce_busbw_GBps"]) * 1e9
    alpha = a["alpha_inter_s"] if crosses_nodes else a["alpha_intra_s"]
    return size / bandwidth + math.ceil(math.log2(n)) * alpha


def _send_s(size: float, same_node: bool, a: Dict[str, Any]) -> float:
    bandwidth = (a["nvlink_p2p_GBps"] if same_node else a["ib_GBps_per_gpu"]) * 1e9
    return size / bandwidth + (a["alpha_intra_s"] if same_node else a["alpha_inter_s"])


def _gpu_compute_s(profile: Dict[str, Any], basis: str, a: Dict[str, Any]) -> Tuple[float, List[float]]:
    """GPU seconds of the backprop step and of every stage's step at the profiled batch.

    ``cpu_time``: the measured CPU times scaled by (measured CPU FLOP/s) / (assumed GPU FLOP/s),
    so the backprop step takes FLOPs/rate and the stages keep their measured time shares.
    ``flops``: every step's own FLOPs / rate (the stages keep their FLOP shares: on this CPU the
    early, spatially large layers run at a lower FLOP rate than the late ones, on a GPU less so).
    """
    rate = a["gpu_achieved_tflops"] * 1e12
    if basis == "cpu_time":
        to_gpu = profile["cpu_flops_per_s"] / rate
        return profile["backprop_step_s"] * to_gpu, [row["step_s"] * to_gpu for row in profile["stages"]]
    return profile["backprop_step_flops"] / rate, [row["step_flops"] / rate for row in profile["stages"]]


def predict(profile: Dict[str, Any], boundary_bytes: Sequence[float], gpus: int, stages: int,
            a: Dict[str, Any], batch: int, basis: str = "cpu_time") -> Dict[str, Any]:
    """Predicted samples/s of DDP on ``gpus`` GPUs and of ``stages`` × (gpus/stages) replicas."""
    scale = batch / profile["batch_size"]  # compute and activation bytes grow with the batch
    per_node = a["gpus_per_node"]
    t_bp, t_stages = _gpu_compute_s(profile, basis, a)
    t_bp *= scale
    crosses = gpus > per_node
    ddp_ar = _all_reduce_s(gpus, profile["ddp_gradient_bytes"], crosses, a)
    ddp_bc = _broadcast_s(gpus, profile["ddp_broadcast_buffer_bytes"], crosses, a)
    ddp = {"no_overlap": t_bp + ddp_ar + ddp_bc,
           "overlap": t_bp + max(0.0, ddp_ar - a["backward_fraction"] * t_bp) + ddp_bc}
    replicas = gpus // stages
    pipeline_on_node = per_node % stages == 0
    group_crosses = gpus > per_node  # a stage's D replicas sit on every node
    steps = {"no_overlap": [], "overlap": []}
    detail = []
    for k, row in enumerate(profile["stages"]):
        t_k = t_stages[k] * scale
        ar = _all_reduce_s(replicas, row["allreduce_bytes"], group_crosses, a)
        send = _send_s(boundary_bytes[k] * scale, pipeline_on_node, a) if k < stages - 1 else 0.0
        steps["no_overlap"].append(t_k + ar + send)
        steps["overlap"].append(max(t_k + max(0.0, ar - a["backward_fraction"] * t_k), send))
        detail.append({"stage": k, "compute_s": t_k, "allreduce_s": ar, "send_s": send})
    out = {"gpus": gpus, "layout": f"K={stages} x D={replicas}", "batch_per_gpu": batch, "compute_basis": basis,
           "ddp_step_s": ddp, "ddp_allreduce_s": ddp_ar, "ddp_broadcast_s": ddp_bc, "backprop_compute_s": t_bp,
           "stage_detail": detail}
    for mode in ("no_overlap", "overlap"):
        ddp_rate = gpus * batch / ddp[mode]
        stage_rate = replicas * batch / max(steps[mode])
        out[mode] = {"ddp_samples_per_s": ddp_rate, "stages_samples_per_s": stage_rate,
                     "stages_vs_ddp": stage_rate / ddp_rate}
    return out


# ------------------------------------------------------------------------------ main
def _machine() -> Dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cpu_cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "threads_per_process": 1, "backend": "gloo on loopback (127.0.0.1)",
            "load_average_at_start": os.getloadavg()}


def _layout(text: str) -> Tuple[int, int]:
    stages, replicas = text.lower().split("x")
    return int(stages), int(replicas)


def main(argv: Sequence[str] | None = None) -> int:
    from effcompile.passes.greedy_stages.runtime.launcher import ZooJob

    parser = argparse.ArgumentParser(prog="python -m benchmarks stage_scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="2x1,2x2", help="K x D layouts, each against DDP with K*D ranks")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--profile-repeats", type=int, default=10)
    parser.add_argument("--predict-gpus", default="8,64")
    parser.add_argument("--predict-batch", type=int, default=None, help="per-GPU batch of the prediction (default: --batch-size)")
    parser.add_argument("--out", default=None)
    for key, value in ASSUMPTIONS.items():
        if isinstance(value, (int, float)):
            parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--note", default="")
    parser.add_argument("--predict-from", default=None,
                        help="recompute only the prediction (with these link/overlap parameters) from a result JSON "
                             "of this benchmark, and write it back (to --out, default the same file)")
    args = parser.parse_args(argv)
    assumptions = dict(ASSUMPTIONS)
    for key, value in ASSUMPTIONS.items():
        if isinstance(value, (int, float)):
            assumptions[key] = getattr(args, key)
    if args.predict_from:
        with open(args.predict_from) as handle:
            result = json.load(handle)
        result["prediction"] = _prediction(result["profile"], result["boundary_wire_bytes_per_step_measured"],
                                           args, assumptions)
        _write(result, args.out or args.predict_from)
        return 0

    job = ZooJob(model="cnn", dataset="synthetic", batch_size=args.batch_size, lr=0.05, image_size=32, num_train=2048)
    layouts = [_layout(text) for text in args.layouts.split(",")]
    machine = _machine()
    started = time.time()
    runs: List[Dict[str, Any]] = []
    for repeat in range(args.repeats):  # interleaved: every variant once per repeat
        for stages, replicas in layouts:
            world = stages * replicas
            row = {"repeat": repeat, "layout": f"{stages}x{replicas}", "processes": world, "load_average": os.getloadavg()}
            row["ddp_samples_per_s"] = ddp_rate(job, world, args.steps)
            row.update({f"stages_{key}": value for key, value in stage_run(job, stages, replicas, args.steps).items()})
            row["stages_vs_ddp"] = row["stages_samples_per_s"] / row["ddp_samples_per_s"]
            runs.append(row)
            print(json.dumps(row, default=str), flush=True)
    summary = []
    for stages, replicas in layouts:
        rows = [r for r in runs if r["layout"] == f"{stages}x{replicas}"]
        ddp, staged = (statistics.median(r[key] for r in rows) for key in ("ddp_samples_per_s", "stages_samples_per_s"))
        summary.append({"layout": f"K={stages} x D={replicas}", "processes": stages * replicas,
                        "ddp_samples_per_s": ddp, "stages_samples_per_s": staged, "stages_vs_ddp": staged / ddp,
                        "stages_pipeline_samples_per_s": statistics.median(r["stages_pipeline_samples_per_s"] for r in rows),
                        "replica_divergence": rows[-1]["stages_replica_divergence"]})
    profile = compute_profile(job, layouts[0][0], args.profile_repeats)
    measured_boundary = next(r["stages_boundary_wire_bytes_per_step"] for r in runs
                             if r["layout"].startswith(f"{layouts[0][0]}x"))
    prediction = _prediction(profile, measured_boundary, args, assumptions)
    result = {
        "benchmark": "stage_scaling", "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "note": args.note, "wall_s": time.time() - started,
        "job": dataclasses.asdict(job) | {"model": "cnn (32/64/128) on synthetic 3x32x32", "optimizer": "SGD lr 0.05 momentum 0.9"},
        "method": {"steps": args.steps, "repeats": args.repeats, "interleaved": True,
                   "rate": "all ranks' samples / (last rank's last step end - first rank's first step start); "
                           "stage runs: stage-0 samples of every replica, pipeline fill included",
                   "stage_mode": "sync, transport none"},
        "runs": runs, "summary": summary,
        "profile": profile, "boundary_wire_bytes_per_step_measured": measured_boundary,
        "prediction": prediction,
    }
    print(json.dumps({"summary": summary}, indent=1, default=str))
    if args.out:
        _write(result, args.out)
    return 0


def _prediction(profile: Dict[str, Any], boundary_bytes: Sequence[float], args: argparse.Namespace,
                assumptions: Dict[str, Any]) -> Dict[str, Any]:
    """Predictions for every GPU count and both compute bases (K: the profiled stage count)."""
    stages = len(profile["stages"])
    batch = args.predict_batch or profile["batch_size"]
    results = [predict(profile, boundary_bytes, int(g), stages, assumptions, batch, basis)
               for basis in ("cpu_time", "flops") for g in args.predict_gpus.split(",")]
    for p in results:
        print(json.dumps({k: p[k] for k in ("gpus", "layout", "compute_basis", "no_overlap", "overlap")}), flush=True)
    return {"assumptions": assumptions, "results": results}


def _write(result: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    print("wrote", path)


if __name__ == "__main__":
    raise SystemExit(main())
