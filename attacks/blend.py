"""``attack=blend``: blended injection of a key image (Chen et al. 2017).

x' = (1 - alpha) x + alpha k, with alpha 0.2 at training time and at test time (each
configurable, as BackdoorBench's ``attack_train_blended_alpha`` / ``attack_test_blended_alpha``).
The key is either a seeded uniform random-noise image (the paper's random-pattern key, the
default here, so the harness needs no image file) or any image file (``key_path``), resized to
the input size with bilinear interpolation; BackdoorBench's Hello Kitty is such a file.
All-to-one target 0 and poison rate 0.1 of the whole training set by default; all-to-all as an
option.

Reference:
    Chen, Liu, Li, Lu, Song. "Targeted Backdoor Attacks on Deep Learning Systems Using Data
    Poisoning." arXiv:1712.05526, 2017.

Deviations: the default key is random noise, not BackdoorBench's Hello Kitty image (not
shipped: set ``key_path`` to use it). The noise key is drawn once per run from the run seed and
saved with the cached model. A colour key on one-channel data is converted to grayscale
(ITU-R 601 luma, PIL's ``L`` mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from attacks.base import Attack, AttackContext, Mode
from benchmark.data import to_float, to_uint8
from benchmark.errors import ConfigError
from benchmark.types import ImageSet


class Blend(Attack):
    """Blend a key image into the input.

    Args:
        alpha: blend weight of the key at training time, in (0, 1].
        test_alpha: blend weight at test time (null = ``alpha``).
        key_path: an image file used as the key; null = seeded uniform noise.
    """

    name: ClassVar[str] = "blend"
    kind: ClassVar[str] = "dirty_label"

    def __init__(
        self,
        target_class: int = 0,
        poison_rate: float = 0.1,
        mode: Mode = "all2one",
        alpha: float = 0.2,
        test_alpha: float | None = None,
        key_path: str | None = None,
    ) -> None:
        super().__init__(target_class, poison_rate, mode)
        for key, value in (("alpha", alpha), ("test_alpha", test_alpha)):
            if value is not None and not 0.0 < float(value) <= 1.0:
                raise ConfigError(f"attack.{key}", f"must be in (0, 1], got {value!r}")
        self.alpha = float(alpha)
        self.test_alpha = float(alpha if test_alpha is None else test_alpha)
        self.key_path = None if key_path in (None, "") else Path(str(key_path)).expanduser()
        self.key: Tensor | None = None  # (C, H, W) float in [0, 1]
        self.shape: tuple[int, int, int] | None = None

    def validate(self, num_classes: int, image_shape: tuple[int, int, int], n_train: int) -> None:
        super().validate(num_classes, image_shape, n_train)
        self.shape = tuple(image_shape)
        if self.key_path is not None:
            self.key = load_key(self.key_path, self.shape)

    def prepare(
        self, train: ImageSet, gen: torch.Generator, ctx: AttackContext | None = None
    ) -> None:
        shape = self.shape or tuple(train.x.shape[1:])
        if self.key is None or tuple(self.key.shape) != shape:
            self.key = (
                load_key(self.key_path, shape)
                if self.key_path is not None
                else torch.rand(shape, generator=gen)
            )

    def _blend(self, x: Tensor, alpha: float) -> Tensor:
        if self.key is None:
            raise RuntimeError("prepare() must build the key before the trigger is applied")
        key = self.key.to(device=x.device, dtype=x.dtype)
        return ((1.0 - alpha) * x + alpha * key).clamp_(0.0, 1.0)

    def apply_trigger(self, x: Tensor) -> Tensor:
        """The test-time trigger (``test_alpha``)."""
        return self._blend(x, self.test_alpha)

    def poison_images(self, x: Tensor, index: Tensor) -> Tensor:
        """Training images blended with the training ``alpha``."""
        return to_uint8(self._blend(to_float(x), self.alpha))

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key.cpu()} if self.key is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "key" in state:
            self.key = state["key"].float()

    def describe(self, n_train: int) -> dict[str, Any]:
        return {
            **super().describe(n_train),
            "alpha": self.alpha,
            "test_alpha": self.test_alpha,
            "key": str(self.key_path) if self.key_path else "noise",
        }


def load_key(path: Path, shape: tuple[int, int, int]) -> Tensor:
    """An image file as a ``(C, H, W)`` float key in [0, 1], resized to ``H x W``."""
    c, h, w = shape
    if not path.is_file():
        raise ConfigError("attack.key_path", f"= {path} is not a file; give an image file path")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if c == 1 else "RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError("attack.key_path", f"= {path} is not a readable image ({err})") from None
    t = torch.from_numpy(arr.copy()).float().div_(255.0)
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if c not in (1, 3):
        t = t.mean(0, keepdim=True).expand(c, -1, -1)
    t = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return t[0].clamp_(0.0, 1.0).contiguous()
