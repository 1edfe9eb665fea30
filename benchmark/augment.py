"""Batched augmentations on the training device: the dataset's per-sample crop and flip
(``Augment``), and WaNet's per-batch one (``PerBatchAugment``).

``Augment`` draws one crop offset and one flip decision per sample from the fit's seeded
generator (torchvision's ``RandomCrop(padding=p)`` + ``RandomHorizontalFlip`` per image, here one
gather for the batch); ``pad_mode="reflect"`` pads by reflection, as airbench's translate does.

``PerBatchAugment``: one random decision and one parameter set for the whole batch.

This is what torchvision's transforms do to a 4-D tensor, and so what WaNet's official
``PostTensorTransform`` does (BackdoorBench ``attack/wanet.py:89-115`` at
SCLBD/BackdoorBench@f02e353, from the WaNet release). It applies, in this order, to the
already poisoned, normalised batch: ``ProbTransform(RandomCrop(H, padding=5), p=0.8)``,
``ProbTransform(RandomRotation(10), p=0.5)`` and, on CIFAR-10, ``RandomHorizontalFlip(0.5)``.
``ProbTransform`` calls ``random.random()`` once per batch, ``RandomCrop`` pads with 0 and
draws one offset, and ``RandomRotation`` draws one angle in [-10, 10] degrees (nearest
interpolation, fill 0, no expansion). The harness feeds pixels in [0, 1] (the model
normalises), so the fill is the normalisation mean in pixel space, which is 0 in
BackdoorBench's normalised space.

Here every draw comes from the harness's seeded generator on the training device, always the
same number of draws per batch (a skipped step's parameters are drawn and unused), and nothing
syncs with the host. ``apply`` takes explicit parameters, so tests can feed the ones
BackdoorBench drew (``tests/attacks/test_wanet_fidelity.py``: identical output).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Augment:
    """Batched augmentation settings: random crop with padding and horizontal flip."""

    crop_padding: int = 0
    hflip: bool = False
    pad_mode: Literal["zeros", "reflect"] = "zeros"

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        if self.crop_padding > 0:
            x = random_crop(x, self.crop_padding, gen, self.pad_mode)
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
        return x


def random_crop(x: Tensor, pad: int, gen: torch.Generator, pad_mode: str = "zeros") -> Tensor:
    """Per-sample random crop of a padded batch (torchvision ``RandomCrop(padding=pad)``;
    ``pad_mode`` zeros or reflect). One gather over the padded batch instead of a Python loop
    over samples."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect" if pad_mode == "reflect" else "constant")
    wp = w + 2 * pad
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    flat_index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w)
    return padded.flatten(2).gather(2, flat_index.expand(n, c, h * w)).view(n, c, h, w)


@dataclass(frozen=True)
class BatchParams:
    """One batch's draws (0-d tensors): ``crop``/``rotate``/``flip`` decisions, the crop's
    ``top``/``left`` offset in the padded image, the rotation ``angle`` in degrees."""

    crop: Tensor
    top: Tensor
    left: Tensor
    rotate: Tensor
    angle: Tensor
    flip: Tensor


