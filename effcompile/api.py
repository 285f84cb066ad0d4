"""Public entry points: transform, report, fold, train_step."""

from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Any, Callable, List, Optional

import torch
import torch.nn as nn

from ._compat import inside_ddp_forward
from .compiling import compile_for, scheduled
from .config import PassConfig
from .cost import StepWork, predicted_ratio
from .distributed import WrapperForward, is_distributed
from .inputs import call, model_inputs, training_batch
from .plan import Plan, PlanRefused, PlanRow

__all__ = ["transform", "apply_plan", "report", "fold", "train_step", "training_loss", "plain_train_step",
           "check_finite_loss", "plan_of", "predicted_step", "clip_gradients", "checked_max_grad_norm"]

_PLAN_ATTR = "_effcompile_plan"


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind torch.compile / DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _as_tuple(example_inputs: Any) -> tuple:
    """Positional inputs only (for code paths that take no keyword batch); dicts raise."""
    batch = model_inputs(example_inputs)
    if batch.kwargs:
        raise TypeError(f"this entry point takes positional inputs; got a dict batch with keys {sorted(batch.kwargs)}")
    return batch.args


def transform(model: nn.Module, *configs: PassConfig, example_inputs: Any = None) -> nn.Module:
    """Apply effcompile passes to ``model`` in place and return it.

    The model keeps its call signature and every original ``state_dict`` key; pass state (e.g.
    decorrelation matrices) is added as buffers of new submodules.  Layers are found on the graph
    captured by ``torch.export`` from ``example_inputs``: a tensor, a tuple of positional inputs, or
    a dict of keyword arguments (``model(**batch)``, e.g. a Hugging Face batch).  Every per-layer decision is recorded in the Plan (``effcompile.report(model)``);
    layers a pass cannot handle are listed there with the reason and reported in one warning.
    """
    from effcompile.passes import PASSES, capture  # imported late: the passes import the core

    if not isinstance(model, nn.Module):
        raise TypeError(f"transform expects an nn.Module, got {type(model).__name__}")
    if hasattr(model, "_orig_mod"):
        raise TypeError("transform the model before torch.compile: compile(transform(model, ...), backend='effcompile')")
    if not configs:
        raise ValueError("transform needs at least one pass config, e.g. effcompile.Decorrelation()")
    names = []
    for config in configs:
        if not isinstance(config, PassConfig):
            raise TypeError(f"expected pass configs such as effcompile.Decorrelation(), got {config!r}")
        if config.name not in PASSES:
            raise ValueError(f"pass {config.name!r} is not implemented; available: {sorted(PASSES)}")
        if config.name in names:
            raise ValueError(f"pass {config.name!r} was given twice")
        if PASSES[config.name].is_applied(model):
            raise ValueError(f"model already carries the {config.name!r} pass; fold it or transform the original model")
        names.append(config.name)
    if example_inputs is None:
        raise ValueError("transform needs example_inputs (a tensor, a tuple or a dict of the forward's inputs): "
                         "layers are found on the graph captured from one call of the model")

    _refuse_sharded_transform(model)
    involved = [PASSES[name] for name in names] + [p for p in PASSES.values() if p.name not in names and p.is_applied(model)]
    refused = [row for model_pass in involved for row in model_pass.refusals(model, configs)]
    if refused:
        raise PlanRefused(refused)

    captured = capture(model, model_inputs(example_inputs))
    plain_step = _plain_step(model, captured)
    plan = plan_of(model) or Plan()
    # Plan and apply one pass at a time: a later pass must see the earlier passes' rewrites
    # (e.g. it skips a layer whose weight another pass already rewrites).
    for config in configs:
        model_pass = PASSES[config.name]
        rows = model_pass.plan(model, captured, config)
        if not rows:
            raise ValueError(f"{model_pass.name}: the captured graph of {type(model).__name__} has no layer this pass "
                             "applies to (no linear, conv or matmul against a parameter)")
        model_pass.apply(model, [row for row in rows if row.applied], config)
        _show_prediction(model_pass, model, rows, config, plain_step)
        if model_pass.compiled_cost and plain_step is not None:
            _show_prediction(model_pass, model, rows, config, _plain_step(model, captured, compiled=True))
        for row in rows:
            plan.add(row)
        _warn_skips(model_pass.name, [row for row in rows if not row.applied and not row.skipped_by_config])
    model.__dict__[_PLAN_ATTR] = plan
    _guard_step_owners(model)
    return model


