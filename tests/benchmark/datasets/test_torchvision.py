"""The torchvision-backed datasets on tiny files written in each dataset's real on-disk format.

No test touches the network: ``urlopen`` raises ``URLError`` (as on a machine without network)
and name lookups fail. Where torchvision checks md5 sums of the official files, the check is
replaced by an existence check.
"""

from __future__ import annotations

import csv
import pickle
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision.datasets import cifar, svhn
from torchvision.datasets import utils as tv_utils

from benchmark.data import stratified_counts
from benchmark.datasets import _imagecache, gtsrb
from benchmark.datasets._torchvision import FileDataset
from benchmark.datasets.cifar10 import CIFAR10
from benchmark.datasets.cifar100 import CIFAR100
from benchmark.datasets.fashion_mnist import FashionMNIST
from benchmark.datasets.gtsrb import GTSRB
from benchmark.datasets.mnist import MNIST
from benchmark.datasets.svhn import SVHN
from benchmark.errors import DatasetUnavailable


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """Block the network; returns the socket timeouts seen by download attempts."""
    timeouts: list[float | None] = []

    def urlopen(*args: object, **kwargs: object) -> None:
        timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("network blocked in tests")

    def getaddrinfo(*args: object, **kwargs: object) -> None:
        raise socket.gaierror("network blocked in tests")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    exists = lambda fpath, md5=None: Path(fpath).is_file()  # noqa: E731
    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(svhn, "check_integrity", exists)
    return timeouts


@dataclass
class Files:
    """What was written: the full splits as the loader should return them."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]


def _split(
    rng: np.random.Generator, shape: tuple[int, ...], num_classes: int, per_class: int
) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(y)
    return rng.integers(0, 256, (len(y), *shape), dtype=np.uint8), y


def write_mnist(
    root: Path, folder: str = "MNIST", classes: tuple[str, ...] = MNIST.tv_class.classes
) -> Files:
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = []
    for prefix, per_class in (("train", 6), ("t10k", 3)):
        x, y = _split(rng, (28, 28), 10, per_class)
        # idx format: big-endian magic (0x0803 images, 0x0801 labels), sizes, then the bytes.
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">4i", 0x803, len(x), 28, 28) + x.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">2i", 0x801, len(y)) + y.astype(np.uint8).tobytes()
        )
        out += [torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)]
    return Files(*out, tuple(classes))


def write_fashion(root: Path) -> Files:
    return write_mnist(root, "FashionMNIST", FashionMNIST.tv_class.classes)


def _pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path) -> Files:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x, y = _split(rng, (3, 32, 32), 10, 5)
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5)):
        _pickle(
            folder / f"data_batch_{i + 1}",
            {"data": x[part].reshape(len(part), -1), "labels": y[part].tolist()},
        )
    tx, ty = _split(rng, (3, 32, 32), 10, 3)
    _pickle(folder / "test_batch", {"data": tx.reshape(len(tx), -1), "labels": ty.tolist()})
    names = [f"class{i}" for i in range(10)]
    _pickle(folder / "batches.meta", {"label_names": names})
    t = torch.from_numpy
    return Files(t(x), t(y), t(tx), t(ty), tuple(names))


def write_cifar100(root: Path) -> Files:
    rng = np.random.default_rng(2)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    x, y = _split(rng, (3, 32, 32), 100, 3)
    tx, ty = _split(rng, (3, 32, 32), 100, 2)
    for name, (a, b) in (("train", (x, y)), ("test", (tx, ty))):
        _pickle(
            folder / name,
            {
                "data": a.reshape(len(a), -1),
                "fine_labels": b.tolist(),
                "coarse_labels": (b // 5).tolist(),
            },
        )
    names = [f"fine{i}" for i in range(100)]
    _pickle(
        folder / "meta",
        {"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]},
    )
    t = torch.from_numpy
    return Files(t(x), t(y), t(tx), t(ty), tuple(names))


def write_svhn(root: Path) -> Files:
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for name, per_class in (("train", 4), ("test", 2)):
        x, y = _split(rng, (3, 32, 32), 10, per_class)
        # The .mat files hold X as (H, W, C, N) and labels 1..10, where 10 is the digit 0.
        scipy.io.savemat(
            root / f"{name}_32x32.mat",
            {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y)[:, None]},
        )
        out += [torch.from_numpy(x), torch.from_numpy(y)]
    return Files(*out, tuple(str(d) for d in range(10)))


def _ppm(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> torch.Tensor:
    """Write a random RGB PPM of ``size`` (W, H); return its pixels as the loader should."""
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(a)
    im.save(path, format="PPM")
    if size != (32, 32):
        a = np.array(im.resize((32, 32), Image.Resampling.BILINEAR))
    return torch.from_numpy(a).permute(2, 0, 1)


def write_gtsrb(root: Path) -> Files:
    rng = np.random.default_rng(4)
    base = root / "gtsrb"
    xs, ys = [], []
    for c in range(43):
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True)
        (folder / f"GT-{c:05d}.csv").write_text("Filename;Width;Height;ClassId\n")
        for i in range(3):  # sizes vary as in the real data; one is already 32x32
            xs.append(_ppm(folder / f"00000_{i:05d}.ppm", rng, [(32, 32), (29, 41), (50, 47)][i]))
            ys.append(c)
    images = base / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    txs, tys = [], []
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(
            ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]
        )
        for i in range(86):
            size = (32, 32) if i % 2 else (35, 30)
            txs.append(_ppm(images / f"{i:05d}.ppm", rng, size))
            tys.append((i * 7) % 43)
            w.writerow([f"{i:05d}.ppm", *size, 5, 5, 20, 20, tys[-1]])
    return Files(
        torch.stack(xs), torch.tensor(ys), torch.stack(txs), torch.tensor(tys), gtsrb.CLASSES
    )


CASES: dict[str, tuple[type[FileDataset], Callable[[Path], Files]]] = {
    "mnist": (MNIST, write_mnist),
    "fashion_mnist": (FashionMNIST, write_fashion),
    "cifar10": (CIFAR10, write_cifar10),
    "cifar100": (CIFAR100, write_cifar100),
    "svhn": (SVHN, write_svhn),
    "gtsrb": (GTSRB, write_gtsrb),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Files]]:
    """Every dataset's files, written once per module (each in its own root)."""
    out = {}
    for name, (_, write) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        out[name] = (root, write(root))
    return out


