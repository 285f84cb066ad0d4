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


# ------------------------------------------------------------------------------------ joint pass
import dataclasses  # noqa: E402  (kept next to the pass it serves)
import logging  # noqa: E402
import operator  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

from effcompile.passes.analysis.graph_utils import insert_node, is_transpose, tensor_meta  # noqa: E402
from effcompile.passes.base import RecordsJointPass, register_joint_pass  # noqa: E402

aten = torch.ops.aten
prims = torch.ops.prims
Node = torch.fx.Node
SCATTER = torch.ops.effcompile.scatter_rows.default
# Where the propagation stops, and why: logging.getLogger("effcompile.passes.sample_selection.row_sparse_backward").
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RowSparse:
    """A backward value that is zero outside the selected samples' rows along dimension ``dim``.

    The full tensor has ``batch·factor`` entries along ``dim`` (``factor`` per sample, e.g. the
    tokens of a flattened ``(B·T, C)`` activation); ``compact`` holds the ``k·factor`` entries of
    the ``k`` samples in ``index``, in that order, and equals the full tensor elsewhere.
    """

    compact: Node
    index: Node
    batch: int
    factor: int
    dim: int = 0

    def key(self) -> Tuple[Node, int, int]:
        return (self.index, self.batch, self.factor)

    @property
    def full_rows(self) -> int:
        return self.batch * self.factor

    def moved(self, compact: Node, dim: Optional[int] = None, factor: Optional[int] = None) -> "RowSparse":
        return dataclasses.replace(self, compact=compact, dim=self.dim if dim is None else dim,
                                   factor=self.factor if factor is None else factor)


@dataclasses.dataclass
class RowSparseRecord:
    """One backward op that now runs on the selected rows (for reports and tests)."""

    op: str
    rows: int
    kept_rows: int
    before: str




class _Unhandled(Exception):
    """The op is not known to keep rows independent: the value is scattered back to full size."""


def _is_zero_constant(arg: Any) -> bool:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return arg == 0
    if isinstance(arg, Node) and arg.op == "call_function":
        if arg.target is aten.scalar_tensor.default:
            return arg.args[0] == 0
        if arg.target is aten.full.default:
            return arg.args[1] == 0
        if arg.target in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
            return True
    return False


def _norm_dims(dims: Any, ndim: int) -> List[int]:
    dims = [dims] if isinstance(dims, int) else list(dims or range(ndim))
    return [int(d) % ndim for d in dims]


def _unaliased(node: Any) -> Any:
    while isinstance(node, Node) and node.op == "call_function" and node.target is aten.alias.default:
        node = node.args[0]
    return node


def _mask_source(node: Any) -> Optional[Node]:
    """For an element-wise comparison of one tensor with scalars (a bool mask of the same shape,
    e.g. ReLU's ``le(Y, 0)``), the compared tensor (seen through aliases); else None."""
    node = _unaliased(node)
    if not isinstance(node, Node) or node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    meta = tensor_meta(node)
    if meta is None or meta.dtype != torch.bool or torch.Tag.pointwise not in node.target.tags or node.kwargs:
        return None
    tensors = [arg for arg in node.args if isinstance(arg, Node)]
    if len(tensors) != 1 or any(isinstance(arg, (list, tuple)) for arg in node.args):
        return None
    if _shape(tensors[0]) != _shape(node):
        return None
    return tensors[0]


def _shape(node: Any) -> tuple:
    meta = tensor_meta(node)
    if meta is None:
        raise _Unhandled(f"{node} has no tensor metadata")
    return tuple(meta.shape)


def _describe(node: Node) -> str:
    args = ", ".join(getattr(a, "name", repr(a)) for a in node.args[:3] if not isinstance(a, (list, tuple)))
    return f"{node.name} = {getattr(node.target, '__name__', node.target)}({args})"