def _plain_step(model: nn.Module, captured, compiled: bool = False) -> Optional[StepWork]:
    """The cost model's plain training step of the captured model (``effcompile.cost``)."""
    try:
        return captured.plain_step(model, compiled)
    except Exception as error:  # noqa: BLE001 — an op the counter cannot size: no prediction, said once
        warnings.warn(f"effcompile: the cost model could not size the captured graph ({type(error).__name__}: "
                      f"{error}); the Plan shows no predicted_step", stacklevel=3)
        return None


def _show_prediction(model_pass, model: nn.Module, rows: List[PlanRow], config: PassConfig,
                     plain_step: Optional[StepWork]) -> None:
    """``predicted_step`` (the pass's cost model: eager step time relative to plain backprop) on
    every applied row of the pass; ``predicted_step_compiled`` for a compiled ``plain_step``."""
    applied = [row for row in rows if row.applied]
    if plain_step is None or not applied:
        return
    ratio = predicted_ratio(plain_step, model_pass.predict_change(model, applied, config, plain_step))
    if ratio is not None:
        for row in applied:
            row.details[_PREDICTED[plain_step.compiled]] = ratio


_PREDICTED = {False: "predicted_step", True: "predicted_step_compiled"}


def predicted_step(model: nn.Module, compiled: bool = False) -> Optional[float]:
    """The Plan's predicted step time relative to plain backprop, all the model's passes together
    (their predicted changes summed), eager or compiled (Inductor), or None when no pass of the
    Plan has a cost model for that kind of step."""
    plan = plan_of(model)
    ratios = {}
    for row in plan or ():
        if _PREDICTED[compiled] in row.details:
            ratios[row.pass_name] = float(row.details[_PREDICTED[compiled]])
    return round(1.0 + sum(ratio - 1.0 for ratio in ratios.values()), 3) if ratios else None


def apply_plan(model: nn.Module, plan: Plan, *configs: PassConfig, example_inputs: Any) -> nn.Module:
    """Apply a Plan that ``transform`` decided elsewhere (another process) to this copy of the model.

    ``model`` must be built the same way as the one the Plan was made for, and ``configs`` must be
    the configs of that transform (passes the model already carries, applied by the factory that
    built it, are kept as they are).  Nothing is captured, measured or searched again: every pass
    rebuilds what it needs from the recorded decisions (``ModelPass.replan``) and applies them.
    """
    from effcompile.passes import PASSES

    by_name = {config.name: config for config in configs}
    order = list(dict.fromkeys(row.pass_name for row in plan))
    # Passes the model already carries (its factory transformed it before this one) keep their
    # own application; only the configs given here are applied.
    carried = {name for name in order if name not in by_name and PASSES[name].is_applied(model)}
    if set(order) - carried != set(by_name):
        raise ValueError(f"apply_plan: the Plan holds passes {order} but the configs are {sorted(by_name)}"
                         + (f" (the model already carries {sorted(carried)})" if carried else ""))
    order = [name for name in order if name not in carried]
    for name in order:
        rows = PASSES[name].replan(model, plan.for_pass(name).rows, by_name[name], example_inputs)
        PASSES[name].apply(model, [row for row in rows if row.applied], by_name[name])
    model.__dict__[_PLAN_ATTR] = Plan(list(plan))
    _guard_step_owners(model)
    return model


def _first_sharded(model: nn.Module) -> Optional[str]:
    """The name of the model's first FSDP2-sharded (DTensor) parameter, or None."""
    from ._compat import is_sharded

    return next((name for name, p in model.named_parameters() if is_sharded(p)), None)


def _refuse_sharded_transform(model: nn.Module) -> None:
    """Layers are found on a graph captured from plain parameters: transform first, then shard."""
    sharded = _first_sharded(model)
    if sharded is not None:
        raise NotImplementedError(
            f"effcompile.transform: the model's parameters are already sharded (FSDP2 fully_shard: {sharded!r} is "
            "a DTensor); transform the plain model, then fully_shard it: transform(model, ...); fully_shard(...); "
            "train_step(model, ...)")


def _refuse_sharded(model: nn.Module, passes: list, where: str) -> None:
    """FSDP2-sharded parameters (DTensors) with a pass that cannot train them: say so, naming it."""
    sharded = _first_sharded(model)
    if sharded is None:
        return
    refused = [(p.name, p.sharded_parameters_unsupported) for p in passes if p.sharded_parameters_unsupported]
    if refused:
        listed = "; ".join(f"{name}: {reason}" for name, reason in refused)
        raise NotImplementedError(f"effcompile.{where}: the model's parameters are sharded (FSDP2 fully_shard: "
                                  f"{sharded!r} is a DTensor) and {listed}")


