"""Every private torch API effcompile touches, in one place.

Checked on torch 2.11 (the GPU machines' image) and 2.13 (CI); the supported range is
``torch>=2.11,<2.15``.  When a private name moves, this is the one file to change.
"""

from __future__ import annotations

import torch

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

if TORCH_VERSION < (2, 11):  # pragma: no cover - guarded by the dependency pin
    raise ImportError(f"effcompile needs torch>=2.11, found {torch.__version__}")

# Dynamo backend registry and counters.
from torch._dynamo import register_backend  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._dynamo.utils import counters as dynamo_counters  # noqa: E402

# Inductor entry point used by the "effcompile" backend.
from torch._inductor.compile_fx import compile_fx  # noqa: E402

# Traceable collectives: the same call works in eager mode and inside a compiled graph.
from torch.distributed import _functional_collectives as functional_collectives  # noqa: E402


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
    from torch._dynamo.backends import registry

    if name not in registry._COMPILER_FNS:
        registry._BACKENDS[name] = _LoadedBackend(compiler_fn)


def unique_graph_count() -> int:
    """Graphs Dynamo has compiled in this process (a recompile adds one)."""
    return int(dynamo_counters["stats"]["unique_graphs"])


def is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


__all__ = [
    "TORCH_VERSION", "register_backend", "register_backend_once", "aot_autograd", "compile_fx", "dynamo_counters",
    "functional_collectives", "unique_graph_count", "is_compiling",
]
