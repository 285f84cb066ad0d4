"""Reliability: bad models get clear errors, faults are contained, runs resume exactly.

Each test names the construct it covers; see README "Guarantees".
"""

import resource
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import effcompile
from effcompile._compat import unique_graph_count
from effcompile.passes import CaptureError
from effcompile.passes.decorrelation import DecorrelationState
from effcompile.passes.decorrelation import decorrelation_states


def _decorrelate(model, *example, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return effcompile.transform(model, effcompile.Decorrelation(input_layers=True, **config), example_inputs=example)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return self.fc(x)
        return x


class TestBadModels:
    def test_data_dependent_control_flow_names_module_and_construct(self):
        model = nn.Sequential(nn.Linear(4, 4), _Branchy())
        with pytest.raises(CaptureError, match=r"module '1' \(_Branchy\.forward.*data-dependent control flow"):
            effcompile.transform(model, effcompile.Decorrelation(input_layers=True), example_inputs=(torch.randn(2, 4),))
        assert not any("decorrelation" in key for key in model.state_dict()), "a failed transform changes nothing"

    def test_layerdrop_is_named_with_the_setting_that_turns_it_off(self):
        """Hugging Face LayerDrop (Wav2Vec2's default ``layerdrop=0.1``) skips a layer by a random
        Python branch in training mode: the error names the config field to set."""
        import types

        class LayerDropped(nn.Module):
            def __init__(self):
                super().__init__()
                self.config = types.SimpleNamespace(layerdrop=0.1, encoder_layerdrop=0.0, hidden_size=4)
                self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

            def forward(self, x):
                for layer in self.layers:
                    if not (self.training and torch.rand([]) < self.config.layerdrop):
                        x = layer(x)
                return x

        with pytest.raises(CaptureError, match=r"LayerDrop \(layerdrop=0.1\).*set model.config.layerdrop = 0.0"):
            effcompile.transform(LayerDropped().train(), effcompile.Decorrelation(input_layers=True),
                                 example_inputs=(torch.randn(2, 4),))

    def test_model_without_layers_is_an_error_not_a_no_op(self):
        with pytest.raises(ValueError, match="no layer this pass applies to"):
            effcompile.transform(nn.Sequential(nn.ReLU(), nn.Tanh()), effcompile.Decorrelation(input_layers=True),
                                 example_inputs=(torch.randn(2, 3),))

    def test_module_called_twice_updates_per_call_and_backpropagates(self):
        class Twice(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                return self.fc(torch.relu(self.fc(x)))

        model = _decorrelate(Twice(), torch.randn(2, 4), lr=0.05, max_overhead=None)  # update every call
        model(torch.randn(8, 4)).sum().backward()  # R changes between the two calls: autograd must not care
        row = effcompile.report(model).row("fc")
        assert row.details["uses"] == 2 and row.details["updates"] == 2
        assert torch.isfinite(model.fc._parameters["weight"].grad).all()

    def test_batch_size_may_change_after_capture(self):
        model = _decorrelate(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)), torch.randn(4, 1, 4, 4),
                             max_overhead=None)  # update every call
        for batch in (16, 1, 7):
            assert model(torch.randn(batch, 1, 4, 4)).shape == (batch, 2)
        compiled = torch.compile(model, backend="aot_eager", dynamic=True)
        for batch in (16, 8, 5):
            compiled(torch.randn(batch, 1, 4, 4)).sum().backward()
        assert int(model[0].weight_decorrelation.updates) == 6

    def test_meta_device_model_materialises_with_identity_R(self):
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        _decorrelate(model, torch.empty(2, 4, device="meta"))
        model.to_empty(device="cpu")
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for state in decorrelation_states(model).values():
            torch.testing.assert_close(state.matrix[0], torch.eye(state.block))
            assert int(state.updates) == 0
        assert model(torch.randn(3, 4)).shape == (3, 2)

    def test_compiled_model_cannot_be_transformed(self):
        with pytest.raises(TypeError, match="before torch.compile"):
            effcompile.transform(torch.compile(nn.Linear(2, 2)), effcompile.Decorrelation(input_layers=True),
                                 example_inputs=(torch.randn(1, 2),))


