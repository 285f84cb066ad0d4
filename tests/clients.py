"""The real-client zoo: models no one here wrote, as users bring them (tiny configs, random init).

Each entry builds a model from a config (never a download), one batch in the form the model
takes it (Hugging Face: a dict of keyword tensors) with its targets, and the user's loss over the
output *as the model returns it* (a ``ModelOutput``).  ``tests/test_clients.py`` runs every
technique of ``tests/settings.py`` over this zoo.  Requires ``transformers`` (a test extra).
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


def causal_lm_loss(output: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over ``output.logits`` (B, T, V)."""
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def classification_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.float(), labels)


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


def _bert() -> nn.Module:
    import transformers

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config)


TIED = "tied to the token embedding"
CLIENTS: Dict[str, Client] = {
    # GPT-2: Conv1D layers (addmm(b, x, W), W stored in×out); lm_head shares the embedding's weight.
    "gpt2": Client(_gpt2, _token_batch, causal_lm_loss, {"lm_head": TIED}),
    "llama": Client(_llama, _token_batch, causal_lm_loss),
    "bert": Client(_bert, lambda rows, seed: _token_batch(rows, seed, classes=3), classification_loss),
}
