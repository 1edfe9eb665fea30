"""CIFAR-100 (50,000 train / 10,000 test, 32x32 colour, 100 fine classes), read by torchvision.

Source: Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html. Files: the python version,
``<root>/cifar-100-python/{train,test,meta}``. Labels are the 100 fine labels.
"""

from __future__ import annotations

from typing import ClassVar

from torchvision import datasets as tvd

from benchmark.datasets.cifar10 import CIFAR10


class CIFAR100(CIFAR10):
    """CIFAR-100; the same format as CIFAR-10 with one train and one test file."""

    name = "cifar100"
    tv_class: ClassVar[type[tvd.CIFAR10]] = tvd.CIFAR100
    urls = (tvd.CIFAR100.url,)
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