# ------------------------------------------------------------------------------------ property test
@st.composite
def _small_models(draw):
    """A random small MLP or CNN, its input, and a random valid Decorrelation config."""
    torch.manual_seed(draw(st.integers(0, 10_000)))
    if draw(st.booleans()):
        widths = draw(st.lists(st.integers(1, 9), min_size=2, max_size=4))
        layers = []
        for fan_in, fan_out in zip(widths, widths[1:]):
            layers += [nn.Linear(fan_in, fan_out, bias=draw(st.booleans())), nn.Tanh()]
        model, x = nn.Sequential(*layers[:-1]), torch.randn(draw(st.integers(1, 5)), widths[0])
    else:
        groups = draw(st.sampled_from([1, 2]))
        channels = groups * draw(st.integers(1, 3))
        out_channels = groups * draw(st.integers(1, 3))
        kernel, stride, padding = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
        size = draw(st.integers(kernel, 6))
        conv = nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding, groups=groups,
                         bias=draw(st.booleans()))
        model, x = nn.Sequential(conv, nn.ReLU(), nn.Flatten()), torch.randn(draw(st.integers(1, 4)), channels, size, size)
    config = dict(lr=draw(st.floats(1e-4, 0.5)), kappa=draw(st.floats(0, 1)),
                  max_block_size=draw(st.integers(1, 16)), rows_per_dim=draw(st.floats(0.5, 8)),
                  update_every=draw(st.integers(1, 3)))
    return model, x, config


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_small_models())
def test_random_models_transform_with_identity_R_equal_to_plain_backprop(case):
    model, x, config = case
    plain = __import__("copy").deepcopy(model)
    _decorrelate(model, x, **config)
    assert all(row.applied for row in effcompile.report(model))
    model.eval()  # R = I and no update: the transformed model must equal the plain one exactly
    out, reference = model(x), plain(x)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference)
    out.square().sum().backward()
    reference.square().sum().backward()
    for (name, parameter), (_, plain_parameter) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(parameter.grad, plain_parameter.grad, msg=name)
    model.train()
    model(x).sum().backward()  # one training forward updates R ...
    states = decorrelation_states(model).values()
    assert all(torch.isfinite(state.matrix).all() for state in states)
    moved = [not torch.equal(state.matrix, torch.eye(state.matrix.shape[-1]).expand_as(state.matrix)) for state in states]
    # A step moves R visibly in fp32 when its terms are not negligible: η(1−κ) for the off-diagonal
    # covariance (blocks of b ≥ 2), ηκ for the variance term.
    visible = lambda rate: config["lr"] * rate >= 1e-3
    expected = [(state.block >= 2 and visible(1 - config["kappa"])) or visible(config["kappa"]) for state in states]
    assert all(m for m, e in zip(moved, expected) if e), (moved, config)
    model.eval()  # ... and the decorrelated forward (W·R fused) equals the plain model with W ← W·R baked in
    torch.testing.assert_close(model(x), effcompile.fold(model)(x))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_small_models(), st.sampled_from(["importance", "uniform"]), st.booleans())
