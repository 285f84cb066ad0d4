"""The config base and the config registry.

Every pass config is a frozen dataclass that checks its fields in ``__post_init__`` and raises
``ValueError`` naming the field and the allowed range, so a bad value fails at construction and
never halfway through training.  ``to_dict``/``config_from_dict`` round-trip a config through JSON
(the CLI and checkpoints use them).

A technique registers its config class with ``@register_config``; ``PASS_CONFIGS`` maps the
pass name (``config.name``) to the class.  The core never names a technique: the configs live
in their technique folders (``effcompile.passes.<technique>.config``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Dict, Type, TypeVar

__all__ = ["PassConfig", "PASS_CONFIGS", "register_config", "config_from_dict", "is_real", "is_int"]


def is_real(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base class of every pass configuration."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def to_dict(self) -> Dict[str, Any]:
        return {"pass": self.name, "version": self.version, **dataclasses.asdict(self)}

    def _fail(self, field: str, allowed: str) -> None:
        value = getattr(self, field)
        raise ValueError(f"{type(self).__name__}.{field}={value!r} is invalid: expected {allowed}")


# pass name → config class, filled by @register_config as each technique is imported.
PASS_CONFIGS: Dict[str, Type[PassConfig]] = {}

ConfigType = TypeVar("ConfigType", bound=Type[PassConfig])


def register_config(cls: ConfigType) -> ConfigType:
    """Class decorator: make ``cls`` known by ``cls.name`` (to the CLI, checkpoints, ``config_from_dict``)."""
    if not (isinstance(cls, type) and issubclass(cls, PassConfig) and cls.name):
        raise TypeError(f"register_config expects a PassConfig subclass with a non-empty name, got {cls!r}")
    existing = PASS_CONFIGS.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name {cls.name!r} is taken by {existing.__qualname__}")
    PASS_CONFIGS[cls.name] = cls
    return cls


def config_from_dict(data: Dict[str, Any]) -> PassConfig:
    """Inverse of ``PassConfig.to_dict``; raises ``ValueError`` for an unknown pass or field."""
    data = dict(data)
    name = data.pop("pass", None)
    if name not in PASS_CONFIGS:
        raise ValueError(f"unknown pass {name!r}; known passes: {sorted(PASS_CONFIGS)}")
    cls = PASS_CONFIGS[name]
    version = data.pop("version", cls.version)
    if version != cls.version:
        raise ValueError(f"{cls.__name__} version {version} is not supported (this is version {cls.version})")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}; fields: {sorted(fields)}")
    return cls(**data)
