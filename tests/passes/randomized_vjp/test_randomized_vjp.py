"""Specification of the randomized-VJP pass (passes/randomized_vjp.py).

The estimator math is specified in tests/test_sketch.py; here: the rewrite of the AOT joint graph,
its agreement with the eager path, unbiasedness through whole compiled models, the Plan, and the
errors that keep a missing rewrite from passing silently as exact gradients.
"""

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.plan import Action
from effcompile.passes import randomized_vjp

DRAWS = 300
Z = 5.0  # per-entry z bound; with a few hundred entries a false alarm is ~1e-4


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))


def _sketch(model, x, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return effcompile.transform(model, effcompile.RandomizedVJP(**config), example_inputs=(x,))


def _data():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, 12, generator=generator) * torch.logspace(-1, 1, 64)[:, None]  # skewed rows
    return x, torch.randint(0, 5, (64,), generator=generator)


def _gradients(model, forward, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(forward(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _draws(model, forward, x, y, draws=DRAWS):
    return torch.stack([_gradients(model, forward, x, y) for _ in range(draws)])


def _assert_unbiased(samples, exact):
    mean, std = samples.mean(0), samples.std(0)
    bound = Z * std / samples.shape[0] ** 0.5 + 1e-6
    assert ((mean - exact).abs() <= bound).all(), float(((mean - exact).abs() / bound).max())


def _draws_in(nodes):
    return [n for n in nodes if n.target in (torch.ops.effcompile.sample_indices.default,
                                             torch.ops.effcompile.rademacher.default)]


def _rewritten_graphs(model, x, y, min_cut=False):
    """One compiled training step through the randomized-VJP joint rewrite alone: (the number of
    rewritten GEMMs, the joint graph's nodes after the rewrite, the backward graph's nodes after
    the partition, the forward graph's; ``min_cut``: Inductor's partitioner, which also runs
    AOTAutograd's CSE and places nodes no forward output needs where the cut is cheapest)."""
    from effcompile._compat import aot_eager_with_partition

    seen = {}

    def rewrite_then_partition(partition):
        def partition_fn(joint, inputs, **kwargs):
            seen["records"] = len(randomized_vjp.rewrite_joint_graph(joint.graph))
            joint.recompile()
            seen["joint"] = list(joint.graph.nodes)
            forward, backward = partition(joint, inputs, **kwargs)
            seen["backward"] = list(backward.graph.nodes)
            seen["forward"] = list(forward.graph.nodes)
            return forward, backward

        return partition_fn

    backend = aot_eager_with_partition(rewrite_then_partition, min_cut=min_cut)
    _gradients(model, torch.compile(model, backend=backend), x, y)
    return seen["records"], seen["joint"], seen["backward"], seen["forward"]


@pytest.fixture(scope="module")
def exact_gradient():
    model, (x, y) = _mlp(), _data()
    return _gradients(model, model, x, y)


class TestJointGraphRewrite:
    @pytest.mark.parametrize("center", [True, False])
    def test_rewrites_both_weight_gemms_and_removes_markers(self, center, joint_log):
        model, (x, y) = _mlp(), _data()
        _sketch(model, x, keep=0.25, center=center)
        compiled = torch.compile(model, backend="effcompile_aot_eager")
        _gradients(model, compiled, x, y)
        records = {(r.layer, r.gemm): r for r in joint_log.last("randomized_vjp")}
        assert set(records) == {("0", "grad_weight"), ("2", "grad_weight")}
        first = records["0", "grad_weight"]
        assert (first.n, first.k) == (64, 16)
        # The GEMM contracts over 64 rows before and 16 sampled ones after (+1: the centred mean term).
        assert first.before.startswith("mm_") and ": 24x64," in first.before
        assert f": 24x{16 + center}," in first.after and f": {16 + center}x12)" in first.after

    def test_rewrite_is_idempotent(self):
        from effcompile._compat import aot_eager_with_partition

        model, (x, y) = _mlp(), _data()
        _sketch(model, x, keep=0.25)
        runs = []

        def rewrite_twice(partition):
            def partition_fn(joint, inputs, **kwargs):
                runs.append(len(randomized_vjp.rewrite_joint_graph(joint.graph)))
                runs.append(len(randomized_vjp.rewrite_joint_graph(joint.graph)))
                joint.recompile()
                return partition(joint, inputs, **kwargs)

            return partition_fn

        _gradients(model, torch.compile(model, backend=aot_eager_with_partition(rewrite_twice)), x, y)
        assert runs == [2, 0]

    @pytest.mark.parametrize("estimator", ["importance", "uniform"])
    def test_only_importance_computes_norms(self, estimator):
        # Uniform sampling reads only the number of rows: the rewrite must not spend two passes
        # over G and X on norms it discards (conv images, linear rows and output features).
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 5))
        x, y = torch.randn(32, 2, 6, 6), torch.randint(0, 5, (32,))
        _sketch(model, x, keep=0.25, keep_input=0.5, target="both", estimator=estimator, multiple=1)
        records, joint_nodes, _, _ = _rewritten_graphs(model, x, y)
        norms = [n for n in joint_nodes if n.target is torch.ops.aten.sqrt.default]
        assert records == 5  # three weight gradients, two input gradients
        assert len(norms) == (2 * records if estimator == "importance" else 0)

    @pytest.mark.parametrize("estimator", ["uniform", "importance", "sketch"])
    def test_every_rewritten_gemm_draws_its_own_sample(self, estimator):
        # Layers of one size get identical sampler calls (uniform: the same zero scores; sketch:
        # the same sizes); Inductor's partitioner runs CSE, which ignores a custom op's
        # nondeterministic tag, and would hand all of them one draw.
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        x, y = torch.randn(64, 16), torch.randint(0, 16, (64,))
        _sketch(model, x, keep=0.25, estimator=estimator)
        _, _, backward_nodes, forward_nodes = _rewritten_graphs(model, x, y, min_cut=True)
        assert len(_draws_in(backward_nodes)) == 3
        # Each draw exactly once, in the backward: uniform's scores and sketch's signs need no
        # backward input, and the partitioner would otherwise also draw in the forward to gather
        # X's rows there (saving X[idx]) while the backward draws G's rows again: idx ≠ idx'.
        assert _draws_in(forward_nodes) == []

    @pytest.mark.parametrize("estimator", ["importance", "uniform", "sketch"])
    def test_input_statistics_are_computed_in_the_forward(self, estimator):
        # The input's mean (centring) and, for importance, its rows' norms read X alone: in the
        # forward X is materialized, in the backward the partitioner would recompute it (GELU's erf
        # per pass).  Layers whose output feeds the forward compute them there; the last layer's
        # output is the graph output here (loss outside), so its statistics stay in the backward.
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(64, 24), nn.GELU(),
                              nn.Linear(24, 5))
        x, y = torch.randn(32, 2, 6, 6), torch.randint(0, 5, (32,))
        _sketch(model, x, keep=0.25, estimator=estimator, multiple=1)
        records, _, backward_nodes, forward_nodes = _rewritten_graphs(model, x, y, min_cut=True)

        def count(nodes, op):
            return sum(n.target is op for n in nodes)

        aten = torch.ops.aten
        convolution = estimator != "sketch"  # the Plan keeps convolutions exact under "sketch"
        assert records == 2 + convolution
        assert (count(forward_nodes, aten.mean.dim), count(backward_nodes, aten.mean.dim)) == (1 + convolution, 1)
        norms = (2, 1 + 3) if estimator == "importance" else (0, 0)  # backward: + the gradients' norms
        assert (count(forward_nodes, aten.sqrt.default), count(backward_nodes, aten.sqrt.default)) == norms

    @pytest.mark.parametrize("target", ["grad_input", "both"])
    def test_grad_input_samples_output_features(self, target, joint_log):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 5))
        x, y = _data()
        _sketch(model, x, keep=0.5, target=target, multiple=4)
        _gradients(model, torch.compile(model, backend="effcompile_aot_eager"), x, y)
        gemms = {(r.layer, r.gemm, r.k, r.n) for r in joint_log.last("randomized_vjp")}
        assert ("2", "grad_input", 12, 24) not in gemms  # grad_input of layer 2 contracts over its 40 outputs
        assert ("2", "grad_input", 20, 40) in gemms
        assert any(g == "grad_weight" for _, g, _, _ in gemms) == (target == "both")