@dataclass(frozen=True)
class PerBatchAugment:
    """Random crop, rotation and flip with one parameter set per batch (WaNet's
    ``PostTensorTransform``; see the module docstring).

    Args:
        fill: per-channel pixel value of the padding and of the rotation's empty corners.
        crop_padding: padding of the random crop (0 = no crop).
        crop_p: probability that the batch is cropped.
        degrees: the rotation angle is uniform in [-degrees, degrees] (0 = no rotation).
        rotation_p: probability that the batch is rotated.
        hflip: whether the batch is flipped with probability 0.5.
    """

    fill: Sequence[float]
    crop_padding: int = 5
    crop_p: float = 0.8
    degrees: float = 10.0
    rotation_p: float = 0.5
    hflip: bool = True

    def draw(self, gen: torch.Generator) -> BatchParams:
        """Six draws from ``gen`` (on its device), in BackdoorBench's order."""
        dev, span = gen.device, 2 * self.crop_padding + 1

        def uniform() -> Tensor:
            return torch.rand((), generator=gen, device=dev)

        crop = uniform() < self.crop_p
        top = torch.randint(0, span, (), generator=gen, device=dev)
        left = torch.randint(0, span, (), generator=gen, device=dev)
        rotate = uniform() < self.rotation_p
        angle = (uniform() * 2 - 1) * self.degrees
        flip = uniform() < 0.5
        return BatchParams(crop, top, left, rotate, angle, flip)

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        return self.apply(x, self.draw(gen))

    def apply(self, x: Tensor, p: BatchParams) -> Tensor:
        """The augmentation of ``x`` ``(N, C, H, W)`` with the parameters ``p``."""
        fill = torch.as_tensor(self.fill, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        fill = fill.expand(1, x.shape[1], 1, 1)
        if self.crop_padding > 0:
            pad = self.crop_padding
            # Not cropped = the window at (pad, pad): the image itself, exactly.
            top = torch.where(p.crop, p.top, pad).to(x.device)
            left = torch.where(p.crop, p.left, pad).to(x.device)
            x = crop_padded(x, pad, top, left, fill)
        if self.degrees > 0:
            x = torch.where(p.rotate.to(x.device), rotate_nearest(x, p.angle, fill), x)
        if self.hflip:
            x = torch.where(p.flip.to(x.device), x.flip(-1), x)
        return x


def crop_padded(x: Tensor, pad: int, top: Tensor, left: Tensor, fill: Tensor) -> Tensor:
    """The ``H x W`` window at ``(top, left)`` of ``x`` padded by ``pad`` with ``fill``
    (torchvision ``RandomCrop(padding=pad)`` with one offset for the batch)."""
    n, c, h, w = x.shape
    padded = fill.expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    padded[..., pad : pad + h, pad : pad + w] = x
    rows = top + torch.arange(h, device=x.device)
    cols = left + torch.arange(w, device=x.device)
    return padded.index_select(2, rows).index_select(3, cols)


def rotate_nearest(x: Tensor, angle: Tensor, fill: Tensor) -> Tensor:
    """``x`` rotated by ``angle`` degrees (counter-clockwise) about its centre, nearest
    neighbour, the empty corners set to ``fill``: torchvision's tensor ``rotate``
    (``_get_inverse_affine_matrix`` + ``_gen_affine_grid`` + ``grid_sample`` with align_corners
    False), with the angle as a tensor so nothing syncs."""
    n, _, h, w = x.shape
    rad = -angle.to(device=x.device, dtype=torch.float64) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # Inverse rotation matrix of torchvision (rows [d, -b, 0], [-c, a, 0] with a = d = cos,
    # b = -sin, c = sin), rescaled by the half-size as its _gen_affine_grid does.
    theta = torch.stack([torch.stack([cos, sin]), torch.stack([-sin, cos])]).to(x.dtype)
    half = torch.tensor([0.5 * w, 0.5 * h], dtype=x.dtype, device=x.device)
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, device=x.device, dtype=x.dtype)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, device=x.device, dtype=x.dtype)
    base = torch.stack(
        [xs.expand(h, w), ys[:, None].expand(h, w), torch.ones_like(xs).expand(h, w)], dim=-1
    )
    rescaled = torch.cat([theta.t(), torch.zeros(1, 2, device=x.device, dtype=x.dtype)]) / half
    grid = (base.view(1, h * w, 3) @ rescaled).view(1, h, w, 2).expand(n, h, w, 2)
    ones = torch.ones(n, 1, h, w, device=x.device, dtype=x.dtype)
    out = F.grid_sample(
        torch.cat([x, ones], 1), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    inside = out[:, -1:] >= 0.5
    return torch.where(inside, out[:, :-1], fill)
