"""Sample-selection pass: forward the batch, backpropagate a weighted subset of its rows.

Model before: unchanged forward; the training step is ``loss_fn(model(x), y).backward()``.

Model after: the same forward and ``state_dict`` keys, plus a ``SampleSelector`` submodule
(``<root>.sample_selector``: loss history, counters, last selection as buffers) and, for
``strategy="gradmatch"``, a forward hook on the head module that hands the head's input h to the
step.  ``effcompile.train_step`` then builds one of two steps (``B`` rows, ``k`` selected)::

    forward reuse (one compiled function: forward → ℓ → selection → selected loss):
        z = model(x)                       # B rows, activations saved for backward
        ℓ = per_sample_loss(z, y)          # (B,)
        idx, w = selector.select(ℓ, h, z, y)
        L = Σ_j w_j · select_rows(ℓ, idx)_j   # backward marked row-sparse from here
        L.backward()                       # only rows idx carry gradient

    re-forward (models with batch-coupled layers, or mode="reforward"):
        scoring mode: every module in eval mode except the normalisation layers whose forward
        depends on the mode (BatchNorm of any dim, InstanceNorm tracking running stats, a
        training-mode batch-norm op found on the graph), which stay in train mode:
        with no_grad, scoring mode, their running stats saved and restored:
            z = model(x); ℓ = per_sample_loss(z, y); idx, w = select(...)   # train-mode batch stats of B rows
        L = Σ_j w_j · per_sample_loss(model(x[idx]), y[idx])_j     # train mode, k rows
        L.backward()

Step cost (forward 1, backward 2) relative to backprop: forward reuse (1+2f)/3 once the
``effcompile`` backend's row-sparse joint pass shrinks the backward GEMMs to the k rows (without
it, in eager or other backends, the gradient is identical but the backward is full-size);
re-forward (1+3f)/3.  BatchNorm couples rows through batch statistics, so forward reuse would
differentiate through full-batch statistics while a true subset step would not: the plan falls
back to re-forward there.  Its scores are the per-sample losses of a training-mode forward of
the whole batch (normalised by that batch's statistics, exactly what backprop's forward computes),
not of an eval-mode forward: early in training the running statistics lag the weights, and an
eval-mode scoring loss ranks rows by that lag (observed: eval losses of 1e14 and more where the
training loss is ~10).  The scoring forward leaves every running statistic as it was (saved and
restored around it; dropout is off in it, see ``scoring_description``), and the step returns the
mean of those training-mode per-sample losses: the loss plain backprop reports for that batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from effcompile.api import _unwrap, check_finite_loss, training_step
from effcompile.compiling import compile_for
from effcompile.distributed import DataParallelSync
from effcompile.cost import StepWork, Work
from effcompile.inputs import model_inputs, tensor_leaves, training_batch
from effcompile.passes.analysis.state_children import attach, detach
from .config import SampleSelection
from .cost import selection_change
from effcompile.plan import Action, PlanRow
from .selectors import SampleSelector, num_selected, output_errors, per_sample_loss_fn, selector_of

from effcompile.passes.base import ModelPass, StepOptions, register_pass
from effcompile.passes.analysis.capture import _ROW_PRESERVING_OPS, GraphCapture, InputLocation, LayerCandidate, WeightUse, _scope
from .row_sparse_backward import select_rows

__all__ = ["SampleSelectionPass", "SelectionStep", "SelectionSpec", "SELECTOR_NAME", "batch_coupled_layers",
           "find_head", "FORWARD_REUSE", "REFORWARD"]

aten = torch.ops.aten
SELECTOR_NAME = "sample_selector"
FORWARD_REUSE, REFORWARD = "forward_reuse", "reforward"

# Training-mode batch norms in an exported (training IR or decomposed) graph.
_BATCH_NORM_OPS = tuple(
    getattr(aten, name).default for name in
    ("_native_batch_norm_legit_functional", "_native_batch_norm_legit", "native_batch_norm", "batch_norm",
     "cudnn_batch_norm", "_batch_norm_with_update", "_batch_norm_with_update_functional")
    if hasattr(aten, name) and hasattr(getattr(aten, name), "default")
)


@dataclasses.dataclass(frozen=True)
class SelectionSpec:
    """What the runtime needs: the decided mode and the head whose input gradmatch reads."""

    mode: str
    batch_size: int
    k: int
    head_scope: Optional[str] = None  # module whose call receives the head's input
    head_input: Optional[InputLocation] = None
    head_bias: bool = True
    coupled: Tuple[str, ...] = ()
    # Re-forward scoring: modules kept in train mode (the rest is in eval mode) and the buffers
    # saved before and restored after the scoring forward (their running statistics).
    train_mode_modules: Tuple[str, ...] = ()
    protected_buffers: Tuple[str, ...] = ()
    dropout: Tuple[str, ...] = ()
    scoring: str = ""
    requested_mode: str = "auto"  # the config's mode (``mode`` is the decided one)


# ------------------------------------------------------------------------------------ analysis
def batch_coupled_layers(model: nn.Module, captured: GraphCapture) -> Dict[str, str]:
    """Module path → construct for every layer that couples the rows of a batch (BatchNorm).

    Found both by module type (any ``_BatchNorm``, incl. SyncBatchNorm) and on the graph (a
    training-mode batch-norm op, e.g. ``F.batch_norm`` inside a custom module).
    """
    coupled: Dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            coupled[path or "<root>"] = type(module).__name__
    for node in captured.exported.graph.nodes:
        if node.op == "call_function" and node.target in _BATCH_NORM_OPS and _is_training_batch_norm(node):
            coupled.setdefault(_scope(node) or "<root>", f"{node.target.name()} in the graph")
    return coupled


@dataclasses.dataclass(frozen=True)
class ScoringLayers:
    """The layers whose training and eval forwards differ, as the re-forward scoring pass treats them.

    ``train_mode``: module path → construct of the normalisation layers kept in train mode while
    scoring (batch or instance statistics instead of running statistics); ``buffers``: the FQNs of
    the buffers they update in train mode (saved before, restored after the scoring forward);
    ``dropout``: the dropout modules, switched off while scoring.
    """

    train_mode: Dict[str, str]
    buffers: Tuple[str, ...]
    dropout: Tuple[str, ...]


def scoring_layers(model: nn.Module, captured: GraphCapture, coupled: Dict[str, str]) -> ScoringLayers:
    """Every layer whose forward depends on ``module.training`` and how the scoring pass runs it.

    * ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants): train mode — normalised by
      the statistics of the scored batch, as in the training forward; running stats protected.
    * ``_InstanceNorm`` with ``track_running_stats=True``: train mode (instance statistics), same.
    * a training-mode batch-norm op found on the graph in a custom module: that module (only its
      own flag) in train mode, and every buffer the captured training forward mutates under it
      protected.
    * ``_DropoutNd`` (Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout): off, so a
      row's score is not a random draw.  Functional dropout inside a custom module follows that
      module's flag (eval: off).
    Every other module runs in eval mode (e.g. decorrelation matrices do not update).
    """
    train_mode: Dict[str, str] = {}
    buffers: List[str] = []
    dropout: List[str] = []
    prefix = lambda path: f"{path}." if path else ""
    for path, module in model.named_modules():
        norm = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats)
        if norm:
            train_mode[path] = type(module).__name__
            buffers += [prefix(path) + name for name, value in module.named_buffers(recurse=False) if value is not None]
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            dropout.append(path or "<root>")
    signature = captured.exported.graph_signature
    mutated = list(signature.buffers_to_mutate.values())
    read = _graph_norm_buffers(captured)
    for path, construct in coupled.items():
        scope = "" if path == "<root>" else path
        if scope in train_mode:
            continue
        train_mode[scope] = construct
        buffers += read.get(scope, []) + [fqn for fqn in mutated if not scope or fqn.startswith(scope + ".")]
    return ScoringLayers(train_mode, tuple(dict.fromkeys(buffers)), tuple(dropout))


def _graph_norm_buffers(captured: GraphCapture) -> Dict[str, List[str]]:
    """Scope → FQNs of the buffers passed as running mean/var to the training batch-norm ops there
    (argument 3 and 4 of every batch-norm op overload; the training IR updates them in place)."""
    to_buffer = captured.exported.graph_signature.inputs_to_buffers
    found: Dict[str, List[str]] = {}
    for node in captured.exported.graph.nodes:
        if node.op == "call_function" and node.target in _BATCH_NORM_OPS and _is_training_batch_norm(node):
            for arg in node.args[3:5]:
                if isinstance(arg, torch.fx.Node) and arg.name in to_buffer:
                    found.setdefault(_scope(node), []).append(to_buffer[arg.name])
    return found


def _listed(paths: Sequence[str], limit: int = 4) -> str:
    names = [f"'{path or '<root>'}'" for path in paths]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def scoring_description(mode: str, layers: ScoringLayers, staged: bool = False) -> str:
    """The Plan's ``details["scoring"]``: which forward the per-sample scores come from."""
    dropout = f"; dropout on ({_listed(layers.dropout)})" if layers.dropout else ""
    if staged:
        norms = (f"train-mode batch statistics of all B rows ({_listed(list(layers.train_mode))}), running stats "
                 "updated once by that forward as in backprop; " if layers.train_mode else "")
        return f"each greedy stage's training forward over B rows (its local per-sample loss): {norms}forward reuse{dropout}"
    if mode == FORWARD_REUSE:
        return f"the training forward itself (train mode, backpropagated on the selected rows){dropout}"
    groups: Dict[str, List[str]] = {}
    for path, construct in layers.train_mode.items():
        groups.setdefault(construct, []).append(path)
    norms = "; ".join(f"{construct} in {_listed(paths)}" for construct, paths in groups.items())
    off = f"; dropout off ({_listed(layers.dropout)})" if layers.dropout else ""
    if not norms:
        return f"eval-mode no-grad forward (no layer normalises by batch statistics){off}"
    return (f"train-mode batch statistics of all B rows ({norms}), no-grad, running stats untouched "
            f"(saved and restored){off}; every other module in eval mode")


