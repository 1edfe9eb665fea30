"""Fashion-MNIST clothing images (60,000 train / 10,000 test, 28x28 grey), read by torchvision.

Source: Xiao, Rasul and Vollgraf 2017, https://github.com/zalandoresearch/fashion-mnist (files at
http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/). Files:
``<root>/FashionMNIST/raw/*-idx?-ubyte``; Debian's ``dataset-fashion-mnist`` package has them.
"""

from __future__ import annotations

from typing import ClassVar

from torchvision import datasets as tvd

from benchmark.datasets.mnist import MNIST


class FashionMNIST(MNIST):
    """Fashion-MNIST; the same file format and layout as MNIST."""

    name = "fashion_mnist"
    tv_class: ClassVar[type[tvd.MNIST]] = tvd.FashionMNIST
    urls = tuple(tvd.FashionMNIST.mirrors)
    mean = (0.2860,)
    std = (0.3530,)
    # Off as for MNIST, although a mirrored garment keeps its label: dataset.hflip=true flips.
    hflip = False
