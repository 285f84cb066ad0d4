"""Sample selection under BatchNorm (issue 19): the rows are scored by a train-mode forward.

With BatchNorm the pass re-forwards: a no-grad scoring forward over the B rows, then forward and
backward of the k selected rows.  The scoring forward normalises by the batch's own statistics
(train mode, as plain backprop's forward does), leaves running statistics untouched and has
dropout off; the step returns the mean of those per-sample losses.  Previously the scores came
from an eval-mode forward whose running statistics lag the weights early in training, and the
returned loss looked like divergence (resnet18: 2.5 → 233 while backprop's loss stayed 2.4–3.7).

Stand-ins for resnet/efficientnet (torchvision is not installed): the zoo's ResNet-18 at width 8
for the loss magnitudes, and a small conv-BN / linear-BatchNorm1d net for the exact checks; the
inputs are unnormalised (mean 5, std 10, like raw pixel values), where running statistics
starting at (0, 1) lag most.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.models import get_model
from effcompile.passes import GreedyStages, SampleSelection
from effcompile.passes.sample_selection import SelectionStep
from effcompile.passes.sample_selection.selectors import selector_of

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH = 8
STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


class BNNet(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc, self.bn3 = nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(self.drop(F.relu(self.bn3(self.fc(x.flatten(1))))))


def _batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 3, 8, 8, generator=generator) * 10 + 5, torch.randint(0, 10, (BATCH,), generator=generator))
            for _ in range(count)]


def _selecting(model, *extra, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return effcompile.transform(model, *extra, SampleSelection(**config), example_inputs=(_batches(1)[0][0],))


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _stats(model):
    return {key: value.clone() for key, value in model.state_dict().items() if key.rpartition(".")[2] in STAT_NAMES}


def _spy_scores(model):
    """Record the per-sample losses the selector is given (the scores)."""
    selector, seen = selector_of(model), []
    original = selector.select

    def spy(losses, features=None, errors=None):
        seen.append(losses.detach().clone())
        return original(losses, features=features, errors=errors)

    selector.select = spy
    return seen


@pytest.mark.parametrize("strategy", ["loss", "random"])
def test_returned_losses_are_backprops_training_losses_not_eval_losses(strategy):
    """The zoo's ResNet-18 (width 8, 16×16 unnormalised inputs), SGD lr 0.01 momentum 0.9, batch 8:
    the returned loss tracks plain backprop's on the same batches.

    Measured (strategy 'loss', keep 0.5): backprop 2.44 2.40 2.58 2.64 2.67 2.49; selection 2.44
    2.36 2.55 2.50 2.64 2.50 (the first step exactly backprop's).  The eval-mode scoring loss the
    step used to return: 32.4 8.5 8.1 4.0 3.2 3.0 (13x backprop's on the first step).
    """
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(BATCH, 3, 16, 16, generator=g) * 10 + 5, torch.randint(0, 10, (BATCH,), generator=g))
               for _ in range(6)]
    torch.manual_seed(0)
    plain = get_model("resnet18_cifar", in_channels=3, image_size=16, width=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        selecting = effcompile.transform(copy.deepcopy(plain), SampleSelection(keep=0.5, strategy=strategy),
                                         example_inputs=(batches[0][0],))
    assert effcompile.report(selecting).rows[0].details["mode"] == "reforward"
    plain_step = effcompile.train_step(plain, nn.CrossEntropyLoss(), _sgd(plain))
    step = effcompile.train_step(selecting, nn.CrossEntropyLoss(), _sgd(selecting))
    expected, returned = [], []
    for x, y in batches:
        expected.append(float(plain_step(x, y)))
        returned.append(float(step(x, y)))
    # The same weights, the same batch, train mode: exactly backprop's loss before the updates differ.
    assert returned[0] == pytest.approx(expected[0], rel=1e-5)
    ratios = [max(r / e, e / r) for r, e in zip(returned, expected)]
    assert max(ratios) < 3, (returned, expected)
    # What was backpropagated: the selected rows' weighted loss of their own train forward.
    assert step.last_subset_loss is not None and 0 < float(step.last_subset_loss) < 3 * expected[-1]


def test_scores_are_train_mode_per_sample_losses_and_scoring_leaves_running_stats():
    torch.manual_seed(0)
    model = _selecting(BNNet(dropout=0.5), keep=0.25, strategy="loss")
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model))
    scores = _spy_scores(model)
    for x, y in _batches(3):
        # The scores written plainly: a train-mode forward of the whole batch, dropout off.
        reference = copy.deepcopy(model)
        reference.train()
        reference.drop.eval()
        with torch.no_grad():
            expected = F.cross_entropy(reference(x), y, reduction="none")
        trained = copy.deepcopy(model)  # the weights and running stats before the step
        loss = step(x, y)
        torch.testing.assert_close(scores[-1], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, expected.mean(), rtol=1e-5, atol=1e-6)
        # Running stats: untouched by the scoring pass; the step's only update is one train-mode
        # forward of the trained rows (the k selected rows).
        index, weights = step.last_selection
        trained.train()
        with torch.no_grad():
            trained(x[index])
        for key, value in _stats(trained).items():
            torch.testing.assert_close(_stats(model)[key], value)
    before = _stats(model)
    x, y = _batches(1, seed=1)[0]
    step._scoring_pass((x,), y)
    assert all(torch.equal(before[key], value) for key, value in _stats(model).items())
    assert model.training and all(module.training for module in model.modules())


def test_a_frozen_eval_mode_batch_norm_stays_frozen_in_scoring():
    torch.manual_seed(0)
    model = _selecting(BNNet(), keep=0.5, strategy="random")
    model.bn1.eval()  # the user freezes one BatchNorm (fine-tuning): training uses its running stats
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model))
    scores = _spy_scores(model)
    x, y = _batches(1)[0]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        expected = F.cross_entropy(reference(x), y, reduction="none")
    step(x, y)
    torch.testing.assert_close(scores[-1], expected, rtol=1e-5, atol=1e-6)
    assert not model.bn1.training and model.bn2.training


def test_instance_norm_with_running_stats_and_functional_batch_norm_are_scored_in_train_mode():
    """Every layer whose train and eval forwards differ: InstanceNorm tracking running stats (not
    batch-coupled, forced re-forward) and F.batch_norm(training=self.training) in a custom module."""

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.inorm = nn.InstanceNorm2d(4, track_running_stats=True)
            self.fc = nn.Linear(4 * 8 * 8, 10)
            self.register_buffer("mean", torch.zeros(4 * 8 * 8))
            self.register_buffer("var", torch.ones(4 * 8 * 8))

        def forward(self, x):
            h = self.inorm(self.conv(x)).flatten(1)
            return self.fc(F.batch_norm(h, self.mean, self.var, training=self.training))

    torch.manual_seed(0)
    model = _selecting(Custom(), keep=0.5, strategy="loss", mode="reforward")
    details = effcompile.report(model).row("fc").details
    assert "InstanceNorm2d in 'inorm'" in details["scoring"] and "'<root>'" in details["scoring"]
    step = effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model))
    scores = _spy_scores(model)
    x, y = _batches(1)[0]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        expected = F.cross_entropy(reference(x), y, reduction="none")  # train mode
    before = {key: value.clone() for key, value in model.state_dict().items() if "selector" not in key}
    step._scoring_pass((x,), y)
    after = model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())
    step(x, y)
    torch.testing.assert_close(scores[-1], expected, rtol=1e-5, atol=1e-6)


def test_plan_shows_the_scoring_mode_and_the_returned_loss():
    model = _selecting(BNNet(dropout=0.1), keep=0.25, strategy="loss")
    plan = effcompile.report(model)
    details = plan.row("conv1").details
    assert details["mode"] == "reforward"
    assert details["scoring"].startswith("train-mode batch statistics of all B rows (BatchNorm2d in 'bn1', 'bn2'; "
                                         "BatchNorm1d in 'bn3')")
    assert "running stats untouched" in details["scoring"] and "dropout off ('drop')" in details["scoring"]
    assert "train-mode scoring forward" in details["returned_loss"]
    assert "train-mode batch statistics" in plan.row("conv1").reason and "eval" not in plan.row("conv1").reason
    assert plan.row("bn3").op == "BatchNorm1d"
    plain = _selecting(nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.Dropout(0.1), nn.Linear(16, 10)),
                       strategy="random")
    details = effcompile.report(plain).rows[0].details
    assert details["mode"] == "forward_reuse" and details["scoring"].startswith("the training forward itself")
    assert "dropout on ('2')" in details["scoring"]


class TestWithGreedyStages:
    def test_plan_says_each_stage_scores_by_its_own_training_forward(self):
        torch.manual_seed(0)
        model = _selecting(BNNet(), GreedyStages(num_stages=2), keep=0.5, strategy="loss")
        for row in effcompile.report(model).for_pass("sample_selection"):
            assert row.details["mode"] == "forward_reuse", row
            assert row.details["scoring"].startswith("each greedy stage's training forward"), row
        assert "greedy stages own the step" in effcompile.report(model).row("conv1", "sample_selection").reason

    def test_selection_before_stages_reports_the_mode_that_runs(self):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = effcompile.transform(BNNet(), SampleSelection(keep=0.5), GreedyStages(num_stages=2),
                                         example_inputs=(_batches(1)[0][0],))
        details = effcompile.report(model).row("conv1", "sample_selection").details
        assert details["mode"] == "forward_reuse" and "does not run" in details["composed"]
        assert not isinstance(effcompile.train_step(model, nn.CrossEntropyLoss(), _sgd(model)), SelectionStep)

    def test_forced_reforward_is_refused(self):
        with pytest.raises(effcompile.plan.PlanRefused, match="mode='reforward'.*greedy_stages"):
            _selecting(BNNet(), GreedyStages(num_stages=2), mode="reforward")


@pytest.mark.parametrize("strategy", ["loss", "random"])
def test_a_two_row_last_batch_selects_two_rows_for_batch_norm(strategy):
    """keep=0.5 of a 2-row last batch would re-forward one row: a BatchNorm over a 1×1 map then has
    one value per channel, which train mode refuses.  Where BatchNorm couples the rows, at least
    two are selected."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(BATCH, 3, 8, 8), torch.randint(0, 4, (BATCH,))
    effcompile.transform(model, SampleSelection(keep=0.5, strategy=strategy), example_inputs=(x,))
    step = effcompile.train_step(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.isfinite(step(x, y)) and len(step.last_selection[0]) == BATCH // 2
    assert torch.isfinite(step(x[:2], y[:2])) and len(step.last_selection[0]) == 2
