"""Row-sparse backward: run the backward of a selected subset of the batch as smaller GEMMs.

Sample selection in *forward-reuse* mode forwards the whole batch once and backpropagates the
weighted loss of ``k`` selected rows.  The gradient of every activation is then exactly zero
outside those rows, so the backward only needs the selected rows of the saved activations.

The loss picks its rows with ``select_rows(per_sample_loss, index)`` (an index_select whose
backward is the custom op ``effcompile::scatter_rows``), so the joint graph says where the
sparsity starts.  This module's joint pass (part of the ``effcompile`` backend) propagates it.
Joint graph before (one linear layer ``Y = X·Wᵀ``, B rows)::

    G      = effcompile::scatter_rows(g_sel, idx, B)   # B×N, zero outside idx
    G2     = threshold_backward(G, Y, 0)               # element-wise with saved Y
    grad_W = mm(t(G2), X)                              # N×B · B×K
    grad_X = mm(G2, W)                                 # B×N · N×K

after (``k = len(idx)`` rows)::

    g2     = threshold_backward(g_sel, Y[idx], 0)
    grad_W = mm(t(g2), X[idx])                         # N×k · k×K: k/B of the FLOPs
    grad_X = effcompile::scatter_rows(mm(g2, W), idx, B)

Both are exact (the dropped rows contribute exact zeros).  Propagation stops at any op it does
not know to be row-wise (e.g. a BatchNorm backward, whose batch statistics couple the rows): the
rows are scattered back there and the rest of the backward runs at full size — still exact,
only less saving.  Outside the ``effcompile`` backend ``scatter_rows`` simply scatters, so every
path computes the same gradient.
"""

from __future__ import annotations

import torch

__all__ = ["select_rows", "scatter_rows"]


@torch.library.custom_op("effcompile::scatter_rows", mutates_args=())
def scatter_rows(rows: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """A ``num_rows``-row tensor that holds ``rows[j]`` at row ``index[j]`` and zeros elsewhere."""
    full = rows.new_zeros((num_rows, *rows.shape[1:]))
    return full.index_add(0, index, rows)  # index_add: repeated indices add up, as their gradients do


@scatter_rows.register_fake
def _scatter_rows_fake(rows, index, num_rows):
    return rows.new_empty((num_rows, *rows.shape[1:]))


def _scatter_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_rows_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return grad.index_select(0, index), None, None


scatter_rows.register_autograd(_scatter_rows_backward, setup_context=_scatter_rows_setup)


class _SelectRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.num_rows = values.shape[0]
        return values.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return torch.ops.effcompile.scatter_rows(grad.contiguous(), index, ctx.num_rows), None


def select_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` along dim 0, whose backward marks the gradient as row-sparse for the joint pass."""
    if index.dtype != torch.int64 or index.dim() != 1:
        raise ValueError(f"select_rows needs a 1-D int64 index, got {index.dtype} with shape {tuple(index.shape)}")
    return _SelectRows.apply(values, index)
