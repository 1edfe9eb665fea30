"""Core data types shared by the harness, the attacks and the defenses.

Images are kept as uint8 tensors ``(N, C, H, W)``, like delivered image files, and converted to
float pixels in [0, 1] per batch. Poisoned images are stored quantised to uint8 too, which
matters for barely visible triggers and is what a real poisoned dataset would look like.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled image split held as tensors.

    Attributes:
        x: ``(N, C, H, W)`` uint8 pixels.
        y: ``(N,)`` int64 labels in ``[0, len(classes))``.
        classes: class names, index = label.
    """

    x: Tensor
    y: Tensor
    classes: tuple[str, ...]

    # Fields indexed per sample by ``subset``; subclasses extend this.
    per_sample: ClassVar[tuple[str, ...]] = ("x", "y")

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise TypeError(
                f"x must be a (N, C, H, W) uint8 tensor, got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise TypeError(
                f"y must be an int64 tensor of shape ({self.x.shape[0]},), "
                f"got {self.y.dtype} {tuple(self.y.shape)}"
            )
        object.__setattr__(self, "classes", tuple(self.classes))

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def subset(self, index: Tensor) -> ImageSet:
        """The samples at ``index`` (int64 indices or a bool mask), as a set of the same type."""
        index = index.to(self.x.device)
        return dataclasses.replace(self, **{f: getattr(self, f)[index] for f in self.per_sample})

    def to(self, device: str | torch.device) -> ImageSet:
        """The same set with every per-sample tensor on ``device``."""
        return dataclasses.replace(
            self, **{f: getattr(self, f).to(device) for f in self.per_sample}
        )

    def class_counts(self) -> Tensor:
        """``(num_classes,)`` int64 number of samples per class."""
        return torch.bincount(self.y.cpu(), minlength=self.num_classes)


@dataclass(frozen=True, eq=False)
class PoisonedSet(ImageSet):
    """An ``ImageSet`` with the ground truth of a poisoning, for the runner's metrics only.

    Defenses never receive these fields: the runner hands them ``clean_view()``.

    Attributes:
        is_poison: ``(N,)`` bool, True where the sample carries the trigger.
        y_orig: ``(N,)`` int64 true labels before any label change.
        src_index: ``(N,)`` int64 index of the sample in the set it was derived from.
    """

    is_poison: Tensor = dataclasses.field(default=None)  # type: ignore[assignment]
    y_orig: Tensor = dataclasses.field(default=None)  # type: ignore[assignment]
    src_index: Tensor = dataclasses.field(default=None)  # type: ignore[assignment]

    per_sample: ClassVar[tuple[str, ...]] = ("x", "y", "is_poison", "y_orig", "src_index")

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self)
        for name, dtype in (
            ("is_poison", torch.bool),
            ("y_orig", torch.int64),
            ("src_index", torch.int64),
        ):
            t = getattr(self, name)
            if t is None or t.dtype != dtype or t.shape != (n,):
                raise TypeError(f"{name} must be a {dtype} tensor of shape ({n},)")

    @property
    def num_poison(self) -> int:
        return int(self.is_poison.sum())

    def clean_view(self) -> ImageSet:
        """The same images and (possibly flipped) labels, without the poisoning ground truth."""
        return ImageSet(self.x, self.y, self.classes)
