"""The real-client zoo: models no one here wrote, as users bring them (tiny configs, random init).

Each entry builds a model from a config (never a download), one batch in the form the model
takes it (Hugging Face: a dict of keyword tensors; torchvision and timm: an image tensor) with its
targets, and the user's loss over the output *as the model returns it* (a ``ModelOutput`` or a
tensor).  ``tests/test_clients.py`` runs every technique of ``tests/settings.py`` over this zoo.

Libraries: ``transformers`` is a test extra.  ``torchvision`` and ``timm`` are not: PyPI's x86-64
torchvision wheels link the CUDA build of torch and fail to import beside the CPU torch 2.13.0 the
main test run uses, so their clients run in a second environment (torch 2.14.1 + torchvision
0.29.1 + timm; ``make test-vision``) and are skipped, with that reason, where the library is missing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, TOKENS = 97, 12


@dataclasses.dataclass(frozen=True)
class Client:
    build: Callable[[], nn.Module]
    batch: Callable[[int, int], Tuple[Dict[str, torch.Tensor], torch.Tensor]]  # (rows, seed) → (inputs, targets)
    loss: Callable[[Any, torch.Tensor], torch.Tensor]
    # layer-pattern → why a pass may skip it (anything else skipped is a bug)
    expected_skips: Dict[str, str] = dataclasses.field(default_factory=dict)
    library: str = "transformers"  # the client's own library (the test skips when it is missing)
    # how greedy stages cut it: "block-stack hooks" (a forward torch.fx cannot trace) or "fx" (a stage trace)
    cut_kind: str = "block-stack hooks"
    lr: float = 1e-2  # Adam's learning rate in the tests' training loops
    # why gradient matching refuses the model ("" when it has one linear head over its output)
    no_gradmatch: str = ""


def causal_lm_loss(output: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over ``output.logits`` (B, T, V)."""
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def classification_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.float(), labels)


def logits_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.float(), labels)


IMAGE, CLASSES = 32, 10


def _images(rows: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, IMAGE, IMAGE, generator=generator), torch.randint(0, CLASSES, (rows,), generator=generator)


def _pixel_batch(rows: int, seed: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    images, labels = _images(rows, seed)
    return {"pixel_values": images}, labels


def _token_batch(rows: int, seed: int, classes: int = 0) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, TOKENS), generator=generator)
    mask = torch.ones(rows, TOKENS, dtype=torch.long)
    mask[0, -3:] = 0  # one padded sequence: the mask is a real input, not a constant
    targets = torch.randint(0, classes, (rows,), generator=generator) if classes else ids
    return {"input_ids": ids, "attention_mask": mask}, targets


def _gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def _falcon() -> nn.Module:
    import transformers

    # FalconLinear computes ``x @ self.weight.T`` (aten.numpy_T), not F.linear; the head is tied
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    return transformers.FalconForCausalLM(config)


def _t5() -> nn.Module:
    import transformers

    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(config)


def _seq2seq_batch(rows: int, seed: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    inputs, _ = _token_batch(rows, seed)
    targets = torch.randint(0, VOCAB, (rows, TOKENS), generator=torch.Generator().manual_seed(seed + 1))
    return {**inputs, "decoder_input_ids": targets}, targets


def seq2seq_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of the decoder's logits (B, T, V) against its labels (teacher forcing, unshifted)."""
    return F.cross_entropy(output.logits.reshape(-1, output.logits.shape[-1]).float(), labels.reshape(-1))


def _bert() -> nn.Module:
    import transformers

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def _hf_convnext() -> nn.Module:
    import transformers

    # Linear layers on channels-last maps (permute in, permute out), layer scale, drop path
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 2], num_labels=CLASSES,
                                         drop_path_rate=0.1, image_size=IMAGE)
    return transformers.ConvNextForImageClassification(config)


def _hf_swin() -> nn.Module:
    import transformers

    # shifted-window attention with a relative position bias; a (B, T, C) hidden state
    config = transformers.SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                     window_size=4, num_labels=CLASSES)
    return transformers.SwinForImageClassification(config)


def _hf_resnet() -> nn.Module:
    import transformers

    # convolutions + BatchNorm; a (B, C, H, W) hidden state between stages
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2], layer_type="basic",
                                       num_labels=CLASSES)
    return transformers.ResNetForImageClassification(config)