def _warn_skips(pass_name: str, skipped: list) -> None:
    if skipped:
        listed = "; ".join(f"{row.layer}: {row.reason}" for row in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        warnings.warn(f"effcompile {pass_name}: skipped {len(skipped)} layer(s) — {listed}{more}. "
                      "See effcompile.report(model).", stacklevel=3)


def plan_of(model: nn.Module) -> Optional[Plan]:
    return _unwrap(model).__dict__.get(_PLAN_ATTR)


def report(model: nn.Module) -> Plan:
    """The Plan of a transformed model, with live counters (reads device values: call it sparingly)."""
    from effcompile.passes import PASSES

    base = _unwrap(model)
    plan = plan_of(base)
    if plan is None:
        raise ValueError(f"{type(base).__name__} was not transformed by effcompile.transform")
    rows = []
    for row in plan:
        live = copy.copy(row)
        if row.applied and row.pass_name in PASSES:
            live.details = {**row.details, **PASSES[row.pass_name].live_details(base, row)}
        rows.append(live)
    return Plan(rows)


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Bake every pass into plain weights (W ← W·R) and return a model without effcompile state.

    The result has the original classes, keys and forward; use it for deployment or export.
    """
    from effcompile.passes import PASSES

    target = _unwrap(model)
    if not inplace:
        target = copy.deepcopy(target)
    plan = plan_of(target)
    # Undo in reverse order of application: a later pass may have wrapped an earlier pass's rewrite
    # (e.g. a randomized VJP on a decorrelated layer's fused weight).
    applied = list(dict.fromkeys(row.pass_name for row in plan)) if plan is not None else []
    order = [name for name in reversed(applied) if name in PASSES] + [name for name in PASSES if name not in applied]
    for name in order:
        if PASSES[name].is_applied(target):
            PASSES[name].fold(target)
    target.__dict__.pop(_PLAN_ATTR, None)
    for handles in target.__dict__.pop("_effcompile_hooks", {}).values():
        for handle in handles:
            handle.remove()
    target.__dict__.pop("_effcompile_warned_outside_step", None)
    return target


def train_step(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    compile: bool = False,
    backend: Any = "effcompile",
    check_finite: bool = False,
    max_grad_norm: Optional[float] = None,
    grad_scaler: Optional[Any] = None,
) -> Callable[[Any, Any], torch.Tensor]:
    """Return ``step(inputs, targets) -> loss``: one optimizer step, pass updates included.

    ``inputs`` is a tensor, a tuple of positional inputs or a dict of keyword arguments; the loss
    function receives the model's output as the model returned it (tensor, tuple, ``ModelOutput``).  With ``compile=True`` the forward and
    loss run through ``torch.compile(backend=backend)`` (``"effcompile"``: Inductor with the
    effcompile graph passes).  The returned loss is the batch's training loss at the weights before
    the update (sample selection: the full-batch mean of its train-mode per-sample losses —
    BatchNorm by batch statistics, running stats untouched; ``step.last_subset_loss`` is what was
    backpropagated).  It is detached and stays on device (no host sync);
    ``check_finite=True`` raises ``FloatingPointError`` on a non-finite loss before the optimizer
    step, at the cost of one host sync per step.  ``max_grad_norm`` clips the gradients' total
    2-norm before the optimizer step (``torch.nn.utils.clip_grad_norm_``, after any data-parallel
    reduction); greedy stages clip each stage's parameters and aux head on their own, as separate
    per-stage optimizers would.  The norm before clipping is ``step.grad_norm`` (greedy stages:
    ``step.stage_grad_norms``).  ``grad_scaler`` (a ``torch.amp.GradScaler``, for float16
    autocast): every backward runs on the scaled loss, the gradients are unscaled before clipping,
    and ``grad_scaler.step``/``update`` replace the optimizer step (a step whose gradients are not
    finite is skipped and the scale lowered).
    """

    from effcompile.passes import PASSES, StepOptions, step_owners

    max_grad_norm = checked_max_grad_norm(max_grad_norm, "train_step")
    if grad_scaler is not None and not all(callable(getattr(grad_scaler, name, None))
                                           for name in ("scale", "unscale_", "step", "update")):
        raise TypeError(f"train_step: grad_scaler must be a torch.amp.GradScaler, got {grad_scaler!r}")
    options = StepOptions(compile=compile, backend=backend, check_finite=check_finite,
                          max_grad_norm=max_grad_norm,
                          grad_scaler=grad_scaler)
    base = _unwrap(model)
    _refuse_sharded(base, [p for p in PASSES.values() if p.is_applied(base)], "train_step")
    step = None
    for owner in step_owners():
        if owner.is_applied(base):
            step = owner.make_train_step(model, loss_fn, optimizer, options)
            if step is not None:
                break
    step = step or plain_train_step(model, loss_fn, optimizer, options)
    return scheduled(base, step) if compile else step


def training_loss(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    compile: bool = False,
    backend: Any = "effcompile",
    check_finite: bool = False,
) -> Callable[[Any, Any], torch.Tensor]:
    """Return ``objective(inputs, targets) -> loss`` for a trainer that owns the backward and the
    optimizer (``transformers.Trainer.compute_loss``, Lightning's ``training_step``, a loop with
    gradient accumulation, clipping or a ``GradScaler``): ``loss.backward()`` leaves the gradients
    :func:`train_step` would apply.

    Greedy stages: the sum of the stage losses (their graphs are disjoint, so each stage's
    parameters get its own loss's gradient; one backward keeps every stage's activations until it
    runs, where ``train_step`` frees them stage by stage).  Sample selection: the weighted loss of
    the selected rows.  Other passes: ``loss_fn(model(inputs), targets)``.  The loss to log is
    ``objective.reported_loss`` (detached: the last stage's loss; selection's full-batch mean);
    ``objective.stage_losses`` and ``objective.last_selection`` as on the step.

    Data parallelism: given a DDP-wrapped model with more than one rank, a step-owning pass's
    objective runs the module behind the wrapper as the wrapper's forward (``WrapperForward``), so
    the trainer's backward all-reduces its gradients as it would a plain forward's (``no_sync()``
    honoured).  An FSDP2 ``fully_shard`` root: the objective runs within the root's forward (greedy
    stages run as it), so the backward reduce-scatters.  A model passed unwrapped runs as it is:
    inside a trainer that already calls the objective within the wrapper's forward (Lightning's
    strategies) that is what averages it; called outside any DDP forward under more than one
    rank, a step owner's objective made from an unwrapped model raises ``RuntimeError`` instead of
    training each rank apart.
    """
    from effcompile.passes import PASSES, StepOptions, step_owners

    options = StepOptions(compile=compile, backend=backend, check_finite=check_finite)
    base = _unwrap(model)
    _refuse_sharded(base, [p for p in PASSES.values() if p.is_applied(base)], "training_loss")
    wrapper = WrapperForward.of(model)
    for owner in step_owners():
        if owner.is_applied(base):
            # Under a wrapper the objective runs the module behind it, inside the wrapper's forward.
            objective = owner.make_training_loss(model if wrapper is None else base, loss_fn, options)
            if objective is not None:
                objective = _StepOwnerObjective(objective, owner.name, wrapper, WrapperForward.fsdp_root(base) is not None)
                return scheduled(base, objective) if compile else objective
    objective = plain_training_loss(model, loss_fn, options)
    return scheduled(base, objective) if compile else objective


class _StepOwnerObjective:
    """A step owner's objective, run as the data-parallel wrapper's forward where there is one;
    attribute reads (``reported_loss``, ``stage_losses``, ``last_selection``) go to the objective."""

    def __init__(self, objective: Callable, owner: str, wrapper: Optional[WrapperForward], sharded: bool) -> None:
        # A bound method's attributes live on its instance (the pass's step object).
        self.__dict__.update(_state=getattr(objective, "__self__", objective), _run=training_step(objective),
                             _owner=owner, _wrapper=wrapper, _sharded=sharded)

    def __call__(self, inputs: Any, targets: Any) -> torch.Tensor:
        if self._wrapper is not None:
            return self._wrapper(self._run, inputs, targets)
        if not self._sharded and is_distributed() and not inside_ddp_forward():
            raise RuntimeError(
                f"effcompile.training_loss: {self._owner} runs under torch.distributed with "
                f"{torch.distributed.get_world_size()} ranks, but the objective was made from a model without its "
                "DDP wrapper and is not called inside a DDP forward, so nothing would average its gradients. Make "
                "it from the DDP-wrapped model (in transformers.Trainer.compute_loss: the `model` argument), or "
                "call it inside the wrapper's forward (Lightning's strategies do)")
        return self._run(inputs, targets)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_state"], name)


def plain_training_loss(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                        options: Any) -> Callable[[Any, Any], torch.Tensor]:
    """``loss_fn(model(inputs), targets)`` (compiled if asked): the objective of every pass that
    keeps the step's shape."""

    def forward_loss(inputs: Any, targets: Any) -> torch.Tensor:
        return loss_fn(call(model, inputs), targets)

    compiled = compile_for(_unwrap(model), forward_loss, backend=options.backend) if options.compile else forward_loss
    batch = training_batch(_unwrap(model))
    counter = {"step": 0}

    def objective(inputs: Any, targets: Any) -> torch.Tensor:
        loss = compiled(batch(inputs), targets)
        if options.check_finite:
            check_finite_loss(loss, counter["step"])
        counter["step"] += 1
        objective.reported_loss = loss.detach()
        return loss

    objective.reported_loss = None
    return objective


