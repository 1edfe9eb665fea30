"""SVHN house-number digits (73,257 train / 26,032 test, 32x32 colour), read by torchvision.

Source: Netzer et al. 2011, http://ufldl.stanford.edu/housenumbers/ (format 2, cropped digits).
Files: ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat`` (torchvision's layout; the
``extra`` split is not used). Label 10 in the files is the digit 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision import datasets as tvd

from benchmark.datasets._torchvision import FileDataset
from benchmark.types import ImageSet

_SPLITS = {True: "train", False: "test"}


class SVHN(FileDataset):
    """SVHN from torchvision's ``.mat`` files (checked against their md5 sums)."""

    name = "svhn"
    urls = (tvd.SVHN.split_list["train"][0], tvd.SVHN.split_list["test"][0])
    url_join = " and "
    num_classes = 10
    image_shape = (3, 32, 32)
    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)
    hflip = False  # mirrored digits are not digits
    crop_padding = 4
    train_size = 73257
    test_size = 26032

    def required(self) -> list[Path]:
        return [self.root / tvd.SVHN.split_list[split][1] for split in _SPLITS.values()]

    def fetch(self) -> None:
        for split in _SPLITS.values():
            if not (self.root / tvd.SVHN.split_list[split][1]).exists():
                tvd.SVHN(str(self.root), split=split, download=True)

    def read_split(self, train: bool) -> ImageSet:
        tv = tvd.SVHN(str(self.root), split=_SPLITS[train], download=False)
        # torchvision already maps label 10 to 0 and transposes to (N, C, H, W).
        x = torch.from_numpy(tv.data).contiguous()
        return ImageSet(
            x, torch.from_numpy(tv.labels).to(torch.int64), tuple(str(d) for d in range(10))
        )
