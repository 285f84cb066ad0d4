"""Tests of the reference model zoo: shapes, a training step, export, compile and the registry."""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effcompile.models import (
    ModelSpec,
    example_inputs,
    get_model,
    list_models,
    model_spec,
    register_model,
)

MODELS = list_models()

# Small variants keep the suite fast; the real default sizes are checked by parameter count.
SMALL_KWARGS: Dict[str, Dict[str, Any]] = {
    "resnet18_cifar": {"width": 8},
    "resnet18_imagenet": {"width": 8},
    "vit_tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "bagnet": {"blocks": (1, 1, 1, 1)},
}


pytestmark = pytest.mark.usefixtures("single_thread")


def small_model(name: str, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return get_model(name, **{**SMALL_KWARGS.get(name, {}), **kwargs})


def test_registry_lists_every_model() -> None:
    assert MODELS == sorted(
        ["mlp", "cnn", "resnet18_cifar", "resnet18_imagenet", "vit_tiny", "bagnet"]
    )
    for name in MODELS:
        spec = model_spec(name)
        assert isinstance(spec, ModelSpec) and spec.name == name
        assert spec.description and "\n" not in spec.description


@pytest.mark.parametrize("call", [get_model, model_spec, example_inputs])
def test_unknown_name_raises_value_error_listing_known_names(call: Any) -> None:
    with pytest.raises(ValueError, match="known models: .*resnet18_cifar"):
        call("resnet1000")


@pytest.mark.parametrize("field", ["num_classes", "in_channels", "image_size"])
def test_non_positive_shape_arguments_raise(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        get_model("mlp", **{field: 0})


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda **kwargs: nn.Identity())


def test_example_inputs_are_seeded_images() -> None:
    (x,) = example_inputs("mlp", batch_size=3, in_channels=2, image_size=5)
    assert x.shape == (3, 2, 5, 5) and x.dtype == torch.float32
    assert torch.equal(x, example_inputs("mlp", batch_size=3, in_channels=2, image_size=5)[0])


@pytest.mark.parametrize("name", MODELS)
def test_output_shape_on_digits_input(name: str) -> None:
    model = small_model(name).eval()
    with torch.no_grad():
        logits = model(*example_inputs(name, batch_size=4))
    assert logits.shape == (4, 10)


@pytest.mark.parametrize("name", MODELS)
def test_output_shape_on_cifar_input(name: str) -> None:
    model = small_model(name, num_classes=7, in_channels=3, image_size=32).eval()
    with torch.no_grad():
        logits = model(*example_inputs(name, batch_size=2, in_channels=3, image_size=32))
    assert logits.shape == (2, 7)


@pytest.mark.parametrize("name", MODELS)
def test_sgd_step_gives_finite_loss_and_grads(name: str) -> None:
    model = small_model(name).train()
    (x,) = example_inputs(name, batch_size=8)
    y = torch.arange(8) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
    optimizer.step()
    assert torch.isfinite(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_matches_eager(name: str) -> None:
    model = small_model(name).eval()
    inputs = example_inputs(name)
    exported = torch.export.export(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*inputs), model(*inputs))


@pytest.mark.parametrize("name", MODELS)
def test_torch_compile_full_graph(name: str) -> None:
    # The "eager" backend runs Dynamo's capture without codegen: fullgraph=True fails on any
    # graph break, which is what passes need; Inductor codegen is tested elsewhere.
    model = small_model(name).train()
    inputs = example_inputs(name)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert compiled(*inputs).shape == (4, 10)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        # torchvision resnet18 (ImageNet, 1000 classes) and the usual CIFAR ResNet-18.
        ("resnet18_imagenet", dict(num_classes=1000, in_channels=3, image_size=224), 11_689_512),
        ("resnet18_cifar", dict(num_classes=10, in_channels=3, image_size=32), 11_173_962),
        # timm vit_tiny_patch16_224.
        ("vit_tiny", dict(num_classes=1000, in_channels=3, image_size=224), 5_717_416),
    ],
)
def test_default_sizes_match_reference_parameter_counts(
    name: str, kwargs: Dict[str, int], expected: int
) -> None:
    with torch.device("meta"):  # counts shapes only: skips allocating and initialising weights
        model = get_model(name, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_vit_patch_size_default_and_validation() -> None:
    assert get_model("vit_tiny", depth=1).patch_embed.patch_size == 2
    assert get_model("vit_tiny", image_size=224, depth=1).patch_embed.patch_size == 16
    with pytest.raises(ValueError, match="patch_size"):
        get_model("vit_tiny", image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="num_heads"):
        get_model("vit_tiny", embed_dim=32, num_heads=3)


def test_vit_attention_uses_explicit_linears() -> None:
    model = small_model("vit_tiny")
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    attn = model.blocks[0].attn
    assert isinstance(attn.qkv, nn.Linear) and isinstance(attn.proj, nn.Linear)
    assert attn.qkv.out_features == 3 * attn.qkv.in_features


def test_bagnet_receptive_field_stays_small() -> None:
    assert get_model("bagnet").receptive_field == 9
    assert get_model("bagnet", kernel3=(1, 1, 1, 0)).receptive_field == 17
    paper_strides = get_model("bagnet", kernel3=(1, 1, 1, 1), strides=(2, 2, 2, 1))
    assert paper_strides.receptive_field == 33
    model = small_model("bagnet").eval()
    (x,) = example_inputs("bagnet", batch_size=2)
    with torch.no_grad():
        patches = model.patch_logits(x)
        logits = model(x)
    assert patches.shape == (2, 10, 2, 2)  # 8×8 input, total stride 4: a bag of 4 patches
    torch.testing.assert_close(logits, patches.mean(dim=(2, 3)))


def test_cnn_rejects_images_too_small_to_pool() -> None:
    with pytest.raises(ValueError, match="image_size"):
        get_model("cnn", image_size=2)