def _hf_mobilevit() -> nn.Module:
    import transformers

    # MobileNet blocks then MobileViT blocks (a stack of mixed classes), whose patch transformers run
    # on the batch folded with the patches (B·P, N, C); unfold/fold around them
    config = transformers.MobileViTConfig(image_size=IMAGE, patch_size=2, hidden_sizes=[16, 24, 32],
                                          neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_labels=CLASSES)
    return transformers.MobileViTForImageClassification(config)


def _torchvision_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)


def _torchvision_mobilenet() -> nn.Module:
    import torchvision

    # depthwise convs, squeeze-excitation (1x1 convs on pooled maps), hardswish
    return torchvision.models.mobilenet_v3_small(num_classes=CLASSES, width_mult=0.25)


def _torchvision_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], stochastic_depth_prob=0.1,
                    num_classes=CLASSES)


def _torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    # nn.MultiheadAttention: in_proj_weight is a bare Parameter used by F.multi_head_attention_forward
    return VisionTransformer(image_size=IMAGE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=CLASSES)


def _torchvision_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    # F.linear(x, self.qkv.weight) inside a functional window attention; (B, H, W, C) hidden states
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=CLASSES)


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)

    return build


def _vision(build: Callable[[], nn.Module], library: str, cut_kind: str = "fx", lr: float = 1e-2) -> "Client":
    return Client(build, _images, logits_loss, library=library, cut_kind=cut_kind, lr=lr)


TIED = "tied to the token embedding"
CLIENTS: Dict[str, Client] = {
    # GPT-2: Conv1D layers (addmm(b, x, W), W stored in×out); lm_head shares the embedding's weight.
    "gpt2": Client(_gpt2, _token_batch, causal_lm_loss, {"lm_head": TIED}),
    "llama": Client(_llama, _token_batch, causal_lm_loss),
    "falcon": Client(_falcon, _token_batch, causal_lm_loss, {"lm_head": TIED}),
    # encoder-decoder: two block stacks, a relative position bias and the encoder's output feed
    # every decoder block (greedy stages read them detached after the cut), the LM head is tied
    # to the shared embedding
    "t5": Client(_t5, _seq2seq_batch, seq2seq_loss, {"lm_head": TIED}),
    "bert": Client(_bert, lambda rows, seed: _token_batch(rows, seed, classes=3), classification_loss),
    "hf_convnext": Client(_hf_convnext, _pixel_batch, classification_loss),
    "hf_swin": Client(_hf_swin, _pixel_batch, classification_loss),
    "hf_resnet": Client(_hf_resnet, _pixel_batch, classification_loss),
    # plain backprop too takes 10 Adam steps at 1e-2 from 2.30 to only 2.07 on one batch
    "hf_mobilevit": Client(_hf_mobilevit, _pixel_batch, classification_loss, lr=3e-2),
    "torchvision_resnet": _vision(_torchvision_resnet, "torchvision"),
    "torchvision_mobilenet_v3": _vision(_torchvision_mobilenet, "torchvision"),
    "torchvision_convnext": _vision(_torchvision_convnext, "torchvision"),
    "torchvision_vit": _vision(_torchvision_vit, "torchvision"),
    "torchvision_swin": _vision(_torchvision_swin, "torchvision", cut_kind="block-stack hooks"),
    # a ViT without warmup oscillates at Adam 1e-2 (plain backprop too; stage 0's MLP head diverged)
    "timm_vit": _vision(_timm("vit_tiny_patch16_224", img_size=IMAGE, patch_size=8, depth=2, drop_path_rate=0.1), "timm",
                        lr=3e-3),
    "timm_convnext": _vision(_timm("convnext_atto", drop_path_rate=0.1), "timm"),
    "timm_swin": _vision(_timm("swin_tiny_patch4_window7_224", img_size=IMAGE, window_size=4, embed_dim=24,
                               depths=(2, 2), num_heads=(2, 2)), "timm"),
    # LeViT's attention caches its bias table in eval mode (a train/eval branch): the block-stack path
    "timm_levit": dataclasses.replace(_vision(_timm("levit_128s", img_size=IMAGE), "timm", cut_kind="block-stack hooks"),
                                      no_gradmatch="not by a linear layer"),  # the mean of two heads (distillation)
}
