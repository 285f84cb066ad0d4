"""The R update: every formula the cost rule can pick gives the plain formula's R (fp32, 1e-6).

The plain formula is written out here per block: z = R·x on the rows, C = ZᵀZ/n − diag(ZᵀZ/n),
v = mean(z²) − 1, R ← R − η[(1−κ)·C·R + κ·diag(v)·R].  The rows are every input row (linear)
or every patch (convolution, from F.unfold), so nothing is sampled.
"""

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.passes.decorrelation import decorrelation_states
from effcompile.passes.decorrelation.state import MAX_STEP, UPDATE_FORMULAS, update_formula, update_macs

pytestmark = pytest.mark.usefixtures("single_thread")

LR, KAPPA = 0.05, 0.3


def _decorrelated(layer, x, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # No budget: these layers are tiny, and a longer interval would also scale the step.
        config.setdefault("max_overhead", None)
        effcompile.transform(layer, effcompile.Decorrelation(input_layers=True, lr=LR, kappa=KAPPA, rows_per_dim=1000, **config),
                             example_inputs=(x,))
    state = decorrelation_states(layer)["<root>"]
    with torch.no_grad():  # a random, well-conditioned R, so the check is not trivially R = I
        state.matrix.add_(0.2 * torch.randn_like(state.matrix) / math.sqrt(state.block))
    return state


def _plain_update(R, x, mask, lr=LR):
    """One block: R (b, b), rows x (n, b), mask (b,) of real (unpadded) features; a step longer
    than MAX_STEP in Frobenius norm is shortened to it."""
    z = x @ R.T
    second_moment = z.T @ z / x.shape[0]
    C = second_moment - torch.diag(torch.diag(second_moment))
    v = (z * z).mean(dim=0) - 1
    A = (1 - KAPPA) * C + KAPPA * torch.diag(v * mask)
    eta = min(lr, MAX_STEP / float(torch.linalg.matrix_norm(A)))
    return R - eta * A @ R


def _plain_blocks(state, rows):
    """rows (n, groups·d) → the expected matrices (blocks, b, b), block by block."""
    groups, d, blocks, b = state.spec.groups, state.spec.group_dim, state.blocks_per_group, state.block
    rows = F.pad(rows.view(rows.shape[0], groups, d), (0, blocks * b - d)).view(rows.shape[0], groups * blocks, b)
    mask = (torch.arange(blocks * b) < d).float().view(blocks, b).repeat(groups, 1)
    return torch.stack([_plain_update(state.matrix[k], rows[:, k], mask[k]) for k in range(groups * blocks)])


def _linear_case():
    layer = nn.Linear(12, 3)
    x = torch.randn(60, 12) * torch.linspace(0.5, 2.0, 12)
    return layer, x, x


def _block_diagonal_case():
    layer = nn.Linear(20, 3)  # max_block_size 8: 3 blocks of 7, one padded feature
    x = torch.randn(50, 20) @ (torch.eye(20) + 0.3 * torch.randn(20, 20))
    return layer, x, x


def _conv_case(groups):
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
    x = torch.randn(2, 4, 5, 5)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 4 // groups * 9 * groups)  # channel-major
    return conv, x, patches


CASES = {
    "linear": (_linear_case, {}),
    "block-diagonal": (_block_diagonal_case, {"max_block_size": 8}),
    "conv": (lambda: _conv_case(1), {}),
    "grouped-conv": (lambda: _conv_case(2), {}),
    "depthwise-conv": (lambda: _conv_case(4), {}),
}


@pytest.mark.parametrize("formula", UPDATE_FORMULAS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_formula_equals_the_plain_formula(case, formula):
    build, config = CASES[case]
    layer, x, rows = build()
    state = _decorrelated(layer, x, **config)
    expected = _plain_blocks(state, rows)
    sampled = state._sample_rows(x)
    assert sampled.shape[0] == rows.shape[0]  # every row / patch is used: nothing random
    state._update(sampled, True, formula)
    torch.testing.assert_close(state.matrix, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_training_forward_applies_the_plain_formula(case):
    """Through the real path (rows gathered in the forward, formula picked by the cost rule)."""
    build, config = CASES[case]
    layer, x, rows = build()
    state = _decorrelated(layer, x, **config)
    expected = _plain_blocks(state, rows)
    layer(x)
    torch.testing.assert_close(state.matrix, expected, rtol=0, atol=1e-6)
    assert int(state.updates) == 1


@pytest.mark.parametrize("formula", UPDATE_FORMULAS)
def test_a_step_longer_than_max_step_is_shortened(formula):
    # 48 strongly correlated features: ‖η·A‖_F ≈ 0.9·(1−κ)·48·ρ ≫ MAX_STEP at init.
    layer = nn.Linear(48, 3)
    x = torch.randn(400, 1) + 0.3 * torch.randn(400, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(layer, effcompile.Decorrelation(input_layers=True, lr=0.9, kappa=KAPPA, rows_per_dim=1000), example_inputs=(x,))
    state = decorrelation_states(layer)["<root>"]
    expected = _plain_update(state.matrix[0].clone(), x, torch.ones(48), lr=0.9)
    state._update(state._sample_rows(x), True, formula)
    torch.testing.assert_close(state.matrix[0], expected, rtol=0, atol=1e-5)
    step = state.matrix[0] - torch.eye(48)  # from R = I: the step is η·A
    assert float(torch.linalg.matrix_norm(step)) == pytest.approx(MAX_STEP, rel=1e-4)


def test_large_steps_decorrelate_instead_of_diverging(monkeypatch):
    # lr = 0.9 on correlated inputs: with the step bounded, R decorrelates tenfold; with it
    # unbounded the same updates overshoot and are rejected (R blows past divergence_threshold).
    from effcompile.passes.decorrelation import state as state_module

    def run(max_step):
        monkeypatch.setattr(state_module, "MAX_STEP", max_step)
        torch.manual_seed(0)
        layer = nn.Linear(48, 3)
        x = torch.randn(400, 1) + 0.3 * torch.randn(400, 48)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            effcompile.transform(layer, effcompile.Decorrelation(input_layers=True, lr=0.9, rows_per_dim=4, max_overhead=None),
                                 example_inputs=(x,))
        state = decorrelation_states(layer)["<root>"]
        before = float(state.off_diagonal_correlation(x))
        for _ in range(60):
            layer(x)
        return before, float(state.off_diagonal_correlation(x)), int(state.rejected_updates)

    before, after, rejected = run(MAX_STEP)
    assert after < before / 10 and rejected == 0
    _, unbounded_after, unbounded_rejected = run(float("inf"))
    assert unbounded_rejected > 0 and unbounded_after > before / 10


def test_the_cost_rule_picks_the_cheapest_formula():
    b = 64
    assert update_formula(b // 2, b) == "rows"  # 3·n·b² + n²·b < 2·n·b² + b³ below n ≈ 0.62·b
    assert update_formula(b, b) == "gram"
    assert update_formula(3 * b // 2, b) == "gram"
    assert update_formula(4 * b, b) == "covariance"  # the default budget: 7·b³ instead of 9·b³
    assert update_macs("covariance", 4 * b, b) / update_macs("gram", 4 * b, b) == pytest.approx(7 / 9)
    assert update_formula(b // 2, b, syncing=True) == "gram"  # DDP: the statistic must be formed to be averaged
    for n in (1, 7, 64, 100, 129, 500):
        chosen = update_formula(n, b)
        assert update_macs(chosen, n, b) == min(update_macs(formula, n, b) for formula in UPDATE_FORMULAS)


@pytest.mark.parametrize("formula", UPDATE_FORMULAS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_update_products_stay_within_rounding_of_the_plain_formula(case, formula):
    """update_dtype="bfloat16": only the increment η·(...) is rounded, and it moves R as the
    plain fp32 formula does to about bf16's precision; R itself keeps fp32 (the result is not
    the bf16 rounding of anything)."""
    build, config = CASES[case]
    layer, x, rows = build()
    state = _decorrelated(layer, x, update_dtype="bfloat16", **config)
    assert state.update_dtype == torch.bfloat16
    start = state.matrix.clone()
    expected = _plain_blocks(state, rows)
    state._update(state._sample_rows(x), True, formula)
    increment = (expected - start).abs().max()
    error = (state.matrix - expected).abs().max()
    assert error > 0  # the bf16 products ran: the fp32 path matches to 1e-6 (above)
    assert error < 0.1 * increment, (float(error), float(increment))  # measured 0.8-3% over these cases
    assert state.matrix.dtype == torch.float32
    assert not torch.equal(state.matrix, state.matrix.bfloat16().float())  # R keeps its fp32 digits


def _large_linear():
    return nn.Linear(256, 8), torch.randn(1100, 256)  # one 256-block, n = 1100 rows: ~122M MACs per update


UNBUDGETED = {"max_overhead": None}  # keep the one 256-block (the budget would split this narrow layer)


def test_auto_update_dtype_follows_the_hardware_and_the_update_size(monkeypatch):
    from effcompile.passes.decorrelation import state as state_module

    assert state_module.BF16_MIN_UPDATE_MACS > 0
    for native in (True, False):
        monkeypatch.setattr(state_module, "native_bf16_matmul", lambda device, native=native: native)
        large, x = _large_linear()
        assert _decorrelated(large, x, **UNBUDGETED).update_dtype == (torch.bfloat16 if native else torch.float32)
        small = nn.Linear(64, 8)  # 64-block: a dispatch-bound update stays fp32 on any hardware
        assert _decorrelated(small, torch.randn(300, 64), **UNBUDGETED).update_dtype == torch.float32
        few_rows = nn.Linear(256, 8)  # the same block met by 40 rows a step: a small update
        assert _decorrelated(few_rows, torch.randn(40, 256), **UNBUDGETED).update_dtype == torch.float32
    # Explicit choices ignore both.
    large, x = _large_linear()
    assert _decorrelated(large, x, update_dtype="float32", **UNBUDGETED).update_dtype == torch.float32
    small = nn.Linear(8, 2)
    assert _decorrelated(small, torch.randn(40, 8), update_dtype="bfloat16").update_dtype == torch.bfloat16


def test_auto_update_dtype_is_resolved_again_after_a_move_and_reported(monkeypatch):
    from effcompile.passes.decorrelation import state as state_module

    monkeypatch.setattr(state_module, "native_bf16_matmul", lambda device: False)
    layer, x = _large_linear()
    state = _decorrelated(layer, x, **UNBUDGETED)
    assert state.update_dtype == torch.float32
    assert effcompile.report(layer).row("<root>").details["update_dtype"] == "float32"
    monkeypatch.setattr(state_module, "native_bf16_matmul", lambda device: True)  # e.g. moved to a GPU
    layer.to("cpu")
    assert state.update_dtype == torch.bfloat16
    assert effcompile.report(layer).row("<root>").details["update_dtype"] == "bfloat16"


def test_compiled_bf16_updates_match_eager_on_the_update_every_schedule():
    """The bf16 products inside the compiled step's torch.cond branch (update_every=2) move R as
    the eager step does; every row is used (rows_per_dim=1000), so nothing is sampled."""
    import copy

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(8, 24) * torch.linspace(0.5, 2.0, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(eager, effcompile.Decorrelation(input_layers=True, lr=LR, kappa=KAPPA, rows_per_dim=1000, update_every=2,
                                                             max_overhead=None, update_dtype="bfloat16"),
                             example_inputs=(x,))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="effcompile")
    for _ in range(4):
        eager(x)
        compiled(x)
    pairs = zip(decorrelation_states(eager).items(), decorrelation_states(compiled_model).values())
    for (layer, state), other in pairs:
        assert state.update_dtype == other.update_dtype == torch.bfloat16
        assert int(state.updates) == int(other.updates) == 2, layer
        assert not torch.equal(state.matrix, torch.eye(state.matrix.shape[-1]).expand_as(state.matrix)), layer
        torch.testing.assert_close(other.matrix, state.matrix, rtol=1e-3, atol=1e-4, msg=layer)
