"""``model=resnet18``: ResNet-18 with the CIFAR stem (kuangliu/pytorch-cifar layout).

He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition". CVPR 2016, arXiv:1512.03385.
Layout of the widely used kuangliu/pytorch-cifar ``ResNet18`` (NONE's ResNet-18 is the same
network under other names): a 3x3 stride-1 stem conv-BN-ReLU with no max-pool; four stages of
two ``BasicBlock`` s (64, 128, 256, 512 channels, stride 2 from stage 2 on), each
``conv1-bn1-relu1 -> conv2-bn2``, plus the shortcut (1x1 conv + BN when the shape changes), then
``relu2``; global average pooling and ``linear``. 11,173,962 parameters for 3 channels, 10 classes.

Differences from He et al.: the ImageNet stem (7x7 stride 2 conv + max-pool) is replaced by the
CIFAR stem, so 32x32 inputs reach layer4 at 4x4. Differences from kuangliu: activations are
modules, one per site (the stem's ``relu`` and ``relu1``/``relu2`` in each block: the 17 sites
MMAC clips) instead of ``F.relu``; adaptive average pooling replaces ``avg_pool2d(out, 4)`` so any
input of 8x8 and up works (identical at 32x32); the stem takes ``in_chans``; normalisation happens
inside ``forward``. Parameter names match kuangliu's (``shortcut.0``/``shortcut.1``, ``linear``);
NONE's own copy calls them ``downsample`` and ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from benchmark.models.base import ImageClassifier


class BasicBlock(nn.Module):
    """``conv1-bn1-relu1 -> conv2-bn2`` + shortcut, then ``relu2``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet18(ImageClassifier):
    """ResNet-18 for small images (any ``in_chans``, inputs of 8x8 and up)."""

    head_name = "linear"
    # NONE's official code monitors the convs of layer2-layer4 (not the stem, not layer1).
    monitored_prefixes = ("layer2", "layer3", "layer4")

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        image_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__(num_classes, in_chans, image_size, mean, std)
        self.conv1 = nn.Conv2d(in_chans, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
        in_planes = 64
        for i, (planes, stride) in enumerate(zip(widths, strides, strict=True), start=1):
            self.add_module(
                f"layer{i}",
                nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes)),
            )
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)
