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
from effcompile.passes.decorrelation.state import UPDATE_FORMULAS, update_formula, update_macs

pytestmark = pytest.mark.usefixtures("single_thread")

LR, KAPPA = 0.05, 0.3


def _decorrelated(layer, x, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(layer, effcompile.Decorrelation(lr=LR, kappa=KAPPA, rows_per_dim=1000, **config),
                             example_inputs=(x,))
    state = decorrelation_states(layer)["<root>"]
    with torch.no_grad():  # a random, well-conditioned R, so the check is not trivially R = I
        state.matrix.add_(0.2 * torch.randn_like(state.matrix) / math.sqrt(state.block))
    return state


def _plain_update(R, x, mask):
    """One block: R (b, b), rows x (n, b), mask (b,) of real (unpadded) features."""
    z = x @ R.T
    second_moment = z.T @ z / x.shape[0]
    C = second_moment - torch.diag(torch.diag(second_moment))
    v = (z * z).mean(dim=0) - 1
    return R - LR * ((1 - KAPPA) * C @ R + KAPPA * torch.diag(v * mask) @ R)


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


def test_the_cost_rule_picks_the_cheapest_formula():
    b = 64
    assert update_formula(b // 2, b) == "rows"  # 3·n·b² < 2·n·b² + b³
    assert update_formula(b, b) in ("rows", "gram")  # a tie
    assert update_formula(3 * b // 2, b) == "gram"
    assert update_formula(4 * b, b) == "covariance"  # the default budget: 7·b³ instead of 9·b³
    assert update_macs("covariance", 4 * b, b) / update_macs("gram", 4 * b, b) == pytest.approx(7 / 9)
    assert update_formula(b // 2, b, syncing=True) == "gram"  # DDP: the statistic must be formed to be averaged
    for n in (1, 7, 64, 100, 129, 500):
        chosen = update_formula(n, b)
        assert update_macs(chosen, n, b) == min(update_macs(formula, n, b) for formula in UPDATE_FORMULAS)
