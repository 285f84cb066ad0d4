"""Subcommands that a technique adds to the ``effcompile`` command line.

The core CLI (``effcompile train | report | inspect | bench``) names no technique.  A technique
whose runtime has its own command (the multi-process stage runtime's ``effcompile stages``)
registers it here when its package is imported::

    register_command("stages", help="...", entry="effcompile.passes.<technique>.runtime.launcher:command")

``entry`` is ``"module:function"``, imported only when the command runs, so ``effcompile --help``
stays light.  The function takes ``(argv, prog)``, parses ``argv`` itself (the CLI hands it every
argument after the command's name, options included) and returns the exit status: 0 on success,
2 for a usage or input error after printing one line to stderr.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Callable, Dict, Sequence

__all__ = ["Command", "COMMANDS", "register_command", "run_command"]


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    entry: str  # "module:function"

    def load(self) -> Callable[[Sequence[str], str], int]:
        module_name, _, function_name = self.entry.partition(":")
        return getattr(importlib.import_module(module_name), function_name)


COMMANDS: Dict[str, Command] = {}


def register_command(name: str, *, help: str, entry: str) -> Command:
    """Add ``effcompile NAME`` (idempotent for the same entry; a clash with another entry raises)."""
    if ":" not in entry:
        raise ValueError(f"command {name!r}: entry must be 'module:function', got {entry!r}")
    command = Command(name, help, entry)
    existing = COMMANDS.get(name)
    if existing is not None and existing.entry != entry:
        raise ValueError(f"command {name!r} is already registered by {existing.entry}")
    COMMANDS[name] = command
    return command


def run_command(name: str, argv: Sequence[str], prog: str) -> int:
    """Run a registered command; its argparse's ``--help`` and usage errors become exit statuses."""
    try:
        status = COMMANDS[name].load()(list(argv), prog)
    except SystemExit as exc:  # the command's argparse printed help or a usage error
        if isinstance(exc.code, str):  # SystemExit("message"): print it as the interpreter would
            print(exc.code, file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return int(status or 0)
