"""Specification of the selectors (effcompile/selection.py).

Statistical claims are Monte-Carlo z-tests; the gradient-matching kernel and weights are checked
against explicitly materialised per-sample gradients and scipy's NNLS.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effcompile.config import config_from_dict
from effcompile.passes import SampleSelection
from effcompile.passes.sample_selection.selectors import (
    SampleSelector, gradmatch_kernel, gradmatch_select, nonnegative_least_squares, num_selected, output_errors,
    per_sample_loss_fn, selected_loss,
)


def _explicit_last_layer_gradients(head: nn.Linear, features, targets, label_smoothing=0.0):
    """Per-sample ∂CE_i/∂(W, b) flattened, by autograd one sample at a time (B × C·(d+1))."""
    rows = []
    for i in range(features.shape[0]):
        head.zero_grad()
        loss = F.cross_entropy(head(features[i:i + 1]), targets[i:i + 1], label_smoothing=label_smoothing)
        loss.backward()
        rows.append(torch.cat([head.weight.grad.flatten(), head.bias.grad.flatten()]).clone())
    return torch.stack(rows)


def _cross_entropy_errors(logits, targets, label_smoothing=0.0):
    """softmax(z) − t, t the (label-smoothed) one-hot target: ∂CE_i/∂z_i written out."""
    target = F.one_hot(targets, logits.shape[-1]).float()
    target = (1 - label_smoothing) * target + label_smoothing / logits.shape[-1]
    return torch.softmax(logits, -1) - target


class TestGradMatchKernel:
    @pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
    def test_kernel_equals_gram_of_explicit_per_sample_gradients(self, label_smoothing):
        torch.manual_seed(1)
        head = nn.Linear(6, 4)
        h, y = torch.randn(9, 6), torch.randint(0, 4, (9,))
        explicit = _explicit_last_layer_gradients(head, h, y, label_smoothing)
        loss = per_sample_loss_fn(nn.CrossEntropyLoss(label_smoothing=label_smoothing))
        errors = output_errors(loss, head(h).detach(), y)
        torch.testing.assert_close(errors, _cross_entropy_errors(head(h).detach(), y, label_smoothing))
        # e_i ⊗ [h_i, 1] is the gradient itself (weight part row-major, then the bias part)
        outer = torch.cat([torch.einsum("bc,bd->bcd", errors, h).flatten(1), errors], dim=1)
        torch.testing.assert_close(outer, explicit, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gradmatch_kernel(h, errors), explicit @ explicit.T, rtol=1e-5, atol=1e-6)

    def test_kernel_without_bias_drops_the_plus_one(self):
        h, e = torch.randn(5, 3), torch.randn(5, 4)
        g = torch.einsum("bc,bd->bcd", e, h).flatten(1)
        torch.testing.assert_close(gradmatch_kernel(h, e, bias=False), g @ g.T, rtol=1e-5, atol=1e-6)


    @pytest.mark.parametrize("form", ["pairwise", "explicit"])
    @pytest.mark.parametrize("bias", [True, False])
    def test_token_head_kernel_equals_gram_of_per_sample_gradients(self, form, bias):
        """A language-model head over T positions and a loss that is neither a plain cross entropy nor
        per-row (next-token CE of a ModelOutput, positions shifted): both kernel forms equal the Gram
        matrix of each sample's head gradient, computed by autograd one sample at a time."""
        from effcompile.passes.sample_selection import selectors

        transformers = pytest.importorskip("transformers")
        torch.manual_seed(2)
        batch, tokens, width, vocab = 5, 7, 6, 11
        head = nn.Linear(width, vocab, bias=bias)
        h, ids = torch.randn(batch, tokens, width), torch.randint(0, vocab, (batch, tokens))

        def next_token_loss(output, input_ids):
            logits = output.logits[:, :-1]
            return F.cross_entropy(logits.reshape(-1, vocab), input_ids[:, 1:].reshape(-1))

        def wrap(logits):
            return transformers.modeling_outputs.CausalLMOutput(logits=logits)

        rows = []
        for i in range(batch):
            head.zero_grad()
            next_token_loss(wrap(head(h[i:i + 1])), ids[i:i + 1]).backward()
            rows.append(torch.cat([head.weight.grad.flatten()] + ([head.bias.grad] if bias else [])))
        explicit = torch.stack(rows)
        errors = output_errors(per_sample_loss_fn(next_token_loss), wrap(head(h).detach()), ids)
        assert errors.shape == (batch, tokens, vocab) and errors[:, -1].abs().max() == 0  # no target after the last
        kernel = getattr(selectors, f"_{form}_kernel")(*selectors._positions(h, errors), bias)
        torch.testing.assert_close(kernel, explicit @ explicit.T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gradmatch_kernel(h, errors, bias), kernel, rtol=1e-4, atol=1e-6)

    def test_kernel_forms_chunk_without_changing_the_result(self, monkeypatch):
        from effcompile.passes.sample_selection import selectors

        h, e = torch.randn(6, 5, 4), torch.randn(6, 5, 9)
        whole = [selectors._pairwise_kernel(h, e, True), selectors._explicit_kernel(h, e, True)]
        monkeypatch.setattr(selectors, "_KERNEL_CHUNK_ELEMENTS", 64)  # forces 1-sample / 1-class chunks
        torch.testing.assert_close(selectors._pairwise_kernel(h, e, True), whole[0])
        torch.testing.assert_close(selectors._explicit_kernel(h, e, True), whole[1])
        torch.testing.assert_close(whole[0], whole[1], rtol=1e-4, atol=1e-5)