def _is_training_batch_norm(node: torch.fx.Node) -> bool:
    name = node.target.name()
    if "legit_functional" in name or "with_update" in name:
        return True
    training_index = {"aten::_native_batch_norm_legit": 5, "aten::native_batch_norm": 5, "aten::batch_norm": 5,
                      "aten::cudnn_batch_norm": 5}.get(name)
    if training_index is None or len(node.args) <= training_index:
        return True
    return bool(node.args[training_index])


def _batch_size(captured: GraphCapture) -> int:
    names = set(captured.exported.graph_signature.user_inputs)
    for node in captured.exported.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return int(value.shape[0])
    raise ValueError("sample selection needs a tensor input with a batch dimension in example_inputs")


_SHIFTS = {aten.add.Tensor, aten.sub.Tensor}


def _state_or_constant(captured: GraphCapture, value: Any) -> bool:
    """A number, or a tensor of the model's state (parameter, buffer, lifted constant): not batch data."""
    if not isinstance(value, torch.fx.Node):
        return isinstance(value, (int, float))
    while value.op == "call_function" and value.target in _ROW_PRESERVING_OPS:  # .to(device), views
        value = value.args[0]
    signature = captured.exported.graph_signature
    state = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
             **getattr(signature, "inputs_to_lifted_tensor_constants", {})}
    return value.op == "get_attr" or (value.op == "placeholder" and value.name in state)


