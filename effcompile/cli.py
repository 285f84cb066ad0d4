"""Command-line interface: ``effcompile train | report | inspect | bench``, and the commands techniques register.

Usage::

    effcompile train --model mlp --dataset digits --passes decorrelation \\
        --pass-arg decorrelation.kappa=0.25 --epochs 10 --seeds 0,1,2 --target-accuracy 0.95 \\
        --compare --out runs/mlp
    effcompile train --model cnn --dataset digits --compare --each \\
        --passes decorrelation,randomized_vjp,greedy_stages,sample_selection --out runs/cnn
    effcompile report runs/cnn/metrics.json runs/mlp/metrics.json --out runs
    effcompile inspect --model cnn --passes decorrelation --onnx cnn.onnx
    effcompile bench --model cnn --passes decorrelation --batch-size 64 --steps 50 --warmup 5 \\
        --compile --out results.json
    effcompile stages --model cnn --dataset digits --stages 2 --data-parallel 2 --steps 60 --out result.json

The comparison suites (every pass alone and composed against backprop) are benchmarks, not part
of the installed package: ``python -m benchmarks suite --preset quick`` in a checkout.

``--model`` is a zoo name (see ``effcompile.models.list_models()``) or ``path/to/file.py:factory``,
a Python file whose ``factory()`` returns an ``nn.Module`` taking one ``(B, C, H, W)`` batch; the
file may define ``example_inputs(batch_size)`` when its input is not such an image batch.
A bad model, dataset, pass or pass argument prints one line to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import importlib.util
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import models
from .api import report, transform
from .measure import bench_pass, machine_info
from .commands import COMMANDS, run_command
from .config import PASS_CONFIGS, config_from_dict
from .passes import PASSES
from .harness.data import DATASETS, get_dataset
from .onnx_export import export_onnx, inspect_onnx
from .harness.fit import fit
from .harness.reports import (bench_table, case_name, compare_table, comparison_table, load_metadata, load_metrics,
                               markdown_table, plot_comparison, plot_runs, save_metrics)

__all__ = ["main", "build_parser", "CLIError"]

PLAIN_GROUP = "backprop"
COMPOSED_GROUP = "composed"  # the name of all passes together under --each


class CLIError(Exception):
    """A user error: reported as one line on stderr with exit status 2, without a traceback."""


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effcompile", description="Cheaper training through graph passes.")
    names = ["train", "report", "inspect", "bench", *sorted(COMMANDS)]
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(names) + "}")

    train = sub.add_parser("train", help="train with passes (and optionally plain backprop) and compare")
    _add_model_args(train, shape=False)
    _add_pass_args(train)
    train.add_argument("--dataset", default="digits",
                       help=f"{', '.join(DATASETS)} (default: digits; digits and mnist5k are bundled)")
    train.add_argument("--data-root", default=None,
                       help="directory holding cifar10/mnist files (default: $EFFCOMPILE_DATA or ./data; never downloaded)")
    train.add_argument("--epochs", type=_positive_int, default=10)
    train.add_argument("--batch-size", type=_positive_int, default=64)
    train.add_argument("--lr", type=float, default=0.01, help="optimizer learning rate")
    train.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum / Adam beta1")
    train.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated seeds (default: 0)")
    train.add_argument("--target-accuracy", type=float, default=None,
                       help="report epochs and seconds until this test accuracy")
    train.add_argument("--compile", action="store_true", help='torch.compile(backend="effcompile") the step')
    train.add_argument("--compare", action="store_true", help="also train plain backprop with the same seeds")
    train.add_argument("--each", action="store_true",
                       help=f"with several passes, also train each pass alone (all of them together are "
                            f"named {COMPOSED_GROUP!r})")
    train.add_argument("--max-steps", type=_positive_int, default=None,
                       help="stop each run after this many training steps (a smoke test); the last epoch is evaluated")
    train.add_argument("--threads", type=_positive_int, default=None,
                       help="torch intra-op threads (torch.set_num_threads); default: torch's")
    train.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    train.add_argument("--out", default=None, help="output directory (default: runs/train-<model>-<time>)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=cmd_train)

    report_cmd = sub.add_parser("report", help="one comparison table and one accuracy-vs-time PNG "
                                               "from the metrics.json files of several train runs")
    report_cmd.add_argument("metrics", nargs="+", help="metrics.json files written by effcompile train")
    report_cmd.add_argument("--out", default=None,
                            help="directory for comparison.md and accuracy_vs_time.png (default: print only)")
    report_cmd.set_defaults(handler=cmd_report)

    inspect = sub.add_parser("inspect", help="show what the passes decide for every layer")
    _add_model_args(inspect, shape=True)
    _add_pass_args(inspect)
    inspect.add_argument("--batch-size", type=_positive_int, default=4, help="example batch size")
    inspect.add_argument("--onnx", default=None, help="also export to this ONNX file and list its nodes")
    inspect.set_defaults(handler=cmd_inspect)

    bench = sub.add_parser("bench", help="time training steps of the transformed vs the plain model "
                                         "(the comparison suites: python -m benchmarks, in a checkout)")
    _add_model_args(bench, shape=True)
    _add_pass_args(bench)
    bench.add_argument("--batch-size", type=_positive_int, default=32)
    bench.add_argument("--steps", type=_positive_int, default=50, help="timed steps per variant")
    bench.add_argument("--warmup", type=_positive_int, default=5, help="untimed steps per variant")
    bench.add_argument("--block-size", type=_positive_int, default=5,
                       help="consecutive steps per variant before switching to the other")
    bench.add_argument("--lr", type=float, default=0.01)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--compile", action="store_true", help='torch.compile(backend="effcompile") both steps')
    bench.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    bench.add_argument("--out", default=None, help="write the results (with machine info) to this JSON file")
    bench.set_defaults(handler=cmd_bench)

    # Commands registered by techniques own their arguments (effcompile.commands).
    for command in sorted(COMMANDS.values(), key=lambda c: c.name):
        registered = sub.add_parser(command.name, add_help=False, help=command.help)
        registered.add_argument("command_args", nargs=argparse.REMAINDER)
        registered.set_defaults(handler=cmd_registered)
    return parser


def _add_model_args(parser: argparse.ArgumentParser, *, shape: bool, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="zoo model name or path/to/file.py:factory")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra keyword argument of a zoo model's factory (repeatable)")
    if shape:  # train takes these from the dataset instead
        parser.add_argument("--num-classes", type=_positive_int, default=10)
        parser.add_argument("--in-channels", type=_positive_int, default=1)
        parser.add_argument("--image-size", type=_positive_int, default=8)


def _add_pass_args(parser: argparse.ArgumentParser) -> None:
    known = ", ".join(PASS_CONFIGS)
    parser.add_argument("--passes", required=True, metavar="PASS[,PASS...]",
                        help=f'comma-separated pass names ({known}), applied in that order, or "none" for plain backprop')
    parser.add_argument("--pass-arg", action="append", default=[], metavar="PASS.FIELD=VALUE",
                        help="override one field of a pass config (repeatable); fields: the config's docstring")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one seed")
    if len(set(values)) != len(values):  # a repeated seed would overwrite its own run's results
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    return values


# --------------------------------------------------------------------------------------------
# Resolving models, passes and datasets (every user error becomes a CLIError)
# --------------------------------------------------------------------------------------------


def parse_value(text: str, annotation: Any = None) -> Any:
    """Parse a command-line value to ``annotation`` (bool/int/float/str; ``none`` for a field that
    may be None) or, without one, to the first of bool, int, float that fits (else the string itself)."""
    lowered = text.strip().lower()
    if lowered in ("none", "null") and type(None) in typing.get_args(annotation):  # Optional fields
        return None
    if annotation is bool or (annotation is None and lowered in ("true", "false")):
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected a bool (true/false), got {text!r}")
    if annotation is int:
        return int(text)
    if annotation is float:
        return float(text)
    if annotation is str:
        return text
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def build_configs(passes: str, pass_args: Sequence[str]) -> list[Any]:
    """Pass configs for ``--passes`` with the ``--pass-arg`` overrides applied (validated)."""
    names = [] if passes.strip().lower() == "none" else [n.strip() for n in passes.split(",") if n.strip()]
    for name in names:
        if name not in PASS_CONFIGS:
            raise CLIError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASS_CONFIGS))} (or none)")
    if len(set(names)) != len(names):
        raise CLIError(f"--passes names a pass twice: {passes!r}")
    overrides: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in pass_args:
        name, field, value = _parse_pass_arg(item, PASS_CONFIGS, names)
        overrides[name][field] = value
    try:
        return [config_from_dict({"pass": name, **overrides[name]}) for name in names]
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def _parse_pass_arg(item: str, pass_configs: dict[str, type], names: Sequence[str]) -> tuple[str, str, Any]:
    """Split ``PASS.FIELD=VALUE`` and convert VALUE to the field's declared type."""
    key, sep, text = item.partition("=")
    name, dot, field = key.strip().partition(".")
    if not sep or not dot or not field:
        raise CLIError(f"--pass-arg {item!r}: expected PASS.FIELD=VALUE (a config field of a pass given to --passes)")
    if name not in names:
        raise CLIError(f"--pass-arg {item!r}: pass {name!r} is not in --passes ({', '.join(names) or 'none'})")
    cls = pass_configs[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    if field not in fields:
        raise CLIError(f"--pass-arg {item!r}: {cls.__name__} has no field {field!r}; fields: {', '.join(fields)}")
    annotation = typing.get_type_hints(cls).get(field)
    try:
        return name, field, parse_value(text, annotation)
    except ValueError as exc:
        raise CLIError(f"--pass-arg {item!r}: {exc}") from None


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    kwargs = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--model-arg {item!r}: expected KEY=VALUE")
        kwargs[key.strip()] = parse_value(text)
    return kwargs


def is_model_path(spec: str) -> bool:
    """True for ``path/to/file.py:factory`` (or a bare ``file.py``) rather than a zoo name."""
    return spec.partition(":")[0].endswith(".py")


def load_model_factory(spec: str) -> tuple[Callable[[], nn.Module], Any]:
    """Import ``path/to/file.py:factory``; return (factory, module).

    The module is registered in ``sys.modules`` under a name derived from its absolute path,
    so classes defined in it pickle and deep-copy like those of an installed package.
    """
    path_text, _, factory_name = spec.partition(":")
    if not factory_name:
        raise CLIError(f"model file {path_text!r}: name the factory function, as in {path_text}:build_model")
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise CLIError(f"model file {path_text!r} does not exist")
    module_name = f"_effcompile_user_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    module = sys.modules.get(module_name)
    if module is None:
        import_spec = importlib.util.spec_from_file_location(module_name, path)
        if import_spec is None or import_spec.loader is None:
            raise CLIError(f"model file {path_text!r} cannot be imported")
        module = importlib.util.module_from_spec(import_spec)
        sys.modules[module_name] = module
        try:
            import_spec.loader.exec_module(module)
        except Exception:
            del sys.modules[module_name]
            raise  # an error inside the user's file deserves its traceback
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise CLIError(f"model file {path_text!r} has no callable {factory_name!r}")
    return factory, module


def build_model(
    spec: str, *, num_classes: int, in_channels: int, image_size: int, model_args: Sequence[str] = ()
) -> nn.Module:
    """Build a zoo model by name or call a user factory (which takes no arguments)."""
    if is_model_path(spec):
        if model_args:
            raise CLIError("--model-arg applies to zoo models; a model file's factory takes no arguments")
        factory, _ = load_model_factory(spec)
        model = factory()
        if not isinstance(model, nn.Module):
            raise CLIError(f"{spec}: the factory returned {type(model).__name__}, not an nn.Module")
        return model
    if spec not in models.list_models():
        raise CLIError(f"unknown model {spec!r}; known models: {', '.join(models.list_models())} "
                       "(or path/to/file.py:factory)")
    try:
        return models.get_model(spec, num_classes=num_classes, in_channels=in_channels,
                                image_size=image_size, **parse_model_args(model_args))
    except (TypeError, ValueError) as exc:  # bad --model-arg or a shape the model cannot take
        raise CLIError(f"model {spec!r}: {exc}") from None


def model_example_inputs(
    spec: str, *, batch_size: int, in_channels: int, image_size: int
) -> tuple[torch.Tensor, ...]:
    """A seeded example batch: the zoo's, a model file's ``example_inputs``, or an image batch."""
    if is_model_path(spec):
        _, module = load_model_factory(spec)
        if callable(getattr(module, "example_inputs", None)):
            inputs = module.example_inputs(batch_size)
            return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(batch_size, in_channels, image_size, image_size, generator=generator),)
    return tuple(models.example_inputs(spec, batch_size=batch_size, in_channels=in_channels, image_size=image_size))


