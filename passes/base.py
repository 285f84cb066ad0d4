"""The one pass interface, and the registry every entry point reads.

A technique has up to two kinds of pass:

* a :class:`ModelPass` (exactly one per technique) decides and rewrites at model level, in two
  phases, so analysis and rewriting stay separate and every entry point reads the same decisions:

  1. ``plan(model, captured, config) -> list[PlanRow]`` decides, per layer, what to do and why
     (``Action.SKIP`` with a reason for layers it cannot handle).  It does not touch the model.
  2. ``apply(model, rows, config) -> int`` performs the applied rows' rewrites and returns how many
     places it rewrote (for logs and tests).

  Passes that add state (decorrelation matrices, aux heads) rewrite at model level, before any
  tracing, because a torch.compile backend receives parameters as graph inputs and cannot add
  state.

* a :class:`JointPass` (optional) rewrites the AOT joint graph (forward + backward) inside the
  ``effcompile`` backends: stateless backward rewrites.  It returns a :class:`JointResult` (how
  many places it rewrote, and one record per rewrite) and declares the source files that shape
  its rewrite, so the compile cache key (``uuid()``) covers them.

Registration is the only wiring: ``register_pass`` and ``register_joint_pass`` (with an order),
``effcompile.config.register_config`` for the config.  The core (transform, train_step, the
backends, ONNX inspection, the CLI) iterates the registry and never names a technique.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

from effcompile.config import PassConfig
from effcompile.cost import StepWork, Work
from effcompile.plan import PlanRow

from .analysis.capture import GraphCapture

__all__ = ["ModelPass", "PassState", "JointPass", "JointResult", "RecordsJointPass", "PASSES", "JOINT_PASSES", "StepOptions", "register_pass",
           "register_joint_pass", "step_owners"]


class PassState(nn.Module):
    """Runtime state a pass attaches to the user's model (R matrices, loss histories, statistics).

    Its buffers keep the dtypes the pass built them with when the model is cast after
    ``transform`` (``model.to(torch.bfloat16)``, ``.half()``, ``.double()``): the pass computes
    its statistics at that precision and casts what the forward needs itself, so a cast buffer
    would only lose precision or meet operands of another dtype.  Device moves still apply.
    """

    def register_buffer(self, name: str, tensor: Optional[torch.Tensor], persistent: bool = True) -> None:
        # AOTAutograd (torch 2.11-2.13) drops in-place updates of a 0-dim float64 buffer: a compiled
        # step would leave it unchanged without an error (rows_selected stayed 0 under compile).
        if tensor is not None and tensor.dim() == 0 and tensor.dtype == torch.float64:
            raise TypeError(f"{type(self).__name__}.{name}: a 0-dim float64 buffer loses its in-place updates "
                            "under torch.compile; use shape (1,), another dtype, or an integer count")
        super().register_buffer(name, tensor, persistent)

    def _apply(self, fn, *args, **kwargs):
        dtypes = {name: buffer.dtype for name, buffer in self._buffers.items() if buffer is not None}
        moved = super()._apply(fn, *args, **kwargs)
        for name, dtype in dtypes.items():
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype != dtype:
                with torch.no_grad():
                    self._buffers[name] = buffer.to(dtype).requires_grad_(buffer.requires_grad)
        return moved


class ModelPass(abc.ABC):
    """A model-level rewrite driven by a config and recorded in the Plan."""

    config_type: Type[PassConfig]

    # Passes that change the shape of the training step itself (one loss and optimizer per stage;
    # a per-sample loss over a weighted subset) set an order here; ``effcompile.train_step`` asks
    # the applied passes in ascending order and uses the first step returned.  The outermost
    # owner (lowest order) composes the inner ones itself.
    step_order: Optional[int] = None

    # Name suffixes of the submodules the pass inserts (e.g. ``"_decorrelation"`` for
    # ``fc.weight_decorrelation``): ONNX inspection attributes nodes in those name scopes to it.
    onnx_scope_suffixes: Tuple[str, ...] = ()

    # FSDP2 (``fully_shard`` after ``transform``: parameters become DTensors).  "" where the pass is
    # tested to train a sharded model; otherwise why it cannot, which ``train_step`` raises instead
    # of failing inside torch with a mixed Tensor/DTensor error.
    sharded_parameters_unsupported: str = ("not made to work with FSDP2-sharded parameters (DTensor) yet; "
                                           "use DistributedDataParallel, or apply the pass before sharding and "
                                           "train without fully_shard")

    # Whether ``predict_change`` knows the compiled form of the pass's own work (a ``step`` with
    # ``step.compiled``): then the Plan also shows ``predicted_step_compiled``.
    compiled_cost: bool = False

    @property
    def name(self) -> str:
        return self.config_type.name

    @abc.abstractmethod
    def plan(self, model: nn.Module, captured: GraphCapture, config: PassConfig) -> List[PlanRow]:
        """Decide what to do with each layer; must not modify ``model``."""

    @abc.abstractmethod
    def apply(self, model: nn.Module, rows: List[PlanRow], config: PassConfig) -> int:
        """Rewrite the layers of the applied ``rows``; return the number of rewritten layers."""

    @abc.abstractmethod
    def is_applied(self, model: nn.Module) -> bool:
        """Whether ``model`` already carries this pass."""

    @abc.abstractmethod
    def fold(self, model: nn.Module) -> int:
        """Bake the pass into plain weights and remove its state; return the layers folded."""

    def refusals(self, model: nn.Module, configs: Sequence[PassConfig]) -> List[PlanRow]:
        """``Action.REFUSE`` rows for combinations this pass cannot work with.

        Asked of every pass that is in ``configs`` or already applied to ``model``, before any
        pass of the transform plans or rewrites, so a refusal leaves the model untouched.
        """
        return []

    def replan(self, model: nn.Module, rows: List[PlanRow], config: PassConfig,
               example_inputs: Sequence[Any]) -> List[PlanRow]:
        """``rows`` of a Plan decided in another process, made applicable to this process's copy of
        the model: the analysis results (``spec``) are rebuilt from the recorded decisions, and
        nothing is re-decided.  Passes whose Plan is never shipped between processes keep the default.
        """
        raise NotImplementedError(f"{self.name}: applying a Plan decided in another process is not supported")

    def predict_change(self, model: nn.Module, rows: List[PlanRow], config: PassConfig,
                       step: StepWork) -> Optional[Work]:
        """The cost model: how the applied ``rows`` change the work of one eager training step of
        the plain model ``step`` (positive: the pass's own work; negative: work it saves), in
        ``effcompile.cost`` units.  ``transform`` shows ``step.ratio(change)`` on the pass's rows as
        ``predicted_step``; None: the pass has no cost model.  Passes with ``compiled_cost`` are
        also asked for a compiled ``step`` (``step.compiled``: their work as Inductor compiles it),
        shown as ``predicted_step_compiled``."""
        return None

    def live_details(self, model: nn.Module, row: PlanRow) -> Dict[str, object]:
        """Run-time counters to show next to a Plan row (read on demand, never per step)."""
        return {}

    def make_train_step(self, model: nn.Module, loss_fn: Callable, optimizer: Any,
                        options: StepOptions) -> Optional[Callable]:
        """The training step of a step owner (``step_order`` set); None leaves the plain step."""
        return None

    def make_training_loss(self, model: nn.Module, loss_fn: Callable, options: StepOptions) -> Optional[Callable]:
        """A step owner's ``objective(inputs, targets) -> loss`` for a trainer that owns backward and
        the optimizer: ``loss.backward()`` gives the gradients this pass's step would apply
        (``effcompile.training_loss``); None leaves the plain loss."""
        return None

    def inspect_views(self, model: nn.Module, example_inputs: Sequence[Any]) -> List[Tuple[str, List[str]]]:
        """Extra ``effcompile inspect`` sections: ``[(title, lines)]`` (e.g. the backward rewrites)."""
        return []


@dataclasses.dataclass
class JointResult:
    """What one joint pass did to one joint graph."""

    rewrites: int
    records: List[Any] = dataclasses.field(default_factory=list)


class JointPass(abc.ABC):
    """A rewrite of the AOT joint graph, run by the ``effcompile`` backends in ``order``."""

    name: str = ""
    order: int = 0

    @abc.abstractmethod
    def __call__(self, graph: torch.fx.Graph) -> JointResult:
        """Rewrite ``graph`` in place (idempotently); return what was rewritten."""

    @abc.abstractmethod
    def sources(self) -> List[str]:
        """Paths of every file that shapes the rewrite (hashed into the compile cache key)."""


class RecordsJointPass(JointPass):
    """A joint pass made of a rewrite function that returns one record per rewritten place."""

    def __init__(self, name: str, order: int, rewrite: Callable[[torch.fx.Graph], List[Any]],
                 sources: Sequence[str]) -> None:
        self.name, self.order, self._rewrite, self._sources = name, order, rewrite, list(sources)

    def __call__(self, graph: torch.fx.Graph) -> JointResult:
        records = self._rewrite(graph)
        return JointResult(len(records), records)

    def sources(self) -> List[str]:
        return list(self._sources)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How ``effcompile.train_step`` was asked to build the step (shared by every step owner)."""

    compile: bool = False
    backend: Any = "effcompile"
    check_finite: bool = False
    max_grad_norm: Optional[float] = None  # clip the gradients' total norm before the optimizer step
    grad_scaler: Any = None  # a torch.amp.GradScaler: scaled backward, unscale → clip → scaler.step → update

    def backward(self, losses: Any) -> None:
        """Backpropagate a loss or a list of losses, scaled by the step's ``grad_scaler`` if any."""
        losses = list(losses) if isinstance(losses, (list, tuple)) else [losses]
        if self.grad_scaler is not None:
            losses = [self.grad_scaler.scale(loss) for loss in losses]
        torch.autograd.backward(losses)

    def optimizer_step(self, optimizer: Any, groups: Callable[[], List[List[Any]]]) -> Optional[List[Any]]:
        """Unscale, clip each of ``groups()`` to ``max_grad_norm``, step; the norms before clipping
        (None without ``max_grad_norm``).  With a ``grad_scaler`` a step with non-finite gradients
        is skipped and the scale lowered, as ``GradScaler.step`` does."""
        from effcompile.api import clip_gradients

        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(optimizer)
        norms = clip_gradients(groups(), self.max_grad_norm) if self.max_grad_norm is not None else None
        if self.grad_scaler is not None:
            self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        else:
            optimizer.step()
        return norms


PASSES: Dict[str, ModelPass] = {}
JOINT_PASSES: List[JointPass] = []


def register_pass(instance: ModelPass) -> ModelPass:
    if not isinstance(instance, ModelPass):
        raise TypeError(f"register_pass expects a ModelPass instance, got {instance!r}")
    PASSES[instance.name] = instance
    return instance


def register_joint_pass(instance: JointPass) -> JointPass:
    """Add a joint-graph pass; the backends run them in ascending ``order``."""
    if not isinstance(instance, JointPass) or not instance.name:
        raise TypeError(f"register_joint_pass expects a named JointPass instance, got {instance!r}")
    JOINT_PASSES[:] = sorted([p for p in JOINT_PASSES if p.name != instance.name] + [instance], key=lambda p: p.order)
    return instance


def step_owners() -> List[ModelPass]:
    """The passes that may own the training step, outermost first."""
    return sorted((p for p in PASSES.values() if p.step_order is not None), key=lambda p: p.step_order)
