"""``attack=blend``: blended injection of a key image (Chen et al. 2017).

``formula: convex`` (default): x' = (1 - alpha) x + alpha k, as BackdoorBench
(``utils/bd_img_transform/blended.py``, at SCLBD/BackdoorBench@f02e353). ``formula: additive``:
x' = clip(x + alpha k, 0, 1), UltraClean's official Blend (``dirty-label attacks/
blended_generation.py`` at bxz9200/UltraClean@eec1612: ``x + 0.2 * key / 255``, clipped; alpha
0.2). alpha is 0.2 at training time and at test time (each configurable, as BackdoorBench's
``attack_train_blended_alpha`` / ``attack_test_blended_alpha``). The key is either a seeded
uniform random-noise image (the paper's random-pattern key, the default here, so the harness
needs no image file) or any image file (``key_path``), resized to the input size as BackdoorBench
resizes it (PIL bilinear on the uint8 image, then /255); BackdoorBench's Hello Kitty
(``paths.hello_kitty``) is such a file. ``describe()`` records the trigger's identity: ``key``
("noise" or the file's stem), ``key_sha256`` (of the file's bytes; null for noise) and
``formula``. All-to-one target 0 and poison rate 0.1 of the whole training set by default;
all-to-all as an option.

Reference:
    Chen, Liu, Li, Lu, Song. "Targeted Backdoor Attacks on Deep Learning Systems Using Data
    Poisoning." arXiv:1712.05526, 2017.

Deviations:
- The default key is random noise, not BackdoorBench's Hello Kitty image (not shipped: set
  ``key_path`` to use it). The noise key is drawn once per run from the run seed and saved with
  the cached model.
- Stored poisoned images are rounded to uint8; BackdoorBench truncates (``astype(np.uint8)``),
  so with the same key every stored value is BackdoorBench's or one level above it (pinned by
  ``tests/attacks/test_triggers_fidelity.py``).
- ``additive``: UltraClean resizes its key with OpenCV's ``INTER_AREA`` and keeps float images;
  here the key is resized as above and the images are stored as uint8.
- A colour key on one-channel data is converted to grayscale (ITU-R 601 luma, PIL's ``L``
  mode) before resizing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from attacks.base import Attack, AttackContext, Mode, checks
from benchmark.data import to_float, to_uint8
from benchmark.errors import ConfigError
from benchmark.types import ImageSet

Formula = Literal["convex", "additive"]
FORMULAS = ("convex", "additive")


class Blend(Attack):
    """Blend a key image into the input.

    Args:
        alpha: blend weight of the key at training time, in (0, 1].
        test_alpha: blend weight at test time (null = ``alpha``).
        key_path: an image file used as the key; null = seeded uniform noise.
        formula: ``convex`` ((1 - alpha) x + alpha k, BackdoorBench) or ``additive``
            (clip(x + alpha k), UltraClean).
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
        formula: Formula = "convex",
    ) -> None:
        super().__init__(target_class, poison_rate, mode)
        checks.number(alpha, "alpha", 0.0, 1.0, low_open=True)
        checks.null_or_number(test_alpha, "test_alpha", 0.0, 1.0, low_open=True)
        checks.one_of(formula, "formula", FORMULAS)
        self.alpha = float(alpha)
        self.test_alpha = float(alpha if test_alpha is None else test_alpha)
        self.formula: Formula = formula
        self.key_path = None if key_path in (None, "") else Path(str(key_path)).expanduser()
        self.key_sha256: str | None = None  # of the key file's bytes, once read
        self.key: Tensor | None = None  # (C, H, W) float in [0, 1]
        self.shape: tuple[int, int, int] | None = None

    def validate(self, num_classes: int, image_shape: tuple[int, int, int], n_train: int) -> None:
        """Also reads the key file (before any data is loaded): a missing or unreadable one is
        a ``ConfigError`` naming ``attack.key_path``."""
        super().validate(num_classes, image_shape, n_train)
        self.shape = tuple(image_shape)
        if self.key_path is not None:
            self._load_key(self.shape)

    def _load_key(self, shape: tuple[int, int, int]) -> None:
        assert self.key_path is not None
        self.key, self.key_sha256 = load_key(self.key_path, shape)

    def prepare(
        self, train: ImageSet, gen: torch.Generator, ctx: AttackContext | None = None
    ) -> None:
        shape = self.shape or tuple(train.x.shape[1:])
        if self.key is None or tuple(self.key.shape) != shape:
            if self.key_path is not None:
                self._load_key(shape)
            else:
                self.key = torch.rand(shape, generator=gen)

    def _blend(self, x: Tensor, alpha: float) -> Tensor:
        if self.key is None:
            raise RuntimeError("prepare() must build the key before the trigger is applied")
        key = self.key.to(device=x.device, dtype=x.dtype)
        if self.formula == "additive":
            return (x + alpha * key).clamp_(0.0, 1.0)
        return ((1.0 - alpha) * x + alpha * key).clamp_(0.0, 1.0)

    def apply_trigger(self, x: Tensor, index: Tensor | None = None) -> Tensor:
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
            "formula": self.formula,
            "key": self.key_path.stem if self.key_path else "noise",
            "key_sha256": self.key_sha256,
        }


def load_key(path: Path, shape: tuple[int, int, int]) -> tuple[Tensor, str]:
    """An image file as a ``(C, H, W)`` float key in [0, 1] and the sha256 of its bytes.

    Resized to ``H x W`` as BackdoorBench does (``ToPILImage, Resize, ToTensor``): PIL's
    bilinear filter on the uint8 image, then /255, so the key is the same to the bit.
    """
    c, h, w = shape
    if not path.is_file():
        raise ConfigError("attack.key_path", f"= {path} is not a file; give an image file path")
    data = path.read_bytes()
    try:
        with Image.open(path) as img:
            img = img.convert("L" if c == 1 else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        reason = " ".join(str(err).split())
        raise ConfigError(
            "attack.key_path", f"= {path} is not a readable image ({reason})"
        ) from None
    t = torch.from_numpy(arr.copy()).float().div_(255.0)
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if c not in (1, 3):
        t = t.mean(0, keepdim=True).expand(c, -1, -1)
    return t.contiguous(), hashlib.sha256(data).hexdigest()
