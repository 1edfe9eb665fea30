"""Tiny-ImageNet-200 (100,000 train / 10,000 val used as test, 64x64 colour, 200 classes).

Source: Le and Yang 2015, CS231N, http://cs231n.stanford.edu/tiny-imagenet-200.zip. Read either
as unzipped (``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` labelled by
``val/val_annotations.txt``; the unlabelled ``test/`` is ignored) or as an image folder with
``train/<class>/`` and ``test/<class>/``. Class names are the WordNet ids, sorted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmark.datasets.imagefolder import Files, ImageFolder, class_folders
from benchmark.errors import ConfigError, DatasetUnavailable

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


class TinyImageNet(ImageFolder):
    """Tiny-ImageNet; some of its JPEGs are grey, so ``channels`` defaults to 3."""

    name = "tiny_imagenet"
    hflip = True
    crop_padding = 4

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int | Sequence[int] | None = None,
        channels: int | None = 3,
        mean: Sequence[float] | None = (0.4802, 0.4481, 0.3975),
        std: Sequence[float] | None = (0.2302, 0.2265, 0.2262),
        cache_dir: str | Path | None = None,
        **common: Any,
    ) -> None:
        super().__init__(
            root,
            image_size=image_size,
            channels=channels,
            mean=mean,
            std=std,
            cache_dir=cache_dir,
            **common,  # max_train, max_test, seed, hflip, crop_padding
        )

    def unavailable(self, missing: Sequence[Path]) -> DatasetUnavailable:
        return DatasetUnavailable(
            f"dataset {self.name!r} is not available: missing {', '.join(map(str, missing))}. "
            f"Get it from {URL}, download it elsewhere and unzip it so that {self.root}/train "
            f"and {self.root}/val exist (or give train/<class>/ and test/<class>/ folders), or "
            "point dataset.root, paths.data_dir or the BENCH_DATA_DIR environment variable at a "
            "folder that has it."
        )

    def scan(self) -> tuple[list[str], Files, Files]:
        annotations = self.root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            return super().scan()  # train/ + test/ class folders
        if not (self.root / "train").is_dir():
            raise self.unavailable([self.root / "train"])
        classes = class_folders(self.root / "train")
        index = {wnid: i for i, wnid in enumerate(classes)}
        rows = sorted(
            line.split("\t")[:2] for line in annotations.read_text().splitlines() if line.strip()
        )
        unknown = sorted({wnid for _, wnid in rows} - index.keys())
        if unknown:
            raise ConfigError(
                "dataset.root",
                f"{annotations} names classes with no folder in {self.root}/train: {unknown[:5]}",
            )
        images = self.root / "val" / "images"
        test = ([images / name for name, _ in rows], [index[wnid] for _, wnid in rows])
        missing = [p for p in test[0] if not p.is_file()]
        if missing:
            raise self.unavailable(missing[:3])
        return classes, self.list_split("train", classes), test
