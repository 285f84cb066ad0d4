"""Benchmark rows of the randomized-VJP pass (``benchmarks/randomized_vjp_cpu.sh``).

Five measurements, each against plain backprop on the same machine in the same process:

* :func:`bench_step_times` – median whole-step and backward-only time of the compiled training
  step at several keeps, interleaved with the exact step (:func:`effcompile.measure.time_steps`);
  one arm per estimator (``--estimators importance,uniform``; ``importance+profitable_only``: only
  the layers the cost model predicts to pay are sketched), on the CPU or a GPU
  (``--device cuda --autocast bf16``).
* :func:`bench_saved_activations` – bytes autograd saves for backward (parameters excluded),
  exact vs memory mode, measured with ``torch.autograd.graph.saved_tensors_hooks``; on CUDA also
  the peak-memory increment of one step (``max_memory_allocated``).
* :func:`bench_variance` – each layer's Monte-Carlo added variance of the sketched weight
  gradient, plain and centred, relative to the SGD noise of an exact batch gradient, at one point
  of a backprop run on real data.
* :func:`bench_batchnorm_eval` – test accuracy per epoch in eval mode, with batch statistics and
  with recalibrated BatchNorm statistics: backprop, the sketched default, the plain estimator.
* :func:`bench_eager_scope` – eager step time of a ``nn.TransformerEncoder`` classifier whose
  attention projections (used inside ``F.multi_head_attention_forward``) are sketched through the
  scope mode: at ``keep=1`` (the mode and the autograd functions, no sampling: pure overhead) and
  at a sampling keep, against the exact eager step.
* :func:`bench_time_to_accuracy` – epochs and wall-clock seconds (evaluation excluded) until the
  digits test accuracy first reaches a target, for exact backprop at batch ``B``, the sketched
  run at batch ``B``, and the *same-FLOPs smaller batch*: exact backprop at
  ``B' = round(B·(2 + keep)/3)``.  Per row of the batch a linear layer costs one GEMM unit in
  forward and two in backward (grad_X, grad_W); sampling grad_W rows at ``keep`` costs
  ``1 + 1 + keep`` units, so ``3·B' = (2 + keep)·B`` spends the same GEMM FLOPs per step.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from effcompile.api import plan_of, train_step, transform
from effcompile.measure import machine_info, synchronize, time_steps
from effcompile.passes.randomized_vjp import RandomizedVJP

__all__ = ["bench_step_times", "bench_saved_activations", "bench_variance", "bench_batchnorm_eval",
           "bench_eager_scope", "bench_time_to_accuracy", "same_flops_batch", "main"]


def same_flops_batch(batch_size: int, keep: float) -> int:
    """``B'`` with ``3·B' ≈ (2 + keep)·B``: exact backprop at the sketched step's GEMM FLOPs."""
    return max(1, round(batch_size * (2 + keep) / 3))


def _model(name: str, model_kwargs: Dict[str, Any], seed: int) -> nn.Module:
    from effcompile import models

    torch.manual_seed(seed)
    return models.get_model(name, **model_kwargs)


