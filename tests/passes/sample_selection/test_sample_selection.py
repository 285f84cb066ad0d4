"""Specification of the sample-selection pass (passes/sample_selection.py).

Every step is checked against a plain reference step written here: SGD on
Σ_j w_j · CE(model(x[index_j]), y[index_j]) for the selection the step reports.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile._compat import unique_graph_count
from effcompile.passes import SampleSelection
from effcompile.models import get_model
from effcompile.passes.sample_selection import SELECTOR_NAME, SelectionStep
from effcompile.passes.sample_selection.selectors import selector_of

BATCH = 32


def _data(batch=BATCH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=generator), torch.randint(0, 10, (batch,), generator=generator)


def _selecting(model, x, *extra, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return effcompile.transform(model, *extra, SampleSelection(**config), example_inputs=(x,))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return get_model("mlp", hidden=32)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _reference_step(model, optimizer, x, y, index, weights):
    """The plain step on the selected rows: Σ_j w_j · CE_j, one backward, one SGD step."""
    optimizer.zero_grad(set_to_none=True)
    losses = F.cross_entropy(model(x[index]), y[index], reduction="none")
    (losses * weights).sum().backward()
    optimizer.step()


def _original_parameters(model):
    return {name: p for name, p in model.named_parameters()}


class TestFullKeepEqualsBackprop:
    @pytest.mark.parametrize("mode", ["forward_reuse", "reforward"])
    @pytest.mark.parametrize("strategy", ["random", "loss", "gradmatch"])
    def test_keep_one_step_equals_plain_full_batch_step(self, mode, strategy):
        x, y = _data()
        plain = _mlp()
        selecting = _selecting(copy.deepcopy(plain), x, keep=1.0, strategy=strategy, mode=mode)
        plain_opt, opt = _sgd(plain), _sgd(selecting)
        step = effcompile.train_step(selecting, nn.CrossEntropyLoss(), opt)
        assert isinstance(step, SelectionStep)  # train_step asked the pass for its step
        for seed in range(3):
            x, y = _data(seed=seed)
            plain_opt.zero_grad()
            expected_loss = F.cross_entropy(plain(x), y)
            expected_loss.backward()
            plain_opt.step()
            loss = step(x, y)
            torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-6, atol=1e-7)
        index, weights = step.last_selection
        assert torch.equal(index, torch.arange(BATCH)) and torch.allclose(weights, torch.full((BATCH,), 1 / BATCH))
        for name, parameter in _original_parameters(plain).items():
            torch.testing.assert_close(selecting.get_parameter(name), parameter, rtol=1e-6, atol=1e-7)


class TestSubsetSteps:
    @pytest.mark.parametrize("mode", ["forward_reuse", "reforward"])
    @pytest.mark.parametrize("strategy", ["random", "loss", "gradmatch"])
    def test_step_equals_reference_step_on_its_selection(self, mode, strategy):
        x, y = _data()
        reference = _mlp()
        selecting = _selecting(copy.deepcopy(reference), x, keep=0.25, strategy=strategy, mode=mode)
        reference_opt, opt = _sgd(reference), _sgd(selecting)
        step = effcompile.train_step(selecting, nn.CrossEntropyLoss(), opt)
        for seed in range(3):
            x, y = _data(seed=seed)
            step(x, y)
            index, weights = step.last_selection
            assert index.shape == (8,) and weights.shape == (8,) and (weights >= 0).all()
            assert index.unique().numel() == 8
            _reference_step(reference, reference_opt, x, y, index, weights)
        for name, parameter in _original_parameters(reference).items():
            torch.testing.assert_close(selecting.get_parameter(name), parameter, rtol=1e-5, atol=1e-6)
        selector = selector_of(selecting)
        assert torch.equal(selector.last_index, index) and int(selector.steps) == 3

    def test_forward_reuse_and_reforward_give_the_same_gradient(self):
        """BatchNorm-free model, the same forced selection: identical parameter gradients."""
        x, y = _data()
        index, weights = torch.tensor([3, 17, 5, 30, 11, 2, 25, 8]), torch.rand(8)
        grads = {}
        for mode in ("forward_reuse", "reforward"):
            model = _selecting(_mlp(), x, keep=0.25, strategy="random", mode=mode)
            selector_of(model).select = lambda *args, **kwargs: (index, weights)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            effcompile.train_step(model, nn.CrossEntropyLoss(), optimizer)(x, y)
            grads[mode] = {name: p.grad.clone() for name, p in model.named_parameters()}
        reference = _mlp()
        losses = F.cross_entropy(reference(x[index]), y[index], reduction="none")
        (losses * weights).sum().backward()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(grads["forward_reuse"][name], p.grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(grads["reforward"][name], p.grad, rtol=1e-5, atol=1e-7)

    def test_probabilistic_loss_variant_steps_on_the_mask(self):
        x, y = _data(batch=64)
        reference = _mlp()
        model = _selecting(copy.deepcopy(reference), x, strategy="loss", fixed_k=False, beta=2.0)
        plan = effcompile.report(model)
        assert "no saving" in plan.rows[0].reason and plan.rows[0].details["k"] == "~21/64"
        opt, reference_opt = _sgd(model), _sgd(reference)
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), opt)
        step(x, y)
        index, weights = step.last_selection
        assert torch.equal(index, torch.arange(64))
        kept = weights > 0
        assert 0 < int(kept.sum()) < 64 and torch.allclose(weights[kept].sum(), torch.tensor(1.0))
        _reference_step(reference, reference_opt, x, y, index, weights)
        for name, parameter in _original_parameters(reference).items():
            torch.testing.assert_close(model.get_parameter(name), parameter, rtol=1e-5, atol=1e-6)


class TestBatchNorm:
    def test_plan_falls_back_to_reforward_and_scoring_leaves_running_stats_alone(self):
        """(More under BatchNorm — train-mode scores, returned loss, composition: test_batch_norm_scoring.py.)"""
        torch.manual_seed(0)
        x, y = _data()
        model = _selecting(get_model("cnn", widths=(8, 16)), x, keep=0.25, strategy="loss")
        plan = effcompile.report(model)
        assert {row.details["mode"] for row in plan} == {"reforward"}
        assert "features.0.bn (BatchNorm2d)" in plan.row("features.0.conv").reason
        assert plan.row("features.0.bn").op == "BatchNorm2d"
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model))
        bn_state = lambda m: {k: v.clone() for k, v in m.state_dict().items()
                              if k.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked")}
        before = bn_state(model)
        assert len(before) == 6
        step._scoring_pass((x,), y)
        assert all(torch.equal(before[k], v) for k, v in bn_state(model).items())
        assert model.training and all(module.training for module in model.modules())
        # the full step updates the running stats exactly as a train-mode forward of the subset does
        reference = copy.deepcopy(model)
        step(x, y)
        index, _ = step.last_selection
        reference(x[index])
        for key, value in bn_state(reference).items():
            torch.testing.assert_close(bn_state(model)[key], value)

    def test_forced_forward_reuse_with_batch_norm_raises_naming_the_layer(self):
        x, _ = _data()
        with pytest.raises(ValueError, match=r"forward_reuse.*features\.0\.bn"):
            _selecting(get_model("cnn", widths=(8, 16)), x, mode="forward_reuse")

    def test_functional_batch_norm_in_a_custom_module_is_found_on_the_graph(self):
        class FunctionalNorm(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 10)
                self.register_buffer("mean", torch.zeros(64))
                self.register_buffer("var", torch.ones(64))

            def forward(self, x):
                x = x.flatten(1)
                return self.fc(F.batch_norm(x, self.mean, self.var, training=True))

        x, _ = _data()
        plan = effcompile.report(_selecting(FunctionalNorm(), x, strategy="random"))
        assert plan.row("fc").details["mode"] == "reforward" and "<root>" in plan.row("fc").reason


class TestGradMatchWiring:
    def test_features_are_the_head_input_and_the_plan_names_the_head(self):
        x, y = _data()
        model = _selecting(_mlp(), x, keep=0.25, strategy="gradmatch")
        plan = effcompile.report(model)
        assert "gradmatch features" in plan.row("head").details["head"]
        seen = {}
        selector = selector_of(model)
        original = selector.select

        def spy(losses, features=None, errors=None):
            seen.update(features=features, errors=errors)
            return original(losses, features=features, errors=errors)

        selector.select = spy
        with torch.no_grad():  # the head input and output before the step's optimizer update
            h = model.act2(model.fc2(model.act1(model.fc1(x.flatten(1)))))
            z = model.head(h)
        effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model))(x, y)
        torch.testing.assert_close(seen["features"], h)
        # the cross-entropy gradient at the head output: softmax(z) − onehot(y), of the mean loss per row
        torch.testing.assert_close(seen["errors"], torch.softmax(z, -1) - F.one_hot(y, 10).float())
        assert selector.__dict__["_feature_tap"].value is None  # no batch outlives its step

    def test_a_head_shifted_by_a_state_tensor_is_still_the_head(self):
        """BART adds ``final_logits_bias`` (a buffer, moved with ``.to``) to its LM head's output: the
        loss's gradient at the output is the gradient at the head, so the head is found through
        the shift.  A shift by batch data (another activation) is not a head any more."""
        class Shifted(nn.Module):
            def __init__(self, by_data=False):
                super().__init__()
                self.body, self.head, self.by_data = nn.Linear(64, 16), nn.Linear(16, 10), by_data
                self.register_buffer("logit_bias", torch.randn(1, 10))

            def forward(self, x):
                h = torch.tanh(self.body(x.flatten(1)))
                return self.head(h) + (h[:, :10] if self.by_data else self.logit_bias.to(h.device))

        x, y = _data()
        model = _selecting(Shifted(), x, keep=0.25, strategy="gradmatch")
        assert "gradmatch features" in effcompile.report(model).row("head").details["head"]
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model))
        losses = [float(step(x, y)) for _ in range(5)]
        assert losses[-1] < losses[0] and step.last_selection[0].shape == (x.shape[0] // 4,)
        with pytest.raises(ValueError, match="gradmatch.*aten.add"):
            _selecting(Shifted(by_data=True), x, strategy="gradmatch")

    def test_model_without_linear_head_raises(self):
        class ConvHead(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 10, 3)

            def forward(self, x):
                return self.conv(x).mean(dim=(2, 3))

        x, _ = _data()
        with pytest.raises(ValueError, match="gradmatch.*ConvHead.*not by a linear layer"):
            _selecting(ConvHead(), x, strategy="gradmatch")
        plan = effcompile.report(_selecting(ConvHead(), x, strategy="random"))  # other strategies are fine
        assert plan.row("conv").details["mode"] == "forward_reuse"

    def test_any_loss_gives_its_own_output_gradient(self):
        """A regression loss: the proxy error is ∂ℓ_i/∂z_i of that loss (2(z_i − t_i)/C for MSE), and
        the step backpropagates the k matched rows."""
        x, _ = _data()
        targets = torch.randn(x.shape[0], 10)
        model = _selecting(_mlp(), x, keep=0.25, strategy="gradmatch")
        selector, seen = selector_of(model), {}
        original = selector.select

        def spy(losses, features=None, errors=None):
            seen.update(errors=errors)
            return original(losses, features=features, errors=errors)

        selector.select = spy
        with torch.no_grad():
            z = model(x)
        step = effcompile.train_step(model, nn.MSELoss(), _sgd(model))
        step(x, targets)
        torch.testing.assert_close(seen["errors"], 2 * (z - targets) / 10)
        index, weights = step.last_selection
        assert index.shape == (x.shape[0] // 4,) and (weights >= 0).all() and weights.sum() > 0


class TestModelIntegration:
    def test_state_dict_keys_added_under_selector_and_fold_removes_everything(self):
        x, y = _data()
        plain = _mlp()
        keys = set(plain.state_dict())
        model = _selecting(copy.deepcopy(plain), x, strategy="gradmatch")
        assert keys < set(model.state_dict())
        assert {k for k in model.state_dict() if k not in keys} == {
            f"{SELECTOR_NAME}.{name}" for name in ("loss_history", "history_fill", "history_position", "steps",
                                                   "rows_seen", "rows_selected")}
        effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model))(x, y)
        folded = effcompile.fold(model)
        assert set(folded.state_dict()) == keys and selector_of(folded) is None
        assert not folded.head._forward_hooks
        torch.testing.assert_close(folded(x), model(x))

    def test_checkpoint_round_trip_restores_selection_state(self):
        x, y = _data()
        model = _selecting(_mlp(), x, strategy="loss", keep=0.5)
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model))
        for seed in range(3):
            step(*_data(seed=seed))
        restored = _selecting(_mlp(seed=1), x, strategy="loss", keep=0.5)
        restored.load_state_dict(model.state_dict())
        for key, value in model.state_dict().items():
            torch.testing.assert_close(restored.state_dict()[key], value)
        assert int(selector_of(restored).history_fill) == 96

    def test_sequential_root_keeps_its_forward(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        x, y = _data()
        expected = model(x)
        _selecting(model, x, strategy="gradmatch", keep=0.5)
        torch.testing.assert_close(model(x), expected)
        effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model))(x, y)
        assert type(effcompile.fold(model)) is nn.Sequential

    def test_report_shows_live_counters_once(self):
        x, y = _data()
        model = _selecting(_mlp(), x, strategy="random", keep=0.25)
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model))
        for _ in range(4):
            step(x, y)
        plan = effcompile.report(model)
        first = plan.rows[0].details
        assert first["steps"] == 4 and first["mean_selected_fraction"] == 0.25
        assert first["last_mean_weight"] == pytest.approx(0.125) and first["history_fill"] == "128/1024"
        assert "steps" not in plan.rows[1].details
        assert plan.row("fc1").details["k"] == "8/32" and plan.row("head").details["head"] == "yes"

    def test_check_finite_raises_before_the_optimizer_step(self):
        x, y = _data()
        model = _selecting(_mlp(), x, strategy="random")
        before = {k: v.clone() for k, v in model.state_dict().items() if "selector" not in k}
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model), check_finite=True)
        with pytest.raises(FloatingPointError):
            step(torch.full_like(x, float("nan")), y)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.fixture
def no_recompiles():
    import torch._dynamo

    previous = torch._dynamo.config.error_on_recompile
    yield
    torch._dynamo.config.error_on_recompile = previous


class TestCompiled:
    @pytest.mark.slow
    def test_aot_eager_gradmatch_one_graph_no_recompiles_with_decorrelation(self, no_recompiles):
        """gradmatch (the hook-fed features, the unrolled OMP) stays one graph per decorrelation
        schedule pattern (a step that updates R, one that does not), and never recompiles."""
        import torch._dynamo

        x, y = _data()
        model = _selecting(_mlp(), x, effcompile.Decorrelation(input_layers=True), keep=0.125, strategy="gradmatch", nnls_iterations=10)
        every = {row.details.get("update_every", 1) for row in effcompile.report(model).for_pass("decorrelation")}
        assert len(every) == 1
        every = every.pop()
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model), compile=True,
                                     backend="effcompile_aot_eager")
        before = unique_graph_count()
        losses = [step(x, y) for _ in range(min(every, 2))]
        # forward, loss, selection, selected loss: one graph (with the R update, and one without)
        assert unique_graph_count() - before == min(every, 2)
        torch._dynamo.config.error_on_recompile = True
        while len(losses) < 20:  # 20 steps here; the Inductor test below runs 50
            losses.append(step(x, y))
        assert unique_graph_count() - before == min(every, 2)
        assert float(losses[-1]) < 0.9 * float(losses[0])  # it trains (the same batch, 4 of 32 rows per step)
        row = effcompile.report(model).row("fc1", "decorrelation")  # R updated on its budgeted schedule, in graph
        assert row.details["updates"] == -(-20 // every) > 0
        assert int(selector_of(model).steps) == 20
        index, weights = step.last_selection
        assert index.shape == (4,) and (weights >= 0).all() and weights.sum() > 0

    def test_forward_reuse_backward_runs_on_the_selected_rows_with_exact_gradient(self, joint_log):
        """With the effcompile joint pass, every backward GEMM of the forward-reuse step runs on k of B rows."""

        x, y = _data()
        model = _selecting(_mlp(), x, keep=0.25, strategy="random")
        reference = copy.deepcopy(model)
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.0),
                                     compile=True, backend="effcompile_aot_eager")
        step(x, y)
        records = joint_log.last("row_sparse_backward")
        gemms = [r for r in records if r.op == "aten.mm.default"]
        assert len(gemms) == 5 and all((r.rows, r.kept_rows) == (BATCH, 8) for r in records)
        index, weights = step.last_selection
        (F.cross_entropy(reference(x[index]), y[index], reduction="none") * weights).sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)

    @pytest.mark.slow
    def test_aot_eager_reforward_matches_eager_step(self, no_recompiles):
        """Re-forward compiled (two graphs: scoring, subset step) equals the eager step on the same selection."""
        import torch._dynamo

        torch.manual_seed(0)
        x, y = _data()
        eager_model = _selecting(get_model("cnn", widths=(8, 16)), x, keep=0.25, strategy="loss")
        compiled_model = copy.deepcopy(eager_model)
        eager_opt, compiled_opt = _sgd(eager_model), _sgd(compiled_model)
        compiled = effcompile.train_step(compiled_model, nn.CrossEntropyLoss(), compiled_opt, compile=True,
                                         backend="effcompile_aot_eager")
        eager = effcompile.train_step(eager_model, nn.CrossEntropyLoss(), eager_opt)
        for n in range(5):
            if n == 2:
                torch._dynamo.config.error_on_recompile = True
            compiled_loss = compiled(x, y)
            index, weights = compiled.last_selection
            selector_of(eager_model).select = lambda *args, **kwargs: (index, weights)
            # the train-mode scoring loss (batch statistics), compiled and eager alike
            torch.testing.assert_close(compiled_loss, eager(x, y), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(compiled.last_subset_loss, eager.last_subset_loss, rtol=1e-4, atol=1e-5)
        for key, value in eager_model.state_dict().items():
            if not key.startswith(SELECTOR_NAME):  # the eager selector was bypassed (forced selection)
                torch.testing.assert_close(compiled_model.state_dict()[key].float(), value.float(), rtol=1e-4, atol=1e-5)

    @pytest.mark.slow
    def test_inductor_fifty_steps_no_recompiles(self, no_recompiles):
        import torch._dynamo

        x, y = _data()
        model = _selecting(_mlp(), x, keep=0.25, strategy="loss")
        step = effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model), compile=True, backend="effcompile")
        # the one Inductor compile of this file (decorrelation composition is covered on aot_eager above)
        before = unique_graph_count()
        first = step(x, y)
        torch._dynamo.config.error_on_recompile = True
        for _ in range(49):
            last = step(x, y)
        assert unique_graph_count() - before == 1
        assert float(last) < 0.5 * float(first)
        index, weights = step.last_selection
        assert index.shape == (8,) and torch.allclose(weights, torch.full((8,), 1 / 8))
        # The selector's counters advance inside the compiled step as they do eagerly (a 0-dim
        # float64 rows_selected stayed 0 under AOTAutograd: its in-place updates were dropped).
        selector = selector_of(model)
        assert (int(selector.steps), int(selector.rows_seen), int(selector.rows_selected)) == (50, 50 * 32, 50 * 8)
        assert effcompile.report(model).rows[0].details["mean_selected_fraction"] == 0.25


@pytest.mark.slow
def test_digits_every_strategy_trains_close_to_backprop():
    """Zoo MLP on sklearn digits, 4 epochs, keep 0.5 (eager), seed 0.  Measured on this 2-core CPU
    (benchmarks/results/cpu-2026-11-25-sample-selection-digits-mlp.json, epoch 4): backprop 0.950,
    random 0.936, loss 0.947, gradmatch 0.956 test accuracy; the assertion allows 0.04 below
    backprop (about 14 of 360 test images)."""
    from effcompile.harness.data import load_digits
    from effcompile.harness.fit import fit

    train, test, info = load_digits()
    results = {}
    for strategy in ("backprop", "random", "loss", "gradmatch"):
        torch.manual_seed(0)
        model = get_model("mlp")
        if strategy != "backprop":
            _selecting(model, train.tensors[0][:64], keep=0.5, strategy=strategy, nnls_iterations=20)
        results[strategy] = fit(model, train, test, epochs=4, batch_size=64, lr=0.05, seed=0, progress=False)
    backprop = results["backprop"].final_accuracy
    for strategy, result in results.items():
        losses = [m.train_loss for m in result.history]
        assert losses[-1] < 0.3 * losses[0], (strategy, losses)
        assert result.final_accuracy >= backprop - 0.04, (strategy, result.final_accuracy, backprop)


class _SequenceFirst(nn.Module):
    """``nn.TransformerEncoderLayer`` without ``batch_first``: inputs (T, B, C), one output row per sample."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 16)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 1,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(0))


