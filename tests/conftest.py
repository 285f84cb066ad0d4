"""Shared fixtures: deterministic seeds, a clean Dynamo state per test, warnings as data."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_reset_dynamo():
    torch.manual_seed(0)
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def pytest_configure(config):
    torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-tensor tests (``pytestmark = usefixtures("single_thread")``).

    Tiny tensors gain nothing from intra-op threads, and on a shared 2-core CI machine OpenMP
    spin-waits made GEMM/conv loops 5-50x slower whenever another process held a core.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class JointLog:
    """What the joint-graph passes rewrote in every graph compiled during one test."""

    def __init__(self, log):
        self.graphs = log

    def last(self, pass_name):
        """The records of ``pass_name`` in the most recently rewritten joint graph ([] if none)."""
        return list(self.graphs[-1][pass_name].records) if self.graphs else []

    def all(self, pass_name):
        return [record for results in self.graphs for record in results[pass_name].records]


@pytest.fixture
def joint_log():
    from effcompile.passes.joint import recording

    with recording() as log:
        yield JointLog(log)