def _transformed(model: nn.Module, config: RandomizedVJP, example: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transform(copy.deepcopy(model), config, example_inputs=(example,))


class _TimedStep:
    """One training step whose backward is timed separately (seconds appended to ``backward_s``)."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, compile: bool, backend: str,
                 autocast: Optional[str] = None):
        from effcompile.harness.fit import autocast_context

        self.model, self.inputs, self.targets = model, inputs, targets
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def forward_loss(x, y):
            with autocast_context(autocast, x.device):
                return F.cross_entropy(model(x), y)

        self.forward_loss = torch.compile(forward_loss, backend=backend) if compile else forward_loss
        self.backward_s: List[float] = []

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_loss(self.inputs, self.targets)
        synchronize(self.inputs.device)
        start = time.perf_counter()
        loss.backward()
        synchronize(self.inputs.device)
        self.backward_s.append(time.perf_counter() - start)
        self.optimizer.step()


_ARM_FLAGS = ("profitable_only",)


def _arm_config(arm: str, keep: float) -> RandomizedVJP:
    """``"<estimator>[+flag...]"`` → its config: e.g. ``importance+profitable_only``."""
    estimator, *flags = arm.split("+")
    unknown = [flag for flag in flags if flag not in _ARM_FLAGS]
    if unknown:
        raise ValueError(f"unknown arm flag(s) {unknown} in {arm!r}; expected any of {_ARM_FLAGS}")
    return RandomizedVJP(keep=keep, estimator=estimator, **{flag: True for flag in flags})


def bench_step_times(name: str, model_kwargs: Dict[str, Any], batch_size: int, keeps: Sequence[float] = (0.5, 0.25, 0.1),
                     *, steps: int = 20, warmup: int = 3, compile: bool = True, backend: str = "effcompile",
                     num_classes: int = 10, in_channels: int = 1, image_size: int = 8, seed: int = 0,
                     estimators: Sequence[str] = ("importance",), device: str = "cpu",
                     autocast: Optional[str] = None) -> Dict[str, Any]:
    """Whole-step and backward-only median time ratios (sketched / exact) at each keep; one row
    per (keep, estimator), every estimator's arm interleaved with the same exact arm.  ``device``
    "cuda" synchronises around every clock read; ``autocast`` "bf16" runs forward and loss under it."""
    plain = _model(name, dict(model_kwargs, num_classes=num_classes, in_channels=in_channels, image_size=image_size),
                   seed).to(device)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, in_channels, image_size, image_size, generator=generator).to(device)
    targets = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    rows = []
    for keep in keeps:
        torch.compiler.reset()
        variants = {"exact": _TimedStep(copy.deepcopy(plain), inputs, targets, compile, backend, autocast)}
        for estimator in estimators:
            variants[estimator] = _TimedStep(_transformed(plain, _arm_config(estimator, keep), inputs),
                                             inputs, targets, compile, backend, autocast)
        time_steps(variants, warmup, block_size=1, device=device)  # compiles, then warms up
        for step in variants.values():
            step.backward_s.clear()
        times = time_steps(variants, steps, block_size=5, device=device)
        median = {label: statistics.median(seconds) for label, seconds in times.items()}
        backward = {label: statistics.median(step.backward_s) for label, step in variants.items()}
        for estimator in estimators:
            rows.append({"keep": keep, "estimator": estimator, "step_ratio": median[estimator] / median["exact"],
                         "backward_ratio": backward[estimator] / backward["exact"],
                         "exact_step_ms": median["exact"] * 1e3, "sketched_step_ms": median[estimator] * 1e3,
                         "exact_backward_ms": backward["exact"] * 1e3, "sketched_backward_ms": backward[estimator] * 1e3})
    return {"benchmark": "step_times", "model": name, "model_kwargs": model_kwargs, "batch_size": batch_size,
            "compile": compile, "backend": backend, "steps": steps, "autocast": autocast, "rows": rows,
            "machine": machine_info(device)}


class _EncoderClassifier(nn.Module):
    """Token classifier on ``nn.TransformerEncoder`` (its attention reads ``in_proj_weight`` and
    ``out_proj.weight`` inside ``F.multi_head_attention_forward``), mean-pooled into a linear head."""

    def __init__(self, width: int, heads: int, depth: int, classes: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(tokens).mean(1))


def bench_eager_scope(batch_size: int = 32, tokens: int = 32, width: int = 128, heads: int = 4, depth: int = 2,
                      keep: float = 0.25, *, steps: int = 30, warmup: int = 3, seed: int = 0) -> Dict[str, Any]:
    """Eager step ratios to exact backprop: every weight sketched (attention through the scope
    mode, the FFN and head through their nn.Linear forward) at ``keep=1`` and at ``keep``."""
    torch.manual_seed(seed)
    plain = _EncoderClassifier(width, heads, depth, 10)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, tokens, width, generator=generator)
    targets = torch.randint(0, 10, (batch_size,), generator=generator)
    variants = {"exact": _TimedStep(copy.deepcopy(plain), inputs, targets, False, "eager")}
    scoped: List[str] = []
    for label, value in (("keep1", 1.0), (f"keep{keep:g}", keep)):
        model = _transformed(plain, RandomizedVJP(keep=value, multiple=1), inputs)
        scoped = [row.layer for row in plan_of(model) if row.details.get("eager_scope")]
        variants[label] = _TimedStep(model, inputs, targets, False, "eager")
    time_steps(variants, warmup, block_size=1)
    times = time_steps(variants, steps, block_size=5)
    median = {label: statistics.median(seconds) for label, seconds in times.items()}
    return {"benchmark": "eager_scope", "batch_size": batch_size, "tokens": tokens, "width": width, "heads": heads,
            "depth": depth, "keep": keep, "steps": steps, "scoped_layers": scoped,
            "rows": [{"arm": label, "step_ms": median[label] * 1e3, "step_ratio": median[label] / median["exact"]}
                     for label in variants],
            "machine": machine_info("cpu")}


def _saved_bytes(model: nn.Module, inputs: torch.Tensor) -> int:
    """Peak bytes saved for backward over one forward+backward (parameters and buffers excluded)."""
    from effcompile.measure import SavedTensorMeter

    with SavedTensorMeter(exclude=list(model.parameters()) + list(model.buffers())) as meter:
        model(inputs).sum().backward()
    return meter.peak_bytes


def _linear_input_bytes(model: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes of the inputs of every nn.Linear (what exact backprop saves for their grad_W)."""
    total: List[int] = []
    hooks = [m.register_forward_hook(lambda m, args, out: total.append(args[0].numel() * args[0].element_size()))
             for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(inputs)
    for hook in hooks:
        hook.remove()
    return sum(total)


def bench_saved_activations(name: str, model_kwargs: Dict[str, Any], batch_size: int, keep: float = 0.25, *,
                            in_channels: int = 1, image_size: int = 8, seed: int = 0) -> Dict[str, Any]:
    """Saved-for-backward bytes, exact vs memory mode (whole model, and the linear layers' share)."""
    plain = _model(name, dict(model_kwargs, in_channels=in_channels, image_size=image_size), seed)
    inputs = torch.randn(batch_size, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    memory = _transformed(plain, RandomizedVJP(keep=keep, memory_mode=True), inputs)
    exact_bytes, memory_bytes = _saved_bytes(plain, inputs), _saved_bytes(memory, inputs)
    linear_inputs = _linear_input_bytes(plain, inputs)
    # Memory mode replaces each linear input X (M×K) by X[idx] (k×K) + idx (int64) + 1/π (float32).
    linear_saved_memory = linear_inputs - (exact_bytes - memory_bytes)
    result = {"benchmark": "saved_activations", "model": name, "model_kwargs": model_kwargs, "batch_size": batch_size,
              "keep": keep, "exact_saved_bytes": exact_bytes, "memory_mode_saved_bytes": memory_bytes,
              "whole_model_ratio": exact_bytes / memory_bytes, "linear_input_bytes_exact": linear_inputs,
              "linear_input_bytes_memory_mode": linear_saved_memory,
              "linear_layers_ratio": linear_inputs / max(linear_saved_memory, 1), "machine": machine_info("cpu")}
    if torch.cuda.is_available():
        result["cuda_peak_ratio"] = _cuda_peak(plain, inputs) / _cuda_peak(memory, inputs)
    return result


def _cuda_peak(model: nn.Module, inputs: torch.Tensor) -> int:
    model, inputs = model.cuda(), inputs.cuda()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(inputs).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _layer_inputs_and_gradients(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Dict[str, Any]:
    """``{path: (module, grad_output, input)}`` of every nn.Linear / nn.Conv2d for one batch."""
    captured: Dict[str, Any] = {}

    def hook(path):
        def capture(module, args, output):
            layer_input = args[0].detach()
            output.register_hook(lambda grad: captured.__setitem__(path, (module, grad.detach(), layer_input)))
        return capture

    handles = [m.register_forward_hook(hook(path)) for path, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs), targets).backward()
    for handle in handles:
        handle.remove()
    return captured


def _sketched_weight_grad(module: nn.Module, grad: torch.Tensor, layer_input: torch.Tensor, keep: float, estimator: str,
                          center: bool) -> torch.Tensor:
    from effcompile.passes.randomized_vjp import estimators

    if isinstance(module, nn.Conv2d):
        k = estimators.round_budget(grad.shape[0], keep, 8)
        conv_args = (list(module.stride), list(module.padding), list(module.dilation), module.groups)
        return estimators._sketched_conv_grad_weight(grad, layer_input, module.weight, conv_args, k, estimator, 0.1,
                                                     center)
    g, x = grad.reshape(-1, grad.shape[-1]), layer_input.reshape(-1, layer_input.shape[-1])
    k = estimators.round_budget(g.shape[0], keep, 8)
    return estimators.sketched_grad_weight(g, x, k, estimator, 0.1, center)


def bench_variance(name: str, model_kwargs: Dict[str, Any], dataset: str = "mnist5k", *, batch_size: int = 64,
                   keep: float = 0.25, warm_steps: int = 60, draws: int = 300, sgd_batches: int = 60, lr: float = 0.01,
                   seed: int = 0) -> Dict[str, Any]:
    """Added variance of each layer's sketched weight gradient over the SGD noise, plain vs centred.

    Trains ``warm_steps`` of plain SGD (lr, momentum 0.9) on ``dataset``, then for one batch
    measures ``E‖Ĝ − G‖²`` of every estimator with and without ``center`` by ``draws``
    Monte-Carlo draws, and the SGD noise ``E‖G_B − E G_B‖²`` of the exact gradient over
    ``sgd_batches`` random batches of the same size (the noise the sketch adds to).
    """
    from effcompile.harness import data

    train_x, train_y = data.get_dataset(dataset)[0].tensors
    model = _model(name, dict(model_kwargs, num_classes=10, in_channels=1, image_size=train_x.shape[-1]), seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = torch.Generator().manual_seed(seed)
    random_batch = lambda: torch.randint(0, len(train_x), (batch_size,), generator=batches)
    for _ in range(warm_steps):
        batch = random_batch()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
        optimizer.step()
    layers = {path: m for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    batch_grads: Dict[str, List[torch.Tensor]] = {path: [] for path in layers}
    for _ in range(sgd_batches):
        batch = random_batch()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
        for path, module in layers.items():
            batch_grads[path].append(module.weight.grad.detach().clone())
    batch = random_batch()
    captured = _layer_inputs_and_gradients(model, train_x[batch], train_y[batch])
    rows = []
    for path, (module, grad, layer_input) in captured.items():
        exact = module.weight.grad.detach()
        stacked = torch.stack(batch_grads[path])
        sgd_noise = (stacked - stacked.mean(0)).square().flatten(1).sum(1).mean().item()
        row = {"layer": path, "kind": type(module).__name__, "sgd_noise": sgd_noise,
               "exact_sq_norm": exact.square().sum().item(), "added_variance_over_sgd_noise": {}}
        for estimator in ("uniform", "importance"):
            for center in (False, True):
                samples = torch.stack([_sketched_weight_grad(module, grad, layer_input, keep, estimator, center)
                                       for _ in range(draws)])
                variance = (samples - exact).square().flatten(1).sum(1).mean().item()
                label = estimator + (", centred" if center else "")
                row["added_variance_over_sgd_noise"][label] = variance / sgd_noise
        rows.append(row)
    return {"benchmark": "variance", "model": name, "model_kwargs": model_kwargs, "dataset": dataset,
            "batch_size": batch_size, "keep": keep, "warm_steps": warm_steps, "draws": draws,
            "sgd_batches": sgd_batches, "lr": lr, "seed": seed, "rows": rows, "machine": machine_info("cpu")}


def _test_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_statistics: bool) -> float:
    model.train(batch_statistics)
    with torch.no_grad():
        logits = torch.cat([model(images[i:i + 250]) for i in range(0, len(images), 250)])
    return (logits.argmax(1) == labels).float().mean().item()


def _recalibrated(model: nn.Module, images: torch.Tensor, batch_size: int) -> nn.Module:
    """A copy whose BatchNorm running statistics are recomputed over ``images`` (a cumulative average)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for first in range(0, len(images), batch_size):
            model(images[first:first + batch_size])
    return model


def bench_batchnorm_eval(name: str, model_kwargs: Dict[str, Any], dataset: str = "mnist5k", *, epochs: int = 6,
                         batch_size: int = 64, lr: float = 0.01, seed: int = 0) -> Dict[str, Any]:
    """Test accuracy per epoch in eval mode, with batch statistics, and with recalibrated BatchNorm.

    Backprop, the sketched default and the plain estimator, SGD momentum 0.9, same seed and data
    order.  A gap between eval mode and the other two means the running statistics, not the
    weights, are what a sketched run lacks at evaluation.
    """
    from effcompile.harness import data

    train, test, _ = data.get_dataset(dataset)
    (train_x, train_y), (test_x, test_y) = train.tensors, test.tensors
    arms = {"backprop": None, "randomized_vjp": RandomizedVJP(), "randomized_vjp_plain": RandomizedVJP(center=False)}
    curves: Dict[str, List[Dict[str, float]]] = {}
    for arm, config in arms.items():
        model = _model(name, dict(model_kwargs, num_classes=10, in_channels=1, image_size=train_x.shape[-1]), seed)
        if config is not None:
            model = _transformed(model, config, train_x[:batch_size])
        step = train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
        order = torch.Generator().manual_seed(seed)
        curves[arm] = []
        for _ in range(epochs):
            model.train()
            permutation = torch.randperm(len(train_x), generator=order)
            for first in range(0, len(train_x) - batch_size + 1, batch_size):
                batch = permutation[first:first + batch_size]
                step(train_x[batch], train_y[batch])
            curves[arm].append({
                "eval_mode": _test_accuracy(model, test_x, test_y, False),
                "batch_statistics": _test_accuracy(model, test_x, test_y, True),
                "recalibrated": _test_accuracy(_recalibrated(model, train_x, batch_size), test_x, test_y, False)})
    return {"benchmark": "batchnorm_eval", "model": name, "model_kwargs": model_kwargs, "dataset": dataset,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "curves": curves,
            "machine": machine_info("cpu")}


def _run_to_target(build: Callable[[], nn.Module], batch_size: int, epochs: int, target: float, lr: float,
                   seed: int) -> Dict[str, Any]:
    from effcompile.harness import data

    train, test, _ = data.load_digits()
    (train_x, train_y), (test_x, test_y) = train.tensors, test.tensors
    model = build()
    step = train_step(model, F.cross_entropy, torch.optim.AdamW(model.parameters(), lr=lr))
    order = torch.Generator().manual_seed(seed)
    trained_s, curve, reached = 0.0, [], None
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        permutation = torch.randperm(len(train_x), generator=order)
        for first in range(0, len(train_x) - batch_size + 1, batch_size):
            batch = permutation[first:first + batch_size]
            step(train_x[batch], train_y[batch])
        trained_s += time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
        curve.append(accuracy)
        if reached is None and accuracy >= target:
            reached = {"epochs": epoch, "seconds": trained_s}
    return {"batch_size": batch_size, "accuracy_per_epoch": curve, "final_accuracy": curve[-1],
            "to_target": reached, "train_seconds": trained_s}


def bench_time_to_accuracy(name: str, model_kwargs: Dict[str, Any], *, keep: float = 0.25, batch_size: int = 64,
                           target: float = 0.9, epochs: int = 10, lr: float = 2e-3,
                           seeds: Sequence[int] = (0,)) -> Dict[str, Any]:
    """Epochs and seconds to ``target`` digits accuracy: exact, sketched, same-FLOPs smaller batch (eager)."""
    small = same_flops_batch(batch_size, keep)
    runs: Dict[str, List[Dict[str, Any]]] = {"exact": [], "sketched": [], "same_flops_batch": []}
    for seed in seeds:
        build = lambda: _model(name, model_kwargs, seed)
        example = torch.zeros(batch_size, 1, 8, 8)
        runs["exact"].append(_run_to_target(build, batch_size, epochs, target, lr, seed))
        runs["sketched"].append(_run_to_target(lambda: _transformed(build(), RandomizedVJP(keep=keep), example),
                                               batch_size, epochs, target, lr, seed))
        runs["same_flops_batch"].append(_run_to_target(build, small, epochs, target, lr, seed))
    return {"benchmark": "time_to_accuracy", "model": name, "model_kwargs": model_kwargs, "keep": keep,
            "batch_size": batch_size, "same_flops_batch_size": small, "target": target, "epochs": epochs, "lr": lr,
            "seeds": list(seeds), "runs": runs, "machine": machine_info("cpu")}


_MODELS = {
    "mlp": ("mlp", {}),
    "mlp1024": ("mlp", {"hidden": 1024}),
    "vit": ("vit_tiny", {"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 4}),
    "vit192": ("vit_tiny", {"depth": 4, "embed_dim": 192, "num_heads": 3}),
    "cnn": ("cnn", {}),
}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="randomized-VJP benchmark rows")
    parser.add_argument("kind", choices=["steps", "memory", "accuracy", "variance", "batchnorm", "scope"])
    parser.add_argument("--model", choices=sorted(_MODELS), default="mlp")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="steps: timed steps; variance: backprop steps first")
    parser.add_argument("--dataset", choices=["digits", "mnist5k"], default="mnist5k", help="variance, batchnorm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--keeps", default="0.5,0.25,0.1", help="steps: comma-separated keep fractions")
    parser.add_argument("--estimators", default="importance", help="steps: comma-separated estimators, one arm each")
    parser.add_argument("--device", default="cpu", help="steps: cpu or cuda")
    parser.add_argument("--autocast", choices=("bf16",), default=None, help="steps: forward and loss under autocast")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name, kwargs = _MODELS[args.model]
    if args.kind == "steps":
        result = bench_step_times(name, kwargs, args.batch_size, [float(k) for k in args.keeps.split(",")],
                                  steps=args.steps, in_channels=args.in_channels, image_size=args.image_size,
                                  estimators=args.estimators.split(","), device=args.device, autocast=args.autocast)
    elif args.kind == "scope":
        result = bench_eager_scope(args.batch_size, keep=args.keep, steps=args.steps, seed=args.seeds[0])
    elif args.kind == "memory":
        result = bench_saved_activations(name, kwargs, args.batch_size, args.keep, in_channels=args.in_channels,
                                         image_size=args.image_size)
    elif args.kind == "batchnorm":
        result = bench_batchnorm_eval(name, kwargs, args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                                      seed=args.seeds[0])
    elif args.kind == "variance":
        result = bench_variance(name, kwargs, args.dataset, batch_size=args.batch_size, keep=args.keep,
                                warm_steps=args.steps, seed=args.seeds[0])
    else:
        result = bench_time_to_accuracy(name, kwargs, keep=args.keep, batch_size=args.batch_size, target=args.target,
                                        epochs=args.epochs, seeds=args.seeds)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "runs")}, indent=1))


if __name__ == "__main__":
    main()
