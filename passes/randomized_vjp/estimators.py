"""Randomized unbiased VJPs: structured sampling estimators for the GEMMs of backprop.

A linear layer ``Y = X Wᵀ + b`` (``X``: M×K, ``W``: N×K, ``G = ∂L/∂Y``: M×N) needs two
products in backward, both sums of rank-one contributions over a contraction dimension:

* ``grad_W = Gᵀ X = Σ_t g_t x_tᵀ``               (over the M rows t; ``‖c_t‖ = ‖g_t‖·‖x_t‖``)
* ``grad_X = G W  = Σ_j G[:, j] W[j, :]``         (over the N output features j;
  ``‖c_j‖ = ‖G[:, j]‖·‖W[j, :]‖``)

An estimator keeps a *static* number ``k`` of contraction indices, one shared set ``S`` for the
whole GEMM (gather → a smaller dense GEMM, never element-wise masks), and reweights them by the
Horvitz–Thompson factor ``1/π_i`` (``π_i = P(i ∈ S)``), so ``E[Σ_{i∈S} c_i/π_i] = Σ_i c_i``:

* ``uniform``    – simple random sampling without replacement (SRSWOR), ``π_i = k/n``.
* ``importance`` – water-filled probabilities ``π_i = min(1, s_i/τ)`` with ``Σπ = k``
  (``s_i = ‖c_i‖``), mixed with uniform, ``π ← (1−ε)π + ε·k/n``, so ``1/π ≤ n/(εk)``; drawn with
  randomized systematic PPS sampling, which takes exactly ``k`` distinct indices with inclusion
  probabilities exactly ``π``.
* ``sketch``     – (``grad_W`` only) ``Gᵀ S Sᵀ X`` with ``S`` an M×k Rademacher matrix / √k, so
  ``E[S Sᵀ] = I``; cost ``M·k·(N+K)``.

``center=True`` (the pass's default) adds a control variate, the layer input's batch mean ``x̄``,
to the ``grad_W`` estimators: ``Gᵀ X = Σ_t g_t (x_t − x̄)ᵀ + (Σ_t g_t)·x̄ᵀ`` exactly, so sampling
the first sum and adding the rank-one second term exactly is still unbiased, and the variance
counts ``‖g_t‖²‖x_t − x̄‖²`` instead of ``‖g_t‖²‖x_t‖²``.  Inputs share a mean whenever they come
out of a ReLU/GELU, and a layer followed by a train-mode BatchNorm has ``Σ_t g_t = 0``: the plain
terms' common part ``g_t x̄ᵀ`` then sums to exactly zero, yet dominates their variance (measured
on the mnist5k CNN at keep 0.25, ``python -m benchmarks randomized_vjp variance``: 34–36× the SGD
noise in the deeper convolutions, 3.4–4.6× centred).  Only the input is centred: gradients are
often row-sparse late in training (few rows with a large loss), and centring them spreads that mass
over every row (measured on the digits ViT: up to 2× the variance).  The mean term rides along as
one extra row (``cat``) of the same GEMM.

Everything runs on the device: no ``.item()``, no Python branching on tensor values, output
shapes depend only on ``(n, k)``, so ``torch.compile`` never recompiles for new values.  The
sampler is the custom op ``torch.ops.effcompile.sample_indices`` (see :func:`sample_indices`) so
graph passes can insert it into FX graphs; it draws from torch's global RNG (reproducible under
``torch.manual_seed``).  Its CPU kernel runs the same algorithm in NumPy on the same random draws:
the sampler is ~50 small array operations, which cost ~5 µs each through torch's dispatcher and
~1 µs in NumPy (there is no device to keep the work on).  The sketch's Rademacher matrix is the custom op
``torch.ops.effcompile.rademacher`` for the same reason.

Under torch.distributed every rank draws from its own stream (``effcompile.distributed.rank_generator``,
seeded from the global RNG and the rank): data-parallel ranks are seeded alike, and identical
draws on every rank would leave the all-reduced gradient with one rank's variance instead of
1/D of it.  Each rank's estimate stays unbiased, so their average is too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from effcompile._compat import is_compiling, view_untracked
from effcompile.distributed import rank_generator

__all__ = [
    "ESTIMATORS", "SAMPLING_ESTIMATORS", "round_budget", "inclusion_probabilities", "sample_indices",
    "sample_indices_op", "sketched_grad_weight", "sketched_grad_input", "horvitz_thompson_variance",
    "analytic_variance_grad_weight", "analytic_variance_grad_input", "SketchedLinear", "sketched_linear",
    "SketchedConv", "sketched_conv", "sketch_statistics", "statistics_slot", "MemorySketchedLinear",
    "memory_sketched_linear", "apply_like_autocast",
]

SAMPLING_ESTIMATORS = ("uniform", "importance")  # index-sampling designs (sample_indices)
ESTIMATORS = SAMPLING_ESTIMATORS + ("sketch",)


# --------------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------------


def round_budget(n: int, keep: float, multiple: int) -> int:
    """Static sample size: ``round(keep·n)`` rounded up to a multiple of ``multiple``, in ``[1, n]``.

    Rounding up to a multiple keeps the smaller GEMM tile-friendly (8 on CPU, 64 on GPU); ``k ≥ n``
    (e.g. ``keep ≥ 1``) means "exact".  Plain Python ints: ``k`` is baked into the graph.
    """
    n, multiple = int(n), int(multiple)
    if n < 1:
        raise ValueError(f"round_budget: n must be >= 1, got {n}")
    if multiple < 1:
        raise ValueError(f"round_budget: multiple must be >= 1, got {multiple}")
    if not (keep > 0 and math.isfinite(keep)):
        raise ValueError(f"round_budget: keep must be a finite number > 0, got {keep}")
    if keep >= 1:
        return n
    k = max(1, math.floor(keep * n + 0.5))  # round half up (Python's round() is banker's)
    k = -(-k // multiple) * multiple
    return min(k, n)


def _check_estimator(estimator: str, allowed: Sequence[str]) -> None:
    if estimator not in allowed:
        raise ValueError(f"estimator must be one of {tuple(allowed)}, got {estimator!r}")


def _check_k(k: int) -> None:
    if isinstance(k, torch.SymInt):  # traced with dynamic shapes: k is an expression of n
        torch._check(k >= 1, lambda: f"k must be >= 1, got {k}")
        return
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a Python int >= 1, got {k!r}")


def _check_mix(uniform_mix: float) -> None:
    if not 0.0 <= uniform_mix <= 1.0:
        raise ValueError(f"uniform_mix must be in [0, 1], got {uniform_mix}")


# --------------------------------------------------------------------------------------------
# Inclusion probabilities
# --------------------------------------------------------------------------------------------


def _water_filling(scores: Tensor, k: int) -> Tensor:
    """Minimum-variance inclusion probabilities ``π_i = min(1, s_i/τ)`` with ``Σπ = k`` (float64).

    Minimising the Poisson variance ``Σ (1/π_i − 1) s_i²`` under ``Σπ = k``, ``π ≤ 1`` gives
    ``π ∝ s`` except that the largest scores are capped at 1.  With scores sorted descending and
    ``T_m = Σ_{j≥m} s_(j)``, capping the top ``m`` leaves ``π_(j) = (k−m)·s_(j)/T_m``; the right
    ``m`` is the first one with ``(k−m)·s_(m) ≤ T_m`` (the condition is monotone in ``m`` and
    always holds at ``m = k−1``).  Only the top ``k`` can be capped, so only they are ordered
    (``topk``, not a sort of all ``n``: 3.5x cheaper at n = 8,320, k = n/4 on the CPU); then
    ``π = min(1, s·(k−m)/T_m)`` for every score, in index order.  Vectorised, no host sync.
    """
    n = scores.shape[0]
    s = scores.detach().to(torch.float64).clamp_min(0.0)
    total = s.sum()  # non-finite when any score is (NaN survives the clamp)
    top, top_index = torch.topk(s, k)
    # T_m for m < k: suffix sums of the top k plus the sum of the others, taken over exactly the
    # others (not total − Σtop) so it is exactly 0 when they are; suffix sums of nonnegative
    # numbers are monotone in floating point too, so the condition still holds at m = k−1.
    rest = s.index_fill(0, top_index, 0.0).sum()
    tail = top.flip(0).cumsum(0).flip(0) + rest
    room = torch.arange(k, 0, -1, device=s.device, dtype=torch.float64)  # k − m
    fits = room * top <= tail
    # First m that fits (argmax returns the first max); shape (1,) and gather, because indexing
    # with a 0-d tensor would read it on the host.
    capped = torch.argmax(fits.to(torch.uint8)).reshape(1)
    tail_sum = tail.gather(0, capped)
    budget = (k - capped).to(torch.float64)  # int64 / int64 would divide in float32
    # tail_sum = 0 means fewer than k nonzero scores, all capped: the zero-score rest share the
    # leftover budget evenly (the unused branch may hold inf/nan; where() discards it).
    pi = torch.where(tail_sum > 0, (s * (budget / tail_sum)).clamp_(max=1.0),
                     torch.where(s > 0, 1.0, budget / (n - capped)))
    # Non-finite scores (overflowed gradients) carry no usable information: fall back to uniform.
    return torch.where(torch.isfinite(total), pi, k / n)


def _inclusion_probabilities64(scores: Tensor, k: int, estimator: str, uniform_mix: float) -> Tensor:
    n = scores.shape[0]
    if estimator == "uniform" or k >= n:
        return torch.full((n,), min(k, n) / n, dtype=torch.float64, device=scores.device)
    pi = _water_filling(scores, k)
    if uniform_mix > 0:
        # A convex combination of two budgets summing to k still sums to k, stays <= 1, and
        # bounds the Horvitz-Thompson weights 1/π by n/(ε k).
        pi = (pi * (1.0 - uniform_mix)).add_(uniform_mix * (k / n)).clamp_(max=1.0)
    return pi


def inclusion_probabilities(scores: Tensor, k: int, estimator: str, uniform_mix: float = 0.1) -> Tensor:
    """Inclusion probabilities ``π`` (float32, shape ``(n,)``, ``Σπ = k``) of the design for ``scores``.

    ``uniform``: ``π_i = k/n``.  ``importance``: water-filling ``π_i = min(1, s_i/τ)`` (top
    scores capped at 1, the rest proportional to ``s_i``), then ``π ← (1−ε)π + ε·k/n`` with
    ``ε = uniform_mix``.  ``k ≥ n`` gives all ones (the exact path).  Non-finite scores fall back
    to uniform.  Computed in float64 on the scores' device (the sums must be accurate for large n).
    """
    _check_estimator(estimator, SAMPLING_ESTIMATORS)
    _check_k(k)
    _check_mix(uniform_mix)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    return _inclusion_probabilities64(scores, k, estimator, uniform_mix).to(torch.float32)


# --------------------------------------------------------------------------------------------
# Sampling (custom op)
# --------------------------------------------------------------------------------------------


def _systematic_pps(pi: Tensor, k: int) -> Tensor:
    """Randomized systematic PPS: exactly ``k`` distinct indices with ``P(i ∈ S) = π_i``.

    Lay the intervals ``[C_{i-1}, C_i)`` of lengths ``π_i`` (``Σπ = k``, ``π ≤ 1``) end to end in a
    random order and take the items hit by the points ``u, u+1, …, u+k−1`` (``u ~ U[0,1)``).  An
    interval of length ``π_i ≤ 1`` holds exactly one point with probability ``π_i`` and never two,
    so the sample has exactly k distinct items and inclusion probabilities exactly ``π``.  The
    random order only changes the joint inclusion probabilities (it removes the dependence on
    the index order of a fixed-order systematic sample).
    """
    n = pi.shape[0]
    generator = rank_generator(pi.device)
    perm = torch.randperm(n, device=pi.device, generator=generator)
    cum = pi[perm].cumsum(0)
    cum.mul_(k / cum[-1])  # pin the total at k: removes accumulated rounding drift
    u = torch.rand(1, dtype=torch.float64, device=pi.device, generator=generator)
    steps = torch.arange(k, device=pi.device)
    pos = torch.searchsorted(cum, steps + u, right=True)  # item whose interval holds u + j
    # In exact arithmetic pos is strictly increasing and pos[j] <= n-k+j.  Rounding can (with
    # probability ~k·2^-52, when u lands within an ulp of an interval end) break that; this
    # projection restores distinctness and range while being the identity otherwise.
    pos = torch.cummax(pos - steps, dim=0).values + steps
    pos = torch.minimum(pos, steps + (n - k))
    return perm[pos]


def _check_sample_arguments(scores: Tensor, k: int, estimator: str, uniform_mix: float) -> None:
    _check_estimator(estimator, SAMPLING_ESTIMATORS)
    _check_k(k)
    _check_mix(uniform_mix)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")


def _sample_indices_impl(scores: Tensor, k: int, estimator: str, uniform_mix: float) -> tuple[Tensor, Tensor]:
    _check_sample_arguments(scores, k, estimator, uniform_mix)
    n = scores.shape[0]
    device = scores.device
    if k >= n:  # exact path: every index once, weight 1
        return torch.arange(n, device=device), torch.ones(n, dtype=torch.float32, device=device)
    if estimator == "uniform":
        idx = torch.randperm(n, device=device, generator=rank_generator(device))[:k]
        idx = torch.sort(idx).values  # ascending rows gather with better locality
        return idx, torch.full((k,), n / k, dtype=torch.float32, device=device)
    pi = _inclusion_probabilities64(scores, k, estimator, uniform_mix)
    idx = torch.sort(_systematic_pps(pi, k)).values
    return idx, pi[idx].reciprocal().to(torch.float32)


def _water_filling_numpy(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`_water_filling` in NumPy (float64), by fixed-point iteration instead of ordering.

    With ``C`` the capped set, ``τ = (T − Σ_C s)/(k − |C|)`` and ``C ← C ∪ {s ≥ τ}`` until ``C``
    stops growing (Michelot's projection; ``τ`` only falls, so ``C`` only grows): a few O(n) passes
    where ordering the top ``k`` costs O(n log k).  A host loop, which the CPU kernel may run.
    """
    n = scores.shape[0]
    s = np.maximum(scores, 0.0, dtype=np.float64)  # NaN survives
    total = s.sum()
    if not np.isfinite(total):  # overflowed gradients carry no usable information: uniform
        return np.full(n, k / n)
    capped, count, rest = np.zeros(n, dtype=bool), 0, total
    while count < k and rest > 0:
        grown = capped | (s * (k - count) >= rest)  # s ≥ τ without dividing
        grown_count = int(np.count_nonzero(grown))
        if grown_count == count or grown_count >= k:
            break
        capped, count = grown, grown_count
        rest = s[~capped].sum()  # over exactly the uncapped: 0 exactly when they all are
    if rest > 0:
        return np.minimum(s * ((k - count) / rest), 1.0)
    return np.where(s > 0, 1.0, (k - count) / (n - count))  # fewer than k nonzero scores


