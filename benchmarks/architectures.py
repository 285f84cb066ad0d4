"""Every technique on Hugging Face architectures beyond the test zoo (``tests/clients.py``).

Tiny configs, random init, no download (MobileViT joined the test zoo itself).  Per architecture × technique × mode (eager, compiled
with ``effcompile_aot_eager``): ``transform`` with the dict batch the model takes, six
``train_step`` steps on one batch and one on a partial batch of 5 rows; the row records the losses,
the number of Plan rows applied and skipped (with the reasons), and the error if anything raised.
This is a smoke survey — a technique's effect is tested in ``tests/`` — whose point is that no
architecture fails or silently skips layers without a reason.

``python -m benchmarks architectures [--compile] --out FILE``
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import effcompile
from effcompile.measure import machine_info

VOCAB, TOKENS, ROWS = 97, 12, 8


def _ids(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, TOKENS), generator=torch.Generator().manual_seed(seed))


def _labels(rows: int, seed: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed))


def causal_lm_loss(output: Any, ids: torch.Tensor) -> torch.Tensor:
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def seq2seq_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.reshape(-1, output.logits.shape[-1]).float(), labels.reshape(-1))


def classification_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.float(), labels)


def _architectures() -> Dict[str, Tuple[Callable[[], torch.nn.Module], Callable[[int, int], Tuple[Any, Any]], Callable]]:
    import transformers as T

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    seq2seq = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                   encoder_ffn_dim=64, decoder_ffn_dim=64)
    lm = lambda rows, seed: ({"input_ids": _ids(rows, seed)}, _ids(rows, seed))  # noqa: E731
    text3 = lambda rows, seed: ({"input_ids": _ids(rows, seed)}, _labels(rows, seed, 3))  # noqa: E731
    return {
        "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=VOCAB, num_key_value_heads=1,
                                                           max_position_embeddings=64, **small)), lm, causal_lm_loss),
        "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(vocab_size=VOCAB, num_key_value_heads=1,
                                                                 max_position_embeddings=64, **small)), lm, causal_lm_loss),
        "gpt_neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=64,
                                                                  **small)), lm, causal_lm_loss),
        "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=2, num_labels=3)), text3, classification_loss),
        "deberta_v2": (lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(
            vocab_size=VOCAB, num_labels=3, max_position_embeddings=64, **small)), text3, classification_loss),
        "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(vocab_size=VOCAB, max_position_embeddings=64,
                                                                     **seq2seq)),
                 lambda rows, seed: ({"input_ids": _ids(rows, seed), "decoder_input_ids": _ids(rows, seed + 7)},
                                     _ids(rows, seed + 7)), seq2seq_loss),
        "whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=VOCAB, num_mel_bins=8, max_source_positions=16, max_target_positions=32, pad_token_id=0,
            decoder_start_token_id=1, **seq2seq)),
                    lambda rows, seed: ({"input_features": torch.randn(rows, 8, 32, generator=torch.Generator().manual_seed(seed)),
                                         "decoder_input_ids": _ids(rows, seed + 7)}, _ids(rows, seed + 7)), seq2seq_loss),
        "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                     num_attention_heads=2, max_position_embeddings=64,
                                                     word_embed_proj_dim=32)), lm, causal_lm_loss),
        "phi": (lambda: T.PhiForCausalLM(T.PhiConfig(vocab_size=VOCAB, max_position_embeddings=64, **small)), lm,
                causal_lm_loss),
        "roberta": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
            vocab_size=VOCAB, num_labels=3, max_position_embeddings=64, pad_token_id=1, **small)), text3,
            classification_loss),
        # weight_norm on its positional conv (a parametrized weight: a skip row with the reason);
        # LayerDrop off: a Python branch on torch.rand, which torch.export cannot capture
        "wav2vec2": (lambda: T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(
            vocab_size=32, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, layerdrop=0.0, mask_time_prob=0.0, num_labels=3, **small)),
                     lambda rows, seed: ({"input_values": torch.randn(rows, 800, generator=torch.Generator().manual_seed(seed))},
                                         _labels(rows, seed, 3)), classification_loss),
        "hf_vit": (lambda: T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_channels=3,
                                                                   num_labels=10, **small)),
                   lambda rows, seed: ({"pixel_values": torch.randn(rows, 3, 16, 16,
                                                                    generator=torch.Generator().manual_seed(seed))},
                                       _labels(rows, seed, 10)), classification_loss),
    }


TECHNIQUES: Dict[str, Callable[[], Tuple[effcompile.PassConfig, ...]]] = {
    "decorrelation": lambda: (effcompile.Decorrelation(),),
    "randomized_vjp": lambda: (effcompile.RandomizedVJP(keep=0.5, multiple=1),),
    "greedy_stages": lambda: (effcompile.GreedyStages(num_stages=2),),
    "sample_selection": lambda: (effcompile.SampleSelection(keep=0.5, strategy="loss"),),
    "gradmatch": lambda: (effcompile.SampleSelection(keep=0.5, strategy="gradmatch"),),
}


def survey_one(build: Callable, batch: Callable, loss_fn: Callable, technique: str, compile: bool) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = build()
    model.train()
    row: Dict[str, Any] = {"technique": technique, "compiled": compile}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            effcompile.transform(model, *TECHNIQUES[technique](), example_inputs=batch(ROWS, 0)[0])
        step = effcompile.train_step(model, loss_fn, torch.optim.Adam(model.parameters(), lr=3e-3), compile=compile,
                                     backend="effcompile_aot_eager")
        row["losses"] = [float(step(*batch(ROWS, 1))) for _ in range(6)] + [float(step(*batch(5, 2)))]
        plan = effcompile.report(model).for_pass(technique if technique != "gradmatch" else "sample_selection")
        row["applied"] = len(plan.applied())
        row["skipped"] = {r.layer: r.reason for r in plan if not r.applied and r.action.value != "assign"}
    except Exception as error:  # a survey row, not a test: record what users would meet
        row["error"] = f"{type(error).__name__}: {error}"[:500]
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="compiled steps (effcompile_aot_eager)")
    parser.add_argument("--only", default="", help="comma-separated architectures (default: all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows: List[Dict[str, Any]] = []
    for name, (build, batch, loss_fn) in _architectures().items():
        if args.only and name not in args.only.split(","):
            continue
        for technique in TECHNIQUES:
            row = dict(architecture=name, **survey_one(build, batch, loss_fn, technique, args.compile))
            print(json.dumps({k: v for k, v in row.items() if k != "skipped"}))
            rows.append(row)
    result = {"benchmark": "architectures", "compiled": args.compile, "rows": rows, "machine": machine_info("cpu")}
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    failed = [f"{r['architecture']}/{r['technique']}" for r in rows if "error" in r]
    print(f"{len(rows) - len(failed)}/{len(rows)} ran; failed: {failed or 'none'}")