class _RowSparseRewriter:
    """Propagates row sparsity from ``scatter_rows`` nodes through the backward (one graph)."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.graph = graph
        self.sparse: Dict[Node, RowSparse] = {}
        self.multi: Dict[Node, Tuple[Node, RowSparse, Dict[int, bool]]] = {}  # tuple outputs: index -> sparse?
        self.handled: set = set()
        self.row_indices: Dict[Tuple[Node, int], Node] = {}
        self.records: List[RowSparseRecord] = []
        self.stops: List[str] = []  # the ops the propagation could not pass (for the warning)

    # --------------------------------------------------------------- driver
    def run(self) -> List[RowSparseRecord]:
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is SCATTER:
                rows, index, num_rows = node.args
                if not isinstance(num_rows, int):  # a symbolic batch: still exact, only not row-sparse
                    warnings.warn("effcompile row_sparse_backward: the batch size of this compiled graph is symbolic "
                                  "(dynamic shapes), so the selected rows' backward runs at full size (exact, no "
                                  "saving); compile with dynamic=False (effcompile.train_step does)", stacklevel=2)
                    continue
                self.sparse[node] = RowSparse(rows, index, num_rows, 1)
                continue
            if not any(arg in self.sparse or arg in self.multi for arg in node.all_input_nodes):
                continue
            handler = _HANDLERS.get(node.target)
            with self.graph.inserting_before(node):
                try:
                    if handler is None:
                        raise _Unhandled(str(node.target))
                    handler(self, node)
                except _Unhandled as why:
                    _LOG.debug("row-sparse backward stops at %s: %s", node.format_node(), why)
                    self.stops.append(f"{node.target} ({why})")
                    continue
            self.handled.add(node)
        weight_ops = {"aten.mm.default", "aten.bmm.default", "aten.convolution_backward.default",
                      "aten.native_layer_norm_backward.default"}
        if self.sparse and not any(record.op in weight_ops for record in self.records):
            # a selection marker, and no weight gradient computed from the selected rows only
            warnings.warn("effcompile row_sparse_backward: no weight-gradient GEMM of this compiled graph runs on the "
                          "selected rows (forward reuse saves nothing here): the propagation stops at "
                          f"{'; '.join(self.stops[:3]) or 'the loss'}", stacklevel=2)
        self._densify_unhandled_uses()
        self.graph.eliminate_dead_code()
        self.graph.lint()
        return self.records

    def _densify_unhandled_uses(self) -> None:
        """Scatter a row-sparse value back to full size wherever an unhandled op reads it."""
        for node, info in list(self.sparse.items()):
            users = [user for user in node.users if user not in self.handled]
            if not users:
                continue
            _LOG.debug("row-sparse backward scatters %s back to full size for %s", node.name,
                       [user.format_node() for user in users])
            with self.graph.inserting_before(node.next):  # right after node, in insertion order
                dense = self._scatter(node, info)
            for user in users:
                user.replace_input_with(node, dense)

    # --------------------------------------------------------------- building blocks
    def _insert(self, like: Node, target: Any, *args: Any, **kwargs: Any) -> Node:
        return insert_node(self.graph, like, target, *args, **kwargs)

    def _kept(self, info: RowSparse) -> int:
        return tensor_meta(info.index).shape[0] * info.factor

    def _row_index(self, info: RowSparse) -> Node:
        """Positions of the selected samples' rows: ``index·factor + [0..factor)``, flattened."""
        key = (info.index, info.factor)
        if key not in self.row_indices:
            if info.factor == 1:
                self.row_indices[key] = info.index
            else:
                # Placed right after the index so that every later use (in any order) sees it.
                index, device = info.index, tensor_meta(info.index).device
                with self.graph.inserting_before(index.next):
                    # prims.iota, what arange decomposes to: Inductor 2.11 has no lowering for
                    # aten.arange inserted after decomposition (2.13 has one).
                    offsets = self._insert(index, torch.ops.prims.iota.default, info.factor, start=0, step=1,
                                           dtype=torch.int64, device=device, requires_grad=False)
                    first = self._insert(index, aten.mul.Tensor,
                                         self._insert(index, aten.unsqueeze.default, index, 1), info.factor)
                    rows = self._insert(index, aten.add.Tensor, first, offsets)
                    self.row_indices[key] = self._insert(index, aten.view.default, rows, [-1])
        return self.row_indices[key]

    def _gather(self, dense: Node, info: RowSparse, like: Node, dim: int) -> Node:
        """``dense`` restricted to the selected rows along ``dim``.

        A bool mask computed element-wise from one full-size tensor is recomputed from that
        tensor's gathered rows instead of being gathered itself: ReLU's backward reads
        ``le(Y, 0)``, and gathering the full-batch mask made the partitioner save a bool mask of
        the rows beside the float rows of ``Y`` it saves anyway for the next weight gradient (and
        Inductor's CPU code for bool stores is slow).  CSE merges the repeated gathers of ``Y``.
        """
        source = _mask_source(dense)
        if source is not None:
            mask, rows = _unaliased(dense), self._gather(_unaliased(source), info, like, dim)
            return self._insert(like, mask.target, *(rows if arg is source else arg for arg in mask.args))
        return self._insert(like, aten.index.Tensor, dense, [None] * dim + [self._row_index(info)])

    def _scatter(self, node: Node, info: RowSparse) -> Node:
        meta = tensor_meta(info.compact)
        zeros = self._insert(node, aten.full.default, list(_shape(node)), 0, dtype=meta.dtype, layout=torch.strided,
                             device=meta.device, pin_memory=False)
        return self._insert(node, aten.index_put.default, zeros, [None] * info.dim + [self._row_index(info)],
                            info.compact, True)

    def _info(self, node: Node) -> RowSparse:
        """The one sparsity pattern shared by every row-sparse argument of ``node``."""
        infos = [self.sparse[arg] for arg in node.all_input_nodes if arg in self.sparse]
        if not infos or any(info.key() != infos[0].key() or info.dim != infos[0].dim for info in infos):
            raise _Unhandled("arguments with different row sets")
        return infos[0]

    def _restrict(self, arg: Any, info: RowSparse, out_shape: tuple, like: Node) -> Any:
        """An operand of a row-wise op, restricted to the selected rows (broadcast operands stay)."""
        if isinstance(arg, Node) and arg in self.sparse:
            sparse = self.sparse[arg]
            if len(_shape(arg)) != len(out_shape) or sparse.dim != info.dim:
                raise _Unhandled("a row-sparse operand is broadcast")
            return sparse.compact
        meta = tensor_meta(arg)
        if meta is None:
            return arg  # a scalar or a non-tensor argument
        dim = info.dim - (len(out_shape) - meta.dim())  # broadcasting aligns trailing dimensions
        if dim < 0 or meta.shape[dim] == 1:
            return arg
        if meta.shape[dim] == info.full_rows:
            return self._gather(arg, info, like, dim)
        raise _Unhandled(f"operand of shape {tuple(meta.shape)} does not follow the rows")

    def _row_wise(self, node: Node, info: RowSparse) -> tuple:
        out = _shape(node)
        if len(out) <= info.dim or out[info.dim] != info.full_rows:
            raise _Unhandled("output rows differ from the selected rows")
        return out

    def _emit(self, node: Node, info: RowSparse) -> None:
        self.sparse[node] = info

    def _emit_dense(self, node: Node, result: Node, info: RowSparse) -> None:
        self._record(node, info)
        node.replace_all_uses_with(result)

    def _record(self, node: Node, info: RowSparse) -> None:
        self.records.append(RowSparseRecord(str(node.target), info.full_rows, self._kept(info), _describe(node)))

    # --------------------------------------------------------------- element-wise ops
    def zero_preserving(self, node: Node, sparse_positions: Sequence[int]) -> None:
        """Ops with ``f(0, …) = 0`` in the sparse argument(s): run them on the selected rows."""
        info = self._info(node)
        if any(isinstance(arg, Node) and arg in self.sparse and i not in sparse_positions
               for i, arg in enumerate(node.args)):
            raise _Unhandled("row-sparse value in a position that does not keep zeros")
        out = self._row_wise(node, info)
        args = [self._restrict(arg, info, out, node) for arg in node.args]
        self._emit(node, info.moved(self._insert(node, node.target, *args, **node.kwargs)))

    def additive(self, node: Node) -> None:
        """``a ± b`` keeps zeros only when every operand is row-sparse on the same rows."""
        info = self._info(node)
        if not all(isinstance(arg, Node) and arg in self.sparse for arg in node.args):
            raise _Unhandled("adds a value that is not row-sparse")
        out = self._row_wise(node, info)
        args = [self._restrict(arg, info, out, node) for arg in node.args]
        self._emit(node, info.moved(self._insert(node, node.target, *args, **node.kwargs)))

    def where(self, node: Node) -> None:
        branches = [(1, node.args[1]), (2, node.args[2])]
        positions = [i for i, arg in branches if isinstance(arg, Node) and arg in self.sparse]
        if not all(_is_zero_constant(arg) for i, arg in branches if i not in positions):
            raise _Unhandled("where() with a non-zero branch")
        self.zero_preserving(node, positions)

    # --------------------------------------------------------------- shape ops
    def view(self, node: Node) -> None:
        info = self.sparse[node.args[0]]
        out = _shape(node)
        if info.dim != 0 or not out or not isinstance(out[0], int) or out[0] % info.batch or out[0] < info.batch:
            raise _Unhandled("a view that mixes samples")
        # Row-major order: sample i owns one contiguous block before and after the view.
        factor = out[0] // info.batch
        kept = tensor_meta(info.index).shape[0] * factor
        compact = self._insert(node, aten.view.default, info.compact, [kept, *out[1:]])
        self._emit(node, info.moved(compact, factor=factor))

    def reindexing(self, node: Node) -> None:
        """unsqueeze / squeeze / select / slice / transpose / permute / stack / cat: the rows move, never mix."""
        info = self._info(node)
        # Checked before any operand is looked up: a cat of a row-sparse value with a dense one
        # (Inductor's joint graph concatenates such gradients) stays dense, it is not a KeyError.
        if node.target in (aten.stack.default, aten.cat.default) and \
                not all(isinstance(a, Node) and a in self.sparse for a in node.args[0]):
            raise _Unhandled("stacks a value that is not row-sparse")
        if node.target is aten.cat.default and self._stacked_through_view(node, info):
            return
        dim = _moved_row_dim(node, info.dim)
        args = [[self.sparse[a].compact for a in arg] if isinstance(arg, (list, tuple)) and arg and
                all(isinstance(a, Node) for a in arg) else (self.sparse[arg].compact if isinstance(arg, Node) and arg in self.sparse else arg)
                for arg in node.args]
        self._emit(node, info.moved(self._insert(node, node.target, *args, **node.kwargs), dim=dim))

    def _stacked_through_view(self, node: Node, info: RowSparse) -> bool:
        """``cat`` along the rows viewed at once as ``(N, rows, …)``: a ``torch.stack`` as
        Inductor's decompositions write it (attention's q, k and v gradients into the packed
        projection's).  The stack of the compact parts stands for the view, whose row dimension
        is one further; the dense cat and view are left unused.  Anything else: False."""
        parts = node.args[0]
        part_shape = list(_shape(parts[0]))
        dim = int(node.args[1] if len(node.args) > 1 else 0) % len(part_shape)
        users = list(node.users)
        if dim != info.dim or len(users) != 1 or users[0].target not in _VIEW_TARGETS:
            return False
        view = users[0]
        if list(_shape(view)) != part_shape[:dim] + [len(parts)] + part_shape[dim:]:
            return False
        # unsqueeze + cat: Inductor decomposes aten.stack and has no lowering for one inserted after
        unsqueezed = [self._insert(node, aten.unsqueeze.default, self.sparse[part].compact, dim) for part in parts]
        stacked = self._insert(node, aten.cat.default, unsqueezed, dim)
        self._emit(view, info.moved(stacked, dim=dim + 1))
        self.handled.add(view)
        return True

    def expand(self, node: Node) -> None:
        info = self.sparse[node.args[0]]
        sizes = list(node.args[1])
        offset = len(sizes) - len(_shape(node.args[0]))
        if sizes[info.dim + offset] not in (-1, info.full_rows):
            raise _Unhandled("expands the row dimension")
        sizes[info.dim + offset] = -1
        self._emit(node, info.moved(self._insert(node, aten.expand.default, info.compact, sizes), dim=info.dim + offset))

    def scatter_into_zeros(self, node: Node) -> None:
        """``select_scatter``/``slice_scatter`` of a row-sparse source into zeros along a non-row dim."""
        base, source, dim = node.args[:3]
        if source not in self.sparse or not _is_zero_constant(base):
            raise _Unhandled("scatter into a non-zero base")
        info = self.sparse[source]
        row_dim = info.dim + (1 if node.target is aten.select_scatter.default and int(dim) % len(_shape(node)) <= info.dim else 0)
        if int(dim) % len(_shape(node)) == row_dim:
            raise _Unhandled("scatter along the rows")
        meta = tensor_meta(node)
        shape = list(meta.shape)
        shape[row_dim] = self._kept(info)
        zeros = self._insert(node, aten.full.default, shape, 0, dtype=meta.dtype, layout=torch.strided,
                             device=meta.device, pin_memory=False)
        compact = self._insert(node, node.target, zeros, info.compact, *node.args[2:], **node.kwargs)
        self._emit(node, info.moved(compact, dim=row_dim))

    def reads_no_values(self, node: Node) -> None:
        """``new_zeros``/``new_empty``/``new_full``/``new_ones(x, size)``: only x's dtype and device
        are read, so x may be the compact rows (the full-size x is then not kept alive for it)."""
        if node.args[0] not in self.sparse or any(arg in self.sparse for arg in node.all_input_nodes[1:]):
            raise _Unhandled("a row-sparse size argument")
        same = self._insert(node, node.target, self.sparse[node.args[0]].compact, *node.args[1:], **node.kwargs)
        node.replace_all_uses_with(same)

    def scatter_add_into_zeros(self, node: Node) -> None:
        """``scatter_add(zeros, dim, index, src)`` with src row-sparse along another dim (the backward
        of a gather/one-hot, e.g. a vmapped cross entropy): untouched rows stay zero."""
        base, dim, index, source = node.args[:4]
        if source not in self.sparse or index in self.sparse or not _is_zero_constant(base):
            raise _Unhandled("scatter_add of a row-sparse source into a non-zero base")
        info = self.sparse[source]
        dim = int(dim) % len(_shape(node))
        index_meta = tensor_meta(index)
        if dim == info.dim or index_meta is None or index_meta.dim() <= info.dim \
                or index_meta.shape[info.dim] != info.full_rows:
            raise _Unhandled("scatter_add along the rows, or an index that does not follow them")
        meta = tensor_meta(node)
        shape = list(meta.shape)
        shape[info.dim] = self._kept(info)
        zeros = self._insert(node, aten.full.default, shape, 0, dtype=meta.dtype, layout=torch.strided,
                             device=meta.device, pin_memory=False)
        compact = self._insert(node, node.target, zeros, dim, self._gather(index, info, node, info.dim), info.compact)
        self._emit(node, info.moved(compact))

    def backward_of_indexing(self, node: Node) -> None:
        """``select_backward``/``slice_backward(grad, input_sizes, dim, …)`` along a non-row dim."""
        grad, sizes, dim = node.args[:3]
        info = self.sparse[grad]
        dim = int(dim) % len(sizes)
        row_dim = info.dim + (1 if node.target is aten.select_backward.default and dim <= info.dim else 0)
        if dim == row_dim:
            raise _Unhandled("indexes the row dimension")
        sizes = list(sizes)
        sizes[row_dim] = self._kept(info)
        self._emit(node, info.moved(self._insert(node, node.target, info.compact, sizes, *node.args[2:]), dim=row_dim))

    # --------------------------------------------------------------- reductions
    def sum(self, node: Node) -> None:
        info = self.sparse[node.args[0]]
        ndim = len(_shape(node.args[0]))
        dims = _norm_dims(node.args[1] if len(node.args) > 1 else None, ndim)
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        compact = self._insert(node, node.target, info.compact, *node.args[1:], **node.kwargs)
        if info.dim in dims:  # rows outside the selection add zeros: the compact sum is the exact sum
            self._emit_dense(node, compact, info)
        else:
            dim = info.dim if keepdim else info.dim - sum(d < info.dim for d in dims)
            self._emit(node, info.moved(compact, dim=dim))

    # --------------------------------------------------------------- GEMMs
    def mm(self, node: Node) -> None:
        """``A·B`` with rows selected along A's rows, B's columns, or the contraction dimension."""
        left, right = node.args
        info = self._info(node)
        left_info, right_info = self.sparse.get(left), self.sparse.get(right)
        if left_info is not None and left_info.dim == 1 or right_info is not None and right_info.dim == 0:
            # The contraction runs over the rows: Aᵀ-style products keep only the selected terms.
            if left_info is not None and left_info.dim == 0 or right_info is not None and right_info.dim == 1:
                raise _Unhandled("mixed mm pattern")
            left_rows = left_info.compact if left_info is not None else self._gather(left, info, node, 1)
            right_rows = right_info.compact if right_info is not None else self._gather(right, info, node, 0)
            self._emit_dense(node, self._insert(node, aten.mm.default, left_rows, right_rows), info)
            return
        # Output rows follow A's rows (dim 0) or B's columns (dim 1).
        left_arg = left_info.compact if left_info is not None else left
        right_arg = right_info.compact if right_info is not None else right
        self._emit(node, info.moved(self._insert(node, aten.mm.default, left_arg, right_arg)))
        self._record(node, info)

    def bmm(self, node: Node) -> None:
        """Batched GEMMs over row-sparse batch entries: each output entry only reads its own entries."""
        info = self._info(node)
        if info.dim != 0:
            raise _Unhandled("bmm sparse along a matrix dimension")
        out = self._row_wise(node, info)
        args = [self._restrict(arg, info, out, node) for arg in node.args]
        self._emit(node, info.moved(self._insert(node, aten.bmm.default, *args)))
        self._record(node, info)

    def batch_local(self, node: Node, sparse_outputs: Optional[Dict[int, bool]] = None,
                    batched_args: Optional[Sequence[int]] = None) -> None:
        """Ops computed independently per batch entry (convolution, layer-norm and attention backward):
        gather every batch-shaped operand; per-entry outputs stay row-sparse, reductions over the
        batch (weight and bias gradients) are exact from the selected entries."""
        info = self._info(node)
        if info.dim != 0:
            raise _Unhandled("not sparse along the batch dimension")
        rows = info.full_rows
        outputs = node.meta["val"] if isinstance(node.meta["val"], (tuple, list)) else (node.meta["val"],)
        if sparse_outputs is None:
            if any(isinstance(out, torch.Tensor) and (out.dim() == 0 or out.shape[0] != rows) for out in outputs):
                raise _Unhandled("an output that is not per batch entry")
            sparse_outputs = {i: isinstance(out, torch.Tensor) for i, out in enumerate(outputs)}

        def restrict(arg: Any, position: Optional[int] = None) -> Any:
            if isinstance(arg, Node) and arg in self.sparse:
                return self.sparse[arg].compact
            if batched_args is not None and position not in batched_args:
                return arg  # a weight whose first dimension happens to equal the batch: never gathered
            meta = tensor_meta(arg)
            if meta is not None and meta.dim() > 0 and meta.shape[0] == rows:
                return self._gather(arg, info, node, 0)
            return arg

        compact = self._insert(node, node.target, *[restrict(arg, i) for i, arg in enumerate(node.args)],
                               **{key: restrict(value) for key, value in node.kwargs.items()})
        self._record(node, info)
        if isinstance(node.meta["val"], (tuple, list)):
            self.multi[node] = (compact, info, sparse_outputs)
        else:
            self._emit(node, info.moved(compact))

    def per_sample_weights(self, node: Node) -> None:
        """Backward ops whose grad input is per entry, with batch reductions for the parameters."""
        if node.args[0] not in self.sparse or any(arg in self.sparse for arg in node.all_input_nodes[1:]):
            raise _Unhandled("the gradient is not the row-sparse argument")
        self.batch_local(node, {0: True, 1: False, 2: False}, _BATCH_OPERANDS[node.target])

    def loss_backward(self, node: Node) -> None:
        """``nll_loss_backward`` with reduction none: row i of the result only reads row i."""
        if node.args[4] != 0 or node.args[0] not in self.sparse:
            raise _Unhandled("reduced loss backward")
        self.batch_local(node)

    def softmax_backward(self, node: Node) -> None:
        grad, output, dim, dtype = node.args
        info = self._info(node)
        if int(dim) % len(_shape(grad)) == info.dim:
            raise _Unhandled("softmax over the rows")
        out = self._row_wise(node, info)
        args = [self._restrict(arg, info, out, node) for arg in (grad, output)]
        self._emit(node, info.moved(self._insert(node, node.target, *args, dim, dtype)))

    def getitem(self, node: Node) -> None:
        source, position = node.args
        if source not in self.multi:
            raise _Unhandled("getitem of an unknown tuple")
        compact, info, sparse_outputs = self.multi[source]
        item = self._insert(node, operator.getitem, compact, position)
        if sparse_outputs.get(position, False):
            self._emit(node, info.moved(item, dim=0))
        else:
            node.replace_all_uses_with(item)


