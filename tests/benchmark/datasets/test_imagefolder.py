"""``imagefolder`` and ``tiny_imagenet`` on small PNG/JPEG folders written in the test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.data import stratified_counts
from benchmark.datasets import _imagecache, imagefolder
from benchmark.datasets.imagefolder import ImageFolder, channel_stats
from benchmark.datasets.tiny_imagenet import URL, TinyImageNet
from benchmark.errors import ConfigError, DatasetUnavailable

CLASSES = ("cat", "dog", "zebra")


def write_folder(
    root: Path,
    *,
    mode: str = "RGB",
    size: tuple[int, int] = (12, 10),
    ext: str = "png",
    per_class: tuple[int, int] = (4, 2),
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """``root/{train,test}/<class>/*.<ext>`` of ``size`` (W, H); the expected x and y per split."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in zip(("train", "test"), per_class, strict=True):
        xs, ys = [], []
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(a, mode).save(folder / f"{i:03d}.{ext}")
                x = torch.from_numpy(a)
                xs.append(x.unsqueeze(0) if mode == "L" else x.permute(2, 0, 1))
                ys.append(label)
        out[split] = (torch.stack(xs), ys)
    return out


def no_decoding(*args: object, **kwargs: object) -> None:
    raise AssertionError("decoded an image")


def test_rgb_pngs_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = write_folder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / ".hidden.png").write_bytes(b"")
    with monkeypatch.context() as m:  # construction only lists folders and reads one header
        m.setattr(imagefolder, "decode_images", no_decoding)
        ds = ImageFolder(tmp_path)
    assert (ds.num_classes, ds.train_size, ds.test_size) == (3, 12, 6)
    assert ds.image_shape == (3, 10, 12)
    assert ds.classes == CLASSES
    assert ds.hflip
    assert ds.mean is None
    train, test = ds.load()
    for got, split in ((train, "train"), (test, "test")):
        assert got.x.dtype == torch.uint8
        assert got.y.dtype == torch.int64
        assert torch.equal(got.x, expected[split][0])
        assert got.y.tolist() == expected[split][1]
        assert got.classes == CLASSES
    assert ds.mean == pytest.approx(channel_stats(train.x)[0])
    assert ds.std == pytest.approx(
        train.x.double().div(255).std((0, 2, 3), correction=0).tolist(), abs=1e-5
    )


def test_grey_images_give_one_channel(tmp_path: Path) -> None:
    expected = write_folder(tmp_path, mode="L")
    ds = ImageFolder(tmp_path)
    assert ds.image_shape == (1, 10, 12)
    train, _ = ds.load()
    assert torch.equal(train.x, expected["train"][0])
    assert len(ds.mean) == 1
    # channels=3 replicates the grey channel.
    rgb, _ = ImageFolder(tmp_path, channels=3).load()
    assert rgb.image_shape == (3, 10, 12)
    assert torch.equal(rgb.x, expected["train"][0].expand(-1, 3, -1, -1))


def test_colour_image_among_grey_ones_is_an_error(tmp_path: Path) -> None:
    write_folder(tmp_path, mode="L")
    Image.new("RGB", (12, 10), (255, 0, 0)).save(tmp_path / "train" / "zebra" / "red.png")
    with pytest.raises(ConfigError, match=r"dataset\.channels.*red\.png"):
        ImageFolder(tmp_path).load()
    train, _ = ImageFolder(tmp_path, channels=1).load()  # explicit: converted to grey
    assert train.image_shape == (1, 10, 12)


def test_jpegs_decode_like_pil(tmp_path: Path) -> None:
    write_folder(tmp_path, ext="jpg", size=(16, 16))
    grey = tmp_path / "train" / "dog" / "grey.jpg"
    Image.new("L", (16, 16), 77).save(grey)
    train, _ = ImageFolder(tmp_path).load()
    paths = _imagecache.list_images(tmp_path / "train")
    pil = torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]
    )
    assert torch.equal(train.x, pil)


def test_sizes_must_agree_unless_resized(tmp_path: Path) -> None:
    write_folder(tmp_path)
    odd = tmp_path / "test" / "dog" / "odd.png"
    Image.new("RGB", (20, 7), (1, 2, 3)).save(odd)
    with pytest.raises(ConfigError, match=r"dataset\.image_size=") as info:
        ImageFolder(tmp_path).load()
    assert "odd.png" in str(info.value)
    ds = ImageFolder(tmp_path, image_size=8)
    assert ds.image_shape == (3, 8, 8)
    _, test = ds.load()
    assert test.image_shape == (3, 8, 8)
    index = _imagecache.list_images(tmp_path / "test").index(odd)
    want = np.array(Image.open(odd).resize((8, 8), Image.Resampling.BILINEAR))
    assert torch.equal(test.x[index], torch.from_numpy(want).permute(2, 0, 1))
    assert ImageFolder(tmp_path, image_size=[6, 9]).image_shape == (3, 6, 9)


def test_class_lists_must_match(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / "test" / "dog").rename(tmp_path / "test" / "wolf")
    with pytest.raises(ConfigError, match=r"dataset\.root.*only in train: \['dog'\].*\['wolf'\]"):
        ImageFolder(tmp_path)


def test_missing_folders_fail_at_construction(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetUnavailable) as info:
        ImageFolder(tmp_path)
    assert str(tmp_path / "test") in str(info.value)
    assert "dataset.root" in str(info.value)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / "x.png")
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "test" / "b").mkdir()
    with pytest.raises(DatasetUnavailable, match="has no images"):
        ImageFolder(tmp_path)


def test_unreadable_image(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / "test" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetUnavailable, match=r"broken\.png"):
        ImageFolder(tmp_path).load()


def test_bad_options(tmp_path: Path) -> None:
    write_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"dataset\.channels"):
        ImageFolder(tmp_path, channels=2)
    with pytest.raises(ConfigError, match=r"dataset\.image_size"):
        ImageFolder(tmp_path, image_size=0)
    with pytest.raises(ConfigError, match=r"dataset\.mean"):
        ImageFolder(tmp_path, mean=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match=r"dataset\.std"):
        ImageFolder(tmp_path, mean=[0.5] * 3, std=[0.2])
    ds = ImageFolder(tmp_path, mean=[0.1, 0.2, 0.3], std=[1, 1, 1], hflip=False, crop_padding=0)
    ds.load()
    assert ds.mean == (0.1, 0.2, 0.3)
    assert not ds.hflip
    assert ds.crop_padding == 0


def test_stratified_subsets(tmp_path: Path) -> None:
    expected = write_folder(tmp_path, per_class=(8, 4))
    train, test = ImageFolder(tmp_path, max_train=6, max_test=5).load()
    counts = torch.bincount(torch.tensor(expected["test"][1]))
    assert train.class_counts().tolist() == [2, 2, 2]
    assert torch.equal(test.class_counts(), stratified_counts(counts, 5))
    again, _ = ImageFolder(tmp_path, max_train=6, max_test=5).load()
    other, _ = ImageFolder(tmp_path, max_train=6, max_test=5, seed=3).load()
    assert torch.equal(again.x, train.x)
    assert not torch.equal(other.x, train.x)


def test_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    write_folder(root, per_class=(30, 10))
    first = ImageFolder(root, cache_dir=cache)
    train, test = first.load()
    assert len(list((cache / "images").glob("imagefolder-*.pt"))) == 2
    assert not list((cache / "images").glob(".*tmp"))  # no temp file left behind
    with monkeypatch.context() as m:
        m.setattr(imagefolder, "decode_images", no_decoding)
        ds = ImageFolder(root, cache_dir=cache)
        again, again_test = ds.load()
    assert torch.equal(again.x, train.x)
    assert torch.equal(again.y, train.y)
    assert torch.equal(again_test.x, test.x)
    assert ds.mean == first.mean
    assert ds.std == first.std
    # A changed file is a new key: decoded again, with the new pixels.
    changed = root / "train" / "cat" / "000.png"
    Image.new("RGB", (12, 10), (9, 9, 9)).save(changed)
    os.utime(changed, ns=(1, 1))
    fresh, _ = ImageFolder(root, cache_dir=cache).load()
    assert torch.equal(fresh.x[0], torch.full((3, 10, 12), 9, dtype=torch.uint8))
    # A damaged cache file is ignored and rewritten.
    for path in (cache / "images").glob("*.pt"):
        path.write_bytes(b"garbage")
    repaired, _ = ImageFolder(root, cache_dir=cache).load()
    assert torch.equal(repaired.x, fresh.x)


def write_tiny_raw(root: Path, wnids: tuple[str, ...] = ("n02", "n01", "n03")) -> list[str]:
    """The unzipped tiny-imagenet-200 layout, with 8x8 images; returns the val labels' wnids."""
    rng = np.random.default_rng(5)
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(3):
            a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(a).save(folder / f"{wnid}_{i}.JPEG")
    Image.new("L", (8, 8), 5).save(root / "train" / wnids[0] / "images" / "grey.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)  # unlabelled: must be ignored
    Image.new("RGB", (8, 8)).save(root / "test" / "images" / "test_0.JPEG")
    labels = [wnids[i % len(wnids)] for i in range(6)]
    lines = []
    for i, wnid in enumerate(labels):
        Image.new("RGB", (8, 8), (i, i, i)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t7\t7")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return labels


def test_tiny_imagenet_raw_layout(tmp_path: Path) -> None:
    labels = write_tiny_raw(tmp_path)
    ds = TinyImageNet(tmp_path)
    assert ds.classes == ("n01", "n02", "n03")
    assert (ds.num_classes, ds.train_size, ds.test_size) == (3, 10, 6)
    assert ds.image_shape == (3, 8, 8)
    assert ds.hflip
    assert len(ds.mean) == 3
    train, test = ds.load()
    assert train.class_counts().tolist() == [3, 4, 3]  # the grey image is converted to RGB
    assert test.y.tolist() == [ds.classes.index(w) for w in labels]
    assert test.x[:, 0, 0, 0].tolist() == list(range(6))


def test_tiny_imagenet_class_folders_and_errors(tmp_path: Path) -> None:
    write_folder(tmp_path / "folders", size=(8, 8))
    assert TinyImageNet(tmp_path / "folders").classes == CLASSES
    with pytest.raises(DatasetUnavailable) as info:
        TinyImageNet(tmp_path / "absent")
    assert URL in str(info.value)
    assert str(tmp_path / "absent") in str(info.value)
    write_tiny_raw(tmp_path / "raw")
    with open(tmp_path / "raw" / "val" / "val_annotations.txt", "a") as f:
        f.write("val_0.JPEG\tn99\t0\t0\t7\t7\n")
    with pytest.raises(ConfigError, match="n99"):
        TinyImageNet(tmp_path / "raw")
