"""CIFAR-10 (50,000 train / 10,000 test, 32x32 colour, 10 classes), read by torchvision.

Source: Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html. Files: the python version,
``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torchvision import datasets as tvd

from benchmark.datasets._torchvision import FileDataset
from benchmark.types import ImageSet


class CIFAR10(FileDataset):
    """CIFAR-10 from torchvision's pickled batches (checked against their md5 sums)."""

    name = "cifar10"
    tv_class: ClassVar[type[tvd.CIFAR10]] = tvd.CIFAR10
    urls = (tvd.CIFAR10.url,)
    num_classes = 10
    image_shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    hflip = True
    crop_padding = 4
    train_size = 50000
    test_size = 10000

    @property
    def folder(self) -> Path:
        return self.root / self.tv_class.base_folder

    def required(self) -> list[Path]:
        tv = self.tv_class
        names = [name for name, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]
        return [self.folder / name for name in names]

    def fetch(self) -> None:
        self.tv_class(str(self.root), train=True, download=True)

    def read_split(self, train: bool) -> ImageSet:
        tv = self.tv_class(str(self.root), train=train, download=False)
        # torchvision holds (N, H, W, C) numpy; CIFAR-100's targets are its fine labels.
        x = torch.from_numpy(tv.data).permute(0, 3, 1, 2).contiguous()
        return ImageSet(x, torch.as_tensor(tv.targets, dtype=torch.int64), tuple(tv.classes))
