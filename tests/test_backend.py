"""The backend ladder: eager → aot_eager → effcompile (Inductor) give the same training run.

Inductor compiles are slow on CPU, so one small model is compiled once per backend and the
same run checks parity and the absence of recompiles.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile._compat import unique_graph_count

STEPS = 20


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))


def _run(backend, update_every=1):
    model = _model()
    x = torch.randn(8, 1, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.02, update_every=update_every, max_overhead=None), example_inputs=(x,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    step = effcompile.train_step(model, F.cross_entropy, optimizer, compile=backend is not None,
                                 backend=backend or "effcompile")
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 6, 6, generator=generator), torch.randint(0, 5, (8,), generator=generator))
               for _ in range(STEPS)]
    graphs_before = unique_graph_count()
    torch.manual_seed(2)  # the R update samples rows: same seed, same rows (fallback_random below)
    losses = torch.stack([step(inputs, targets) for inputs, targets in batches])
    state = model[0].weight_decorrelation
    return losses, state.matrix.clone(), int(state.updates), unique_graph_count() - graphs_before


@pytest.fixture(scope="module")
def eager_run():
    return _run(None)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("effcompile", marks=pytest.mark.slow)])
def test_compiled_training_matches_eager_without_recompiles(backend, eager_run):
    with torch._dynamo.config.patch(error_on_recompile=True), torch._inductor.config.patch(fallback_random=True):
        losses, matrix, updates, graphs = _run(backend)
    eager_losses, eager_matrix, eager_updates, _ = eager_run
    assert graphs == 1, "one graph for the whole run: no recompiles across training steps"
    assert updates == eager_updates == STEPS
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(matrix, eager_matrix, rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0]


def test_train_steps_between_updates_run_a_graph_without_the_update():
    """train_step's compiled step tells the state whether the step updates R (a Python bool the
    graph specialises on): one graph with the update, one without it, each compiled once, and R
    follows eager's schedule exactly."""
    graphs = []

    def recording(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    _, matrix, updates, _ = _run(recording, update_every=3)
    _, eager_matrix, eager_updates, _ = _run(None, update_every=3)
    assert updates == eager_updates == len(range(0, STEPS, 3))
    torch.testing.assert_close(matrix, eager_matrix, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 2, "one graph per schedule pattern, no recompiles after them"
    products = sorted(sum(node.target in (torch.bmm, torch.matmul) for node in graph.graph.nodes) for graph in graphs)
    assert products[0] == 0 < products[1], "the graph between updates has none of the update's products"


def test_compiled_update_every_k_follows_the_eager_schedule_without_a_cond():
    """The schedule is a device mask in the graph, not a ``torch.cond`` (with one, Dynamo dropped
    attribute writes to the user's Python objects traced after it; tests/passes/decorrelation): R
    follows eager's schedule, updated on steps 1, 4 and 7 only."""
    graphs = []

    def recording(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = _model()
    x = torch.randn(8, 1, 6, 6)
    effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.02, update_every=3, max_overhead=None), example_inputs=(x,))
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=recording)
    torch.manual_seed(3)
    batches = [torch.randn(8, 1, 6, 6) for _ in range(7)]
    for inputs in batches:
        torch.manual_seed(4)  # the update samples rows: the same rows in both runs
        compiled(inputs)
        torch.manual_seed(4)
        reference(inputs)
    conds = [node for graph in graphs for node in graph.graph.nodes if node.target is torch.ops.higher_order.cond]
    assert graphs and not conds
    for state, expected in zip(_decorrelation_states(model), _decorrelation_states(reference)):
        assert int(state.updates) == int(expected.updates) == 3  # steps 1, 4, 7
        torch.testing.assert_close(state.matrix, expected.matrix, rtol=1e-5, atol=1e-6)


def _decorrelation_states(model):
    from effcompile.passes.decorrelation import decorrelation_states

    return list(decorrelation_states(model).values())


def test_backend_is_registered_by_name():
    assert "effcompile" in torch._dynamo.list_backends()
    compiled = torch.compile(nn.Linear(3, 2), backend="effcompile")
    assert compiled(torch.randn(4, 3)).shape == (4, 2)


def test_entry_point_registers_the_backend_without_importing_effcompile():
    """An installed effcompile is found by torch.compile through the torch_dynamo_backends entry point."""
    import importlib.metadata
    import subprocess
    import sys

    names = {entry.name for entry in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    if "effcompile" not in names:
        pytest.skip("effcompile is not installed (run `make test`, which installs it editable)")
    script = (
        "import sys, torch\n"
        "assert 'effcompile' not in sys.modules\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "backend = lookup_backend('effcompile')\n"
        "assert backend.__module__ == 'effcompile.backend', backend.__module__\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