def find_head(captured: GraphCapture) -> Tuple[Optional[LayerCandidate], Optional[WeightUse], str]:
    """The linear layer whose output is the model output (through views, and shifts by a constant
    or a state tensor — BART adds ``final_logits_bias``: the loss's gradient at the output is the
    gradient at the head's output), or the reason there is none."""
    output = next(node for node in captured.exported.graph.nodes if node.op == "output")
    results = output.args[0]
    node = results[0] if isinstance(results, (tuple, list)) else results
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        if node.target in _ROW_PRESERVING_OPS:
            node = node.args[0]
        elif node.target in _SHIFTS and len(node.args) >= 2 and _state_or_constant(captured, node.args[1]) \
                and node.kwargs.get("alpha", 1) == 1:
            node = node.args[0]
        elif node.target is aten.add.Tensor and len(node.args) >= 2 and _state_or_constant(captured, node.args[0]):
            node = node.args[1]
        else:
            break
    if not isinstance(node, torch.fx.Node):
        return None, None, "the model output is not a tensor computed by the graph"
    for candidate in captured.layers:
        for use in candidate.uses:
            if use.node == node.name:
                if use.op not in ("linear", "matmul"):
                    return None, None, f"the output comes from a {use.op} ({candidate.layer}), not a linear layer"
                return candidate, use, ""
    where = _scope(node) or "<root>"
    if node.target in (aten.linear.default, aten.mm.default, aten.matmul.default, aten.addmm.default):
        return None, None, (f"the head ({node.target} in {where}) multiplies by a computed weight (a parametrization "
                            "such as weight_norm?), not by a parameter")
    return None, None, f"the model output is computed by {node.target} ({where}), not by a linear layer"