def test_reforward_cuts_a_sequence_first_input_along_its_batch_axis():
    """The re-forward selects the rows of axis 1 of a (T, B, C) input: the same gradient as forward
    reuse and as plain backprop of the weighted subset written by hand."""
    x, y = torch.randn(5, 8, 6), torch.randint(0, 3, (8,))
    index, weights = torch.tensor([6, 1, 3, 4]), torch.rand(4)
    grads = {}
    for mode in ("forward_reuse", "reforward"):
        model = _selecting(_SequenceFirst(), x, keep=0.5, strategy="random", mode=mode)
        selector_of(model).select = lambda *args, **kwargs: (index, weights)
        effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.0))(x, y)
        grads[mode] = {name: p.grad.clone() for name, p in model.named_parameters()}
    reference = _SequenceFirst()
    (F.cross_entropy(reference(x[:, index]), y[index], reduction="none") * weights).sum().backward()
    for name, p in reference.named_parameters():
        for mode in grads:
            torch.testing.assert_close(grads[mode][name], p.grad, rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")


def test_reforward_refuses_a_batch_axis_it_cannot_tell_from_time():
    """T == B: the first axis (time) has the batch's size and is cut; the output then has B rows, not
    the k selected, and the step says why instead of training on the wrong rows."""
    x, y = torch.randn(8, 8, 6), torch.randint(0, 3, (8,))
    model = _selecting(_SequenceFirst(), x, keep=0.5, strategy="random", mode="reforward")
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="not one row per selected sample: the batch axis of the inputs was not found"):
        step(x, y)


def test_gradmatch_on_a_weight_normed_head_says_the_weight_is_computed():
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), weight_norm(nn.Linear(16, 3)))
    with pytest.raises(ValueError, match=r"the head \(aten.linear.default in 2\) multiplies by a computed weight"):
        effcompile.transform(model, SampleSelection(keep=0.5, strategy="gradmatch"), example_inputs=(torch.randn(16, 8),))
