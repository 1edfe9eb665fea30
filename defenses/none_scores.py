"""NONE's numbers: the hyperplane channel score, the reset count and order, the Jenks split.

The numpy part of the official ``analyze_neuros`` (RU-System-Software-and-Security/NONE 624b80f,
``none/compromised_detection.py``): per class ``k`` and channel ``j``,
``max_{p_k > lambda_h} a_j - (mean + 3 std)_{p_k < lambda_l} a_j``, the maximum over classes,
the top ``ceil(rho C)`` channels, each layer's top channel summed into the sample score, and
jenkspy's two-class breaks. Checked against that function on a fixed input in
``tests/defenses/test_none_fidelity.py``.

Jenks: the exact two-class optimum (minimum within-class sum of squares over the splits
between distinct values; a split inside a run of ties is never optimal) in O(n log n) by prefix
sums, not jenkspy's O(k n^2) Fisher-Jenks; its ``threshold`` is jenkspy's ``breaks[1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class JenksSplit:
    """The optimal two-class split of a 1-D sample.

    Attributes:
        threshold: the lower class's largest value (jenkspy's inner break).
        upper_min: the upper class's smallest value (``> threshold``).
        sse: the within-class sum of squared deviations from the class means.
        n_upper: the size of the upper class.
    """

    threshold: float
    upper_min: float
    sse: float
    n_upper: int


def jenks_two_classes(values: Tensor) -> JenksSplit | None:
    """Jenks natural breaks with two classes: the split of the sorted values into a lower and an
    upper class with the least within-class sum of squares. None with fewer than two distinct
    values.

    Sort, then prefix sums of ``x`` and ``x^2`` give every split's cost in O(1): O(n log n) in
    all. Only splits between distinct values are candidates; this loses nothing, since moving a
    tied copy across a split strictly lowers the cost unless all values are equal.
    """
    v = torch.sort(values.detach().double().cpu().flatten()).values
    n = v.numel()
    if n < 2:
        return None
    distinct = v[1:] > v[:-1]  # a split after sorted position i (lower class v[: i + 1])
    if not bool(distinct.any()):
        return None
    c = v - v.mean()  # centred: smaller sums, less cancellation in sumsq - sum^2 / n
    s1, s2 = torch.cumsum(c, 0), torch.cumsum(c * c, 0)
    k = torch.arange(1, n, dtype=torch.float64)  # lower class sizes
    lo1, lo2 = s1[:-1], s2[:-1]
    hi1, hi2 = s1[-1] - lo1, s2[-1] - lo2
    cost = (lo2 - lo1 * lo1 / k) + (hi2 - hi1 * hi1 / (n - k))
    cost = torch.where(distinct, cost, torch.full_like(cost, math.inf))
    i = int(torch.argmin(cost))
    return JenksSplit(float(v[i]), float(v[i + 1]), max(float(cost[i]), 0.0), n - i - 1)


def jenks_flags(values: Tensor, *, include_break: bool = False) -> tuple[Tensor, JenksSplit | None]:
    """``(N,)`` bool flags of the upper Jenks class of ``values`` (on the CPU), and the split.

    ``include_break`` flags ``values >= threshold`` instead (the official ``>= breaks[1]``,
    which adds the lower class's largest value). No split: nothing flagged.
    """
    v = values.detach().double().cpu().flatten()
    split = jenks_two_classes(v)
    if split is None:
        return torch.zeros(v.numel(), dtype=torch.bool), None
    flags = v >= split.threshold if include_break else v > split.threshold
    return flags, split


# -- the hyperplane channel score ---------------------------------------------------------------
class HyperplaneStats:
    """Streaming statistics of the hyperplane test for one layer of ``channels`` channels.

    ``update`` takes batches of per-sample channel activations and class probabilities;
    ``scores`` gives ``max_k [max_{H_k} a - (mean_{L_k} a + n_std * std_{L_k} a)]`` per channel.
    Float64 accumulators on the device of the first batch: per class the maximum over the
    confident samples, and the count, sum and sum of squares over the unlikely ones.
    """

    def __init__(
        self, channels: int, num_classes: int, *, lambda_low: float, lambda_high: float
    ) -> None:
        self.channels, self.num_classes = int(channels), int(num_classes)
        self.lambda_low, self.lambda_high = float(lambda_low), float(lambda_high)
        self._acc: dict[str, Tensor] | None = None

    def _init(self, device: torch.device) -> dict[str, Tensor]:
        k, c, f64 = self.num_classes, self.channels, torch.float64
        return {
            "high_max": torch.full((k, c), -math.inf, dtype=f64, device=device),
            "n_high": torch.zeros(k, dtype=torch.long, device=device),
            "low_sum": torch.zeros(k, c, dtype=f64, device=device),
            "low_sq": torch.zeros(k, c, dtype=f64, device=device),
            "n_low": torch.zeros(k, dtype=torch.long, device=device),
        }

    def update(self, acts: Tensor, probs: Tensor) -> None:
        """Add a batch: ``acts (B, C)`` activations, ``probs (B, K)`` softmax outputs."""
        if acts.shape[1] != self.channels or probs.shape[1] != self.num_classes:
            raise ValueError(
                f"expected (B, {self.channels}) activations and (B, {self.num_classes}) "
                f"probabilities, got {tuple(acts.shape)} and {tuple(probs.shape)}"
            )
        if self._acc is None:
            self._acc = self._init(acts.device)
        acc = self._acc
        a = acts.to(acc["low_sum"].device, torch.float64)
        p = probs.to(a.device)
        high, low = p > self.lambda_high, p < self.lambda_low
        pairs = high.nonzero()  # (sample, class) pairs; a sample may be confident for one class
        if pairs.numel():
            index = pairs[:, 1:].expand(-1, self.channels)
            acc["high_max"].scatter_reduce_(0, index, a[pairs[:, 0]], reduce="amax")
        acc["n_high"] += high.sum(0)
        low_f = low.to(torch.float64)
        acc["low_sum"] += low_f.T @ a
        acc["low_sq"] += low_f.T @ (a * a)
        acc["n_low"] += low.sum(0)

    def class_scores(self, n_std: float) -> Tensor:
        """``(K, C)`` float64 ``d_k`` per class and channel on the CPU; 0 for a class with no
        confident (``H_k``) or no unlikely (``L_k``) sample."""
        if self._acc is None:
            return torch.zeros(self.num_classes, self.channels, dtype=torch.float64)
        acc = {k: v.cpu() for k, v in self._acc.items()}
        n = acc["n_low"].clamp_min(1).to(torch.float64)[:, None]
        mean = acc["low_sum"] / n
        std = (acc["low_sq"] / n - mean * mean).clamp_min(0.0).sqrt()  # population std
        d = acc["high_max"] - (mean + n_std * std)
        valid = (acc["n_high"] > 0) & (acc["n_low"] > 0)
        return torch.where(valid[:, None], d, torch.zeros_like(d))

    def scores(self, n_std: float) -> Tensor:
        """``(C,)`` float64 channel scores (max over classes) on the CPU."""
        return self.class_scores(n_std).amax(0)

    def classes_without_confident(self) -> int:
        """How many classes had no sample with probability above ``lambda_high``."""
        if self._acc is None:
            return self.num_classes
        return int((self._acc["n_high"] == 0).sum())


def hyperplane_scores(
    acts: Tensor,
    probs: Tensor,
    *,
    lambda_low: float = 0.1,
    lambda_high: float = 0.9,
    n_std: float = 3.0,
) -> Tensor:
    """``(C,)`` float64 hyperplane scores of channel activations ``acts (N, C)`` given the
    softmax outputs ``probs (N, K)`` (see ``HyperplaneStats``)."""
    stats = HyperplaneStats(
        acts.shape[1], probs.shape[1], lambda_low=lambda_low, lambda_high=lambda_high
    )
    stats.update(acts, probs)
    return stats.scores(n_std)


def n_reset(fraction: float, channels: int) -> int:
    """``ceil(fraction * channels)``, at least 1, robust to float error (0.03 * 100 is 3)."""
    return min(channels, max(1, math.ceil(fraction * channels - 1e-9)))


def top_channels(scores: Tensor, k: int) -> Tensor:
    """The ``k`` highest-scoring channels, best first (stable: ties keep the lower index)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]
