"""``attack=badnets``: a small square patch that replaces pixels (Gu et al. 2017).

Default as in BackdoorBench: a 3x3 white square in the bottom-right corner with no margin,
all-to-one target 0, poison rate 0.1 of the whole training set; all-to-all (y + 1 mod K) as an
option. The patch replaces the pixels of every channel. The poisoned images are stored before
augmentation (as BackdoorBench stores its PNGs), so random crops shift the patch during
training.

Reference:
    Gu, Dolan-Gavitt, Garg. "BadNets: Identifying Vulnerabilities in the Machine Learning Model
    Supply Chain." arXiv:1708.06733, 2017.

Deviations: none in the trigger; the test-time trigger is the training trigger.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from attacks.base import Attack, Mode
from benchmark.errors import ConfigError

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


class BadNets(Attack):
    """Square patch trigger.

    Args:
        size: side of the square, in pixels.
        position: a corner name (``bottom_right``, ``bottom_left``, ``top_right``, ``top_left``)
            or ``[row, col]`` of the square's top-left pixel.
        margin: distance of a corner square from the image border, in pixels.
        value: pixel value of the square in [0, 1] (1.0 = white).
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
    ) -> None:
        super().__init__(target_class, poison_rate, mode)
        if not isinstance(size, int) or size < 1:
            raise ConfigError("attack.size", f"must be a positive integer, got {size!r}")
        if not isinstance(margin, int) or margin < 0:
            raise ConfigError("attack.margin", f"must be an integer >= 0, got {margin!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise ConfigError("attack.value", f"must be a pixel value in [0, 1], got {value!r}")
        if isinstance(position, str):
            if position not in CORNERS:
                raise ConfigError(
                    "attack.position",
                    f"must be one of {list(CORNERS)} or [row, col], got {position!r}",
                )
        elif len(position) != 2 or not all(isinstance(p, int) and p >= 0 for p in position):
            raise ConfigError(
                "attack.position", f"[row, col] needs two integers >= 0, got {list(position)!r}"
            )
        self.size, self.margin, self.value = size, margin, float(value)
        self.position = position if isinstance(position, str) else tuple(position)
        self.origin: tuple[int, int] | None = None

    def validate(self, num_classes: int, image_shape: tuple[int, int, int], n_train: int) -> None:
        super().validate(num_classes, image_shape, n_train)
        self.origin = self._origin(image_shape[1], image_shape[2])

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

    def apply_trigger(self, x: Tensor) -> Tensor:
        row, col = self.origin or self._origin(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., row : row + self.size, col : col + self.size] = self.value
        return out

    def describe(self, n_train: int) -> dict[str, Any]:
        return {**super().describe(n_train), "trigger_size": self.size}
