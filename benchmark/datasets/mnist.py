"""MNIST handwritten digits (60,000 train / 10,000 test, 28x28 grey), read by torchvision.

Source: LeCun, Cortes and Burges, http://yann.lecun.com/exdb/mnist/ (torchvision's mirror
https://ossci-datasets.s3.amazonaws.com/mnist/). Files: ``<root>/MNIST/raw/*-idx?-ubyte``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torchvision import datasets as tvd

from benchmark.datasets._torchvision import FileDataset
from benchmark.types import ImageSet


class MNIST(FileDataset):
    """MNIST from the raw idx files torchvision downloads."""

    name = "mnist"
    tv_class: ClassVar[type[tvd.MNIST]] = tvd.MNIST
    urls = tuple(tvd.MNIST.mirrors)
    num_classes = 10
    image_shape = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)
    hflip = False  # mirrored digits are not digits
    crop_padding = 2
    train_size = 60000
    test_size = 10000

    @property
    def folder(self) -> Path:
        return self.root / self.tv_class.__name__ / "raw"

    def required(self) -> list[Path]:
        # torchvision reads the unpacked files (the .gz archives may be deleted).
        return [
            self.folder / f"{split}-{kind}"
            for split in ("train", "t10k")
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
        ]

    def fetch(self) -> None:
        self.tv_class(str(self.root), train=True, download=True)

    def read_split(self, train: bool) -> ImageSet:
        tv = self.tv_class(str(self.root), train=train, download=False)
        return ImageSet(
            tv.data.unsqueeze(1).contiguous(), tv.targets.to(torch.int64), tuple(tv.classes)
        )
