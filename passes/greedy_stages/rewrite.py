"""Greedy local-loss stages: Decoupled Greedy Learning (Belilovsky, Eickenberg, Oyallon, ICML 2020).

Model before: one forward ``y = f_K(…f_2(f_1(x)))`` trained by one loss ``L(y, t)`` whose
gradient flows through every layer.

Model after ``transform(model, GreedyStages(K), example_inputs=...)``:

* ``model.greedy_stage_heads`` (an ``nn.ModuleList``, so parameters, ``state_dict`` and
  checkpoints include it; every original key is unchanged) holds the aux heads ``h_1 … h_{K−1}``.
* The stages ``f_k`` are ``fx.GraphModule`` objects cut from a symbolic trace of the model at
  automatically chosen single-activation boundaries (``cut_search.py``: any point where one
  activation crosses, module ends preferred on ties; constants, flags and shape values are
  recomputed per stage, never passed).  They call the
  original leaf modules and parameters (shared objects), and live outside the module tree
  (``model.__dict__``) so no parameter is duplicated in ``state_dict``.
* ``model(x)`` still runs the original forward, which equals ``f_K∘…∘f_1`` exactly.
* ``effcompile.train_step`` runs, for k = 1..K::

      o_k = f_k(x_k);  L_k = loss(h_k(o_k), t)   (h_K = identity: the model's own output)
      L_k.backward();  x_{k+1} = o_k.detach()     # no gradient crosses a boundary

  and then one optimizer step, so stage k's parameters get gradients from ``L_k`` only, and
  stage k's saved activations are freed before stage k+1 runs.

A root forward that ``torch.fx`` cannot trace (Hugging Face models), or a dict batch the fx path
cannot pass positionally, goes to the block-stack hook path instead (``block_stack.py``: cuts
between the blocks of the model's ModuleList, made by forward hooks on the model's own forward;
Plan ``cut_kind=block-stack hooks``, stage 0's reason says why the fx path was not taken).

``staged_model(model)`` returns the :class:`StagedModel` runtime view (stages, heads, per-stage
parameters, evaluation from any stage; ``BlockStagedModel`` on the hook path); the multi-process
runtime builds on the same names.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from effcompile.compiling import compile_for
from effcompile.cost import StepWork, Work
from effcompile.distributed import DataParallelSync, WrapperForward
from effcompile.inputs import ModelInputs, model_inputs
from effcompile.measure import SavedTensorMeter
from effcompile.passes.analysis.capture import GraphCapture
from effcompile.passes.analysis.state_children import attach, detach
from effcompile.passes.base import ModelPass, StepOptions, register_pass
from effcompile.plan import Action, PlanRow

from .aux_heads import head_kind_for, make_aux_head, make_output_head
from .block_stack import (CUT_KIND, BlockStagedModel, BlockStagePlan, block_stage_losses, make_block_training_loss,
                          plan_block_stages)
from .config import GreedyStages
from .cost import stages_change
from .cut_search import (
    Boundary, StageTraceError, TracedModel, boundary_for_module, count_flops, evaluating, find_boundaries,
    measure_node_costs, merge_equivalent, min_max_partition, probe_batch_values, split_stages, stage_costs,
    trace_for_stages, trainable_elements,
)
from .stage_losses import StageLosses, stage_train_step

__all__ = [
    "GreedyStagesPass", "GreedyStageHeads", "StagedModel", "StagePlan", "staged_model", "make_stage_optimizers",
    "saved_activation_bytes", "HEADS_ATTR",
]

HEADS_ATTR = "greedy_stage_heads"
_STAGED_ATTR = "_effcompile_greedy_stages"
_TAPS_ATTR = "_effcompile_stage_feature_taps"  # gradient matching's per-stage head inputs


class GreedyStageHeads(nn.ModuleList):
    """The aux heads of a staged model, one per stage but the last (``greedy_stage_heads.k``).

    A checkpoint saved before the transform has no heads: it loads with ``strict=True`` and the
    heads keep their values (a checkpoint that holds some of their keys must hold them all)."""

    def __init__(self, heads=None) -> None:
        super().__init__(heads)
        self._register_load_state_dict_pre_hook(_keep_heads_missing_from_checkpoint, with_module=True)


def _keep_heads_missing_from_checkpoint(module: nn.Module, state_dict, prefix, *args) -> None:
    if any(key.startswith(prefix) for key in state_dict):
        return
    for name, value in module.state_dict().items():
        state_dict[prefix + name] = value.detach().clone()


def _as_tuple(inputs: Any) -> tuple:
    if isinstance(inputs, tuple):
        return inputs
    return tuple(inputs) if isinstance(inputs, list) else (inputs,)


def _unwrap(model: nn.Module) -> nn.Module:
    from effcompile.api import _unwrap as unwrap

    return unwrap(model)


# ------------------------------------------------------------------------------------ plan data
@dataclasses.dataclass
class StagePlan:
    """What ``apply`` needs: the trace, the chosen boundaries and the head choices."""

    traced: TracedModel
    boundaries: List[Boundary]
    head_kinds: List[str]
    head_width: Optional[int]
    num_classes: int
    device: torch.device
    stage_flops: List[int]  # forward+backward FLOPs of each stage body on the example inputs
    head_flops: List[int]  # forward+backward FLOPs of each aux head (0 for the last stage)
    stage_cost: List[float]  # the partition objective per stage (FLOPs + heads + weighted bytes)
    stage_modules: List[List[str]]
    stage_attributes: List[List[str]]  # parameters/buffers used directly (get_attr) per stage
    stage_weights: List[int] = dataclasses.field(default_factory=list)  # trainable elements per stage
    warnings: List[str] = dataclasses.field(default_factory=list)  # per stage: "" or why it is negligible
    input_names: Optional[List[str]] = None  # a dict batch: the forward parameters its keys fill, in order
    # Per aux head: "" or why its kind differs from head="auto"'s (max_head_overhead)
    head_choices: List[str] = dataclasses.field(default_factory=list)

    def flop_share(self, k: int) -> float:
        """Stage k's share of the model's forward+backward FLOPs (stage bodies, heads excluded)."""
        return self.stage_flops[k] / max(sum(self.stage_flops), 1)

    def weight_share(self, k: int) -> float:
        """Stage k's share of the model's trainable parameter elements (heads excluded)."""
        return self.stage_weights[k] / max(sum(self.stage_weights), 1)


def _stage_contents(traced: TracedModel, positions: Sequence[int]) -> Tuple[List[List[str]], List[List[str]]]:
    """Leaf modules called, and parameters/buffers read directly, per stage (a read shared by
    several stages, e.g. a buffer mask, is listed in the first)."""
    edges = [-1] + list(positions) + [len(traced.nodes) - 1]
    modules, attributes, seen = [], [], set()
    for s in range(len(edges) - 1):
        nodes = traced.nodes[edges[s] + 1: edges[s + 1] + 1]
        called = [n.target for n in nodes if n.op == "call_module"]
        used = [n.target for n in nodes if n.op == "get_attr" and n.target not in seen]
        used += [a.target for n in nodes for a in n.all_input_nodes if a.op == "get_attr" and a.target not in seen]
        used = list(dict.fromkeys(used))
        seen.update(used)
        modules.append(list(dict.fromkeys(called)))
        attributes.append(used)
    return modules, attributes


def _stage_weights(traced: TracedModel, modules: List[List[str]], attributes: List[List[str]]) -> List[int]:
    gm = traced.graph_module
    out = []
    for paths, targets in zip(modules, attributes):
        found = {}
        for path in paths:
            for p in gm.get_submodule(path).parameters():
                found[id(p)] = p
        for target in targets:
            value = _fetch(gm, target)
            if isinstance(value, nn.Parameter):
                found[id(value)] = value
        out.append(sum(p.numel() for p in found.values() if p.requires_grad))
    return out


def _negligible_stages(plan: "StagePlan", threshold: float) -> List[str]:
    """Per stage: "" or the warning for a stage below ``threshold`` of both FLOPs and weights."""
    out = []
    for k in range(len(plan.stage_flops)):
        flops, weights = plan.flop_share(k), plan.weight_share(k)
        if threshold > 0 and flops < threshold and weights < threshold:
            where = "before the first cut" if k == 0 else f"after cut {plan.boundaries[k - 1].name!r}"
            out.append(f"stage {k} ({where}) is negligible: {100 * flops:.1f}% of the fwd+bwd FLOPs and "
                       f"{100 * weights:.1f}% of the trainable weights (< {100 * threshold:g}%); its local loss "
                       "trains little. The model offers no better-balanced cut at this K: lower num_stages, "
                       "choose cuts=, or set min_stage_share=0 to silence this")
        else:
            out.append("")
    return out


class _HeadCosts:
    """Forward+backward FLOPs of the aux head for a boundary, measured once per (shape, kind)."""

    def __init__(self, num_classes: int, kind: str, width: Optional[int]) -> None:
        self.num_classes, self.kind, self.width = num_classes, kind, width
        self._cache: Dict[Tuple, int] = {}

    def __call__(self, boundary: Boundary) -> int:
        key = (boundary.shape, boundary.dtype)
        if key not in self._cache:
            with torch.random.fork_rng(devices=[]):  # measuring must not move the user's RNG
                head = make_aux_head(boundary.shape, self.num_classes, self.kind, self.width).to(boundary.dtype).eval()
                probe = torch.randn(boundary.shape, dtype=boundary.dtype)
                cost, _ = count_flops(head, (probe,), parameters=list(head.parameters()))
            self._cache[key] = cost.total
        return self._cache[key]


def plan_stages(model: nn.Module, example_inputs: Sequence[Any], config: GreedyStages,
                decided: Optional[Sequence[int]] = None, decided_kinds: Optional[Sequence[str]] = None) -> StagePlan:
    """Trace, measure and cut ``model`` (read-only: the model's state is left untouched).

    ``decided``: the cut positions (traced-node indices) of a Plan decided elsewhere — a stage
    process applying its launcher's Plan.  Then nothing is measured or searched: the trace gives
    the boundary values, the positions are checked to be boundaries of this trace, and the FLOP
    fields of the result stay empty (the Plan rows already hold them); ``decided_kinds`` are its
    aux heads' kinds.
    """
    if model._forward_hooks or model._forward_pre_hooks:
        raise ValueError(f"greedy_stages: the root module {type(model).__name__} carries forward hooks, which the "
                         "stages (cut from inside its forward) would not run; apply greedy_stages to a model "
                         "whose root has no hooks")
    traced = trace_for_stages(model, num_inputs=len(example_inputs))
    values, costs = measure_node_costs(traced, example_inputs, count=decided is None)
    probe = probe_batch_values(traced, example_inputs)
    result = traced.nodes[-1].args[0]
    output = values.get(result.name) if isinstance(result, fx.Node) else None
    if not (isinstance(output, torch.Tensor) and output.dim() >= 1):
        raise ValueError(f"greedy_stages: {type(model).__name__} must return one logits tensor (classes on the last "
                         "axis) so aux heads know the number of classes")
    _check_batch_first(model, traced, output, probe.get(result.name) if probe is not None else None)
    num_classes = int(output.shape[-1])
    boundaries, live_counts = find_boundaries(traced, values, probe)
    node_totals = [cost.total for cost in costs]
    if decided is not None:
        return _decided_plan(traced, boundaries, decided, num_classes, output.device, config, decided_kinds)
    head_cost = _HeadCosts(num_classes, config.head, config.head_width)
    if config.cuts is not None:
        chosen = _user_cuts(model, traced, boundaries, live_counts, config)
    else:
        chosen = _automatic_cuts(model, traced, boundaries, node_totals, head_cost, config)
    positions = [b.position for b in chosen]
    by_position = {b.position: b for b in chosen}
    edges = [-1] + positions + [len(traced.nodes) - 1]
    stage_flops = [sum(node_totals[edges[s] + 1: edges[s + 1] + 1]) for s in range(config.num_stages)]
    kinds, head_flops, choices = _budgeted_heads(chosen, stage_flops, head_cost, num_classes, config)
    flops_at = {b.position: flops for b, flops in zip(chosen, head_flops)}
    objective = stage_costs(node_totals, positions, lambda p: flops_at[p],
                            lambda p: by_position[p].nbytes, config.bytes_weight)
    modules, attributes = _stage_contents(traced, positions)
    plan = StagePlan(traced, chosen, kinds, config.head_width,
                     num_classes, output.device, stage_flops, head_flops + [0], objective,
                     modules, attributes, _stage_weights(traced, modules, attributes), head_choices=choices)
    plan.warnings = _negligible_stages(plan, config.min_stage_share)
    return plan


def _check_batch_first(model: nn.Module, traced: TracedModel, output: torch.Tensor, probed: Any) -> None:
    """Stages cut batch-first activations and each aux head gives one row per sample, like the
    model's output: on a batch one row longer along the inputs' first axis (the probe) the
    output must grow by one row too.  A sequence-first model (``nn.TransformerEncoderLayer``
    without ``batch_first=True``) whose output is per sample fails this: its activations'
    first axis is time, and an aux head would give one row per time step."""
    if not isinstance(probed, torch.Tensor):
        return  # no probe (a fixed batch size): nothing to compare
    first = next((node for node in traced.nodes[: traced.num_inputs] if node.op == "placeholder"), None)
    if probed.dim() >= 1 and probed.shape[0] == output.shape[0] + 1:
        return
    raise ValueError(
        f"greedy_stages: {type(model).__name__}'s output {tuple(output.shape)} does not follow the first axis of its "
        f"input{f' {first.name!r}' if first is not None else ''}: with one more entry along that axis the output is "
        f"{tuple(probed.shape)}.  Greedy stages cut batch-first activations; make the model batch-first (e.g. "
        "nn.TransformerEncoderLayer(..., batch_first=True)) or pass batch-first inputs")


def _budgeted_heads(chosen: List[Boundary], stage_flops: List[int], head_cost: "_HeadCosts", num_classes: int,
                    config: GreedyStages) -> Tuple[List[str], List[int], List[str]]:
    """Each cut's aux head kind and fwd+bwd FLOPs under ``max_head_overhead`` (config.py), and why
    a head was replaced by the linear one ("" where it was not)."""
    kinds = [head_kind_for(b.shape, config.head) for b in chosen]
    flops = [head_cost(b) for b in chosen]
    choices = [""] * len(chosen)
    budget = 1.0 if config.max_head_overhead == "auto" else config.max_head_overhead
    if budget is None or config.head != "auto" or config.head_width is not None:
        return kinds, flops, choices  # the user chose the heads
    linear = _HeadCosts(num_classes, "linear", None)
    for k, boundary in enumerate(chosen):
        ratio = flops[k] / max(stage_flops[k], 1)
        if kinds[k] != "linear" and ratio > budget:
            choices[k] = (f"linear: the {kinds[k]} head costs {ratio:.1f}x its stage's fwd+bwd FLOPs, above "
                          f"max_head_overhead={config.max_head_overhead} ({budget:g})")
            kinds[k], flops[k] = "linear", linear(boundary)
    return kinds, flops, choices


def _decided_plan(traced: TracedModel, boundaries: List[Boundary], decided: Sequence[int], num_classes: int,
                  device: torch.device, config: GreedyStages, kinds: Optional[Sequence[str]] = None) -> StagePlan:
    by_position = {b.position: b for b in boundaries}
    missing = [p for p in decided if p not in by_position]
    if missing or len(decided) != config.num_stages - 1:
        raise ValueError(f"greedy_stages: the decided cuts {list(decided)} are not {config.num_stages - 1} boundaries "
                         f"of this model's trace ({len(traced.nodes)} nodes): the process built a different model "
                         "than the one the Plan was made for")
    chosen = [by_position[p] for p in decided]
    modules, attributes = _stage_contents(traced, list(decided))
    kinds = list(kinds) if kinds else [head_kind_for(b.shape, config.head) for b in chosen]
    return StagePlan(traced, chosen, kinds, config.head_width,
                     num_classes, device, [], [], [], modules, attributes, _stage_weights(traced, modules, attributes))


def _user_cuts(model: nn.Module, traced: TracedModel, boundaries: List[Boundary], live_counts: List[int],
               config: GreedyStages) -> List[Boundary]:
    """The boundaries right after the modules named in ``config.cuts`` (validated)."""
    chosen = [boundary_for_module(traced, model, path, boundaries, live_counts) for path in config.cuts]
    for path, boundary in zip(config.cuts, chosen):
        if not _head_fits(boundary.shape, config.head):
            raise ValueError(f"greedy_stages: cut {path!r} has boundary shape {boundary.shape}, which head="
                             f"{config.head!r} cannot take; use head='auto'")
    positions = [b.position for b in chosen]
    if any(a >= b for a, b in zip(positions, positions[1:])):
        raise ValueError(f"greedy_stages: cuts={config.cuts} must be distinct boundaries in forward order")
    return chosen


def _automatic_cuts(model: nn.Module, traced: TracedModel, boundaries: List[Boundary], node_totals: List[int],
                    head_cost: _HeadCosts, config: GreedyStages) -> List[Boundary]:
    """The K−1 candidates minimising the most expensive stage (``cut_search.min_max_partition``)."""
    if config.head != "auto":  # an explicit head kind restricts the usable boundaries
        boundaries = [b for b in boundaries if _head_fits(b.shape, config.head)]
    cut_count = config.num_stages - 1
    if len(boundaries) < cut_count:
        fits = "" if config.head == "auto" else f" and head={config.head!r} fits"
        raise ValueError(
            f"greedy_stages: {type(model).__name__} has {len(boundaries)} candidate boundaries (points where exactly "
            f"one activation crosses{fits}), fewer than the {cut_count} cuts that num_stages={config.num_stages} "
            f"needs: {[b.name for b in boundaries]}")
    # Every node can be a candidate: candidates that another one dominates at equal FLOPs go first.
    by_position = {b.position: b for b in merge_equivalent(boundaries, node_totals, head_cost, config.bytes_weight)}
    try:
        positions, _ = min_max_partition(
            node_totals, list(by_position), config.num_stages, head_cost=lambda p: head_cost(by_position[p]),
            boundary_bytes=lambda p: by_position[p].nbytes, bytes_weight=config.bytes_weight,
            trainable=trainable_elements(traced), penalty=lambda p: int(by_position[p].kind != "module"))
    except ValueError as error:
        raise ValueError(f"greedy_stages: {type(model).__name__}: {error}: "
                         f"{[b.name for b in boundaries]}") from None
    return [by_position[p] for p in positions]


def _head_fits(shape: Tuple[int, ...], kind: str) -> bool:
    try:
        head_kind_for(shape, kind)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------------ runtime
class StagedModel:
    """The runtime view of a staged model (kept in ``model.__dict__``, outside the module tree)."""

    def __init__(self, model: nn.Module, stages: List[fx.GraphModule], boundaries: List[Boundary],
                 stage_modules: List[List[str]], stage_attributes: List[List[str]]) -> None:
        self.model = model
        self.stages = stages
        self.boundaries = boundaries
        self._stage_modules = stage_modules
        self._stage_attributes = stage_attributes
        self.input_names: Optional[List[str]] = None  # set for a dict batch (keys → positional inputs)

    def positional(self, inputs: Any) -> tuple:
        """Stage 0's positional inputs from a batch in any form (a dict batch by ``input_names``)."""
        batch = model_inputs(inputs)
        if not batch.kwargs:
            return _as_tuple(inputs)
        names = self.input_names
        if names is None or set(batch.kwargs) != set(names) or batch.args:
            raise ValueError(f"greedy_stages: this model was staged for "
                             f"{'positional inputs' if names is None else f'the keyword inputs {names}'}; got a "
                             f"batch with {len(batch.args)} positional and the keyword inputs {sorted(batch.kwargs)}")
        return tuple(batch.kwargs[name] for name in names)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def heads(self) -> GreedyStageHeads:
        return self.model._modules[HEADS_ATTR]

    @property
    def boundary_shapes(self) -> List[tuple]:
        """Shape of each boundary tensor on the example inputs (batch axis included)."""
        return [b.shape for b in self.boundaries]

    def _check(self, k: int) -> int:
        if not (isinstance(k, int) and -self.num_stages <= k < self.num_stages):
            raise IndexError(f"stage {k!r} out of range for {self.num_stages} stages")
        return k % self.num_stages

    def stage(self, k: int) -> nn.Module:
        """Stage k's body: stage 0 takes the model inputs, stage k>0 the boundary tensor."""
        return self.stages[self._check(k)]

    def head(self, k: int) -> Optional[nn.Module]:
        """Stage k's aux head (None for the last stage, which keeps the model's own output)."""
        k = self._check(k)
        return None if k == self.num_stages - 1 else self.heads[k]

    def stage_modules(self, k: int) -> List[str]:
        """Module paths of the leaf modules stage k calls (its head not included)."""
        return list(self._stage_modules[self._check(k)])

    def stage_attributes(self, k: int) -> List[str]:
        """Paths of parameters/buffers stage k's graph uses directly (``get_attr``, e.g. a ViT pos_embed)."""
        return list(self._stage_attributes[self._check(k)])

    def stage_parameters(self, k: int) -> List[nn.Parameter]:
        """Parameters of stage k's body and head; every parameter belongs to exactly one stage."""
        k = self._check(k)
        found: Dict[int, nn.Parameter] = {}
        for path in self._stage_modules[k]:
            for parameter in self.model.get_submodule(path).parameters():
                found.setdefault(id(parameter), parameter)
        for target in self._stage_attributes[k]:
            value = _fetch(self.model, target)
            if isinstance(value, nn.Parameter):
                found.setdefault(id(value), value)
        head = self.head(k)
        if head is not None:
            for parameter in head.parameters():
                found.setdefault(id(parameter), parameter)
        return list(found.values())

    def local_logits(self, k: int, stage_output: Any) -> Any:
        """``head_k(out)``, or ``out`` itself for the last stage."""
        head = self.head(k)
        return stage_output if head is None else head(stage_output)

    def forward(self, *inputs: Any) -> Any:
        """The stage composition ``f_K∘…∘f_1`` (equal to ``model(*inputs)``)."""
        x = inputs
        for stage in self.stages:
            x = (stage(*x),)
        return x[0]

    def predict(self, inputs: Any, stage: Optional[int] = None) -> torch.Tensor:
        """Logits from stage ``stage``'s head (default: the last stage), in eval mode, without grad."""
        k = self.num_stages - 1 if stage is None else self._check(stage)
        with evaluating(self.model):
            x = self.positional(inputs)
            for j in range(k + 1):
                out = self.stages[j](*x)
                x = (out,)
            return self.local_logits(k, out)

    def __repr__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.boundary_shapes)
        return f"StagedModel({self.num_stages} stages, boundaries: {shapes})"