def _moved_row_dim(node: Node, row_dim: int) -> int:
    """Where the rows are after a re-indexing op, or ``_Unhandled`` when the op indexes them."""
    target, args = node.target, node.args
    ndim = len(_shape(args[0])) if isinstance(args[0], Node) else len(_shape(args[0][0]))
    if target is aten.unsqueeze.default:
        dim = int(args[1]) % (ndim + 1)
        return row_dim + (dim <= row_dim)
    if target in (aten.squeeze.dim, aten.squeeze.dims, aten.select.int):
        dims = _norm_dims(args[1], ndim)
        if row_dim in dims:
            raise _Unhandled("removes the row dimension")
        return row_dim - sum(d < row_dim for d in dims)
    if target is aten.slice.Tensor:
        if int(args[1]) % ndim == row_dim:
            raise _Unhandled("slices the rows")
        return row_dim
    if target in (aten.permute.default, aten.t.default, aten.transpose.int):
        dims = (list(range(ndim))[::-1] if target is aten.t.default else
                _transpose_dims(args[1], args[2], ndim) if target is aten.transpose.int else _norm_dims(args[1], ndim))
        return dims.index(row_dim)
    if target is aten.stack.default:
        dim = int(args[1] if len(args) > 1 else 0) % (ndim + 1)
        return row_dim + (dim <= row_dim)
    if target is aten.cat.default:
        if int(args[1] if len(args) > 1 else 0) % ndim == row_dim:
            raise _Unhandled("concatenates along the rows")
        return row_dim
    raise _Unhandled(str(target))


