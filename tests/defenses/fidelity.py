"""The fixed input of the defenses' differential tests (``test_*_fidelity.py``).

A narrow ResNet-18 in the kuangliu layout (the official MMAC / MM-BD ``src/resnet.py`` network
at 1/16 of its width: 4, 8, 16, 32 channels, 44,622 parameters) with a 3x3 white-patch backdoor
towards class 0, trained once on the synthetic images below and stored in
``fixtures/fidelity_resnet_w4.npz`` (fp16 values, loaded into fp32), and the synthetic 3x32x32
images themselves, generated here from seeded generators. The same functions produced the
inputs of the official code's runs that made the fixtures, so both sides saw identical tensors;
``input_sha256`` lets a test fail loudly when an input drifts from the one the fixture saw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.models.base import ImageClassifier
from benchmark.models.resnet18 import BasicBlock
from benchmark.types import ImageSet, PoisonedSet

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_FILE = FIXTURES / "fidelity_resnet_w4.npz"
CLASSES = tuple(str(c) for c in range(10))
TARGET = 0
WIDTH = 4


class NarrowResNet18(ImageClassifier):
    """kuangliu's CIFAR ResNet-18 at widths ``(w, 2w, 4w, 8w)``, no normalisation (mean 0,
    std 1, as the official MMAC code feeds [0, 1] pixels); parameter names as kuangliu's and as
    the harness ``resnet18`` (whose ``BasicBlock`` it uses)."""

    head_name = "linear"

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__(10, 3, (32, 32), [0.0] * 3, [1.0] * 3)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        in_planes = width
        for i, (planes, stride) in enumerate(
            zip((width, 2 * width, 4 * width, 8 * width), (1, 2, 2, 2), strict=True), start=1
        ):
            blocks = nn.Sequential(
                BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes)
            )
            self.add_module(f"layer{i}", blocks)
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * width, 10)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


def images(n: int, seed: int, signal: float = 0.6) -> tuple[Tensor, Tensor]:
    """``n`` synthetic 3x32x32 uint8 images, labels ``arange(n) % 10``: one fixed blocky colour
    prototype per class (8x8 upsampled) mixed ``signal`` / ``1 - signal`` with per-image
    uniform noise (0.6: the model is right on all and sure; 0.4: right on ~99%, less sure)."""
    protos = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(123))
    protos = F.interpolate(protos, scale_factor=4, mode="nearest")
    y = torch.arange(n) % 10
    noise = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return (255 * (signal * protos[y] + (1 - signal) * noise)).round().to(torch.uint8), y


def with_trigger(x: Tensor) -> Tensor:
    """The backdoor: a 3x3 white patch in the bottom-right corner (rows and columns 29-31)."""
    x = x.clone()
    x[:, :, -3:, -3:] = 255
    return x


def clean_set(per_class: int = 10, seed: int = 1, signal: float = 0.6) -> ImageSet:
    """The defender's clean data: ``per_class`` images of each class."""
    x, y = images(10 * per_class, seed, signal)
    return ImageSet(x, y, CLASSES)


def eval_sets(n: int = 200, seed: int = 2) -> tuple[ImageSet, PoisonedSet]:
    """A clean test set and its backdoor test set (the non-target images with the trigger)."""
    x, y = images(n, seed)
    keep = y != TARGET
    src = torch.nonzero(keep).flatten()
    backdoor = PoisonedSet(
        with_trigger(x[keep]),
        torch.full((int(keep.sum()),), TARGET),
        CLASSES,
        is_poison=torch.ones(int(keep.sum()), dtype=torch.bool),
        y_orig=y[keep],
        src_index=src,
    )
    return ImageSet(x, y, CLASSES), backdoor


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for the module: the fixtures were made so (the numbers then match
    bit for bit on the machine that made them), and the 4-16-channel convolutions run faster
    on one thread than on two shared ones (measured 13 s against 66 s for 42 MMAC epochs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_model() -> NarrowResNet18:
    """The stored backdoored model, in eval mode."""
    model = NarrowResNet18()
    with np.load(MODEL_FILE) as arrays:
        state = {k: torch.from_numpy(arrays[k].astype(np.float32)) for k in arrays.files}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") or k in ("mean", "std"):
            state[k] = v
    model.load_state_dict(state)
    return model.eval()


def sha256(*tensors: Tensor) -> str:
    """sha256 hex of the tensors' bytes (contiguous, on the CPU), in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_sha256(model: nn.Module) -> str:
    """sha256 of a state dict's tensors, in key order."""
    state = model.state_dict()
    return sha256(*(state[k].float() for k in sorted(state)))