def _residual(gradients, index, weights):
    """‖mean_i g_i − Σ_j w_j g_{index_j}‖ from the materialised gradients."""
    return (gradients.mean(0) - weights @ gradients[index]).norm().item()


class TestGradMatchSelection:
    def test_weights_match_scipy_nnls(self):
        """Well-posed case (20 gradients of dimension 50): the same minimiser as scipy's active-set NNLS."""
        scipy_optimize = pytest.importorskip("scipy.optimize")
        torch.manual_seed(0)
        g = torch.randn(20, 50, dtype=torch.float64) + 0.3
        target_gradient = g.mean(0) + 0.2 * torch.randn(50, dtype=torch.float64)  # some weights hit the bound 0
        gram, target = (g @ g.T).float(), (g @ target_gradient).float()
        ours = nonnegative_least_squares(gram, target, torch.zeros(20), iterations=2000)
        reference, _ = scipy_optimize.nnls(g.T.numpy(), target_gradient.numpy())
        assert (ours >= 0).all() and (reference == 0).any()
        torch.testing.assert_close(ours.double(), torch.from_numpy(reference), rtol=0, atol=2e-3)

    def test_beats_random_subsets_with_their_best_nonnegative_weights(self):
        """Greedy OMP subsets vs random subsets of the same size, the random ones given their *optimal*
        non-negative weights (scipy NNLS on the explicit gradients) — the strongest random baseline —
        and unit weights 1/k.  Averaged over 12 seeds; gradmatch weights are always ≥ 0."""
        scipy_optimize = pytest.importorskip("scipy.optimize")
        ours, random_nnls, random_unit = [], [], []
        for seed in range(12):
            generator = torch.Generator().manual_seed(seed)
            batch, d, classes, k = 64, 16, 10, 8
            head = nn.Linear(d, classes)
            h = torch.randn(batch, d, generator=generator)
            y = torch.randint(0, classes, (batch,), generator=generator)
            with torch.no_grad():
                errors = _cross_entropy_errors(head(h), y)
            g = torch.cat([torch.einsum("bc,bd->bcd", errors, h).flatten(1), errors], dim=1)
            index, weights = gradmatch_select(gradmatch_kernel(h, errors), k, nnls_iterations=200)
            assert index.unique().numel() == k and (weights >= 0).all()
            ours.append(_residual(g, index, weights))
            random_index = torch.randperm(batch, generator=generator)[:k]
            best, _ = scipy_optimize.nnls(g[random_index].T.double().numpy(), g.mean(0).double().numpy())
            random_nnls.append(_residual(g, random_index, torch.from_numpy(best).float()))
            random_unit.append(_residual(g, random_index, torch.full((k,), 1.0 / k)))
        assert np.mean(ours) < 0.8 * np.mean(random_nnls), (np.mean(ours), np.mean(random_nnls))
        assert np.mean(ours) < 0.5 * np.mean(random_unit), (np.mean(ours), np.mean(random_unit))

    def test_full_budget_recovers_the_mean_gradient(self):
        torch.manual_seed(3)
        h, e = torch.randn(12, 5), torch.softmax(torch.randn(12, 3), -1) - F.one_hot(torch.randint(0, 3, (12,)), 3)
        g = torch.cat([torch.einsum("bc,bd->bcd", e, h).flatten(1), e], dim=1)
        index, weights = gradmatch_select(gradmatch_kernel(h, e), 12, ridge=1e-6, nnls_iterations=500)
        assert _residual(g, index, weights) < 0.05 * g.mean(0).norm().item()


