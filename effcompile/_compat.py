"""Every private torch API effcompile touches, in one place.

Checked on torch 2.11 (the GPU machines' image; ``make test-oldest-torch`` runs the suite under
it on a CPU) and 2.13 (CI); the supported range is ``torch>=2.11,<2.15``.  When a private name
moves, or a public one is newer than 2.11 (``redispatch_function``), this is the one file to change.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.utils import _pytree as pytree  # tree_flatten/unflatten over outputs (ModelOutput is registered)

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

if TORCH_VERSION < (2, 11):  # pragma: no cover - guarded by the dependency pin
    raise ImportError(f"effcompile needs torch>=2.11, found {torch.__version__}")

# Dynamo, Inductor and the functional collectives are imported on first use: importing them
# costs seconds, and most processes (workers, CLI --help) never need them.


def functional_all_reduce_mean(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce average over ``group`` (default: WORLD); traceable, so it works inside compiled graphs."""
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as functional_collectives

    group = dist.group.WORLD if group is None else group
    total = functional_collectives.all_reduce(tensor, "sum", group)
    return functional_collectives.wait_tensor(total) / dist.get_world_size(group=group)


def functional_all_gather(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``tensor`` of ``group`` (default: WORLD) concatenated along dim 0 in rank order;
    traceable, so it works inside compiled graphs."""
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as functional_collectives

    group = dist.group.WORLD if group is None else group
    # all_gather_single: the newer name (all_gather_tensor, same signature, is deprecated where it exists).
    gather = getattr(functional_collectives, "all_gather_single", None) or functional_collectives.all_gather_tensor
    return functional_collectives.wait_tensor(gather(tensor, 0, group))


def compile_fx(graph_module, example_inputs, **kwargs):
    """Inductor's entry point (``torch._inductor.compile_fx.compile_fx``)."""
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx

    return inductor_compile_fx(graph_module, example_inputs, **kwargs)


def inductor_config():
    """``torch._inductor.config`` (imported on first use)."""
    import torch._inductor.config as config

    return config


def aot_eager_with_partition(wrap_partition, min_cut: bool = False):
    """An AOTAutograd backend with eager (boxed no-op) compilers and a wrapped partitioner: the
    default one, or (``min_cut``) Inductor's, which also runs AOTAutograd's CSE and recomputation."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

    partition = min_cut_rematerialization_partition if min_cut else default_partition
    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=wrap_partition(partition))


class _LoadedBackend:
    """Stands in for an entry point whose target is already imported."""

    def __init__(self, compiler_fn):
        self._compiler_fn = compiler_fn

    def load(self):
        return self._compiler_fn


def register_backend_once(name: str, compiler_fn) -> None:
    """Make ``torch.compile(backend=name)`` find ``compiler_fn``.

    Registered like an entry point, so importing the package and loading the
    ``torch_dynamo_backends`` entry point (which imports the package) never register twice:
    Dynamo's ``lookup_backend`` registers it on first use.
    """
    from torch._dynamo.backends import registry  # noqa: F401  (import cost paid once, at import of effcompile)

    if name not in registry._COMPILER_FNS:
        registry._BACKENDS[name] = _LoadedBackend(compiler_fn)


def unique_graph_count() -> int:
    """Graphs Dynamo has compiled in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def view_untracked(tensor: torch.Tensor, shape) -> torch.Tensor:
    """``tensor.view(shape)`` that autograd does not track as a view (``aten._unsafe_view``, what
    ``torch.matmul`` returns for its folded product).  A custom autograd Function may return it and
    its caller may then modify it in place, which a tracked view of a tensor made inside the
    Function's forward forbids.  Only for a fresh tensor nothing else refers to."""
    return torch.ops.aten._unsafe_view(tensor, shape)


def is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


# The base class of nn.Conv1d/2d/3d and the transposed convolutions (private in every version).
ConvNd = torch.nn.modules.conv._ConvNd
# The base class of the batch and instance norms (``num_features`` channels; private in every version).
NormBase = torch.nn.modules.batchnorm._NormBase


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (faster than fp32, not emulated):
    CUDA from compute capability 8.0 (Ampere), x86 CPUs with AVX512-BF16 or AMX tiles.  Other
    devices answer False.  (The CPU checks are private ``torch.cpu`` helpers.)"""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(bool(check()) for check in checks if check is not None)
    return False


__all__ = [
    "TORCH_VERSION", "register_backend_once", "compile_fx", "inductor_config", "aot_eager_with_partition", "functional_all_reduce_mean",
    "functional_all_gather",
    "unique_graph_count", "is_compiling", "ConvNd", "NormBase", "custom_graph_pass_base", "hash_files", "compile_caches_disabled",
    "is_sharded", "native_bf16_matmul", "pytree", "inside_ddp_forward", "hook_runs_last", "view_untracked",
]


def custom_graph_pass_base():
    """``torch._inductor.custom_graph_pass.CustomGraphPass`` (checked on torch 2.11 and 2.13)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


def hash_files(paths):
    """A stable hash of the files' contents (``get_hash_for_files``; torch 2.11 and 2.13)."""
    from torch._inductor.custom_graph_pass import get_hash_for_files

    return get_hash_for_files(tuple(paths))


@contextlib.contextmanager
def compile_caches_disabled() -> Iterator[None]:
    """Inside the block every compile runs the graph passes: no FX-graph or AOTAutograd cache hits.

    A cache hit replays a compiled artifact without calling ``joint_custom_pre_pass``; whoever
    wants to see each rewrite (``recording()``) needs every graph compiled afresh.  The config
    flags are read at compile time (``torch._inductor.config.fx_graph_cache``,
    ``torch._functorch.config.enable_autograd_cache``); environment variables set after import
    are not.
    """
    import torch._functorch.config as functorch_config

    with inductor_config().patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def hook_runs_last(handle: Any) -> None:
    """Move a module hook to the end of its module's hook order: ``RemovableHandle.hooks_dict_ref``
    is the module's ordered dict of hooks, keyed by ``handle.id`` (torch 2.11 and 2.13)."""
    hooks = handle.hooks_dict_ref()
    if hooks is not None and handle.id in hooks:
        hooks.move_to_end(handle.id)


@contextlib.contextmanager
def reentrant_checkpoints_inlined() -> Iterator[None]:
    """Within the block, a reentrant ``torch.utils.checkpoint`` region (Hugging Face's default
    ``gradient_checkpointing_enable()``) runs its function directly.  Its first forward runs under
    ``torch.no_grad()``, which ``torch.export`` captures as an opaque ``wrap_with_set_grad_enabled``
    submodule: the layers inside would be invisible to the layer analysis.  Checkpointing changes
    what is stored, not what is computed, so the capture sees the plain forward.
    (``CheckpointFunction`` is private in every version.)"""
    from torch.utils import checkpoint

    function = checkpoint.CheckpointFunction
    own = function.__dict__.get("apply")  # normally inherited from autograd.Function
    function.apply = classmethod(lambda cls, run_function, preserve_rng_state, *args: run_function(*args))
    try:
        yield
    finally:
        if own is None:
            del function.apply
        else:
            function.apply = own


def inside_backward() -> bool:
    """Whether this code runs inside an autograd backward pass: a forward running there is an
    activation-checkpointing recomputation (``torch.utils.checkpoint``, reentrant or not, as
    Hugging Face's ``gradient_checkpointing_enable`` uses), which must not repeat the forward's
    side effects.  Autograd's current graph task id (private; -1 outside a backward)."""
    return torch._C._current_graph_task_id() != -1


def inside_ddp_forward() -> bool:
    """Whether a ``DistributedDataParallel`` forward is running (its module's forward is on the
    stack): DDP's own flag, ``_active_ddp_module``, kept for Dynamo's DDPOptimizer (torch 2.11 and
    2.13; not set by the experimental Python reducer)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module() is not None


_DTENSOR_TYPE: list = []  # DTensor, imported on first use (or () in builds without distributed)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 ``fully_shard`` parameter, a tensor-parallel shard).
    Cheap after the first call: weight properties call it on every read."""
    if not _DTENSOR_TYPE:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - builds without distributed
            DTensor = ()
        _DTENSOR_TYPE.append(DTensor)
    return isinstance(tensor, _DTENSOR_TYPE[0])


_DISPATCH_CHECKS = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")


def redispatch_function(func, types, args, kwargs, fallback):
    """Call the Python function ``func`` skipping its own ``__torch_function__`` hop once, so a
    TorchFunctionMode that re-enters itself sees the ops inside ``func`` instead of ``func`` again.

    ``torch.overrides.redispatch_function`` where it exists (not in torch 2.11), else the C hook
    it wraps, else ``fallback``: a copy of ``func`` reading its globals from
    :func:`dispatch_free_globals`, made ahead of time (Dynamo cannot trace making a function).
    """
    public, skip_one_hop = redispatch_hooks()
    if public is not None:
        return public(func, types, args, kwargs or {})
    if skip_one_hop is not None:
        return skip_one_hop(func, types, args, kwargs or {})
    return fallback(*args, **(kwargs or {}))


def redispatch_hooks():
    """The public redispatch function and the C hook it wraps, each None where this torch lacks it.

    One seam for tests to stand in for older torch: deleting the C hook from ``torch._C`` itself
    would also break Dynamo, which calls it while tracing.
    """
    return (getattr(torch.overrides, "redispatch_function", None),
            getattr(torch._C, "_skip_one_hop_torch_function", None))


def dispatch_free_globals(module_globals):
    """A copy of a module's globals whose ``has_torch_function*`` names answer False: a function
    copied onto it skips its own dispatch check; the functions it calls keep theirs."""
    namespace = dict(module_globals)
    namespace.update({name: (lambda *_: False) for name in _DISPATCH_CHECKS})
    return namespace


__all__ += ["redispatch_function", "redispatch_hooks", "dispatch_free_globals"]
