"""Configs are validated at construction and round-trip through dicts."""

import pytest
import torch

import effcompile
from effcompile.config import config_from_dict


@pytest.mark.parametrize(
    "field, value",
    [("lr", 0.0), ("lr", 1.0), ("lr", float("nan")), ("lr", "0.1"), ("kappa", -0.1), ("kappa", 1.5),
     ("rows_per_dim", 0), ("max_block_size", 0), ("max_block_size", 2.5), ("update_every", 0),
     ("divergence_threshold", 1.0), ("sync_statistics", 1), ("update_dtype", "float16"), ("update_dtype", torch.bfloat16),
     ("input_layers", 1)],
)
def test_bad_decorrelation_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"Decorrelation\.{field}="):
        effcompile.Decorrelation(**{field: value})


def test_round_trip_through_dict():
    config = effcompile.Decorrelation(lr=0.01, kappa=0.25, update_every=2)
    data = config.to_dict()
    assert data["pass"] == "decorrelation" and data["version"] == 1
    assert config_from_dict(data) == config


def test_from_dict_rejects_unknown_pass_and_fields():
    with pytest.raises(ValueError, match="unknown pass"):
        config_from_dict({"pass": "magic"})
    with pytest.raises(ValueError, match="no field"):
        config_from_dict({"pass": "decorrelation", "learning_rate": 0.1})


def test_configs_are_immutable():
    config = effcompile.Decorrelation()
    with pytest.raises(Exception):
        config.lr = 0.5