def plain_train_step(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                     optimizer: torch.optim.Optimizer, options: Any) -> Callable[[Any, Any], torch.Tensor]:
    """One loss, one backward, one optimizer step (the step of every pass that keeps its shape)."""
    objective = plain_training_loss(model, loss_fn, options)

    def step(inputs: Any, targets: Any) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        options.backward(objective(inputs, targets))
        norms = options.optimizer_step(optimizer, lambda: [list(model.parameters())])
        step.grad_norm = norms[0] if norms else None
        return objective.reported_loss

    step.grad_norm = None
    return step


def checked_max_grad_norm(value: Any, where: str) -> Optional[float]:
    """``value`` as a float clip norm (None: no clipping); ``ValueError`` unless positive and finite."""
    if value is None:
        return None
    if not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise ValueError(f"{where}: max_grad_norm must be a positive finite number or None, got {value!r}")
    return float(value)


def clip_gradients(groups: List[List[nn.Parameter]], max_norm: float) -> List[torch.Tensor]:
    """Scale each group's gradients so that its total 2-norm is at most ``max_norm``; the norms
    before clipping, one per group (a group without gradients: 0)."""
    norms = []
    for group in groups:
        with_grad = [parameter for parameter in group if parameter.grad is not None]
        norms.append(torch.nn.utils.clip_grad_norm_(with_grad, max_norm) if with_grad else torch.zeros(()))
    return norms