@pytest.mark.parametrize("center", [True, False], ids=["centred", "plain"])
@pytest.mark.parametrize("estimator", ["importance", "uniform", "sketch"])
def test_compiled_estimates_are_unbiased(estimator, center, exact_gradient):
    model, (x, y) = _mlp(), _data()
    _sketch(model, x, keep=0.25, estimator=estimator, center=center)
    samples = _draws(model, torch.compile(model, backend="effcompile_aot_eager"), x, y)
    _assert_unbiased(samples, exact_gradient)
    assert samples.std(0).max() > 0, "the estimate is random"


def test_eager_and_compiled_paths_agree_in_distribution(exact_gradient):
    model, (x, y) = _mlp(), _data()
    _sketch(model, x, keep=0.25, estimator="importance")
    eager = _draws(model, model, x, y)
    compiled = _draws(model, torch.compile(model, backend="effcompile_aot_eager"), x, y)
    _assert_unbiased(eager, exact_gradient)
    _assert_unbiased(compiled, exact_gradient)
    # Same design, same variance: the per-entry variance ratio stays near 1 (F-test-like band).
    ratio = (eager.var(0).sum() / compiled.var(0).sum()).item()
    assert 0.75 < ratio < 1.33, ratio


def test_importance_beats_uniform_at_equal_budget():
    model, (x, y) = _mlp(), _data()
    variances = {}
    for estimator in ("importance", "uniform"):
        sketched = _sketch(copy.deepcopy(model), x, keep=0.25, estimator=estimator)
        variances[estimator] = _draws(sketched, torch.compile(sketched, backend="effcompile_aot_eager"), x, y, 150).var(0).sum()
        torch._dynamo.reset()
    assert variances["importance"] < variances["uniform"]


