"""Kronecker-structured R (R_channel ⊗ R_spatial) for k×k convolutions: the layer computes with the
dense R the factors stand for, the update is the plain per-factor formula written out here, the
factors decorrelate correlated patches, compiled steps match eager ones, and the cost rule picks
the structure where blocks would cut the patch."""

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.passes.decorrelation import decorrelation_states
from effcompile.passes.decorrelation.cost import ladder, predict, predict_kronecker
from effcompile.passes.decorrelation.kronecker import KroneckerDecorrelationState
from effcompile.passes.decorrelation.state import MAX_STEP

pytestmark = pytest.mark.usefixtures("single_thread")

LR, KAPPA = 0.05, 0.3


def _kronecker(layer, x, **config):
    config.setdefault("max_overhead", None)  # tiny layers: keep every-step updates and lr as given
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(layer, effcompile.Decorrelation(input_layers=True, structure="kronecker", **config),
                             example_inputs=(x,))
    state = decorrelation_states(layer)["<root>"]
    assert isinstance(state, KroneckerDecorrelationState)
    return state


def _perturb(state, scale=0.2, seed=0):
    """A random, well-conditioned pair of factors, so no check is trivially R = I."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for factor in (state.matrix, state.spatial_matrix):
            factor.add_(scale * torch.randn(factor.shape, generator=generator) / math.sqrt(factor.shape[-1]))


CONVS = {
    "conv1d": (lambda: nn.Conv1d(4, 5, 3, padding=1), (3, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(6, 4, 3, padding=1, stride=2), (2, 6, 7, 7)),
    "grouped-conv2d": (lambda: nn.Conv2d(6, 8, (3, 2), groups=2), (2, 6, 6, 5)),
    "conv3d": (lambda: nn.Conv3d(3, 2, 2), (2, 3, 4, 4, 4)),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_the_layer_computes_with_the_dense_kronecker_product(case):
    build, shape = CONVS[case]
    conv, x = build(), torch.randn(shape)
    reference = build()
    reference.load_state_dict(conv.state_dict())
    state = _kronecker(conv, x)
    _perturb(state)
    groups = conv.groups
    dense = torch.stack([torch.kron(c, s) for c, s in zip(state.matrix, state.spatial_matrix)])  # (groups, d, d)
    weight = reference.weight.reshape(groups, -1, dense.shape[-1])
    fused = torch.stack([weight[g] @ dense[g] for g in range(groups)]).reshape(reference.weight.shape)
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    conv.eval()  # no update: R stays as set
    expected = conv_fn(x, fused, reference.bias, reference.stride, reference.padding, reference.dilation, groups)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    # ∂L/∂W = δ·zᵀ: the gradient through the fused weight with R held fixed.
    conv(x).square().sum().backward()
    plain = reference.weight.detach().requires_grad_()
    fused = torch.stack([plain.reshape(groups, -1, dense.shape[-1])[g] @ dense[g] for g in range(groups)])
    conv_fn(x, fused.reshape(plain.shape), reference.bias, reference.stride, reference.padding, reference.dilation,
            groups).square().sum().backward()
    torch.testing.assert_close(conv._parameters["weight"].grad, plain.grad, rtol=1e-4, atol=1e-4)
    assert state.matrix.grad is None and state.spatial_matrix.grad is None


def _plain_factor_step(matrix, moment, lr=LR):
    variance = torch.diag(moment)
    A = (1 - KAPPA) * (moment - torch.diag(variance)) + KAPPA * torch.diag(variance - 1)
    eta = min(lr, MAX_STEP / float(torch.linalg.matrix_norm(A)))
    return matrix - eta * A @ matrix


def _plain_update(R_c, R_s, patches):
    """patches (n, C, s): Z_p = R_c·X_p·R_sᵀ; the channel factor from Σ_c = ΣZZᵀ/(n·s), the
    spatial one from Σ_s = ΣZᵀZ/(n·C) divided by its mean diagonal."""
    n, C, s = patches.shape
    Z = R_c @ patches @ R_s.T
    sigma_c = torch.einsum("pcs,pds->cd", Z, Z) / (n * s)
    sigma_s = torch.einsum("pcs,pct->st", Z, Z) / (n * C)
    sigma_s = sigma_s / torch.diag(sigma_s).mean()
    return _plain_factor_step(R_c, sigma_c), _plain_factor_step(R_s, sigma_s)


@pytest.mark.parametrize("groups", [1, 2])
def test_the_update_is_the_plain_per_factor_formula(groups):
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
    # Correlated channels: a shared component, so both factors take a real step.
    x = torch.randn(2, 1, 5, 5) + 0.5 * torch.randn(2, 4, 5, 5)
    state = _kronecker(conv, x, lr=LR, kappa=KAPPA, rows_per_dim=1000)
    _perturb(state)
    C = 4 // groups
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, groups, C, 9)  # every patch, channel-major
    expected = [_plain_update(state.matrix[g].clone(), state.spatial_matrix[g].clone(), patches[:, g])
                for g in range(groups)]
    conv(x)  # the training forward updates R from every patch (fewer than the row cap)
    assert int(state.updates) == 1
    for g in range(groups):
        torch.testing.assert_close(state.matrix[g], expected[g][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(state.spatial_matrix[g], expected[g][1], rtol=0, atol=1e-5)


def _correlated_images(batch=16, channels=8, size=10, seed=0):
    """Channels mixed from shared sources and smoothed in space: correlated across both."""
    generator = torch.Generator().manual_seed(seed)
    sources = torch.randn(batch, channels, size, size, generator=generator)
    mixing = torch.eye(channels) + 0.8 * torch.randn(channels, channels, generator=generator) / math.sqrt(channels)
    mixed = torch.einsum("dc,bchw->bdhw", mixing, sources)
    blur = torch.ones(channels, 1, 3, 3) / 9
    return F.conv2d(mixed, blur, padding=1, groups=channels)


def test_the_factors_decorrelate_correlated_patches():
    x = _correlated_images()
    conv = nn.Conv2d(8, 6, 3, padding=1)
    state = _kronecker(conv, x, lr=0.05, kappa=0.5)
    before = float(state.off_diagonal_correlation(x))
    for step in range(150):
        conv(_correlated_images(seed=step + 1))
    after = float(state.off_diagonal_correlation(x))
    assert before > 0.15 and after < 0.4 * before, (before, after)
    assert int(state.updates) == 150 and int(state.rejected_updates) == 0


def test_a_non_finite_update_is_rejected_for_both_factors():
    x = _correlated_images()
    conv = nn.Conv2d(8, 6, 3, padding=1)
    state = _kronecker(conv, x)
    conv(x)
    channel, spatial = state.matrix.clone(), state.spatial_matrix.clone()
    poisoned = x.clone()
    poisoned[:, 0] = float("nan")  # in every sampled patch
    conv(poisoned)
    assert int(state.updates) == 1 and int(state.rejected_updates) == 1
    assert torch.equal(state.matrix, channel) and torch.equal(state.spatial_matrix, spatial)


def test_checkpoint_holds_both_factors_and_fold_keeps_the_function():
    x = _correlated_images(batch=4)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    state = _kronecker(conv, x)
    for _ in range(3):
        conv(x)
    saved = conv.state_dict()
    assert {"weight_decorrelation.matrix", "weight_decorrelation.spatial_matrix"} <= set(saved)
    fresh = nn.Conv2d(8, 6, 3, padding=1)
    _kronecker(fresh, x)
    fresh.load_state_dict(saved)
    restored = decorrelation_states(fresh)["<root>"]
    torch.testing.assert_close(restored.spatial_matrix, state.spatial_matrix)
    assert int(restored.updates) == 3
    conv.eval()
    expected = conv(x)
    folded = effcompile.fold(conv)
    assert not decorrelation_states(folded)
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_steps_update_the_factors_as_eager_does(backend):
    """update_every=2: the compiled update is masked between updates; three steps give eager's R."""
    torch.manual_seed(0)
    batches = [_correlated_images(batch=4, seed=seed) for seed in range(3)]

    def run(compiled):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            effcompile.transform(model, effcompile.Decorrelation(input_layers=True, structure="kronecker", update_every=2,
                                                                 max_overhead=None, rows_per_dim=1000),
                                 example_inputs=(batches[0],))
        step = torch.compile(model, backend=backend) if compiled else model
        for batch in batches:
            step(batch).square().mean().backward()
        return decorrelation_states(model)

    eager, compiled = run(False), run(True)
    for key, state in eager.items():
        assert int(compiled[key].updates) == int(state.updates) == 2
        torch.testing.assert_close(compiled[key].matrix, state.matrix, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled[key].spatial_matrix, state.spatial_matrix, rtol=1e-4, atol=1e-5)
        assert not torch.equal(state.spatial_matrix, torch.eye(9).expand_as(state.spatial_matrix))


