"""The capture marks the layers applied to the model's own inputs (``WeightUse.reads_model_input``).

An input layer reads a model input through views, reshapes, casts and a fixed affine rescaling
(by numbers or buffers); a layer that reads anything the model computed (an activation, a mix of
two inputs, an input scaled by a parameter) is not one.
"""

import torch
import torch.nn as nn

from effcompile.inputs import ModelInputs
from effcompile.passes.analysis.capture import capture


def _reads_input(model, example):
    return {layer.owner_path: any(use.reads_model_input for use in layer.uses)
            for layer in capture(model, example).layers}


class _TwoInputs(nn.Module):
    """A keyword image input (flattened, cast) and a positional tabular one, plus hidden layers."""

    def __init__(self):
        super().__init__()
        self.image_in = nn.Linear(16, 8)
        self.table_in = nn.Linear(3, 8)
        self.scaled_in = nn.Linear(3, 8)
        self.learned_in = nn.Linear(3, 8)
        self.gain = nn.Parameter(torch.ones(3))
        self.register_buffer("mean", torch.zeros(3))
        self.hidden = nn.Linear(8, 4)

    def forward(self, table, image=None):
        h = self.image_in(image.flatten(1).float()) + self.table_in(table)
        h = h + self.scaled_in((table - self.mean) * 2.0)  # a fixed rescaling: still the raw input
        h = h + self.learned_in(table * self.gain)  # a learned one: features the model computes
        return self.hidden(torch.relu(h))


def test_input_layers_are_found_through_views_and_casts_for_positional_and_keyword_inputs():
    example = ModelInputs((torch.randn(2, 3),), {"image": torch.randn(2, 1, 4, 4, dtype=torch.float64)})
    assert _reads_input(_TwoInputs(), example) == {
        "image_in": True, "table_in": True, "scaled_in": True, "learned_in": False, "hidden": False}


def test_a_stem_convolution_reads_the_input_and_later_convolutions_do_not():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    assert _reads_input(model, (torch.randn(2, 3, 6, 6),)) == {"0": True, "2": False, "4": False}
