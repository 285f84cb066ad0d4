"""Shared fixtures: deterministic seeds, a clean Dynamo state per test, warnings as data."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_reset_dynamo():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_configure(config):
    torch.set_num_threads(max(1, torch.get_num_threads()))