def _transpose_dims(first: int, second: int, ndim: int) -> List[int]:
    dims = list(range(ndim))
    first, second = int(first) % ndim, int(second) % ndim
    dims[first], dims[second] = dims[second], dims[first]
    return dims


def _first_arg_zero_preserving(rewriter: _RowSparseRewriter, node: Node) -> None:
    rewriter.zero_preserving(node, [0])


def _any_arg_zero_preserving(rewriter: _RowSparseRewriter, node: Node) -> None:
    rewriter.zero_preserving(node, range(len(node.args)))


# f(0, …) = 0 in the first argument (the incoming gradient): casts, scalings, activation backwards.
_FIRST_ARG_LINEAR = [
    "div.Tensor", "div.Scalar", "mul.Scalar", "neg.default", "alias.default", "clone.default", "detach.default",
    "_to_copy.default", "threshold_backward.default", "gelu_backward.default", "tanh_backward.default",
    "sigmoid_backward.default", "silu_backward.default", "hardswish_backward.default", "leaky_relu_backward.default",
    "hardtanh_backward.default", "elu_backward.default", "native_dropout_backward.default",
]
_REINDEXING = ["unsqueeze.default", "squeeze.dim", "squeeze.dims", "select.int", "slice.Tensor", "transpose.int",
               "permute.default", "t.default", "stack.default", "cat.default"]
