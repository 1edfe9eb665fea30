"""``model=small_cnn``: a three-block CNN (about 94k parameters) for CPU runs and tests.

conv3x3(32)-BN-ReLU-maxpool, conv3x3(64)-BN-ReLU-maxpool, conv3x3(128)-BN-ReLU, global average
pool, linear. Sized for 28x28 digits and 32x32 colour images on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from benchmark.models.base import ImageClassifier, check_width


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class SmallCNN(ImageClassifier):
    """Small CNN with separate activation modules at every site."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        width: int = 32,
    ) -> None:
        check_width(width)
        super().__init__(num_classes, in_chans, image_size, mean, std)
        self.block1 = _block(in_chans, width)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = _block(width, 2 * width)
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _block(2 * width, 4 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.pool1(self.block1(self.normalize(x)))
        x = self.pool2(self.block2(x))
        return self.pool(self.block3(x)).flatten(1)
