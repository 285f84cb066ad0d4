"""Per-sample selection: which rows of a batch are backpropagated, and with which weights.

``SampleSelector`` turns the per-sample losses of one batch (plus, for gradient matching, the
penultimate features and the loss's gradient at the head output) into ``(index: int64[k], weights: float[k])``; the
training loss is then ``selected_loss = Σ_j weights_j · ℓ[index_j]`` (``selected_loss``).
Everything runs on the device with static shapes (``k = max(1, round(keep·B))`` depends only
on the batch size), so a compiled step never synchronises with the host and never recompiles.

Strategies (Balles, Archambeau, Zappella, arXiv 2312.05021 compare them; none reliably beats
``random``):

* ``random``: k rows uniformly without replacement, weights ``1/k``.  Every row is kept with
  probability ``k/B``, so ``E[Σ_j ℓ_j / k] = (1/B)·Σ_i ℓ_i``: an unbiased estimate of the
  full-batch mean loss and of its gradient.
* ``loss`` (Selective Backprop, Jiang et al. 2019): ``p_i = percentile(ℓ_i)^β``, the percentile
  taken in a rolling history of the last ``history_size`` losses.  Probabilistic variant: keep row
  i with probability ``p_i`` (expected fraction ``∫u^β du = 1/(β+1)`` once the history holds
  i.i.d. losses), weights ``1/#kept`` over the full batch (index = all rows).  Fixed-k variant:
  k rows without replacement with probabilities ∝ ``p_i`` (Gumbel top-k), weights ``1/k``.
  Both are unweighted, hence biased towards hard samples, as in the paper.
* ``gradmatch``: pick S (|S| = k) and w ≥ 0 minimising ``‖(1/B)Σ_i g_i − Σ_{j∈S} w_j g_j‖²`` for the
  last-layer proxy gradients ``g_i = Σ_t e_it ⊗ [h_it, 1]`` of the head ``z = W·h + b``: ``e_it =
  ∂ℓ_i/∂z_it``, the user's per-sample loss differentiated at the head output (any loss; for a
  cross-entropy it is ``softmax(z_i) − y_i``), ``t`` over the head's positions (one for a
  classifier, every token for a language-model or token-classification head).  Only the B×B
  Gram kernel ``K_ij = ⟨g_i, g_j⟩`` is formed, never the C·d-dimensional gradients, by the
  cheaper of two exact forms (:func:`gradmatch_kernel`).  Greedy orthogonal matching pursuit (k unrolled iterations,
  each a ridge least-squares refit on the chosen rows) followed by a non-negative least-squares
  weight fit (projected accelerated gradient) — all on the device.

State (buffers, so ``state_dict`` checkpoints them): the loss history ring buffer and its
fill/position counters, step and row counters, and the last selection (index, weights).

Under torch.distributed (DDP, FSDP2, a stage's replicas): each rank scores and selects ``k`` rows of
its **own** batch, but with ``sync_history`` (the default) the loss **history is global**: every
rank writes all its replicas' batch losses (``effcompile.distributed.all_gather_replicas``, in rank
order) into its ring buffer, so the histories stay identical on every rank and a row's percentile
is its rank among the recent losses of the whole data-parallel batch — what one process training
on that batch would compute.  ``sync_history=False`` keeps a per-rank history (ranks then rank
their rows against different distributions, and their selector buffers differ).  The random
draws (``random`` rows, Gumbel keys, the probabilistic keep mask) come from torch's global RNG, so
identically seeded ranks draw the same *positions*; those positions index different samples on
each rank, so the subsets are still independent across ranks.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn as nn

from effcompile._compat import is_compiling, pytree
from effcompile.distributed import all_gather_replicas
from effcompile.passes.base import PassState

__all__ = [
    "SampleSelector", "selector_of", "per_sample_loss_fn", "selected_loss", "num_selected",
    "gradmatch_kernel", "output_errors", "gradmatch_select", "nonnegative_least_squares",
]


def num_selected(keep: float, batch_size: int, min_rows: int = 1) -> int:
    """k = max(min_rows, round(keep·B)), at most B: the static number of selected rows."""
    return max(min(min_rows, batch_size), min(batch_size, int(round(keep * batch_size))))


def selected_loss(per_sample_loss: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j weights_j · ℓ[index_j] (a plain gather: the gradient is exact, the backward full-size)."""
    return (per_sample_loss.index_select(0, index) * weights.to(per_sample_loss.dtype)).sum()


