"""The one settings registry of the cross-cutting tests (Composer's algorithm_settings pattern).

Each technique names its config, the zoo models it is tested on and the *effect* that proves it
ran: ``effect(model, run)`` must fail if the technique were switched off.  ``tests/test_matrix.py``
runs every setting alone and all of them composed over zoo × ladder × precision × batch schedule.
Adding a technique adds one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

import effcompile
from effcompile.api import plan_of


@dataclasses.dataclass
class Run:
    """What one matrix case did: the gradients of two steps on the same batch, the joint log, the batches."""

    model: nn.Module
    gradients: List[Dict[str, torch.Tensor]]  # per step: parameter name → gradient (None-free)
    joint_graphs: List[Dict[str, Any]]  # per compiled graph: joint pass name → JointResult
    batch_sizes: List[int]
    compiled: bool
    initial_state: Dict[str, torch.Tensor]


@dataclasses.dataclass
class TechniqueSetting:
    config: Callable[[], effcompile.PassConfig]
    models: Tuple[str, ...]
    effect: Callable[[Run], None]
    # (model → layer-pattern → reason) skips this technique is expected to record; anything else is a bug.
    expected_skips: Dict[str, Dict[str, str]] = dataclasses.field(default_factory=dict)


def _layers(run: Run, pass_name: str) -> List[str]:
    return [row.layer for row in plan_of(run.model).for_pass(pass_name).applied()]


def decorrelation_moves_r(run: Run) -> None:
    """R moves: every decorrelation matrix differs from its value before training, and was updated."""
    from effcompile.passes.decorrelation import decorrelation_states

    states = decorrelation_states(run.model)
    assert states, "no decorrelated layer"
    for key, state in states.items():
        before = run.initial_state[_state_key(run.model, state)]
        assert not torch.equal(state.matrix, before), f"R of {key} did not move"
        assert int(state.updates) > 0, key


def _state_key(model: nn.Module, state: nn.Module) -> str:
    return next(f"{name}.matrix" for name, module in model.named_modules() if module is state)


def randomized_vjp_samples(run: Run) -> None:
    """Sketched gradients differ draw to draw on the same batch, and every compiled graph was rewritten."""
    sketched = [name for name in run.gradients[0]
                if any(name.startswith(f"{layer}.") or name == layer for layer in _layers(run, "randomized_vjp"))]
    assert sketched, "no sketched layer"
    assert any(not torch.equal(run.gradients[0][n], run.gradients[1][n]) for n in sketched), "identical draws: exact"
    if run.compiled:
        assert run.joint_graphs and all(g["randomized_vjp"].rewrites > 0 for g in run.joint_graphs), \
            [g["randomized_vjp"].rewrites for g in run.joint_graphs]


def greedy_stages_detach(run: Run) -> None:
    """Local losses: every aux head got a gradient — only a stage's own local loss reaches its head,
    so with the technique off there is no head, and a head that the staged step skipped has none."""
    from effcompile.passes.greedy_stages import HEADS_ATTR

    heads = [n for n in run.gradients[0] if n.startswith(f"{HEADS_ATTR}.")]
    assert heads and all(run.gradients[0][n].abs().sum() > 0 for n in heads), "an aux head got no gradient"


def sample_selection_backprops_k_rows(run: Run) -> None:
    """The last step selected k = round(keep·B) rows of its batch; forward reuse ran the backward on them."""
    from effcompile.passes.greedy_stages import staged_model
    from effcompile.passes.sample_selection import selector_of
    from effcompile.passes.sample_selection.selectors import num_selected

    selector = selector_of(run.model)
    keep = next(row.details["keep"] for row in plan_of(run.model).for_pass("sample_selection"))
    assert selector.last_index.numel() == num_selected(keep, run.batch_sizes[-1])
    # The state advances inside compiled steps as eagerly (a lost in-place update would leave it at 0).
    # Composed with greedy stages, every stage selects from its batch: one call per stage and step.
    calls = staged_model(run.model).num_stages if plan_of(run.model).for_pass("greedy_stages").applied() else 1
    assert int(selector.steps) == calls * len(run.batch_sizes), (int(selector.steps), calls)
    assert int(selector.rows_seen) == calls * sum(run.batch_sizes), int(selector.rows_seen)
    assert int(selector.rows_selected) == calls * sum(num_selected(keep, rows) for rows in run.batch_sizes), \
        int(selector.rows_selected)
    reuse = next(row.details["mode"] for row in plan_of(run.model).for_pass("sample_selection")) == "forward_reuse"
    if run.compiled and reuse:
        assert all(g["row_sparse_backward"].rewrites > 0 for g in run.joint_graphs)


SETTINGS: Dict[str, TechniqueSetting] = {
    "decorrelation": TechniqueSetting(lambda: effcompile.Decorrelation(input_layers=True, lr=0.01), ("mlp", "cnn"), decorrelation_moves_r),
    "randomized_vjp": TechniqueSetting(lambda: effcompile.RandomizedVJP(keep=0.25, multiple=1), ("mlp", "cnn"),
                                       randomized_vjp_samples),
    "greedy_stages": TechniqueSetting(lambda: effcompile.GreedyStages(num_stages=2), ("mlp", "cnn"),
                                      greedy_stages_detach),
    "sample_selection": TechniqueSetting(lambda: effcompile.SampleSelection(keep=0.5, strategy="random"),
                                         ("mlp", "cnn"), sample_selection_backprops_k_rows),
}

# The order a composition applies them in (stages before selection: each stage selects its rows).
COMPOSED = ("decorrelation", "randomized_vjp", "greedy_stages", "sample_selection")
