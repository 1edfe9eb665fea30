"""The decoded-image cache: checksummed entries, damage detected, logged briefly, rebuilt."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from benchmark.datasets import _imagecache, imagefolder
from benchmark.datasets._imagecache import cached
from benchmark.datasets.imagefolder import ImageFolder
from benchmark.io import checksum_path, save_checked
from tests.benchmark.datasets.test_imagefolder import no_decoding, write_folder


class Weird:
    """Not loadable with ``weights_only=True``: torch.load raises its long UnpicklingError."""


def counting_build(calls: list[int]) -> dict[str, torch.Tensor]:
    calls.append(1)
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randint(0, 256, (64, 3, 16, 16), generator=g, dtype=torch.uint8)}


def entry(cache: Path) -> Path:
    (path,) = (cache / "images").glob("*.pt")
    return path


def flip_bytes(path: Path, count: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_entry_has_a_checksum_and_is_reused(tmp_path: Path) -> None:
    calls: list[int] = []
    first = cached(tmp_path, "s", "k", lambda: counting_build(calls))
    assert checksum_path(entry(tmp_path)).is_file()
    again = cached(tmp_path, "s", "k", lambda: counting_build(calls))
    assert len(calls) == 1 and torch.equal(again["x"], first["x"])


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: flip_bytes(p, 2000), id="flipped-bytes"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:300]), id="truncated"),
        pytest.param(lambda p: checksum_path(p).unlink(), id="no-checksum"),
        pytest.param(lambda p: checksum_path(p).write_text("0" * 64 + "\n"), id="wrong-checksum"),
        pytest.param(lambda p: save_checked({"x": Weird()}, p), id="unpicklable"),
    ],
)
def test_damaged_entry_is_detected_logged_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage
) -> None:
    calls: list[int] = []
    fresh = cached(tmp_path, "s", "k", lambda: counting_build(calls))
    damage(entry(tmp_path))
    with caplog.at_level(logging.WARNING, logger=_imagecache.__name__):
        rebuilt = cached(tmp_path, "s", "k", lambda: counting_build(calls))
    assert len(calls) == 2 and torch.equal(rebuilt["x"], fresh["x"])
    (record,) = [r for r in caplog.records if r.name == _imagecache.__name__]
    message = record.getMessage()
    assert "damaged" in message and "\n" not in message
    assert "weights_only" not in message and "can still be loaded" not in message
    # The rebuilt entry is complete again and reused without another build.
    assert cached(tmp_path, "s", "k", lambda: counting_build(calls))["x"].equal(fresh["x"])
    assert len(calls) == 2


def test_flipped_bytes_in_an_image_folder_cache_are_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    write_folder(root, per_class=(30, 10))
    fresh_train, fresh_test = ImageFolder(root, cache_dir=cache).load()
    for path in (cache / "images").glob("*.pt"):
        flip_bytes(path, 500)
    decoded: list[int] = []
    real = imagefolder.decode_images
    monkeypatch.setattr(
        imagefolder, "decode_images", lambda *a, **k: decoded.append(1) or real(*a, **k)
    )
    train, test = ImageFolder(root, cache_dir=cache).load()
    assert len(decoded) == 2  # both splits decoded again
    assert torch.equal(train.x, fresh_train.x) and torch.equal(test.x, fresh_test.x)
    monkeypatch.setattr(imagefolder, "decode_images", no_decoding)
    again, _ = ImageFolder(root, cache_dir=cache).load()
    assert torch.equal(again.x, fresh_train.x)
