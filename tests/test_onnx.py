"""ONNX export of transformed zoo models: checker-valid, runs in onnxruntime, and the inspection
report, read from the ONNX graph's own node metadata, lists a decorrelation for every layer."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import effcompile
from effcompile import models

SMALL = {
    "mlp": {}, "cnn": {"widths": (8, 16, 16)}, "bagnet": {"widths": (4, 8, 8, 8), "stem_width": 4},
    "resnet18_cifar": {"width": 4}, "resnet18_imagenet": {"width": 4},
    "vit_tiny": {"embed_dim": 16, "depth": 2, "num_heads": 2},
}


def _linear_and_conv_paths(model):
    return {path for path, module in model.named_modules() if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))}


def test_every_zoo_model_is_covered():
    assert set(SMALL) == set(models.list_models())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_export_and_inspect_zoo_model(name, tmp_path):
    pytest.importorskip("onnxruntime")
    model = models.get_model(name, **SMALL[name])
    x = models.example_inputs(name, batch_size=2)
    layers = _linear_and_conv_paths(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a skipped layer would warn: none may be skipped
        effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.05), example_inputs=x)
    model.train()
    model(*x)  # one R update, so the exported W·R is not the identity product
    plan = effcompile.report(model)
    assert {row.layer for row in plan.applied()} == layers

    path = effcompile.export_onnx(model, x, tmp_path / f"{name}.onnx")
    rows = effcompile.inspect_onnx(path)
    assert {row["layer"] for row in rows} == layers
    # R on the weight: the W·R product; on the input (Decorrelation.apply): x·Rᵀ before the layer.
    products = {"weight": {"MatMul", "Einsum"}, "input": {"Gemm", "MatMul"}}
    side = {row.layer: row.details["apply"] for row in plan.applied()}
    assert all(row["pass"] == "decorrelation" and row["op"] in products[side[row["layer"]]] for row in rows)

    _assert_onnxruntime_matches(model, x, path)


def test_randomized_vjp_model_exports_its_unchanged_forward(tmp_path):
    """The randomized VJP only changes the backward: the exported forward is the plain one."""
    pytest.importorskip("onnxruntime")
    model = models.get_model("cnn", **SMALL["cnn"])
    x = models.example_inputs("cnn", batch_size=8)
    effcompile.transform(model, effcompile.RandomizedVJP(keep=0.5), example_inputs=x)
    path = effcompile.export_onnx(model, x, tmp_path / "cnn.onnx")
    assert effcompile.inspect_onnx(path) == []  # nothing inserted in the forward; see `effcompile inspect` for the backward
    _assert_onnxruntime_matches(model, x, path)


def _assert_onnxruntime_matches(model, x, path):
    """onnxruntime's output of the exported file equals the model's eval-mode forward."""
    import onnxruntime

    model.eval()
    with torch.no_grad():
        expected = model(*x).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x[0].numpy()})
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_a_decoder_that_returns_its_kv_cache_exports_its_logits(tmp_path):
    """A Hugging Face decoder in eval returns a ``DynamicCache`` (no pytree) beside its logits, which
    plain ``torch.onnx.export`` cannot flatten.  The export keeps the output's tensors (the cache
    object is left out): the file's first output is the logits, every decorrelated layer is listed."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("transformers")
    import onnxruntime
    from clients import CLIENTS

    client = CLIENTS["llama"]
    torch.manual_seed(0)
    model = client.build()
    inputs, targets = client.batch(4, 0)
    effcompile.transform(model, effcompile.Decorrelation(input_layers=True, lr=0.05), example_inputs=inputs)
    step = effcompile.train_step(model, client.loss, torch.optim.SGD(model.parameters(), lr=0.01))
    step(inputs, targets)  # R moves: the exported W·R is not the identity product
    model.eval()
    with torch.no_grad():
        output = model(**inputs)
    assert output.past_key_values is not None  # the cache object is there
    path = effcompile.export_onnx(model, inputs, tmp_path / "llama.onnx")
    layers = {row.layer for row in effcompile.report(model).applied()}
    assert {row["layer"] for row in effcompile.inspect_onnx(path)} == layers
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {node.name: inputs[node.name].numpy() for node in session.get_inputs()}
    logits = session.run(None, feeds)[0]
    np.testing.assert_allclose(logits, output.logits.numpy(), rtol=1e-4, atol=1e-5)
