"""``model=vgg16_bn``: the CIFAR VGG-16 with BatchNorm (kuangliu/pytorch-cifar layout).

Simonyan, Zisserman. "Very Deep Convolutional Networks for Large-Scale Image Recognition".
ICLR 2015, arXiv:1409.1556 (BatchNorm: Ioffe, Szegedy, ICML 2015).
Layout of the CIFAR variant in kuangliu/pytorch-cifar (the model zoo of UltraClean's dirty-label
experiments): configuration D, thirteen conv3x3(pad 1)-BN-ReLU units in five stages (64, 128, 256,
512, 512 channels) each closed by a 2x2 max-pool, then a single ``Linear(512, num_classes)``
classifier instead of the paper's three 4096-wide FC layers. 14,728,266 parameters for 3 channels
and 10 classes.

Differences from kuangliu: (1) a max-pool is skipped when its input is smaller than 2x2, and the
trailing ``AvgPool2d(1)`` no-op is an adaptive average pool to 1x1, so 28x28 digits
(28-14-7-3-1-1), 8x8 inputs and 64x64 images work; at 32x32 the network is unchanged (the fifth
pool leaves 1x1, so the average is a no-op), at 64x64 the final 2x2 map is averaged where kuangliu
would need a 2048-wide classifier. (2) One ReLU module per site (13). (3) The first conv takes
``in_chans``; normalisation happens inside ``forward``. As in kuangliu, the convs keep their bias
before BN. Parameter names match kuangliu's (``features.<i>``, ``classifier``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from benchmark.models.base import ImageClassifier

# Configuration D: output channels of each conv, "M" for a max-pool.
CFG_D: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class MaxPoolIfLarge(nn.MaxPool2d):
    """A 2x2 stride-2 max-pool that passes maps smaller than 2x2 through unchanged.

    Five halvings take 32 to 1 but 28 to 0; skipping a pool that would leave no pixels keeps the
    network usable on small inputs without changing it for inputs of 32x32 and up.
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] < 2 or x.shape[-1] < 2:
            return x
        return super().forward(x)


def make_features(in_chans: int, cfg: Sequence[int | str] = CFG_D) -> nn.Sequential:
    """conv3x3-BN-ReLU units and pools, ending in a global average pool."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(MaxPoolIfLarge())
        else:
            layers += [
                nn.Conv2d(in_chans, int(v), 3, padding=1),
                nn.BatchNorm2d(int(v)),
                nn.ReLU(inplace=False),
            ]
            in_chans = int(v)
    layers.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers)


class VGG16BN(ImageClassifier):
    """CIFAR VGG-16-BN for small images (any ``in_chans``, inputs of 8x8 and up)."""

    head_name = "classifier"
    # NONE's official code monitors every conv of VGG.
    monitored_prefixes = ("features",)

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__(num_classes, in_chans, image_size, mean, std)
        self.features = make_features(in_chans)
        self.classifier = nn.Linear(512, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(self.normalize(x)).flatten(1)
