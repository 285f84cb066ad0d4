"""Randomized VJP, model level: mark each planned layer's weight so its backward is sketched.

The owner module's class is swapped so that, while Dynamo traces a training forward, the weight
is read through ``effcompile::vjp_marker`` (:mod:`.joint_rewrite` rewrites the marked backward
GEMMs and removes the marker).  In eager mode ``nn.Linear`` and conv owners run the same
estimators as autograd functions (:mod:`.estimators`); weights used by other ops (GPT-2's
``Conv1D`` addmm, attention's ``in_proj_weight``, ``F.linear(x, self.w)``) run them through a
mode around the forward of each module that uses them (:mod:`.eager_scope`).  Adaptive mode adds a
:class:`VarianceControl` state per layer, memory mode a :class:`MemoryModeState`; both are
submodules, so ``state_dict`` checkpoints them.  Graph before and after: see :mod:`.joint_rewrite`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from effcompile._compat import ConvNd, is_compiling
from effcompile.swapped import picklable
from effcompile.passes.analysis.capture import GraphCapture, LayerCandidate
from effcompile.passes.analysis.uncovered import uncovered_rows
from effcompile.cost import StepWork, Work
from effcompile.passes.base import ModelPass, PassState, register_pass
from effcompile.plan import Action, PlanRow

from .config import RandomizedVJP
from .cost import layer_change, profitable, sampled_rows
from .eager_scope import EagerLayer, ScopeSketch, active_mode_for, sketched_op
from .joint_rewrite import MARKER, LayerSketch, _settings, inspect_backward

__all__ = ["RandomizedVJPPass", "VarianceControl", "MemoryModeState"]


# ------------------------------------------------------------------------------------ model level
class _GradientSlotState(PassState):
    """Per-layer run-time state fed from the backward through a gradient slot.

    ``slot`` is a buffer that requires grad (never an optimizer parameter): the backward writes
    this step's statistics as its gradient, and a post-accumulate-grad hook folds them into
    the EMA held in ``slot`` itself (``slot ← d·slot + (1−d)·grad`` on the device, the first
    step copies) and clears the gradient.  The hook runs after the compiled backward too, so
    the same state works eagerly and under torch.compile.  Buffers: ``state_dict`` checkpoints it.
    """

    slot_name = "slot"

    def __init__(self, settings: LayerSketch, slot: torch.Tensor, ema_decay: float) -> None:
        super().__init__()
        self.settings = settings
        self.ema_decay = float(ema_decay)
        self.register_buffer(self.slot_name, slot.requires_grad_())
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64, device=slot.device))
        self._hooked_steps = 0
        self._ensure_hook()

    @property
    def _slot(self) -> torch.Tensor:
        return self._buffers[self.slot_name]

    def _ensure_hook(self) -> None:
        slot = self._slot
        if not (slot.is_leaf and slot.requires_grad):  # e.g. after .to(device): make it a leaf again
            slot = self._buffers[self.slot_name] = slot.detach().requires_grad_()
        if not slot._post_accumulate_grad_hooks:
            slot.register_post_accumulate_grad_hook(self._fold)

    def _fold(self, slot: torch.Tensor) -> None:
        step, slot.grad = slot.grad, None
        if step is None:
            return
        with torch.no_grad():
            decay = torch.where(self.updates > 0, self.ema_decay, 0.0).to(slot.dtype)
            slot.mul_(decay).add_((1 - decay) * step.to(slot.dtype))
            self.updates.add_(1)
        self._hooked_steps += 1
        self._after_step()

    def _after_step(self) -> None:
        pass

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._ensure_hook()
        return result

    def __setstate__(self, state) -> None:  # deepcopy/pickle drop tensor hooks: re-register
        super().__setstate__(state)
        self._ensure_hook()


class VarianceControl(_GradientSlotState):
    """Adaptive keep of one linear weight's grad_weight rows (VCAS-style variance control).

    ``statistics`` (EMA, float32): entries ``r < R`` the added variance of the estimator at the
    ladder keep ``ladder[r]``, last entry the layer's SGD noise (:func:`effcompile.passes.randomized_vjp.estimators.sketch_statistics`).
    Every ``adapt_every`` backward steps the keep becomes the smallest ladder keep whose added
    variance is at most ``variance_ratio`` × SGD noise (``max_keep`` when none is): one host read
    per adaptation.  The keep is a compile-time constant of the compiled step, so each change of
    some layer's keep recompiles once (Dynamo guards on it); at most one change per adaptation.
    """

    slot_name = "statistics"

    def __init__(self, settings: LayerSketch, config: RandomizedVJP, device: torch.device) -> None:
        slot = torch.zeros(len(settings.ladder) + 1, dtype=torch.float32, device=device)
        super().__init__(settings, slot, config.ema_decay)
        self.variance_ratio = float(config.variance_ratio)
        self.adapt_every = int(config.adapt_every)
        self.register_buffer("level", torch.tensor(settings.ladder.index(settings.keep), device=device))

    def _after_step(self) -> None:
        if self._hooked_steps % self.adapt_every == 0:
            self.adapt()

    def choose_level(self) -> torch.Tensor:
        """The ladder rung the rule picks from the current EMAs (a device tensor)."""
        statistics = self.statistics.detach()
        fits = statistics[:-1] <= self.variance_ratio * statistics[-1]
        rungs = torch.arange(fits.shape[0], device=fits.device)
        return torch.where(fits, rungs, 0).max()  # added variance grows down the ladder: take the last fit

    def adapt(self) -> float:
        level = int(self.choose_level())  # the one host read, every adapt_every steps
        self._set_level(level)
        return self.settings.keep

    def _set_level(self, level: int) -> None:
        with torch.no_grad():
            self.level.fill_(level)
        self.settings = dataclasses.replace(self.settings, keep=self.settings.ladder[level])

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._set_level(int(self.level))

    def details(self) -> Dict[str, object]:
        values = self.statistics.detach().tolist()
        added, sgd = values[:-1], values[-1]
        level = self.settings.ladder.index(self.settings.keep)
        return {"keep": self.settings.keep, "ladder": "/".join(f"{k:g}" for k in self.settings.ladder),
                "added_variance": f"{added[level]:.3g}", "sgd_noise": f"{sgd:.3g}",
                "variance_ratio": f"{added[level] / sgd:.3g}" if sgd > 0 else "n/a", "updates": int(self.updates)}


class MemoryModeState(_GradientSlotState):
    """Memory mode of one linear weight: EMA of the mean ‖g_t‖ per token position (the score factor)."""

    slot_name = "position_grad_norms"

    def __init__(self, settings: LayerSketch, positions: int, config: RandomizedVJP, device: torch.device) -> None:
        super().__init__(settings, torch.ones(positions, dtype=torch.float32, device=device), config.ema_decay)

    def details(self) -> Dict[str, object]:
        return {"memory_mode": "yes", "updates": int(self.updates)}


_STATE_SUFFIX = "_vjp_state"


def _state(owner: nn.Module, attr: str) -> Optional[_GradientSlotState]:
    return owner._modules.get(attr + _STATE_SUFFIX)


def _current_settings(owner: nn.Module, attr: str) -> LayerSketch:
    state = _state(owner, attr)
    return state.settings if state is not None else owner._effcompile_sketch[attr]


def _fused_getter(cls: type, attr: str) -> Optional[Any]:
    """The getter of a property that computes ``attr`` below the sketch (decorrelation's W·R), or None.

    Sketching the fused weight's gradient keeps it unbiased for W too: ∂L/∂W = (∂L/∂(W·R))·Rᵀ is
    linear in the sketched gradient.  The getter is resolved when the class is built: Dynamo
    traces a plain function call, not ``property.fget`` (a graph break).
    """
    fused = getattr(cls, attr, None)
    return fused.fget if isinstance(fused, property) else None


def _base_weight(module: nn.Module, attr: str) -> torch.Tensor:
    """The weight the class below the sketch computes with: the parameter W, or W·R when decorrelated."""
    getter = type(module)._effcompile_base_getters.get(attr)
    return getter(module) if getter is not None else module._parameters[attr]


def _composes_with(owner: nn.Module, attr: str) -> bool:
    """A decorrelated layer (weight read as W·R) composes: the sketch applies to the fused weight."""
    return attr in getattr(type(owner), "_effcompile_decorrelated", ()) and \
        not hasattr(type(owner), "_effcompile_sketched")


def _marked_weight_property(attr: str, base_getter: Optional[Any]) -> property:
    def weight(self: nn.Module) -> torch.Tensor:
        parameter = base_getter(self) if base_getter is not None else self._parameters[attr]
        if self.training and torch.is_grad_enabled():
            if is_compiling():
                settings = _current_settings(self, attr)
                state = _state(self, attr)
                return MARKER(parameter, state.statistics if state is not None else None, *settings.marker_args())
            eager_layer = self.__dict__.get("_effcompile_eager_layers", {}).get(attr)
            mode = active_mode_for(eager_layer) if eager_layer is not None else None
            if mode is not None:  # inside a forward that uses the weight: its ops run sketched
                mode.watch(parameter, eager_layer)
            # Elsewhere (get_parameter, logging .grad, weight decay by attribute) it is the parameter.
        return parameter

    return property(weight)


def _sketch_linear(owner: nn.Module, attr: str, input: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` as :class:`SketchedLinear` with the layer's current settings."""
    from .estimators import SketchedLinear, apply_like_autocast

    settings = _current_settings(owner, attr)
    state = _state(owner, attr)
    return apply_like_autocast(SketchedLinear, (input, weight, bias), settings.keep if settings.keep < 1 else None,
                               settings.keep_input if settings.keep_input < 1 else None, settings.estimator,
                               settings.uniform_mix, settings.multiple,
                               state.statistics if isinstance(state, VarianceControl) else None, settings.ladder,
                               settings.center)


def _sketch_conv(owner: nn.Module, attr: str, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 stride: Any, padding: Any, dilation: Any, groups: int) -> torch.Tensor:
    """A convolution (numeric padding) as :class:`SketchedConv` with the layer's settings."""
    from .estimators import SketchedConv, apply_like_autocast

    settings = _current_settings(owner, attr)
    return apply_like_autocast(SketchedConv, (input, weight, bias), stride, padding, dilation, groups,
                               settings.keep if settings.keep < 1 else None, settings.estimator, settings.uniform_mix,
                               settings.multiple, settings.center)


def _sketched_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    if is_compiling() or not (self.training and torch.is_grad_enabled()):
        return F.linear(input, self.weight, self.bias)
    return _sketch_linear(self, "weight", input, _base_weight(self, "weight"), self.bias)


def _memory_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """Memory mode, eager and compiled alike: Dynamo traces the autograd function."""
    if not (self.training and torch.is_grad_enabled()):
        return F.linear(input, self.weight, self.bias)
    from .estimators import MemorySketchedLinear, apply_like_autocast, round_budget

    state = _state(self, "weight")
    settings = state.settings
    rows = input.numel() // input.shape[-1]
    k = round_budget(rows, settings.keep, settings.multiple)
    if k >= rows:
        return F.linear(input, self.weight, self.bias)
    return apply_like_autocast(MemorySketchedLinear, (input, self.weight, self.bias), state.position_grad_norms, k,
                               settings.estimator, settings.uniform_mix, settings.center)


def _sketched_conv_forward(self: ConvNd, input: torch.Tensor) -> torch.Tensor:
    original = type(self)._effcompile_original_class
    if is_compiling() or not (self.training and torch.is_grad_enabled()):
        return original.forward(self, input)
    return _sketch_conv(self, "weight", input, _base_weight(self, "weight"), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def _run_sketched(owner: nn.Module, attr: str, kind: str, args: tuple, kwargs: dict, input: Any, weight: Any
                  ) -> Optional[torch.Tensor]:
    """One layer op of a scope-sketched weight (:mod:`.eager_scope`) as its sketched autograd function."""
    return sketched_op(kind, args, kwargs, input, weight, functools.partial(_sketch_linear, owner, attr),
                       functools.partial(_sketch_conv, owner, attr))


def _eager_forward(cls: type, attrs: Tuple[str, ...]):
    """The eager sketched forward for this owner class, or None (then the layer is compiled-only)."""
    if attrs != ("weight",):
        return None
    if issubclass(cls, nn.Linear):
        return _sketched_linear_forward
    if issubclass(cls, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _sketched_conv_forward
    return None


def _used_by_owner_forward(candidate: LayerCandidate) -> bool:
    """Whether every use of the weight is an op of its owner's own forward.  MHA reads
    ``out_proj.weight`` inside its own forward and never calls ``out_proj``: a sketched forward
    swapped into the owner would never run, and the eager gradient would be silently exact."""
    return all(use.scope == candidate.owner_path for use in candidate.uses)


def _owner_forward_supported(owner: nn.Module, attr: str, candidate: LayerCandidate) -> bool:
    if _eager_forward(type(owner), (attr,)) is None or not _used_by_owner_forward(candidate):
        return False
    if isinstance(owner, ConvNd):  # SketchedConv: zero padding given as numbers
        return owner.padding_mode == "zeros" and not isinstance(owner.padding, str)
    return True


def _eager_path(owner: nn.Module, candidate: LayerCandidate) -> str:
    """How eager training sketches the layer: "forward" (the owner's swapped nn.Linear/conv
    forward) or "scope" (a mode around the forward of each module that uses the weight)."""
    return "forward" if _owner_forward_supported(owner, candidate.attr, candidate) else "scope"


_SKETCHED_CLASSES: Dict[Tuple[type, Tuple[str, ...], bool, bool], type] = {}


def _sketched_class(cls: type, attrs: Tuple[str, ...], memory_mode: bool = False, eager: bool = True) -> type:
    """The owner's class with its weights read through the marker; ``eager``: also the eager
    sketched forward (else eager training raises: the sketch runs compiled only)."""
    key = (cls, attrs, memory_mode, eager)
    if key not in _SKETCHED_CLASSES:
        namespace = {"_effcompile_original_class": cls, "_effcompile_sketched": attrs,
                     "_effcompile_base_getters": {attr: _fused_getter(cls, attr) for attr in attrs}}
        if memory_mode:  # the weight stays a plain parameter; the forward is the memory-mode function
            namespace["forward"] = _memory_linear_forward
            name = f"MemorySketched{cls.__name__}"
        else:
            namespace.update({attr: _marked_weight_property(attr, _fused_getter(cls, attr)) for attr in attrs})
            eager_forward = _eager_forward(cls, attrs) if eager else None
            if eager_forward is not None:
                namespace["forward"] = eager_forward
                namespace["_effcompile_eager_sketch"] = True
            name = f"Sketched{cls.__name__}"
        _SKETCHED_CLASSES[key] = picklable(type(name, (cls,), namespace), _sketched_class, key)
    return _SKETCHED_CLASSES[key]


@dataclasses.dataclass(frozen=True)
class _LayerSpec:
    """What ``apply`` needs for one planned layer."""

    owner_path: str
    attr: str
    settings: LayerSketch
    mode: str  # "marker" | "adaptive" | "memory"
    positions: int = 1  # memory mode: token positions per sample (rows = batch · positions)
    eager: str = "forward"  # see _eager_path
    scopes: Tuple[str, ...] = ()  # eager "scope": the modules whose forward uses the weight


def _layer_change(row: PlanRow, step: StepWork) -> Optional[Work]:
    """The cost model's change of the step from sketching ``row``'s layer (cost.py), or None."""
    layer = step.layers.get(row.layer)
    if not isinstance(row.spec, _LayerSpec) or layer is None:
        return None
    return layer_change(row.spec.settings, row.op, row.input_shape, layer, adaptive=row.spec.mode == "adaptive",
                        compiled=step.compiled)


def _skip_unprofitable(rows: List[PlanRow], step: StepWork) -> None:
    """``profitable_only``: a layer whose sketch is predicted to slow the step stays exact."""
    planned = [row for row in rows if row.applied]
    kind = "compiled" if step.compiled else "eager"
    for row in rows:
        change = _layer_change(row, step) if row.applied else None
        if change is None or profitable(change):
            continue
        row.action, row.spec = Action.SKIP, None
        row.details["skipped_by"] = "profitable_only"
        row.reason = (f"profitable_only: sketching is predicted to change the {kind} step by "
                      f"{100 * change.units / step.total.units:+.1f}%, less saving than cost.PROFIT_MARGIN asks "
                      "(its scoring, gathers and fixed cost take what the smaller GEMM saves): exact backprop")
    if planned and not any(row.applied for row in rows):
        warnings.warn(f"effcompile randomized_vjp: profitable_only={kind!r} left every layer exact: at these shapes "
                      "the cost model predicts no layer's sketch saves time (the Plan gives each layer's prediction)",
                      stacklevel=4)


class RandomizedVJPPass(ModelPass):
    config_type = RandomizedVJP
    # FSDP2: the weight reads see the unsharded parameter inside forward (fully_shard swaps it into
    # _parameters), and a sharded one between forwards is returned as is (tests/test_fsdp2.py).
    sharded_parameters_unsupported = ""
    compiled_cost = True  # predict_change knows the compiled step (cost.py)

    def plan(self, model: nn.Module, captured: GraphCapture, config: RandomizedVJP) -> List[PlanRow]:
        rows = [self._plan_layer(model, candidate, config) for candidate in captured.layers]
        if config.profitable_only:
            _skip_unprofitable(rows, captured.plain_step(model, compiled=config.profitable_only == "compiled"))
        return rows + uncovered_rows(self.name, model, captured, rows)

    def _plan_layer(self, model: nn.Module, candidate: LayerCandidate, config: RandomizedVJP) -> PlanRow:
        first = candidate.uses[0]
        row = PlanRow(layer=candidate.layer, pass_name=self.name, action=Action.REWRITE, op=first.op,
                      input_shape=first.input_shape, weight_shape=candidate.weight_shape)
        owner = model.get_submodule(candidate.owner_path)
        reason = self._skip_reason(owner, candidate, config, candidate.parameter(model).requires_grad)
        if reason:
            row.action, row.reason = Action.SKIP, reason
            return row
        is_conv = first.op.startswith("conv")
        mode = "memory" if config.memory_mode else "adaptive" if (config.adaptive and not is_conv) else "marker"
        settings = _settings(config, candidate.layer, owner._parameters[candidate.attr].device, mode == "adaptive")
        rows = sampled_rows(first.op, first.input_shape)
        from .estimators import round_budget

        row.details = {"estimator": settings.estimator, "target": config.target}
        if settings.keep < 1:
            sampled = "k_images" if is_conv else "k_rows"
            k = round_budget(rows, settings.keep, settings.multiple) if rows else 0
            row.details.update({"keep": settings.keep, sampled: f"{k}/{rows}"})
            if settings.center:  # grad_weight: centred rows + the exact mean term
                row.details["center"] = True
            if rows and k >= rows:  # never a silent no-op: say so in the Plan and warn
                row.reason = (f"keep={settings.keep:g} of {rows} {'images' if is_conv else 'rows'} rounds up to all "
                              f"{rows} with multiple={settings.multiple}: exact at this batch size (lower "
                              "RandomizedVJP(multiple=...) or use a larger batch)")
                warnings.warn(f"effcompile randomized_vjp: layer {candidate.layer!r}: {row.reason}", stacklevel=4)
        if settings.keep_input < 1:
            features = candidate.weight_shape[0]
            row.details.update(keep_input=settings.keep_input,
                               k_features=f"{round_budget(features, settings.keep_input, settings.multiple)}/{features}")
        if config.adaptive:
            row.details["adaptive"] = "yes" if mode == "adaptive" else "no (convolution: fixed keep)"
        if mode == "memory":
            row.details["memory_mode"] = "yes"
        eager = "forward" if mode == "memory" else _eager_path(owner, candidate)  # memory mode: nn.Linear owners
        scopes = tuple(dict.fromkeys(use.scope for use in candidate.uses)) if eager == "scope" else ()
        row.details["eager"] = "yes"
        if scopes:
            row.details["eager_scope"] = ",".join(scope or "<root>" for scope in scopes)
        positions = math.prod(first.input_shape[1:-1]) if first.input_shape and len(first.input_shape) > 2 else 1
        row.spec = _LayerSpec(candidate.owner_path, candidate.attr, settings, mode, positions, eager, scopes)
        return row

    @staticmethod
    def _skip_reason(owner: nn.Module, candidate: LayerCandidate, config: RandomizedVJP, trainable: bool) -> str:
        excluded = [pattern for pattern in config.exclude if fnmatch.fnmatchcase(candidate.layer, pattern)]
        if excluded:
            return f"excluded by RandomizedVJP(exclude=...) pattern {excluded[0]!r}: exact backprop"
        if candidate.other_uses:
            return f"the weight is also used by {', '.join(sorted(set(candidate.other_uses)))}"
        if config.target == "grad_weight" and not trainable:
            return "frozen weight (requires_grad=False): autograd computes no weight gradient to sketch"
        kinds = {use.op for use in candidate.uses}
        dense = kinds <= {"linear", "matmul"}  # matmul: X @ W in either layout (GPT-2's Conv1D is addmm(b, X, W))
        if not dense and (len(kinds) != 1 or not next(iter(kinds)).startswith("conv")):
            return f"{'/'.join(sorted(kinds))}: a weight used by both dense and convolution ops has no single sketch"
        if any(use.unsupported for use in candidate.uses):
            return candidate.uses[0].unsupported
        if next(iter(kinds)).startswith("conv") and (config.estimator == "sketch" or config.target == "grad_input"):
            return "convolutions sketch grad_weight with estimator importance/uniform only in this version"
        if hasattr(type(owner), "_effcompile_original_class") and not _composes_with(owner, candidate.attr):
            return "the layer already carries a weight rewrite this pass cannot compose with"
        if config.memory_mode and not (kinds == {"linear"} and isinstance(owner, nn.Linear) and candidate.attr == "weight"
                                       and len(candidate.uses) == 1 and _used_by_owner_forward(candidate)):
            return ("memory_mode saves sampled input rows of nn.Linear layers only (convolutions and functional "
                    "uses of a weight keep their exact backward in memory mode)")
        return ""

    def apply(self, model: nn.Module, rows: List[PlanRow], config: RandomizedVJP) -> int:
        by_owner: Dict[str, List[_LayerSpec]] = {}
        by_scope: Dict[str, List[EagerLayer]] = {}
        for row in rows:
            by_owner.setdefault(row.spec.owner_path, []).append(row.spec)
        for owner_path, specs in by_owner.items():
            owner = model.get_submodule(owner_path)
            device = owner._parameters[specs[0].attr].device
            for spec in specs:
                if spec.mode == "adaptive":
                    owner.add_module(spec.attr + _STATE_SUFFIX, VarianceControl(spec.settings, config, device))
                elif spec.mode == "memory":
                    owner.add_module(spec.attr + _STATE_SUFFIX,
                                     MemoryModeState(spec.settings, spec.positions, config, device))
            owner.__dict__["_effcompile_sketch"] = {spec.attr: spec.settings for spec in specs}
            for spec in specs:
                if spec.eager == "scope":
                    layer = EagerLayer(owner, spec.attr, spec.settings.layer, _run_sketched)
                    owner.__dict__.setdefault("_effcompile_eager_layers", {})[spec.attr] = layer
                    for scope in spec.scopes:
                        by_scope.setdefault(scope, []).append(layer)
            memory_mode = any(spec.mode == "memory" for spec in specs)
            owner.__class__ = _sketched_class(type(owner), tuple(sorted(spec.attr for spec in specs)), memory_mode,
                                              eager=all(spec.eager == "forward" for spec in specs))
        handles = []
        for scope, layers in by_scope.items():
            hooks = ScopeSketch(scope, layers)
            module = model.get_submodule(scope)
            handles += [module.register_forward_pre_hook(hooks.enter),
                        module.register_forward_hook(hooks.exit, always_call=True)]
        model.__dict__.setdefault("_effcompile_hooks", {}).setdefault(self.name, []).extend(handles)
        return sum(len(specs) for specs in by_owner.values())

    def predict_change(self, model: nn.Module, rows: List[PlanRow], config: RandomizedVJP,
                       step: StepWork) -> Optional[Work]:
        """Each sketched layer's saved products and added scoring, gathers and ops (cost.py)."""
        change = Work()
        for row in rows:
            own = _layer_change(row, step)
            if own is not None:  # this layer's share: where the sketch pays and where it costs
                row.details["step_change_compiled" if step.compiled else "step_change"] = \
                    f"{100 * own.units / step.total.units:+.1f}%"
                change += own
        return change

    def live_details(self, model: nn.Module, row: PlanRow) -> Dict[str, object]:
        if not isinstance(row.spec, _LayerSpec):
            return {}
        state = _state(model.get_submodule(row.spec.owner_path), row.spec.attr)
        if state is None:
            return {}
        details = state.details()
        rows = sampled_rows(row.op, row.input_shape)
        if isinstance(state, VarianceControl) and rows:
            from .estimators import round_budget

            details["k_rows"] = f"{round_budget(rows, state.settings.keep, state.settings.multiple)}/{rows}"
        return details

    def is_applied(self, model: nn.Module) -> bool:
        # getattr, not the class __dict__: wrappers that subclass the module's class (FSDP2's
        # fully_shard makes FSDP<Class>) keep the pass applied.
        return any(getattr(type(m), "_effcompile_sketched", None) for m in model.modules())

    def inspect_views(self, model: nn.Module, example_inputs: Sequence[Any]) -> List[Tuple[str, List[str]]]:
        """The backward is not in ONNX: the joint-graph GEMMs one compiled step rewrites."""
        from effcompile.harness.reports import markdown_table

        records = inspect_backward(model, example_inputs)
        table = markdown_table(["layer", "gemm", "sampled dim", "k/n", "estimator", "before", "after"],
                               [[r.layer, r.gemm, r.sampled_dim, f"{r.k}/{r.n}", r.estimator, r.before, r.after]
                                for r in records])
        return [("Backward GEMMs rewritten in the AOT joint graph", table.split("\n"))]

    def fold(self, model: nn.Module) -> int:
        folded = 0
        for module in list(model.modules()):
            attrs = type(module).__dict__.get("_effcompile_sketched")
            if attrs:
                module.__class__ = type(module)._effcompile_original_class
                module.__dict__.pop("_effcompile_sketch", None)
                module.__dict__.pop("_effcompile_eager_layers", None)
                for attr in attrs:
                    module._modules.pop(attr + _STATE_SUFFIX, None)
                folded += 1
        for handle in model.__dict__.get("_effcompile_hooks", {}).pop(self.name, []):
            handle.remove()
        return folded


register_pass(RandomizedVJPPass())