def _head_problem(captured: GraphCapture, candidate: Optional[LayerCandidate], use: Optional[WeightUse]) -> str:
    """Why gradmatch cannot read (h, z) for this head ('' when it can)."""
    if candidate is None:
        return ""
    if len(candidate.uses) > 1:
        return f"the head weight {candidate.param_fqn} is used {len(candidate.uses)} times"
    if len(use.input_shape) < 2:
        return f"the head input has shape {use.input_shape}; the last-layer proxy needs (batch, [positions,] features)"
    if use.input_location is None:
        return f"the head input is not observable: {use.input_unobservable}"
    return ""


def _has_bias(captured: GraphCapture, use: WeightUse) -> bool:
    node = next(n for n in captured.exported.graph.nodes if n.name == use.node)
    return use.op == "linear" and len(node.args) > 2 and node.args[2] is not None


# ------------------------------------------------------------------------------------ runtime
class _FeatureTap:
    """Forward hook on the head's module: keeps a reference to the head's input for the step.

    A plain attribute write, which Dynamo traces as a side effect inside the compiled step (no
    graph break); the step clears it right after reading, so no batch outlives its step.
    """

    def __init__(self, location: InputLocation) -> None:
        self.location = location
        self.value: Optional[torch.Tensor] = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        location = self.location
        self.value = kwargs[location.name] if location.name in kwargs else args[location.index]

    def take(self) -> Optional[torch.Tensor]:
        value, self.value = self.value, None
        return value