def test_the_plan_shows_the_structure_and_why_a_layer_keeps_blocks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True, structure="kronecker"), example_inputs=(x,))
    rows = {row.layer: row for row in effcompile.report(model).for_pass("decorrelation")}
    assert rows["0"].details["structure"] == "kronecker" and rows["0"].details["kronecker"] == "3x3 ⊗ 9x9"
    assert rows["1"].details["structure"] == "blocks"
    assert "1x1 convolution" in rows["1"].details["blocks_because"]
    assert rows["3"].details["blocks_because"] == "not a convolution"
    states = decorrelation_states(model)
    assert isinstance(states["0"], KroneckerDecorrelationState)
    assert not isinstance(states["1"], KroneckerDecorrelationState)


def test_auto_takes_the_kronecker_factors_where_blocks_would_cut_the_patch():
    x = torch.randn(2, 64, 6, 6)
    for max_block_size, expected in ((1024, "blocks"), (256, "kronecker")):  # d = 576
        conv = nn.Conv2d(64, 8, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            effcompile.transform(conv, effcompile.Decorrelation(input_layers=True, max_overhead=None,
                                                                max_block_size=max_block_size), example_inputs=(x,))
        row = effcompile.report(conv).for_pass("decorrelation")[0]
        assert row.details["structure"] == expected, max_block_size


def test_the_auto_ladder_puts_the_kronecker_factors_before_smaller_blocks():
    # ResNet-18 layer4 at width 32: C = 256, 3x3, batch 128 at 4x4 output positions.
    numel, rows, d = 256 * 256 * 9, 128 * 16, 256 * 9
    rungs = ladder(numel, rows, 1, d, 1024, 4.0, kronecker=(256, 9), structure="auto")
    first_kronecker = next(i for i, rung in enumerate(rungs) if rung.structure == "kronecker")
    assert all(rung.structure == "blocks" and rung.block == d for rung in rungs[:first_kronecker])
    assert all(rung.block == d or rung.structure == "kronecker"
               for rung in rungs[:first_kronecker + 1])
    kronecker = predict_kronecker(numel, rows, 1, 256, 9, 4.0, 1)
    blocks = predict(numel, rows, 1, d, 1024, 4.0, 1)
    assert kronecker.update_macs < blocks.update_macs / 40  # no (C·s)³ term
    only = ladder(numel, rows, 1, d, 1024, 4.0, kronecker=(256, 9), structure="kronecker")
    assert {rung.structure for rung in only} == {"kronecker"}
    assert [rung.update_every for rung in only] == sorted(rung.update_every for rung in only)


def test_an_unknown_structure_is_refused():
    with pytest.raises(ValueError, match="structure"):
        effcompile.Decorrelation(structure="diagonal")
