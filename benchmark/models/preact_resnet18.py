"""``model=preact_resnet18``: PreAct-ResNet-18 in the CIFAR layout BackdoorBench trains.

He, Zhang, Ren, Sun. "Identity Mappings in Deep Residual Networks". ECCV 2016, arXiv:1603.05027.
Layout of BackdoorBench's ``models/preact_resnet.py`` (from the WaNet release): a 3x3 stride-1
stem conv with no norm, activation or max-pool; four stages of two ``PreActBlock`` s (64, 128,
256, 512 channels, stride 2 from stage 2 on), each ``bn1-relu -> conv1 -> bn2-relu -> conv2`` plus
the shortcut; the shortcut is a bare 1x1 conv (no norm) on the *activated* input when the shape
changes, else the raw input; then adaptive average pooling and ``linear``. 11,171,146 parameters
for 3 input channels and 10 classes.

Differences from He et al.: the paper's pre-activation nets end with a BN-ReLU after the last
block; BackdoorBench (and so this model) pools the raw residual stream instead. The paper's
ImageNet stem (7x7 stride 2 conv + max-pool) is replaced by the 3x3 stride-1 CIFAR stem.

Differences from BackdoorBench: activations are modules, one per site (``relu1``, ``relu2`` in each
block: 16 sites), instead of ``F.relu``, so defenses can hook and clip them; the residual add is
out of place so tracing pairs conv outputs with norms honestly; the stem takes ``in_chans``;
normalisation happens inside ``forward``. Parameter names match BackdoorBench's, so its
checkpoints load with ``strict=False`` (only our ``mean``/``std`` buffers are missing).

``width`` (64 = the paper's and BackdoorBench's) scales every stage: ``width=16`` is a small
ResNet (0.70M parameters, about 1/16 of the compute) for real-data runs on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from benchmark.models.base import ImageClassifier, check_width


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``bn1-relu1 -> conv1 -> bn2-relu2 -> conv2`` + shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        # Registered before conv1 because it runs first (on the activated input), so that
        # registration order is execution order.
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet18(ImageClassifier):
    """PreAct-ResNet-18 for small images (any ``in_chans``, inputs of 8x8 and up)."""

    head_name = "linear"
    # NONE monitors layer2-layer4 of ResNet-18; the same stages here.
    monitored_prefixes = ("layer2", "layer3", "layer4")

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        width: int = 64,
    ) -> None:
        check_width(width)
        super().__init__(num_classes, in_chans, image_size, mean, std)
        if width < 1:
            raise ValueError(f"model.width must be a positive channel count, got {width}")
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        widths, strides = (width, 2 * width, 4 * width, 8 * width), (1, 2, 2, 2)
        in_planes = width
        for i, (planes, stride) in enumerate(zip(widths, strides, strict=True), start=1):
            self.add_module(
                f"layer{i}",
                nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes)),
            )
            in_planes = planes
        # Adaptive (BackdoorBench's choice too) so 28x28 digits and 64x64 images work.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)