_VIEWS = ["view.default", "_unsafe_view.default", "reshape.default"]
_VIEW_TARGETS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
# Per-batch-entry backward ops with batch reductions for the parameters (outputs: input, weight, bias).
_PER_SAMPLE_WEIGHTS = ["convolution_backward.default", "native_layer_norm_backward.default"]
_BATCH_LOCAL = [
    "_scaled_dot_product_flash_attention_for_cpu_backward.default", "_scaled_dot_product_flash_attention_backward.default",
    "_scaled_dot_product_efficient_attention_backward.default", "_scaled_dot_product_cudnn_attention_backward.default",
]


# Their per-batch-entry operands, by position (the rest are parameters and statistics of the layer).
# convolution_backward(grad_out, input, weight, ...); native_layer_norm_backward(grad_out, input,
# normalized_shape, mean, rstd, weight, bias, ...).
_BATCH_OPERAND_POSITIONS = {"convolution_backward.default": (0, 1), "native_layer_norm_backward.default": (0, 1, 3, 4)}


def _resolve(names: Sequence[str]) -> List[Any]:
    ops = []
    for name in names:
        packet, overload = name.split(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:  # some ops exist only in some torch versions
            ops.append(op)
    return ops


_BATCH_OPERANDS = {op: _BATCH_OPERAND_POSITIONS[name] for name in _PER_SAMPLE_WEIGHTS for op in _resolve([name])}
_HANDLERS: Dict[Any, Callable[[_RowSparseRewriter, Node], None]] = {
    **{op: _first_arg_zero_preserving for op in _resolve(_FIRST_ARG_LINEAR)},
    **{op: _RowSparseRewriter.reindexing for op in _resolve(_REINDEXING)},
    **{op: _RowSparseRewriter.view for op in _resolve(_VIEWS)},
    **{op: _RowSparseRewriter.per_sample_weights for op in _resolve(_PER_SAMPLE_WEIGHTS)},
    **{op: _RowSparseRewriter.batch_local for op in _resolve(_BATCH_LOCAL)},
    prims.convert_element_type.default: _first_arg_zero_preserving,
    aten.mul.Tensor: _any_arg_zero_preserving,
    aten.add.Tensor: _RowSparseRewriter.additive,
    aten.sub.Tensor: _RowSparseRewriter.additive,
    aten.where.self: _RowSparseRewriter.where,
    aten.expand.default: _RowSparseRewriter.expand,
    aten.select_scatter.default: _RowSparseRewriter.scatter_into_zeros,
    aten.slice_scatter.default: _RowSparseRewriter.scatter_into_zeros,
    aten.scatter_add.default: _RowSparseRewriter.scatter_add_into_zeros,
    aten.new_zeros.default: _RowSparseRewriter.reads_no_values,
    aten.new_empty.default: _RowSparseRewriter.reads_no_values,
    aten.new_full.default: _RowSparseRewriter.reads_no_values,
    aten.new_ones.default: _RowSparseRewriter.reads_no_values,
    aten.select_backward.default: _RowSparseRewriter.backward_of_indexing,
    aten.slice_backward.default: _RowSparseRewriter.backward_of_indexing,
    aten.sum.dim_IntList: _RowSparseRewriter.sum,
    aten.sum.default: _RowSparseRewriter.sum,
    aten.mm.default: _RowSparseRewriter.mm,
    aten.bmm.default: _RowSparseRewriter.bmm,
    aten.nll_loss_backward.default: _RowSparseRewriter.loss_backward,
    aten._log_softmax_backward_data.default: _RowSparseRewriter.softmax_backward,
    aten._softmax_backward_data.default: _RowSparseRewriter.softmax_backward,
    operator.getitem: _RowSparseRewriter.getitem,
}


def rewrite_row_sparse_backward(graph: torch.fx.Graph) -> List[RowSparseRecord]:
    """Run the backward of every ``scatter_rows``-marked selection on the selected rows. Idempotent."""
    if not any(node.op == "call_function" and node.target is SCATTER for node in graph.nodes):
        return []
    return _RowSparseRewriter(graph).run()


# Exact, so it runs first: the randomized VJPs then sample the already row-sparse GEMMs.
JOINT_PASS = register_joint_pass(RecordsJointPass("row_sparse_backward", 10, rewrite_row_sparse_backward, [__file__]))
