"""PerBatchAugment (WaNet's PostTensorTransform as batched ops): one parameter set per batch,
fill = the mean colour, BackdoorBench's probabilities, determinism under the seed, torchvision's
rotation. Its agreement with BackdoorBench's own transform is in
``tests/attacks/test_wanet_fidelity.py``."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from benchmark.augment import BatchParams, PerBatchAugment, rotate_nearest
from benchmark.seeding import generator

MEAN = (0.4914, 0.4822, 0.4465)


def params(crop=False, top=5, left=5, rotate=False, angle=0.0, flip=False) -> BatchParams:
    return BatchParams(
        torch.tensor(crop),
        torch.tensor(top),
        torch.tensor(left),
        torch.tensor(rotate),
        torch.tensor(angle, dtype=torch.float64),
        torch.tensor(flip),
    )


def test_shape_dtype_and_range_are_kept() -> None:
    aug = PerBatchAugment(fill=MEAN)
    x = torch.rand(16, 3, 32, 32)
    for seed in range(10):
        out = aug(x, generator(seed, "aug"))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_one_parameter_set_for_the_whole_batch() -> None:
    """Identical images stay identical: the crop, angle and flip are the batch's, not each
    sample's (the harness's Augment would draw them per sample)."""
    aug = PerBatchAugment(fill=MEAN)
    x = torch.rand(1, 3, 32, 32).expand(64, -1, -1, -1).contiguous()
    changed = 0
    for seed in range(20):
        out = aug(x, generator(seed, "aug"))
        assert (out == out[:1]).all()
        changed += int(not torch.equal(out[0], x[0]))
    assert changed > 10


def test_fill_is_the_mean_colour() -> None:
    aug = PerBatchAugment(fill=MEAN)
    x = torch.zeros(2, 3, 16, 16)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    out = aug.apply(x, params(crop=True, top=0, left=0))  # window at the padded corner
    assert torch.equal(out[..., :5, :], mean.expand(2, 3, 5, 16))
    assert torch.equal(out[..., :, :5], mean.expand(2, 3, 16, 5))
    assert torch.equal(out[..., 5:, 5:], x[..., :11, :11])
    rotated = aug.apply(x, params(rotate=True, angle=10.0))
    assert torch.equal(rotated[..., 0, 0], mean.view(1, 3).expand(2, 3))  # a corner left empty
    assert ((rotated == 0) | (rotated == mean)).all() and (rotated == 0).any()


def test_skipped_steps_are_the_identity() -> None:
    aug = PerBatchAugment(fill=MEAN)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(aug.apply(x, params(top=0, left=10, angle=7.0)), x)
    assert torch.equal(aug.apply(x, params(flip=True)), x.flip(-1))
    assert torch.equal(PerBatchAugment(fill=MEAN, hflip=False).apply(x, params(flip=True)), x)


def test_backdoorbench_probabilities_and_ranges() -> None:
    """p 0.8 crop, p 0.5 rotation, p 0.5 flip (ProbTransform, RandomHorizontalFlip), offsets
    0..10 (RandomCrop on the 5-padded image), angles in [-10, 10]."""
    aug = PerBatchAugment(fill=MEAN)
    g = generator(0, "aug")
    draws = [aug.draw(g) for _ in range(4000)]
    keys = ("crop", "rotate", "flip")
    rate = {k: sum(bool(getattr(p, k)) for p in draws) / len(draws) for k in keys}
    assert rate["crop"] == pytest.approx(0.8, abs=0.03)
    assert rate["rotate"] == pytest.approx(0.5, abs=0.03)
    assert rate["flip"] == pytest.approx(0.5, abs=0.03)
    tops = torch.stack([p.top for p in draws])
    assert set(tops.tolist()) == set(range(11))
    angles = torch.stack([p.angle for p in draws])
    assert -10 <= float(angles.min()) < -9.9 and 9.9 < float(angles.max()) <= 10


def test_deterministic_under_the_seed() -> None:
    aug = PerBatchAugment(fill=MEAN)
    x = torch.rand(8, 3, 32, 32)
    outs = [aug(x, generator(s, "aug")) for s in (1, 1, 2, 3, 4)]
    assert torch.equal(outs[0], outs[1])
    assert any(not torch.equal(outs[0], o) for o in outs[2:])


@pytest.mark.parametrize("angle", [-9.5, -3.25, 0.0, 2.0, 7.77, 10.0])
def test_rotation_is_torchvisions_nearest_rotation(angle: float) -> None:
    x = torch.rand(3, 3, 32, 32)
    fill = torch.tensor(MEAN).view(1, 3, 1, 1)
    ours = rotate_nearest(x, torch.tensor(angle, dtype=torch.float64), fill)
    theirs = TF.rotate(x, angle, interpolation=TF.InterpolationMode.NEAREST, fill=list(MEAN))
    assert torch.equal(ours, theirs)


def test_runs_on_the_generators_device_without_host_draws() -> None:
    aug = PerBatchAugment(fill=MEAN)
    g = generator(0, "aug")
    p = aug.draw(g)
    assert all(t.device == torch.device("cpu") and t.dim() == 0 for t in vars(p).values())
