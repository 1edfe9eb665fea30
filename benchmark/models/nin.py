"""``model=nin``: Network in Network for CIFAR, as in NONE's official code.

Lin, Chen, Yan. "Network In Network". ICLR 2014, arXiv:1312.4400.
Layout of NONE's ``models/nin.py`` (RU-System-Software-and-Security/NONE; the Caffe CIFAR-10 NiN):
three mlpconv stages, each a spatial conv followed by two 1x1 convs, all with bias and ReLU and no
normalisation: 5x5/192-1x1/160-1x1/96, max-pool 3x3 s2 p1, dropout 0.5; 5x5/192-1x1/192-1x1/192,
avg-pool 3x3 s2 p1, dropout 0.5; 3x3/192-1x1/192, then the class layer. Weights start as NONE
sets them: conv (and class-layer) weights N(0, 0.05^2), biases N(0, 0.001^2). 966,986 parameters
for 3 channels and 10 classes.

Deviation: NONE (and Caffe) end with a third 1x1 conv to ``num_classes`` maps, a ReLU, and an 8x8
average pool. The harness needs pooled features and a final ``nn.Linear``, so here the 192-channel
maps are globally averaged and fed to ``Linear(192, num_classes)``. Averaging commutes with the
1x1 conv, so this is the same linear map as conv-then-average with the same parameters (``fc``
holds the class conv's weights reshaped to 2-D), but the original's ReLU on the class maps is
dropped: logits can be negative here, and each class map is no longer clipped at zero before
averaging. The global pool is adaptive (the original's fixed 8x8 needs 32x32 inputs).

``features.<i>`` indices match NONE's ``classifier.<i>`` for i < 20, so the eight monitored convs
are ``features.{0,2,4,8,10,12,16,18}``, NONE's ``inner_output_index``. NONE trains NiN with
per-parameter learning rates (biases 2x, class layer 0.1x, momentum 0.95); that is recipe, not
model, and lives with the training config.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from benchmark.models.base import ImageClassifier


def _conv(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(inplace=False)]


class NiN(ImageClassifier):
    """Network in Network with a global-average-pool + linear head."""

    head_name = "fc"
    # NONE monitors the inner convs, i.e. all but its class conv, which is ``fc`` here.
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
        self.features = nn.Sequential(
            *_conv(in_chans, 192, 5),
            *_conv(192, 160, 1),
            *_conv(160, 96, 1),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Dropout(0.5),
            *_conv(96, 192, 5),
            *_conv(192, 192, 1),
            *_conv(192, 192, 1),
            nn.AvgPool2d(3, stride=2, padding=1),
            nn.Dropout(0.5),
            *_conv(192, 192, 3),
            *_conv(192, 192, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(192, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.05)
                nn.init.normal_(m.bias, 0.0, 0.001)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.features(self.normalize(x))).flatten(1)
