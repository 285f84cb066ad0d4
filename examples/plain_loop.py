"""effcompile in a plain PyTorch script: your model, your data, your loop.

    python examples/plain_loop.py                       # decorrelation, a plain loop
    python examples/plain_loop.py --passes decorrelation,randomized_vjp,greedy_stages,sample_selection
    python examples/plain_loop.py --steps 300 --compile

What it shows:

1. A model written by hand (``DigitsNet`` below, not from effcompile's zoo) is rewritten in place
   by ``effcompile.transform``: same class, same ``state_dict`` keys plus the passes' state.
2. ``effcompile.report(model)`` prints the Plan: what each pass decided for each layer.
3. Training.  The usual loop (``loss.backward(); optimizer.step()``) works for every pass: the
   loss comes from ``effcompile.training_loss(model, loss_fn)``.  With only decorrelation and/or
   the randomized VJP it is the plain loss (the decorrelation update runs inside ``forward()`` in
   training mode, the randomized VJP lives in the backward); greedy stages and sample selection
   change the *shape* of a step (a local loss per stage; a weighted subset of the batch), and
   their objective is the loss whose backward is that step's gradient.  ``--loop train_step``
   hands the whole step to ``effcompile.train_step`` instead (it frees each stage's activations
   before the next stage runs).
4. The trained model is evaluated like any model, and ``effcompile.fold`` returns a plain copy
   without effcompile state (W ← W·R for decorrelation) that gives the same outputs.

The data is scikit-learn's bundled 8×8 digits (no download), standardised with the training
split's statistics.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import effcompile



class DigitsNet(nn.Module):
    """A small conv net for 1×8×8 images, written as you would write your own."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc(torch.flatten(x, 1)))
        return self.head(x)


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test tensors of sklearn's digits: (N, 1, 8, 8) float32 images, int64 labels."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32)[:, None]
    train_x, test_x, train_y, test_y = train_test_split(
        images, bunch.target, test_size=0.2, random_state=seed, stratify=bunch.target)
    mean, std = train_x.mean(), train_x.std()
    to_x = lambda a: torch.from_numpy((a - mean) / std)
    to_y = lambda a: torch.from_numpy(a.astype(np.int64))
    return to_x(train_x), to_y(train_y), to_x(test_x), to_y(test_y)


def make_configs(names: str) -> list[effcompile.PassConfig]:
    """Pass configs by name, with the settings of ``make demo``."""
    settings = {
        "decorrelation": lambda: effcompile.Decorrelation(),
        "randomized_vjp": lambda: effcompile.RandomizedVJP(keep=0.25),
        "greedy_stages": lambda: effcompile.GreedyStages(num_stages=2),
        "sample_selection": lambda: effcompile.SampleSelection(keep=0.5),
    }
    configs = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in settings:
            raise SystemExit(f"unknown pass {name!r}; choose from {', '.join(settings)}")
        configs.append(settings[name]())
    return configs


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = (model(images).argmax(dim=1) == labels).float().mean().item()
    model.train()
    return correct


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", default="decorrelation", help="comma-separated pass names")
    parser.add_argument("--loop", choices=("plain", "train_step"), default="plain",
                        help="a hand-written loop around effcompile.training_loss, or effcompile.train_step")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--compile", action="store_true", help='torch.compile(backend="effcompile")')
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = load_digits(args.seed)
    model = DigitsNet()
    configs = make_configs(args.passes)

    # 1. Rewrite the model in place; the example batch fixes the shapes the passes plan for.
    effcompile.transform(model, *configs, example_inputs=(train_x[: args.batch_size],))
    # 2. What was decided, layer by layer.
    print(effcompile.report(model).table())

    names = {config.name for config in configs}
    loop = args.loop
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if loop == "plain":
        objective = effcompile.training_loss(model, F.cross_entropy, compile=args.compile)

        def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = objective(inputs, targets)
            loss.backward()
            optimizer.step()
            return objective.reported_loss
    else:
        step = effcompile.train_step(model, F.cross_entropy, optimizer, compile=args.compile)

    # 3. Train: shuffled mini-batches, one optimizer step each.
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    start, done, losses = time.perf_counter(), 0, []
    while done < args.steps:
        order = torch.randperm(len(train_x), generator=generator)
        for begin in range(0, len(order) - args.batch_size + 1, args.batch_size):
            index = order[begin: begin + args.batch_size]
            losses.append(step(train_x[index], train_y[index]))
            done += 1
            if done % 50 == 0 or done == args.steps:
                recent = torch.stack(losses[-50:]).mean().item()
                print(f"step {done:4d}  loss {recent:.4f}  ({time.perf_counter() - start:.1f} s)")
            if done == args.steps:
                break

    # 4. Evaluate, then fold the passes away into a plain model with the same outputs.
    result = {"first_loss": losses[0].item(), "last_loss": torch.stack(losses[-20:]).mean().item(),
              "test_accuracy": accuracy(model, test_x, test_y)}
    plain = effcompile.fold(model)
    plain.eval()
    model.eval()
    with torch.no_grad():
        result["fold_max_abs_diff"] = (plain(test_x) - model(test_x)).abs().max().item()
    print(f"passes: {', '.join(sorted(names)) or 'none'} ({loop} loop); test accuracy {result['test_accuracy']:.3f}; "
          f"folded model differs by at most {result['fold_max_abs_diff']:.2e}")
    return result


if __name__ == "__main__":
    main()
