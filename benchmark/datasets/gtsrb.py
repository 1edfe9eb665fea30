"""GTSRB German traffic signs (26,640 train / 12,630 test, 43 classes), resized to a square.

Source: Stallkamp et al. 2012, https://benchmark.ini.rub.de/gtsrb_dataset.html; files as
torchvision's ``GTSRB`` downloads them (``GTSRB-Training_fixed.zip``, the competition's training
set, and the final test set): ``<root>/gtsrb/GTSRB/Training/000NN/*.ppm``,
``<root>/gtsrb/GTSRB/Final_Test/Images/*.ppm`` and ``<root>/gtsrb/GT-final_test.csv``. Images
vary in size and are resized to ``image_size`` (32, as BackdoorBench) with PIL bilinear.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch
from torchvision import datasets as tvd

from benchmark.datasets._imagecache import cached, decode_images, files_key, list_images
from benchmark.datasets._torchvision import FileDataset
from benchmark.errors import ConfigError
from benchmark.types import ImageSet

log = logging.getLogger(__name__)

_BASE_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
# The benchmark's signnames.csv, index = ClassId.
CLASSES = (
    "Speed limit (20km/h)",
    "Speed limit (30km/h)",
    "Speed limit (50km/h)",
    "Speed limit (60km/h)",
    "Speed limit (70km/h)",
    "Speed limit (80km/h)",
    "End of speed limit (80km/h)",
    "Speed limit (100km/h)",
    "Speed limit (120km/h)",
    "No passing",
    "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection",
    "Priority road",
    "Yield",
    "Stop",
    "No vehicles",
    "Vehicles over 3.5 metric tons prohibited",
    "No entry",
    "General caution",
    "Dangerous curve to the left",
    "Dangerous curve to the right",
    "Double curve",
    "Bumpy road",
    "Slippery road",
    "Road narrows on the right",
    "Road work",
    "Traffic signals",
    "Pedestrians",
    "Children crossing",
    "Bicycles crossing",
    "Beware of ice/snow",
    "Wild animals crossing",
    "End of all speed and passing limits",
    "Turn right ahead",
    "Turn left ahead",
    "Ahead only",
    "Go straight or right",
    "Go straight or left",
    "Keep right",
    "Keep left",
    "Roundabout mandatory",
    "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
)


class GTSRB(FileDataset):
    """GTSRB in torchvision's layout, decoded once and cached as uint8 tensors."""

    name = "gtsrb"
    urls = tuple(
        _BASE_URL + f
        for f in (
            "GTSRB-Training_fixed.zip",
            "GTSRB_Final_Test_Images.zip",
            "GTSRB_Final_Test_GT.zip",
        )
    )
    url_join = " and "
    num_classes = 43
    mean = (0.3403, 0.3121, 0.3214)
    std = (0.2724, 0.2608, 0.2669)
    hflip = False  # mirrored signs change meaning (turn left / turn right)
    crop_padding = 4
    train_size = 26640
    test_size = 12630

    def __init__(
        self,
        root: str | Path,
        *,
        download: bool = False,
        image_size: int = 32,
        cache_dir: str | Path | None = None,
        **common: Any,
    ) -> None:
        super().__init__(
            root,
            download=download,
            **common,  # max_train, max_test, seed, hflip, crop_padding
        )
        if not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(
                "dataset.image_size", f"must be a positive integer, got {image_size!r}"
            )
        self.image_size = image_size
        self.image_shape = (3, image_size, image_size)
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()

    @property
    def folder(self) -> Path:
        return self.root / "gtsrb"

    def required(self) -> list[Path]:
        return [
            self.folder / "GTSRB" / "Training",
            self.folder / "GTSRB" / "Final_Test" / "Images",
            self.folder / "GT-final_test.csv",
        ]

    def fetch(self) -> None:
        # torchvision skips a split whose image folder exists.
        for split in ("train", "test"):
            tvd.GTSRB(str(self.root), split=split, download=True)

    def samples(self, train: bool) -> tuple[list[Path], list[int]]:
        """Image paths and labels of a split, in torchvision's order."""
        if train:
            paths, labels = [], []
            for folder in sorted(
                p for p in (self.folder / "GTSRB" / "Training").iterdir() if p.is_dir()
            ):
                found = list_images(folder, frozenset({".ppm"}))
                paths += found
                labels += [int(folder.name)] * len(found)  # folder 000NN is ClassId NN
            return paths, labels
        images = self.folder / "GTSRB" / "Final_Test" / "Images"
        with open(self.folder / "GT-final_test.csv", newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
        return [images / r["Filename"] for r in rows], [int(r["ClassId"]) for r in rows]

    def read_split(self, train: bool) -> ImageSet:
        paths, labels = self.samples(train)
        if labels and not 0 <= min(labels) <= max(labels) < self.num_classes:
            raise ValueError(f"class ids outside 0..{self.num_classes - 1}")
        split = "train" if train else "test"

        def build() -> dict[str, torch.Tensor]:
            log.info("decoding %d GTSRB %s images (cached afterwards)", len(paths), split)
            x = decode_images(
                paths, self.image_shape, resize=True, desc=f"decoding GTSRB {split} images"
            )
            return {"x": x, "y": torch.tensor(labels, dtype=torch.int64)}

        key = files_key(paths, labels, self.folder, self.image_shape)
        data = cached(self.cache_dir, f"{self.name}-{split}", key, build)
        return ImageSet(data["x"], data["y"], CLASSES)
