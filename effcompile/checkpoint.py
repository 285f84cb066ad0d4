"""Checkpoints that hold everything needed to resume a transformed run exactly.

``state_dict`` of a transformed model already holds all pass state (decorrelation matrices and
counters).  What it cannot hold is the random-number state that the passes draw from (the R
update samples rows), so a resumed run would diverge from an uninterrupted one.  A checkpoint
therefore stores model, optimizer, the torch RNG states and the Plan, and loading checks that the
model was transformed the same way.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from .api import _unwrap, plan_of

__all__ = ["save_checkpoint", "load_checkpoint"]

FORMAT_VERSION = 1


def _applied_layers(model: nn.Module) -> list:
    plan = plan_of(model)
    return [] if plan is None else sorted((row.layer, row.pass_name) for row in plan.applied())


def save_checkpoint(path: Union[str, os.PathLike], model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    extra: Optional[Dict[str, Any]] = None) -> None:
    """Write model, optimizer, RNG states and the applied Plan to ``path`` (atomically)."""
    model = _unwrap(model)
    payload = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "applied_layers": _applied_layers(model),
        "extra": extra or {},
    }
    temporary = f"{os.fspath(path)}.tmp"
    torch.save(payload, temporary)
    os.replace(temporary, path)  # a crash mid-write never leaves a truncated checkpoint behind


def load_checkpoint(path: Union[str, os.PathLike], model: nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None, restore_rng: bool = True) -> Dict[str, Any]:
    """Restore a checkpoint written by ``save_checkpoint``; returns its ``extra`` dict."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not an effcompile checkpoint of format {FORMAT_VERSION}")
    model = _unwrap(model)
    if payload["applied_layers"] != _applied_layers(model):
        raise ValueError(f"{path} was saved from a model transformed differently: checkpoint layers "
                         f"{payload['applied_layers']} vs model layers {_applied_layers(model)}")
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError(f"{path} holds no optimizer state")
        optimizer.load_state_dict(payload["optimizer"])
    if restore_rng:
        torch.set_rng_state(payload["rng"]["cpu"])
        if payload["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return payload["extra"]
