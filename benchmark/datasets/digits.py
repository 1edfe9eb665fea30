"""scikit-learn's 8x8 handwritten digits (1,797 images), split 1,437 / 360, stratified.

Source: UCI "Optical Recognition of Handwritten Digits" (Alpaydin and Kaynak 1998), shipped as
``sklearn.datasets.load_digits``: needs no network. Pixel counts 0..16 become 0..255.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmark.data import stratified_split
from benchmark.datasets.base import Dataset
from benchmark.seeding import generator
from benchmark.types import ImageSet


class Digits(Dataset):
    """The UCI digits as (1, 8, 8) uint8 images with a seeded, stratified 80/20 split."""

    name = "digits"
    num_classes = 10
    image_shape = (1, 8, 8)
    # Computed once over all 1,797 images after the 0..255 scaling.
    mean = (0.3053,)
    std = (0.3759,)
    hflip = False  # mirrored digits are not digits
    crop_padding = 1  # the images are 8 pixels wide
    train_size = 1437
    test_size = 360

    def load_full(self) -> tuple[ImageSet, ImageSet]:
        from sklearn.datasets import load_digits  # imported here: sklearn's import is slow

        d = load_digits()
        x = np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
        data = ImageSet(
            torch.from_numpy(x),
            torch.from_numpy(d.target).to(torch.int64),
            tuple(str(t) for t in d.target_names),
        )
        gen = generator(self.seed, "dataset", self.name, "split")
        train, test = stratified_split(data, self.train_size, gen)
        return data.subset(train), data.subset(test)
