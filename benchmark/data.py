"""Data utilities on ``ImageSet``s: stratified, seeded index selection and batching helpers."""

from __future__ import annotations

import torch
from torch import Tensor

from benchmark.types import ImageSet


def stratified_counts(class_counts: Tensor, n: int) -> Tensor:
    """How many samples of each class a stratified subset of size ``n`` takes.

    Proportional allocation with the largest-remainder rule (ties go to the lower class index),
    so the result sums to exactly ``n`` and never exceeds a class's count.
    """
    total = int(class_counts.sum())
    if not 0 <= n <= total:
        raise ValueError(f"cannot take {n} samples from a set of {total}")
    exact = class_counts.double() * n / max(total, 1)
    counts = exact.floor().long()
    rest = n - int(counts.sum())
    if rest:
        # Stable sort on the negated remainder: largest remainder first, lower class on ties.
        order = torch.sort(-(exact - counts), stable=True).indices
        order = order[counts[order] < class_counts[order]]
        counts[order[:rest]] += 1
    return counts


def stratified_indices(y: Tensor, n: int, num_classes: int, gen: torch.Generator) -> Tensor:
    """Sorted int64 indices of a seeded stratified subset of size ``n`` of labels ``y``."""
    y = y.cpu()
    counts = stratified_counts(torch.bincount(y, minlength=num_classes), n)
    picked = []
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        perm = torch.randperm(members.numel(), generator=gen)
        picked.append(members[perm[: int(counts[c])]])
    return torch.sort(torch.cat(picked)).values


def stratified_split(data: ImageSet, n_first: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Split ``data`` into two disjoint index sets, the first of size ``n_first``, stratified."""
    first = stratified_indices(data.y, n_first, data.num_classes, gen)
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[first] = False
    return first, torch.nonzero(mask).flatten()


def to_float(x: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [0, 1]."""
    return x.float().div_(255.0)


def to_uint8(x: Tensor) -> Tensor:
    """Float pixels in [0, 1] -> uint8, rounded to nearest (the quantisation of stored images)."""
    return x.clamp(0.0, 1.0).mul(255.0).round_().to(torch.uint8)
