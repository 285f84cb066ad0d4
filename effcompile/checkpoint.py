"""Checkpoints that hold everything needed to resume a transformed run exactly.

``state_dict`` of a transformed model already holds all pass state (decorrelation matrices and
counters).  What it cannot hold is the random-number state that the passes draw from (the R
update samples rows), so a resumed run would diverge from an uninterrupted one.  A checkpoint
therefore stores model, optimizer, the torch RNG states and the Plan, and loading checks that the
model was transformed the same way.

Safety.  A checkpoint is plain data: tensors, dicts, lists, tuples, str, int, float, bool and None
(``save_checkpoint`` refuses anything else, e.g. an object in ``extra``), read back with
``torch.load(weights_only=True)``, so no code from the file ever runs.  Every failure to load is a
:class:`CheckpointError` naming the file and what is wrong with it, and a failed load leaves the
model, the optimizer and the RNG exactly as they were: everything is checked first (format
version, checksum, the transform, keys, shapes, dtypes, optimizer state structure), then
committed, and a commit that still fails is rolled back.

Format (version 2): one ``torch.save`` zip archive of the dict
``{format_version, model, optimizer, rng, applied_layers, extra, checksum}``; ``checksum`` is the
sha256 of a canonical walk over everything else (every tensor's dtype, shape and bytes, every
key and value).  Version 1 files (the same dict without ``checksum``) still load.  Writes are
atomic: a temporary file beside the target, flushed and fsynced, then ``os.replace``.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import struct
import uuid
import zipfile
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ._compat import is_sharded, pytree
from .api import _unwrap, plan_of

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_checkpoint", "FORMAT_VERSION"]

FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # 1: no checksum (read as is); 2: adds "checksum"
CHECKSUM_ALGORITHM = "sha256"
_PAYLOAD_KEYS = ("format_version", "model", "optimizer", "rng", "applied_layers", "extra")

# Optimizer state entries that torch's optimizers keep with the parameter's shape.
_PARAMETER_SHAPED_STATE = {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta",
                           "sum", "ax", "grad_avg", "prev", "step_size"}

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint cannot be written or loaded; names the file (``path``) and the problem (``problem``)."""

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"checkpoint {self.path}: {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)


# ------------------------------------------------------------------------------ plain data
def _is_plain_dict(value: Any) -> bool:
    return type(value) in (dict, collections.OrderedDict)


def _check_plain(path: PathLike, value: Any, where: str, torch_types: bool) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back (or would need allow-listing)."""
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return
    if torch_types and isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return
    if _is_plain_dict(value):
        for key, item in value.items():
            if not (type(key) in (bool, int, float, str) or key is None):
                raise CheckpointError(path, f"cannot save {where}: key {key!r} is a {type(key).__name__}; "
                                            "keys must be str, int, float, bool or None")
            _check_plain(path, item, f"{where}[{key!r}]", torch_types)
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(path, item, f"{where}[{index}]", torch_types)
        return
    raise CheckpointError(path, f"cannot save {where}: a {type(value).__module__}.{type(value).__qualname__} is not "
                                "plain data; a checkpoint holds only tensors, dicts, lists, tuples, str, int, float, "
                                "bool and None (convert objects with their state_dict() or to_dict() first)")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.int_repr()
    t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def _update(digest: Any, value: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``value`` into ``digest``."""
    if isinstance(value, torch.Tensor):
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(_tensor_bytes(value))
    elif value is None:
        digest.update(b"N")
    elif type(value) is bool:
        digest.update(b"B1" if value else b"B0")
    elif isinstance(value, int):
        digest.update(f"I{int(value)};".encode())
    elif isinstance(value, float):
        digest.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, str):
        encoded = value.encode("utf-8", "surrogatepass")
        digest.update(f"S{len(encoded)};".encode() + encoded)
    elif isinstance(value, dict):
        digest.update(f"D{len(value)};".encode())
        for key, item in value.items():
            _update(digest, key)
            _update(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)};".encode())
        for item in value:
            _update(digest, item)
    else:  # torch.dtype / torch.device and whatever else weights_only let through
        text = f"{type(value).__module__}.{type(value).__qualname__}:{value!s}".encode()
        digest.update(f"O{len(text)};".encode() + text)


