"""Specification of the decorrelation pass (passes/decorrelation.py).

Every fused forward is checked against a plainly written reference: z = R·x computed
explicitly (patches for convolutions), then the original layer applied to z.
"""

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.plan import Action
from effcompile.passes.decorrelation import DecorrelationState, decorrelation_states
from effcompile.passes.decorrelation.state import sample_patches
from effcompile.passes.analysis.capture import ConvGeometry


def _decorrelate(model, *example, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The knobs as given (no budget): these tests check the update rule and its schedule.
        config.setdefault("max_overhead", None)
        config.setdefault("input_layers", True)  # tiny models: the mechanics on every layer, the first included
        return effcompile.transform(model, effcompile.Decorrelation(**config), example_inputs=example)


def _randomise_matrices(model, scale=0.2):
    """Give every R a random, well-conditioned value so parity tests are not trivially R = I."""
    with torch.no_grad():
        for state in decorrelation_states(model).values():
            state.matrix.add_(scale * torch.randn_like(state.matrix) / math.sqrt(state.block))


def _state(model, layer):
    return decorrelation_states(model)[layer]


def _patches(x, kernel, stride, padding):
    """All conv patches of x (any spatial rank, no dilation): (B, O1, …, Os, C·k1·…·ks), channel-major."""
    dims = len(kernel)
    pad = [p for p in reversed(padding) for _ in range(2)]
    x = F.pad(x, pad)
    for axis in range(dims):
        x = x.unfold(2 + axis, kernel[axis], stride[axis])
    # x: (B, C, O1..Os, k1..ks) → (B, O1..Os, C, k1..ks)
    permutation = (0,) + tuple(range(2, 2 + dims)) + (1,) + tuple(range(2 + dims, 2 + 2 * dims))
    x = x.permute(permutation)
    return x.reshape(*x.shape[: 1 + dims], -1)


def _reference_conv(x, weight, bias, R_blocks, groups, kernel, stride, padding):
    """conv(x; W) applied to decorrelated patches z = R·patch, written out by hand."""
    patches = _patches(x, kernel, stride, padding)  # (B, O…, C·K)
    lead = patches.shape[:-1]
    patches = patches.reshape(*lead, groups, -1)
    z = torch.einsum("...gb,gcb->...gc", patches, R_blocks)  # per-group R
    w = weight.reshape(groups, weight.shape[0] // groups, -1)
    y = torch.einsum("...gc,goc->...go", z, w).reshape(*lead, -1)
    if bias is not None:
        y = y + bias
    dims = len(kernel)
    return y.permute((0, 1 + dims) + tuple(range(1, 1 + dims)))


class TestFusedForward:
    def test_linear_equals_explicit_R_then_layer(self):
        layer = nn.Linear(12, 5)
        x = torch.randn(7, 3, 12)
        _decorrelate(layer, x)
        _randomise_matrices(layer)
        layer.eval()
        R = _state(layer, "<root>").matrix[0]
        expected = F.linear(x @ R.T, layer._parameters["weight"], layer.bias)
        torch.testing.assert_close(layer(x), expected)

    @pytest.mark.parametrize(
        "conv, shape",
        [
            (nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 9)),
            (nn.Conv2d(3, 6, 3, stride=1, padding=1), (2, 3, 6, 5)),
            (nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 0), bias=False), (2, 3, 7, 6)),
            (nn.Conv3d(2, 3, 2, stride=1, padding=1), (2, 2, 3, 4, 3)),
            (nn.Conv2d(4, 8, 3, padding=1, groups=2), (2, 4, 5, 5)),
            (nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 5, 5)),  # depthwise: one R per channel
        ],
        ids=["conv1d-stride2", "conv2d", "conv2d-rect", "conv3d", "grouped", "depthwise"],
    )
    def test_conv_equals_explicit_patch_decorrelation(self, conv, shape):
        x = torch.randn(shape)
        _decorrelate(conv, x)
        _randomise_matrices(conv)
        conv.eval()
        state = _state(conv, "<root>")
        expected = _reference_conv(x, conv._parameters["weight"], conv.bias, state.matrix, conv.groups,
                                   conv.kernel_size, conv.stride, conv.padding)
        torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-5)

    def test_dilated_conv_matches_unfold_reference(self):
        conv = nn.Conv2d(2, 3, 3, padding=2, dilation=2)
        x = torch.randn(2, 2, 7, 7)
        _decorrelate(conv, x)
        _randomise_matrices(conv)
        conv.eval()
        R = _state(conv, "<root>").matrix[0]
        patches = F.unfold(x, 3, dilation=2, padding=2)  # (B, C·9, L), channel-major
        z = torch.einsum("cb,nbl->ncl", R, patches)
        y = torch.einsum("oc,ncl->nol", conv._parameters["weight"].reshape(3, -1), z) + conv.bias[:, None]
        torch.testing.assert_close(conv(x), y.reshape(2, 3, 7, 7), rtol=1e-4, atol=1e-5)

    def test_multihead_attention_input_and_output_projections(self):
        mha = nn.MultiheadAttention(8, 2, batch_first=True)
        x = torch.randn(3, 5, 8)
        model = _SelfAttention(mha)
        _decorrelate(model, x)
        _randomise_matrices(model)
        model.eval()
        R = _state(model, "mha.in_proj_weight").matrix[0]
        R_out = _state(model, "mha.out_proj").matrix[0]
        reference = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        weights = {k: v for k, v in mha.state_dict().items() if "decorrelation" not in k}
        weights["out_proj.weight"] = weights["out_proj.weight"] @ R_out  # out_proj sees z = R_out·attn
        reference.load_state_dict(weights)
        z = x @ R.T
        expected, _ = reference(z, z, z, need_weights=False)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        plan = effcompile.report(model)
        assert plan.row("mha.in_proj_weight").action == Action.REWRITE
        # out_proj's input is computed inside nn.MultiheadAttention: observed where the graph computes it.
        assert plan.row("mha.out_proj").action == Action.REWRITE
        assert plan.row("mha.out_proj").details["observed_in"] == "mha"

    def test_functional_linear_and_matmul_against_parameters(self):
        model = _FunctionalLayers()
        x = torch.randn(6, 4)
        _decorrelate(model, x)
        _randomise_matrices(model)
        model.eval()
        R_w = _state(model, "w").matrix[0]
        R_p = _state(model, "p").matrix[0]
        expected = F.linear(x @ R_w.T, model._parameters["w"]) + (x @ R_p.T) @ model._parameters["p"]
        torch.testing.assert_close(model(x), expected)

    def test_block_diagonal_matrix_for_wide_layers(self):
        layer = nn.Linear(20, 3)
        x = torch.randn(50, 20)
        _decorrelate(layer, x, max_block_size=8, lr=0.05)
        state = _state(layer, "<root>")
        assert (state.blocks_per_group, state.block) == (3, 7)  # 20 → 3 blocks of 7, one padded feature
        for _ in range(5):
            layer(x)
        layer.eval()
        full = torch.block_diag(*state.matrix)[:20, :20]
        torch.testing.assert_close(layer(x), F.linear(x @ full.T, layer._parameters["weight"], layer.bias))
        # The padded feature never mixes with the real ones.
        padded = torch.block_diag(*state.matrix)
        torch.testing.assert_close(padded[20:, :20], torch.zeros(1, 20))
        torch.testing.assert_close(padded[20, 20], torch.tensor(1.0))


