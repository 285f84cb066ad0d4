"""effcompile inside PyTorch Lightning: transform in ``configure_model``, train with ``Trainer.fit``.

    pip install 'effcompile[lightning]'
    python examples/lightning_digits.py --passes decorrelation
    python examples/lightning_digits.py --passes decorrelation,sample_selection

``configure_model`` runs once, before the optimizers are built, on the device Lightning chose:
the model is transformed there with one example batch.  ``training_step`` returns
``effcompile.training_loss(net, loss_fn)(x, y)``: for passes whose work runs inside ``forward``
(decorrelation) that is the plain loss; for passes that change the step itself (greedy stages,
sample selection) it is the loss whose backward is their step's gradient (the sum of the stages'
local losses, the selected rows' weighted loss).  Lightning's automatic optimisation does the rest
(its backward — precision plugins and loss scaling included —, clipping, the optimizer).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import effcompile
from effcompile.harness.data import get_dataset



def _configs(names: List[str]) -> List[effcompile.PassConfig]:
    defaults = {"decorrelation": effcompile.Decorrelation(),
                "randomized_vjp": effcompile.RandomizedVJP(keep=0.5, multiple=1),
                "greedy_stages": effcompile.GreedyStages(num_stages=2),
                "sample_selection": effcompile.SampleSelection(keep=0.5)}
    return [defaults[name] for name in names]


def build_module(names: List[str]):
    import pytorch_lightning as pl

    class DigitsClassifier(pl.LightningModule):
        def __init__(self, example: torch.Tensor) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                     nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
            self.example = example
            self._objective = None

        def configure_model(self) -> None:
            if not effcompile.api.plan_of(self.net):
                effcompile.transform(self.net, *_configs(names), example_inputs=(self.example.to(self.device),))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
            x, y = batch
            if self._objective is None:  # after configure_model: the transformed network
                self._objective = effcompile.training_loss(self.net, F.cross_entropy)
            loss = self._objective(x, y)
            self.log("train_loss", self._objective.reported_loss)  # the batch's loss, not the subset's
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)

    return DigitsClassifier


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    import pytorch_lightning as pl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="decorrelation")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    names = [name for name in args.passes.split(",") if name]

    torch.manual_seed(0)
    train, test, _ = get_dataset("digits")
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    example = next(iter(loader))[0]
    module = build_module(names)(example)
    losses: List[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_index):
            losses.append(float(trainer.callback_metrics["train_loss"]))

    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, loader)
    module.eval()
    with torch.no_grad():
        x, y = test.tensors
        accuracy = float((module(x).argmax(1) == y).float().mean())
    print(effcompile.report(module.net).table())
    print(f"Lightning: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, test accuracy {accuracy:.3f}")
    return {"losses": losses, "test_accuracy": accuracy, "module": module}


if __name__ == "__main__":
    main()
