"""A Hugging Face model, transformed by effcompile, trained by ``transformers.Trainer``.

    pip install 'effcompile[hf]'          # transformers + accelerate
    python examples/hf_trainer.py --passes decorrelation
    python examples/hf_trainer.py --passes decorrelation,randomized_vjp --compile
    python examples/hf_trainer.py --passes greedy_stages            # or sample_selection
    torchrun --nproc_per_node 2 examples/hf_trainer.py --passes greedy_stages   # DDP (gloo on CPU)

The model is a tiny GPT-2 built from a config (random init, no download) and the data are random
token sequences; the point is the wiring, not the result:

* ``effcompile.transform(model, ..., example_inputs=batch)`` takes the batch as the Trainer feeds
  it (a dict of keyword tensors), before the Trainer wraps or compiles the model;
* the Trainer's own loop (its loss, optimizer, scheduler, gradient clipping) trains it: passes whose
  work runs inside ``forward`` or its backward (decorrelation's R update; the randomized VJP, eager
  or with ``--compile`` in the compiled backward) need nothing else.  ``--compile`` compiles the model in place
  with ``model.compile(backend="effcompile")`` before handing it to the Trainer:
  ``TrainingArguments(torch_compile_backend=...)`` accepts only accelerate's list of backend names,
  and ``torch_compile=True`` alone would compile with plain Inductor, where the randomized VJP's
  markers raise instead of training exact gradients silently.
  Passes that change the step itself (greedy stages, sample selection) enter through the
  Trainer's ``compute_loss``: ``effcompile.training_loss(model, loss_fn)`` returns the loss
  whose backward is their step's gradient (the sum of the stages' local losses; the selected
  rows' weighted loss), and the Trainer does the rest (its backward, clipping, optimizer).  The
  objective is made from the ``model`` the Trainer passes to ``compute_loss``: under ``torchrun``
  that is the DDP wrapper, and the objective then runs as its forward, so DDP averages it;
* ``effcompile.report(model)`` shows what was applied and the live counters.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Dict, List, Optional

import torch

import effcompile

VOCAB, TOKENS = 97, 12
STEP_CHANGING = {"greedy_stages", "sample_selection"}


def causal_lm_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy (a mean over tokens, so selection scores each sequence by its own)."""
    logits = output.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random sequences; the labels are the inputs (the model shifts them for causal LM)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "attention_mask": torch.ones(TOKENS, dtype=torch.long), "labels": ids}


def build_model() -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _config(name: str) -> effcompile.PassConfig:
    if name == "decorrelation":
        return effcompile.Decorrelation()
    if name == "randomized_vjp":
        return effcompile.RandomizedVJP(keep=0.5, multiple=1)
    if name == "greedy_stages":
        return effcompile.GreedyStages(num_stages=2)
    if name == "sample_selection":
        return effcompile.SampleSelection(keep=0.5, strategy="loss")
    raise SystemExit(f"unknown pass {name!r}")


def objective_trainer(make_objective: Callable[[torch.nn.Module], Any]) -> type:
    """A ``transformers.Trainer`` whose loss is ``objective(batch, labels)``, the objective made by
    ``make_objective`` (``effcompile.training_loss``) from the model the Trainer trains — wrapped
    in DDP under ``torchrun`` — once per model object."""
    import transformers

    class EffcompileTrainer(transformers.Trainer):
        objective, objective_model = None, None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.objective_model is not model:
                self.objective, self.objective_model = make_objective(model), model
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            loss = self.objective(inputs, labels)
            return (loss, None) if return_outputs else loss

    return EffcompileTrainer


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="decorrelation")
    parser.add_argument("--compile", action="store_true", help="model.compile(backend=--backend) before the Trainer")
    parser.add_argument("--backend", default="effcompile")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    args = parser.parse_args(argv)

    names = [name for name in args.passes.split(",") if name]
    torch.manual_seed(0)
    model = build_model()
    data = RandomTokens()
    example = {key: torch.stack([data[i][key] for i in range(8)]) for key in ("input_ids", "attention_mask")}
    effcompile.transform(model, *[_config(name) for name in names], example_inputs=example)
    trainer_class = transformers.Trainer
    if STEP_CHANGING & set(names):  # the technique is the loss: compiled there, not by model.compile
        trainer_class = objective_trainer(
            lambda trained: effcompile.training_loss(trained, causal_lm_loss, compile=args.compile, backend=args.backend))
    elif args.compile:
        model.compile(backend=args.backend)  # in place: the Trainer sees the same module

    training = transformers.TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=8, num_train_epochs=args.epochs, learning_rate=1e-2,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=4, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True)
    trainer = trainer_class(model=model, args=training, train_dataset=data)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(effcompile.report(model).table())
    print(f"Trainer: {len(losses)} logged losses {[round(float(l), 3) for l in losses]}, "
          f"train_loss {result.training_loss:.3f}, {seconds:.1f} s ({'compiled: ' + args.backend if args.compile else 'eager'})")
    return {"losses": [float(l) for l in losses], "train_loss": float(result.training_loss), "model": model,
            "objective": getattr(trainer, "objective", None)}


if __name__ == "__main__":
    main()