# How many effcompile training steps are running (a list: Dynamo guards on its value, so the
# step guard below compiles to nothing inside a compiled step).
_STEPS_RUNNING = [0]
_STEP_GUARD = "step_guard"


def training_step(step_fn: Callable) -> Callable:
    """Mark ``step_fn`` as an effcompile training step: forwards inside it are the step's own."""

    @functools.wraps(step_fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        _STEPS_RUNNING[0] += 1
        try:
            return step_fn(*args, **kwargs)
        finally:
            _STEPS_RUNNING[0] -= 1

    return run


@torch.compiler.disable
def _warn_outside_step(model: nn.Module, owners: List[str]) -> None:
    model.__dict__["_effcompile_warned_outside_step"] = True
    warnings.warn(
        f"effcompile: {type(model).__name__} carries {', '.join(owners)}, which train(s) through "
        "effcompile.train_step, but it ran a training forward outside it: a backward from this forward "
        "trains it as plain backprop, without the technique. Use step = effcompile.train_step(model, "
        "loss_fn, optimizer) (warned once per model).", stacklevel=3)


def _guard_step_owners(model: nn.Module) -> None:
    """A step-owning pass (its technique lives in the step, not the forward) does nothing in the
    user's own loop: warn at the first training forward with grad outside ``train_step``."""
    from effcompile.passes import step_owners

    hooks = model.__dict__.setdefault("_effcompile_hooks", {})
    for handle in hooks.pop(_STEP_GUARD, []):
        handle.remove()
    owners = [owner.name for owner in step_owners() if owner.is_applied(model)]
    if owners:
        hooks[_STEP_GUARD] = [model.register_forward_pre_hook(_StepGuard(owners), with_kwargs=True)]


class _StepGuard:
    """The forward pre-hook of :func:`_guard_step_owners` (a class, so ``torch.save(model)`` pickles it)."""

    def __init__(self, owners: List[str]) -> None:
        self.owners = owners

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and not _STEPS_RUNNING[0] and torch.is_grad_enabled() \
                and not module.__dict__.get("_effcompile_warned_outside_step", False):
            _warn_outside_step(module, self.owners)


def check_finite_loss(loss: torch.Tensor, step_index: int) -> None:
    """Raise ``FloatingPointError`` before the optimizer step when ``loss`` is NaN/Inf (one host sync)."""
    if not bool(torch.isfinite(loss).all()):
        raise FloatingPointError(f"non-finite loss {loss.detach().float().sum().item()} at step {step_index}; "
                                 "the optimizer step was not taken")