def _as_numpy(scores: Tensor) -> np.ndarray:
    """The scores as a NumPy array, without a torch op where NumPy has the dtype (the water-filling
    widens to float64 itself): inside a compiled step each torch call here costs 30–100 µs of cold
    caches after the graph's GEMMs.  NumPy has no bf16."""
    scores = scores.detach()
    return scores.numpy() if scores.dtype in (torch.float32, torch.float64) else scores.to(torch.float64).numpy()


def _sample_indices_numpy(scores: Tensor, k: int, estimator: str, uniform_mix: float = 0.1,
                          site: str = "") -> tuple[Tensor, Tensor]:
    """The CPU kernel: :func:`_sample_indices_impl` in NumPy, with the same torch draws in the
    same order (one ``randperm(n)``, then for ``importance`` one float64 ``rand``), so both give
    the same sample from the same RNG state.  ``site``: see :func:`sample_indices_op`."""
    _check_sample_arguments(scores, k, estimator, uniform_mix)
    n = scores.shape[0]
    if k >= n:
        return torch.arange(n), torch.ones(n, dtype=torch.float32)
    generator = rank_generator(scores.device)
    perm = torch.randperm(n, generator=generator).numpy()
    if estimator == "uniform":
        return torch.from_numpy(np.sort(perm[:k])), torch.full((k,), n / k, dtype=torch.float32)
    pi = _water_filling_numpy(_as_numpy(scores), k)
    if uniform_mix > 0:
        pi = np.minimum(pi * (1.0 - uniform_mix) + uniform_mix * (k / n), 1.0)
    u = float(torch.rand(1, dtype=torch.float64, generator=generator))
    cum = np.cumsum(pi[perm])
    cum *= k / cum[-1]
    # The points u + j below each interval's end (j < k): an interval holds a point where that
    # count steps up.  O(n) where a search and a sort cost O(k log n); the same sample.
    below = np.clip(np.ceil(cum - u), 0, k)
    hit = np.diff(below, prepend=0.0) > 0
    if np.count_nonzero(hit) != k:  # a point within an ulp of an interval end: as _systematic_pps
        steps = np.arange(k)
        pos = np.searchsorted(cum, steps + u, side="right")
        hit = np.zeros(n, dtype=bool)
        hit[np.minimum(np.maximum.accumulate(pos - steps) + steps, steps + (n - k))] = True
    chosen = np.zeros(n, dtype=bool)
    chosen[perm[hit]] = True
    index = np.flatnonzero(chosen)  # ascending
    return torch.from_numpy(index), torch.from_numpy((1.0 / pi[index]).astype(np.float32))