class SelectionStep:
    """``step(inputs, targets) -> loss``: one optimizer step on the selected, weighted rows.

    Returns the detached full-batch mean of the per-sample losses of a **training-mode** forward
    of the batch before the update (the step's own forward in forward-reuse mode, the scoring
    forward in re-forward mode: batch statistics, running stats untouched, dropout off), i.e. the
    loss plain backprop returns for that batch.  ``last_subset_loss`` is the weighted loss of the
    selected rows that was backpropagated (in re-forward mode: of their own train forward, with
    the k rows' batch statistics); ``last_selection`` holds the last ``(index, weights)``.  All are
    device tensors (no host sync).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: Any, options: StepOptions,
                 selector: SampleSelector) -> None:
        self.base = _unwrap(model)
        self.model = self.base if options.compile else model
        # Compiled functions run the module behind a DDP wrapper, not the wrapper's forward, so
        # DDP would not all-reduce their gradients: the step does what DDP does itself.
        self._ddp = DataParallelSync.of(model) if options.compile else None
        self.optimizer = optimizer
        self.options = options
        self.grad_norm: Optional[torch.Tensor] = None  # before clipping (train_step(max_grad_norm=...))
        self.selector = selector
        self.spec: SelectionSpec = selector.spec
        self.per_sample_loss = per_sample_loss_fn(loss_fn)
        self.tap: Optional[_FeatureTap] = selector.__dict__.get("_feature_tap")
        self.step_index = 0
        self._training_batch = training_batch(self.base)
        self.last_selection: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.last_subset_loss: Optional[torch.Tensor] = None
        self.reported_loss: Optional[torch.Tensor] = None
        # Re-forward scoring: the modules kept in train mode, the (module, buffer name) pairs whose
        # values the scoring forward must leave as they were (looked up by name at every call, so
        # model.to(...) and load_state_dict keep working).
        self._train_mode_modules = [self.base.get_submodule(path) for path in self.spec.train_mode_modules]
        self._protected = []
        for fqn in self.spec.protected_buffers:
            owner, _, name = fqn.rpartition(".")
            self._protected.append((self.base.get_submodule(owner), name))
        compile_fn = (lambda fn: compile_for(self.base, fn, backend=options.backend, dynamic=False)) if options.compile \
            else (lambda fn: fn)
        if self.spec.mode == FORWARD_REUSE:
            self._forward_select = compile_fn(self._forward_select_eager)
        else:
            self._score = compile_fn(self._score_eager)
            self._train_rows = compile_fn(self._train_rows_eager)

    # The compiled functions --------------------------------------------------------------
    def _select(self, outputs: Any, losses: torch.Tensor, targets: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.tap.take() if self.tap is not None else None
        errors = output_errors(self.per_sample_loss, outputs, targets) if features is not None else None
        return self.selector.select(losses, features=features, errors=errors)

    # The batch arrives as (args, kwargs): a tensor, tuple or dict batch (model(**batch)) alike.
    def _forward_select_eager(self, args: tuple, kwargs: dict, targets: Any):
        outputs = self.model(*args, **kwargs)
        losses = self.per_sample_loss(outputs, targets)
        index, weights = self._select(outputs, losses, targets)
        batch, k = losses.shape[0], index.shape[0]
        if k == batch and not self.selector.probabilistic:
            loss = losses.mean()  # keep=1: exactly the full-batch mean
        elif k == batch:
            loss = (losses * weights.to(losses.dtype)).sum()  # 0/1 mask over all rows: nothing to skip
        else:
            loss = (select_rows(losses, index) * weights.to(losses.dtype)).sum()
        return loss, losses.detach().mean(), index, weights

    def _score_eager(self, args: tuple, kwargs: dict, targets: Any):
        with torch.no_grad():
            saved = [getattr(module, name).clone() for module, name in self._protected]
            outputs = self.model(*args, **kwargs)
            for (module, name), value in zip(self._protected, saved):
                getattr(module, name).copy_(value)  # the train-mode norms updated them: undo exactly
            losses = self.per_sample_loss(outputs, targets)
            index, weights = self._select(outputs, losses, targets)
        return losses.mean(), index, weights

    def _train_rows_eager(self, args: tuple, kwargs: dict, targets: Any, index: torch.Tensor, weights: torch.Tensor):
        batch = targets.shape[0] if isinstance(targets, torch.Tensor) else None

        def rows(value: Any) -> Any:
            # Every tensor with a batch axis is cut to the selected rows (ids, masks, pixel values,
            # per-sample targets; a sequence-first (T, B, C) input along axis 1); anything else (a
            # shared mask, a scalar) is kept whole.
            axis = _batch_axis(value, batch)
            return value if axis is None else value.index_select(axis, index)

        outputs = self.model(*(rows(x) for x in args), **{key: rows(value) for key, value in kwargs.items()})
        if self.tap is not None:
            self.tap.take()
        _check_rows(outputs, index.shape[0], batch)
        losses = self.per_sample_loss(outputs, rows(targets))
        if index.shape[0] == batch and not self.selector.probabilistic:
            return losses.mean()  # every row, in order: exactly the full-batch step
        return (losses * weights.to(losses.dtype)).sum()

    # The step ------------------------------------------------------------------------------
    @training_step
    def __call__(self, inputs: Any, targets: Any) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        if self._ddp is not None:
            self._ddp.before_forward()
        loss = self.training_loss(inputs, targets)
        self.options.backward(loss)
        if self._ddp is not None:
            self._ddp.after_backward()
        norms = self.options.optimizer_step(self.optimizer, lambda: [list(self.base.parameters())])
        self.grad_norm = norms[0] if norms else None
        return self.reported_loss

    def training_loss(self, inputs: Any, targets: Any) -> torch.Tensor:
        """The weighted loss of this batch's selected rows (what the step backpropagates); the
        selection is recorded, ``reported_loss`` is the full-batch mean (``effcompile.training_loss``)."""
        batch = model_inputs(self._training_batch(inputs))
        args, kwargs = batch.args, batch.kwargs
        if self.spec.mode == FORWARD_REUSE:
            loss, batch_loss, index, weights = self._forward_select(args, kwargs, targets)
        else:
            batch_loss, index, weights = self._scoring_pass(batch, targets)
            loss = self._train_rows(args, kwargs, targets, index, weights)
        if self.options.check_finite:
            check_finite_loss(loss, self.step_index)
        self.selector.record(index, weights)
        self.last_selection = (index, weights)
        self.last_subset_loss = loss.detach()
        self.reported_loss = batch_loss.detach()
        self.step_index += 1
        return loss

    def _scoring_pass(self, inputs: Any, targets: Any):
        """Training-mode normalisation, nothing else: the layers of ``spec.train_mode_modules``
        (BatchNorm & co.) keep the flag they have in the training forward (train mode: normalised
        by the statistics of this batch; a BN the user froze in eval mode stays frozen), and their
        running stats are restored afterwards; every other module is in eval mode
        (dropout off, no decorrelation update).  The flags are the same at every call, so a
        compiled scoring function never recompiles."""
        modes = [(module, module.training) for module in self.base.modules()]
        norm_modes = [module.training for module in self._train_mode_modules]
        self.base.train(False)
        for module, training in zip(self._train_mode_modules, norm_modes):
            module.training = training  # as in the training forward (a frozen, eval-mode BN stays frozen)
        try:
            batch = model_inputs(inputs)
            return self._score(batch.args, batch.kwargs, targets)
        finally:
            for module, training in modes:
                module.training = training


def _batch_axis(value: Any, batch: Optional[int]) -> Optional[int]:
    """The axis of ``value`` that holds the batch: the first when its size is the batch (the
    convention), else the only axis of that size; None for a non-tensor or a tensor without one."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    if batch is None or value.shape[0] == batch:
        return 0
    axes = [axis for axis, size in enumerate(value.shape) if size == batch]
    return axes[0] if len(axes) == 1 else None