def load_dataset(name: str, root: str | None) -> tuple[Any, Any, Any]:
    if name not in DATASETS:
        raise CLIError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    try:
        return get_dataset(name, root=root)
    except (RuntimeError, ValueError) as exc:  # e.g. files missing under root: say how to provide them
        raise CLIError(str(exc)) from None


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available")
    return device


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    """Train every variant (passes, and plain backprop with --compare) for every seed."""
    configs = build_configs(args.passes, args.pass_arg)
    train_set, test_set, info = load_dataset(args.dataset, args.data_root)
    if args.batch_size > len(train_set):
        raise CLIError(f"--batch-size {args.batch_size} exceeds the {len(train_set)} training samples of {args.dataset}")
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = dict(num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size)
    build_model(args.model, **shape, model_args=args.model_arg)  # fail fast, before any training

    variants = train_variants(configs, compare=args.compare, each=args.each)
    example = _dataset_batch(train_set, args.batch_size, device)
    case = f"{info.name}/{_slug(args.model)}"
    width = max(len(f"{case} {group}/seed{seed}") for group, _ in variants for seed in args.seeds)

    results = {}
    for group, variant_configs in variants:
        for seed in args.seeds:
            torch.manual_seed(seed)  # the same initial weights for every variant of one seed
            model = build_model(args.model, **shape, model_args=args.model_arg).to(device)
            if variant_configs:
                transform(model, *variant_configs, example_inputs=example)
            label = f"{group}/seed{seed}"
            results[label] = fit(
                model, train_set, test_set, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                optimizer=args.optimizer, momentum=args.momentum, seed=seed, compile=args.compile,
                progress=not args.no_progress, target_accuracy=args.target_accuracy, device=device,
                label=f"{case} {label}".ljust(width), group=group, max_steps=args.max_steps,
            )
            results[label].label = label
            results[label].config["passes"] = [config.to_dict() for config in variant_configs]

    out = Path(args.out or f"runs/train-{_slug(args.model)}-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    metadata = {"command": _command_record(args), "dataset": _info_record(info),
                "torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine_info(device)}
    save_metrics(results, out / "metrics.json", metadata=metadata)
    plot_runs(results, out / "curves.png")

    print(compare_table(results))
    if len(variants) > 1 or len(args.seeds) > 1:
        print("\nMean over seeds [min, max]; step time: median over epochs of training seconds per step:")
        print(comparison_table({case: results}))
    print(f"\nwrote {out / 'metrics.json'} and {out / 'curves.png'} "
          "(seconds are training time; evaluation excluded)")
    return 0


def train_variants(configs: Sequence[Any], *, compare: bool, each: bool) -> list[tuple[str, list[Any]]]:
    """The ``(group, configs)`` that ``train`` runs: plain backprop (with ``compare``, or when no
    pass is given), each pass alone (with ``each`` and several passes), then all passes together
    (named ``composed`` under ``each``, else by joining the pass names with ``+``)."""
    variants: list[tuple[str, list[Any]]] = []
    if compare or not configs:
        variants.append((PLAIN_GROUP, []))
    if each and len(configs) > 1:
        variants.extend((config.name, [config]) for config in configs)
        variants.append((COMPOSED_GROUP, list(configs)))
    elif configs:
        variants.append(("+".join(config.name for config in configs), list(configs)))
    return variants


def cmd_report(args: argparse.Namespace) -> int:
    """One comparison table and one accuracy-vs-wall-clock PNG over several train runs."""
    cases: dict[str, Any] = {}
    notes = []
    for item in args.metrics:
        path = Path(item)
        if not path.is_file():
            raise CLIError(f"metrics file {item!r} does not exist (write one with effcompile train --out DIR)")
        try:
            results, metadata = load_metrics(path), load_metadata(path)
        except (ValueError, KeyError, TypeError) as exc:
            raise CLIError(f"{item}: not a metrics.json written by effcompile train ({exc})") from None
        name = case_name(metadata, default=path.parent.name or path.stem)
        while name in cases:  # the same dataset/model twice: keep both, distinguishably
            name = f"{name} ({path.parent.name})"
        cases[name] = results
        notes.append(_case_note(name, metadata, results))
    table = comparison_table(cases)
    text = "\n".join([table, "", *notes, "",
                      "Seconds are training wall-clock (evaluation excluded); epochs/seconds to target and final "
                      "accuracy are mean [min, max] over seeds; step time is the median over runs of each run's median "
                      "seconds per step; saved activations: peak bytes autograd saved in the first (eager) step, "
                      "parameters excluded."])
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(text + "\n")
        plot_comparison(cases, out / "accuracy_vs_time.png")
        print(f"\nwrote {out / 'comparison.md'} and {out / 'accuracy_vs_time.png'}")
    return 0


def _case_note(name: str, metadata: dict[str, Any], results: dict[str, Any]) -> str:
    """One line per case: the settings and machine that the numbers depend on."""
    command = metadata.get("command") or {}
    dataset = metadata.get("dataset") or {}
    machine = metadata.get("machine") or {}
    passes = {}
    for run in results.values():
        for config in run.config.get("passes", []):
            passes.setdefault(config.get("pass"), {k: v for k, v in config.items() if k != "pass"})
    settings = ", ".join(f"{key} {command[key]}" for key in ("epochs", "batch_size", "lr", "optimizer")
                         if key in command)
    changed = "; ".join(f"{name_}: {_non_default(name_, config)}" for name_, config in passes.items() if name_)
    threads = machine.get("torch_threads")
    threads = threads and f"{threads} torch thread{'s' if threads != 1 else ''}"
    where = ", ".join(str(v) for v in (machine.get("device_name"), threads, metadata.get("torch") and
                                       f"torch {metadata['torch']}") if v)
    train_test = f"{dataset.get('num_train', '?')}/{dataset.get('num_test', '?')} images" if dataset else ""
    return f"- **{name}**: {train_test}; {settings}; passes ({changed or 'defaults'}); {where}"


def _non_default(name: str, config: dict[str, Any]) -> str:
    """The fields of a pass config that differ from its defaults (or 'defaults')."""
    cls = PASS_CONFIGS.get(name)
    if cls is None:
        return "?"
    defaults = json.loads(json.dumps(cls().to_dict()))  # tuples become lists, as in metrics.json
    changed = {key: value for key, value in config.items() if defaults.get(key) != value}
    return ", ".join(f"{key}={value}" for key, value in changed.items()) or "defaults"


def _dataset_batch(dataset: Any, batch_size: int, device: torch.device) -> tuple[torch.Tensor]:
    """The first ``batch_size`` inputs of ``dataset``, stacked: the transform's example batch."""
    count = min(batch_size, len(dataset))
    return (torch.stack([dataset[i][0] for i in range(count)]).to(device),)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the Plan of the transformed model (and the ONNX nodes with --onnx)."""
    configs = build_configs(args.passes, args.pass_arg)
    if not configs:
        raise CLIError("inspect reports what passes decide: give at least one pass")
    shape = dict(in_channels=args.in_channels, image_size=args.image_size)
    model = build_model(args.model, num_classes=args.num_classes, **shape, model_args=args.model_arg)
    example = model_example_inputs(args.model, batch_size=args.batch_size, **shape)
    transform(model, *configs, example_inputs=example)
    print(report(model).table())
    for config in configs:  # each pass may add views of what the Plan cannot show (e.g. the backward)
        for title, lines in PASSES[config.name].inspect_views(model, example):
            print(f"\n{title}:")
            print("\n".join(lines))
    if args.onnx:
        export_onnx(model, example, args.onnx)
        rows = inspect_onnx(args.onnx)
        columns = list(dict.fromkeys(key for row in rows for key in row)) or ["layer", "op", "pass"]
        print(f"\nONNX nodes of {args.onnx}:")
        if rows:
            print(markdown_table(columns, [[row.get(col, "") for col in columns] for row in rows]))
        else:  # the inference graph is the plain model's: say so rather than print an empty table
            print(f"none: {', '.join(c.name for c in configs)} change(s) training only (backward, step or "
                  "stage heads); the exported eval-mode graph is the model's own")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark training steps of the transformed model against plain backprop."""
    configs = build_configs(args.passes, args.pass_arg)
    if not configs:
        raise CLIError("bench compares a transformed model against plain backprop: give at least one pass")
    shape = dict(in_channels=args.in_channels, image_size=args.image_size)
    build = lambda: build_model(args.model, num_classes=args.num_classes, **shape, model_args=args.model_arg)
    build()  # fail fast on a bad model before any benchmarking
    example = model_example_inputs(args.model, batch_size=args.batch_size, **shape)
    result = bench_pass(
        build, configs, example, args.num_classes, steps=args.steps, warmup=args.warmup,
        block_size=args.block_size, lr=args.lr, compile=args.compile, device=resolve_device(args.device),
        seed=args.seed,
    )
    result = {"model": args.model, "command": _command_record(args), **result}
    print(bench_table(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def _command_record(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed arguments, JSON-ready (without the handler function)."""
    return {key: value for key, value in vars(args).items() if key != "handler"}


def _info_record(info: Any) -> dict[str, Any]:
    return dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(vars(info))


def _slug(spec: str) -> str:
    stem = Path(spec.partition(":")[0]).stem if is_model_path(spec) else spec
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def cmd_registered(args: argparse.Namespace) -> int:
    command_args = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    return run_command(args.command, command_args, prog=f"effcompile {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit status (0: success, 2: usage or input error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] and argv[0] in COMMANDS:  # argparse's REMAINDER cannot start with an option: hand them over
        argv = [argv[0], "--", *argv[1:]]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage or help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.handler(args)
    except CLIError as exc:
        print(f"effcompile {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