class _SelfAttention(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class _FunctionalLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.p = nn.Parameter(torch.randn(4, 3))  # (in, out) layout, used as x @ p

    def forward(self, x):
        return F.linear(x, self.w) + x @ self.p


def test_weight_gradient_is_delta_times_decorrelated_input():
    layer = nn.Linear(6, 4)
    x = torch.randn(10, 6)
    _decorrelate(layer, x)
    _randomise_matrices(layer)
    layer.eval()  # keep R fixed for the check
    out = layer(x)
    delta = torch.randn_like(out)
    out.backward(delta)
    z = x @ _state(layer, "<root>").matrix[0].T
    torch.testing.assert_close(layer._parameters["weight"].grad, delta.T @ z)
    torch.testing.assert_close(layer.bias.grad, delta.sum(0))
    assert _state(layer, "<root>").matrix.grad is None


def test_sampled_patches_are_real_patches_of_the_padded_input():
    x = torch.randn(2, 3, 6, 5)
    geometry = ConvGeometry(2, (3, 2), (2, 1), (1, 1), (1, 1), 1)
    rows = sample_patches(x, geometry, 300)
    every_patch = _patches(x, (3, 2), (2, 1), (1, 1)).reshape(-1, 18)
    distance = torch.cdist(rows, every_patch, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert distance.max() < 1e-5
    # Sampling reaches many distinct patches, not a few.
    assert torch.unique(torch.cdist(rows, every_patch, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)).numel() > 0.5 * every_patch.shape[0]


@pytest.mark.parametrize("update_dtype", ["float32", "bfloat16"])
def test_update_decorrelates_correlated_gaussian_inputs_tenfold(update_dtype):
    torch.manual_seed(1)
    d = 16
    mixing = torch.eye(d) + 0.8 * torch.randn(d, d) / math.sqrt(d)
    layer = nn.Linear(d, 4)
    sample = lambda: torch.randn(256, d) @ mixing.T
    _decorrelate(layer, sample(), lr=0.05, kappa=0.5, rows_per_dim=16, update_dtype=update_dtype)
    state = _state(layer, "<root>")
    probe = torch.randn(20000, d) @ mixing.T  # large, so the measurement's own noise is far below the target
    before = float(state.off_diagonal_correlation(probe))
    with torch.no_grad():
        for _ in range(300):
            layer(sample())
    after = float(state.off_diagonal_correlation(probe))
    assert before > 0.15
    assert after < before / 10, (before, after)
    assert int(state.updates) == 300 and int(state.rejected_updates) == 0


def test_update_every_k_steps():
    layer = nn.Linear(4, 2)
    x = torch.randn(8, 4)
    _decorrelate(layer, x, update_every=3)
    for _ in range(7):
        layer(x)
    state = _state(layer, "<root>")
    assert int(state.updates) == 3  # calls 1, 4, 7
    assert int(state.observed_batches) == 7


def test_no_update_in_eval_mode():
    layer = nn.Linear(4, 2)
    x = torch.randn(8, 4)
    _decorrelate(layer, x)
    layer.eval()
    layer(x)
    assert int(_state(layer, "<root>").updates) == 0
    torch.testing.assert_close(_state(layer, "<root>").matrix[0], torch.eye(4))


class TestStability:
    def test_non_finite_input_is_rejected_and_R_kept(self):
        layer = nn.Linear(4, 2)
        x = torch.randn(8, 4)
        _decorrelate(layer, x, lr=0.1)
        layer(x)
        state = _state(layer, "<root>")
        good = state.matrix.clone()
        bad = x.clone()
        bad[0, 0] = float("nan")
        layer(bad)
        torch.testing.assert_close(state.matrix, good)
        assert int(state.rejected_updates) == 1
        layer(x)  # training continues
        assert int(state.updates) == 2
        assert effcompile.report(layer).row("<root>").details["rejected"] == 1

    def test_runaway_R_is_rejected(self):
        layer = nn.Linear(4, 2)
        x = 1e-3 * torch.randn(64, 4)  # tiny variance: normalising it needs R ~ 1e3
        _decorrelate(layer, x, lr=0.9, kappa=1.0, divergence_threshold=10.0)
        state = _state(layer, "<root>")
        for _ in range(30):  # R grows at most 1.5x an update (MAX_STEP), past 10 within 30
            layer(x)
        assert int(state.rejected_updates) >= 1
        assert torch.isfinite(state.matrix).all()
        assert state.matrix.abs().max() <= 10.0

    def test_a_huge_step_is_shortened_not_taken(self):
        # Huge variance: the variance-normalising step η·κ·(v − 1) ~ 1e6 would flip R's sign and
        # blow it up; bounded by MAX_STEP, R shrinks towards normalising the input instead.
        layer = nn.Linear(4, 2)
        x = 1e3 * torch.randn(64, 4)
        _decorrelate(layer, x, lr=0.9, kappa=1.0)
        state = _state(layer, "<root>")
        norms = []
        for _ in range(5):
            layer(x)
            norms.append(float(state.matrix.norm()))
        assert int(state.rejected_updates) == 0
        assert all(later < earlier for earlier, later in zip([2.0] + norms, norms))  # ‖I‖ = 2


class TestStateDict:
    def test_original_keys_kept_and_pass_state_added(self):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        original = set(model.state_dict())
        _decorrelate(model, torch.randn(3, 4))
        keys = set(model.state_dict())
        assert original <= keys
        assert {"0.weight_decorrelation.matrix", "2.weight_decorrelation.matrix"} <= keys

    def test_checkpoint_from_before_the_transform_loads_strictly(self):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
        _decorrelate(model, torch.randn(3, 4))
        with torch.no_grad():
            model[0]._parameters["weight"].zero_()
        model.load_state_dict(checkpoint, strict=True)
        torch.testing.assert_close(model[0]._parameters["weight"], checkpoint["0.weight"])

    def test_resumed_run_keeps_the_update_every_schedule(self):
        """A model loaded from a checkpoint after 4 steps updates R on the same steps as the
        uninterrupted run (the eager schedule follows the loaded count, not a fresh one)."""
        def build():
            torch.manual_seed(0)
            return _decorrelate(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4),
                                lr=0.05, update_every=3)

        batches = [torch.randn(16, 4) for _ in range(9)]
        uninterrupted = build()
        for x in batches[:4]:
            uninterrupted(x)
        resumed = build()
        resumed.load_state_dict(uninterrupted.state_dict())
        for x in batches[4:]:
            torch.manual_seed(1)
            uninterrupted(x)
            torch.manual_seed(1)
            resumed(x)
            torch.testing.assert_close(_state(resumed, "0").matrix, _state(uninterrupted, "0").matrix)
        assert int(_state(resumed, "0").updates) == len(range(0, 9, 3))

    def test_round_trip_restores_R_and_counters(self):
        def build():
            torch.manual_seed(0)
            return _decorrelate(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4), lr=0.05)

        trained = build()
        for _ in range(4):
            trained(torch.randn(16, 4))
        fresh = build()
        fresh.load_state_dict(trained.state_dict())
        for layer in ("0", "2"):
            torch.testing.assert_close(_state(fresh, layer).matrix, _state(trained, layer).matrix)
            assert int(_state(fresh, layer).updates) == 4