# ------------------------------------------------------------------------------ gradient matching
def output_errors(per_sample_loss: Callable[[Any, Any], torch.Tensor], outputs: Any,
                  targets: Any) -> torch.Tensor:
    """e = ∂(Σ_i ℓ_i)/∂z at z = the first tensor of ``outputs`` (the head output), float32, shaped like z.

    ℓ_i = ``per_sample_loss(outputs, targets)[i]`` depends on sample i's outputs only, so row i of
    e is ∂ℓ_i/∂z_i.  The other output tensors enter as constants.  Compiled, ``torch.func.grad``
    keeps it inside the step's one graph (Dynamo traces functorch transforms; ``autograd.grad``
    would break the graph).
    """
    leaves, spec = pytree.tree_flatten(outputs)
    position = next((i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)), None)
    if position is None or not leaves[position].is_floating_point():
        raise ValueError("strategy='gradmatch' differentiates the loss at the model's first output tensor; "
                         f"the outputs ({type(outputs).__name__}) have no floating-point tensor first")
    constants = [leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

    def total_loss(head_output: torch.Tensor) -> torch.Tensor:
        rebuilt = list(constants)
        rebuilt[position] = head_output
        return per_sample_loss(pytree.tree_unflatten(rebuilt, spec), targets).float().sum()

    head_output = constants[position]
    if is_compiling():
        return torch.func.grad(total_loss)(head_output).float()
    # Eagerly autograd: torch.func refuses to run under saved-tensor hooks (offloading, checkpointing).
    head_output = head_output.detach().requires_grad_()
    with torch.enable_grad():
        return torch.autograd.grad(total_loss(head_output), head_output)[0].float()


# Elements of the largest temporary a kernel form materialises at once (64 MiB of float32).
_KERNEL_CHUNK_ELEMENTS = 1 << 24


def _positions(features: torch.Tensor, errors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, T, d) features and (B, T, C) errors: T head positions per sample (1 for a classifier)."""
    batch = features.shape[0]
    h = features.reshape(batch, -1, features.shape[-1]).float()
    tokens = h.shape[1]
    if errors.numel() % (batch * tokens):
        raise ValueError(f"gradmatch: the loss gradient at the head output {tuple(errors.shape)} does not split into "
                         f"the head input's {batch}×{tokens} positions {tuple(features.shape)}")
    return h, errors.reshape(batch, tokens, -1).float()


def gradmatch_kernel(features: torch.Tensor, errors: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """Gram matrix K_ij = ⟨g_i, g_j⟩ of the last-layer gradients g_i = Σ_t e_it ⊗ [h_it, 1], exactly.

    ``features`` (B, [T,] d) are the head's inputs, ``errors`` (B, [T,] C) the loss gradient at
    its outputs.  Two forms, the cheaper one by multiply-adds:

    * pairwise: ⟨e_it ⊗ h_it, e_js ⊗ h_js⟩ = ⟨e_it, e_js⟩·⟨h_it, h_js⟩ (plus ⟨e_it, e_js⟩ for the
      bias), summed over t and s: (B·T)²·(C + d) — a classifier (T = 1) costs B²·(C + d);
    * explicit: g_i = E_iᵀ·[H_i, 1] as a C×(d+1) matrix per sample, then G·Gᵀ: B·T·C·d + B²·C·d —
      cheaper for long sequences (token heads).

    Either runs in chunks of at most 2^24 temporary elements.
    """
    h, e = _positions(features, errors)
    batch, tokens = h.shape[:2]
    classes, width = e.shape[-1], h.shape[-1] + int(bias)
    pairwise = (batch * tokens) ** 2 * (classes + width)
    explicit = batch * tokens * classes * width + batch ** 2 * classes * width
    if explicit < pairwise:
        return _explicit_kernel(h, e, bias)
    return _pairwise_kernel(h, e, bias)


def _pairwise_kernel(h: torch.Tensor, e: torch.Tensor, bias: bool) -> torch.Tensor:
    batch, tokens = h.shape[:2]
    h_rows, e_rows = h.reshape(batch * tokens, -1), e.reshape(batch * tokens, -1)
    chunk = max(1, _KERNEL_CHUNK_ELEMENTS // (tokens * batch * tokens))
    blocks = []
    for start in range(0, batch, chunk):
        rows = slice(start * tokens, min(batch, start + chunk) * tokens)
        feature_gram = h_rows[rows] @ h_rows.t()
        if bias:
            feature_gram = feature_gram + 1.0
        products = (e_rows[rows] @ e_rows.t()) * feature_gram  # (chunk·T, B·T)
        blocks.append(products.reshape(-1, tokens, batch, tokens).sum(dim=(1, 3)))
    return torch.cat(blocks)


def _explicit_kernel(h: torch.Tensor, e: torch.Tensor, bias: bool) -> torch.Tensor:
    batch = h.shape[0]
    if bias:
        h = torch.cat([h, h.new_ones(*h.shape[:2], 1)], dim=-1)
    chunk = max(1, _KERNEL_CHUNK_ELEMENTS // (batch * h.shape[-1]))
    kernel = h.new_zeros(batch, batch)
    for start in range(0, e.shape[-1], chunk):  # a block of classes at a time: K = Σ_blocks G_b·G_bᵀ
        gradients = torch.bmm(e[..., start:start + chunk].transpose(1, 2), h).reshape(batch, -1)
        kernel = kernel + gradients @ gradients.t()
    return kernel


def nonnegative_least_squares(gram: torch.Tensor, target: torch.Tensor, initial: torch.Tensor,
                              iterations: int) -> torch.Tensor:
    """argmin_{w ≥ 0} ½wᵀAw − bᵀw (A = ``gram``, b = ``target``) by projected FISTA from ``initial``.

    Step 1/‖A‖_F (‖A‖_F ≥ λ_max for symmetric A, so the step is safe); a fixed number of
    iterations keeps the graph static.  The better of the start and the end point is returned,
    so the fit never makes the objective worse than the clipped OMP weights.
    """
    def objective(w: torch.Tensor) -> torch.Tensor:
        return 0.5 * (w @ (gram @ w)) - target @ w

    # One iteration: w⁺ = max(0, y − s·(A·y − b)) = max(0, M·y + c) with M = I − s·A, c = s·b,
    # then the momentum point y = w⁺ + μ·(w⁺ − w) = lerp(w, w⁺, 1 + μ): three ops per iteration.
    step = 1.0 / gram.norm().clamp_min(1e-30)
    size = gram.shape[0]
    contraction = torch.eye(size, device=gram.device, dtype=gram.dtype) - step * gram
    offset = step * target
    weights = initial
    momentum_point = initial
    t = 1.0
    for _ in range(iterations):
        next_weights = torch.addmv(offset, contraction, momentum_point).clamp_min(0)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        momentum_point = torch.lerp(weights, next_weights, 1.0 + (t - 1.0) / t_next)
        weights, t = next_weights, t_next
    return torch.where(objective(weights) <= objective(initial), weights, initial)


def gradmatch_select(kernel: torch.Tensor, k: int, ridge: float = 1e-3,
                     nnls_iterations: int = 50) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy non-negative OMP on the Gram kernel: k rows and weights w ≥ 0 with Σ w_j g_j ≈ mean g.

    With b_j = ⟨ḡ, g_j⟩ = (1/B)·Σ_i K_ij and the current weights w on S, the residual
    r = ḡ − Σ_S w_j g_j has ⟨r, g_j⟩ = b_j − (K[:, S]·w)_j.  Each iteration adds the unchosen row
    with the largest normalised correlation ⟨r, g_j⟩/‖g_j‖ and refits w = (K_SS + λI)⁻¹ b_S
    (λ = ridge · mean ‖g_i‖²).  The final weights solve the non-negative least-squares problem on S.
    """
    kernel = kernel.float()
    target = kernel.mean(dim=0)  # b_j = ⟨ḡ, g_j⟩
    inverse_norms = 1.0 / (kernel.diagonal().clamp_min(0).sqrt() + 1e-12)
    ridge_eye = (ridge * kernel.diagonal().mean() + 1e-12) * torch.eye(k, device=kernel.device, dtype=kernel.dtype)
    index = torch.empty(0, dtype=torch.long, device=kernel.device)
    rows = kernel.new_empty(0, kernel.shape[0])  # K[S, :], grown by one row per iteration
    weights = kernel.new_empty(0)
    for size in range(1, k + 1):
        correlation = (target - weights @ rows) * inverse_norms
        if size > 1:
            correlation = correlation.index_fill(0, index, float("-inf"))
        chosen = correlation.argmax().reshape(1)
        index = torch.cat([index, chosen])
        rows = torch.cat([rows, kernel.index_select(0, chosen)])
        sub_gram = rows.index_select(1, index) + ridge_eye[:size, :size]
        weights = torch.linalg.solve(sub_gram, target.index_select(0, index))
    sub_gram = kernel.index_select(0, index).index_select(1, index)
    weights = nonnegative_least_squares(sub_gram, target.index_select(0, index), weights.clamp_min(0),
                                        nnls_iterations)
    return index, weights


# ------------------------------------------------------------------------------ the selector
class SampleSelector(PassState):
    """Selects the rows of each batch to backpropagate; its buffers are the selection state.

    ``select(per_sample_loss, features=None, errors=None) -> (index, weights)`` records the
    losses in the history and returns ``k`` row indices (int64) and their weights (float32).
    ``features`` (the head's input) and ``errors`` (:func:`output_errors`) are for ``gradmatch``;
    ``head_bias`` overrides whether that head has a bias (a greedy stage's aux head).
    """

    legacy_state_keys = ("last_index", "last_weights")  # buffers until 2026-12-05: accepted and dropped on load

    def __init__(self, keep: float, strategy: str, *, fixed_k: bool = True, beta: float = 1.0,
                 history_size: int = 1024, gradmatch_ridge: float = 1e-3, nnls_iterations: int = 50,
                 head_bias: bool = True, sync_history: bool = True, min_rows: int = 1,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if strategy not in ("loss", "gradmatch", "random"):
            raise ValueError(f"strategy={strategy!r} is invalid: expected 'loss', 'gradmatch' or 'random'")
        self.keep = float(keep)
        self.strategy = strategy
        self.min_rows = int(min_rows)  # 2 where BatchNorm re-forwards the selected rows in train mode
        self.fixed_k = bool(fixed_k)
        self.beta = float(beta)
        self.history_size = int(history_size)
        self.gradmatch_ridge = float(gradmatch_ridge)
        self.nnls_iterations = int(nnls_iterations)
        self.head_bias = bool(head_bias)
        self.sync_history = bool(sync_history)
        self.register_buffer("loss_history", torch.zeros(self.history_size, device=device))
        for name in ("history_fill", "history_position", "steps", "rows_seen", "rows_selected"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long, device=device))
        # The last selection, for the report: plain attributes, not buffers — their size follows the
        # batch, and an EMA copy of the model (AveragedModel, timm's ModelEma) copies buffers in place.
        self.last_index = torch.zeros(0, dtype=torch.long, device=device)
        self.last_weights = torch.zeros(0, device=device)
        self._register_load_state_dict_pre_hook(_drop_legacy_state, with_module=True)

    @property
    def probabilistic(self) -> bool:
        return self.strategy == "loss" and not self.fixed_k

    def extra_repr(self) -> str:
        variant = "probabilistic" if self.probabilistic else f"keep={self.keep}"
        return f"strategy={self.strategy}, {variant}, beta={self.beta}, history={self.history_size}"

    def num_selected(self, batch_size: int) -> int:
        """Rows selected from a batch of ``batch_size`` (the full batch for the probabilistic variant)."""
        return batch_size if self.probabilistic else num_selected(self.keep, batch_size, self.min_rows)

    # ----------------------------------------------------------------------------- selection
    def select(self, per_sample_loss: torch.Tensor, features: Optional[torch.Tensor] = None,
               errors: Optional[torch.Tensor] = None,
               head_bias: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            losses = per_sample_loss.detach().float().reshape(-1)
            batch = losses.shape[0]
            k = self.num_selected(batch)
            # The history is global over the data-parallel replicas (see the module docstring).
            self._observe(all_gather_replicas(losses) if self.sync_history else losses)
            if self.strategy == "loss":
                index, weights = self._select_by_loss(losses, k)
            elif k == batch:  # keep=1: every row, in order, weight 1/B (the full-batch mean)
                index = torch.arange(batch, device=losses.device)
                weights = torch.full((batch,), 1.0 / batch, device=losses.device)
            elif self.strategy == "random":
                index = torch.rand(batch, device=losses.device).topk(k).indices
                weights = torch.full((k,), 1.0 / k, device=losses.device)
            else:
                index, weights = self._select_gradmatch(features, errors, k,
                                                        self.head_bias if head_bias is None else head_bias)
            self.steps.add_(1)
            self.rows_seen.add_(batch)
            self.rows_selected.add_((weights > 0).sum())
        return index, weights

    def _observe(self, losses: torch.Tensor) -> None:
        """Write the batch's losses into the ring buffer (the last ``history_size`` if more)."""
        losses = losses[-self.history_size:]
        n = losses.shape[0]
        slots = (self.history_position + torch.arange(n, device=losses.device)) % self.history_size
        self.loss_history.index_copy_(0, slots, losses)
        self.history_position.copy_((self.history_position + n) % self.history_size)
        self.history_fill.copy_((self.history_fill + n).clamp_max(self.history_size))

    def percentiles(self, losses: torch.Tensor) -> torch.Tensor:
        """Mid-rank percentile of each loss among the filled history (which includes the batch)."""
        # Sort once, binary-search each loss: O((H + B)·log H) instead of a B×H comparison.
        # Unfilled slots become +inf, so they sort last and never count as below or tied.
        valid = torch.arange(self.history_size, device=losses.device) < self.history_fill
        history = torch.where(valid, self.loss_history, torch.full_like(self.loss_history, float("inf")))
        ordered = history.sort().values
        below = torch.searchsorted(ordered, losses, side="left")
        at_or_below = torch.searchsorted(ordered, losses, side="right")
        return (below + at_or_below).float() * 0.5 / self.history_fill.clamp_min(1)

    def _select_by_loss(self, losses: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        probability = self.percentiles(losses).pow(self.beta)
        batch = losses.shape[0]
        if self.probabilistic:
            # Selective Backprop: keep row i with probability p_i, unweighted mean over the kept rows.
            kept = (torch.rand(batch, device=losses.device) < probability).float()
            return torch.arange(batch, device=losses.device), kept / kept.sum().clamp_min(1.0)
        if k == batch:
            return torch.arange(batch, device=losses.device), torch.full((batch,), 1.0 / batch, device=losses.device)
        # Gumbel top-k: the k largest of log p_i + Gumbel noise are a draw of k rows without
        # replacement with successive probabilities ∝ p_i.
        uniform = torch.rand(batch, device=losses.device).clamp(1e-12, 1.0 - 1e-7)
        keys = probability.clamp_min(1e-30).log() - torch.log(-torch.log(uniform))
        return keys.topk(k).indices, torch.full((k,), 1.0 / k, device=losses.device)

    def _select_gradmatch(self, features, errors, k: int, bias: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        if features is None or errors is None:
            raise ValueError("strategy='gradmatch' needs features (the head's input) and errors (the loss "
                             "gradient at the head output, output_errors)")
        kernel = gradmatch_kernel(features.detach(), errors.detach(), bias=bias)
        return gradmatch_select(kernel, k, self.gradmatch_ridge, self.nnls_iterations)

    # ----------------------------------------------------------------------------- logging
    def record(self, index: torch.Tensor, weights: torch.Tensor) -> None:
        """Keep the last selection in ``last_index``/``last_weights`` (no copy)."""
        self.last_index = index.detach()
        self.last_weights = weights.detach()

    def summary(self) -> dict:
        """Counters for the report (reads device values: one host sync)."""
        weights = self.last_weights
        positive = weights[weights > 0]
        seen = int(self.rows_seen)
        return {
            "steps": int(self.steps),
            "mean_selected_fraction": round(float(self.rows_selected) / seen, 4) if seen else None,
            "last_mean_weight": round(float(positive.mean()), 6) if positive.numel() else None,
            "history_fill": f"{int(self.history_fill)}/{self.history_size}",
        }


def _drop_legacy_state(module: SampleSelector, state_dict, prefix, *args) -> None:
    """An older checkpoint's last selection is accepted and dropped (it is only reported); state a
    checkpoint lacks (saved before a buffer existed) keeps its current value."""
    for name in module.legacy_state_keys:
        state_dict.pop(prefix + name, None)
    for name, buffer in module.named_buffers(recurse=False):
        state_dict.setdefault(prefix + name, buffer.detach().clone())


def selector_of(model: nn.Module) -> Optional[SampleSelector]:
    """The ``SampleSelector`` the sample-selection pass attached to ``model`` (None if not applied)."""
    from effcompile.api import _unwrap

    for module in _unwrap(model).modules():
        if isinstance(module, SampleSelector):
            return module
    return None


# ------------------------------------------------------------------------------ per-sample losses
def per_sample_loss_fn(loss_fn: Callable[[Any, Any], torch.Tensor]) -> Callable[[Any, Any], torch.Tensor]:
    """Rewrite a batch-reduced loss into ``(outputs, targets) -> (B,)`` per-sample losses ℓ_i.

    ℓ_i is scaled so that ``mean_i ℓ_i`` equals the original loss: ``reduction="mean"`` losses
    average the unreduced elements of each sample, ``reduction="sum"`` ones sum them and multiply
    by B.  Loss modules with a ``reduction`` attribute are copied with ``reduction="none"``;
    functions with a ``reduction`` keyword are called with it; any other callable is vmapped over
    the batch dimension (each sample as a batch of one), with a clear error if that fails.
    """
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        return _unreduced_module_loss(loss_fn)
    if _accepts_reduction(loss_fn):
        return _unreduced_function_loss(loss_fn)
    return _vmapped_loss(loss_fn)


def _batch_reduce(unreduced: torch.Tensor, batch: int, reduction: str) -> torch.Tensor:
    if unreduced.dim() == 0 or unreduced.shape[0] != batch:
        raise ValueError(f"the unreduced loss has shape {tuple(unreduced.shape)}, expected a leading batch "
                         f"dimension of {batch}; per-sample selection needs a loss whose elements belong to samples")
    per_sample = unreduced.reshape(batch, -1)
    if reduction == "sum":
        return per_sample.sum(dim=1) * batch
    return per_sample.mean(dim=1)


def _batch_size(outputs: Any) -> int:
    from effcompile.inputs import tensor_leaves

    # A tensor, a tuple, a dict or a ModelOutput: its first tensor with a batch dimension (a
    # Hugging Face model given labels puts its own 0-dim loss first).
    tensors = [tensor for tensor in tensor_leaves(outputs) if tensor.dim() > 0]
    if not tensors:
        raise ValueError(f"per-sample losses need model outputs with a batch dimension, got {type(outputs).__name__}")
    return tensors[0].shape[0]


def _check_batch_mean(loss_fn: nn.Module) -> None:
    # A class-weighted mean divides by Σ weight[y_i], not by B: not an average of per-sample losses.
    if getattr(loss_fn, "weight", None) is not None and getattr(loss_fn, "reduction", "mean") == "mean" \
            and isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        raise ValueError(f"{type(loss_fn).__name__}(weight=...) with reduction='mean' normalises by the batch's summed "
                         "class weights, which is not a mean of per-sample losses; use reduction='sum' or no class weights")


def _unreduced_module_loss(loss_fn: nn.Module) -> Callable[[Any, Any], torch.Tensor]:
    import copy

    _check_batch_mean(loss_fn)
    reduction = loss_fn.reduction
    unreduced = copy.copy(loss_fn)  # shares parameters/buffers; only the reduction attribute differs
    unreduced.reduction = "none"

    def per_sample(outputs: Any, targets: Any) -> torch.Tensor:
        return _batch_reduce(unreduced(outputs, targets), _batch_size(outputs), reduction)

    return per_sample


def _accepts_reduction(loss_fn: Callable) -> bool:
    try:
        return "reduction" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


def _unreduced_function_loss(loss_fn: Callable) -> Callable[[Any, Any], torch.Tensor]:
    default = inspect.signature(loss_fn).parameters["reduction"].default
    reduction = default if isinstance(default, str) else "mean"

    def per_sample(outputs: Any, targets: Any) -> torch.Tensor:
        return _batch_reduce(loss_fn(outputs, targets, reduction="none"), _batch_size(outputs), reduction)

    return per_sample


def _vmapped_loss(loss_fn: Callable) -> Callable[[Any, Any], torch.Tensor]:
    """The user's loss on each sample as a batch of one (a sequence's loss: the mean over its tokens).

    Outputs and targets are flattened with pytree first, so any output type works (tuples, dicts,
    ``ModelOutput``s, which pytree rebuilds field by field); tensors with the batch's leading
    dimension are vmapped over it, every other leaf (a KV-cache object, a shared mask, a number)
    is passed to each sample unchanged.
    """

    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)

    def per_sample(outputs: Any, targets: Any) -> torch.Tensor:
        batch = _batch_size(outputs)
        leaves, spec = pytree.tree_flatten((outputs, targets))
        dims = tuple(0 if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == batch else None
                     for leaf in leaves)

        def one_sample(*sample_leaves: Any) -> torch.Tensor:
            restored = [leaf.unsqueeze(0) if dim == 0 else leaf for leaf, dim in zip(sample_leaves, dims)]
            output, target = pytree.tree_unflatten(restored, spec)
            return loss_fn(output, target)

        try:
            losses = torch.func.vmap(one_sample, in_dims=dims)(*leaves)
        except Exception as error:
            raise ValueError(f"could not turn the loss {name!r} into per-sample losses with torch.func.vmap "
                             f"({type(error).__name__}: {error}); give a loss module with a 'reduction' attribute or a "
                             "function with a 'reduction' keyword") from error
        if losses.dim() != 1:
            raise ValueError(f"the loss {name!r} returned shape {tuple(losses.shape[1:])} per sample; expected a scalar")
        if not checked and not is_compiling():  # once, eagerly (a host read)
            checked.append(True)
            _refuse_the_models_own_loss(outputs, losses, name)
        return losses

    checked: list = []
    return per_sample


def _refuse_the_models_own_loss(outputs: Any, losses: torch.Tensor, name: str) -> None:
    """A loss function that returns the model's own loss (``output.loss``, from labels in the batch)
    gives every sample the batch's mean: selection would rank nothing."""
    own = outputs.get("loss") if isinstance(outputs, dict) else None
    if isinstance(own, torch.Tensor) and own.dim() == 0 and losses.numel() > 1 and \
            bool((losses.detach() == own.detach()).all()):
        raise ValueError(f"sample_selection: the loss {name!r} returns the model's own loss (output.loss: labels in "
                         "the batch?), the mean over the batch, so every sample gets the same loss; compute the loss "
                         "from the logits in loss_fn, and pass the targets to the step rather than in the batch")
