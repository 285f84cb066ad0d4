"""Per-sample selection (Selective Backprop; Balles et al., arXiv 2312.05021).  See README.md beside this file.

``config`` (SampleSelection), ``rewrite`` (the model pass and the selection step), ``selectors``
(loss, gradmatch and random strategies), ``row_sparse_backward`` (the joint-graph pass that runs
the backward of the selected rows only).
"""

from .config import SampleSelection
from .rewrite import SELECTOR_NAME, SampleSelectionPass, SelectionStep, batch_coupled_layers
from .row_sparse_backward import rewrite_row_sparse_backward, select_rows
from .selectors import SampleSelector, selector_of

__all__ = ["SampleSelection", "SampleSelectionPass", "SelectionStep", "SampleSelector",
           "SELECTOR_NAME", "batch_coupled_layers", "rewrite_row_sparse_backward", "select_rows", "selector_of"]