def test_fold_bakes_R_into_plain_weights():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    x = torch.randn(5, 1, 4, 4)
    _decorrelate(model, x, lr=0.05)
    for _ in range(3):
        model(x)
    model.eval()
    expected = model(x)
    plain = effcompile.fold(model)
    assert type(plain[0]) is nn.Conv2d and type(plain[3]) is nn.Linear
    assert not any(isinstance(m, DecorrelationState) for m in plain.modules())
    assert set(plain.state_dict()) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)
    # the training model is untouched
    assert isinstance(model[0].weight_decorrelation, DecorrelationState)


class TestPlan:
    def test_every_layer_has_a_decision(self):
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
        _decorrelate(model, torch.randn(1, 1, 4, 4))
        plan = effcompile.report(model)
        assert [(row.layer, row.action, row.op) for row in plan] == [
            ("0", Action.REWRITE, "conv2d"), ("2", Action.REWRITE, "linear")]
        assert plan.row("0").details["d"] == 9
        assert "rewrite" in plan.table() and "decorrelation" in plan.table()

    def test_unsupported_layers_are_skipped_with_reason_and_warned(self):
        model = _AwkwardLayers()
        with pytest.warns(UserWarning, match="skipped 4 layer"):
            effcompile.transform(model, effcompile.Decorrelation(input_layers=True), example_inputs=(torch.randn(2, 4),))
        plan = effcompile.report(model)
        for tied in ("tied_a", "tied_b"):
            assert plan.row(tied).action == Action.SKIP and "tied" in plan.row(tied).reason
        assert plan.row("up").action == Action.SKIP and "transposed" in plan.row("up").reason
        assert plan.row("scaled").action == Action.SKIP and "also used by" in plan.row("scaled").reason
        assert plan.row("plain").action == Action.REWRITE

    def test_errors_are_clear(self):
        model = nn.Linear(3, 2)
        with pytest.raises(ValueError, match="example_inputs"):
            effcompile.transform(model, effcompile.Decorrelation(input_layers=True))
        with pytest.raises(ValueError, match="at least one pass"):
            effcompile.transform(model, example_inputs=(torch.randn(1, 3),))
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True), example_inputs=(torch.randn(1, 3),))
        with pytest.raises(ValueError, match="already carries"):
            effcompile.transform(model, effcompile.Decorrelation(input_layers=True), example_inputs=(torch.randn(1, 3),))
        with pytest.raises(ValueError, match="not transformed"):
            effcompile.report(nn.Linear(2, 2))


