"""``attack=badnets``: a small patch that replaces pixels (Gu et al. 2017).

Default as in BackdoorBench: a 3x3 white square in the bottom-right corner with no margin,
all-to-one target 0, poison rate 0.1 of the whole training set; all-to-all (y + 1 mod K) as an
option. The patch replaces the pixels of every channel. The poisoned images are stored before
augmentation (as BackdoorBench stores its PNGs), so random crops shift the patch during
training.

Trigger patterns (``pattern``):

- ``square`` (default): every pixel of the ``size x size`` square is ``value``.
- ``checker``: the ``size x size`` square as a black/white checkerboard, black (0) where
  ``row + col`` is even (counted from the square's top-left pixel) and ``value`` where it is
  odd. With the defaults (3x3, bottom right, margin 0, value 1) on 32x32 images this is
  UltraClean's official BadNets trigger (bxz9200/UltraClean eec1612,
  ``dirty-label attacks/badNets_generation.py``): rows/cols 29-31, white at (29,30), (30,29),
  (30,31), (31,30), black at the corners and the centre, in every channel.
- a path to an image file (e.g. BackdoorBench's ``resource/badnet/trigger_image.png``): a
  full-frame trigger applied as BackdoorBench's ``AddMaskPatchTrigger`` does (SCLBD/BackdoorBench
  f02e353, ``utils/bd_img_transform/patch.py``): every pixel value where the image is non-zero
  replaces the input's, the input is kept where it is zero (per channel). The image is read as
  RGB and resized to the input size with PIL's bilinear filter when it differs (BackdoorBench:
  torchvision ``Resize`` of the PIL image); for one-channel data its first (red) channel is used
  (BackdoorBench's MNIST branch). ``size``, ``position``, ``margin`` and ``value`` do not apply.

Reference:
    Gu, Dolan-Gavitt, Garg. "BadNets: Identifying Vulnerabilities in the Machine Learning Model
    Supply Chain." arXiv:1708.06733, 2017.

Deviations: none in the trigger; the test-time trigger is the training trigger. The cache key of
an image pattern is its path (as for Blend's key file); ``describe()`` records the file's
sha256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from attacks.base import Attack, Mode, checks
from benchmark.errors import ConfigError

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")
PATTERNS = ("square", "checker")


class BadNets(Attack):
    """Patch trigger: a square, a checkerboard, or an image file.

    Args:
        size: side of the square or checkerboard, in pixels.
        position: a corner name (``bottom_right``, ``bottom_left``, ``top_right``, ``top_left``)
            or ``[row, col]`` of the patch's top-left pixel.
        margin: distance of a corner patch from the image border, in pixels.
        value: pixel value of the square (of the checkerboard's white cells) in [0, 1].
        pattern: ``square``, ``checker`` or the path of a trigger image (see the module doc).
    """

    name: ClassVar[str] = "badnets"
    kind: ClassVar[str] = "dirty_label"

    def __init__(
        self,
        target_class: int = 0,
        poison_rate: float = 0.1,
        mode: Mode = "all2one",
        size: int = 3,
        position: str | Sequence[int] = "bottom_right",
        margin: int = 0,
        value: float = 1.0,
        pattern: str = "square",
    ) -> None:
        super().__init__(target_class, poison_rate, mode)
        checks.integer(size, "size")
        checks.integer(margin, "margin", 0)
        checks.number(value, "value", 0.0, 1.0)
        if isinstance(position, str):
            checks.require(
                position in CORNERS, "position", f"one of {CORNERS} or [row, col]", position
            )
        else:
            corner = list(position)
            ok = len(corner) == 2 and all(checks.is_int(p) and p >= 0 for p in corner)
            checks.require(ok, "position", "[row, col] of two integers >= 0", corner)
        self.size, self.margin, self.value = size, margin, float(value)
        self.position = position if isinstance(position, str) else tuple(position)
        self.pattern = pattern
        self.image: np.ndarray | None = None  # (H, W, 3) uint8 trigger file, as read
        self.image_sha256: str | None = None
        what = f"{' | '.join(PATTERNS)} | an image path"
        checks.require(isinstance(pattern, str) and bool(pattern), "pattern", what, pattern)
        if pattern not in PATTERNS:
            self.image, self.image_sha256 = read_trigger_image(Path(pattern).expanduser())
        self.origin: tuple[int, int] | None = None
        self.trigger: Tensor | None = None  # image pattern: (C, H, W) float, resized

    def validate(self, num_classes: int, image_shape: tuple[int, int, int], n_train: int) -> None:
        super().validate(num_classes, image_shape, n_train)
        if self.image is None:
            self.origin = self._origin(image_shape[1], image_shape[2])
        else:
            self.trigger = fit_trigger_image(self.image, image_shape)

    def _origin(self, h: int, w: int) -> tuple[int, int]:
        """Top-left pixel of the square in an ``h`` x ``w`` image."""
        s, m = self.size, self.margin
        if isinstance(self.position, str):
            row = h - s - m if self.position.startswith("bottom") else m
            col = w - s - m if self.position.endswith("right") else m
        else:
            row, col = self.position
        if row < 0 or col < 0 or row + s > h or col + s > w:
            raise ConfigError(
                "attack.size",
                f"a {s}x{s} square at {self.position} (margin {m}) does not fit in a {h}x{w} image",
            )
        return row, col

    def apply_trigger(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        if self.image is not None:
            if self.trigger is None or tuple(self.trigger.shape) != tuple(x.shape[-3:]):
                self.trigger = fit_trigger_image(self.image, tuple(x.shape[-3:]))
            t = self.trigger.to(device=x.device, dtype=x.dtype)
            return torch.where(t > 0, t, x)
        row, col = self.origin or self._origin(x.shape[-2], x.shape[-1])
        out = x.clone()
        patch = out[..., row : row + self.size, col : col + self.size]
        if self.pattern == "checker":
            patch.copy_(checker(self.size, self.value, dtype=x.dtype, device=x.device))
        else:
            patch.fill_(self.value)
        return out

    def describe(self, n_train: int) -> dict[str, Any]:
        pattern = self.pattern if self.image is None else Path(self.pattern).stem
        return {
            **super().describe(n_train),
            "trigger_size": self.size if self.image is None else None,
            "pattern": pattern,
            "pattern_sha256": self.image_sha256,
        }


def checker(
    size: int, value: float = 1.0, *, dtype: torch.dtype = torch.float32, device: Any = None
) -> Tensor:
    """``(size, size)`` checkerboard: 0 where ``row + col`` is even, ``value`` where odd."""
    r = torch.arange(size, device=device)
    odd = (r[:, None] + r[None, :]) % 2 == 1
    return odd.to(dtype) * value


def read_trigger_image(path: Path) -> tuple[np.ndarray, str]:
    """A trigger image file as ``(H, W, 3)`` uint8 RGB and the sha256 of its bytes."""
    if not path.is_file():
        raise ConfigError(
            "attack.pattern",
            f"= {str(path)!r} is neither {' nor '.join(PATTERNS)} nor an image file",
        )
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError("attack.pattern", f"= {path} is not a readable image ({err})") from None
    return arr, hashlib.sha256(path.read_bytes()).hexdigest()


def fit_trigger_image(image: np.ndarray, shape: Sequence[int]) -> Tensor:
    """The trigger image at ``shape = (C, H, W)`` as float in [0, 1]: PIL bilinear resize when
    the size differs, the first channel for C = 1 (BackdoorBench's MNIST branch)."""
    c, h, w = (int(s) for s in shape)
    if c not in (1, 3):
        raise ConfigError("attack.pattern", f"a trigger image needs 1 or 3 channels, got {c}")
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    t = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255.0)
    return t[:1].contiguous() if c == 1 else t.contiguous()