def test_keep_one_is_exact_on_every_path(exact_gradient, joint_log):
    model, (x, y) = _mlp(), _data()
    _sketch(model, x, keep=1.0, target="both")
    for forward in (model, torch.compile(model, backend="effcompile_aot_eager")):
        torch.testing.assert_close(_gradients(model, forward, x, y), exact_gradient)
    assert joint_log.graphs and joint_log.all("randomized_vjp") == []


def test_no_recompiles_across_steps():
    model, (x, y) = _mlp(), _data()
    _sketch(model, x, keep=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with torch._dynamo.config.patch(error_on_recompile=True):
        step = effcompile.train_step(model, F.cross_entropy, optimizer, compile=True, backend="effcompile_aot_eager")
        losses = [float(step(x, y)) for _ in range(20)]
    assert losses[-1] < losses[0]


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, groups=2),
                         nn.Flatten(), nn.Linear(36, 3))


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_convolution_weight_gradients_are_unbiased(path, joint_log):
    x = torch.randn(32, 1, 8, 8) * torch.logspace(-1, 1, 32)[:, None, None, None]
    y = torch.randint(0, 3, (32,))
    reference = _cnn()
    exact = _gradients(reference, reference, x, y)
    model = _sketch(_cnn(), x, keep=0.25)
    forward = model if path == "eager" else torch.compile(model, backend="effcompile_aot_eager")
    samples = _draws(model, forward, x, y, 200)
    assert samples.var(0).sum() > 1e-3 * exact.square().sum()  # sampled, not the exact gradient on every draw
    _assert_unbiased(samples, exact)
    if path == "compiled":
        assert {(r.layer, r.sampled_dim, r.k) for r in joint_log.last("randomized_vjp")} == {
            ("0", "images", 8), ("2", "images", 8), ("4", "rows", 8)}


def _bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_centring_cuts_the_weight_gradient_variance_of_a_batchnorm_cnn(path):
    """After a BatchNorm+ReLU the inputs share a mean and the gradients sum to zero per channel:
    the centred estimator's variance is a fraction of the plain one's, in both paths."""
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 3, (32,))
    reference = _bn_cnn()
    exact = _gradients(reference, reference, x, y)
    variance = {}
    for center in (True, False):
        model = _sketch(_bn_cnn(), x, keep=0.25, center=center)
        forward = model if path == "eager" else torch.compile(model, backend="effcompile_aot_eager")
        samples = _draws(model, forward, x, y, 150)
        if center:
            _assert_unbiased(samples, exact)
        variance[center] = (samples - exact).square().sum(1).mean().item()
    assert variance[True] < 0.5 * variance[False], variance


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["importance", "uniform", "sketch"])
def test_inductor_path_is_unbiased(estimator, exact_gradient, joint_log):
    # Inductor's min-cut partitioner, not aot_eager's default one: uniform and sketch draws were
    # duplicated into the forward there (a 19-sigma bias), which the aot_eager tests cannot see.
    model, (x, y) = _mlp(), _data()
    _sketch(model, x, keep=0.25, estimator=estimator)
    compiled = torch.compile(model, backend="effcompile")
    samples = _draws(model, compiled, x, y, 200)
    assert {r.gemm for r in joint_log.last("randomized_vjp")} == {"grad_weight"}
    _assert_unbiased(samples, exact_gradient)


