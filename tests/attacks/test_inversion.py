"""Bounded trigger inversion: stamping, the hard budget, a planted backdoor, and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from attacks.inversion import InvertedTriggers, invert_triggers, stamp, trigger_asr
from benchmark.data import to_uint8
from benchmark.seeding import generator

SIZE = 16
STRIPE = 4  # class c is a bright band of rows [4c, 4c + 4); rows 12-15 stay dark


class StripeModel(nn.Module):
    """Hand-made 3-class model on 1x16x16 images with a planted backdoor to class 2.

    Clean logits are 10x the mean brightness of each class's band (a linear layer with set
    weights). A white bottom-right 3x3 patch adds up to +30 to class 2 through a smooth gate, so
    gradients reach the patch from clean images too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(SIZE * SIZE, 3)
        with torch.no_grad():
            weight = torch.zeros(3, SIZE, SIZE)
            for c in range(3):
                weight[c, STRIPE * c : STRIPE * (c + 1)] = 10.0 / (STRIPE * SIZE)
            self.linear.weight.copy_(weight.view(3, -1))
            self.linear.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        logits = self.linear(x.flatten(1))
        patch = x[:, 0, -3:, -3:].mean(dim=(1, 2))
        gate = 30.0 * torch.sigmoid(10.0 * (patch - 0.6))
        return logits + torch.nn.functional.pad(gate[:, None], (2, 0))


class ConstantModel(nn.Module):
    """Predicts class 0 for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([5.0, 0.0, 0.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.bias.expand(x.shape[0], 3)


def toy_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Dark noise in [0, 0.3] with the label's band brightened to [0.8, 1]."""
    gen = generator(seed, "toy")
    y = torch.arange(n) % 3
    x = 0.3 * torch.rand(n, 1, SIZE, SIZE, generator=gen)
    for i in range(n):
        c = int(y[i])
        band = 0.8 + 0.2 * torch.rand(STRIPE, SIZE, generator=gen)
        x[i, 0, STRIPE * c : STRIPE * (c + 1)] = band
    return x, y


@pytest.fixture(scope="module")
def planted() -> tuple[StripeModel, InvertedTriggers]:
    model = StripeModel()
    x, y = toy_data(96, seed=0)
    found = invert_triggers(
        model, x, y, targets=[0, 1, 2], budgets=[0.05, 0.1], steps=60, batch_size=24, seed=0
    )
    return model, found


def test_stamp_arithmetic() -> None:
    x = torch.full((2, 1, 2, 2), 0.2)
    pattern = torch.full((1, 2, 2), 1.0)
    mask = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    out = stamp(x, mask, pattern)
    expected = torch.tensor([[0.2, 0.6], [1.0, 0.4]])
    assert torch.allclose(out, expected.expand(2, 1, 2, 2))
    assert torch.equal(stamp(x, torch.zeros(1, 2, 2), pattern), x)
    assert torch.equal(stamp(x, torch.ones(1, 2, 2), pattern), pattern.expand_as(x))


def test_shapes_and_lookup(planted: tuple[StripeModel, InvertedTriggers]) -> None:
    _, found = planted
    assert found.targets.tolist() == [0, 1, 2] and found.budgets == (0.05, 0.1)
    assert found.mask.shape == (3, 2, 1, SIZE, SIZE)
    assert found.pattern.shape == (3, 2, 1, SIZE, SIZE)
    assert found.fit_asr.shape == (3, 2)
    assert found.mask.min() >= 0 and found.mask.max() <= 1
    assert found.pattern.min() >= 0 and found.pattern.max() <= 1
    mask, pattern = found.trigger(2, 0.1)
    assert torch.equal(mask, found.mask[2, 1]) and torch.equal(pattern, found.pattern[2, 1])
    with pytest.raises(KeyError):
        found.trigger(5, 0.1)
    with pytest.raises(KeyError):
        found.trigger(2, 0.2)


def test_budget_is_a_hard_bound(planted: tuple[StripeModel, InvertedTriggers]) -> None:
    _, found = planted
    area = found.mask.mean(dim=(2, 3, 4))
    for j, budget in enumerate(found.budgets):
        assert (area[:, j] <= budget + 1e-6).all(), (budget, area[:, j])