def _check_rows(outputs: Any, selected: int, batch: Optional[int]) -> None:
    """The re-forward of the selected rows must give one output row per selected sample; a model
    whose inputs hold the batch on an axis the cut could not find would give something else."""
    first = next(iter(tensor_leaves(outputs)), None)
    if first is not None and first.dim() >= 1 and first.shape[0] != selected:
        raise ValueError(
            f"sample_selection(mode='reforward'): the forward of the {selected} selected rows (of {batch}) returned "
            f"{tuple(first.shape)}, not one row per selected sample: the batch axis of the inputs was not found (a "
            "sequence-first input whose time axis has the batch's size?).  Pass batch-first inputs or use "
            "mode='forward_reuse'")


# ------------------------------------------------------------------------------------ the pass
class SampleSelectionPass(ModelPass):
    config_type = SampleSelection
    step_order = 20
    # Selection adds no parameter-shaped state: under FSDP2 each rank selects from its own batch
    # (its loss history global over the ranks, see selectors.py) and FSDP reduces the selected
    # rows' gradients (tested on gloo).
    sharded_parameters_unsupported = ""
    compiled_cost = True  # predict_change knows the compiled step (cost.py)

    def plan(self, model: nn.Module, captured: GraphCapture, config: SampleSelection) -> List[PlanRow]:
        batch = _batch_size(captured)
        k = batch if config.probabilistic else num_selected(config.keep, batch)
        coupled = batch_coupled_layers(model, captured)
        staged = _greedy_stages_applied(model)
        mode, mode_reason = self._decide_mode(config, coupled, staged)
        layers = scoring_layers(model, captured, coupled)
        head, head_use, no_head = find_head(captured)
        problem = _head_problem(captured, head, head_use) if head is not None else no_head
        if config.strategy == "gradmatch" and problem:
            raise ValueError(f"sample_selection: strategy='gradmatch' cannot run on {type(model).__name__}: {problem}. "
                             "It needs a final linear layer (the model output, possibly reshaped) whose input is "
                             "the penultimate activation (batch, [positions,] features); use strategy='loss' or 'random'.")
        spec = SelectionSpec(
            mode=mode, batch_size=batch, k=k,
            head_scope=head_use.scope if config.strategy == "gradmatch" else None,
            head_input=head_use.input_location if config.strategy == "gradmatch" else None,
            head_bias=_has_bias(captured, head_use) if head_use is not None else True,
            coupled=tuple(coupled),
            train_mode_modules=tuple(layers.train_mode) if mode == REFORWARD else (),
            protected_buffers=layers.buffers if mode == REFORWARD else (),
            dropout=layers.dropout,
            scoring=scoring_description(mode, layers, staged),
            requested_mode=config.mode,
        )
        common = {"mode": mode, "strategy": config.strategy, "keep": config.keep,
                  "k": f"~{batch / (config.beta + 1):.0f}/{batch}" if config.probabilistic else f"{k}/{batch}",
                  "scoring": spec.scoring, "returned_loss": _returned_loss(mode, staged)}
        reason = mode_reason
        if config.probabilistic:
            reason = "; ".join(filter(None, [reason, "probabilistic Selective Backprop selects a random number of rows: "
                                             "the backward runs over the full batch with a 0/1 weight mask (no saving)"]))
        rows = []
        for candidate in captured.layers:
            first = candidate.uses[0]
            row = PlanRow(layer=candidate.layer, pass_name=self.name, action=Action.REWRITE, op=first.op,
                          input_shape=first.input_shape, weight_shape=candidate.weight_shape,
                          details=dict(common), reason=reason, spec=spec)
            if head is not None and candidate is head:
                row.details["head"] = "gradmatch features = its input" if config.strategy == "gradmatch" else "yes"
            rows.append(row)
        listed = {row.layer for row in rows}
        for path, construct in coupled.items():
            if path not in listed:
                how = ("batch statistics of all B rows in each stage's forward" if staged else
                       "scored in train mode (batch statistics), running stats restored")
                rows.append(PlanRow(layer=path, pass_name=self.name, action=Action.REWRITE, op=construct, details=dict(common),
                                    reason=f"{construct}: batch statistics couple the rows; {how}", spec=spec))
        if not rows:
            rows.append(PlanRow(layer="<root>", pass_name=self.name, action=Action.REWRITE, details=dict(common), reason=reason,
                                spec=spec))
        return rows

    def predict_change(self, model: nn.Module, rows: List[PlanRow], config: SampleSelection,
                       step: StepWork) -> Optional[Work]:
        """The step's change (cost.py): re-forward trains k rows, forward reuse saves only compiled."""
        spec = next((row.spec for row in rows if isinstance(row.spec, SelectionSpec)), None)
        if spec is None:
            return None
        head = next((row.weight_shape for row in rows if "head" in row.details), None)
        return selection_change(step, spec.mode, spec.batch_size, spec.k, config.strategy, config.probabilistic, head)

    @staticmethod
    def _decide_mode(config: SampleSelection, coupled: Dict[str, str], staged: bool = False) -> Tuple[str, str]:
        listed = ", ".join(f"{path} ({construct})" for path, construct in list(coupled.items())[:4])
        more = f" and {len(coupled) - 4} more" if len(coupled) > 4 else ""
        if staged:
            if config.mode == REFORWARD:
                raise ValueError(_STAGED_REFORWARD)
            return FORWARD_REUSE, _staged_reason(coupled)
        if config.mode == FORWARD_REUSE and coupled:
            raise ValueError(f"sample_selection: mode='forward_reuse' is not exact with batch-coupled layers {listed}{more}: "
                             "their batch statistics mix the rows, so the subset's gradient would differ from a subset "
                             "step. Use mode='auto' or 'reforward'.")
        if config.mode == REFORWARD:
            return REFORWARD, "re-forward requested"
        if coupled:
            return REFORWARD, (f"batch-coupled layers ({listed}{more}) make forward reuse inexact; re-forward: the rows "
                               "are scored by a no-grad forward with train-mode batch statistics (running stats "
                               "untouched), then the k selected rows are forwarded and backpropagated in train mode")
        return FORWARD_REUSE, ""

    def refusals(self, model: nn.Module, configs: Sequence[Any]) -> List[PlanRow]:
        """mode='reforward' with greedy stages: the staged step scores each stage by its own forward."""
        selector = selector_of(model)
        applied = getattr(selector, "spec", None) if selector is not None else None
        forced = [c.mode for c in configs if c.name == self.name] + ([applied.requested_mode] if applied else [])
        stages = any(c.name == "greedy_stages" for c in configs) or _greedy_stages_applied(model)
        if stages and REFORWARD in forced:
            return [PlanRow(layer="<root>", pass_name=self.name, action=Action.REFUSE, reason=_STAGED_REFORWARD)]
        return []

    def apply(self, model: nn.Module, rows: List[PlanRow], config: SampleSelection) -> int:
        spec: SelectionSpec = rows[0].spec
        device = next((t.device for t in list(model.parameters()) + list(model.buffers())), torch.device("cpu"))
        selector = SampleSelector(config.keep, config.strategy, fixed_k=config.fixed_k, beta=config.beta,
                                  history_size=config.history_size, gradmatch_ridge=config.gradmatch_ridge,
                                  nnls_iterations=config.nnls_iterations, head_bias=spec.head_bias,
                                  sync_history=config.sync_history, device=device,
                                  # one selected row of a 1x1 map gives BatchNorm one value per channel,
                                  # which it refuses in train mode (a small last batch)
                                  min_rows=2 if spec.coupled else 1)
        selector.spec = spec
        attach(model, SELECTOR_NAME, selector)
        if spec.head_scope is not None:
            tap = _FeatureTap(spec.head_input)
            selector.__dict__["_feature_tap"] = tap
            handle = model.get_submodule(spec.head_scope).register_forward_hook(tap, with_kwargs=True)
            model.__dict__.setdefault("_effcompile_hooks", {}).setdefault(self.name, []).append(handle)
        return len(rows)

    def is_applied(self, model: nn.Module) -> bool:
        return selector_of(model) is not None

    def fold(self, model: nn.Module) -> int:
        removed = 0
        for module in list(model.modules()):
            for name, child in list(module._modules.items()):
                if isinstance(child, SampleSelector):
                    detach(module, name)
                    removed += 1
        for handle in model.__dict__.get("_effcompile_hooks", {}).pop(self.name, []):
            handle.remove()
        return removed

    def live_details(self, model: nn.Module, row: PlanRow) -> Dict[str, object]:
        selector, first = selector_of(model), _first_row(model, self.name)
        live: Dict[str, object] = {}
        spec = row.spec if isinstance(row.spec, SelectionSpec) else None
        if spec is not None and _greedy_stages_applied(model) and "greedy" not in row.details.get("scoring", ""):
            # Greedy stages were applied after this pass planned (later in the same transform, or a
            # later transform): the staged step owns the step and reuses each stage's forward.
            live.update(mode=FORWARD_REUSE, scoring=_STAGED_SCORING, returned_loss=_returned_loss(FORWARD_REUSE, True),
                        composed=f"greedy_stages was applied after this pass planned mode={row.details.get('mode')!r}, "
                                 f"which does not run: {_staged_reason({})}")
        if selector is None or first is None or row.layer != first.layer:
            return live  # the counters belong to the whole model: shown once, on the first row
        return {**live, **selector.summary()}

    def make_train_step(self, model: nn.Module, loss_fn: Callable, optimizer: Any,
                        options: StepOptions) -> Optional[Callable]:
        selector = selector_of(model)
        if selector is None:
            return None
        return SelectionStep(model, loss_fn, optimizer, options, selector)

    def make_training_loss(self, model: nn.Module, loss_fn: Callable, options: StepOptions) -> Optional[Callable]:
        selector = selector_of(model)
        if selector is None:
            return None
        return SelectionStep(model, loss_fn, None, options, selector).training_loss