def _chained():
    """Layers fed directly by another sketched layer's output (depthwise → pointwise convolution, a
    low-rank linear pair): the forward reads the first output anchored to its statistics, the backward
    the plain output, and the second layer must still find its backward GEMM."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Conv2d(2, 4, 1), nn.Flatten(), nn.Linear(64, 8),
                         nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 5))


def test_chained_layers_sample_with_forward_statistics():
    x, y = torch.randn(32, 2, 6, 6), torch.randint(0, 5, (32,))
    model = _sketch(_chained(), x, keep=0.25, multiple=1)
    records, _, backward_nodes, forward_nodes = _rewritten_graphs(model, x, y, min_cut=True)
    assert records == 5
    means = [sum(n.target is torch.ops.aten.mean.dim for n in nodes) for nodes in (forward_nodes, backward_nodes)]
    assert means == [4, 1]  # every layer but the output one computes x̄ in the forward


@pytest.mark.slow
def test_inductor_path_is_unbiased_on_chained_layers(joint_log):
    x, y = torch.randn(32, 2, 6, 6), torch.randint(0, 5, (32,))
    model = _chained()
    exact = _gradients(model, model, x, y)
    _sketch(model, x, keep=0.25, multiple=1)
    samples = _draws(model, torch.compile(model, backend="effcompile"), x, y, 200)
    assert len(joint_log.last("randomized_vjp")) == 5
    _assert_unbiased(samples, exact)


@pytest.mark.slow
def test_inductor_path_trains_a_bfloat16_model(joint_log):
    """A model cast to bf16 (no autocast): the centring's batch sums stay fp32, so Inductor compiles
    the backward (a bf16 Σ g shared with the bias gradient failed its CPU codegen) and the estimate
    stays unbiased up to bf16 rounding."""
    model, (x, y) = _mlp().to(torch.bfloat16), _data()
    x = x.to(torch.bfloat16)
    exact = _gradients(model, model, x, y).float()
    _sketch(model, x, keep=0.25, estimator="importance", center=True)
    compiled = torch.compile(model, backend="effcompile")
    samples = _draws(model, compiled, x, y, 200).float()
    assert {r.gemm for r in joint_log.last("randomized_vjp")} == {"grad_weight"}
    assert not torch.equal(samples[0], samples[1])  # sketched: draws differ
    mean, std = samples.mean(0), samples.std(0)
    bound = Z * std / samples.shape[0] ** 0.5 + 2e-2 * exact.abs() + 1e-3  # + bf16 rounding of each draw
    assert ((mean - exact).abs() <= bound).all(), float(((mean - exact).abs() / bound).max())


def test_eager_path_is_unbiased_on_a_float64_model():
    """fp64 (gradient checks): the row norms accumulate in fp64, then score in fp32."""
    model, (x, y) = _mlp(), _data()
    reference = copy.deepcopy(model).double()
    exact = _gradients(reference, reference, x.double(), y)
    _sketch(model, x, keep=0.25, estimator="importance", center=True)
    model.double()  # after transform, as a user casts
    x = x.double()
    samples = _draws(model, model, x, y, 200)
    assert samples.dtype == torch.float64 and not torch.equal(samples[0], samples[1])
    _assert_unbiased(samples, exact)


_CACHE_PROBE = textwrap.dedent("""
    import sys, warnings, torch, torch.nn as nn, torch.nn.functional as F, effcompile
    from effcompile.passes.joint import recording
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))
    x = torch.randn(64, 12)
    effcompile.transform(model, effcompile.RandomizedVJP(keep=float(sys.argv[1])), example_inputs=(x,))
    with recording(cache_hits=True) as log:  # a wrong hit on the other run's graph would log nothing
        F.cross_entropy(torch.compile(model, backend="effcompile")(x), torch.zeros(64, dtype=torch.long)).backward()
    print(sorted({r.k for results in log for r in results["randomized_vjp"].records}))
