"""SIG: the signal, clean-label selection, rate semantics and the test-time delta."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.sig import SIG
from benchmark.errors import ConfigError
from benchmark.seeding import generator
from tests.conftest import toy_set


def test_signal_is_a_horizontal_sinusoid_on_the_0_255_scale() -> None:
    attack = SIG(delta=40, frequency=6)
    x = torch.full((1, 3, 4, 24), 0.5)
    out = attack.apply_trigger(x)
    j = torch.arange(24, dtype=torch.float32)
    expected = 0.5 + 40 / 255 * torch.sin(2 * math.pi * j * 6 / 24)
    assert torch.allclose(out[0, 2, 3], expected, atol=1e-6)
    assert torch.equal(out[0, 0, 0], out[0, 1, 2])  # same on every row and channel
    assert out.min() >= 0 and out.max() <= 1


def test_only_target_class_images_are_poisoned_and_labels_kept() -> None:
    attack = SIG(target_class=2, poison_rate=0.5)
    attack.validate(4, (3, 12, 12), 200)
    train = toy_set(200, 4)
    attack.prepare(train, generator(0, "prepare"))
    p = attack.poison(train, generator(0, "poison"))
    assert p.num_poison == 25  # half of the 50 images of class 2
    assert (train.y[p.is_poison] == 2).all() and torch.equal(p.y, train.y)
    d = attack.describe(200)
    assert d["poison_rate_of_target"] == 0.5 and d["poison_rate_of_train"] == 25 / 200


def test_rate_of_train_set_counts_the_whole_set_and_rejects_too_many() -> None:
    attack = SIG(poison_rate=0.2, rate_of="train_set")
    attack.validate(4, (3, 12, 12), 200)
    train = toy_set(200, 4)
    attack.prepare(train, generator(0, "prepare"))
    assert attack.poison(train, generator(0, "poison")).num_poison == 40
    too_many = SIG(poison_rate=0.3, rate_of="train_set")  # 60 > the 50 target images
    too_many.validate(4, (3, 12, 12), 200)
    with pytest.raises(ConfigError, match=r"attack\.poison_rate.*only 50"):
        too_many.prepare(train, generator(0, "prepare"))


def test_training_and_test_delta_differ() -> None:
    # Width 24: f = 6 gives a period of 4 pixels (at width 12 every sample is a zero crossing).
    attack = SIG(delta=20, test_delta=60)
    attack.validate(4, (3, 8, 24), 200)
    train = toy_set(200, 4, (3, 8, 24))
    train.x.fill_(128)
    attack.prepare(train, generator(0, "prepare"))
    p = attack.poison(train, generator(0, "poison"))
    i = int(torch.nonzero(p.is_poison)[0])
    train_amp = (p.x[i].float() - 128).abs().max()
    test_amp = (attack.apply_trigger(torch.full((1, 3, 8, 24), 128 / 255)) * 255 - 128).abs()
    assert 15 <= train_amp <= 21 and 50 <= test_amp.max() <= 61


def test_all2all_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"attack\.mode"):
        SIG(mode="all2all")
