"""BadNets: the patch, its placement, all-to-all labels, and bad sizes."""

from __future__ import annotations

import pytest
import torch

from attacks.badnets import BadNets
from benchmark.errors import ConfigError
from benchmark.seeding import generator
from tests.conftest import toy_set


def test_default_is_a_white_3x3_square_at_the_bottom_right() -> None:
    attack = BadNets()
    attack.validate(10, (3, 32, 32), 1000)
    out = attack.apply_trigger(torch.zeros(2, 3, 32, 32))
    assert (out[..., 29:, 29:] == 1.0).all()
    assert out.sum() == 2 * 3 * 9


@pytest.mark.parametrize(
    ("position", "corner"),
    [("top_left", (0, 0)), ("top_right", (0, 6)), ("bottom_left", (6, 0)), ([2, 3], (2, 3))],
)
def test_positions(position: object, corner: tuple[int, int]) -> None:
    attack = BadNets(size=2, position=position, value=0.5)
    attack.validate(10, (1, 8, 8), 100)
    out = attack.apply_trigger(torch.zeros(1, 1, 8, 8))
    r, c = corner
    assert (out[0, 0, r : r + 2, c : c + 2] == 0.5).all() and out.sum() == 4 * 0.5


def test_margin_moves_the_corner_square_inwards() -> None:
    attack = BadNets(size=3, margin=1)
    attack.validate(10, (1, 10, 10), 100)
    out = attack.apply_trigger(torch.zeros(1, 1, 10, 10))
    assert (out[0, 0, 6:9, 6:9] == 1).all() and out.sum() == 9


def test_all_to_all_shifts_labels_and_keeps_every_test_image() -> None:
    attack = BadNets(mode="all2all", poison_rate=0.5)
    attack.validate(4, (3, 12, 12), 200)
    train = toy_set(200, 4)
    p = attack.poison(train, generator(0, "poison"))
    idx = p.is_poison
    assert torch.equal(p.y[idx], (train.y[idx] + 1) % 4)
    bd = attack.backdoor_test_set(train)
    assert len(bd) == len(train) and torch.equal(bd.y, (train.y + 1) % 4)


def test_dirty_label_draws_from_every_class() -> None:
    attack = BadNets(poison_rate=0.5)
    attack.validate(4, (3, 12, 12), 200)
    p = attack.poison(toy_set(200, 4), generator(0, "poison"))
    assert set(p.y_orig[p.is_poison].tolist()) == {0, 1, 2, 3}


def test_square_that_does_not_fit_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"attack\.size"):
        BadNets(size=9).validate(10, (1, 8, 8), 100)
    with pytest.raises(ConfigError, match=r"attack\.position"):
        BadNets(position="middle")
    with pytest.raises(ConfigError, match=r"attack\.mode"):
        BadNets(mode="one2one")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"attack\.poison_rate"):
        BadNets(poison_rate=0.001).validate(10, (1, 8, 8), 100)  # rounds to no sample