class _AwkwardLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(4, 4)
        self.tied_a = nn.Linear(4, 4, bias=False)
        self.tied_b = nn.Linear(4, 4, bias=False)
        self.tied_b.weight = self.tied_a.weight
        self.scaled = nn.Linear(4, 4)
        self.up = nn.ConvTranspose1d(1, 1, 2)

    def forward(self, x):
        h = self.plain(x)
        h = self.tied_b(self.tied_a(h))
        h = self.scaled(h) + self.scaled.weight.sum()  # weight used outside the layer too
        return self.up(h.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("num_rows", [5, 40], ids=["fewer-rows-than-features", "more-rows-than-features"])
def test_update_rule_matches_the_formula(num_rows):
    """R ← R − η[(1−κ)·C·R + κ·diag(v)·R], C = off-diagonal of ZᵀZ/n, v = mean(z²) − 1 (rows of diag(v)·R)."""
    layer = nn.Linear(12, 3)
    _decorrelate(layer, torch.randn(2, 12), lr=0.05, kappa=0.3, rows_per_dim=1000)
    _randomise_matrices(layer)
    state = _state(layer, "<root>")
    R = state.matrix[0].clone()
    x = torch.randn(num_rows, 12) * torch.linspace(0.5, 2.0, 12)
    z = x @ R.T
    second_moment = z.T @ z / num_rows
    C = second_moment - torch.diag(torch.diag(second_moment))
    v = torch.diag(second_moment) - 1
    expected = R - 0.05 * ((1 - 0.3) * C @ R + 0.3 * torch.diag(v) @ R)
    layer(x)  # all rows are used: num_rows ≤ the row budget
    torch.testing.assert_close(state.matrix[0], expected, rtol=1e-5, atol=1e-6)


def test_statistics_stay_fp32_under_autocast():
    layer = nn.Linear(8, 4)
    x = torch.randn(32, 8)
    _decorrelate(layer, x, lr=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    state = _state(layer, "<root>")
    assert out.dtype == torch.bfloat16
    assert state.matrix.dtype == torch.float32 and int(state.updates) == 1
    # The update equals the fp32 update on the same rows (bf16 would differ at ~1e-3).
    reference = nn.Linear(8, 4)
    _decorrelate(reference, x, lr=0.05)
    reference(x)
    torch.testing.assert_close(state.matrix, _state(reference, "<root>").matrix, rtol=1e-6, atol=1e-7)


def test_feature_major_patches_are_the_same_rows_stored_transposed():
    """Compiled steps gather patches feature-major (faster Inductor code): same values, same draw."""
    x = torch.randn(3, 4, 7, 6)
    geometry = ConvGeometry(2, (3, 2), (2, 1), (1, 0), (1, 1), 1)
    torch.manual_seed(5)
    rows = sample_patches(x, geometry, 40)
    torch.manual_seed(5)
    transposed = sample_patches(x, geometry, 40, feature_major=True)
    assert transposed.shape == rows.shape == (40, 24)
    assert transposed.t().is_contiguous() and not transposed.is_contiguous()
    assert torch.equal(transposed, rows)
    compiled = torch.compile(sample_patches, backend="inductor", fullgraph=True)
    torch.manual_seed(5)
    drawn = compiled(x, geometry, 40, feature_major=True)
    every_patch = _patches(x, (3, 2), (2, 1), (1, 0)).reshape(-1, 24)
    distance = torch.cdist(drawn, every_patch, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert distance.max() < 1e-5  # compiled draws differ from eager's, but are real patches


def test_compiled_partial_last_batch_keeps_one_graph_without_breaks():
    """A partial batch makes Dynamo recompile with a symbolic batch size; the update's row count
    (every row of these small batches) is specialised there, so each batch size compiles one graph
    with no graph break (before: a break per update, then a third compile)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    _decorrelate(model, torch.randn(8, 6), update_every=1)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), compile=True,
                                 backend=backend)
    counters.clear()
    updates = []
    for rows in (8, 8, 5, 8, 5):
        step(torch.randn(rows, 6), torch.randint(0, 3, (rows,)))
        updates.append(int(_state(model, "0").updates))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert len(graphs) == 2  # batch 8, then batch 5
    assert updates == [1, 2, 3, 4, 5]  # every step updated R, inside the compiled graphs


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_inductor_step_survives_a_partial_last_batch(autocast):
    """A partial batch through Inductor, the update every other step (computed every step and
    masked since 2026-12-06; a torch.cond before): with a
    symbolic row count inside the branch, torch 2.13's Inductor failed to generate it ("expected
    [s] to have been codegen-ed") when a conv layer's update took every row of the batch.  Under
    bf16 autocast the patches' fp32 cast was laid out row-major by Inductor while the branch was
    traced with the transposed (feature-major) strides: a stride assertion on the first step (the
    second conv: its input is a bf16 activation, the first one's the fp32 model input)."""
    torch.manual_seed(0)
    # 8x8 maps, 144 features: the update's 4·144 row budget exceeds a batch's 64·B rows
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(512, 3))
    _decorrelate(model, torch.randn(8, 16, 8, 8), update_every=2)  # a device-side update schedule
    torch._dynamo.reset()
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), compile=True,
                                 backend="effcompile")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = [step(torch.randn(rows, 16, 8, 8), torch.randint(0, 3, (rows,))) for rows in (8, 6, 8, 6)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert int(_state(model, "0").updates) == int(_state(model, "2").updates) == 2  # steps 1 and 3


class _Pooled:
    """A model output object the user's forward writes to (transformers' ModelOutput, a dataclass)."""

    def __init__(self, pooled):
        self.pooled = pooled


class _Towers(nn.Module):
    """CLIP's pattern: ``out.pooler_output = self.proj(out.pooler_output)`` after a tower."""

    def __init__(self) -> None:
        super().__init__()
        self.tower, self.proj = nn.Linear(16, 16), nn.Linear(16, 4, bias=False)

    def forward(self, x):
        out = _Pooled(torch.relu(self.tower(x)))
        out.pooled = self.proj(out.pooled)
        return out.pooled


@pytest.mark.parametrize("apply", ["weight", "input"])
def test_compiled_decorrelation_keeps_attribute_writes(apply):
    """With the update every other step (a device-side schedule when compiled), a torch.cond in
    the traced forward made Dynamo drop the write to ``out.pooled``: the compiled model returned
    the tower's 16 features, not the 4 projected ones, and ``proj`` got no gradient.  The compiled
    steps now equal the eager ones."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    trained = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = _Towers()
        _decorrelate(model, x, update_every=2, apply=apply)
        _randomise_matrices(model)
        step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                                     compile=compiled, backend="effcompile_aot_eager")
        losses = [float(step(x, y)) for _ in range(3)]
        assert model.proj._parameters["weight"].grad is not None  # (.weight is W·R on the weight side)
        trained[compiled] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()},
                             int(_state(model, "proj").updates))
    assert trained[True][2] == trained[False][2] == 2  # steps 1 and 3 updated R
    assert trained[True][0] == pytest.approx(trained[False][0], rel=1e-5)
    for name, value in trained[False][1].items():
        torch.testing.assert_close(trained[True][1][name], value, rtol=1e-5, atol=1e-6, msg=name)


class TestInputLayers:
    """``input_layers=False`` (the default) leaves the layers that read the model's input alone."""

    def _model(self):
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))

    def test_input_layer_is_skipped_by_default_shown_in_the_plan_and_not_warned(self):
        model = self._model()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a skip the config asked for is not a warning
            effcompile.transform(model, effcompile.Decorrelation(max_overhead=None), example_inputs=(torch.randn(4, 1, 4, 4),))
        plan = effcompile.report(model)
        assert plan.row("1").action == Action.SKIP and "input layer" in plan.row("1").reason
        assert plan.row("1").details["skipped_by"] == "input_layers"
        assert plan.row("3").action == Action.REWRITE
        assert set(decorrelation_states(model)) == {"3"}

    def test_input_layers_true_decorrelates_it_too(self):
        model = self._model()
        _decorrelate(model, torch.randn(4, 1, 4, 4), input_layers=True)
        assert set(decorrelation_states(model)) == {"1", "3"}

    def test_a_layer_fed_by_computed_features_is_not_an_input_layer(self):
        class Scaled(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 2)

            def forward(self, x):
                return self.fc(torch.tanh(x))  # the layer reads a computed tensor, not the input itself

        model = Scaled()
        effcompile.transform(model, effcompile.Decorrelation(max_overhead=None), example_inputs=(torch.randn(3, 4),))
        assert set(decorrelation_states(model)) == {"fc"}

    def test_a_model_of_input_layers_only_is_warned_not_silently_untouched(self):
        model = nn.Linear(3, 2)
        with pytest.warns(UserWarning, match="no other layer to decorrelate"):
            effcompile.transform(model, effcompile.Decorrelation(), example_inputs=(torch.randn(2, 3),))
        assert decorrelation_states(model) == {}