@torch.library.custom_op(
    "effcompile::sample_indices", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def sample_indices_op(scores: Tensor, k: int, estimator: str, uniform_mix: float = 0.1,
                      site: str = "") -> tuple[Tensor, Tensor]:
    """``torch.ops.effcompile.sample_indices`` – see :func:`sample_indices`.

    ``site`` only names the call: graph passes give every draw they insert its own, because
    AOTAutograd's CSE merges identical calls of a custom op despite its ``nondeterministic_seeded``
    tag (torch 2.13), which would hand every layer of the same size one shared draw.
    """
    return _sample_indices_impl(scores, k, estimator, uniform_mix)


sample_indices_op.register_kernel("cpu")(_sample_indices_numpy)


@sample_indices_op.register_fake
def _sample_indices_fake(scores: Tensor, k: int, estimator: str, uniform_mix: float = 0.1,
                         site: str = "") -> tuple[Tensor, Tensor]:
    _check_estimator(estimator, SAMPLING_ESTIMATORS)
    _check_k(k)
    size = torch.sym_min(k, scores.shape[0])  # the exact path (k >= n) returns all n indices
    return (
        scores.new_empty((size,), dtype=torch.int64),
        scores.new_empty((size,), dtype=torch.float32),
    )


def _mark_outputs_constant(ctx, inputs, output):
    # Sampling is a stop-gradient step (like argmax): the indices and the weights 1/π are
    # constants of the draw, even when the scores require grad.
    ctx.mark_non_differentiable(*output)


def _no_gradient(ctx, grad_idx, grad_scale):
    return None, None, None, None, None


sample_indices_op.register_autograd(_no_gradient, setup_context=_mark_outputs_constant)


def sample_indices(scores: Tensor, k: int, estimator: str, uniform_mix: float = 0.1) -> tuple[Tensor, Tensor]:
    """Draw ``k`` distinct indices of ``range(n)`` and their Horvitz–Thompson weights ``1/π``.

    Returns ``(idx, scale)``: ``idx`` int64 ``(k,)`` ascending, ``scale`` float32 ``(k,)`` =
    ``1/π[idx]`` with ``π = inclusion_probabilities(scores, k, estimator, uniform_mix)``, so
    ``Σ_{i∈idx} scale_i·c_i`` is unbiased for ``Σ_i c_i``.  ``uniform`` is SRSWOR (scores only
    give ``n`` and the device); ``importance`` is randomized systematic PPS.  ``k ≥ n`` returns
    ``(arange(n), ones(n))``.  Draws from torch's global RNG on the scores' device.

    Traced (Dynamo, export, fake tensors), this is the op, which graphs need; in eager code it
    calls the op's kernel for the scores' device directly (the op's Python dispatch costs ~60 µs a
    call on the development CPU, more than the CPU kernel's own work at a few thousand rows).
    """
    if is_compiling() or type(scores) is not Tensor:
        return sample_indices_op(scores, k, estimator, uniform_mix)
    kernel = _sample_indices_numpy if scores.device.type == "cpu" else _sample_indices_impl
    return kernel(scores.detach(), k, estimator, uniform_mix)


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------


def _wide(a: Tensor) -> torch.dtype:
    """The accumulation dtype of a reduction over ``a``: fp32, or fp64 for an fp64 model."""
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def _row_norms(a: Tensor) -> Tensor:  # fp32 scores whatever the model's dtype
    return torch.linalg.vector_norm(a, dim=1, dtype=_wide(a)).float()


def _col_norms(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a, dim=0, dtype=_wide(a)).float()


# The centring's sums over the batch accumulate and are kept in fp32, then cast back: a bf16 model's
# (Σ_t g_t) is rounded once, not per partial sum, and the reduction differs from the bias gradient
# over the same g, which Inductor's CPU codegen (torch 2.11-2.14) would otherwise merge into one
# bf16 reduction with two stores that declares its converted accumulator twice (C++ compile error).
def _batch_sum(a: Tensor) -> Tensor:
    return a.sum(0, keepdim=True, dtype=_wide(a)).to(a.dtype)


def _batch_mean(a: Tensor) -> Tensor:
    return a.mean(0, keepdim=True, dtype=_wide(a)).to(a.dtype)


def _uniform_scores(n: int, like: Tensor) -> Tensor:
    # SRSWOR ignores the values; the op only needs n and the device, so skip the norms.
    return torch.zeros(n, dtype=torch.float32, device=like.device)


@torch.library.custom_op("effcompile::rademacher", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def rademacher_op(rows: int, cols: int, dtype: torch.dtype, device: torch.device, site: str = "") -> Tensor:
    """``torch.ops.effcompile.rademacher``: a rows×cols matrix of independent ±1 in ``dtype``.

    An op (not ``randint`` in the graph) so compiled graphs draw from the same per-rank stream
    as eager code; see the module docstring.  ``site`` names the call, as for
    :func:`sample_indices_op`.
    """
    signs = torch.randint(0, 2, (rows, cols), device=device, dtype=torch.int8, generator=rank_generator(device))
    return (signs * 2 - 1).to(dtype)


@rademacher_op.register_fake
def _rademacher_fake(rows: int, cols: int, dtype: torch.dtype, device: torch.device, site: str = "") -> Tensor:
    return torch.empty((rows, cols), dtype=dtype, device=device)


def _rademacher(rows: int, cols: int, like: Tensor) -> Tensor:
    return rademacher_op(rows, cols, like.dtype, like.device)


def sketched_grad_weight(grad_output_2d: Tensor, input_2d: Tensor, k: int, estimator: str,
                         uniform_mix: float = 0.1, center: bool = False) -> Tensor:
    """Unbiased estimate (N×K) of ``Gᵀ X``, sampling ``k`` of the M rows.

    ``uniform``/``importance``: ``Σ_{t∈S} (1/π_t) g_t x_tᵀ`` (scores ``‖g_t‖·‖x_t‖``) as one
    k-row GEMM ``(G[S]·(1/π_S))ᵀ X[S]``.  ``sketch``: ``(Gᵀ S)(Sᵀ X)`` with ``S`` M×k Rademacher/√k.
    ``center``: the same designs with the input rows centred, ``x_t − x̄``, plus the exact
    ``(Σ_t g_t)·x̄ᵀ`` (the sampling designs append it as row k+1 of the GEMM).  ``k ≥ M`` returns the
    exact product.
    """
    _check_estimator(estimator, ESTIMATORS)
    _check_k(k)
    g, x = grad_output_2d, input_2d
    m = g.shape[0]
    if k >= m:
        return g.t() @ x
    x_mean = _batch_mean(x) if center else None
    if estimator == "sketch":
        s = _rademacher(m, k, g)
        if not center:
            return ((g.t() @ s) @ (s.t() @ x)) / k  # E[S Sᵀ] = k·I before the 1/k
        # Sᵀ(X − 1x̄) = SᵀX − (Sᵀ1)·x̄: no centred copy of X.
        right = s.t() @ x - s.sum(0).unsqueeze(1) @ x_mean
        return torch.addmm(_batch_sum(g).t() @ x_mean, g.t() @ s, right, alpha=1.0 / k)
    scores = (_uniform_scores(m, g) if estimator == "uniform"
              else _row_norms(g) * _row_norms(x - x_mean if center else x))
    idx, scale = sample_indices(scores, k, estimator, uniform_mix)
    g_rows, x_rows = g[idx] * scale.to(g.dtype).unsqueeze(1), x[idx]
    if center:  # the exact (Σ_t g_t)·x̄ᵀ as row k+1
        g_rows, x_rows = torch.cat([g_rows, _batch_sum(g)]), torch.cat([x_rows - x_mean, x_mean])
    return g_rows.t() @ x_rows


def sketched_grad_input(grad_output_2d: Tensor, weight: Tensor, k: int, estimator: str,
                        uniform_mix: float = 0.1) -> Tensor:
    """Unbiased estimate (M×K) of ``G W``, sampling ``k`` of the N output features.

    ``Σ_{j∈S} (1/π_j) G[:, j] W[j, :]`` (scores ``‖G[:, j]‖·‖W[j, :]‖``) as one GEMM
    ``(G[:, S]·(1/π_S)) W[S]``.  ``k ≥ N`` returns the exact product.
    """
    _check_estimator(estimator, SAMPLING_ESTIMATORS)
    _check_k(k)
    g, w = grad_output_2d, weight
    n = g.shape[1]
    if k >= n:
        return g @ w
    scores = _uniform_scores(n, g) if estimator == "uniform" else _col_norms(g) * _row_norms(w)
    idx, scale = sample_indices(scores, k, estimator, uniform_mix)
    return (g[:, idx] * scale.to(g.dtype)) @ w[idx]


# --------------------------------------------------------------------------------------------
# Analytic variance
# --------------------------------------------------------------------------------------------


def _sq_norms(a: Tensor, dim: int) -> Tensor:
    """Squared row/column norms in float64, without a float64 copy of ``a``."""
    norms = torch.linalg.vector_norm(a, dim=dim, dtype=torch.promote_types(a.dtype, torch.float32))
    return norms.double().square()


def horvitz_thompson_variance(pi: Tensor, sq_norms: Tensor, weighted_sum_sq_norm: Tensor | None = None) -> Tensor:
    """Total (Frobenius) variance of ``Σ_{i∈S} c_i/π_i`` for a fixed-size design, as a 0-d float32.

    With ``b_i = π_i(1−π_i)`` and ``D = Σ_i (1−π_i) c_i`` (``weighted_sum_sq_norm = ‖D‖²``)::

        V = n/(n−1) · [ Σ_i (1/π_i − 1)·‖c_i‖²  −  ‖D‖² / Σ_i b_i ]

    This is Hájek's variance for fixed-size designs, ``n/(n−1)·Σ b_i ‖c_i/π_i − A‖²`` with
    ``A = Σ b_i c_i/π_i / Σ b_i``, expanded.  It is **exact for SRSWOR** (``π = k/n`` gives
    ``(n²/k)(1−k/n)·S²``, ``S² = Σ‖c_i − c̄‖²/(n−1)``) and the standard high-entropy approximation
    for randomized systematic PPS, which has no closed form (its joint inclusion probabilities
    depend on the random order).  The first term alone is the Poisson (independent Bernoulli)
    variance; ``weighted_sum_sq_norm=None`` returns just that: it needs only the scores (O(n), no
    GEMM) and overestimates the fixed-size variance (by the ``‖D‖²`` term, up to n/(n−1)).
    Indices with ``π = 0`` have ``c = 0`` by construction and contribute nothing.
    """
    pi = pi.to(torch.float64)
    sq = sq_norms.to(torch.float64)
    n = pi.shape[0]
    positive = pi > 0
    poisson = torch.where(positive, (1.0 / torch.where(positive, pi, 1.0) - 1.0) * sq, 0.0).sum()
    if weighted_sum_sq_norm is None:
        return poisson.to(torch.float32)
    if n < 2:
        return torch.zeros((), dtype=torch.float32, device=pi.device)
    b = (pi * (1.0 - pi)).sum()
    correction = weighted_sum_sq_norm.to(torch.float64) / b.clamp_min(torch.finfo(torch.float64).tiny)
    hajek = n / (n - 1) * (poisson - correction)
    # Σb = 0 means every π is 0 or 1: the estimate is deterministic.
    return torch.where(b > 0, hajek.clamp_min(0.0), 0.0).to(torch.float32)


def analytic_variance_grad_weight(grad_output_2d: Tensor, input_2d: Tensor, k: int, estimator: str,
                                  uniform_mix: float = 0.1, *, cheap: bool = False,
                                  sketch_kind: str = "rademacher", center: bool = False) -> Tensor:
    """Total variance ``E‖Ĝ_W − Gᵀ X‖_F²`` of :func:`sketched_grad_weight` (0-d float32).

    ``uniform``: exact (:func:`horvitz_thompson_variance` with ``π = k/n``).  ``importance``:
    Hájek's approximation for the systematic PPS design actually drawn (no closed form exists).
    ``sketch`` with ``r = k`` columns, exact: ``(‖G‖²‖X‖² + ‖Gᵀ X‖² − 2 Σ_t ‖g_t‖²‖x_t‖²) / r`` for
    Rademacher/√r entries (what :func:`sketched_grad_weight` draws), and without the last term
    for ``sketch_kind="gaussian"`` (i.i.d. N(0, 1/r) entries; the fourth moment 3 instead of 1
    costs the extra ``2 Σ_t ‖g_t‖²‖x_t‖²``).  ``k ≥ M``: 0.

    ``cheap=True`` skips the one full-size GEMM (the ``‖D‖²`` / ``‖GᵀX‖²`` term) and returns an
    upper bound from row norms only: the Poisson variance for the sampling designs, and
    ``‖GᵀX‖² ≤ ‖G‖²‖X‖²`` for the sketch.  Use it for per-step reporting; the default costs as much
    as the exact gradient.  ``center``: the variance of the ``center=True`` estimator (the same
    formulas with the input rows centred, ``x_t − x̄``).
    """
    _check_estimator(estimator, ESTIMATORS)
    _check_k(k)
    g, x = grad_output_2d.detach(), input_2d.detach()
    m = g.shape[0]
    if k >= m:
        return torch.zeros((), dtype=torch.float32, device=g.device)
    if center:  # the exact mean term adds no variance: the estimator samples the centred input rows
        x = x - x.mean(0, keepdim=True)
    g_sq, x_sq = _sq_norms(g, 1), _sq_norms(x, 1)
    sq = g_sq * x_sq  # ‖g_t x_tᵀ‖² = ‖g_t‖²‖x_t‖²
    if estimator == "sketch":
        g2, x2 = g_sq.sum(), x_sq.sum()
        if sketch_kind not in ("rademacher", "gaussian"):
            raise ValueError(f"sketch_kind must be 'rademacher' or 'gaussian', got {sketch_kind!r}")
        cross = g2 * x2 if cheap else (g.double().t() @ x.double()).square().sum()
        diagonal = 2.0 * sq.sum() if sketch_kind == "rademacher" else 0.0
        return ((g2 * x2 + cross - diagonal) / k).to(torch.float32)
    pi = _inclusion_probabilities64(sq.sqrt(), k, estimator, uniform_mix)
    if cheap:
        return horvitz_thompson_variance(pi, sq)
    # float64: the Hájek bracket is a difference of two large terms when contributions align.
    d = (g.double() * (1.0 - pi).unsqueeze(1)).t() @ x.double()  # D = Σ_t (1−π_t) g_t x_tᵀ
    return horvitz_thompson_variance(pi, sq, d.square().sum())


def analytic_variance_grad_input(grad_output_2d: Tensor, weight: Tensor, k: int, estimator: str,
                                 uniform_mix: float = 0.1, *, cheap: bool = False) -> Tensor:
    """Total variance ``E‖Ĝ_X − G W‖_F²`` of :func:`sketched_grad_input` (0-d float32).

    Contributions ``c_j = G[:, j] W[j, :]`` with ``‖c_j‖² = ‖G[:, j]‖²‖W[j, :]‖²``; otherwise as
    :func:`analytic_variance_grad_weight` (exact for ``uniform``, Hájek approximation for
    ``importance``, ``cheap=True`` → Poisson upper bound without the full GEMM).
    """
    _check_estimator(estimator, SAMPLING_ESTIMATORS)
    _check_k(k)
    g, w = grad_output_2d.detach(), weight.detach()
    n = g.shape[1]
    if k >= n:
        return torch.zeros((), dtype=torch.float32, device=g.device)
    sq = _sq_norms(g, 0) * _sq_norms(w, 1)  # ‖G[:, j] W[j, :]‖² = ‖G[:, j]‖²‖W[j, :]‖²
    pi = _inclusion_probabilities64(sq.sqrt(), k, estimator, uniform_mix)
    if cheap:
        return horvitz_thompson_variance(pi, sq)
    d = (g.double() * (1.0 - pi)) @ w.double()  # D = Σ_j (1−π_j) G[:, j] W[j, :]
    return horvitz_thompson_variance(pi, sq, d.square().sum())


# --------------------------------------------------------------------------------------------
# Eager autograd path: linear
# --------------------------------------------------------------------------------------------


def _budget_or_none(n: int, keep: float | None, multiple: int) -> int | None:
    """``k`` for a keep fraction, or ``None`` for the exact product (keep None, ≥ 1, or k = n)."""
    if keep is None or keep >= 1:
        return None
    k = round_budget(n, keep, multiple)
    return None if k >= n else k


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` as a custom Function's output that the caller may modify in place.  For an input
    of 3 or more dims ``F.linear`` returns a view of its 2-D product, and autograd forbids in-place
    ops on a view made inside a Function's forward (Swin-v2's ``Linear → ReLU(inplace=True)``
    raised); the product reshaped untracked is the same tensor without that restriction."""
    if input.dim() <= 2:
        return F.linear(input, weight, bias)
    product = F.linear(input.reshape(-1, input.shape[-1]), weight, bias)
    return view_untracked(product, (*input.shape[:-1], product.shape[-1]))


class SketchedLinear(torch.autograd.Function):
    """``F.linear`` forward; backward with sampled ``grad_input`` / ``grad_weight``, exact ``grad_bias``.

    ``keep_weight`` samples ``k = round_budget(M, keep_weight, multiple)`` of the M = prod(leading
    dims) rows for ``grad_weight``; ``keep_input`` samples ``round_budget(N, keep_input, multiple)``
    of the N output features for ``grad_input``.  ``None`` or ``≥ 1`` means exact.  ``center``: the
    ``grad_weight`` estimate samples centred rows (:func:`sketched_grad_weight`).  RNG order in
    backward: the ``grad_weight`` draw first, then ``grad_input``.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, keep_weight, keep_input, estimator, uniform_mix, multiple, statistics=None,
                ladder=(), center=False):
        # Out-of-place only: an in-place op in forward gives silently wrong gradients under
        # torch.compile on torch 2.11.
        _check_estimator(estimator, ESTIMATORS)
        if estimator == "sketch" and keep_input is not None and keep_input < 1:
            raise ValueError("the 'sketch' estimator applies to grad_weight only; use keep_input=None")
        if statistics is not None and estimator == "sketch":
            raise ValueError("adaptive statistics need a sampling estimator ('importance' or 'uniform')")
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        ctx.config = (keep_weight, keep_input, estimator, uniform_mix, multiple, bool(center))
        ctx.adaptive = (statistics is not None, tuple(ladder))
        return _linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        keep_weight, keep_input, estimator, uniform_mix, multiple, center = ctx.config
        g = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = statistics = None
        if ctx.needs_input_grad[1]:
            x = input.reshape(-1, input.shape[-1])
            k = _budget_or_none(g.shape[0], keep_weight, multiple)
            grad_weight = g.t() @ x if k is None else sketched_grad_weight(g, x, k, estimator, uniform_mix, center)
            has_statistics, ladder = ctx.adaptive
            if has_statistics and ctx.needs_input_grad[8]:
                # The statistics leave the backward as the gradient of the statistics tensor.
                statistics = _adaptive_statistics(g, x, grad_weight, (None, ladder, multiple), k or g.shape[0],
                                                  estimator, uniform_mix, center)
        if ctx.needs_input_grad[0]:
            k = _budget_or_none(g.shape[1], keep_input, multiple)
            grad_x = g @ weight if k is None else sketched_grad_input(g, weight, k, estimator, uniform_mix)
            grad_input = grad_x.reshape(input.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, statistics, None, None


def apply_like_autocast(function: type, tensors: Sequence[Tensor | None], *args) -> Tensor:
    """``function.apply(*tensors, *args)`` the way autocast runs a linear or a convolution.

    Under autocast ``F.linear``/``F.conv*`` cast their input, weight and bias to the autocast dtype;
    a custom autograd function is not covered, so without this its forward would mix dtypes (a
    bf16 fused weight against an fp32 input) and its backward would return gradients in the wrong
    dtype.  The cast happens outside the function, so autograd casts the gradients back to each
    tensor's own dtype; ``args`` (e.g. fp32 statistics) are left alone.
    """
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return function.apply(*tensors, *args)
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]
    with torch.autocast(device_type, enabled=False):
        return function.apply(*cast, *args)


def sketched_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, keep_weight: float | None = None,
                    keep_input: float | None = None, estimator: str = "importance", uniform_mix: float = 0.1,
                    multiple: int = 8, center: bool = False) -> Tensor:
    """``F.linear(input, weight, bias)`` whose backward uses :class:`SketchedLinear`."""
    return apply_like_autocast(SketchedLinear, (input, weight, bias), keep_weight, keep_input, estimator, uniform_mix,
                               multiple, None, (), center)


# --------------------------------------------------------------------------------------------
# Eager autograd path: convolution (grad_weight sampled along the batch)
# --------------------------------------------------------------------------------------------


def _tuple(value, dims: int) -> list[int]:
    if isinstance(value, int):
        return [value] * dims
    value = [int(v) for v in value]
    if len(value) != dims:
        raise ValueError(f"expected {dims} values, got {value}")
    return value


def _per_image_norms(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a.reshape(a.shape[0], -1), dim=1, dtype=_wide(a)).float()


def _conv_weight_grad(grad_output: Tensor, input: Tensor, weight: Tensor, conv_args: tuple) -> Tensor:
    stride, padding, dilation, groups = conv_args
    zeros = [0] * len(stride)
    # The weight-gradient kernels (cuDNN, oneDNN) need grad_output in the input's dtype.  On an H200
    # (torch 2.11, bf16 autocast, ResNet-18) a layer's gradient arrived in fp32 against a bf16 input;
    # the exact input gradient accepts that mix, the weight gradient does not.
    return torch.ops.aten.convolution_backward(
        grad_output.to(input.dtype), input, weight, None, stride, padding, dilation, False, zeros, groups,
        [False, True, False],
    )[1]


def _sketched_conv_grad_weight(g: Tensor, x: Tensor, weight: Tensor, conv_args: tuple, k: int,
                               estimator: str, uniform_mix: float, center: bool = False) -> Tensor:
    """Unbiased estimate of the conv weight gradient ``Σ_b ∇W(g_b, x_b)`` from ``k`` images.

    Sampling: ``Σ_{b∈S} (1/π_b) ∇W(g_b, x_b)`` (scores ``‖g_b‖·‖x_b‖``), one
    ``convolution_backward`` on the gathered sub-batch with ``g`` pre-scaled per image (the weight
    gradient is linear in ``g``).  ``sketch``: the weight gradient is bilinear in (g, x), so mixing
    images with a B×k Rademacher/√k matrix ``S`` gives ``Σ_{b,b'} (S Sᵀ)_{bb'} ∇W(g_b, x_{b'})``
    with mean ``Σ_b ∇W(g_b, x_b)``.  ``center``: ∇W is bilinear, so
    ``Σ_b ∇W(g_b, x_b) = Σ_b ∇W(g_b, x_b − x̄) + ∇W(Σ_b g_b, x̄)``; the designs run on the centred
    input images and the mean pair joins the same call as image k+1.
    """
    batch = g.shape[0]
    x_mean = _batch_mean(x) if center else None
    if estimator == "sketch":
        s = _rademacher(batch, k, g)
        g_sub = torch.tensordot(s.t(), g, dims=1) / k
        x_sub = torch.tensordot(s.t().to(x.dtype), x if x_mean is None else x - x_mean, dims=1)
    else:
        scores = (_uniform_scores(batch, g) if estimator == "uniform"
                  else _per_image_norms(g) * _per_image_norms(x if x_mean is None else x - x_mean))
        idx, scale = sample_indices(scores, k, estimator, uniform_mix)
        g_sub, x_sub = g[idx] * scale.to(g.dtype).reshape((-1,) + (1,) * (g.dim() - 1)), x[idx]
        if center:  # only the sampled images are centred
            x_sub = x_sub - x_mean
    if center:
        g_sub, x_sub = torch.cat([g_sub, _batch_sum(g)]), torch.cat([x_sub, x_mean])
    return _conv_weight_grad(g_sub, x_sub, weight, conv_args)


class SketchedConv(torch.autograd.Function):
    """Convolution forward; backward with ``grad_weight`` sampled over the batch (images).

    ``k = round_budget(B, keep_weight, multiple)`` images; exact ``grad_input`` and ``grad_bias``.
    Any spatial rank (1d/2d/3d), batched input ``(B, C, *spatial)``, no transposed convolution.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, keep_weight, estimator,
                uniform_mix, multiple, center=False):
        _check_estimator(estimator, ESTIMATORS)
        dims = weight.dim() - 2
        if input.dim() != dims + 2:
            raise ValueError(f"SketchedConv needs a batched input of rank {dims + 2}, got {input.dim()}")
        conv_args = (_tuple(stride, dims), _tuple(padding, dims), _tuple(dilation, dims), int(groups))
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        ctx.config = (conv_args, keep_weight, estimator, uniform_mix, multiple, bool(center))
        stride_, padding_, dilation_, groups_ = conv_args
        return torch.convolution(input, weight, bias, stride_, padding_, dilation_, False, [0] * dims, groups_)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        conv_args, keep_weight, estimator, uniform_mix, multiple, center = ctx.config
        stride, padding, dilation, groups = conv_args
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and ctx.has_bias
        k = _budget_or_none(input.shape[0], keep_weight, multiple) if need_weight else None
        exact_weight = need_weight and k is None
        grad_input = grad_weight = None
        if need_input or exact_weight:
            grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_output, input, weight, None, stride, padding, dilation, False, [0] * len(stride), groups,
                [need_input, exact_weight, False],
            )
        if need_weight and k is not None:
            grad_weight = _sketched_conv_grad_weight(grad_output, input, weight, conv_args, k, estimator, uniform_mix,
                                                     center)
        grad_bias = grad_output.sum(dim=[d for d in range(grad_output.dim()) if d != 1]) if need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


def sketched_conv(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                  groups: int = 1, *, keep_weight: float | None = None, estimator: str = "importance",
                  uniform_mix: float = 0.1, multiple: int = 8, center: bool = False) -> Tensor:
    """``torch.convolution(...)`` (like ``F.conv{1,2,3}d``, integer padding) with :class:`SketchedConv` backward."""
    return apply_like_autocast(SketchedConv, (input, weight, bias), stride, padding, dilation, groups, keep_weight,
                               estimator, uniform_mix, multiple, center)


# --------------------------------------------------------------------------------------------
# Variance control (adaptive keep): per-step statistics on the device
# --------------------------------------------------------------------------------------------


def _statistics_impl(grad_output_2d: Tensor, input_2d: Tensor, grad_weight: Tensor, ks: list[int], current_k: int,
                     estimator: str, uniform_mix: float, center: bool) -> Tensor:
    g, x = grad_output_2d.detach(), input_2d.detach()
    m = g.shape[0]
    sq = _sq_norms(g, 1) * _sq_norms(x, 1)  # ‖c_t‖² = ‖g_t‖²‖x_t‖², c_t = g_t x_tᵀ
    # The sampled terms: the centred rows' when the estimator centres (its mean term is exact).
    sampled_sq = _sq_norms(g, 1) * _sq_norms(x - x.mean(0, keepdim=True), 1) if center else sq
    scores = sampled_sq.sqrt()

    def added(k: int) -> Tensor:  # Poisson bound Σ(1/π_t − 1)‖c_t‖² (≥ the fixed-size variance)
        if k >= m:
            return torch.zeros((), dtype=torch.float64, device=g.device)
        pi = _inclusion_probabilities64(scores, k, estimator, uniform_mix)
        return horvitz_thompson_variance(pi, sampled_sq).double()

    ladder = [added(k) for k in ks]
    # ‖ĝ‖² of the exact gradient from the estimate actually used: E‖ĝ_S‖² = ‖ĝ‖² + V_S.
    exact_sq = (grad_weight.detach().double().square().sum() - added(current_k)).clamp_min(0.0)
    # Rows as i.i.d. draws u_t = M·c_t with mean ĝ: Var(ĝ) = Var(u)/M ≈ M/(M−1)·(Σ‖c_t‖² − ‖ĝ‖²/M).
    sgd = (sq.sum() - exact_sq / m).clamp_min(0.0) * (m / max(m - 1, 1))
    return torch.stack(ladder + [sgd]).to(torch.float32)


@torch.library.custom_op("effcompile::sketch_statistics", mutates_args=())
def sketch_statistics(grad_output_2d: Tensor, input_2d: Tensor, grad_weight: Tensor, ks: list[int], current_k: int,
                      estimator: str, uniform_mix: float, center: bool = False) -> Tensor:
    """Per-step statistics of one linear layer's weight gradient (float32, shape ``(len(ks)+1,)``).

    Entry ``r < len(ks)``: the added variance ``Σ_t (1/π_t − 1)·‖g_t‖²‖x_t‖²`` of the row-sampling
    estimator with ``k = ks[r]`` (the Poisson bound of :func:`horvitz_thompson_variance`, from row
    norms only; 0 when ``k ≥ M``; with ``center``, of ``‖g_t‖²‖x_t − x̄‖²``, the terms the
    centred estimator samples).  Last entry: the SGD noise of the minibatch gradient
    ``ĝ = Σ_t c_t`` treating the M rows as i.i.d. draws ``u_t = M·c_t``::

        V_sgd = Var(ĝ) ≈ σ̂²/M = M/(M−1) · (Σ_t ‖c_t‖² − ‖ĝ‖²/M),   ‖c_t‖ = ‖g_t‖·‖x_t‖

    with ``‖ĝ‖²`` taken from ``grad_weight`` (the estimate the step used, ``k = current_k``
    rows) minus its own added variance.  Within-sample rows (tokens) are positively correlated
    in practice, so the per-row noise underestimates the per-sample SGD noise: the rule that
    compares the two is conservative (keeps more rows).  Everything stays on the device.
    """
    _check_estimator(estimator, SAMPLING_ESTIMATORS)
    return _statistics_impl(grad_output_2d, input_2d, grad_weight, ks, current_k, estimator, uniform_mix, center)


@sketch_statistics.register_fake
def _(grad_output_2d, input_2d, grad_weight, ks, current_k, estimator, uniform_mix, center=False):
    return grad_output_2d.new_empty((len(ks) + 1,), dtype=torch.float32)


@torch.library.custom_op("effcompile::statistics_slot", mutates_args=())
def statistics_slot(statistics: Tensor, layer: str) -> Tensor:
    """Zeros shaped like ``statistics``: the gradient a marked layer's statistics tensor gets
    before the joint-graph pass replaces it by :func:`sketch_statistics` (the statistics leave
    the backward as the *gradient* of a per-layer tensor; a hook folds them into EMAs)."""
    return torch.zeros_like(statistics)


@statistics_slot.register_fake
def _(statistics, layer):
    return torch.empty_like(statistics)


def _adaptive_statistics(g: Tensor, x: Tensor, grad_weight: Tensor, adaptive, current_k: int, estimator: str,
                         uniform_mix: float, center: bool = False) -> Tensor:
    """Eager twin of the joint pass: ``adaptive = (statistics tensor, ladder keeps, multiple)``."""
    _, ladder, multiple = adaptive
    ks = [round_budget(g.shape[0], keep, multiple) for keep in ladder]
    return sketch_statistics(g, x, grad_weight, ks, current_k, estimator, uniform_mix, center)


# --------------------------------------------------------------------------------------------
# Memory mode: grad_weight rows chosen in the forward, only those input rows saved
# --------------------------------------------------------------------------------------------


class MemorySketchedLinear(torch.autograd.Function):
    """``F.linear`` whose backward needs only ``k`` rows of the input (WTA-CRS-style memory mode).

    Forward: scores ``s_t = ‖x_t‖ · ḡ_{p(t)}`` (``ḡ_p``: EMA over past steps of the mean
    ‖g_t‖ at token position ``p``; all ones before the first backward), draw ``k`` rows with
    inclusion probabilities ``π`` (:func:`sample_indices`), save ``X[idx]`` (k×K), ``idx`` and
    ``1/π[idx]`` instead of X (M×K).  Backward: ``grad_W = (G[idx]·(1/π))ᵀ X[idx]``, exact
    ``grad_X = G W`` and ``grad_b``.  Unbiased: the draw depends on X and on past gradients only,
    not on this step's randomness, so ``E[Σ_{t∈S} c_t/π_t | π] = Σ_t c_t`` for every ``π``.
    The gradient of ``position_grad_norms`` is this step's per-position mean ‖g_t‖ (a hook of
    the pass folds it into the EMA).  ``center``: the input rows are centred (``x_t − x̄`` in the
    scores and the saved rows) and the exact ``(Σ_t g_t)·x̄ᵀ`` joins the GEMM as one more row; ``x̄``
    (K numbers) is saved too.  No in-place op in
    ``forward`` (torch 2.11 compile bug).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, position_grad_norms, k, estimator, uniform_mix, center=False):
        x = input.reshape(-1, input.shape[-1])
        positions = position_grad_norms.shape[0]
        if x.shape[0] % positions:
            raise ValueError(f"memory mode: {x.shape[0]} input rows do not split into {positions} token positions "
                             "(the token count changed since transform)")
        x_mean = _batch_mean(x) if center else None
        scored = x - x_mean if center else x
        position_scale = position_grad_norms.detach().to(torch.float32).repeat(x.shape[0] // positions)
        idx, scale = sample_indices(_row_norms(scored) * position_scale, min(k, x.shape[0]), estimator, uniform_mix)
        ctx.save_for_backward(scored.index_select(0, idx), x_mean, idx, scale, weight)
        ctx.input_shape = input.shape
        ctx.positions = positions
        ctx.has_bias = bias is not None
        ctx.center = bool(center)
        return _linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input_rows, x_mean, idx, scale, weight = ctx.saved_tensors
        g = grad_output.reshape(-1, grad_output.shape[-1])
        g_rows = g.index_select(0, idx) * scale.to(g.dtype).unsqueeze(1)
        if ctx.center:
            g_rows, input_rows = torch.cat([g_rows, _batch_sum(g)]), torch.cat([input_rows, x_mean])
        grad_weight = g_rows.t() @ input_rows
        grad_input = (g @ weight).reshape(ctx.input_shape) if ctx.needs_input_grad[0] else None
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        position_norms = _row_norms(g).reshape(-1, ctx.positions).mean(0)
        return grad_input, grad_weight, grad_bias, position_norms, None, None, None, None


def memory_sketched_linear(input: Tensor, weight: Tensor, bias: Tensor | None, position_grad_norms: Tensor, k: int,
                           estimator: str = "importance", uniform_mix: float = 0.1, center: bool = False) -> Tensor:
    """``F.linear`` with :class:`MemorySketchedLinear` backward (``k`` rows saved and used for ``grad_W``)."""
    return apply_like_autocast(MemorySketchedLinear, (input, weight, bias), position_grad_norms, k, estimator,
                               uniform_mix, center)
