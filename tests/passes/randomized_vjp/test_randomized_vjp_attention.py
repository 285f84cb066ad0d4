"""The randomized-VJP pass on a transformer block (the ViT zoo's ``Block``: qkv/proj and MLP linears
around scaled-dot-product attention, token inputs B×T×D).

What is sketched: the grad_weight GEMMs of the four linear layers (rows = batch·tokens) and, with
``target="both"``, their grad_input GEMMs too, so the sampled cotangent flows through the
attention backward.  Every backward map between the sketches (LayerNorm, GELU, attention) is
linear in the cotangent, so the composition stays unbiased.  The attention matmuls themselves
(one fused ``scaled_dot_product_attention`` node) keep their exact backward.
"""

import math
import warnings

import pytest
import torch

import effcompile
from effcompile.models.vit import Block
from effcompile.passes import randomized_vjp

DRAWS = 100


pytestmark = pytest.mark.usefixtures("single_thread")


def _block():
    torch.manual_seed(0)
    return Block(dim=32, num_heads=2, mlp_ratio=2.0)


def _batch():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(8, 9, 32, generator=generator) * torch.logspace(-0.5, 0.5, 8)[:, None, None]
    return x, torch.randn(8, 9, 32, generator=generator)


def _gradients(block, forward, x, direction):
    block.zero_grad(set_to_none=True)
    (forward(x) * direction).sum().backward()
    return torch.cat([p.grad.flatten() for p in block.parameters()])


@pytest.mark.parametrize("path,target", [("eager", "grad_weight"),
                                         pytest.param("compiled", "grad_weight", marks=pytest.mark.slow),
                                         pytest.param("compiled", "both", marks=pytest.mark.slow)])
def test_attention_block_gradients_are_unbiased(path, target, joint_log):
    x, direction = _batch()
    reference = _block()
    exact = _gradients(reference, reference, x, direction)
    block = _block()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effcompile.transform(block, effcompile.RandomizedVJP(keep=0.25, target=target), example_inputs=(x,))
    forward = block if path == "eager" else torch.compile(block, backend="effcompile_aot_eager")
    draws = torch.stack([_gradients(block, forward, x, direction) for _ in range(DRAWS)])
    # Exact entries (LayerNorm, biases) differ from the reference only by float32 summation order.
    bound = 5.0 * draws.std(0) / math.sqrt(DRAWS) + 1e-5 * (1 + exact.abs())
    assert ((draws.mean(0) - exact).abs() <= bound).all(), float(((draws.mean(0) - exact).abs() / bound).max())
    assert draws.std(0).max() > 0
    if path == "compiled":
        rewritten = {(r.layer, r.gemm) for r in joint_log.last("randomized_vjp")}
        layers = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
        assert {layer for layer, gemm in rewritten if gemm == "grad_weight"} == layers
        assert ({layer for layer, gemm in rewritten if gemm == "grad_input"} == layers) == (target == "both")
        assert all(r.n == 72 for r in joint_log.last("randomized_vjp") if r.gemm == "grad_weight")  # rows = 8·9 tokens