def test_random_models_with_keep_one_sketch_and_selection_step_like_plain_backprop(case, estimator, select):
    """keep=1 paths of the randomized VJP and the sample selection are exact: one step equals plain SGD."""
    model, x, _ = case
    plain = __import__("copy").deepcopy(model)
    targets = torch.randint(0, plain(x).shape[-1], (x.shape[0],))
    configs = [effcompile.RandomizedVJP(keep=1.0, estimator=estimator)]
    if select:
        configs.append(effcompile.SampleSelection(keep=1.0, strategy="random"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, *configs, example_inputs=(x,))
    for network in (model, plain):
        step = effcompile.train_step(network, F.cross_entropy, torch.optim.SGD(network.parameters(), lr=0.1))
        step(x, targets)
    for (name, parameter), (_, plain_parameter) in zip(plain.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(dict(model.named_parameters())[name], plain_parameter, msg=name)


# ------------------------------------------------------------------------------------ resumption
def _training_run(steps, checkpoint_at=None, resume_from=None, tmp_path=None):
    torch.manual_seed(0)
    model = _decorrelate(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)),
                         torch.randn(2, 1, 4, 4), lr=0.05)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = effcompile.train_step(model, F.cross_entropy, optimizer)
    data = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 4, 4, generator=data), torch.randint(0, 4, (8,), generator=data)) for _ in range(steps)]
    start = 0
    if resume_from is not None:
        start = effcompile.load_checkpoint(resume_from, model, optimizer)["step"]
    losses = []
    for index in range(start, steps):
        losses.append(float(step(*batches[index])))
        if checkpoint_at == index + 1:
            effcompile.save_checkpoint(tmp_path / "ckpt.pt", model, optimizer, extra={"step": index + 1})
            torch.manual_seed(12345)  # the interrupted run's RNG moves on: the checkpoint must not care
            break
    return losses


def test_resumed_run_gives_the_same_losses_as_an_uninterrupted_one(tmp_path):
    uninterrupted = _training_run(10)
    first_half = _training_run(10, checkpoint_at=5, tmp_path=tmp_path)
    second_half = _training_run(10, resume_from=tmp_path / "ckpt.pt")
    assert first_half + second_half == uninterrupted


def test_checkpoint_from_a_differently_transformed_model_is_refused(tmp_path):
    model = _decorrelate(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), torch.randn(1, 3))
    effcompile.save_checkpoint(tmp_path / "a.pt", model)
    plain = _decorrelate(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 2)), torch.randn(1, 3))
    with pytest.raises(ValueError, match="transformed differently"):
        effcompile.load_checkpoint(tmp_path / "a.pt", plain)


# ------------------------------------------------------------------------------------ load
def _rss_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _thousand_steps(model, x, y, backend):
    """1000 compiled SGD steps; asserts flat RSS and no new graph (a recompile is an error) after
    a 200-step warm-up, in which every update schedule's graphs compile.

    Returns (graphs compiled, last loss)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = effcompile.train_step(model, F.cross_entropy, optimizer, compile=True, backend=backend)
    graphs = unique_graph_count()
    for _ in range(200):
        step(x, y)
    warm = _rss_mib()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(800):
            loss = step(x, y)
    assert _rss_mib() - warm < 16, "resident memory grew over 800 steps"
    return unique_graph_count() - graphs, loss


def _schedule_graphs(model):
    """Graphs per compiled step: one per pattern of decorrelation states due to update (their
    intervals are powers of two, so each longer one's steps are also the shorter ones')."""
    intervals = {state.update_every for state in model.modules() if isinstance(state, DecorrelationState)}
    return len(intervals - {1}) + 1


@pytest.mark.slow
def test_thousand_compiled_steps_without_memory_growth_or_recompiles():
    torch.manual_seed(0)
    model = _decorrelate(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), torch.randn(8, 16), lr=0.01)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    new_graphs, loss = _thousand_steps(model, x, y, backend="aot_eager")
    assert new_graphs == _schedule_graphs(model)
    state = model[0].weight_decorrelation  # the budgeted schedule: a graph with the update, one without
    assert torch.isfinite(loss) and int(state.updates) == -(-1000 // state.update_every)


@pytest.mark.slow
def test_thousand_compiled_steps_with_all_four_passes():
    """Decorrelation + randomized VJP + greedy stages + sample selection, 1000 compiled steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.01), effcompile.RandomizedVJP(keep=0.5),
                             effcompile.GreedyStages(num_stages=2), effcompile.SampleSelection(keep=0.5, strategy="random"),
                             example_inputs=(x,))
    new_graphs, loss = _thousand_steps(model, x, y, backend="effcompile_aot_eager")
    assert new_graphs == 2 * _schedule_graphs(model)  # per stage, one graph per update pattern
    assert torch.isfinite(loss)
    state = model[0].weight_decorrelation
    assert int(state.updates) == -(-1000 // state.update_every)
