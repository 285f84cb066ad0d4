"""Decorrelation pass: decorrelated backpropagation (Dalm et al., arXiv 2405.02385).

Graph before, for every parameter ``W`` found on the captured graph as the weight of a linear
map (``aten.linear``, ``aten.conv{1,2,3}d`` incl. grouped/depthwise, ``aten.matmul``/``mm``/
``addmm`` against a parameter, the packed input projection of ``nn.MultiheadAttention``)::

    y = linear(x, W, b)                   # or conv(x, W, b, stride, padding, dilation, groups)

Graph after (one fused op per layer; ``R`` is a buffer, so ``∂L/∂W = δ·zᵀ`` with ``z = R·x``),
when ``x`` is an argument of the module call that contains the op::

    # training mode only, in a forward pre-hook of the module call that receives x:
    R ← R − η·[(1−κ)·C·R + κ·diag(v)·R]    # C, v from sampled rows (patches) of z = R·x
    A = W·R                                 # owner.<attr>_decorrelation(W); R detached
    y = linear(x, A, b)                     # conv: A = W·R over the (C/groups)·k… patch

or, on the input side (``Decorrelation.apply``: the cost model's choice where the batch has
fewer rows than the layer has outputs; needs an ``x`` read by the layer alone)::

    R ← R − η·[(1−κ)·C·R + κ·diag(v)·R]    # as above, in the pre-hook
    z = x·Rᵀ                                # owner.<attr>_decorrelation(x); the pre-hook passes z on
    y = linear(z, W, b)                     # the module's own forward, unchanged

and when ``x`` is computed inside that module (``nn.MultiheadAttention.out_proj``, ``F.linear(t,
self.w)`` on a ``t`` of the module's own, the root's forward), observed where the graph computes
it (observe.py: a TorchFunctionMode around the scope module's forward, traced by Dynamo)::

    A = W·R                                 # read inside the scope: A is watched by identity
    R ← R − η·[(1−κ)·C·R + κ·diag(v)·R]    # at the op whose weight operand is A, from its input x
    y = linear(x, A, b)                     # unchanged; the next step uses the new R

The Plan row of such a layer says where it is observed (``details["observed_in"]``).

Details that make it cheap and safe:

* Rows: at most ``max(64, rows_per_dim·b)`` random rows of the layer input (patches for
  convolutions, gathered directly from the unpadded input) feed the statistics, where ``b`` is
  the block size; no host synchronisation anywhere in the update.
* Formula: per block, the cheapest of three exact ways to form ``C·R`` (``state.update_formula``):
  ``Zᵀ(Z·R)/n`` for n < b, ``(ZᵀZ/n − diag)·R`` for b ≤ n ≤ 2b, and ``Σ = R·S·Rᵀ`` from the raw
  input covariance ``S = XᵀX/n`` for n > 2b (the default n = 4b: 7·b³ MACs instead of 9·b³).
* Structure: layers whose per-group input dimension exceeds ``max_block_size`` get a
  block-diagonal ``R``; grouped convolutions get one ``R`` per group.  A k×k convolution may
  instead take ``R = R_channel ⊗ R_spatial`` (``Decorrelation.structure``, kronecker.py), where
  the fused weight is ``A[o] = R_cᵀ·W[o]·R_s``: same graph, two GEMMs in place of one.
* Statistics are computed in fp32 with autocast disabled; ``R`` is stored in fp32 and cast to the
  weight's dtype for the fused product.
* Stability: an update that makes ``R`` non-finite or larger than ``divergence_threshold`` is
  rejected on device (``R`` keeps its last good value) and counted in ``rejected_updates``.
* DDP: when torch.distributed is initialised, the statistics are averaged over ranks before the
  update, so every rank applies the same update and ``R`` stays identical.
* Nothing silent: a weight that reaches a layer op through ops the analysis does not follow
  (``w.T``, ``0.5 * w``, ``einsum``) is a SKIP row; an observed weight read but never seen at a
  layer op raises at run time.

The R update runs inside ``forward`` as an in-place buffer update under ``no_grad`` (the same
pattern BatchNorm uses for running statistics), so plain eager loops need no extra call and
compiled steps contain the update.  On the pre-hook path ``R`` is updated before ``W·R`` is
formed, so the fused weight of a step uses the freshest ``R``; on the in-graph path the update
follows the op (``A`` is formed first) and takes effect at the next step.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from effcompile import distributed as replicas
from effcompile._compat import ConvNd, is_compiling, is_sharded
from effcompile.swapped import picklable
from effcompile.passes.analysis.capture import GraphCapture, InputLocation, LayerCandidate
from effcompile.passes.analysis.uncovered import tied_parameters, uncovered_rows
from effcompile.passes.base import ModelPass, register_pass
from effcompile.plan import Action, PlanRow, layer_key
from effcompile.cost import StepWork, Work

from .config import Decorrelation
from .cost import (AUTO_BUDGET, LayerCost, allocate, conv_output_positions, ladder, layer_rows, predict,
                   predict_kronecker)
from .kronecker import KroneckerDecorrelationState, kronecker_factors, kronecker_rows
from .observe import observed_forward
from .state import MIN_ROWS, DecorrelationState, LayerSpec, block_layout, update_lr

__all__ = ["DecorrelationPass", "decorrelation_states", "state_name"]


class _ScopeObserver:
    """Forward pre-hook of a module call that receives layer inputs: hands them to their
    DecorrelationStates (training mode), then replaces each input of a layer that applies R on
    its input side by ``z = x·Rᵀ`` (every mode: it is part of the layer's function)."""

    def __init__(self) -> None:
        self.targets: List[Tuple[DecorrelationState, Tuple[InputLocation, ...]]] = []
        # The input-side layers among them, with their one input (planned: read by the layer alone).
        self.decorrelating: List[Tuple[DecorrelationState, InputLocation]] = []

    def add(self, state: DecorrelationState, locations: Tuple[InputLocation, ...]) -> None:
        self.targets.append((state, locations))
        if state.spec.side == "input":
            self.decorrelating.append((state, locations[0]))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        for state, locations in self.targets:
            if not state.training:
                continue
            inputs: List[torch.Tensor] = []
            for location in locations:
                value = _argument(args, kwargs, location)
                if not any(value is seen for seen in inputs):
                    inputs.append(value)
            state.observe(inputs)
        if not self.decorrelating:
            return None
        # Traced (compile, export: ONNX scopes name the state module) through a call of the state
        # module; in eager through its method, one nn.Module call less per layer and step.
        traced = is_compiling() or torch.compiler.is_exporting()
        args = list(args)
        for state, location in self.decorrelating:
            apply = state if traced else state.decorrelated_input
            if location.name in kwargs:
                kwargs[location.name] = apply(kwargs[location.name])
            else:
                args[location.index] = apply(args[location.index])
        return tuple(args), kwargs


def _argument(args: tuple, kwargs: dict, location: InputLocation):
    return kwargs[location.name] if location.name in kwargs else args[location.index]


# ------------------------------------------------------------------------------------ class swap
_DECORRELATED_CLASSES: Dict[Tuple[type, Tuple[str, ...], bool], type] = {}


STATE_SUFFIX = "_decorrelation"


def state_name(attr: str) -> str:
    return f"{attr}{STATE_SUFFIX}"


def _fused_weight_property(attr: str) -> property:
    child = state_name(attr)

    def fused_weight(self: nn.Module) -> torch.Tensor:
        weight = self._parameters[attr]
        if is_sharded(weight):  # FSDP2 between forwards reads its sharded parameter back; its forward sees W
            return weight
        return self._modules[child](weight)  # the state's forward: W·R on the weight side

    fused_weight.__doc__ = f"``{attr}`` seen by the forward: the decorrelated weight W·R (the parameter stays in _parameters)."
    return property(fused_weight)


def _decorrelated_class(cls: type, attrs: Tuple[str, ...], fused: Tuple[str, ...], observes: bool = False) -> type:
    """A subclass marking ``attrs`` decorrelated, whose reads of the ``fused`` ones (R on the weight
    side) return ``W·R``; ``_parameters`` (and state_dict keys) are unchanged.

    ``observes``: the module's forward computes the input of decorrelated layers, so it runs
    inside a LayerInputObserver in training mode (observe.py).
    """
    key = (cls, attrs, fused, observes)
    if key not in _DECORRELATED_CLASSES:
        namespace = {attr: _fused_weight_property(attr) for attr in fused}
        namespace["_effcompile_original_class"] = cls
        namespace["_effcompile_decorrelated"] = attrs
        if observes:
            namespace["forward"] = observed_forward(cls)
        _DECORRELATED_CLASSES[key] = picklable(type(f"Decorrelated{cls.__name__}", (cls,), namespace),
                                               _decorrelated_class, key)
    return _DECORRELATED_CLASSES[key]


def decorrelation_states(model: nn.Module) -> Dict[str, DecorrelationState]:
    """Plan layer key → DecorrelationState for every decorrelated layer of ``model``."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, DecorrelationState):
            out[layer_key(module.spec.owner_path, module.spec.attr)] = module
    return out


# ------------------------------------------------------------------------------------ the pass
class DecorrelationPass(ModelPass):
    config_type = Decorrelation
    # FSDP2: the weight reads see the unsharded parameter inside forward (fully_shard swaps it into
    # _parameters), and a sharded one between forwards is returned as is (tests/test_fsdp2.py).
    sharded_parameters_unsupported = ""
    onnx_scope_suffixes = (STATE_SUFFIX,)
    compiled_cost = True  # predict_change knows the compiled step (cost.py)

    def plan(self, model: nn.Module, captured: GraphCapture, config: Decorrelation) -> List[PlanRow]:
        tied = tied_parameters(model)
        rows, ladders = [], []
        for candidate in captured.layers:
            row, rungs = self._plan_layer(candidate, tied, config, candidate.parameter(model).requires_grad)
            rows.append(row)
            if rungs:
                ladders.append((row, rungs))
        self._apply_budget(ladders, config)
        if not any(row.applied for row in rows):
            _warn_when_only_input_layers(rows)
        rows.extend(uncovered_rows(self.name, model, captured, rows))
        return rows

    def _plan_layer(self, candidate: LayerCandidate, tied: Dict[str, List[str]], config: Decorrelation,
                    trainable: bool):
        """The layer's row (its spec as configured) and its cost ladder ([] without input shapes)."""
        first = candidate.uses[0]
        row = PlanRow(layer=candidate.layer, pass_name=self.name, action=Action.REWRITE, op=first.op,
                      input_shape=first.input_shape, weight_shape=candidate.weight_shape)
        if not config.input_layers and any(use.reads_model_input for use in candidate.uses):
            # Whitening the raw features fits the training set sooner but generalised worse (config.py).
            row.action, row.reason = Action.SKIP, "input layer (applied to the model's input): input_layers=False"
            row.details["skipped_by"] = "input_layers"
            return row, []
        reason = self._skip_reason(candidate, tied, trainable)
        if reason:
            row.action, row.reason = Action.SKIP, reason
            return row, []
        spec = _layer_spec(candidate, config)
        sides, weight_reason = _sides(spec, candidate, config)
        factors, not_kronecker = _kronecker_eligibility(spec)
        rungs = _cost_ladder(spec, candidate, config, sides, factors)
        structure = rungs[0].structure if rungs else _unbudgeted_structure(spec, config, factors)
        spec = dataclasses.replace(spec, side=rungs[0].side if rungs else sides[0], structure=structure)
        if weight_reason:
            row.details["weight_side"] = weight_reason
        if config.structure == "kronecker" and not_kronecker:
            row.details["blocks_because"] = not_kronecker
        _set_layer_details(row, spec, config, rungs[0] if rungs else None)
        if len(candidate.uses) > 1:
            row.details["uses"] = len(candidate.uses)
        if spec.observer_scopes:
            row.details["observed_in"] = ",".join(scope or "<root>" for scope in spec.observer_scopes)
        row.spec = spec
        return row, rungs

    @staticmethod
    def _apply_budget(ladders: List[Tuple[PlanRow, List[LayerCost]]], config: Decorrelation) -> None:
        """Under ``max_overhead``: one configuration per layer so the model meets the budget (cost.py).
        Every row shows the model's predicted overhead (``model_overhead``), budget or not."""
        if not ladders:
            return
        if config.max_overhead is None:  # no budget: the knobs as given, the model's predicted overhead shown
            chosen, within = [rungs[0] for _, rungs in ladders], True
        else:
            automatic = config.max_overhead == "auto"
            budget = AUTO_BUDGET if automatic else config.max_overhead
            chosen, within = allocate([rungs for _, rungs in ladders], budget)
        for (row, _), cost in zip(ladders, chosen):
            row.spec = dataclasses.replace(row.spec, block=cost.block, update_every=cost.update_every, side=cost.side,
                                           structure=cost.structure, cost=cost)
            _set_layer_details(row, row.spec, config, cost)
        total = sum(cost.pass_cost for cost in chosen) / sum(cost.layer_cost for cost in chosen)
        for row, _ in ladders:
            row.details["model_overhead"] = f"{total:.2f}x"
        if not within:
            for (row, _), cost in zip(ladders, chosen):
                row.details["warning"] = "over budget"
            cheapest = "cheapest configuration" if not automatic else "cheapest configuration the 'auto' budget allows"
            message = (f"every layer at its {cheapest} still costs {total:.2f}x the decorrelated layers' "
                       f"training work, above max_overhead={config.max_overhead} ({budget:g}) at the example's "
                       f"batch size (the overhead falls as the batch grows)")
            ladders[0][0].reason = message
            if not automatic:  # the user's own budget: say so now; the default's shows in the Plan
                warnings.warn(f"effcompile decorrelation: {message}", stacklevel=4)

    @staticmethod
    def _skip_reason(candidate: LayerCandidate, tied: Dict[str, List[str]], trainable: bool) -> str:
        if not trainable:  # W·R with R moving and W unable to follow would change a frozen layer's function
            return "frozen weight (requires_grad=False): decorrelating its input would change what the layer computes"
        if candidate.param_fqn in tied:
            return f"tied weight shared with {', '.join(tied[candidate.param_fqn])}"
        if candidate.other_uses:
            return f"the weight is also used by {', '.join(sorted(set(candidate.other_uses)))}"
        for use in candidate.uses:
            if use.unsupported:
                return f"{use.unsupported} ({use.op} in {use.scope or '<root>'})"
        kinds = {(use.op, use.conv, use.contracted_axis, use.input_shape[-1:] if use.conv is None else None)
                 for use in candidate.uses}
        if len(kinds) > 1:
            return "the weight is used by ops of different kinds or shapes"
        return ""

    def apply(self, model: nn.Module, rows: List[PlanRow], config: Decorrelation) -> int:
        observers: Dict[str, _ScopeObserver] = {}
        by_owner: Dict[str, List[LayerSpec]] = {}
        observed_in: Dict[str, List[DecorrelationState]] = {}  # scope path → states observed in its forward
        for row in rows:
            by_owner.setdefault(row.spec.owner_path, []).append(row.spec)
        for owner_path, specs in by_owner.items():
            owner = model.get_submodule(owner_path)
            for spec in specs:
                weight = owner._parameters[spec.attr]
                structured = KroneckerDecorrelationState if spec.structure == "kronecker" else DecorrelationState
                state = structured(spec, config, weight.device)
                owner.add_module(state_name(spec.attr), state)
                for scope, locations in spec.scopes:
                    observers.setdefault(scope, _ScopeObserver()).add(state, locations)
                for scope in spec.observer_scopes:
                    observed_in.setdefault(scope, []).append(state)
        for path in dict.fromkeys([*by_owner, *observed_in]):
            module = model.get_submodule(path)
            specs = by_owner.get(path, ())
            attrs = tuple(sorted(spec.attr for spec in specs))
            fused = tuple(sorted(spec.attr for spec in specs if spec.side == "weight"))
            if path in observed_in:
                module.__dict__["_effcompile_observed"] = observed_in[path]
                module.__dict__["_effcompile_scope"] = path
            module.__class__ = _decorrelated_class(type(module), attrs, fused, path in observed_in)
        handles = []
        for scope, observer in observers.items():
            handles.append(model.get_submodule(scope).register_forward_pre_hook(observer, with_kwargs=True))
        model.__dict__.setdefault("_effcompile_hooks", {}).setdefault(self.name, []).extend(handles)
        return sum(len(specs) for specs in by_owner.values())

    def predict_change(self, model: nn.Module, rows: List[PlanRow], config: Decorrelation,
                       step: StepWork) -> Optional[Work]:
        """Every decorrelated layer's own work at its chosen configuration (cost.py): applying R
        and its backward, the update amortised over its interval, their ops.  Compiled (train_step's
        step, which runs the update only on its steps), the ops as kernel calls."""
        costs = [row.spec.cost for row in rows if isinstance(row.spec, LayerSpec)]
        if not costs or any(cost is None for cost in costs):
            return None
        return sum((cost.compiled_work if step.compiled else cost.work for cost in costs), Work())

    def is_applied(self, model: nn.Module) -> bool:
        return any(isinstance(module, DecorrelationState) for module in model.modules())

    def fold(self, model: nn.Module) -> int:
        folded = 0
        for module in list(model.modules()):
            attrs = type(module).__dict__.get("_effcompile_decorrelated")
            if attrs is None:
                continue
            module.__dict__.pop("_effcompile_observed", None)
            module.__dict__.pop("_effcompile_scope", None)
            with torch.no_grad():
                for attr in attrs:
                    parameter = module._parameters[attr]
                    parameter.copy_(module._modules[state_name(attr)].fused_weight(parameter))
                    del module._modules[state_name(attr)]
                    folded += 1
            module.__class__ = type(module)._effcompile_original_class
        for handle in model.__dict__.get("_effcompile_hooks", {}).pop(self.name, []):
            handle.remove()
        return folded

    def live_details(self, model: nn.Module, row: PlanRow) -> Dict[str, object]:
        state = decorrelation_states(model).get(row.layer)
        if state is None:
            return {}
        # The update dtype as resolved on the state's device (update_dtype="auto" depends on it).
        return {"updates": int(state.updates), "rejected": int(state.rejected_updates),
                "update_dtype": str(state.update_dtype).removeprefix("torch.")}


def _warn_when_only_input_layers(rows: List[PlanRow]) -> None:
    """A model whose every layer reads its input (a single linear layer) would be left untouched
    by ``input_layers=False`` without a word: those skips become warned ones."""
    for row in rows:
        if row.details.pop("skipped_by", None) is not None:
            row.reason += "; the model has no other layer to decorrelate (pass input_layers=True)"


def _layer_spec(candidate: LayerCandidate, config: Decorrelation) -> LayerSpec:
    first = candidate.uses[0]
    shape = candidate.weight_shape
    if first.conv is not None:
        groups = first.conv.groups
        group_dim = math.prod(shape[1:])
        kind = "conv"
    else:
        groups, group_dim, kind = 1, shape[first.contracted_axis], "linear"
    scopes: Dict[str, List[InputLocation]] = {}
    observer_scopes: Tuple[str, ...] = ()
    if any(use.input_unobservable or use.input_location is None for use in candidate.uses):
        # Some input is computed inside the module that calls the layer: every use is observed
        # where the graph computes it, in the forward of its scope module (observe.py).  A mode
        # around a module call also sees the ops of the modules it calls, so nested scopes go.
        found = list(dict.fromkeys(use.scope for use in candidate.uses))
        observer_scopes = tuple(scope for scope in found
                                if not any(_encloses(other, scope) for other in found if other != scope))
    else:
        for use in candidate.uses:
            locations = scopes.setdefault(use.scope, [])
            if use.input_location not in locations:
                locations.append(use.input_location)
    return LayerSpec(
        param_fqn=candidate.param_fqn, owner_path=candidate.owner_path, attr=candidate.attr, kind=kind,
        contracted_axis=first.contracted_axis, groups=groups, group_dim=group_dim,
        block=config.max_block_size, conv=first.conv, update_every=config.update_every,
        example_rows=_example_rows(candidate),
        scopes=tuple((scope, tuple(locations)) for scope, locations in scopes.items()),
        observer_scopes=observer_scopes,
    )


def _sides(spec: LayerSpec, candidate: LayerCandidate, config: Decorrelation) -> Tuple[Tuple[str, ...], str]:
    """Where R may be applied under ``config.apply``, and (when the input side is ruled out for a
    layer ``apply`` would put there) why it stays on the weight."""
    if config.apply == "weight":
        return ("weight",), ""
    use = candidate.uses[0]
    if spec.kind != "linear":
        reason = "R acts on a convolution's patches, not on its input"
    elif len(candidate.uses) > 1:
        reason = "the weight has several uses"
    elif spec.observer_scopes or not use.input_exclusive:
        reason = "the layer's input is not an argument of its module call read by the layer alone"
    else:
        return (("input",) if config.apply == "input" else ("weight", "input")), ""
    return ("weight",), reason if config.apply == "input" else ""


def _kronecker_eligibility(spec: LayerSpec) -> Tuple[Optional[Tuple[int, int]], str]:
    """(channels, taps) of a layer that can take ``R_channel ⊗ R_spatial``, else None and why not."""
    if spec.kind != "conv":
        return None, "not a convolution"
    channels, taps = kronecker_factors(spec)
    if taps == 1:
        return None, "a 1x1 convolution: R is over channels already"
    if channels == 1:
        return None, "one channel per group: R is over kernel taps already"
    return (channels, taps), ""


def _unbudgeted_structure(spec: LayerSpec, config: Decorrelation, factors: Optional[Tuple[int, int]]) -> str:
    """The structure as configured (no budget, or no shapes to cost): ``"auto"`` takes the
    Kronecker R where blocks would cut the patch (``d > max_block_size``)."""
    if factors is None or config.structure == "blocks":
        return "blocks"
    if config.structure == "kronecker" or spec.group_dim > config.max_block_size:
        return "kronecker"
    return "blocks"


def _cost_ladder(spec: LayerSpec, candidate: LayerCandidate, config: Decorrelation,
                 sides: Tuple[str, ...], factors: Optional[Tuple[int, int]]) -> List[LayerCost]:
    """The layer's configurations from the configured one down to the cheapest (cost.py); only the
    configured one without a budget, none without input shapes."""
    rows = _example_rows(candidate)
    if rows is None:
        return []
    numel = math.prod(candidate.weight_shape)
    syncing = config.sync_statistics and replicas.is_distributed()
    if config.max_overhead is None:
        if _unbudgeted_structure(spec, config, factors) == "kronecker":
            return [predict_kronecker(numel, rows, spec.groups, *factors, config.rows_per_dim, spec.update_every)]
        return [predict(numel, rows, spec.groups, spec.group_dim, spec.block, config.rows_per_dim,
                        spec.update_every, syncing, sides)]
    return ladder(numel, rows, spec.groups, spec.group_dim, spec.block, config.rows_per_dim, syncing,
                  min_update_every=config.update_every, limited=config.max_overhead == "auto", sides=sides,
                  kronecker=factors, structure=config.structure)


def _example_rows(candidate: LayerCandidate):
    """Input rows the weight meets per step at the example's batch (every use), None without shapes."""
    first = candidate.uses[0]
    if not first.input_shape:
        return None
    positions = conv_output_positions(first.input_shape, first.conv) if first.conv is not None else None
    return sum(layer_rows(use.input_shape, positions) for use in candidate.uses)


def _set_layer_details(row: PlanRow, spec: LayerSpec, config: Decorrelation, cost) -> None:
    row.details.update({"d": spec.group_dim, "groups": spec.groups, "apply": spec.side, "structure": spec.structure})
    if spec.structure == "kronecker":  # R = R_channel ⊗ R_spatial: the factors' sizes
        channels, taps = kronecker_factors(spec)
        row.details.pop("blocks", None)
        row.details.update({"kronecker": f"{channels}x{channels} ⊗ {taps}x{taps}",
                            "row_cap": kronecker_rows(channels, taps, config.rows_per_dim)})
    else:
        blocks, block = block_layout(spec.group_dim, spec.block)
        row.details.pop("kronecker", None)
        row.details.update({"blocks": f"{blocks}x{block}", "row_cap": max(MIN_ROWS, math.ceil(config.rows_per_dim * block))})
    row.details.pop("update_every", None)
    row.details.pop("lr", None)
    if spec.update_every > 1:
        row.details["update_every"] = spec.update_every
    lr = update_lr(config.lr, spec.update_every, config.update_every)
    if lr != config.lr:  # a longer interval than configured takes a proportionally longer step
        row.details["lr"] = round(lr, 6)
    if cost is not None:
        row.details["overhead"] = f"{cost.overhead:.2f}x"  # predicted, of the layer's training MACs


def _encloses(outer: str, inner: str) -> bool:
    """Module path ``outer`` is an ancestor of ``inner`` (``""`` is the root)."""
    return outer == "" or inner.startswith(outer + ".")


register_pass(DecorrelationPass())