def _fetch(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def staged_model(model: nn.Module) -> StagedModel:
    """The :class:`StagedModel` of a model transformed with ``GreedyStages``; ``ValueError`` otherwise."""
    base = _unwrap(model)
    staged = base.__dict__.get(_STAGED_ATTR)
    if staged is None:
        raise ValueError(f"{type(base).__name__} is not staged: transform it with effcompile.GreedyStages(...) first")
    return staged


def make_stage_optimizers(staged: StagedModel, optimizer_factory: Callable[[List[nn.Parameter]], Any]) -> List[Any]:
    """One optimizer per stage: ``optimizer_factory(staged.stage_parameters(k))`` for every k."""
    return [optimizer_factory(staged.stage_parameters(k)) for k in range(staged.num_stages)]


# ------------------------------------------------------------------------------------ training
def _stage_loss(loss_fn: Callable, logits: Any, targets: Any, stage: int) -> torch.Tensor:
    """The plain local loss of one stage."""
    return loss_fn(logits, targets)


def _stage_objective(model: nn.Module, loss_fn: Callable) -> Callable[[Any, Any, int], Tuple[torch.Tensor, Any, torch.Tensor]]:
    """Every stage's local loss (and its selection: ``(index, weights)``, or None without the
    sample_selection pass); with the selection pass applied too, the selected subset's loss.

    Composition: each stage scores its batch by its own per-sample local loss, selects ``k`` rows
    (the selector's strategy, shared history) and backpropagates ``Σ w_j ℓ[idx_j]``.  The loss
    goes through ``select_rows``, so under the ``effcompile`` backend the stage's backward runs on
    the selected rows only (forward reuse).  Gradient matching matches each stage's own
    last-layer gradients: the input of the last ``nn.Linear`` of its aux head (the model's head
    for the last stage) and the stage loss's gradient at its logits.
    """
    from effcompile.passes.sample_selection.selectors import output_errors, per_sample_loss_fn, selector_of

    selector = selector_of(model)
    if selector is None:
        def plain_stage_loss(logits: Any, targets: Any, stage: int) -> Tuple[torch.Tensor, Any, torch.Tensor]:
            loss = _stage_loss(loss_fn, logits, targets, stage)
            return loss, None, loss.detach()

        return plain_stage_loss
    from effcompile.passes.sample_selection.row_sparse_backward import select_rows

    per_sample = per_sample_loss_fn(loss_fn)

    taps = _stage_feature_taps(model, selector) if selector.strategy == "gradmatch" else None

    def selected_stage_loss(logits: Any, targets: Any, stage: int) -> Tuple[torch.Tensor, Any, torch.Tensor]:
        # (the selected rows' weighted loss, which is backpropagated; the selection; the
        # full-batch mean of the per-sample losses, which the step reports, as selection alone does)
        losses = per_sample(logits, targets)
        if taps is None:
            index, weights = selector.select(losses.detach())
        else:
            features, bias = taps[stage].take()
            index, weights = selector.select(losses.detach(), features=features,
                                             errors=output_errors(per_sample, logits, targets), head_bias=bias)
        return (select_rows(losses, index) * weights.to(losses.dtype)).sum(), (index, weights), losses.detach().mean()

    return selected_stage_loss


class _LastLinearTap:
    """Forward hooks on every ``nn.Linear`` of an aux head: the input (and bias presence) of the
    last one called — the head's final layer, whose gradient gradient matching approximates."""

    def __init__(self, head: nn.Module) -> None:
        self.value: Optional[Tuple[torch.Tensor, bool]] = None
        self.handles = [module.register_forward_hook(self._record) for module in head.modules()
                        if isinstance(module, nn.Linear)]

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.value = (args[0], module.bias is not None)

    def take(self) -> Tuple[Optional[torch.Tensor], Optional[bool]]:
        value, self.value = self.value, None
        return value if value is not None else (None, None)


class _ModelHeadTap:
    """The last stage's features: the selection pass's tap on the model's own head."""

    def __init__(self, selector: Any) -> None:
        self.selector = selector

    def take(self) -> Tuple[Optional[torch.Tensor], Optional[bool]]:
        tap = self.selector.__dict__.get("_feature_tap")
        features = tap.take() if tap is not None else None
        if features is None:
            raise ValueError("greedy_stages + gradmatch: the model's head was not called as a module in the last stage, "
                             "so its input cannot be read; use strategy 'loss' or 'random' with stages")
        return features, self.selector.head_bias


def _stage_feature_taps(model: nn.Module, selector: Any) -> List[Any]:
    """One feature tap per stage for gradient matching, made once per model (the aux heads' hooks
    are removed by ``fold``)."""
    taps = model.__dict__.get(_TAPS_ATTR)
    if taps is None:
        heads = model._modules[HEADS_ATTR]
        taps = [_LastLinearTap(head) for head in heads] + [_ModelHeadTap(selector)]
        model.__dict__[_TAPS_ATTR] = taps
        model.__dict__.setdefault("_effcompile_hooks", {}).setdefault(GreedyStages.name, []).extend(
            handle for tap in taps[:-1] for handle in tap.handles)
    return taps


def _stage_loss_function(staged: StagedModel, k: int, objective: Callable) -> Callable:
    stage, head = staged.stage(k), staged.head(k)

    def stage_forward_loss(inputs: tuple, targets: Any) -> Tuple[torch.Tensor, Any, Any, torch.Tensor]:
        out = stage(*inputs)
        logits = out if head is None else head(out)
        loss, selection, reported = objective(logits, targets, k)
        # The boundary leaves detached: the next stage gets no gradient path back, and a compiled
        # stage has no tangent for it (which would also make the backward's start dense).
        return loss, out.detach() if isinstance(out, torch.Tensor) else out, selection, reported

    # A distinct code object per stage: torch.compile caches per code object, so stages that
    # shared one would count as recompiles of each other.
    code = stage_forward_loss.__code__
    renamed = code.replace(co_name=f"greedy_stage_{k}_loss")
    if hasattr(code, "co_qualname"):
        renamed = renamed.replace(co_qualname=f"greedy_stage_{k}_loss")
    return types.FunctionType(renamed, stage_forward_loss.__globals__, f"greedy_stage_{k}_loss",
                              stage_forward_loss.__defaults__, stage_forward_loss.__closure__)


class _StageRunner(StageLosses):
    """The stages of the fx path run one after another on one batch: each stage's loss (with a
    composed selection, its selected rows' weighted loss), its input the previous stage's output
    detached.  ``backward_each``: backpropagate each stage's loss as soon as it exists, which
    frees its saved activations before the next stage runs (the step); otherwise the losses are
    returned for one backward of their sum (``effcompile.training_loss``)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, options: StepOptions) -> None:
        from effcompile.passes.sample_selection.selectors import selector_of

        self.staged, self.options = staged_model(model), options
        objective = _stage_objective(_unwrap(model), loss_fn)
        self.selector = selector_of(_unwrap(model))
        functions = [_stage_loss_function(self.staged, k, objective) for k in range(self.staged.num_stages)]
        if options.compile:
            # Static shapes per batch size (a partial last batch compiles once more): a composed
            # selection's row-sparse backward needs the batch size as a number.
            functions = [compile_for(_unwrap(model), fn, backend=options.backend, dynamic=False) for fn in functions]
        self.functions = functions
        self.steps = 0
        self.stage_losses: List[torch.Tensor] = []  # each stage's loss on the whole batch (selection: per-sample mean)
        self.stage_subset_losses: List[torch.Tensor] = []  # what each stage backpropagated
        # The stages call the model's modules piece by piece, never an FSDP2 root's forward, whose
        # hooks unshard the root's own parameters (aux heads, embeddings): run them as that forward.
        self.root = WrapperForward.fsdp_root(model)

    def training_loss(self, inputs: Any, targets: Any) -> torch.Tensor:
        if self.root is None:
            return super().training_loss(inputs, targets)
        return self.root(super().training_loss, inputs, targets)

    def run(self, inputs: Any, targets: Any, backward_each: bool) -> List[torch.Tensor]:
        from effcompile.api import check_finite_loss

        x, losses, reported, subset = self.staged.positional(inputs), [], [], []
        for function in self.functions:
            loss, out, selection, stage_loss = function(x, targets)
            if self.options.check_finite:
                check_finite_loss(loss, self.steps)
            if backward_each:
                self.options.backward(loss)
            else:
                losses.append(loss)
            if selection is not None:  # the report's selection counters: the last stage's selection
                self.selector.record(*selection)
            reported.append(stage_loss)
            subset.append(loss.detach())
            x = (out.detach(),) if isinstance(out, torch.Tensor) else None
        self.stage_losses, self.stage_subset_losses = reported, subset
        self.steps += 1
        return losses


def make_staged_train_step(model: nn.Module, loss_fn: Callable, optimizer: Any, options: StepOptions) -> Callable:
    """The single-process DGL step (see the module docstring); under FSDP2 with one joint backward."""
    staged = staged_model(model)
    sharded = WrapperForward.fsdp_root(model) is not None
    if sharded:
        _hooks_after_fsdp(staged)
    stages = (block_stage_losses(_unwrap(model), staged, _stage_objective(_unwrap(model), loss_fn), options)
              if isinstance(staged, BlockStagedModel) else _StageRunner(model, loss_fn, options))
    return stage_train_step(stages, optimizer, options, sync=None if sharded else DataParallelSync.of(model),
                            joint=sharded, stage_parameters=[staged.stage_parameters(k) for k in range(staged.num_stages)])


def _hooks_after_fsdp(staged: Any) -> None:
    if isinstance(staged, BlockStagedModel):
        staged.hooks_after_fsdp()


def make_staged_training_loss(model: nn.Module, loss_fn: Callable, options: StepOptions) -> Callable:
    """``effcompile.training_loss`` for a staged model: the sum of the stage losses."""
    staged = staged_model(model)
    if WrapperForward.fsdp_root(model) is not None:
        _hooks_after_fsdp(staged)
    if isinstance(staged, BlockStagedModel):
        return make_block_training_loss(_unwrap(model), staged, _stage_objective(_unwrap(model), loss_fn), options)
    return _StageRunner(model, loss_fn, options).training_loss


# ------------------------------------------------------------------------------------ memory
def saved_activation_bytes(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable) -> Dict[str, Any]:
    """Peak bytes of saved activations of one plain-backprop step vs one staged step.

    Returns ``{"backprop_peak_bytes", "staged_peak_bytes", "stage_peak_bytes": [...], "ratio"}``
    (``ratio`` = staged / backprop).  The model's buffers (BatchNorm statistics, pass state),
    gradients and RNG are restored afterwards, so measuring does not perturb training.
    """
    base = _unwrap(model)
    staged = staged_model(base)
    if isinstance(staged, BlockStagedModel):
        staged.stage(0)  # raises: the hook path has no per-stage modules to measure
    state = list(base.parameters()) + list(base.buffers())
    buffers = [(b, b.detach().clone()) for b in base.buffers()]
    grads = [(p, p.grad) for p in base.parameters()]
    inputs = _as_tuple(inputs)
    try:
        with torch.random.fork_rng(devices=[]):
            with SavedTensorMeter(exclude=state) as plain:
                loss_fn(base(*inputs), targets).backward()
            stage_peaks = []
            with SavedTensorMeter(exclude=state) as meter:
                x = inputs
                for k in range(staged.num_stages):
                    meter.reset_peak()
                    out = staged.stage(k)(*x)
                    loss = _stage_loss(loss_fn, staged.local_logits(k, out), targets, k)
                    loss.backward()
                    stage_peaks.append(meter.peak_bytes)
                    del loss
                    x = (out.detach(),)
                    del out
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for parameter, grad in grads:
            parameter.grad = grad
    staged_peak = max(stage_peaks)
    return {"backprop_peak_bytes": plain.peak_bytes, "staged_peak_bytes": staged_peak,
            "stage_peak_bytes": stage_peaks, "ratio": staged_peak / max(plain.peak_bytes, 1)}


# ------------------------------------------------------------------------------------ the pass
def _format_flops(flops: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g}{unit}FLOP"
    return f"{flops:.0f}FLOP"


class GreedyStagesPass(ModelPass):
    config_type = GreedyStages
    step_order = 10  # outermost: each stage runs its local loss through the selection
    # FSDP2: the stages run as the root's forward (WrapperForward), one backward of their losses.
    sharded_parameters_unsupported = ""

    def plan(self, model: nn.Module, captured: GraphCapture, config: GreedyStages) -> List[PlanRow]:
        batch = _example_inputs(captured)
        try:
            example_inputs, names = _positional_inputs(model, batch)
            plan = plan_stages(model, example_inputs, config)
            plan.input_names = names
        except StageTraceError as error:  # the root forward cannot be fx-traced: cut its block stack
            return self._block_stack_rows(model, batch, config, str(error))
        rows: List[PlanRow] = []
        for k in range(config.num_stages):
            for path in plan.stage_modules[k]:
                module = model.get_submodule(path)
                details: Dict[str, Any] = {"stage": k}
                if path in plan.traced.untraceable:
                    details["leaf"] = "untraceable forward"
                elif path in plan.traced.auto_leaves:
                    details["leaf"] = "stochastic regulariser"
                rows.append(PlanRow(layer=path, pass_name=self.name, action=Action.ASSIGN, op=type(module).__name__,
                                    details=details))
            for target in plan.stage_attributes[k]:
                rows.append(PlanRow(layer=target, pass_name=self.name, action=Action.ASSIGN, op="parameter",
                                    details={"stage": k}))
        for k in range(config.num_stages):
            rows.append(self._stage_row(plan, k, config))
        for warning in plan.warnings:
            if warning:
                warnings.warn(f"greedy_stages: {warning}", UserWarning, stacklevel=2)
        return rows

    def _block_stack_rows(self, model: nn.Module, batch: Any, config: GreedyStages, fx_reason: str) -> List[PlanRow]:
        """The Plan of the block-stack hook path (``block_stack.py``)."""
        try:
            plan = plan_block_stages(model, batch, config, fx_reason)
        except StageTraceError as error:
            raise StageTraceError(f"{error}. (The fx path was tried first: {fx_reason})") from None
        rows: List[PlanRow] = []
        modules = dict(model.named_modules())
        for k in range(plan.num_stages):
            for path in plan.stage_blocks(k):
                rows.append(PlanRow(layer=path, pass_name=self.name, action=Action.ASSIGN,
                                    op=type(modules[path]).__name__, details={"stage": k, "block_of": plan.stack.path}))
        inside = tuple(f"{path}." for path in plan.stack.blocks)
        by_module: Dict[str, Dict[str, Any]] = {}
        for name, owner in plan.owners.items():
            if name.startswith(inside):
                continue
            path = name.rpartition(".")[0]
            entry = by_module.setdefault(path, {"stage": owner})
            if name in plan.shared:
                entry["shared"] = (f"{name.rpartition('.')[2]} used by stages {plan.shared[name]}; owned by stage "
                                   f"{owner}, read detached by the others")
        for path, details in by_module.items():
            rows.append(PlanRow(layer=path or "<root>", pass_name=self.name, action=Action.ASSIGN,
                                op=type(modules[path]).__name__, details=details))
        reason = fx_reason if len(fx_reason) <= 300 else fx_reason[:297] + "..."
        threshold = config.min_stage_share
        for k in range(plan.num_stages):
            if threshold > 0 and plan.flop_share(k) < threshold and plan.weight_share(k) < threshold:
                warnings.warn(f"greedy_stages: stage {k} of {type(model).__name__} is negligible: "
                              f"{100 * plan.flop_share(k):.1f}% of the forward FLOPs and {100 * plan.weight_share(k):.1f}% "
                              f"of the trainable weights (< {100 * threshold:g}%); lower num_stages, choose cuts=, or "
                              "set min_stage_share=0 to silence this", UserWarning, stacklevel=2)
            last = k == plan.num_stages - 1
            blocks = plan.stage_blocks(k)
            total = plan.stage_flops[k] + plan.head_flops[k]
            details: Dict[str, Any] = {
                "stage": k, "cut_kind": CUT_KIND, "stack": plan.stack.path,
                "blocks": blocks[0] if len(blocks) == 1 else f"{blocks[0]}..{blocks[-1]}", "layers": len(blocks),
                "fwd": _format_flops(total), "aux": f"{100.0 * plan.head_flops[k] / max(total, 1):.1f}%",
                "flops_share": f"{100.0 * plan.flop_share(k):.1f}%",
                "weights_share": f"{100.0 * plan.weight_share(k):.1f}%",
            }
            if threshold > 0 and plan.flop_share(k) < threshold and plan.weight_share(k) < threshold:
                details["warning"] = "negligible stage"
            if not last:
                details["cut_after"] = plan.stack.blocks[plan.cuts[k]]
                details["boundary"] = "x".join(map(str, plan.boundary_shapes[k]))
                details["output"] = "x".join(map(str, plan.output_shape))
            side = [f"{plan.stack.blocks[i]} ({len(leaves)})" for i, leaves in plan.side_inputs.items()
                    if plan.stack.blocks[i] in blocks]
            if side:  # trainable tensors made before this stage, read detached (no gradient crosses the cut)
                details["side_inputs_detached"] = ", ".join(side)
            if k == 0 and plan.passed_over:  # stacks ranked above the one cut, and why they do not fit
                details["stacks_passed_over"] = "; ".join(plan.passed_over)
            rows.append(PlanRow(
                layer=f"<stage {k}>" if last else f"{HEADS_ATTR}.{k}", pass_name=self.name, action=Action.ASSIGN,
                op="model output" if last else plan.head_kinds[k], input_shape=None if last else plan.boundary_shapes[k],
                reason=f"fx path not taken: {reason}" if k == 0 else "", details=details, spec=plan))
        return rows

    def _stage_row(self, plan: StagePlan, k: int, config: GreedyStages) -> PlanRow:
        last = k == config.num_stages - 1
        total = plan.stage_flops[k] + plan.head_flops[k]
        details: Dict[str, Any] = {
            "stage": k,
            "layers": len(plan.stage_modules[k]),
            "fwd_bwd": _format_flops(total),
            "aux": f"{100.0 * plan.head_flops[k] / max(total, 1):.1f}%",
        }
        if not last:
            boundary = plan.boundaries[k]
            details["boundary"] = "x".join(map(str, boundary.shape))
            details["boundary_bytes"] = boundary.nbytes
            details["cut_after"] = boundary.name
            details["cut_kind"] = boundary.kind  # "module": a module's forward ends there; "node": named by its node
            details["cut_position"] = boundary.position  # traced-node index: what a stage process applies
        if plan.stage_flops:
            details["flops_share"] = f"{100.0 * plan.flop_share(k):.1f}%"
            details["weights_share"] = f"{100.0 * plan.weight_share(k):.1f}%"
        warning = plan.warnings[k] if plan.warnings else ""
        if warning:
            details["warning"] = "negligible stage"
        if not last and k < len(plan.head_choices) and plan.head_choices[k]:
            details["head_choice"] = plan.head_choices[k]
        return PlanRow(
            layer=f"<stage {k}>" if last else f"{HEADS_ATTR}.{k}", pass_name=self.name, action=Action.ASSIGN,
            op="model output" if last else plan.head_kinds[k], reason=warning,
            input_shape=None if last else plan.boundaries[k].shape, details=details, spec=plan)

    def replan(self, model: nn.Module, rows: List[PlanRow], config: GreedyStages,
               example_inputs: Sequence[Any]) -> List[PlanRow]:
        """Rows decided by a launcher: the cut positions are read from the stage rows, not searched."""
        if any(row.details.get("cut_kind") == CUT_KIND for row in rows):
            raise ValueError("greedy_stages: the multi-process stage runtime does not run models staged on the "
                             "block-stack hook path (the root forward is not fx-traceable, so there is no module per "
                             "stage to run in its own process); train them with effcompile.train_step")
        positions = [row.details["cut_position"] for row in rows if "cut_position" in row.details]
        kinds = [row.op for row in rows if "cut_position" in row.details]  # the heads the launcher chose
        example_inputs, names = _positional_inputs(model, model_inputs(example_inputs))
        plan = plan_stages(model, example_inputs, config, decided=positions, decided_kinds=kinds)
        plan.input_names = names
        return [dataclasses.replace(row, spec=plan) for row in rows]

    def apply(self, model: nn.Module, rows: List[PlanRow], config: GreedyStages) -> int:
        spec = next(row.spec for row in rows if isinstance(row.spec, (StagePlan, BlockStagePlan)))
        if isinstance(spec, BlockStagePlan):
            heads = GreedyStageHeads([
                make_output_head(shape, spec.output_shape, kind).to(device=spec.device, dtype=spec.boundary_dtype)
                for shape, kind in zip(spec.boundary_shapes, spec.head_kinds)])
            heads.train(model.training)
            attach(model, HEADS_ATTR, heads)
            model.__dict__[_STAGED_ATTR] = BlockStagedModel(model, spec, HEADS_ATTR)
            return spec.num_stages
        plan = spec
        heads = GreedyStageHeads([
            make_aux_head(boundary.shape, plan.num_classes, kind, plan.head_width).to(device=plan.device, dtype=boundary.dtype)
            for boundary, kind in zip(plan.boundaries, plan.head_kinds)
        ])
        heads.train(model.training)
        attach(model, HEADS_ATTR, heads)
        stages = split_stages(plan.traced, [b.position for b in plan.boundaries], [b.value for b in plan.boundaries])
        staged = StagedModel(model, stages, plan.boundaries, plan.stage_modules, plan.stage_attributes)
        staged.input_names = plan.input_names
        model.__dict__[_STAGED_ATTR] = staged
        return len(stages)

    def predict_change(self, model: nn.Module, rows: List[PlanRow], config: GreedyStages,
                       step: StepWork) -> Optional[Work]:
        """The aux heads' work and the per-stage steps' ops (cost.py)."""
        plan = next((row.spec for row in rows if isinstance(row.spec, (StagePlan, BlockStagePlan))), None)
        if plan is None or not plan.head_flops:
            return None
        return stages_change(plan.head_flops, forward_only=isinstance(plan, BlockStagePlan))

    def is_applied(self, model: nn.Module) -> bool:
        return isinstance(model._modules.get(HEADS_ATTR), GreedyStageHeads)

    def fold(self, model: nn.Module) -> int:
        heads = detach(model, HEADS_ATTR)
        model.__dict__.pop(_STAGED_ATTR, None)
        model.__dict__.pop(_TAPS_ATTR, None)
        # The block-stack path's cut and side-input hooks, gradient matching's head taps.
        for handle in model.__dict__.get("_effcompile_hooks", {}).pop(self.name, []):
            handle.remove()
        return 0 if heads is None else len(heads)

    def make_train_step(self, model: nn.Module, loss_fn: Callable, optimizer: Any,
                        options: StepOptions) -> Optional[Callable]:
        return make_staged_train_step(model, loss_fn, optimizer, options)

    def make_training_loss(self, model: nn.Module, loss_fn: Callable, options: StepOptions) -> Optional[Callable]:
        return make_staged_training_loss(model, loss_fn, options)


def _example_inputs(captured: GraphCapture) -> ModelInputs:
    """The example batch recorded by ``torch.export`` (``ExportedProgram.example_inputs``): args and kwargs."""
    example = getattr(captured.exported, "example_inputs", None)
    if example is None:
        raise ValueError("greedy_stages needs the example inputs of the captured graph")
    args, kwargs = example
    return ModelInputs(tuple(args), dict(kwargs or {}))


def _positional_inputs(model: nn.Module, batch: ModelInputs) -> Tuple[tuple, Optional[List[str]]]:
    """The fx path's positional inputs: a dict batch whose keys are the forward's first parameters
    is passed positionally (and so is every batch the step gets); other keyword batches raise
    :class:`StageTraceError` (the block-stack path takes them)."""
    if not batch.kwargs:
        return tuple(batch.args), None
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params[len(batch.args):len(batch.args) + len(batch.kwargs)]]
    if batch.args or set(names) != set(batch.kwargs):
        raise StageTraceError(
            f"greedy_stages: the fx path passes a dict batch positionally, so its keys must be the first parameters "
            f"of {type(model).__name__}.forward ({[p.name for p in params]}); got {sorted(batch.kwargs)}")
    return tuple(batch.kwargs[name] for name in names), names


register_pass(GreedyStagesPass())
