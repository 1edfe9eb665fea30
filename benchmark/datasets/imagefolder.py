"""Any image folder: ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``, decoded and cached.

The layout and class order are torchvision's ``ImageFolder`` (class = sub-folder, sorted by name;
files found recursively). Every format PIL opens is read. Construction only lists the folders, so
the number of classes and the split sizes are known before any image is decoded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from benchmark.datasets._imagecache import (
    GRAY_MODES,
    cached,
    decode_images,
    files_key,
    list_images,
)
from benchmark.datasets.base import Dataset, checks
from benchmark.errors import ConfigError, DatasetUnavailable
from benchmark.types import ImageSet

log = logging.getLogger(__name__)

Files = tuple[list[Path], list[int]]


def class_folders(folder: Path) -> list[str]:
    """Sub-folder names, sorted (torchvision's ``find_classes``)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, as fractions of 255."""
    # From each channel's histogram of the 256 values: exact, and no float copy of the images.
    values = torch.arange(256, dtype=torch.float64)
    mean, std = [], []
    for channel in x.transpose(0, 1):
        hist = torch.bincount(channel.flatten(), minlength=256).double()
        n = max(float(hist.sum()), 1.0)
        m = float((hist * values).sum()) / n
        var = float((hist * values.square()).sum()) / n - m * m
        mean.append(round(m / 255, 6))
        std.append(round(max(var, 0.0) ** 0.5 / 255, 6))
    return tuple(mean), tuple(std)


def _size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    ok = len(hw) == 2 and all(checks.is_int(v) and v > 0 for v in hw)
    checks.require(ok, "image_size", "null, a positive integer or [height, width]", image_size)
    return int(hw[0]), int(hw[1])


class ImageFolder(Dataset):
    """Images in class folders; ``mean``/``std`` null = computed from the training images."""

    name = "imagefolder"
    hflip = True
    crop_padding = 4

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int | Sequence[int] | None = None,
        channels: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        cache_dir: str | Path | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)  # max_train, max_test, seed, hflip, crop_padding
        self.root = Path(root).expanduser().absolute()
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.size = _size(image_size)
        checks.one_of(channels, "channels", (None, 1, 3))
        classes, self.train_files, self.test_files = self.scan()
        self.classes = tuple(classes)
        self.num_classes = len(classes)
        self.train_size, self.test_size = len(self.train_files[0]), len(self.test_files[0])
        # Shape from the first image's header (no decoding): the model is built from it.
        with Image.open(self.train_files[0][0]) as im:
            mode, (w, h) = im.mode, im.size
        self.strict_gray = channels is None and mode in GRAY_MODES
        c = channels or (1 if mode in GRAY_MODES else 3)
        self.image_shape = (c, *(self.size or (h, w)))
        if (mean is None) != (std is None):
            raise ConfigError("dataset.mean", "set mean and std together, or both to null")
        # None until load() computes them from the training images.
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        for key, stats in (("mean", self.mean), ("std", self.std)):
            if stats is not None and len(stats) != c:
                raise ConfigError(
                    f"dataset.{key}", f"needs {c} values (one per channel), got {len(stats)}"
                )

    def unavailable(self, missing: Sequence[Path]) -> DatasetUnavailable:
        """The error for missing folders."""
        return DatasetUnavailable(
            f"dataset {self.name!r}: missing {', '.join(map(str, missing))}. An image folder "
            f"needs {self.root}/train/<class>/<images> and {self.root}/test/<class>/<images> "
            "(torchvision ImageFolder layout, the same class folders in both); create them or "
            "point dataset.root at a folder that has them."
        )

    def scan(self) -> tuple[list[str], Files, Files]:
        """Class names and the (paths, labels) of the train and test splits, from listings."""
        missing = [p for p in (self.root / "train", self.root / "test") if not p.is_dir()]
        if missing:
            raise self.unavailable(missing)
        classes = class_folders(self.root / "train")
        if len(classes) < 2:
            raise ConfigError(
                "dataset.root",
                f"{self.root}/train has {len(classes)} class folder(s) {classes}; a classifier "
                "needs at least 2 (one sub-folder per class, in train and test)",
            )
        test_classes = class_folders(self.root / "test")
        if classes != test_classes:
            raise ConfigError(
                "dataset.root",
                f"the class folders of {self.root}/test differ from "
                f"those of {self.root}/train: only in train: "
                f"{sorted(set(classes) - set(test_classes))}, only in test: "
                f"{sorted(set(test_classes) - set(classes))}",
            )
        return classes, self.list_split("train", classes), self.list_split("test", classes)

    def list_split(self, split: str, classes: Sequence[str]) -> Files:
        paths: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            found = list_images(self.root / split / name)
            if not found and split == "train":
                raise DatasetUnavailable(
                    f"dataset {self.name!r}: the class folder "
                    f"{self.root / split / name} has no images: add some or remove the folder"
                )
            paths += found
            labels += [label] * len(found)
        if not paths:
            raise self.unavailable([self.root / split / "<class>" / "<images>"])
        return paths, labels

    def load_split(self, split: str, files: Files) -> ImageSet:
        paths, labels = files

        def build() -> dict[str, Tensor]:
            log.info(
                "decoding %d %s images under %s (cached afterwards)", len(paths), split, self.root
            )
            x = decode_images(
                paths,
                self.image_shape,
                resize=self.size is not None,
                strict_gray=self.strict_gray,
                desc=f"decoding {self.name} {split} images",
            )
            mean, std = channel_stats(x)
            return {
                "x": x,
                "y": torch.tensor(labels, dtype=torch.int64),
                "mean": torch.tensor(mean, dtype=torch.float64),
                "std": torch.tensor(std, dtype=torch.float64),
            }

        key = files_key(
            paths, labels, self.root, self.image_shape, self.size is not None, self.strict_gray
        )
        data = cached(self.cache_dir, f"{self.name}-{split}", key, build)
        if split == "train" and self.mean is None:
            self.mean, self.std = tuple(data["mean"].tolist()), tuple(data["std"].tolist())
        return ImageSet(data["x"], data["y"], self.classes)

    def load_full(self) -> tuple[ImageSet, ImageSet]:
        return self.load_split("train", self.train_files), self.load_split("test", self.test_files)
