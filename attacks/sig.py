"""``attack=sig``: the sinusoidal-signal clean-label attack (Barni, Kallas, Tondi 2019).

The signal v(i, j) = delta * sin(2 pi j f / m), with j the column and m the image width, is the
same on every row and channel (vertical stripes along the width, "horizontal" in the paper's
words). It is added to target-class training images, which keep their labels, and the result
is clipped to the pixel range. At test time it is added to non-target images. Defaults as in
BackdoorBench: delta 40 and f 6 on the 0-255 scale, the same delta for training and test
(``test_delta`` sets the test-time one separately, e.g. 60 as in the ABL repository).

Reference:
    Barni, Kallas, Tondi. "A New Backdoor Attack in CNNs by Training Set Corruption Without
    Label Poisoning." ICIP 2019, arXiv:1902.11237.

Poison rate: a fraction of the target class by default (see ``CleanLabelAttack``); the default
0.5 is BackdoorBench's 5% setting on a balanced 10-class set, where CA stays near the clean
model's (at 10% BackdoorBench poisons the whole class and CA drops about 9 points).

Deviations: none in the signal (``utils/bd_img_transform/sig.py`` at SCLBD/BackdoorBench@f02e353).
The stored images are rounded to uint8, where BackdoorBench truncates (``np.uint8(np.clip(...))``),
so every stored value is BackdoorBench's or one level above it (about 37% of the values of
random images; pinned by ``tests/attacks/test_triggers_fidelity.py``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from attacks.base import CleanLabelAttack, Mode, RateOf, checks
from benchmark.data import to_float, to_uint8


class SIG(CleanLabelAttack):
    """Additive horizontal sinusoid on target-class images, labels kept.

    Args:
        delta: amplitude at training time, on the 0-255 scale.
        test_delta: amplitude at test time (null = ``delta``).
        frequency: periods across the image width.
    """

    name: ClassVar[str] = "sig"

    def __init__(
        self,
        target_class: int = 0,
        poison_rate: float = 0.5,
        mode: Mode = "all2one",
        rate_of: RateOf = "target_class",
        delta: float = 40.0,
        test_delta: float | None = None,
        frequency: float = 6.0,
    ) -> None:
        super().__init__(target_class, poison_rate, mode, rate_of)
        checks.number(delta, "delta", 0.0, 255.0, low_open=True)
        checks.null_or_number(test_delta, "test_delta", 0.0, 255.0, low_open=True)
        checks.number(frequency, "frequency", 0.0, low_open=True)
        self.delta = float(delta)
        self.test_delta = float(delta if test_delta is None else test_delta)
        self.frequency = float(frequency)

    def signal(self, width: int, delta: float, device: torch.device | None = None) -> Tensor:
        """``(width,)`` float signal in pixel units of [0, 1]."""
        j = torch.arange(width, dtype=torch.float32, device=device)
        return (delta / 255.0) * torch.sin(2.0 * math.pi * j * self.frequency / width)

    def _add(self, x: Tensor, delta: float) -> Tensor:
        return (x + self.signal(x.shape[-1], delta, x.device).to(x.dtype)).clamp_(0.0, 1.0)

    def apply_trigger(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """The test-time signal (``test_delta``)."""
        return self._add(x, self.test_delta)

    def poison_images(self, x: Tensor, index: Tensor) -> Tensor:
        """Target-class training images with the training-time signal (``delta``)."""
        return to_uint8(self._add(to_float(x), self.delta))

    def describe(self, n_train: int) -> dict[str, Any]:
        return {
            **super().describe(n_train),
            "delta": self.delta,
            "test_delta": self.test_delta,
            "frequency": self.frequency,
        }