def _checksum(payload: Dict[str, Any]) -> Dict[str, str]:
    digest = hashlib.sha256()
    for key, value in payload.items():
        if key != "checksum":
            _update(digest, key)
            _update(digest, value)
    return {"algorithm": CHECKSUM_ALGORITHM, "digest": digest.hexdigest()}


def _seal(payload: Dict[str, Any]) -> Dict[str, Any]:
    """``payload`` with its checksum (re)computed (also used by the tests to forge valid files)."""
    sealed = {key: value for key, value in payload.items() if key != "checksum"}
    sealed["checksum"] = _checksum(sealed)
    return sealed


# ------------------------------------------------------------------------------ writing
def _write_atomic(path: PathLike, payload: Any) -> None:
    """``torch.save`` to a temporary file beside ``path``, flush, fsync, ``os.replace``, fsync the directory."""
    target = os.fspath(path)
    temporary = f"{target}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)  # a crash mid-write never leaves a truncated checkpoint behind
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        directory = os.open(os.path.dirname(os.path.abspath(target)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def _applied_layers(model: nn.Module) -> list:
    plan = plan_of(model)
    return [] if plan is None else sorted((row.layer, row.pass_name) for row in plan.applied())


# ------------------------------------------------------------------------------ sharded models
def _full(value: Any) -> Any:
    """``value`` with every DTensor (an FSDP2 ``fully_shard`` parameter or optimizer state)
    gathered into the plain full tensor: a collective, so every rank saves."""
    return pytree.tree_map(lambda leaf: leaf.full_tensor() if is_sharded(leaf) else leaf, value)


def _sharded_like(full: Any, target: Any) -> Any:
    """``full`` (a saved full tensor) as a DTensor sharded like ``target`` where ``target`` is one:
    this rank's shard, cut from its own copy (no communication)."""
    if not (is_sharded(target) and isinstance(full, torch.Tensor)):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


def _model_state_for(model: nn.Module, saved: Dict[str, Any]) -> Dict[str, Any]:
    current = model.state_dict()
    return {key: _sharded_like(value, current.get(key)) for key, value in saved.items()}


def _optimizer_state_for(optimizer: torch.optim.Optimizer, saved: Dict[str, Any]) -> Dict[str, Any]:
    """Parameter-shaped state of a sharded parameter as a DTensor sharded like the parameter (a
    plain tensor would meet the DTensor parameter in the optimizer's step)."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in saved["state"].items():
        parameter = parameters[index] if isinstance(index, int) and index < len(parameters) else None
        state[index] = {name: _sharded_like(value, parameter) if name in _PARAMETER_SHAPED_STATE else value
                        for name, value in entry.items()}
    return dict(saved, state=state)


# ------------------------------------------------------------------------------ saving
def save_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    extra: Optional[Dict[str, Any]] = None) -> None:
    """Write model, optimizer, RNG states and the applied Plan to ``path`` (atomically, with a checksum).

    ``extra`` may hold only tensors, dicts, lists, tuples, str, int, float, bool and None (e.g. a
    step counter, losses, other objects' ``state_dict()``); anything else raises
    :class:`CheckpointError` before a byte is written.

    FSDP2 (``fully_shard``): the file holds full tensors, gathered from the shards — every rank
    must call this (a collective; each may write its own path or the same one) — so it loads into
    the sharded model (each rank cuts its own shard from it) or into the unsharded model.
    """
    model = _unwrap(model)
    extra = {} if extra is None else extra
    if not _is_plain_dict(extra):
        raise CheckpointError(path, f"cannot save extra: expected a dict, got a {type(extra).__name__}")
    payload = {
        "format_version": FORMAT_VERSION,
        "model": _full(model.state_dict()),
        "optimizer": None if optimizer is None else _full(optimizer.state_dict()),
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "applied_layers": _applied_layers(model),
        "extra": extra,
    }
    _check_plain(path, extra, "extra", torch_types=False)
    for key in ("model", "optimizer", "rng", "applied_layers"):
        _check_plain(path, payload[key], key, torch_types=True)
    _write_atomic(path, _seal(payload))


# ------------------------------------------------------------------------------ reading
def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _unsafe_reason(error: BaseException) -> Optional[str]:
    """The global a ``weights_only`` load refused to import (None if ``error`` is no such refusal)."""
    match = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)", str(error))
    return None if match is None else f"GLOBAL {match.group(1)}"


def _check_archive(path: str) -> None:
    """Cheap structural checks before torch reads the file: present, non-empty, a sane zip archive."""
    if not os.path.exists(path):
        raise CheckpointError(path, "does not exist")
    if os.path.isdir(path):
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(path, "is empty (0 bytes)")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":
        raise CheckpointError(path, f"is not an effcompile checkpoint: not a torch.save zip archive "
                                    f"(the file starts with {magic!r}); effcompile loads no legacy pickles")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except Exception as error:  # BadZipFile, NotImplementedError (version), struct.error, ...: a damaged directory
        raise CheckpointError(path, f"is truncated or corrupt ({_first_line(error)})") from None
    if not members:
        raise CheckpointError(path, "is truncated or corrupt (an empty zip archive)")
    for member in members:  # torch stores records uncompressed: none can be larger than the file
        if member.file_size > size or member.compress_size > size:
            raise CheckpointError(path, f"is truncated or corrupt (record {member.filename!r} claims "
                                        f"{member.file_size} bytes in a {size}-byte file)")


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """The payload dict of the checkpoint at ``path``, read as plain data (no code runs) and verified.

    Checks that the file is an effcompile checkpoint of a supported format version whose checksum
    matches; raises :class:`CheckpointError` otherwise.  Does not look at any model.
    """
    path = os.fspath(path)
    _check_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports corruption as RuntimeError, OSError, UnpicklingError, EOFError, ...
        unsafe = _unsafe_reason(error)
        if unsafe is not None:
            raise CheckpointError(path, f"refused: it holds Python objects that only code could rebuild ({unsafe}); "
                                        "effcompile loads checkpoints as plain data only (weights_only=True) and "
                                        "never runs code from a file. If it is a checkpoint of an older effcompile "
                                        "that you trust, load it once with torch.load(path, weights_only=False), "
                                        "replace the objects in its 'extra' by plain data and save it again with "
                                        "effcompile.save_checkpoint") from None
        raise CheckpointError(path, f"is truncated or corrupt ({_first_line(error)})") from None
    if not _is_plain_dict(payload) or "format_version" not in payload:
        described = (f"a dict with keys {sorted(map(str, payload))[:8]}" if isinstance(payload, dict)
                     else f"a {type(payload).__name__}")
        raise CheckpointError(path, f"is not an effcompile checkpoint (it holds {described}, with no format_version; "
                                    "write checkpoints with effcompile.save_checkpoint)")
    version = payload["format_version"]
    if type(version) is not int:
        raise CheckpointError(path, f"is corrupt: format_version is {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(path, f"has format version {version}, newer than this effcompile supports "
                                    f"({FORMAT_VERSION}): upgrade effcompile to load it")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(path, f"has format version {version}, which this effcompile cannot read "
                                    f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    missing = [key for key in _PAYLOAD_KEYS if key not in payload]
    if version >= 2 and "checksum" not in payload:
        missing.append("checksum")
    if missing:
        raise CheckpointError(path, f"is corrupt: entries {missing} are missing")
    if version >= 2:
        stored = payload["checksum"]
        if not (_is_plain_dict(stored) and stored.get("algorithm") == CHECKSUM_ALGORITHM):
            raise CheckpointError(path, f"is corrupt: unreadable checksum entry {stored!r}")
        try:
            actual = _checksum(payload)["digest"]
        except Exception as error:
            raise CheckpointError(path, f"is corrupt (checksum not computable: {_first_line(error)})") from None
        if actual != stored.get("digest"):
            raise CheckpointError(path, f"is corrupt: checksum mismatch (stored {CHECKSUM_ALGORITHM} "
                                        f"{str(stored.get('digest'))[:16]}…, contents hash to {actual[:16]}…)")
    if not _is_plain_dict(payload["extra"]):
        raise CheckpointError(path, f"is corrupt: 'extra' is a {type(payload['extra']).__name__}, not a dict")
    return payload


# ------------------------------------------------------------------------------ validation
def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}"


def check_applied_layers(path: PathLike, payload: Dict[str, Any], model: nn.Module) -> None:
    """Refuse a checkpoint of a model transformed differently from ``model``."""
    saved = payload["applied_layers"]
    current = _applied_layers(model)
    normalised = ([tuple(row) if isinstance(row, (list, tuple)) else row for row in saved]
                  if isinstance(saved, (list, tuple)) else saved)
    if normalised != current:
        raise CheckpointError(path, f"was saved from a model transformed differently: checkpoint layers {saved} "
                                    f"vs model layers {current}")


def _owner(model: nn.Module, key: str) -> Tuple[Optional[nn.Module], str]:
    """The module holding state entry ``key`` (None if the model has no such module) and its local name."""
    owner_path, _, name = key.rpartition(".")
    try:
        return (model.get_submodule(owner_path) if owner_path else model), name
    except AttributeError:
        return None, name


def _resizable(model: nn.Module, key: str) -> bool:
    """A buffer whose module adapts its shape on load (a load_state_dict pre-hook)."""
    owner, name = _owner(model, key)
    return owner is not None and name in dict(owner.named_buffers(recurse=False)) \
        and bool(owner._load_state_dict_pre_hooks)


def _legacy(model: nn.Module, key: str) -> bool:
    """State an older version saved that the module now accepts and drops on load (its
    ``legacy_state_keys``, e.g. a buffer that became a plain attribute)."""
    owner, name = _owner(model, key)
    return owner is not None and name in getattr(owner, "legacy_state_keys", ())


def check_tensors(path: PathLike, saved: Any, model: nn.Module, keys: Optional[List[str]] = None,
                  strict: bool = True) -> None:
    """Check the saved model state against ``model``: keys (all, or ``keys``), tensor shapes and dtypes."""
    if not _is_plain_dict(saved):
        raise CheckpointError(path, f"is corrupt: the model state is a {type(saved).__name__}, not a dict")
    current = model.state_dict()
    wanted = list(current) if keys is None else list(keys)
    missing = [key for key in wanted if key not in saved]
    if missing:
        raise CheckpointError(path, f"does not fit the model: {len(missing)} state entries are missing "
                                    f"(e.g. {missing[:3]})")
    if strict and keys is None:
        unexpected = [key for key in saved if key not in current and not _legacy(model, key)]
        if unexpected:
            raise CheckpointError(path, f"does not fit the model: {len(unexpected)} unexpected state entries "
                                        f"(e.g. {unexpected[:3]})")
    for key in wanted:
        mine, theirs = current.get(key), saved[key]
        if not isinstance(mine, torch.Tensor):
            continue  # a module's extra state: its own set_extra_state judges it
        if not isinstance(theirs, torch.Tensor):
            raise CheckpointError(path, f"does not fit the model: {key!r} is a {type(theirs).__name__}, "
                                        f"the model holds a tensor of {_describe(mine)}")
        if theirs.dtype != mine.dtype:
            raise CheckpointError(path, f"does not fit the model: {key!r} has dtype {theirs.dtype}, the model's "
                                        f"is {mine.dtype}")
        if theirs.shape != mine.shape and not _resizable(model, key):
            raise CheckpointError(path, f"does not fit the model: {key!r} has shape {tuple(theirs.shape)}, the "
                                        f"model's is {tuple(mine.shape)}")


def _check_optimizer(path: str, saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """The saved optimizer state must have the optimizer's group structure and per-parameter shapes."""
    if saved is None:
        raise CheckpointError(path, "holds no optimizer state (it was saved without an optimizer)")
    if not (_is_plain_dict(saved) and _is_plain_dict(saved.get("state")) and isinstance(saved.get("param_groups"), list)):
        raise CheckpointError(path, "is corrupt: the optimizer state is not a dict of 'state' and 'param_groups'")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise CheckpointError(path, f"does not fit the optimizer: {len(saved['param_groups'])} parameter groups "
                                    f"saved, the optimizer has {len(groups)}")
    parameters: Dict[Any, torch.Tensor] = {}
    for index, (saved_group, group) in enumerate(zip(saved["param_groups"], groups)):
        ids = saved_group.get("params") if _is_plain_dict(saved_group) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            count = len(ids) if isinstance(ids, list) else "no"
            raise CheckpointError(path, f"does not fit the optimizer: parameter group {index} holds {count} "
                                        f"parameters, the optimizer's holds {len(group['params'])}")
        if any(type(i) is not int or i in parameters for i in ids):
            raise CheckpointError(path, f"is corrupt: parameter group {index} lists parameters {ids[:8]}, "
                                        "expected distinct integer ids")
        parameters.update(zip(ids, group["params"]))
    for index, (saved_group, group) in enumerate(zip(saved["param_groups"], groups)):
        for name, value in group.items():
            if name != "params" and name in saved_group and not _same_kind(value, saved_group[name]):
                raise CheckpointError(path, f"does not fit the optimizer: hyperparameter {name!r} of parameter group "
                                            f"{index} is {saved_group[name]!r}, the optimizer's is {value!r}")
    current_state = optimizer.state
    reference_keys = {frozenset(entry) for entry in current_state.values() if entry}
    kinds: Dict[str, str] = {}
    for key, entry in saved["state"].items():
        if key not in parameters:
            raise CheckpointError(path, f"is corrupt: optimizer state for parameter {key!r}, which no group holds")
        if not _is_plain_dict(entry):
            raise CheckpointError(path, f"is corrupt: optimizer state of parameter {key!r} is a {type(entry).__name__}")
        names = frozenset(entry)
        if reference_keys and names not in reference_keys:
            raise CheckpointError(path, f"does not fit the optimizer: the state of parameter {key} holds {sorted(names)}, "
                                        f"the optimizer's holds {sorted(next(iter(reference_keys)))}")
        reference_keys = reference_keys or {names}
        parameter = parameters[key]
        mine = current_state.get(parameter, {})
        for name, value in entry.items():
            kind = "tensor" if isinstance(value, torch.Tensor) else "none" if value is None else type(value).__name__
            if kinds.setdefault(name, kind) != kind:
                raise CheckpointError(path, f"is corrupt: optimizer state {name!r} of parameter {key} is a {kind}, "
                                            f"of other parameters a {kinds[name]}")
            reference = mine.get(name)
            if name == "step":
                if not (type(value) in (int, float) or (isinstance(value, torch.Tensor) and value.numel() == 1
                                                        and value.is_floating_point())):
                    raise CheckpointError(path, f"is corrupt: optimizer state 'step' of parameter {key} is {value!r}")
                continue
            if isinstance(reference, torch.Tensor):
                expected, dtype = reference.shape, reference.dtype
            elif name in _PARAMETER_SHAPED_STATE and value is not None:
                expected, dtype = parameter.shape, parameter.dtype
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(path, f"is corrupt: optimizer state {name!r} of parameter {key} is a {kind}, "
                                                "expected a tensor")
            else:
                continue
            if not isinstance(value, torch.Tensor) or value.shape != expected:
                shown = tuple(value.shape) if isinstance(value, torch.Tensor) else kind
                raise CheckpointError(path, f"does not fit the optimizer: state {name!r} of parameter {key} has shape "
                                            f"{shown}, expected {tuple(expected)}")
            if value.dtype != dtype:
                raise CheckpointError(path, f"does not fit the optimizer: state {name!r} of parameter {key} has dtype "
                                            f"{value.dtype}, expected {dtype}")


def _same_kind(mine: Any, theirs: Any) -> bool:
    """Whether a saved hyperparameter can stand where the optimizer has ``mine`` (None ~ bool for flags)."""
    if mine is None:  # an unset option: a flag or a name (e.g. foreach, fused, line_search_fn)
        return theirs is None or isinstance(theirs, (bool, str))
    if isinstance(mine, bool):
        return theirs is None or isinstance(theirs, bool)
    if isinstance(mine, (int, float)) or (isinstance(mine, torch.Tensor) and mine.numel() == 1):
        if isinstance(theirs, torch.Tensor):
            return theirs.numel() == 1 and theirs.dtype != torch.bool
        return type(theirs) in (int, float)
    if isinstance(mine, (list, tuple)):
        return (isinstance(theirs, (list, tuple)) and len(theirs) == len(mine)
                and all(_same_kind(a, b) for a, b in zip(mine, theirs)))
    if isinstance(mine, str):
        return theirs is None or isinstance(theirs, str)
    return True


def _check_rng(path: str, rng: Any) -> None:
    if not (_is_plain_dict(rng) and isinstance(rng.get("cpu"), torch.Tensor) and isinstance(rng.get("cuda"), (list, tuple))):
        raise CheckpointError(path, "is corrupt: the RNG state is not {'cpu': tensor, 'cuda': [tensors]}")
    reference = torch.get_rng_state()
    states = [rng["cpu"]] + list(rng["cuda"])
    if any(not isinstance(s, torch.Tensor) or s.dtype != torch.uint8 or s.dim() != 1 for s in states):
        raise CheckpointError(path, "is corrupt: an RNG state is not a 1-D uint8 tensor")
    if rng["cpu"].shape != reference.shape:
        raise CheckpointError(path, f"is corrupt: the CPU RNG state has {rng['cpu'].numel()} bytes, "
                                    f"expected {reference.numel()}")
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) > torch.cuda.device_count():
        raise CheckpointError(path, f"holds RNG states of {len(rng['cuda'])} GPUs, this machine has "
                                    f"{torch.cuda.device_count()}; load with restore_rng=False")


# ------------------------------------------------------------------------------ loading
def _model_snapshot(model: nn.Module) -> Dict[str, Any]:
    import copy

    return {key: value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            for key, value in model.state_dict().items()}


def _optimizer_snapshot(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    state = optimizer.state_dict()  # references the live state tensors, which loading replaces, never mutates
    return {"state": {key: dict(entry) for key, entry in state["state"].items()},
            "param_groups": [dict(group, params=list(group["params"])) for group in state["param_groups"]]}


def load_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    restore_rng: bool = True) -> Dict[str, Any]:
    """Restore a checkpoint written by ``save_checkpoint``; returns its ``extra`` dict.

    Nothing from the file runs as code.  Raises :class:`CheckpointError` (naming ``path``) if the
    file is missing, empty, truncated or corrupt (checksum), not an effcompile checkpoint, of an
    unsupported format version, from a model transformed differently, or holds tensors that do
    not fit ``model``/``optimizer``; the model, optimizer and RNG are then left exactly as they were.
    """
    path = os.fspath(path)
    payload = read_checkpoint(path)
    model = _unwrap(model)
    try:
        check_applied_layers(path, payload, model)
        check_tensors(path, payload["model"], model)
        if optimizer is not None:
            _check_optimizer(path, payload["optimizer"], optimizer)
        if restore_rng:
            _check_rng(path, payload["rng"])
    except CheckpointError:
        raise
    except Exception as error:  # a structure no check foresaw: still this file's fault, reported as such
        raise CheckpointError(path, f"is corrupt: unexpected contents ({_first_line(error)})") from None
    # Commit; a failure past the checks (a module's own load hook refusing a value) rolls everything back.
    model_before = _model_snapshot(model)
    optimizer_before = None if optimizer is None else _optimizer_snapshot(optimizer)
    rng_before = torch.get_rng_state()
    stage = "model"
    try:
        model.load_state_dict(_model_state_for(model, payload["model"]))
        if optimizer is not None:
            stage = "optimizer"
            optimizer.load_state_dict(_optimizer_state_for(optimizer, payload["optimizer"]))
        if restore_rng:
            stage = "RNG"
            torch.set_rng_state(payload["rng"]["cpu"])
            if payload["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    except Exception as error:
        model.load_state_dict(model_before)
        if optimizer_before is not None:
            optimizer.load_state_dict(optimizer_before)
        torch.set_rng_state(rng_before)
        raise CheckpointError(path, f"does not fit the {stage}, nothing was loaded ({_first_line(error)})") from None
    return payload["extra"]
