"""Cost model of sample selection: the eager step against plain backprop, from the captured graph.

With the plain step's forward F, backward B and optimizer O (``effcompile.cost.StepWork``) and
``f = k/B`` the selected fraction:

* ``reforward``: a no-grad scoring forward over the batch, then forward and backward of the k
  selected rows — the change is ``f·F − (1 − f)·B`` in multiply-adds and bytes, but a forward of
  k rows dispatches as many ops as one of B rows, so F's ops are added whole and B's ops stay;
* ``forward_reuse``: one forward over the batch and a backward over it that only the
  ``effcompile`` backend's row-sparse joint pass shrinks to the k rows.  Eagerly the backward is
  full-size, so the change is the selection's own work; compiled it is ``−(1 − f)·B`` on top
  (``passes/sample_selection/README.md`` measures both);
* the probabilistic variant backpropagates the full batch with a 0/1 mask: no saving;
* every mode adds the selection itself (``SELECT_OPS``: per-sample losses, the ranking, weights,
  the loss history) and ``gradmatch`` its B×B Gram kernel of last-layer gradients,
  ``B²·(C + H)`` multiply-adds for a head of C classes over H features, and its k OMP
  iterations (``OMP_OPS`` each).
"""

from __future__ import annotations

from typing import Optional, Sequence

from effcompile.cost import StepWork, Work

__all__ = ["SELECT_OPS", "OMP_OPS", "COMPILED_SELECT_OPS", "selection_change"]

# The selection's eager fixed cost, in ops: per-sample losses, scores, the top-k or draw, weights,
# gathers, the loss history — and the Python of the step around them.  Measured as 0.52-0.58 ms
# per step on the 512- and 1024-wide MLPs (forward reuse, whose backward is full-size eagerly; 2-core
# Intel Xeon, torch 2.13, `python -m benchmarks cost_model`, 2026-12-05) = 150 ops of ~3.5 µs.
SELECT_OPS = 150
OMP_OPS = 8      # one OMP iteration: a residual correlation, an argmax, a small solve, bookkeeping
# Compiled (Inductor, `effcompile.train_step(compile=True)`): the per-sample losses, the ranking and
# the weights fuse into the step's graph; what stays is the step's Python and the selector's state
# around them.  Measured on a 16-wide MLP at batch 32, where the rows saved are negligible (medians
# of 300 steps, one thread, Xeon, 2026-12-06): forward reuse added 0.28 ms (loss) and 0.16 ms
# (random) compiled, against 0.62 / 0.46 ms eager.
COMPILED_SELECT_OPS = 80


def selection_change(step: StepWork, mode: str, batch: int, k: int, strategy: str, probabilistic: bool,
                     head_shape: Optional[Sequence[int]] = None) -> Work:
    """How selecting ``k`` of ``batch`` rows changes one step's work (negative: it saves), eager or
    compiled (``step.compiled``: forward reuse's whole backward on the k rows, as the row-sparse
    joint pass runs it where no op couples the rows; it warns where it stops)."""
    change = Work(ops=COMPILED_SELECT_OPS if step.compiled else SELECT_OPS)
    if strategy == "gradmatch":
        classes, features = (head_shape[0], head_shape[-1]) if head_shape else (0, 0)
        change += Work(macs=batch * batch * (classes + features) + k * batch * batch, ops=OMP_OPS * k)
    if probabilistic or batch <= 0:
        return change
    f = k / batch
    if mode == "reforward":
        rows_forward, rows_backward = _scaling(step.forward), _scaling(step.backward)
        change += f * rows_forward + Work(ops=step.forward.ops) - (1.0 - f) * rows_backward
    elif step.compiled:  # forward reuse: the row-sparse joint pass runs the backward on the k rows
        change -= (1.0 - f) * _scaling(step.backward)
    return change


def _scaling(work: Work) -> Work:
    """The part of ``work`` that scales with the number of rows (the ops do not)."""
    return Work(macs=work.macs, bytes=work.bytes)