""")


@pytest.mark.slow
def test_compile_cache_never_mixes_configs(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    outputs = []
    for keep in ("0.25", "0.5"):
        result = subprocess.run([sys.executable, "-c", _CACHE_PROBE, keep], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout.strip().splitlines()[-1])
    assert outputs == ["[16]", "[32]"]


class TestPlanAndErrors:
    def test_plan_lists_every_layer_with_its_budget(self):
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
        effcompile.transform(model, effcompile.RandomizedVJP(keep=0.5, multiple=2), example_inputs=(torch.randn(8, 1, 4, 4),))
        plan = effcompile.report(model)
        assert plan.row("0").action == Action.REWRITE and plan.row("0").details["k_images"] == "4/8"
        row = plan.row("2")
        assert row.action == Action.REWRITE and row.details["k_rows"] == "4/8" and row.details["eager"] == "yes"

    def test_unsupported_combinations_are_skipped_with_reason(self):
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
        with pytest.warns(UserWarning, match="skipped 1 layer"):
            effcompile.transform(model, effcompile.RandomizedVJP(keep=0.5, estimator="sketch"),
                                 example_inputs=(torch.randn(8, 1, 4, 4),))
        assert "importance/uniform only" in effcompile.report(model).row("0").reason

    def test_excluded_layers_are_explicit_skip_rows_with_exact_gradients(self):
        model, (x, y) = _mlp(), _data()
        with pytest.warns(UserWarning, match="skipped 1 layer"):
            effcompile.transform(model, effcompile.RandomizedVJP(keep=0.25, exclude=("0",)), example_inputs=(x,))
        plan = effcompile.report(model)
        assert plan.row("0").action == Action.SKIP and "exclude" in plan.row("0").reason
        assert plan.row("2").action == Action.REWRITE and type(model[0]) is nn.Linear
        reference = _mlp()
        exact = _gradients(reference, reference, x, y)
        first_layer = model[0].weight.numel() + model[0].bias.numel()
        torch.testing.assert_close(_gradients(model, model, x, y)[:first_layer], exact[:first_layer])

    def test_other_backends_fail_loudly_instead_of_computing_exact_gradients(self):
        model, (x, y) = _mlp(), _data()
        _sketch(model, x, keep=0.25)
        with pytest.raises(Exception, match="RandomizedVJP rewrite that was not applied"):
            _gradients(model, torch.compile(model, backend="aot_eager"), x, y)

    def test_functional_linear_is_sketched_eagerly_and_compiled(self, joint_log):
        class Functional(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.randn(3, 12))

            def forward(self, x):
                return F.linear(x, self.w)

        model = Functional()
        x, y = _data()
        y = y[:64].clamp(max=2)
        _sketch(model, x, keep=0.5)
        row = effcompile.report(model).row("w")
        assert row.details["eager"] == "yes" and row.details["eager_scope"] == "<root>"
        eager = [_gradients(model, model, x, y) for _ in range(2)]
        assert not torch.equal(eager[0], eager[1])  # sampled draw to draw
        assert not joint_log.graphs
        model.eval()
        assert model(x).shape == (64, 3)  # inference is untouched
        model.train()
        _gradients(model, torch.compile(model, backend="effcompile_aot_eager"), x, y)
        assert [r.layer for r in joint_log.last("randomized_vjp")] == ["w"]
        plain = effcompile.fold(model)
        assert not plain._forward_pre_hooks and not plain._forward_hooks  # the scope hooks go with the pass

    def test_fold_restores_plain_layers(self):
        model, (x, _) = _mlp(), _data()
        _sketch(model, x, keep=0.25)
        plain = effcompile.fold(model)
        assert type(plain[0]) is nn.Linear and set(plain.state_dict()) == set(_mlp().state_dict())


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_composes_with_decorrelation_by_sketching_the_fused_weight(path):
    """On a decorrelated layer the sketch applies to W·R; ∂L/∂W = ∂L/∂(W·R)·Rᵀ stays unbiased."""
    model, (x, y) = _mlp(), _data()
    effcompile.transform(model, effcompile.Decorrelation(input_layers=True, update_every=10**6), effcompile.RandomizedVJP(keep=0.25),
                         example_inputs=(x,))
    plan = effcompile.report(model)
    assert {row.action for row in plan.for_pass("decorrelation")} == {Action.REWRITE}
    assert all(row.applied for row in plan.for_pass("randomized_vjp"))
    model(x)  # the first training forward updates R; with update_every=10**6 it then stays fixed
    matrices = [m.weight_decorrelation.matrix.clone() for m in (model[0], model[2])]
    model.eval()  # eval: the same W·R forward, exact backward
    exact = _gradients(model, model, x, y)
    model.train()
    forward = model if path == "eager" else torch.compile(model, backend="effcompile_aot_eager")
    samples = _draws(model, forward, x, y)
    _assert_unbiased(samples, exact)
    assert samples.std(0).max() > 0, "the estimate is random"
    assert all(torch.equal(m.weight_decorrelation.matrix, r) for m, r in zip((model[0], model[2]), matrices))
    folded = effcompile.fold(model)  # both rewrites undone, in reverse order: plain layers with W·R baked in
    assert type(folded[0]) is nn.Linear and not hasattr(folded[0], "weight_decorrelation")
    model.eval()
    torch.testing.assert_close(folded.eval()(x), model(x))