def test_large_penalty_free_budget_is_still_bounded() -> None:
    """With no penalty the optimiser grows the masks freely; the projection still caps them."""
    x, y = toy_data(12, seed=3)
    found = invert_triggers(
        StripeModel(), x, y, targets=[0], budgets=[0.02, 0.3], steps=15, penalty=0.0
    )
    area = found.mask.mean(dim=(2, 3, 4))[0]
    assert area[0] <= 0.02 + 1e-6 and area[1] <= 0.3 + 1e-6
    assert math.isclose(float(area[0]), 0.02, rel_tol=1e-4)  # it had exceeded and was scaled


def test_planted_backdoor_is_found(planted: tuple[StripeModel, InvertedTriggers]) -> None:
    model, found = planted
    x_eval, y_eval = toy_data(150, seed=1)  # disjoint from the optimisation images
    asr = {}
    for t in (0, 1, 2):
        for budget in found.budgets:
            mask, pattern = found.trigger(t, budget)
            asr[t, budget], _, n = trigger_asr(model, x_eval, y_eval, mask, pattern, t)
            assert n == 100
    assert asr[2, 0.05] >= 0.9 and asr[2, 0.1] >= 0.9
    assert asr[0, 0.05] <= 0.2 and asr[1, 0.05] <= 0.2
    assert found.fit_asr[2].min() >= 0.9 and found.fit_asr[:2, 0].max() <= 0.2
    # The planted trigger lives in the bottom-right patch: the mask concentrates there.
    mask = found.trigger(2, 0.05)[0][0]
    inside = mask[-3:, -3:].mean()
    outside = (mask.sum() - mask[-3:, -3:].sum()) / (mask.numel() - 9)
    assert inside > 10 * outside


def test_model_left_unchanged_and_deterministic() -> None:
    model = StripeModel()
    model.linear.bias.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = toy_data(30, seed=2)
    kwargs = {"targets": [1, 2], "budgets": [0.05], "steps": 10, "batch_size": 8, "seed": 7}
    first = invert_triggers(model, to_uint8(x), y, **kwargs)
    assert model.training
    assert model.linear.weight.requires_grad and not model.linear.bias.requires_grad
    assert model.linear.weight.grad is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    second = invert_triggers(model, to_uint8(x), y, **kwargs)
    assert torch.equal(first.mask, second.mask) and torch.equal(first.pattern, second.pattern)
    other = invert_triggers(model, to_uint8(x), y, **{**kwargs, "seed": 8})
    assert not torch.equal(first.pattern, other.pattern)


def test_trigger_asr_excludes_the_target_class() -> None:
    model = ConstantModel()
    x = torch.rand(4, 1, 4, 4)
    y = torch.tensor([0, 0, 1, 2])
    mask, pattern = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    assert trigger_asr(model, x, y, mask, pattern, 0) == (1.0, 0.0, 2)
    asr, ra, n = trigger_asr(model, to_uint8(x), y, mask, pattern, 1)
    assert (asr, n) == (0.0, 3) and math.isclose(ra, 2 / 3)
    asr, ra, n = trigger_asr(model, x[:2], y[:2], mask, pattern, 0)
    assert n == 0 and math.isnan(asr) and math.isnan(ra)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budgets": [0.0]}, "budgets"),
        ({"budgets": [1.5]}, "budgets"),
        ({"budgets": []}, "budgets"),
        ({"targets": []}, "targets"),
        ({"targets": [-1]}, "targets"),
        ({"targets": [3]}, "out of range"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"penalty": -1.0}, "penalty"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    x, y = toy_data(6, seed=0)
    args = {"targets": [0], "budgets": [0.1], "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        invert_triggers(StripeModel(), x, y, **args)


def test_bad_data() -> None:
    x, y = toy_data(6, seed=0)
    with pytest.raises(ValueError, match="empty"):
        invert_triggers(StripeModel(), x[:0], y[:0], targets=[0], budgets=[0.1])
    with pytest.raises(ValueError, match="y must"):
        invert_triggers(StripeModel(), x, y[:3], targets=[0], budgets=[0.1])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        invert_triggers(StripeModel(), x[:, 0], y, targets=[0], budgets=[0.1])