_STAGED_REFORWARD = ("sample_selection(mode='reforward') cannot compose with greedy_stages: the staged step scores "
                     "and selects each stage's rows on that stage's own training forward (forward reuse); use "
                     "mode='auto' or 'forward_reuse'")
_STAGED_SCORING = ("each greedy stage's training forward over B rows (its local per-sample loss): train-mode batch "
                   "statistics, running stats updated once by that forward as in backprop; forward reuse")


def _greedy_stages_applied(model: nn.Module) -> bool:
    from effcompile.passes.base import PASSES

    stages = PASSES.get("greedy_stages")
    return stages is not None and stages.is_applied(model)


def _staged_reason(coupled: Dict[str, str]) -> str:
    norms = (f"; BatchNorm there ({_listed(list(coupled))}) normalises by all B rows, so a stage's gradient is the "
             "selected rows' loss through full-batch statistics, not a k-row step" if coupled else "")
    return ("greedy stages own the step: each stage scores its rows by its local per-sample loss in its training "
            f"forward and backpropagates the selected rows of that forward (forward reuse, no re-forward){norms}")


def _returned_loss(mode: str, staged: bool) -> str:
    if staged:
        return "the greedy step's loss (the last stage's selected weighted loss)"
    if mode == FORWARD_REUSE:
        return "full-batch mean per-sample loss of the training forward"
    return "full-batch mean per-sample loss of the train-mode scoring forward (= plain backprop's loss on the batch)"


def _first_row(model: nn.Module, pass_name: str) -> Optional[PlanRow]:
    from effcompile.api import plan_of

    plan = plan_of(model)
    rows = plan.for_pass(pass_name).rows if plan is not None else []
    return rows[0] if rows else None


register_pass(SampleSelectionPass())