@pytest.mark.parametrize("name", CASES)
def test_loads_the_files_exactly(name: str, written: dict[str, tuple[Path, Files]]) -> None:
    cls, _ = CASES[name]
    root, files = written[name]
    ds = cls(root, download=False)
    assert ds.name == name
    ds.validate()
    train, test = ds.load()
    for got, x, y in ((train, files.train_x, files.train_y), (test, files.test_x, files.test_y)):
        assert got.x.dtype == torch.uint8
        assert got.y.dtype == torch.int64
        assert got.image_shape == ds.image_shape
        assert got.x.is_contiguous()
        assert torch.equal(got.x, x)
        assert torch.equal(got.y, y)
        assert got.classes == files.classes
        assert got.num_classes == ds.num_classes
    # The official sizes become the sizes of the files read.
    assert (ds.train_size, ds.test_size) == (len(files.train_y), len(files.test_y))


@pytest.mark.parametrize("name", CASES)
def test_max_train_and_max_test_are_seeded_stratified_subsets(
    name: str, written: dict[str, tuple[Path, Files]]
) -> None:
    cls, _ = CASES[name]
    root, files = written[name]
    k = cls.num_classes
    n_train, n_test = 2 * k, k + k // 2
    train, test = cls(root, max_train=n_train, max_test=n_test, seed=0).load()
    assert len(train) == n_train
    assert len(test) == n_test
    for got, y in ((train, files.train_y), (test, files.test_y)):
        expected = stratified_counts(torch.bincount(y, minlength=k), len(got))
        assert torch.equal(got.class_counts(), expected)
    again, _ = cls(root, max_train=n_train, max_test=n_test, seed=0).load()
    other, _ = cls(root, max_train=n_train, max_test=n_test, seed=1).load()
    assert torch.equal(again.x, train.x)
    assert torch.equal(again.y, train.y)
    assert not torch.equal(other.x, train.x)


@pytest.mark.parametrize("name", CASES)
def test_missing_files_without_download(
    name: str, tmp_path: Path, offline: list[float | None]
) -> None:
    cls, _ = CASES[name]
    ds = cls(tmp_path / "nothing", download=False)  # construction does not look at files
    with pytest.raises(DatasetUnavailable) as info:
        ds.load()
    message = str(info.value)
    assert str(tmp_path / "nothing") in message
    assert cls.urls[0] in message
    assert "dataset.download=true" in message
    assert "paths.data_dir" in message
    assert not offline  # no download was tried


@pytest.mark.parametrize("name", CASES)
def test_failed_download_gives_one_clear_error(
    name: str, tmp_path: Path, offline: list[float | None]
) -> None:
    cls, _ = CASES[name]
    before = socket.getdefaulttimeout()
    with pytest.raises(DatasetUnavailable) as info:
        cls(tmp_path, download=True).prepare()
    message = str(info.value)
    assert str(tmp_path) in message
    assert "download failed" in message
    assert "network blocked in tests" in message
    assert cls.urls[0] in message
    assert offline
    assert all(t is not None and t <= 60 for t in offline)
    assert socket.getdefaulttimeout() == before  # and restored


def test_damaged_files_give_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path)
    # The real md5 check: these are not the official files.
    monkeypatch.setattr(cifar, "check_integrity", tv_utils.check_integrity)
    with pytest.raises(DatasetUnavailable, match="damaged") as info:
        CIFAR10(tmp_path).load()
    assert "cifar-10-batches-py" in str(info.value)


def test_gtsrb_caches_the_decoded_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: dict[str, tuple[Path, Files]]
) -> None:
    root, files = written["gtsrb"]
    first, _first_test = GTSRB(root, cache_dir=tmp_path).load()
    assert len(list((tmp_path / "images").glob("gtsrb-*.pt"))) == 2

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as m:
        m.setattr(_imagecache, "decode_images", fail)
        m.setattr(gtsrb, "decode_images", fail)
        again, again_test = GTSRB(root, cache_dir=tmp_path).load()
    assert torch.equal(again.x, first.x)
    assert torch.equal(again.y, first.y)
    assert torch.equal(again_test.x, files.test_x)
    # Another size is another cache entry.
    small, _ = GTSRB(root, cache_dir=tmp_path, image_size=16, max_train=43).load()
    assert small.image_shape == (3, 16, 16)
