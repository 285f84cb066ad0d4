"""The Plan: every per-layer decision of every pass, keyed by module path.

Analyses fill the Plan once, at transform time; every entry point (eager transform, the
``effcompile`` torch.compile backend, ONNX export and its inspection, the CLI) reads the same
Plan and nothing re-decides.  A layer that a pass cannot handle is recorded with
``Action.SKIP`` and the reason, so nothing is skipped silently; a combination of passes that
cannot work is an ``Action.REFUSE`` row, and ``transform`` raises before it changes the model.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from typing import Any, Callable, Dict, Iterator, List, Optional

__all__ = ["Action", "PlanRow", "Plan", "PlanRefused", "layer_key"]


class Action(str, enum.Enum):
    """What a pass does with one layer (the ``details`` say how: mode, stage, k, ...)."""

    REWRITE = "rewrite"  # the pass rewrites this layer (a fused weight, a sketched backward, a selected loss)
    ASSIGN = "assign"    # the layer is placed in one part of the rewritten model (``details["stage"]``)
    SKIP = "skip"        # the pass leaves this layer as it is; ``reason`` says why
    REFUSE = "refuse"    # this combination cannot work; ``transform`` raises with the reason, the model untouched

    def __str__(self) -> str:
        return self.value


class PlanRefused(ValueError):
    """``transform`` was asked for a combination the passes refuse; ``rows`` are the REFUSE rows."""

    def __init__(self, rows: List["PlanRow"]) -> None:
        self.rows = rows
        super().__init__("; ".join(f"{row.pass_name} refuses {row.layer}: {row.reason}" for row in rows))


def layer_key(owner_path: str, attr: str) -> str:
    """The Plan key of a weight: its owner module path, plus the attribute when it is not ``weight``."""
    key = owner_path if attr == "weight" else ".".join(filter(None, [owner_path, attr]))
    return key or "<root>"


@dataclasses.dataclass
class PlanRow:
    """One decision: ``pass_name`` does ``action`` on the layer at ``layer`` (a module path)."""

    layer: str
    pass_name: str
    action: Action
    reason: str = ""
    op: str = ""
    input_shape: Optional[tuple] = None
    weight_shape: Optional[tuple] = None
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # What the pass needs to apply the decision (analysis results); not shown or serialised.
    spec: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "action":  # text from JSON or a pass becomes the enum; anything else is refused
            try:
                value = Action(value)
            except ValueError:
                raise ValueError(f"PlanRow.action={value!r} is invalid: expected one of "
                                 f"{[a.value for a in Action]}") from None
        super().__setattr__(name, value)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "PlanRow":
        # ``spec`` is shared, not copied: it is read-only analysis from transform time, and it may
        # hold a torch.fx graph whose node chain copy.deepcopy walks recursively (past Python's
        # recursion limit on a few hundred nodes), so deep copies of a transformed model (an EMA
        # copy, fold without inplace) failed.
        fields = {f.name: copy.deepcopy(getattr(self, f.name), memo) for f in dataclasses.fields(self)
                  if f.name != "spec"}
        return PlanRow(**fields, spec=self.spec)

    @property
    def applied(self) -> bool:
        return self.action in (Action.REWRITE, Action.ASSIGN)

    @property
    def skipped_by_config(self) -> bool:
        """A skip the config asked for (``details["skipped_by"]`` names the field): shown in the
        Plan, not warned about, unlike a layer the pass cannot handle."""
        return self.action is Action.SKIP and "skipped_by" in self.details

    def to_dict(self) -> Dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spec"}
        row["action"] = self.action.value
        return row


class Plan:
    """An ordered collection of :class:`PlanRow` with table and JSON views."""

    columns = ("layer", "pass", "action", "op", "input", "weight", "details", "reason")

    def __init__(self, rows: Optional[List[PlanRow]] = None) -> None:
        self.rows: List[PlanRow] = list(rows or [])

    def add(self, row: PlanRow) -> PlanRow:
        self.rows.append(row)
        return row

    def __iter__(self) -> Iterator[PlanRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PlanRow:
        return self.rows[index]

    def where(self, predicate: Callable[[PlanRow], bool]) -> "Plan":
        return Plan([row for row in self.rows if predicate(row)])

    def for_pass(self, pass_name: str) -> "Plan":
        return self.where(lambda row: row.pass_name == pass_name)

    def applied(self) -> "Plan":
        return self.where(lambda row: row.applied)

    def skipped(self) -> "Plan":
        return self.where(lambda row: not row.applied)

    def layers(self) -> List[str]:
        return [row.layer for row in self.rows]

    def row(self, layer: str, pass_name: Optional[str] = None) -> PlanRow:
        for candidate in self.rows:
            if candidate.layer == layer and (pass_name is None or candidate.pass_name == pass_name):
                return candidate
        raise KeyError(f"no plan row for layer {layer!r}" + (f" and pass {pass_name!r}" if pass_name else ""))

    def to_dict(self) -> List[Dict[str, Any]]:
        return [row.to_dict() for row in self.rows]

    @classmethod
    def from_dict(cls, rows: List[Dict[str, Any]]) -> "Plan":
        """Inverse of :meth:`to_dict` (the decisions only: no analysis results)."""
        return cls([PlanRow(**row) for row in rows])

    def table_rows(self) -> List[List[str]]:
        def fmt_shape(shape: Optional[tuple]) -> str:
            return "" if shape is None else "x".join(str(s) for s in shape)

        def fmt_details(details: Dict[str, Any]) -> str:
            return " ".join(f"{key}={value}" for key, value in details.items())

        return [
            [row.layer, row.pass_name, row.action.value, row.op, fmt_shape(row.input_shape),
             fmt_shape(row.weight_shape), fmt_details(row.details), row.reason]
            for row in self.rows
        ]

    def table(self) -> str:
        """A plain-text table (no terminal codes, so it pastes into logs and Markdown)."""
        body = self.table_rows()
        widths = [max([len(header)] + [len(line[i]) for line in body]) for i, header in enumerate(self.columns)]
        render = lambda cells: "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
        lines = [render(list(self.columns)), render(["-" * w for w in widths])]
        lines += [render(line) for line in body]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        applied = len(self.applied())
        return f"Plan({len(self.rows)} rows, {applied} applied, {len(self.rows) - applied} skipped)"