def _selector(strategy, keep=0.25, **kwargs):
    return SampleSelector(keep, strategy, **kwargs)


class TestRandom:
    def test_reweighted_subset_gradient_is_unbiased(self):
        """Monte-Carlo mean over many draws of ∇Σ_j w_j ℓ_{index_j} ≈ ∇ mean ℓ: per-coordinate z-test."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        params = list(model.parameters())
        full = torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)])
        per_sample = per_sample_loss_fn(nn.CrossEntropyLoss())
        # the gradient of each per-sample loss, once; a draw's gradient is the weighted sum of its rows
        jacobian = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(per_sample(model(x), y)[i], params)])
                                for i in range(16)])
        selector = _selector("random", keep=0.25)
        draws = 4000
        estimates = torch.empty(draws, full.numel())
        for n in range(draws):
            index, weights = selector.select(torch.rand(16))
            estimates[n] = weights @ jacobian[index]
        mean, std = estimates.mean(0), estimates.std(0)
        z = (mean - full) / (std / math.sqrt(draws)).clamp_min(1e-12)
        # max of ~P standard normals: Bonferroni bound at α = 1e-3 overall
        bound = float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - 0.5e-3 / full.numel())))
        assert z.abs().max() < bound, z.abs().max()
        assert abs(float((z ** 2).mean()) - 1.0) < 0.5  # the spread of z is that of N(0, 1)

    def test_each_row_kept_with_probability_k_over_b(self):
        selector = _selector("random", keep=0.25)
        counts, draws = torch.zeros(16), 3000
        for _ in range(draws):
            index, weights = selector.select(torch.zeros(16))
            assert index.unique().numel() == 4 and torch.allclose(weights, torch.full((4,), 0.25))
            counts[index] += 1
        p = 0.25
        z = (counts / draws - p) / math.sqrt(p * (1 - p) / draws)
        assert z.abs().max() < 4.0


class TestLoss:
    @pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
    def test_probabilistic_variant_keeps_one_over_beta_plus_one(self, beta):
        torch.manual_seed(int(beta))
        selector = _selector("loss", fixed_k=False, beta=beta, history_size=1024)
        batch = 64
        for _ in range(1024 // batch):  # fill the history with i.i.d. losses
            selector.select(torch.rand(batch))
        kept = 0
        steps = 300
        for _ in range(steps):
            index, weights = selector.select(torch.rand(batch))
            assert index.numel() == batch  # full batch, 0/1 mask weights normalised by the kept count
            count = int((weights > 0).sum())
            kept += count
            if count:
                assert torch.allclose(weights[weights > 0], torch.full((count,), 1.0 / count))
        expected, n = 1.0 / (beta + 1.0), steps * batch
        # Bernoulli(p_i) with E[p_i] = 1/(β+1): Var ≤ n·p(1−p); plus the O(1/H) percentile discreteness
        assert abs(kept / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 2.0 / 1024

    def test_fixed_k_prefers_high_loss_rows(self):
        torch.manual_seed(0)
        selector = _selector("loss", keep=0.25, beta=3.0, history_size=256)
        losses = torch.arange(64, dtype=torch.float32)
        selected_means = []
        for _ in range(200):
            index, weights = selector.select(losses[torch.randperm(64)])
            assert index.unique().numel() == 16 and torch.allclose(weights, torch.full((16,), 1 / 16))
        for _ in range(200):
            shuffled = losses[torch.randperm(64)]
            index, _ = selector.select(shuffled)
            selected_means.append(shuffled[index].mean().item())
        # ∝ percentile³ without replacement: far above the batch mean 31.5 (uniform would give 31.5)
        assert np.mean(selected_means) > 42

    def test_percentile_is_mid_rank_in_history(self):
        selector = _selector("loss", history_size=8)
        selector.select(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        torch.testing.assert_close(selector.percentiles(torch.tensor([1.0, 4.0, 2.5])),
                                   torch.tensor([0.125, 0.875, 0.5]))


class TestSelectorState:
    def test_state_dict_round_trips_history_and_counters(self):
        torch.manual_seed(0)
        selector = _selector("loss", keep=0.5, history_size=50)
        for _ in range(7):
            index, weights = selector.select(torch.rand(16))
            selector.record(index, weights)
        state = selector.state_dict()
        assert set(state) == {"loss_history", "history_fill", "history_position", "steps", "rows_seen",
                              "rows_selected"}  # the last selection is reported, not state (its size follows the batch)
        restored = _selector("loss", keep=0.5, history_size=50)
        restored.load_state_dict(state)
        for key, value in state.items():
            torch.testing.assert_close(restored.state_dict()[key], value)
        losses = torch.rand(16)
        torch.manual_seed(5)
        expected = selector.select(losses)
        torch.manual_seed(5)
        torch.testing.assert_close(restored.select(losses), expected)
        assert int(restored.history_fill) == 50 and int(restored.steps) == 8

    def test_a_checkpoint_holding_the_last_selection_as_buffers_still_loads(self):
        """Until 2026-12-05 the last selection was two buffers: such a state dict loads, strictly."""
        selector = _selector("loss", keep=0.5, history_size=50)
        index, weights = selector.select(torch.rand(16))
        selector.record(index, weights)
        old = {**selector.state_dict(), "last_index": index, "last_weights": weights}
        restored = _selector("loss", keep=0.5, history_size=50)
        restored.load_state_dict(old)
        assert int(restored.steps) == 1

    def test_num_selected(self):
        assert [num_selected(f, 128) for f in (1.0, 0.5, 0.25, 0.1, 0.001)] == [128, 64, 32, 13, 1]


class TestPerSampleLoss:
    @pytest.mark.parametrize("make_loss, outputs, targets", [
        (lambda: nn.CrossEntropyLoss(), torch.randn(6, 4), torch.randint(0, 4, (6,))),
        (lambda: nn.CrossEntropyLoss(label_smoothing=0.2), torch.randn(6, 4), torch.randint(0, 4, (6,))),
        (lambda: nn.MSELoss(), torch.randn(6, 3, 2), torch.randn(6, 3, 2)),
        (lambda: nn.MSELoss(reduction="sum"), torch.randn(6, 3), torch.randn(6, 3)),
        (lambda: F.cross_entropy, torch.randn(6, 4), torch.randint(0, 4, (6,))),
        (lambda: F.smooth_l1_loss, torch.randn(6, 5), torch.randn(6, 5)),
        (lambda: (lambda out, tgt: ((out - tgt) ** 2).mean() + out.abs().mean()), torch.randn(6, 5), torch.randn(6, 5)),
    ], ids=["ce", "ce-smooth", "mse-3d", "mse-sum", "F.ce", "F.smooth_l1", "lambda-vmap"])
    def test_mean_of_per_sample_losses_is_the_original_loss(self, make_loss, outputs, targets):
        loss_fn = make_loss()
        per_sample = per_sample_loss_fn(loss_fn)(outputs, targets)
        assert per_sample.shape == (6,)
        torch.testing.assert_close(per_sample.mean(), loss_fn(outputs, targets))
        # and sample i's loss is the loss of the batch of sample i alone (for mean-reduced losses)
        if getattr(loss_fn, "reduction", "mean") == "mean":
            torch.testing.assert_close(per_sample[2], loss_fn(outputs[2:3], targets[2:3]))

    def test_the_models_own_loss_is_refused_and_its_logits_are_used(self):
        """A Hugging Face model given labels returns its own batch-mean ``loss`` first: a loss
        function that returns it would give every sample the same loss (refused, saying why);
        one that reads the logits works, the 0-dim loss passed over for the batch size."""
        logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
        output = {"loss": F.cross_entropy(logits, labels), "logits": logits}
        with pytest.raises(ValueError, match="model's own loss.*labels in the batch"):
            per_sample_loss_fn(lambda out, tgt: out["loss"])(output, labels)
        per_sample = per_sample_loss_fn(lambda out, tgt: F.cross_entropy(out["logits"], tgt))(output, labels)
        torch.testing.assert_close(per_sample, F.cross_entropy(logits, labels, reduction="none"))

    def test_unvmappable_loss_raises_naming_it(self):
        def host_sync_loss(outputs, targets):
            return outputs.sum() * float(outputs.sum().item())
        with pytest.raises(ValueError, match="host_sync_loss.*vmap"):
            per_sample_loss_fn(host_sync_loss)(torch.randn(4, 2), torch.randn(4, 2))

    def test_class_weighted_mean_is_refused(self):
        with pytest.raises(ValueError, match="weight"):
            per_sample_loss_fn(nn.CrossEntropyLoss(weight=torch.ones(3)))

    def test_selected_loss(self):
        losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
        value = selected_loss(losses, torch.tensor([3, 0]), torch.tensor([0.25, 0.75]))
        assert value.item() == pytest.approx(0.25 * 4 + 0.75 * 1)


class TestConfig:
    @pytest.mark.parametrize("field, value", [
        ("keep", 0.0), ("keep", 1.5), ("strategy", "topk"), ("beta", 0.0), ("mode", "lazy"),
        ("history_size", 0), ("gradmatch_ridge", 0.0), ("nnls_iterations", -1), ("fixed_k", "yes"),
    ])
    def test_invalid_fields_name_field_and_range(self, field, value):
        with pytest.raises(ValueError, match=rf"SampleSelection\.{field}="):
            SampleSelection(**{field: value})

    def test_probabilistic_only_for_loss(self):
        with pytest.raises(ValueError, match="fixed_k"):
            SampleSelection(strategy="random", fixed_k=False)
        assert SampleSelection(strategy="loss", fixed_k=False).probabilistic

    def test_round_trip(self):
        config = SampleSelection(keep=0.1, strategy="gradmatch", mode="reforward", beta=2.0)
        assert config_from_dict(config.to_dict()) == config


def test_per_sample_losses_of_a_model_output_are_per_sequence_token_means():
    """A user's causal-LM loss over a ``ModelOutput`` (with a non-tensor cache field): ℓ_i is the
    mean over sequence i's tokens, i.e. the same loss on that sequence alone."""
    transformers = pytest.importorskip("transformers")

    class Cache:  # stands in for a KV-cache object pytree cannot flatten
        pass

    def causal_lm_loss(output, ids):
        logits = output.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    torch.manual_seed(0)
    logits, ids = torch.randn(5, 7, 11), torch.randint(0, 11, (5, 7))
    output = transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits, past_key_values=Cache())
    losses = per_sample_loss_fn(causal_lm_loss)(output, ids)
    expected = torch.stack([causal_lm_loss(transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits[i:i + 1]),
                                           ids[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(losses.mean(), causal_lm_loss(output, ids))  # equal-length sequences
